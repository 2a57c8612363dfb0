"""Prefect flow ``self-rewarding``: iterations → stages, each stage a task over the run directory.

Tasks are three-line wrappers of ``SelfRewardingRun`` methods; they pass paths and hashes, not
datasets. Caching is off (``NO_CACHE``): the run directory's manifests are the record of what is
done, so a resume works with a fresh Prefect database too.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from alignment.report import last_eval_line
from alignment.self_rewarding import SelfRewardingRun
from flows.common import open_run, progress_factory, publish_iteration
from flows.review_gate import before_training

TASK = dict(cache_policy=NO_CACHE, retries=0)


@task(name="prompts", **TASK)
def prompts_task(run: SelfRewardingRun, t: int) -> str:
    return run.prompts(t)


@task(name="generate", **TASK)
def generate_task(run: SelfRewardingRun, t: int) -> str:
    return run.generate(t)


@task(name="judge", **TASK)
def judge_task(run: SelfRewardingRun, t: int) -> str:
    return run.judge(t)


@task(name="pairs", **TASK)
def pairs_task(run: SelfRewardingRun, t: int) -> dict:
    return run.pairs(t)


@task(name="train", **TASK)
def train_task(run: SelfRewardingRun, t: int) -> str | None:
    return run.train(t)


@task(name="eval", **TASK)
def eval_task(run: SelfRewardingRun, t: int) -> dict | None:
    return run.eval(t)


@flow(name="self-rewarding", log_prints=True)
def self_rewarding_flow(run_dir: str, recipe_path: str | None = None, overrides: list[str] | None = None) -> dict:
    """Self-Rewarding (Yuan et al., 2024): for t = 1..T, M_t writes, judges and trains M_{t+1}.

    ``recipe_path=None`` resumes the run with the recipe stored in ``run_dir``.
    """
    logger = get_run_logger()
    store, recipe = open_run(run_dir, recipe_path, overrides or [])
    per_iteration: list[dict] = []
    with store.lock():
        run = SelfRewardingRun(store, recipe, log=logger.info, progress=progress_factory(store))
        try:
            for t in range(1, recipe.iterations + 1):
                prompts_task(run, t)
                generate_task(run, t)
                judge_task(run, t)
                pairs_task(run, t)
                before_training(run, store, recipe, t, logger)  # release the engine (if asked), then the review gate
                train_task(run, t)
                eval_task(run, t)  # M_{t+1} vs M_t on held-out prompts (one log line when eval is off)
                per_iteration.append(run.metrics(t))
                publish_iteration(store, t, per_iteration[-1], review_base=recipe.review.url)
        finally:
            run.close()
    store.log_event("flow_done")
    result = {"run_dir": str(store.root), "adapter": run.adapter(recipe.iterations)}
    evaluated = last_eval_line(per_iteration)
    if evaluated:  # the CLI prints the result's entries as its final lines
        result["eval"] = evaluated
    return result
