"""Opening a run: validate the recipe and its inputs first, then create or reopen the run directory.

Everything a user can get wrong (recipe fields, model reference, prompt file) is checked
before the run directory is created, so a mistake costs a one-line error and writes nothing.
A run's settings may be changed on resume (``resume --set``, ``run --change-recipe``): the
stored recipe is replaced and each stage's recipe hash decides whether it is redone.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from alignment.config import RecipeBase, RecipeError, apply_overrides, changed_fields, load_recipe, parse_recipe, result_dump
from alignment.store import RECIPE_FILE, RUN_FILE, RunStore


def default_run_dir(recipe: RecipeBase) -> Path:
    return Path("runs") / recipe.name


def load_for_run(run_dir: str | Path | None, recipe_path: str | Path | None, overrides: list[str]) -> tuple[RecipeBase, dict, Path]:
    """The validated recipe (from a file, or the one stored in ``run_dir`` plus ``overrides``
    to resume) and the run dir."""
    if recipe_path is not None:
        recipe, data = load_recipe(recipe_path, overrides)
    else:
        if run_dir is None:
            raise RecipeError("need a recipe or a run directory")
        store = RunStore.open(run_dir)
        source = str(Path(run_dir) / RECIPE_FILE)
        stored = store.recipe()
        recipe = parse_recipe(stored, source)  # a damaged stored recipe is named as such
        if overrides:
            recipe = parse_recipe(apply_overrides(copy.deepcopy(stored), list(overrides)), f"{source} with --set")
        data = recipe.model_dump(mode="json")
    return recipe, data, Path(run_dir) if run_dir else default_run_dir(recipe)


@dataclass(frozen=True)
class RecipeChange:
    """What a settings change on an existing run changes: dotted field -> (old, new), and which
    of those fields can change a stage's result (the others redo nothing)."""

    changes: dict[str, tuple]
    affecting: list[str]

    def lines(self) -> list[str]:
        return [f"{k}: {old!r} -> {new!r} (" + ("stages that use it are redone" if k in self.affecting
                                                 else "cannot change a result: nothing is redone") + ")"
                for k, (old, new) in self.changes.items()]


def recipe_change(old: dict, new: RecipeBase, source: str) -> RecipeChange:
    """The change from the stored recipe dict ``old`` to ``new``; RecipeError if the algorithm differs."""
    if old.get("algorithm") != new.algorithm:
        raise RecipeError(f"{source}: field algorithm: a run's algorithm cannot change "
                          f"({old.get('algorithm')!r} -> {new.algorithm!r}); pass a new --run-dir")
    new_data = new.model_dump(mode="json")
    changes = {k: (_get(old, k), _get(new_data, k)) for k in changed_fields(old, new_data)}
    effective_old = result_dump(parse_recipe(old, source))
    affecting = [k for k in changed_fields(effective_old, result_dump(new)) if k in changes]
    return RecipeChange(changes, affecting)


def _get(data: dict, dotted: str):
    for part in dotted.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def commit_run(path: Path, recipe: RecipeBase, data: dict, *, change: bool) -> tuple[RunStore, RecipeChange | None]:
    """Create the run dir, reopen it (same recipe), or, with ``change``, replace its stored recipe
    (the caller holds the run's lock). Returns the store and the change made, if any."""
    made = None
    if change and (Path(path) / RUN_FILE).is_file():
        store = RunStore.open(path)
        old = store.recipe()
        made = recipe_change(old, recipe, str(Path(path) / RECIPE_FILE))
        if made.changes:
            store.change_recipe(data, changes={k: list(v) for k, v in made.changes.items()}, affecting=made.affecting)
        else:
            made = None
    store = RunStore.create(path, recipe=stored_form(path, data), algorithm=recipe.algorithm, name=recipe.name)
    return store, made


def stored_form(path: str | Path, data: dict) -> dict:
    """``data`` (a recipe dump), or the recipe stored in the run at ``path`` when that one reads as
    ``data`` by today's schema: a run written before a field was added (its default then fills
    it in) is the same run, and its recipe.yaml stays as it was written."""
    if not (Path(path) / RUN_FILE).is_file():
        return data
    stored = RunStore.open(path).recipe()
    try:
        same = parse_recipe(stored, str(Path(path) / RECIPE_FILE)).model_dump(mode="json") == data
    except RecipeError:  # damaged: RunStore.create names the difference
        return data
    return stored if same else data


def open_run(run_dir: str | Path | None, recipe_path: str | Path | None, overrides: list[str]) -> tuple[RunStore, RecipeBase]:
    """What a flow calls: the validated run (a settings change was already made by the CLI)."""
    recipe, data, path = load_for_run(run_dir, recipe_path, overrides)
    recipe.preflight()  # user mistakes fail here, before the run directory exists
    store, _ = commit_run(path, recipe, data, change=False)
    return store, recipe

