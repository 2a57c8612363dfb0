"""Which algorithm (stage list) runs which recipe, and a run of it.

Each algorithm module declares its stages and one ``alignment.stages.Algorithm``; this table is
the one place that names them all (the flows, ``selfalign plan`` and ``selfalign status`` read it).
"""

from __future__ import annotations

from alignment.config import RecipeError, parse_recipe
from alignment.files import StoreError
from alignment.iterative import Run
from alignment.meta_rewarding import META_REWARDING
from alignment.perl import PERL
from alignment.self_rewarding import SELF_REWARDING
from alignment.spin import SPIN
from alignment.stages import Algorithm

ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (SELF_REWARDING, META_REWARDING, SPIN, PERL)}


def algorithm_run(store, recipe, **kw) -> Run:
    """A run of the recipe's algorithm over ``store`` (``kw``: ``log``, ``progress``)."""
    return Run(store, recipe, ALGORITHMS[recipe.algorithm], **kw)


def stage_names(store) -> list[str] | None:
    """The stages the run's stored recipe runs, in order (None if the recipe cannot be read)."""
    algorithm = ALGORITHMS.get(store.run_info().get("algorithm"))
    if algorithm is None:
        return None
    try:
        return [s.name for s in algorithm.active(parse_recipe(store.recipe()))]
    except (RecipeError, StoreError):
        return algorithm.names()
