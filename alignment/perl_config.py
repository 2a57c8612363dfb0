"""Recipe model of PERL (Sidahmed et al., 2024, "PERL: Parameter Efficient Reinforcement Learning
from Human Feedback"). Importing this module registers ``algorithm: perl``.

PERL = RLHF in which only LoRA adapters are trained: a reward model (LoRA on the attention
projections + a scalar head, backbone frozen) trained on preference pairs, then PPO whose policy
and value model are LoRA adapters on frozen backbones, with a KL penalty to the initial policy
(the base with adapters switched off). Defaults follow the paper where it gives them (LoRA on
the attention projections; the paper's ranks range 1–16, we default to 8) and TRL's PPO defaults
otherwise (KL coef 0.05, 4 PPO epochs, clip 0.2, γ=1, λ=0.95).

Rewards for PPO come from the trained reward model, or from any importable function
``reward(prompt: str, response: str) -> float`` (``reward.function: "module:function"``),
so rule- or API-based rewards plug in without training a reward model.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from alignment.config import NO_EFFECT, EngineConfig, LoraConfig, RecipeBase, StrictModel, register


class PerlPromptsConfig(StrictModel):
    """Prompts PPO trains on (and, held out, the before/after evaluation runs on)."""

    source: str = Field(..., description="JSONL/CSV/parquet file (relative to the recipe) or an HF dataset id")
    field: str = Field("prompt", description="column holding the prompt text")
    split: str = Field("train", description="split, for HF dataset ids")
    limit: int | None = Field(None, ge=1, description="use only the first N prompts")
    heldout_fraction: float = Field(0.2, ge=0, lt=1, description="share of prompts kept out of PPO for the before/after eval")


class GeneratedPreferencesConfig(StrictModel):
    """Preference pairs from the policy's own samples, ranked by a scoring function (no human data).

    For each training prompt, ``n`` responses are sampled from the initial policy and scored with
    ``scorer(prompt, response) -> float``; chosen = highest, rejected = lowest (and with
    ``pairs_per_prompt`` k > 1 also 2nd best vs 2nd worst, …, k-th vs k-th); pairs whose scores
    differ by less than ``min_margin`` are dropped (ties carry no preference).
    """

    scorer: str = Field(..., description="importable 'module:function' or 'file.py:function' reward(prompt, response) -> float")
    n: int = Field(4, ge=2, description="samples per prompt")
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(48, ge=1)
    min_margin: float = Field(1e-6, ge=0, description="drop pairs whose chosen - rejected score is below this")
    pairs_per_prompt: int = Field(1, ge=1, description="best vs worst, 2nd best vs 2nd worst, ... (at most n // 2)")


class PreferenceDataConfig(StrictModel):
    """Where the reward model's preference pairs come from: exactly one of ``source`` / ``generate``.

    ``source`` is a preference file in TRL's format (columns prompt/chosen/rejected, strings or
    chat message lists; JSONL/JSON/CSV/parquet), an HF dataset id, or an earlier selfalign run
    directory (self-/meta-rewarding), whose pairs of ``iteration`` are used with the run's review
    corrections applied.
    """

    source: str | None = Field(None, description="preference file (relative to the recipe), HF dataset id, or a selfalign run dir")
    generate: GeneratedPreferencesConfig | None = Field(None, description="build pairs from the policy's own samples")
    split: str = Field("train", description="split, for HF dataset ids")
    iteration: int | None = Field(None, ge=1, description="run dir source: which iteration's pairs (default: the last with pairs)")
    prompt_field: str = "prompt"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    limit: int | None = Field(None, ge=1, description="use only the first N pairs")
    heldout_fraction: float = Field(0.2, ge=0, lt=1, description="share of pairs (by prompt) for the RM's held-out accuracy")

    @model_validator(mode="after")
    def _one_source(self) -> "PreferenceDataConfig":
        if (self.source is None) == (self.generate is None):
            raise ValueError("give exactly one of source (a preference file, dataset id or run dir) or generate")
        return self


class RewardModelConfig(StrictModel):
    """LoRA reward model: sequence-classification head (1 output) over the frozen base, Bradley-Terry loss."""

    path: str | None = Field(None, description="use an already trained RM adapter dir instead of training one")
    data: PreferenceDataConfig | None = None
    learning_rate: float = Field(1e-4, gt=0, description="LoRA learning rate")
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(512, ge=16, description="longer pairs are dropped by TRL")
    save_steps: int = Field(50, ge=1, description="TRL checkpoint every N steps (for resume)",
                            json_schema_extra=NO_EFFECT)
    lora: LoraConfig = LoraConfig()

    @model_validator(mode="after")
    def _data_or_path(self) -> "RewardModelConfig":
        if self.path is None and self.data is None:
            raise ValueError("give data (to train a reward model) or path (a trained reward-model adapter)")
        return self


class RewardConfig(StrictModel):
    """Where PPO's scalar reward comes from."""

    source: Literal["reward_model", "function"] = "reward_model"
    function: str | None = Field(None, description="'module:function' or 'file.py:function' reward(prompt, response) -> float")
    max_failed_share: float = Field(
        0.1, ge=0, le=1, description="function: a PPO rollout whose reward call raises is counted as failed (scored with "
        "the batch's mean); PPO stops, resumable, once more than this share of all rollouts so far failed")

    @model_validator(mode="after")
    def _function(self) -> "RewardConfig":
        if self.source == "function" and not self.function:
            raise ValueError("reward.source 'function' needs reward.function ('module:function')")
        return self


class PPOConfig(StrictModel):
    """PPO on LoRA adapters (``alignment.ppo_trainer``); only policy and value adapters train.

    One PPO step = ``batch_size * grad_accum`` prompts → one rollout each, sampled by the recipe's
    engine with the current policy adapter → ``num_ppo_epochs`` passes over them in
    ``num_mini_batches`` mini-batches (one optimizer step each).
    """

    steps: int = Field(100, ge=1, description="PPO updates (rollout batches)")
    batch_size: int = Field(8, ge=1, description="prompts per rollout batch (times grad_accum)")
    grad_accum: int = Field(1, ge=1)
    num_mini_batches: int = Field(1, ge=1, description="batch_size * grad_accum must be a multiple of this")
    num_ppo_epochs: int = Field(4, ge=1)
    learning_rate: float = Field(1e-4, gt=0, description="LoRA learning rate (policy and value)")
    kl_coef: float = Field(0.05, ge=0, description="β of the per-token KL penalty to the initial policy")
    kl_estimator: Literal["k1", "k3"] = "k1"
    cliprange: float = Field(0.2, gt=0)
    cliprange_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    response_length: int = Field(53, ge=1, description="max new tokens per rollout")
    temperature: float = Field(0.7, gt=0, description="rollout sampling temperature")
    missing_eos_penalty: float | None = Field(None, ge=0, description="subtract from the score of responses that never end")
    whiten_rewards: bool = False
    save_steps: int = Field(10, ge=1, description="checkpoint adapters + optimizer every N steps (resume unit)",
                            json_schema_extra=NO_EFFECT)
    value_lora: LoraConfig = LoraConfig()
    lora: LoraConfig = LoraConfig()

    @model_validator(mode="after")
    def _batches(self) -> "PPOConfig":
        if (self.batch_size * self.grad_accum) % self.num_mini_batches:
            raise ValueError("batch_size * grad_accum must be a multiple of num_mini_batches")
        return self


class PerlEvalConfig(StrictModel):
    """Before/after evaluation on the held-out prompts: generate with the initial policy and with
    the PPO adapter, score both with the reward (RM or function) and, optionally, an external
    ``scorer`` the project did not write (e.g. VADER)."""

    enabled: bool = True
    max_prompts: int | None = Field(None, ge=1)
    samples: int = Field(1, ge=1, description="samples per held-out prompt")
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(53, ge=1)
    scorer: str | None = Field(None, description="extra 'module:function' scorer reported before/after")


class PerlRecipe(RecipeBase):
    """PERL: LoRA reward model → LoRA PPO (policy and value adapters) with KL to the initial policy."""

    algorithm: Literal["perl"]
    name: str = Field("perl", pattern=r"^[A-Za-z0-9._-]+$")
    iterations: int = Field(1, ge=1, le=1, description="PERL is one RM + one PPO run")
    prompts: PerlPromptsConfig
    reward_model: RewardModelConfig | None = None
    reward: RewardConfig = RewardConfig()
    ppo: PPOConfig = PPOConfig()
    eval: PerlEvalConfig = PerlEvalConfig()
    launcher: Literal["auto", "subprocess", "inprocess"] = Field(
        "auto", description="auto: in the run's process on CPU (a trainer process costs ~15 s of imports per job), "
        "a subprocess on GPU (its memory is given back when it exits); subprocess: `python -m "
        "alignment.perl_training` (replaceable by $SELFALIGN_TRAIN_LAUNCHER, e.g. accelerate launch)",
        json_schema_extra=NO_EFFECT)
    engine: EngineConfig = EngineConfig()


    @model_validator(mode="after")
    def _check(self) -> "PerlRecipe":
        if self.reward.source == "reward_model" and self.reward_model is None:
            raise ValueError("reward.source 'reward_model' needs a reward_model section (data or path)")
        if self.review.gate:
            raise ValueError("review.gate is not supported for perl (review the source run's pairs before)")
        return self

    def preflight(self) -> None:
        """Everything a user can get wrong, before the run directory exists: model, prompts,
        preference rows (missing chosen/rejected), reward functions (import + a probe call
        returning a float), and a given RM adapter's base model."""
        from alignment.data import load_prompts
        from alignment.perl_data import check_rm_adapter, load_preferences, load_reward_function

        super().preflight()
        base = _full_model(self.model)
        p = self.prompts
        load_prompts(p.source, field=p.field, split=p.split, limit=p.limit)
        if self.reward.source == "function":
            load_reward_function(self.reward.function, probe=True)
        if self.eval.scorer:
            load_reward_function(self.eval.scorer, probe=True)
        rm = self.reward_model
        if rm is not None:
            if rm.path:
                check_rm_adapter(rm.path, base)
            elif rm.data.generate is not None:
                load_reward_function(rm.data.generate.scorer, probe=True)
            else:
                load_preferences(rm.data)


def _full_model(ref: str) -> str:
    from alignment.models import ModelError, resolve

    m = resolve(ref)
    if m.adapter:
        # The PPO reference is "the base with adapters off"; with an SFT adapter as the starting
        # policy that reference would be the wrong model. Merge it into a full model first.
        raise ModelError(f"model {ref} is a PEFT adapter; PERL needs a full model (merge the adapter into its base first)")
    return m.base


register(PerlRecipe)

__all__ = ["PerlRecipe", "PerlPromptsConfig", "PreferenceDataConfig", "GeneratedPreferencesConfig",
           "RewardModelConfig", "RewardConfig", "PPOConfig", "PerlEvalConfig"]
