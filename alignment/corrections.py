"""Review corrections: what a person changed in a judge dataset before it is trained on.

Corrections are stored append-only in ``RUN/corrections.jsonl`` (one JSON record per line);
stage outputs are never rewritten. A record::

    {"id", "time", "who", "iteration", "action", "prompt_id",
     "response_index"?, "judgment_index"?, "value"?, "note"?}

Actions:
- ``exclude_pair``   drop the prompt's preference pair from training;
- ``swap``           exchange chosen and rejected of the prompt's pair (a second swap undoes it);
- ``override_score`` replace one judgment's score (``value`` in [0, 5]); the response's mean is
                     recomputed and the prompt's pair re-selected with ``build_pairs``;
- ``note``           free text, changes no data.

Corrections apply in the order they were recorded, each to what the earlier ones left
(later wins): a swap then an override gives the pair the corrected scores select; an override
then a swap gives that pair flipped. An exclusion holds whatever comes after it.
:func:`review` is the one implementation; training, export and the review app all use it.

:func:`review` is pure; only :func:`add_correction` / :func:`load_corrections`
touch the run directory, through ``alignment.store``.
"""

from __future__ import annotations

import getpass
import io
import json
import math
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from alignment.pairs import build_pairs, group_by_prompt
from alignment.training import to_conversational

ACTIONS = ("exclude_pair", "swap", "override_score", "note")
CORRECTIONS_FILE = "corrections.jsonl"
MAX_NOTE_CHARS = 2000
MAX_WHO_CHARS = 100
SCORE_MIN, SCORE_MAX = 0.0, 5.0
EXPORT_FORMATS = ("jsonl", "parquet")


# ---------------------------------------------------------------------------- validation


def _as_int(record: dict, key: str) -> int:
    value = record.get(key)
    if isinstance(value, bool):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    # ASCII and short: "²".isdigit() is true, and int() of 5000 digits raises its own error.
    text = value.strip() if isinstance(value, str) else ""
    if 0 < len(text.lstrip("-")) <= 18 and text.isascii() and text.lstrip("-").isdigit():
        return int(text)
    raise ValueError(f"{key} must be an integer, got {str(value)[:20]!r}")


def _as_score(value) -> float:
    """A score override: a finite number in [0, 5] (strings from a form are accepted)."""
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"value must be a number between 0 and 5, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(score) or not SCORE_MIN <= score <= SCORE_MAX:
        raise ValueError(f"value must be a number between 0 and 5, got {value!r}")
    return score


def _judge_index(judge_rows: Iterable[dict]) -> dict[str, dict[int, int]]:
    """prompt_id -> {response_index: number of judgments}."""
    index: dict[str, dict[int, int]] = {}
    for row in judge_rows:
        index.setdefault(row["prompt_id"], {})[int(row["response_index"])] = len(row["judgments"])
    return index


def validate_correction(store, record: dict, judge_rows: list[dict] | None = None) -> dict:
    """A clean, complete copy of ``record``, or ValueError with a message for a person.

    ``iteration`` must be one of the run's iterations with a complete judge stage, and the
    ids must exist in that iteration's judge table. ``judge_rows`` may be passed to skip
    re-reading the table (the review app keeps it cached). ``id``/``time``/``who`` are filled
    in when missing.
    """
    action = record.get("action")
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {', '.join(ACTIONS)}; got {action!r}")
    iteration = _as_int(record, "iteration")
    if iteration not in store.iterations():
        raise ValueError(f"iteration {iteration} does not exist in this run")
    if judge_rows is None:
        if store.manifest(iteration, "judge") is None:
            raise ValueError(f"iteration {iteration} has no complete judge stage yet")
        judge_rows = store.read_rows(iteration, "judge")
    index = _judge_index(judge_rows)

    prompt_id = record.get("prompt_id")
    if not isinstance(prompt_id, str) or prompt_id not in index:
        raise ValueError(f"prompt_id {prompt_id!r} is not in iteration {iteration}'s judge table")

    clean = {
        "id": str(record.get("id") or uuid.uuid4().hex[:12]),
        "time": str(record.get("time") or datetime.now(timezone.utc).isoformat(timespec="seconds")),
        "who": _who(record.get("who")),
        "iteration": iteration,
        "action": action,
        "prompt_id": prompt_id,
    }
    if action == "override_score":
        response_index = _as_int(record, "response_index")
        n_judgments = index[prompt_id].get(response_index)
        if n_judgments is None:
            raise ValueError(f"prompt {prompt_id!r} has no response_index {response_index}")
        judgment_index = _as_int(record, "judgment_index")
        if not 0 <= judgment_index < n_judgments:
            raise ValueError(
                f"response {response_index} of prompt {prompt_id!r} has no judgment_index "
                f"{judgment_index} (it has {n_judgments})"
            )
        clean.update(
            response_index=response_index,
            judgment_index=judgment_index,
            value=_as_score(record.get("value")),
        )
    note = record.get("note")
    if note is not None and not isinstance(note, str):
        raise ValueError("note must be text")
    note = (note or "").strip()
    if len(note) > MAX_NOTE_CHARS:
        raise ValueError(f"note is longer than {MAX_NOTE_CHARS} characters")
    if action == "note" and not note:
        raise ValueError("a note needs some text")
    if note:
        clean["note"] = note
    return clean


def _who(who) -> str:
    who = (who if isinstance(who, str) else "").strip()[:MAX_WHO_CHARS]
    if who:
        return who
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "unknown"


# ---------------------------------------------------------------------------- storage


def add_correction(store, record: dict, judge_rows: list[dict] | None = None) -> dict:
    """Validate ``record`` and append it to ``RUN/corrections.jsonl``; returns the stored record."""
    clean = validate_correction(store, record, judge_rows)
    store.append_jsonl(CORRECTIONS_FILE, clean)
    return clean


def load_corrections(store, iteration: int | None = None) -> list[dict]:
    """All stored corrections in append order (only ``iteration``'s when given).

    A torn last line (a writer killed mid-append) is skipped, not fatal.
    """
    return [r for r in store.read_jsonl(CORRECTIONS_FILE) if iteration is None or r.get("iteration") == iteration]


# ---------------------------------------------------------------------------- applying


def rescored(row: dict, judgment_index: int, value: float) -> dict:
    """A copy of a judge row with one judgment's score replaced.

    mean_score = mean of the non-None scores (None if there are none); n_failed = number of None scores.
    """
    scores = list(row["scores"])
    scores[judgment_index] = float(value)
    valid = [s for s in scores if s is not None]
    return {**row, "scores": scores, "mean_score": sum(valid) / len(valid) if valid else None,
            "n_failed": len(scores) - len(valid)}


def override_scores(judge_rows: list[dict], overrides: list[dict]) -> tuple[list[dict], set[str], list[str]]:
    """Judge rows with the overridden scores (copies of changed rows), touched prompts, applied ids.

    Overrides are applied in the order given (append order), so a later override of the same
    judgment wins. One that names no existing judgment is skipped.
    """
    by_key = {(r["prompt_id"], int(r["response_index"])): i for i, r in enumerate(judge_rows)}
    rows = list(judge_rows)
    touched, applied = set(), []
    for c in overrides:
        i = by_key.get((c["prompt_id"], int(c["response_index"])))
        if i is None or not 0 <= int(c["judgment_index"]) < len(rows[i]["scores"]):
            continue
        rows[i] = rescored(rows[i], int(c["judgment_index"]), c["value"])
        touched.add(c["prompt_id"])
        applied.append(c["id"])
    return rows, touched, applied


def swap_pair(pair: dict) -> dict:
    """The pair with every ``chosen*`` field exchanged with its ``rejected*`` counterpart."""
    out = dict(pair)
    for key in pair:
        if key.startswith("chosen"):
            other = "rejected" + key[len("chosen"):]
            if other in pair:
                out[key], out[other] = pair[other], pair[key]
    return out


@dataclass
class PromptReview:
    """One prompt's pair after its corrections, replayed in the order they were recorded."""

    pair: dict | None  # the pair training gets, before exclusion (None: no pair)
    excluded: bool = False
    swapped: bool = False  # the pair is flipped relative to the one its scores select
    reselected: bool = False  # an override re-selected the pair from the corrected scores
    applied: list[str] = field(default_factory=list)


def review_prompt(pair: dict | None, rows: list[dict], corrections: list[dict], rho: float = 0.0) -> PromptReview:
    """Replay one prompt's corrections in the order given; a later correction acts on what the
    earlier ones left (later wins).

    - ``override_score``: the judgment's score is replaced, then the pair is re-selected from the
      corrected scores (:func:`alignment.pairs.build_pairs` over ``rows``, the prompt's judge
      rows). This replaces an earlier swap: the scores now decide.
    - ``swap``: chosen and rejected of the pair as it stands are exchanged (a second swap undoes it).
    - ``exclude_pair``: the prompt's pair is dropped from training, whatever comes after.

    Applied ids: an override that found its judgment, a swap that found a pair not excluded,
    an exclusion of a prompt that ends with a pair. Notes change nothing.
    """
    out = PromptReview(pair)
    excludes: list[str] = []
    for c in corrections:
        action = c.get("action")
        if action == "override_score":
            rows, _, hit = override_scores(rows, [c])
            if not hit:
                continue
            out.pair = next(iter(build_pairs(rows, rho)[0]), None)
            out.swapped, out.reselected = False, True
            out.applied.append(c["id"])
        elif action == "swap" and out.pair is not None and not out.excluded:
            out.pair, out.swapped = swap_pair(out.pair), not out.swapped
            out.applied.append(c["id"])
        elif action == "exclude_pair":
            out.excluded = True
            excludes.append(c["id"])
    if out.pair is not None:
        out.applied += excludes
    return out


@dataclass
class Reviewed:
    """An iteration's pairs after its corrections (what training, export and the review app use)."""

    pairs: list[dict]  # training order
    applied: list[str]  # ids of the corrections that acted, in the order recorded
    prompts: dict[str, PromptReview]  # the prompts that have corrections


def review(judge_rows: list[dict], pair_rows: list[dict], corrections: list[dict], rho: float = 0.0) -> Reviewed:
    """Apply one iteration's corrections in the order they were recorded, prompt by prompt
    (:func:`review_prompt`; prompts do not affect each other).

    Order of the result: the stored pairs' order, a re-selected pair in its prompt's place;
    a prompt that had no pair (a tie an override broke) comes last, in judge order. Only the
    overridden prompts' rows of ``judge_rows`` are used, so a caller may pass just those; the
    result is the same. Inputs are not modified.
    """
    by_prompt: dict[str, list[dict]] = {}
    for c in corrections:
        if c.get("action") in ("exclude_pair", "swap", "override_score"):
            by_prompt.setdefault(c["prompt_id"], []).append(c)
    stored = {p["prompt_id"]: p for p in pair_rows}
    rows = group_by_prompt(r for r in judge_rows if r["prompt_id"] in by_prompt)
    prompts = {pid: review_prompt(stored.get(pid), rows.get(pid, []), cs, rho) for pid, cs in by_prompt.items()}

    def kept(pid: str, pair: dict) -> dict | None:
        done = prompts.get(pid)
        return pair if done is None else None if done.excluded else done.pair

    pairs = [kept(p["prompt_id"], p) for p in pair_rows]
    pairs += [kept(pid, None) for pid in rows if pid not in stored]
    applied = {i for done in prompts.values() for i in done.applied}
    return Reviewed(pairs=[p for p in pairs if p is not None],
                    applied=[c["id"] for c in corrections if c.get("id") in applied], prompts=prompts)


def apply_corrections(
    judge_rows: list[dict], pair_rows: list[dict], corrections: list[dict], rho: float = 0.0
) -> tuple[list[dict], list[str]]:
    """Pairs after the corrections of one iteration and the ids of the corrections that acted
    (:func:`review`, which says the rule)."""
    reviewed = review(judge_rows, pair_rows, corrections, rho)
    return reviewed.pairs, reviewed.applied


# ---------------------------------------------------------------------------- reviewed data


def pairs_rho(store, iteration: int) -> float:
    """ρ the pairs stage used: its manifest's ``info["rho"]``, else the recipe's
    ``pairs.rho``, else 0.0."""
    info = (store.manifest(iteration, "pairs") or {}).get("info") or {}
    rho = info.get("rho")
    if not isinstance(rho, (int, float)):
        rho = (store.recipe().get("pairs") or {}).get("rho")
    return float(rho) if isinstance(rho, (int, float)) and not isinstance(rho, bool) else 0.0


def reviewed_pairs(store, iteration: int, rho: float | None = None) -> tuple[list[dict], list[str]]:
    """The iteration's pairs with its stored corrections applied, and the applied ids.

    This is what training and export use. ``rho`` defaults to the pairs stage's own.
    """
    judge_rows = store.read_rows(iteration, "judge")
    pair_rows = store.read_rows(iteration, "pairs")
    rho = pairs_rho(store, iteration) if rho is None else rho
    return apply_corrections(judge_rows, pair_rows, load_corrections(store, iteration), rho)


def to_trl(pair: dict) -> dict:
    """A pairs row as TRL's conversational preference row (prompt / chosen / rejected)."""
    return to_conversational([pair])[0]


def encode_pairs(pair_rows: list[dict], fmt: str = "jsonl") -> bytes:
    """Pairs rows as TRL preference rows, encoded as jsonl or parquet bytes."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {', '.join(EXPORT_FORMATS)}; got {fmt!r}")
    rows = [to_trl(p) for p in pair_rows]
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    import pyarrow as pa
    import pyarrow.parquet as pq

    message = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    schema = pa.schema([("prompt", message), ("chosen", message), ("rejected", message)])
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buffer)
    return buffer.getvalue()


def export_pairs(store, iteration: int, fmt: str = "jsonl", rho: float | None = None) -> bytes:
    """The reviewed pairs of ``iteration`` in TRL's preference format, as jsonl or parquet bytes."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {', '.join(EXPORT_FORMATS)}; got {fmt!r}")
    return encode_pairs(reviewed_pairs(store, iteration, rho)[0], fmt)
