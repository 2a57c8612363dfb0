"""Atomic file I/O and hashing: what every write of a run directory (and of model directories) goes through.

* **Visible only when complete.** Every file is written to a temp file in the same directory,
  fsynced, renamed over the target with ``os.replace`` and the directory is fsynced. A reader
  sees the old file or the new one, never half of one.
* **Failures name the path.** A failed write (disk full, permission denied) raises
  :class:`StoreError` naming the path and the OS reason, removes the temp file and leaves the
  old file untouched.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

TMP_INFIX = ".tmp-"


class StoreError(Exception):
    """A user-facing error about the run directory; the message names the path."""

    def __init__(self, message: str, *, path: str | os.PathLike | None = None):
        super().__init__(message)
        self.path = Path(path) if path is not None else None


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"), ensure_ascii=False)


def hash_obj(obj: Any) -> str:
    """sha256 hex of the canonical JSON of ``obj`` (sorted keys, ``default=str``)."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def os_reason(e: OSError) -> str:
    reason = e.strerror or str(e)
    if e.errno is not None:
        reason += f" (errno {e.errno})"
    if e.errno == errno.ENOSPC:
        reason += "; free some disk space and resume the run"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason += "; check the permissions of the run directory"
    return reason


def store_error(action: str, path: Path, e: OSError) -> StoreError:
    err = StoreError(f"cannot {action} {path}: {os_reason(e)}", path=path)
    err.__cause__ = e
    return err


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so a rename inside it is durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems refuse fsync on directories
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise store_error("create directory", path, e) from e


def temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_INFIX}{os.getpid()}-{secrets.token_hex(4)}")


def unlink_quiet(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def atomic_write(path: Path, fill: Callable[[Any], None], *,
                  before_replace: Callable[[], Callable[[], None] | None] | None = None) -> None:
    """Write ``path`` via temp file + fsync + rename + fsync(dir).

    ``fill(f)`` writes into a binary file object. ``before_replace`` runs once the temp file
    is fully on disk, just before the rename (used to set an old manifest aside only when the
    new data is known to be written); it may return an ``undo`` callable, called if the rename
    fails. On any OSError the temp file is removed and a StoreError naming ``path`` is raised;
    the old ``path`` is untouched.
    """
    path = Path(path)
    make_dir(path.parent)
    tmp = temp_name(path)
    undo: Callable[[], None] | None = None
    try:
        with open(tmp, "xb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            undo = before_replace()
        os.replace(tmp, path)
        undo = None
        fsync_dir(path.parent)
    except OSError as e:
        unlink_quiet(tmp)
        if undo is not None:
            undo()
        raise store_error("write", path, e) from e
    except BaseException:
        unlink_quiet(tmp)
        if undo is not None:
            undo()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(Path(path), lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=str, ensure_ascii=False) + "\n"


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json_text(obj))


def read_json_file(path: Path) -> Any:
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise store_error("read", path, e) from e
    except ValueError as e:
        raise StoreError(f"cannot read {path}: not valid JSON ({e})", path=path) from e


def rows_to_table(rows: list[dict], schema: pa.Schema | None) -> pa.Table:
    if schema is not None:
        return pa.Table.from_pylist(rows, schema=schema)
    if not rows:
        return pa.table({})
    # Union of keys in order of first appearance (from_pylist would silently use only the
    # first row's keys); a row missing a key gets None. pa.array infers over all values.
    keys: dict[str, None] = {}
    for r in rows:
        for k in r:
            keys.setdefault(k, None)
    return pa.table({k: pa.array([r.get(k) for r in rows]) for k in keys})


def write_parquet(path: Path, rows: list[dict], schema: pa.Schema | None = None, *, before_replace=None) -> None:
    try:
        table = rows_to_table(rows, schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise StoreError(f"cannot write {path}: rows do not form a table ({e})", path=path) from e
    atomic_write(path, lambda f: pq.write_table(table, f), before_replace=before_replace)


def read_parquet(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def is_temp(name: str) -> bool:
    return name.startswith(".") and TMP_INFIX in name


