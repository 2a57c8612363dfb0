"""Recipe model of a pipeline: algorithms run one after another on one run directory, each step
starting from the model the step before it ended with. Importing this registers ``algorithm: pipeline``.

    algorithm: pipeline
    model: smollm2-135m          # the base of every step (step 1's M_1)
    engine: {...}                # one engine setting for every step
    steps:
      - {algorithm: spin, iterations: 1, data: {...}, ...}            # a SPIN recipe body
      - {algorithm: self-rewarding, iterations: 2, prompts: {...}}    # its M_1 = SPIN's last model

A step is that algorithm's recipe without ``model`` and ``engine`` (the pipeline's; a step that
names another model is refused: every adapter must be a delta on the same base). PERL cannot be
a step yet (its policy starts from the base).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from alignment.config import RecipeBase, RecipeError, parse_recipe, register

STEP_ALGORITHMS = ("spin", "self-rewarding", "meta-rewarding")


def step_data(pipeline: "PipelineRecipe", k: int, model: str) -> dict:
    """Step k's recipe (1-based) as a dict: its body plus the pipeline's engine and seed, ``model``
    (step 1: the pipeline's model; later: the model the step before ended with), the pipeline's
    trackers unless the step names its own, and a name."""
    body = dict(pipeline.steps[k - 1])
    return body | {"model": model, "engine": pipeline.engine.model_dump(mode="json"),
                   "seed": body.get("seed", pipeline.seed), "report": body.get("report", list(pipeline.report)),
                   "name": f"{pipeline.name}-{k}-{body['algorithm']}"}


def step_label(k: int, step: Any) -> str:
    """How errors name a step: ``field steps[2] (spin)`` (1-based, as ``selfalign plan`` numbers them)."""
    algorithm = step.get("algorithm") if isinstance(step, dict) else None
    return f"field steps[{k}]" + (f" ({algorithm})" if algorithm else "")


def check_step(pipeline: "PipelineRecipe", k: int) -> RecipeBase:
    """Step k validated as its algorithm's recipe; RecipeError naming the step otherwise."""
    step = pipeline.steps[k - 1]
    where = step_label(k, step)
    if not isinstance(step, dict):
        raise RecipeError(f"{where}: a step must be a mapping (an algorithm's recipe body)")
    if step.get("algorithm") not in STEP_ALGORITHMS:
        raise RecipeError(f"{where}: field algorithm: must be one of {list(STEP_ALGORITHMS)}, "
                          f"got {step.get('algorithm')!r}")
    if "model" in step and step["model"] != pipeline.model:
        raise RecipeError(f"{where}: field model: {step['model']!r} is not the pipeline's model "
                          f"{pipeline.model!r} (every step trains adapters on one base; set model at the top)")
    if "engine" in step:
        raise RecipeError(f"{where}: field engine: set the engine at the top (one engine serves every step)")
    return parse_recipe(step_data(pipeline, k, pipeline.model), where)


@register
class PipelineRecipe(RecipeBase):
    """Algorithms chained on one run directory: step k+1 starts from step k's last model."""

    algorithm: Literal["pipeline"]
    name: str = Field("pipeline", pattern=r"^[A-Za-z0-9._-]+$")
    iterations: int = Field(1, ge=1, description="unused: each step has its own iterations")
    steps: list[Any] = Field(..., description="each an algorithm's recipe body with its iterations")

    @model_validator(mode="after")
    def _check(self) -> "PipelineRecipe":
        if not self.steps:
            raise ValueError("field steps: a pipeline needs at least one step")
        for k in range(1, len(self.steps) + 1):
            check_step(self, k)
        return self

    def step_recipes(self) -> list[RecipeBase]:
        """Every step's recipe on the pipeline's model (what preflight and plan read)."""
        return [check_step(self, k) for k in range(1, len(self.steps) + 1)]

    def preflight(self) -> None:
        super().preflight()
        for recipe in self.step_recipes():
            recipe.preflight()
