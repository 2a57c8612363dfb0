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
        # A kill between the manifest (commit) and the cleanup after it leaves shards/,
        # checkpoints or temp files behind; the stage is complete, so they go now.
        store.cleanup_stage(store.stage_dir(t, stage))
        return store.output_hash(t, stage)
    if reason != "not started" and not reason.startswith("partial"):
        # Corrupted/missing output, or changed inputs: say so, in the log and in events.jsonl.
        log(f"iter {t} {stage}: redoing ({reason})")
        store.log_event("redo", t=t, stage=stage, reason=reason)
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
        store.log_event("error", t=t, stage=stage, message=error_message(err))
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

    Shards already on disk for the same plan are reused, so after a kill the work continues at
    the first missing shard. A shard's identity is ``shard_key(key, shard_size)`` (its layout)
    plus ``hash_obj(chunk)`` (its items): a resume with another shard size, other items or
    another ``key`` redoes those shards and deletes the stale ones (log line + ``stale_shards``
    event) rather than mixing two layouts. The result is the concatenation in item order,
    identical to an uninterrupted run's when ``compute`` is deterministic per shard.
    """
    chunks = [items[i : i + shard_size] for i in range(0, len(items), shard_size)]
    layout = shard_key(key, shard_size)
    fingerprints = {i: hash_obj(list(chunk)) for i, chunk in enumerate(chunks)}
    stale = store.drop_stale_shards(t, stage, key=layout, fingerprints=fingerprints)
    if stale:
        log(f"iter {t} {stage}: {stale} shards of another layout, inputs or recipe removed (redoing them)")
        store.log_event("stale_shards", t=t, stage=stage, removed=stale)
    done = store.read_shards(t, stage, key=layout)
    # The plan, for `selfalign status` ("partial, 2/5 shards").
    store.log_event("shards", t=t, stage=stage, total=len(chunks), done=len(done))
    if done:
        log(f"iter {t} {stage}: {len(done)}/{len(chunks)} shards already done")
    rows: list[dict] = []
    for index, chunk in enumerate(chunks):
        if index not in done:
            started = time.monotonic()
            done[index] = compute(chunk, index)
            seconds = time.monotonic() - started
            store.write_shard(t, stage, index, done[index], key=layout, fingerprint=fingerprints[index])
            store.log_event("shard_done", t=t, stage=stage, index=index, items=len(chunk), seconds=round(seconds, 3))
            log(f"iter {t} {stage}: shard {index + 1}/{len(chunks)} ({len(chunk)} items, {seconds:.1f}s)")
            crash_point(f"iter{t}/{stage}/shard{index}")
        rows.extend(done[index])
        if progress:
            progress(index + 1, len(chunks))
    return rows


def shard_key(*parts: object) -> str:
    return hash_obj(parts)


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill PID``, a scheduler's preemption or timeout) turned into a clean stop.

    A KeyboardInterrupt so that everything that already stops cleanly on Ctrl-C (stage error
    events, lock release, killing a trainer subprocess) does the same here."""


def error_message(err: BaseException) -> str:
    """One line for events.jsonl / `selfalign status`."""
    # Inside a flow run Prefect's own SIGTERM handler raises its TerminationSignal first (matched
    # by name: alignment/ does not import Prefect); the CLI's handler then raises Terminated.
    if isinstance(err, Terminated) or type(err).__name__ == "TerminationSignal":
        return "terminated (SIGTERM)"
    if isinstance(err, KeyboardInterrupt):
        return "interrupted (Ctrl-C / SIGINT)"
    return f"{type(err).__name__}: {err}"


# --------------------------------------------------------------------------- status helpers
# `selfalign status` on a killed run: SIGKILL leaves no error event, so a stage whose last
# event is "start" while no live process holds the lock was interrupted mid-way.

_TERMINAL = ("done", "skip", "error")


def lock_state(store: RunStore) -> dict | None:
    """The lock file's holder plus ``live`` and ``pid_alive`` (see :meth:`RunLock.inspect`)."""
    return store.lock().inspect()


def interrupted_stages(store: RunStore, events: list[dict] | None = None) -> dict[tuple[int, str], dict]:
    """(iteration, stage) -> the "start" event of stages that started and never finished or failed."""
    events = store.events() if events is None else events
    last: dict[tuple[int, str], dict] = {}
    for e in events:
        key = (e.get("iteration"), e.get("stage"))
        if isinstance(key[0], int) and isinstance(key[1], str) and e.get("event") in ("start",) + _TERMINAL:
            last[key] = e
    return {k: e for k, e in last.items() if e.get("event") == "start"}


def shard_totals(store: RunStore, events: list[dict] | None = None) -> dict[tuple[int, str], int]:
    """(iteration, stage) -> the number of shards the stage was planned in (latest plan)."""
    events = store.events() if events is None else events
    return {(e.get("iteration"), e.get("stage")): e.get("total") for e in events
            if e.get("event") == "shards" and isinstance(e.get("total"), int)}
