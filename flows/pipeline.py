"""Prefect flow ``pipeline``: each step's stage list as tasks, step after step, in one flow run.

Step k runs in ``RUN/steps/<k>-<algorithm>/`` with its own artifacts (``flows.<algorithm>``);
step k+1 starts from the model step k ended with (``alignment.pipeline``).
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from alignment.pipeline import final_model, open_step
from alignment.runs import open_run
from flows.registry import presentation
from flows.stage_flow import run_algorithm


@flow(name="pipeline", log_prints=True)
def pipeline_flow(run_dir: str, recipe_path: str | None = None, overrides: list[str] | None = None) -> dict:
    """Algorithms chained on one run directory (e.g. SPIN, then Self-Rewarding, then Meta-Rewarding):
    each step starts from the model the step before it ended with.

    ``recipe_path=None`` resumes the run with the recipe stored in ``run_dir``.
    """
    logger = get_run_logger()
    store, recipe = open_run(run_dir, recipe_path, overrides or [])
    out = {"run_dir": str(store.root)}
    with store.lock():
        model = recipe.model
        for k in range(1, len(recipe.steps) + 1):
            step_store, step = open_step(store, recipe, k, model)
            logger.info(f"step {k}/{len(recipe.steps)}: {step.algorithm}, {step.iterations} iteration(s), "
                        f"from {model} -> {step_store.root}")
            store.log_event("step", step=k, algorithm=step.algorithm, model=model)
            with step_store.lock():
                result = run_algorithm(step_store, step, presentation(step.algorithm))
            model = final_model(step_store, step)
            out[f"step {k}"] = f"{step.algorithm}: {result['run_dir']}" + (f" ({result['eval']})" if result.get("eval") else "")
        out["adapter"] = model
    store.log_event("flow_done")
    return out
