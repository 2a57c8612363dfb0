"""Running a pipeline's steps over one run directory.

``RUN/steps/<k>-<algorithm>/`` is step k's own run directory, so resume, status, review, plan and
export work on a step as on any run. Step k+1's M_1 is the model step k ended with (its base +
its last adapter): every adapter is a delta on the pipeline's base, so one engine setting serves
every step and the chain continues across algorithms. A step's recipe records that model by
path and its stages by content (the adapter's sha256 is part of every M_t identity), so a step
redone upstream redoes what depends on it downstream.
"""

from __future__ import annotations

from pathlib import Path

from alignment.algorithms import algorithm_run
from alignment.config import RecipeBase, parse_recipe
from alignment.pipeline_config import PipelineRecipe, step_data
from alignment.runs import commit_run
from alignment.stages import plan
from alignment.store import RUN_FILE, RunStore

STEPS_DIR = "steps"


def step_dir(root: str | Path, k: int, algorithm: str) -> Path:
    return Path(root) / STEPS_DIR / f"{k}-{algorithm}"


def step_recipe(pipeline: PipelineRecipe, k: int, model: str, source: str) -> RecipeBase:
    """Step k's recipe starting from ``model`` (validated: the pipeline's recipe checked its body)."""
    return parse_recipe(step_data(pipeline, k, model), f"{source} step {k}")


def open_step(store: RunStore, pipeline: PipelineRecipe, k: int, model: str) -> tuple[RunStore, RecipeBase]:
    """Create or reopen step k's run directory for a step starting from ``model``. A changed step
    (a pipeline setting changed on resume, or a new model from the step before) replaces the
    step's stored recipe, recorded in its events; its stages' hashes decide what is redone."""
    recipe = step_recipe(pipeline, k, model, str(store.root))
    step_store, _ = commit_run(step_dir(store.root, k, recipe.algorithm), recipe, recipe.model_dump(mode="json"),
                               change=True)
    return step_store, recipe


def final_model(store: RunStore, recipe: RecipeBase) -> str:
    """The model a finished step ended with, as a recipe's ``model``: the adapter M_{T+1} is
    made of (an absolute path), or the step's own model if it trained nothing."""
    return algorithm_run(store, recipe).model(recipe.iterations + 1).adapter or recipe.model


def started_steps(store: RunStore) -> list[tuple[int, RunStore]]:
    """(k, store) of the steps that have a run directory, in order."""
    root = store.root / STEPS_DIR
    found = [p for p in root.iterdir() if (p / RUN_FILE).is_file()] if root.is_dir() else []
    return [(int(p.name.split("-", 1)[0]), RunStore.open(p)) for p in sorted(found, key=lambda p: int(p.name.split("-")[0]))]


def plan_steps(store: RunStore | None, pipeline: PipelineRecipe) -> list[tuple[int, object, list[dict] | None]]:
    """Per step: (k, its run, its plan rows) — rows from ``alignment.stages.plan`` for a step whose
    run directory exists and whose step before is done; else None (nothing of it can be checked
    yet: its M_1 is the model the step before will end with)."""
    out, model, ready = [], pipeline.model, True
    for k in range(1, len(pipeline.steps) + 1):
        recipe = step_recipe(pipeline, k, model, str(store.root) if store else "recipe")
        path = step_dir(store.root, k, recipe.algorithm) if store else None
        if path is not None and ready and (path / RUN_FILE).is_file():
            run = algorithm_run(RunStore.open(path), recipe)
            rows = plan(run)
            ready = all(r["state"] in ("done", "off") for r in rows)
            if ready:
                model = final_model(run.store, recipe)
            out.append((k, run, rows))
        else:
            ready = False
            out.append((k, algorithm_run(None, recipe), None))
    return out
