"""The one Prefect flow builder: any algorithm's stage list becomes a flow, one task per stage.

For t = 1..T, each stage of the algorithm (``alignment.algorithms``) runs as a task named after
it; ``alignment.stages.execute`` inside it skips, redoes, shards and commits. Before a ``gated``
stage (training) the engine is released if the recipe asks and the review gate pauses the run if
the recipe has one. After each iteration the algorithm's metrics are written and its artifacts
published; the flow returns what the CLI prints. Tasks pass names and hashes, not datasets, and
caching is off (``NO_CACHE``): the run directory's manifests are the record of what is done, so a
resume works with a fresh Prefect database too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from alignment.algorithms import algorithm_run
from alignment.runs import open_run
from alignment.stages import release_engine
from flows.common import progress_factory
from flows.review_gate import gate_before


@task(cache_policy=NO_CACHE, retries=0)
def stage_task(run, name: str, t: int) -> dict | None:
    return run.run_stage(name, t)


@dataclass(frozen=True)
class Presentation:
    """What a flow shows besides the stages: ``iteration(run, t, metrics_so_far)`` publishes an
    iteration's artifacts, ``end(run, metrics_per_iteration)`` the run's, and
    ``result(run, metrics_per_iteration)`` is the dict the flow returns (the CLI prints it)."""

    result: Callable[[object, list[dict]], dict]
    iteration: Callable[[object, int, list[dict]], None] | None = None
    end: Callable[[object, list[dict]], None] | None = None


def run_stages(run_dir: str, recipe_path: str | None, overrides: list[str] | None, show: Presentation) -> dict:
    """The body of every algorithm's flow (each flow is a named ``@flow`` function in its own
    module calling this, so that a Prefect deployment finds it at a stable entrypoint)."""
    store, recipe = open_run(run_dir, recipe_path, overrides or [])
    with store.lock():
        result = run_algorithm(store, recipe, show)
    store.log_event("flow_done")
    return result


def run_algorithm(store, recipe, show: Presentation) -> dict:
    """Every iteration's stages of an opened, locked run, one task each; ``show``'s result."""
    logger = get_run_logger()
    per_iteration: list[dict] = []
    run = algorithm_run(store, recipe, log=logger.info, progress=progress_factory(store))
    try:
        for t in run.iterations():
            for stage in run.algorithm.stages:
                if stage.gated:  # the engine goes first: a review can wait for hours
                    release_engine(run, stage, t)
                    gate_before(run, stage.name, t, logger)
                stage_task.with_options(name=stage.name)(run, stage.name, t)
            per_iteration.append(run.metrics(t))
            if show.iteration:
                show.iteration(run, t, per_iteration)
        if show.end:
            show.end(run, per_iteration)
    finally:
        run.close()
    return show.result(run, per_iteration)
