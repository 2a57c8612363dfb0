"""Opening a run: validate the recipe and its inputs first, then create or reopen the run directory.

Everything a user can get wrong (recipe fields, model reference, prompt file) is checked
before the run directory is created, so a mistake costs a one-line error and writes nothing.
"""

from __future__ import annotations

from pathlib import Path

from alignment.config import RecipeBase, RecipeError, load_recipe, parse_recipe
from alignment.store import RECIPE_FILE, RunStore


def default_run_dir(recipe: RecipeBase) -> Path:
    return Path("runs") / recipe.name


def load_for_run(run_dir: str | Path | None, recipe_path: str | Path | None, overrides: list[str]) -> tuple[RecipeBase, dict, Path]:
    """The validated recipe (from a file, or the one stored in ``run_dir`` to resume) and the run dir."""
    if recipe_path is not None:
        recipe, data = load_recipe(recipe_path, overrides)
    else:
        if run_dir is None:
            raise RecipeError("need a recipe or a run directory")
        store = RunStore.open(run_dir)
        if overrides:
            raise RecipeError("--set cannot change a stored run's recipe; start a new run dir instead")
        recipe = parse_recipe(store.recipe(), str(Path(run_dir) / RECIPE_FILE))
        data = recipe.model_dump(mode="json")
    return recipe, data, Path(run_dir) if run_dir else default_run_dir(recipe)


def open_run(run_dir: str | Path | None, recipe_path: str | Path | None, overrides: list[str]) -> tuple[RunStore, RecipeBase]:
    recipe, data, path = load_for_run(run_dir, recipe_path, overrides)
    recipe.preflight()  # user mistakes fail here, before the run directory exists
    store = RunStore.create(path, recipe=data, algorithm=recipe.algorithm, name=recipe.name)
    return store, recipe
