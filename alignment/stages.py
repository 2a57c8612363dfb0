"""Running a stage against the run directory: skip when complete, redo when stale, shard long work.

These helpers are what makes every flow resumable by construction: a stage either finds a
manifest matching its inputs and recipe section (skip), or computes its output and commits it
through ``store.py``. Long stages go through ``run_sharded`` so a kill loses at most one shard.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

from alignment.faults import crash_point
from alignment.store import RunStore, hash_obj

Log = Callable[[str], None]
Progress = Callable[[int, int], None]


def stage_outcome(store: RunStore, t: int, stage: str, inputs: dict, recipe_hash: str, log: Log) -> str | None:
    """The output hash if the stage is complete and current; else None (and say why it reruns)."""
    ok, reason = store.check_stage(t, stage, inputs=inputs, recipe_hash=recipe_hash)
    if ok:
        log(f"iter {t} {stage}: complete, skipped")
        store.log_event("skip", t=t, stage=stage)
        return store.output_hash(t, stage)
    if reason != "not started" and not reason.startswith("partial"):
        log(f"iter {t} {stage}: redoing ({reason})")
    elif reason.startswith("partial"):
        log(f"iter {t} {stage}: resuming ({reason})")
    return None


def run_table_stage(
    store: RunStore,
    t: int,
    stage: str,
    *,
    inputs: dict,
    recipe_hash: str,
    compute: Callable[[], tuple[list[dict], dict]],
    log: Log = print,
) -> str:
    """Skip if complete, else ``compute() -> (rows, info)`` and commit the table."""
    done = stage_outcome(store, t, stage, inputs, recipe_hash, log)
    if done is not None:
        return done
    store.log_event("start", t=t, stage=stage)
    started = time.monotonic()
    try:
        rows, info = compute()
        crash_point(f"iter{t}/{stage}/before_commit")
        out = store.write_rows(t, stage, rows, inputs=inputs, recipe_hash=recipe_hash,
                               info=info | {"seconds": round(time.monotonic() - started, 2)})
    except BaseException as err:
        store.log_event("error", t=t, stage=stage, message=f"{type(err).__name__}: {err}")
        raise
    store.log_event("done", t=t, stage=stage, rows=len(rows))
    crash_point(f"iter{t}/{stage}/after_commit")
    return out


def run_sharded(
    store: RunStore,
    t: int,
    stage: str,
    items: Sequence[dict],
    *,
    shard_size: int,
    key: str,
    compute: Callable[[Sequence[dict], int], list[dict]],
    log: Log = print,
    progress: Progress | None = None,
) -> list[dict]:
    """Apply ``compute(chunk, shard_index)`` to consecutive chunks, persisting each as a shard.

    Shards already on disk under the same ``key`` are reused, so after a kill the work
    continues at the first missing shard. The result is the concatenation in item order,
    identical to an uninterrupted run's when ``compute`` is deterministic per shard.
    """
    chunks = [items[i : i + shard_size] for i in range(0, len(items), shard_size)]
    done = store.read_shards(t, stage, key=key)
    if done:
        log(f"iter {t} {stage}: {len(done)}/{len(chunks)} shards already done")
    rows: list[dict] = []
    for index, chunk in enumerate(chunks):
        if index not in done:
            started = time.monotonic()
            done[index] = compute(chunk, index)
            store.write_shard(t, stage, index, done[index], key=key)
            log(f"iter {t} {stage}: shard {index + 1}/{len(chunks)} ({len(chunk)} items, {time.monotonic() - started:.1f}s)")
            crash_point(f"iter{t}/{stage}/shard{index}")
        rows.extend(done[index])
        if progress:
            progress(index + 1, len(chunks))
    return rows


def shard_key(*parts: object) -> str:
    return hash_obj(parts)
