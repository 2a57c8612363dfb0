"""Stages, declared once, and the one executor that runs every stage of every algorithm.

A :class:`Stage` states what it reads (upstream stages of its iteration, the model M_t, other
inputs), which recipe fields change its result, and whether it is sharded. :func:`execute`
derives the stage's inputs and recipe hash from that declaration, then skips it (complete and
current), redoes it (saying why), or computes it — shards persisted through ``run_sharded``,
output committed through ``store.py`` (temp write, fsync, rename, manifest last) — with the
events and crash points every stage has. So no stage can forget an input, a hash or a shard key.
An algorithm (:class:`Algorithm`) is a list of stages per iteration; the order exists there only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from alignment.config import result_dump
from alignment.faults import crash_point
from alignment.files import StoreError, hash_obj
from alignment.store import RunStore

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


# --------------------------------------------------------------------------- declarations
@dataclass(frozen=True)
class Table:
    """A table stage's output: rows (one parquet file) and the manifest's ``info``."""

    rows: list[dict]
    info: dict


@dataclass(frozen=True)
class Directory:
    """A directory stage's output (an adapter): ``build(tmp)`` fills a temporary directory that is
    committed as ``stage_dir/subdir``; ``info`` (which ``build`` may extend) goes in the manifest."""

    build: Callable[[Path], None]
    info: dict
    subdir: str = "adapter"


def _never(recipe) -> bool:
    return False


def _on(recipe) -> str | None:
    return None


@dataclass(frozen=True)
class Stage:
    """One stage of an algorithm, declared once.

    ``compute(run, t, ctx)`` returns a :class:`Table` or a :class:`Directory`; it reads upstream
    outputs from ``run.store`` and shards long work through ``ctx.shards``. Its inputs are
    ``{upstream: output hash for upstream in reads}`` + ``{"model": identity of M_t}`` when
    ``model`` + ``inputs(run, t)``; its recipe hash covers the values of ``fields`` (dotted recipe
    paths, NO_EFFECT fields left out), ``settings(run, t)`` (per-iteration values such as ρ_t or
    β_t), the backend and the seed. ``off(recipe)`` names why the stage does not run for this
    recipe (None: it runs); ``report(run, t, info)`` logs its summary, also when it was skipped;
    ``releases_engine(recipe)``: close the generation engine first (training needs the memory);
    ``gated``: the review gate (a flow's) applies before it.
    """

    name: str
    compute: Callable[[Any, int, "StageContext"], Table | Directory]
    reads: tuple[str, ...] = ()
    model: bool = False
    fields: tuple[str, ...] = ()
    inputs: Callable[[Any, int], dict] | None = None
    settings: Callable[[Any, int], dict] | None = None
    sharded: bool = False
    off: Callable[[Any], str | None] = _on
    report: Callable[[Any, int, dict], None] | None = None
    releases_engine: Callable[[Any], bool] = _never
    gated: bool = False


@dataclass(frozen=True)
class Algorithm:
    """An algorithm: its stages per iteration, in order, and what its run needs around them.

    ``metrics(run, t)`` writes ``iter_<t>/metrics.json`` after the iteration; ``needs_lora(run)``:
    whether the engine must serve adapters; ``lora_rank(recipe)``: the rank of the adapters it trains.
    """

    name: str
    stages: tuple[Stage, ...]
    metrics: Callable[[Any, int], dict]
    needs_lora: Callable[[Any], bool]
    lora_rank: Callable[[Any], int]

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"{self.name} has no stage {name!r} (stages: {', '.join(self.names())})")

    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def active(self, recipe) -> list[Stage]:
        """The stages this recipe runs (those not ``off``), in order."""
        return [s for s in self.stages if s.off(recipe) is None]


def replace_stage(stages: Sequence[Stage], new: Stage) -> tuple[Stage, ...]:
    """``stages`` with the stage of ``new.name`` replaced by ``new``."""
    if new.name not in [s.name for s in stages]:
        raise KeyError(new.name)
    return tuple(new if s.name == new.name else s for s in stages)


def insert_after(stages: Sequence[Stage], name: str, new: Sequence[Stage]) -> tuple[Stage, ...]:
    """``stages`` with ``new`` inserted right after the stage called ``name``."""
    names = [s.name for s in stages]
    i = names.index(name) + 1
    return tuple(stages[:i]) + tuple(new) + tuple(stages[i:])


def _dotted(data: dict, path: str):
    for part in path.split("."):
        if not isinstance(data, dict) or part not in data:
            raise KeyError(f"recipe has no field {path!r}")
        data = data[part]
    return data


def stage_inputs(run, stage: Stage, t: int) -> dict:
    """The stage's inputs by its declaration (StoreError if an upstream stage is not complete)."""
    out = {name: run.store.output_hash(t, name) for name in stage.reads}
    if stage.model:
        out["model"] = run.model_hash(t)
    return out | (stage.inputs(run, t) if stage.inputs else {})


def stage_recipe_hash(run, stage: Stage, t: int) -> str:
    """hash({field: value for field in fields} | settings(run, t) | {backend, seed}), the recipe
    read without the fields declared NO_EFFECT (``alignment.config.result_dump``)."""
    data = result_dump(run.recipe)
    values = {f: _dotted(data, f) for f in stage.fields} | (stage.settings(run, t) if stage.settings else {})
    return hash_obj(values | {"backend": data["engine"]["backend"], "seed": data["seed"]})


@dataclass
class StageContext:
    """What ``compute`` gets from the executor: the stage's identity and its shard helper."""

    run: Any
    stage: Stage
    t: int
    inputs: dict
    recipe_hash: str
    started: float = field(default_factory=time.monotonic)

    def shards(self, items: Sequence[dict], compute: Callable[[Sequence[dict], int], list[dict]]) -> list[dict]:
        """``run_sharded`` over ``items`` in shards of ``engine.shard_size``, keyed by this stage's
        inputs and recipe hash (a resume under other inputs or settings never reuses a shard)."""
        if not self.stage.sharded:
            raise RuntimeError(f"stage {self.stage.name} is not declared sharded")
        run = self.run
        return run_sharded(run.store, self.t, self.stage.name, items, shard_size=run.recipe.engine.shard_size,
                           key=shard_key(self.inputs, self.recipe_hash), compute=compute, log=run.log,
                           progress=run.stage_progress(self.stage.name, self.t))

    def scratch(self, name: str = "checkpoints") -> Path:
        """A scratch directory of the stage kept across a kill (trainer checkpoints), removed on commit."""
        return self.run.store.scratch_dir(self.t, self.stage.name, name)

    @property
    def crash_prefix(self) -> str:
        return f"iter{self.t}/{self.stage.name}"


def execute(run, stage: Stage, t: int) -> dict | None:
    """Run ``stage`` of iteration ``t``: skip it if complete and current, else compute and commit.

    Returns the manifest's ``info`` (None for a stage that is ``off``). Events: ``skip`` or
    ``redo`` (with the reason), ``start``, ``done`` / ``error``; crash points
    ``iter<t>/<stage>/before_commit`` and ``after_commit``.
    """
    store, name = run.store, stage.name
    reason = stage.off(run.recipe)
    if reason is not None:
        run.log(f"iter {t} {name}: off ({reason}); skipped")
        return None
    release_engine(run, stage, t)
    inputs, recipe_hash = stage_inputs(run, stage, t), stage_recipe_hash(run, stage, t)
    if stage_outcome(store, t, name, inputs, recipe_hash, run.log) is None:
        ctx = StageContext(run, stage, t, inputs, recipe_hash)
        store.log_event("start", t=t, stage=name)
        try:
            out = stage.compute(run, t, ctx)
            if isinstance(out, Table):
                crash_point(f"iter{t}/{name}/before_commit")
                store.write_rows(t, name, out.rows, inputs=inputs, recipe_hash=recipe_hash,
                                 info=out.info | {"seconds": round(time.monotonic() - ctx.started, 2)})
            else:
                def build(tmp: Path) -> None:
                    out.build(tmp)
                    crash_point(f"iter{t}/{name}/before_commit")

                store.commit_dir(t, name, build, inputs=inputs, recipe_hash=recipe_hash, info=out.info,
                                 subdir=out.subdir)
        except BaseException as err:
            store.log_event("error", t=t, stage=name, message=error_message(err))
            raise
        store.log_event("done", t=t, stage=name, **({"rows": len(out.rows)} if isinstance(out, Table) else {}))
        crash_point(f"iter{t}/{name}/after_commit")
    info = store.manifest(t, name)["info"]
    if stage.report:
        stage.report(run, t, info)
    return info


def release_engine(run, stage: Stage, t: int) -> None:
    """Close the generation engine before a stage that declares it needs the memory (a training
    job), recording an ``engine_released`` event; it restarts on the next use."""
    if stage.releases_engine(run.recipe) and run.close():
        run.store.log_event("engine_released", t=t, stage=stage.name)


def plan(run) -> list[dict]:
    """What running the run would do with each stage, without running anything.

    Rows ``{"iteration", "stage", "state", "reason"}``, state one of: ``done`` (kept), ``redo``
    (stored output stale or damaged, or made from an upstream output that will change: reason),
    ``resume`` (shards on disk), ``run`` (not started), ``off`` (this recipe does not run it).
    A stage is stale when it reads a stage of its iteration that will run, or a model M_t whose
    training (iteration t−1's ``train``) will run.
    """
    rows, pending = [], set()  # pending: (t, stage) that will run
    for t in run.iterations():
        for stage in run.algorithm.stages:
            row = {"iteration": t, "stage": stage.name}
            off = stage.off(run.recipe)
            if off is not None:
                rows.append(row | {"state": "off", "reason": off})
                continue
            state, reason = _planned(run, stage, t, pending)
            if state != "done":
                pending.add((t, stage.name))
            rows.append(row | {"state": state, "reason": reason})
    return rows


def _planned(run, stage: Stage, t: int, pending: set) -> tuple[str, str]:
    stored = run.store.manifest(t, stage.name) is not None
    after = [s for s in stage.reads if (t, s) in pending]
    missing = None
    run.models_read = []
    try:
        if stage.model:  # first, so that a missing upstream output does not hide which model it reads
            run.model_hash(t)
        inputs, recipe_hash = stage_inputs(run, stage, t), stage_recipe_hash(run, stage, t)
    except (StoreError, RuntimeError) as err:  # an upstream output or a model that does not exist yet
        missing = _missing(err)
    finally:
        models, run.models_read = run.models_read, None
    after += [f"M_{k} (iteration {k - 1} train)" for k in sorted(set(models)) if k > 1 and (k - 1, "train") in pending]
    if missing and not after:
        after = [missing]
    if after:
        return ("redo" if stored else "run"), "after " + ", ".join(dict.fromkeys(after))
    ok, reason = run.store.check_stage(t, stage.name, inputs=inputs, recipe_hash=recipe_hash)
    if ok:
        return "done", ""
    if reason == "not started":
        return "run", ""
    return ("resume" if reason.startswith("partial") else "redo"), reason


def _missing(err: Exception) -> str:
    """"iter_1/judge" for an upstream stage that is not complete; else the error's text."""
    text = str(err)
    if " is not complete" in text:
        where = Path(text.split(" is not complete")[0])
        return f"{where.parent.name}/{where.name}"
    return text


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
