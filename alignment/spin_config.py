"""Recipe model of SPIN (Chen et al., 2024, "Self-Play Fine-Tuning Converts Weak Language Models
to Strong Language Models"). Importing this module registers ``algorithm: spin``.

Defaults are the paper's / its official code's settings (uclaml/SPIN), except where LoRA needs
otherwise (learning rate; the paper fine-tunes all weights):
- 4 iterations (the paper's iter0..iter3) on 50k Ultrachat prompts, one y′ per prompt;
- generation: temperature 1.0, top-p 1.0, 256 new tokens (spin/generate_vllm.py);
- β = 0.1 in iterations 0–2 and 5.0 in the last one, "close to convergence";
- logistic loss (= DPO sigmoid); the hinge loss is the paper's other choice;
- each iteration trains on its new synthetic data plus the previous iteration's ("mixing");
- 2 epochs per iteration; max length 1024.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from alignment.config import EngineConfig, JudgeConfig, LoraConfig, RecipeBase, TrainConfig, StrictModel, register


class SpinDataConfig(StrictModel):
    """The SFT dataset: (prompt, answer) columns, or one column of chat messages."""

    source: str = Field(..., description="JSONL/JSON/CSV/parquet file (relative to the recipe) or an HF dataset id")
    split: str = Field("train", description="split, for HF dataset ids")
    prompt_field: str = Field("prompt", description="column holding the prompt (ignored with messages_field)")
    answer_field: str = Field("answer", description="column holding the real (SFT) answer (ignored with messages_field)")
    messages_field: str | None = Field(
        None, description="column holding chat messages [{role, content}, ...]; the first user turn is the prompt "
                          "and the assistant turn after it the answer (as in the official SPIN code)")
    limit: int | None = Field(None, ge=1, description="use only the first N distinct prompts")
    heldout_fraction: float = Field(
        0.1, ge=0, lt=1, description="share of prompts kept out of training for the built-in evaluation (0 = none)")


class SpinGenerationConfig(StrictModel):
    """How M_t writes y′ (the "rejected" answer). Paper code: T=1.0, top-p 1.0, 256 tokens, one per prompt."""

    n: int = Field(1, ge=1, description="y′ per prompt (each gives one pair)")
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(256, ge=1)


class SpinTrainConfig(TrainConfig):
    """The SPIN loss (DPO with M_t as the reference) on LoRA adapters.

    ``beta``: a number, or one per iteration (iteration t uses entry t; the last entry repeats).
    """

    beta: float | list[float] = Field(
        [0.1, 0.1, 0.1, 5.0], description="β per iteration (paper: 0.1, raised to 5.0 in the last iteration)")
    loss_type: Literal["sigmoid", "hinge"] = Field(
        "sigmoid", description="sigmoid: −log σ(β·Δ) (the paper's logistic loss, = DPO); hinge: max(0, 1 − β·Δ)")
    mix_previous: bool = Field(
        True, description="also train on the previous iteration's synthetic pairs (paper: data of t and t−1)")
    epochs: float = Field(2.0, gt=0, description="epochs per iteration (paper: 2)")
    max_length: int = Field(1024, ge=16, description="paper: 1024 tokens")

    @model_validator(mode="after")
    def _betas(self) -> "SpinTrainConfig":
        betas = self.beta if isinstance(self.beta, list) else [self.beta]
        if not betas:
            raise ValueError("beta: give a number or a non-empty list")
        if any(b <= 0 for b in betas):
            raise ValueError("beta: every value must be > 0")
        return self

    def beta_for(self, t: int) -> float:
        """β of iteration t (1-based): the t-th entry, or the last one past the list's end."""
        betas = self.beta if isinstance(self.beta, list) else [self.beta]
        return float(betas[min(t, len(betas)) - 1])


class SpinEvalConfig(StrictModel):
    """Built-in evaluation on the held-out prompts after each iteration's training.

    Iteration t trains M_{t+1} from M_t; its eval reports the mean log-likelihood of the real
    answers under both (transformers forward pass) and the win rate of M_{t+1}'s answers over
    M_t's, scored by the project's judge (prompts/judge.jinja) run by the *base* model, so every
    iteration is judged by the same judge.
    """

    enabled: bool = True
    win_rate: bool = Field(True, description="generate and judge held-out answers (off: log-likelihood only)")
    max_prompts: int | None = Field(None, ge=1, description="evaluate only the first N held-out prompts")
    temperature: float = Field(0.0, ge=0, description="held-out answers: 0 = greedy (less noise between models)")
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(256, ge=1)
    batch_size: int = Field(8, ge=1, description="sequences per forward pass for the log-likelihood")
    judge: JudgeConfig = JudgeConfig(n=1)


class SpinRecipe(RecipeBase):
    """SPIN: real SFT answers are "chosen", M_t's own answers "rejected"; DPO against M_t."""

    algorithm: Literal["spin"]
    name: str = Field("spin", pattern=r"^[A-Za-z0-9._-]+$")
    iterations: int = Field(4, ge=1, description="paper: iter0..iter3")
    data: SpinDataConfig
    generation: SpinGenerationConfig = SpinGenerationConfig()
    train: SpinTrainConfig = SpinTrainConfig()
    eval: SpinEvalConfig = SpinEvalConfig()
    engine: EngineConfig = EngineConfig()


    def preflight(self) -> None:
        """Model, then every row of the SFT set: a bad row fails here, before any generation."""
        from alignment.spin_data import load_sft

        super().preflight()
        load_sft(self.data)

    @model_validator(mode="after")
    def _check(self) -> "SpinRecipe":
        if self.review.gate:
            # The gate and the review app review judge data; SPIN trains on real answers vs y′, no judge.
            raise ValueError("review.gate is not supported for spin (there is no judge data to review)")
        j = self.eval.judge
        if j.mode == "constrained" and self.engine.backend == "transformers":
            raise ValueError("eval.judge.mode 'constrained' needs engine.backend vllm (or auto with vLLM installed)")
        if j.score == "expected" and j.mode != "logprob":
            raise ValueError("eval.judge.score 'expected' needs eval.judge.mode 'logprob'")
        return self


register(SpinRecipe)

__all__ = ["SpinRecipe", "SpinDataConfig", "SpinGenerationConfig", "SpinTrainConfig", "SpinEvalConfig", "LoraConfig"]
