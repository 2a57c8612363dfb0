"""Prefect flow ``self-rewarding``: the stage list of ``alignment.self_rewarding`` as tasks
(``flows.stage_flow``), with a summary, a review link and the judge table per iteration."""

from __future__ import annotations

from prefect import flow

from alignment.report import last_eval_line
from flows.common import publish_iteration
from flows.stage_flow import Presentation, run_stages


def publish(run, t: int, per_iteration: list[dict]) -> None:
    publish_iteration(run.store, t, per_iteration[-1], review_base=run.recipe.review.url)


def result(run, per_iteration: list[dict]) -> dict:
    out = {"run_dir": str(run.store.root), "adapter": run.adapter(run.recipe.iterations)}
    evaluated = last_eval_line(per_iteration)
    if evaluated:  # the CLI prints the result's entries as its final lines
        out["eval"] = evaluated
    return out


SHOW = Presentation(result=result, iteration=publish)


@flow(name="self-rewarding", log_prints=True)
def self_rewarding_flow(run_dir: str, recipe_path: str | None = None, overrides: list[str] | None = None) -> dict:
    """Self-Rewarding (Yuan et al., 2024): for t = 1..T, M_t writes, judges and trains M_{t+1}.

    ``recipe_path=None`` resumes the run with the recipe stored in ``run_dir``.
    """
    return run_stages(run_dir, recipe_path, overrides, SHOW)
