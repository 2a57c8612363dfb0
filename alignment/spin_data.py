"""SPIN's input: the SFT set (prompt + real answer per row, from a file or dataset), checked row by
row so a bad row fails in the recipe's preflight, before any generation. The stages (``spin``)
and the recipe (``spin_config``) both read it from here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from alignment.data import DataError, prompt_id, read_records

if TYPE_CHECKING:  # annotations only: spin_config imports this module
    from alignment.spin_config import SpinDataConfig

def _where(source: str, record: dict, index: int) -> str:
    line = record.get("__line__")
    return f"{source}:{line}" if line is not None else f"{source}: row {index}"


def _first_exchange(messages, where: str, field_name: str) -> tuple[str, str]:
    """(first user message, the assistant message right after it) of a chat, as SPIN's code reads it."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field {field_name!r} must be a non-empty list of {{role, content}} messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: field {field_name!r} message {i} needs 'role' and 'content'")
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users:
        raise DataError(f"{where}: field {field_name!r} has no user message")
    u = users[0]
    if u + 1 >= len(messages) or messages[u + 1]["role"] != "assistant":
        raise DataError(f"{where}: field {field_name!r} has no assistant answer after the first user message")
    return messages[u]["content"], messages[u + 1]["content"]


def _text(value, where: str, name: str, what: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {what} {name!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: {what} {name!r} is empty")
    return value.strip()


def load_sft(cfg: SpinDataConfig) -> list[dict]:
    """The SFT set as rows ``{prompt_id, prompt, answer}``; duplicate prompts dropped, order kept.

    Every row is checked (this runs in ``preflight``, before any generation): a field mapping that
    names a column no row has, a row missing the prompt/answer, a non-string or empty answer →
    ``DataError`` naming the dataset, the row (file line) and the field.
    """
    source = cfg.source
    records = read_records(source, split=cfg.split)
    if not records:
        raise DataError(f"{source}: no rows")
    columns = sorted({k for r in records if isinstance(r, dict) for k in r if k != "__line__"})
    mapping = ([("messages_field", cfg.messages_field)] if cfg.messages_field
               else [("prompt_field", cfg.prompt_field), ("answer_field", cfg.answer_field)])
    for key, column in mapping:
        if column not in columns:
            raise DataError(f"{source}: data.{key} names column {column!r}, which no row has "
                            f"(columns: {', '.join(columns) or 'none'})")
    rows, seen = [], set()
    for index, record in enumerate(records, start=1):
        where = _where(source, record, index)
        if cfg.messages_field:
            if cfg.messages_field not in record:
                raise DataError(f"{where}: missing field {cfg.messages_field!r}")
            prompt, answer = _first_exchange(record[cfg.messages_field], where, cfg.messages_field)
            prompt = _text(prompt, where, cfg.messages_field, "first user message of")
            answer = _text(answer, where, cfg.messages_field, "assistant answer of")
        else:
            for name in (cfg.prompt_field, cfg.answer_field):
                if name not in record or record[name] is None:
                    raise DataError(f"{where}: missing field {name!r}")
            prompt = _text(record[cfg.prompt_field], where, cfg.prompt_field, "field")
            answer = _text(record[cfg.answer_field], where, cfg.answer_field, "field")
        pid = prompt_id(prompt)
        if pid in seen:
            continue
        seen.add(pid)
        rows.append({"prompt_id": pid, "prompt": prompt, "answer": answer})
        if cfg.limit and len(rows) >= cfg.limit:
            break
    return rows
