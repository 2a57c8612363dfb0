"""The run directory: stage manifests, tables, shards, events, status (atomic writes: ``alignment.files``;
the lock: ``alignment.run_lock``).

With ``alignment.files`` (how a file is written) and ``alignment.run_lock`` (who may write), this
is the only module that does file I/O for runs and the only one that decides paths (see
``docs/data-contracts.md`` for the layout). Flows, the CLI and the review app call it.

Guarantees
----------
* **Visible only when complete.** Every file is written to a temp file in the same
  directory, fsynced, renamed over the target with ``os.replace`` and the directory is
  fsynced. A reader sees the old file or the new one, never half of one.
* **The manifest is the commit point.** A stage's outputs are written first, its
  ``manifest.json`` last. The manifest records what produced the outputs (recipe hash,
  input hashes, code version) and the sha256 of every output file, so on resume
  :meth:`RunStore.check_stage` can tell "done", "inputs changed", "recipe changed" and
  "output corrupted/missing" apart.
* **Code version is recorded, not compared.** A patch release of selfalign must not make a
  resume redo a week of generation; stages are keyed on what they consume (inputs + recipe),
  and ``code_version`` is in the manifest for forensics only.
* **Redoing a stage never destroys the previous result early.** The new data is written to a
  temp file first; only once it is on disk is the old manifest removed and the temp renamed.
  A failure while writing (disk full, permission denied) raises :class:`StoreError` naming
  the path and the OS reason, removes the temp file and leaves the old outputs untouched.
* **Shards.** Generation and judging write ``shards/<key[:16]>/shard_<i>-<fingerprint>.parquet``
  one at a time, so a kill loses at most the shard in progress. ``key`` hashes everything that
  determines shard content (inputs, recipe, shard size) and the fingerprint hashes the items a
  shard was computed from, so shards of another recipe, inputs or layout are never mixed in.
* **One process per run.** :class:`RunLock` (see its docstring for the approach).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from alignment.files import (
    StoreError,
    atomic_write_json,
    canonical_json,
    atomic_write_text,
    fsync_dir,
    hash_obj,
    is_temp,
    make_dir,
    now_iso,
    os_reason,
    read_json_file,
    read_parquet,
    sha256_file,
    store_error,
    temp_name,
    unlink_quiet,
    write_parquet,
)
from alignment.run_lock import RunLock

try:
    from importlib.metadata import version as _pkg_version

    CODE_VERSION: str = _pkg_version("selfalign")
except Exception:  # PackageNotFoundError, or metadata broken
    CODE_VERSION = "dev"

RUN_FILE = "run.json"
RECIPE_FILE = "recipe.yaml"
EVENTS_FILE = "events.jsonl"
MANIFEST = "manifest.json"
DATA_FILE = "data.parquet"
SHARDS_DIR = "shards"
SCRATCH_MARKER = ".selfalign-scratch"

# shard_<index>-<fingerprint of the chunk's items>.parquet; the older name without a fingerprint
# still matches (counted by status) but is never reused: its items are unknown.
_SHARD_RE = re.compile(r"^shard_(\d+)(?:-([0-9a-f]+))?\.parquet$")
_ITER_RE = re.compile(r"^iter_(\d+)$")
_STAGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _check_stage_name(stage: str) -> str:
    if not isinstance(stage, str) or not _STAGE_RE.match(stage) or stage == SHARDS_DIR:
        raise ValueError(f"invalid stage name {stage!r}: use letters, digits, '_', '-', '.'")
    return stage


def _normalize_recipe(recipe: dict) -> dict:
    """What recipe.yaml will hold: plain JSON types (Paths, enums ... become strings)."""
    return json.loads(json.dumps(recipe, default=str))


class RunStore:
    """A run directory. See ``docs/data-contracts.md`` for the layout."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    # ------------------------------------------------------------------ create / open
    @classmethod
    def create(cls, root, *, recipe: dict, algorithm: str, name: str | None = None) -> "RunStore":
        """Create a run dir, or return the existing run when the recipe is the same (resume)."""
        root = Path(root)
        norm = _normalize_recipe(recipe)
        if root.exists() and not root.is_dir():
            raise StoreError(f"{root} exists and is not a directory", path=root)
        if (root / RUN_FILE).exists():
            store = cls.open(root)
            old = store.recipe()
            info = store.run_info()
            if hash_obj(old) != hash_obj(norm) or info.get("algorithm") != algorithm:
                diff = sorted(k for k in set(old) | set(norm) if old.get(k, _MISSING) != norm.get(k, _MISSING))
                parts = []
                if info.get("algorithm") != algorithm:
                    parts.append(f"algorithm {info.get('algorithm')!r} -> {algorithm!r}")
                if diff:
                    parts.append("recipe keys that differ: " + ", ".join(diff))
                raise StoreError(
                    f"{root} already holds a run with a different recipe ({'; '.join(parts)}). "
                    f"To resume it, use `selfalign resume {root}`; to change its settings, add "
                    f"--change-recipe (or `selfalign resume {root} --set KEY=VALUE`); to start a "
                    f"new run with this recipe, pass a new --run-dir.",
                    path=root,
                )
            return store
        if root.exists():
            # A create that crashed before run.json (the commit point) may leave recipe.yaml.
            leftovers = [p.name for p in root.iterdir() if p.name != RECIPE_FILE and not is_temp(p.name)]
            if leftovers:
                raise StoreError(
                    f"{root} is not empty and is not a selfalign run (no {RUN_FILE}); "
                    f"choose a new --run-dir",
                    path=root,
                )
        make_dir(root)
        atomic_write_text(root / RECIPE_FILE, yaml.safe_dump(norm, sort_keys=False, allow_unicode=True))
        run_info = {
            "name": name or root.resolve().name,
            "algorithm": algorithm,
            "created": now_iso(),
            "selfalign_version": CODE_VERSION,
            "recipe_hash": hash_obj(norm),
        }
        atomic_write_json(root / RUN_FILE, run_info)  # commit point
        return cls(root)

    def change_recipe(self, recipe: dict, *, changes: dict[str, list], affecting: list[str]) -> None:
        """Replace the stored recipe (the user changed settings on resume): recipe.yaml, then
        run.json's recipe_hash (the commit point), then a ``recipe_changed`` event with
        ``changes`` (dotted field -> [old, new]) and ``affecting`` (those that change a result).
        The caller holds the lock; stages see the change through their recipe hashes."""
        norm = _normalize_recipe(recipe)
        atomic_write_text(self.root / RECIPE_FILE, yaml.safe_dump(norm, sort_keys=False, allow_unicode=True))
        atomic_write_json(self.root / RUN_FILE, self.run_info() | {"recipe_hash": hash_obj(norm)})
        self.log_event("recipe_changed", changes=changes, affecting=affecting)

    @classmethod
    def open(cls, root) -> "RunStore":
        root = Path(root)
        if not root.exists():
            raise StoreError(f"{root} does not exist", path=root)
        if not root.is_dir():
            raise StoreError(f"{root} is not a directory", path=root)
        if not (root / RUN_FILE).is_file():
            raise StoreError(f"{root} is not a selfalign run (no {RUN_FILE})", path=root)
        return cls(root)

    def recipe(self) -> dict:
        path = self.root / RECIPE_FILE
        try:
            with open(path, "r", encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except OSError as e:
            raise store_error("read", path, e) from e
        except yaml.YAMLError as e:
            raise StoreError(f"cannot read {path}: invalid YAML ({e})", path=path) from e
        except UnicodeDecodeError as e:
            raise StoreError(f"cannot read {path}: not UTF-8 text ({e.reason} at byte {e.start})", path=path) from e
        if data is not None and not isinstance(data, dict):
            raise StoreError(f"cannot read {path}: not a YAML mapping (damaged run directory)", path=path)
        return data or {}

    def recipe_hash(self) -> str:
        """hash_obj of the stored recipe (a convenience; callers may hash a subset instead)."""
        return hash_obj(self.recipe())

    def run_info(self) -> dict:
        info = read_json_file(self.root / RUN_FILE)
        if not isinstance(info, dict):
            raise StoreError(f"cannot read {self.root / RUN_FILE}: not a JSON object (damaged run directory)",
                             path=self.root / RUN_FILE)
        return info

    # ------------------------------------------------------------------ paths
    def iter_dir(self, t: int) -> Path:
        if not isinstance(t, int) or isinstance(t, bool) or t < 0:
            raise ValueError(f"invalid iteration {t!r}")
        return self.root / f"iter_{t}"

    def stage_dir(self, t: int, stage: str) -> Path:
        return self.iter_dir(t) / _check_stage_name(stage)

    def iterations(self) -> list[int]:
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            m = _ITER_RE.match(p.name)
            if m and p.is_dir():
                out.append(int(m.group(1)))
        return sorted(out)

    def _stages_on_disk(self, t: int) -> list[str]:
        d = self.iter_dir(t)
        if not d.is_dir():
            return []
        return [p.name for p in d.iterdir() if p.is_dir() and _STAGE_RE.match(p.name)]

    # ------------------------------------------------------------------ manifests
    def manifest(self, t: int, stage: str) -> dict | None:
        path = self.stage_dir(t, stage) / MANIFEST
        try:
            with open(path, "r", encoding="utf-8") as f:
                m = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None  # unreadable manifest == not complete (it is written atomically)
        return m if isinstance(m, dict) else None

    def output_hash(self, t: int, stage: str) -> str:
        m = self.manifest(t, stage)
        if m is None:
            raise StoreError(f"{self.stage_dir(t, stage)} is not complete (no {MANIFEST})",
                             path=self.stage_dir(t, stage))
        return m["output_hash"] if "output_hash" in m else hash_obj(m.get("outputs", {}))

    def _write_manifest(self, t: int, stage: str, *, outputs: dict[str, str], inputs: dict[str, str],
                        recipe_hash: str, rows: int | None, info: dict | None) -> str:
        out_hash = hash_obj(outputs)
        m = {
            "stage": stage,
            "iteration": t,
            "recipe_hash": recipe_hash,
            "inputs": dict(inputs),
            "code_version": CODE_VERSION,
            "created": now_iso(),
            "outputs": outputs,
            "output_hash": out_hash,
            "rows": rows,
            "info": info or {},
        }
        atomic_write_json(self.stage_dir(t, stage) / MANIFEST, m)
        return out_hash

    def _invalidate(self, t: int, stage: str) -> Callable[[], None] | None:
        """Set the manifest aside (the stage is no longer complete).

        Returns an ``undo`` that puts it back (used when the write that follows fails), or
        None if there was no manifest. The set-aside copy is a temp file, removed by the
        stage cleanup after the next commit.
        """
        path = self.stage_dir(t, stage) / MANIFEST
        aside = temp_name(path)
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise store_error("remove", path, e) from e
        fsync_dir(path.parent)

        def undo() -> None:
            with contextlib.suppress(OSError):
                os.rename(aside, path)
                fsync_dir(path.parent)

        return undo

    def check_stage(self, t: int, stage: str, *, inputs: dict[str, str], recipe_hash: str) -> tuple[bool, str]:
        """(True, "") if the stage is complete and was produced from these inputs + recipe.

        Otherwise (False, reason) with a human reason. ``code_version`` is deliberately not
        compared: a patch release must not redo a week of generation.
        """
        d = self.stage_dir(t, stage)
        m = self.manifest(t, stage)
        if m is None:
            if (d / MANIFEST).exists():
                return False, f"manifest unreadable: {d / MANIFEST}"
            n = self._count_shards(t, stage)
            return False, (f"partial ({n} shards)" if n else "not started")
        if m.get("recipe_hash") != recipe_hash:
            return False, "recipe changed"
        old_inputs = m.get("inputs") or {}
        changed = sorted(k for k in set(old_inputs) | set(inputs) if old_inputs.get(k) != inputs.get(k))
        if changed:
            return False, "inputs changed: " + ", ".join(changed)
        for rel, digest in (m.get("outputs") or {}).items():
            p = d / rel
            if not p.is_file():
                return False, f"output missing: {rel}"
            try:
                actual = sha256_file(p)
            except OSError as e:
                return False, f"output unreadable: {rel} ({os_reason(e)})"
            if actual != digest:
                return False, f"output corrupted: {rel} (sha256 mismatch)"
        return True, ""

    # ------------------------------------------------------------------ cleanup
    def cleanup_stage(self, d: Path, *, keep: Iterable[str] = ()) -> None:
        """Remove shards/, scratch dirs and leftover temp files/dirs of a committed stage."""
        keep = set(keep)
        if not d.is_dir():
            return
        for p in d.iterdir():
            if p.name in keep:
                continue
            if p.name == SHARDS_DIR or is_temp(p.name) or (p.is_dir() and (p / SCRATCH_MARKER).exists()):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    unlink_quiet(p)
        fsync_dir(d)

    # ------------------------------------------------------------------ tables
    def write_rows(self, t: int, stage: str, rows: list[dict], *, inputs: dict[str, str], recipe_hash: str,
                   info: dict | None = None, schema: pa.Schema | None = None) -> str:
        """Write the complete table of a stage; returns its output hash (for downstream ``inputs``)."""
        d = self.stage_dir(t, stage)
        make_dir(d)
        data = d / DATA_FILE
        # The old manifest is removed only once the new data is fully on disk (before_replace),
        # so a failed write leaves the previous complete result valid.
        write_parquet(data, rows, schema, before_replace=lambda: self._invalidate(t, stage))
        try:
            digest = sha256_file(data)
        except OSError as e:
            raise store_error("read", data, e) from e
        out = self._write_manifest(t, stage, outputs={DATA_FILE: digest}, inputs=inputs,
                                   recipe_hash=recipe_hash, rows=len(rows), info=info)
        self.cleanup_stage(d)
        return out

    def read_rows(self, t: int, stage: str) -> list[dict]:
        d = self.stage_dir(t, stage)
        m = self.manifest(t, stage)
        if m is None or DATA_FILE not in (m.get("outputs") or {}):
            raise StoreError(f"{d} is not complete (no {MANIFEST} with {DATA_FILE})", path=d)
        path = d / DATA_FILE
        try:
            return read_parquet(path)
        except (OSError, pa.ArrowException) as e:
            raise StoreError(f"cannot read {path}: {e}", path=path) from e

    # ------------------------------------------------------------------ shards

    def read_table(self, t: int, stage: str) -> pa.Table:
        """A complete stage's table as Arrow (no Python rows: the review app pages through
        40,000-row judge tables without converting them)."""
        d = self.stage_dir(t, stage)
        manifest = self.manifest(t, stage)
        if manifest is None or DATA_FILE not in (manifest.get("outputs") or {}):
            raise StoreError(f"{d} is not complete (no manifest with {DATA_FILE})", path=d)
        try:
            return pq.read_table(d / DATA_FILE)
        except (OSError, pa.ArrowException) as e:
            raise StoreError(f"cannot read {d / DATA_FILE}: {e}", path=d / DATA_FILE) from e
    def _shard_dir(self, t: int, stage: str, key: str) -> Path:
        if not key or not re.match(r"^[0-9A-Za-z_-]+$", key):
            raise ValueError(f"invalid shard key {key!r}")
        return self.stage_dir(t, stage) / SHARDS_DIR / key[:16]

    def write_shard(self, t: int, stage: str, index: int, rows: list[dict], *, key: str,
                    fingerprint: str = "", schema: pa.Schema | None = None) -> None:
        """Persist shard ``index``; ``fingerprint`` (hex, of the items it was computed from) is
        part of its name, so :meth:`drop_stale_shards` can tell it from a shard of other items."""
        if not isinstance(index, int) or index < 0:
            raise ValueError(f"invalid shard index {index!r}")
        if fingerprint and not re.match(r"^[0-9a-f]+$", fingerprint):
            raise ValueError(f"invalid shard fingerprint {fingerprint!r}")
        name = f"shard_{index:05d}-{fingerprint[:16]}.parquet" if fingerprint else f"shard_{index:05d}.parquet"
        write_parquet(self._shard_dir(t, stage, key) / name, rows, schema)

    def read_shards(self, t: int, stage: str, *, key: str) -> dict[int, list[dict]]:
        """Complete, readable shards for ``key`` by index; a corrupt one is deleted and ignored."""
        d = self._shard_dir(t, stage, key)
        out: dict[int, list[dict]] = {}
        if not d.is_dir():
            return out
        for p in sorted(d.iterdir()):
            m = _SHARD_RE.match(p.name)
            if not m:
                if is_temp(p.name):  # a shard whose writer was killed
                    unlink_quiet(p)
                continue
            try:
                out[int(m.group(1))] = read_parquet(p)
            except (OSError, pa.ArrowException):
                unlink_quiet(p)
        return out

    def drop_stale_shards(self, t: int, stage: str, *, key: str, fingerprints: dict[int, str]) -> int:
        """Delete every shard of the stage that the plan ``key`` + ``fingerprints`` (index ->
        fingerprint of the items it will hold) would not reuse: shards under another key (other
        inputs, recipe or shard size), beyond the plan, unfingerprinted, or of other items.
        Returns how many shard files were deleted."""
        keep_dir = self._shard_dir(t, stage, key)
        removed = 0
        for p in self._shard_files(t, stage):
            m = _SHARD_RE.match(p.name)
            index, fp = int(m.group(1)), m.group(2)
            expected = fingerprints.get(index)
            if p.parent == keep_dir and fp and expected is not None and expected.startswith(fp):
                continue
            unlink_quiet(p)
            removed += 1
        base = self.stage_dir(t, stage) / SHARDS_DIR
        if base.is_dir():  # key dirs left empty (and their torn temp files) go too
            for kd in base.iterdir():
                if kd.is_dir() and kd != keep_dir and not any(_SHARD_RE.match(q.name) for q in kd.iterdir()):
                    shutil.rmtree(kd, ignore_errors=True)
        return removed

    def _shard_files(self, t: int, stage: str) -> list[Path]:
        base = self.stage_dir(t, stage) / SHARDS_DIR
        if not base.is_dir():
            return []
        return [p for kd in base.iterdir() if kd.is_dir() for p in kd.iterdir() if _SHARD_RE.match(p.name)]

    def _count_shards(self, t: int, stage: str) -> int:
        return len(self._shard_files(t, stage))

    # ------------------------------------------------------------------ directories
    def scratch_dir(self, t: int, stage: str, name: str = "checkpoints") -> Path:
        """A directory for partial work (TRL checkpoints ...); removed by commit_dir/write_rows."""
        if not _STAGE_RE.match(name) or name in (SHARDS_DIR, MANIFEST, DATA_FILE):
            raise ValueError(f"invalid scratch dir name {name!r}")
        p = self.stage_dir(t, stage) / name
        make_dir(p)
        marker = p / SCRATCH_MARKER
        if not marker.exists():
            try:
                marker.touch()
            except OSError as e:
                raise store_error("write", marker, e) from e
        return p

    def commit_dir(self, t: int, stage: str, build: Callable[[Path], Any], *, inputs: dict[str, str],
                   recipe_hash: str, info: dict | None = None, subdir: str = "adapter") -> str:
        """Build a directory output atomically; returns the output hash.

        ``build(tmp)`` fills a temp dir inside the stage dir. Every file is fsynced, the temp
        dir is renamed to ``stage_dir/subdir`` (an old one, complete or not, is moved aside and
        deleted), then the manifest with the sha256 of every file is written last.
        """
        if not _STAGE_RE.match(subdir) or subdir in (SHARDS_DIR, MANIFEST, DATA_FILE):
            raise ValueError(f"invalid subdir {subdir!r}")
        d = self.stage_dir(t, stage)
        make_dir(d)
        # Temp dirs left by a crashed earlier attempt.
        for p in d.iterdir():
            if is_temp(p.name) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
        target = d / subdir
        tmp = temp_name(target)
        try:
            tmp.mkdir()
            build(tmp)
            outputs: dict[str, str] = {}
            for dirpath, dirnames, filenames in os.walk(tmp):
                dirnames.sort()
                for fn in sorted(filenames):
                    fp = Path(dirpath) / fn
                    with open(fp, "rb") as f:
                        os.fsync(f.fileno())
                    rel = fp.relative_to(tmp).as_posix()
                    outputs[f"{subdir}/{rel}"] = sha256_file(fp)
                fsync_dir(dirpath)
            if not outputs:
                raise StoreError(f"building {target} produced no files", path=target)
            undo = self._invalidate(t, stage)
            old: Path | None = None
            if target.exists() or target.is_symlink():
                old = temp_name(d / f"old-{subdir}")
                os.rename(target, old)
            try:
                os.rename(tmp, target)
            except OSError:
                if old is not None:  # put the previous output (and its manifest) back
                    with contextlib.suppress(OSError):
                        os.rename(old, target)
                if undo is not None:
                    undo()
                raise
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            fsync_dir(d)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise store_error("write", target, e) from e
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        out = self._write_manifest(t, stage, outputs=outputs, inputs=inputs, recipe_hash=recipe_hash,
                                   rows=None, info=info)
        self.cleanup_stage(d, keep=[subdir])
        return out

    def output_path(self, t: int, stage: str, subdir: str = "adapter") -> Path:
        """Path of a committed directory output (StoreError if the stage is not complete)."""
        d = self.stage_dir(t, stage)
        if self.manifest(t, stage) is None:
            raise StoreError(f"{d} is not complete (no {MANIFEST})", path=d)
        return d / subdir

    # ------------------------------------------------------------------ iteration-level json
    def _iter_file(self, t: int, name: str) -> Path:
        if "/" in name or name.startswith(".") or not name:
            raise ValueError(f"invalid file name {name!r}")
        if not name.endswith(".json"):
            name += ".json"
        return self.iter_dir(t) / name

    def write_json(self, t: int, name: str, obj: Any) -> None:
        """Atomically write ``iter_<t>/<name>`` (``.json`` appended if missing)."""
        atomic_write_json(self._iter_file(t, name), obj)

    def read_json(self, t: int, name: str) -> dict | None:
        path = self._iter_file(t, name)
        if not path.exists():
            return None
        return read_json_file(path)

    # ------------------------------------------------------------------ events
    def log_event(self, event: str, *, t: int | None = None, stage: str | None = None, **info) -> None:
        """Append one JSON line to events.jsonl (O_APPEND, fsync)."""
        rec = {"time": now_iso(), "event": event, "iteration": t, "stage": stage, "pid": os.getpid(), **info}
        self.append_jsonl(EVENTS_FILE, rec)

    def events(self) -> list[dict]:
        """All events; malformed lines (e.g. a truncated last line) are skipped."""
        return self.read_jsonl(EVENTS_FILE)

    def append_jsonl(self, name: str, record: dict) -> None:
        """Append one JSON line to the run-level file ``name`` (O_APPEND + fsync: a line is
        either fully there or, after a kill mid-write, a torn tail that readers skip)."""
        if not _STAGE_RE.match(name):
            raise ValueError(f"invalid run file name {name!r}")
        line = json.dumps(record, default=str, ensure_ascii=False) + "\n"
        path = self.root / name
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise store_error("write", path, e) from e
        try:
            size = os.fstat(fd).st_size
            # A previous writer killed mid-line: start on a fresh line so ours stays parseable.
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = "\n" + line
            os.write(fd, line.encode("utf-8"))
            os.fsync(fd)
        except OSError as e:
            raise store_error("write", path, e) from e
        finally:
            os.close(fd)

    def read_jsonl(self, name: str) -> list[dict]:
        """The JSON objects of run-level file ``name`` ([] if absent); malformed lines skipped."""
        path = self.root / name
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as e:
            raise store_error("read", path, e) from e
        out = []
        for raw in data.split(b"\n"):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out

    def last_error(self) -> dict | None:
        for e in reversed(self.events()):
            if e.get("event") == "error":
                return e
        return None

    # ------------------------------------------------------------------ status
    def status(self, stages: list[str] | None = None) -> list[dict]:
        """One row per (iteration, stage).

        ``{iteration, stage, state: "done"|"partial"|"damaged"|"not started", detail, rows, error}``
        ("damaged": a manifest.json that cannot be read).
        Stages are listed in the order given by ``stages`` (missing ones as "not started"),
        then the other stages found on disk in the order they were first seen in events
        (i.e. started), then by manifest creation time / name. ``error`` is the message of
        the stage's last error event unless a later done/skip event superseded it.
        ``done`` means a manifest exists; use :meth:`check_stage` to verify outputs.
        """
        events = self.events()
        first_seen: dict[tuple[int, str], int] = {}
        last_error: dict[tuple[int, str], dict | None] = {}
        for i, e in enumerate(events):
            it, st = e.get("iteration"), e.get("stage")
            if not isinstance(it, int) or not isinstance(st, str):
                continue
            k = (it, st)
            first_seen.setdefault(k, i)
            if e.get("event") == "error":
                last_error[k] = e
            elif e.get("event") in ("done", "skip", "start"):
                if e.get("event") != "start":
                    last_error[k] = None
        iters = set(self.iterations()) | {k[0] for k in first_seen}
        rows = []
        for t in sorted(iters):
            found = set(self._stages_on_disk(t)) | {s for (it, s) in first_seen if it == t}
            ordered = list(stages or [])
            rest = [s for s in found if s not in ordered]

            def sort_key(s: str):
                m = self.manifest(t, s)
                return (first_seen.get((t, s), len(events) + 1), (m or {}).get("created", "~"), s)

            ordered += sorted(rest, key=sort_key)
            for s in ordered:
                rows.append(self._stage_status(t, s, last_error.get((t, s))))
        return rows

    def _stage_status(self, t: int, stage: str, err: dict | None) -> dict:
        row = {"iteration": t, "stage": stage, "state": "not started", "detail": "", "rows": None,
               "error": None}
        if err:
            row["error"] = err.get("message") or err.get("error") or canonical_json(err)
        m = self.manifest(t, stage)
        if m is not None:
            row.update(state="done", rows=m.get("rows"))
            row["error"] = None
            return row
        if (self.stage_dir(t, stage) / MANIFEST).exists():  # not "not started": later stages may be done
            row.update(state="damaged", detail=f"{MANIFEST} unreadable; a resume redoes the stage")
            return row
        shards = self._shard_files(t, stage)
        if shards:
            n_rows = 0
            for p in shards:
                try:
                    n_rows += pq.read_metadata(p).num_rows
                except (OSError, pa.ArrowException):
                    pass
            row.update(state="partial", detail=f"{len(shards)} shards", rows=n_rows)
            return row
        d = self.stage_dir(t, stage)
        if d.is_dir():
            scratch = [p.name for p in d.iterdir()
                       if p.is_dir() and (p / SCRATCH_MARKER).exists() and len(list(p.iterdir())) > 1]
            if scratch:
                row.update(state="partial", detail=", ".join(sorted(scratch)))
        return row

    def lock(self) -> RunLock:
        return RunLock(self.root)


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()
