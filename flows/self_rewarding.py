"""Prefect flow ``self-rewarding``: the stage list of ``alignment.self_rewarding`` as tasks
(``flows.stage_flow``), with a summary, a review link and the judge table per iteration."""

from __future__ import annotations

from alignment.report import last_eval_line
from flows.common import publish_iteration
from flows.stage_flow import Presentation, algorithm_flow


def publish(run, t: int, per_iteration: list[dict]) -> None:
    publish_iteration(run.store, t, per_iteration[-1], review_base=run.recipe.review.url)


def result(run, per_iteration: list[dict]) -> dict:
    out = {"run_dir": str(run.store.root), "adapter": run.adapter(run.recipe.iterations)}
    evaluated = last_eval_line(per_iteration)
    if evaluated:  # the CLI prints the result's entries as its final lines
        out["eval"] = evaluated
    return out


self_rewarding_flow = algorithm_flow(
    "self-rewarding", "Self-Rewarding (Yuan et al., 2024): for t = 1..T, M_t writes, judges and trains M_{t+1}.",
    Presentation(result=result, iteration=publish))
