"""Reading user datasets (seed prompts, and later SFT / preference data) with errors that name the file and line."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path


class DataError(ValueError):
    """A user mistake in a dataset; the message names the file and the line or field."""


def prompt_id(text: str) -> str:
    """Stable id of a prompt: the same text gets the same id in every run and iteration."""
    return "p" + hashlib.sha256(text.strip().encode("utf-8")).hexdigest()[:12]


def read_records(source: str, *, split: str = "train") -> list[dict]:
    """Records of a JSONL / JSON / CSV / parquet file, or of an HF dataset id where a hub is reachable."""
    path = Path(source).expanduser()
    if path.is_dir():
        raise DataError(f"{source}: is a directory, expected a .jsonl, .csv or .parquet file")
    if path.exists():
        if not path.is_file():  # a FIFO would block forever, /dev/zero never ends
            raise DataError(f"{source}: not a regular file, expected a .jsonl, .csv or .parquet file")
        return _read_file(path)
    if path.suffix in {".jsonl", ".json", ".csv", ".parquet"} or source.startswith((".", "/", "~")):
        raise DataError(f"{source}: file not found")
    return _read_hub(source, split)


def _read_file(path: Path) -> list[dict]:
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason})") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None
    except Exception as err:  # pyarrow: not a parquet file
        raise DataError(f"{path}: cannot read parquet ({err})") from None
    if path.suffix == ".csv":
        return read_csv(path, text)
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of objects")
        return data
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno}: invalid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        records.append(record | {"__line__": lineno})
    return records


def read_csv(path: Path, text: str) -> list[dict]:
    """CSV records with ``__line__`` (the line a record starts on). Strict: an unterminated or
    stray quote, or a NUL byte, is an error naming the line, not a silently merged record."""
    nul = text.find("\0")
    if nul >= 0:
        raise DataError(f"{path}:{text.count(chr(10), 0, nul) + 1}: NUL byte in a CSV file")
    reader = csv.DictReader(text.splitlines(keepends=True), strict=True)
    records, start = [], 1
    try:
        reader.fieldnames  # reads the header
        start = reader.line_num + 1
        for record in reader:
            records.append(record | {"__line__": start})
            start = reader.line_num + 1
    except csv.Error as err:
        raise DataError(f"{path}:{start}: invalid CSV, unterminated quoted field or stray quote ({err})") from None
    return records


def _read_hub(name: str, split: str) -> list[dict]:
    try:
        import datasets

        return list(datasets.load_dataset(name, split=split))
    except Exception as err:  # no hub here, unknown id, missing split
        raise DataError(f"{name}: not a local file and could not be loaded as a dataset id ({type(err).__name__}: {err})") from None


def load_prompts(source: str, *, field: str = "prompt", split: str = "train", limit: int | None = None) -> list[dict]:
    """Seed prompts as rows ``{prompt_id, prompt, source: "seed"}``; duplicates dropped, order kept."""
    records = read_records(source, split=split)
    rows, seen = [], set()
    for index, record in enumerate(records, start=1):
        where = f"{source}:{record.get('__line__', index)}"
        if field not in record:
            raise DataError(f"{where}: missing field {field!r} (set prompts.field to the column holding the prompt)")
        text = record[field]
        if not isinstance(text, str):
            raise DataError(f"{where}: field {field!r} must be a string, got {type(text).__name__}")
        if not text.strip():
            raise DataError(f"{where}: field {field!r} is empty")
        pid = prompt_id(text)
        if pid in seen:
            continue
        seen.add(pid)
        rows.append({"prompt_id": pid, "prompt": text.strip(), "source": "seed"})
        if limit and len(rows) >= limit:
            break
    if not rows:
        raise DataError(f"{source}: no prompts")
    return rows
