"""Recipe model of Meta-Rewarding (Wu et al., 2024, "Meta-Rewarding Language Models:
Self-Improving Alignment with LLM-as-a-Meta-Judge"). Importing this module registers
``algorithm: meta-rewarding``.

Self-Rewarding plus a meta-judge: the same model acts (K responses), judges (N judgments per
response), and meta-judges pairs of its own judgments; the judgments it prefers become DPO
pairs that train the judge, alongside the actor's pairs. Paper settings (the defaults here):
4 iterations, K = 7 responses, N = 11 judgments, judge training only in iterations 1–2, actor
pairs with length control. Sampling temperatures are the Self-Rewarding defaults (T = 0.7,
top-p 0.9); take the paper's appendix values for a faithful rerun.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from alignment.config import (
    JudgeConfig,
    SamplingConfig,
    SelfRewardingRecipe,
    StrictModel,
    register,
)


class MetaSamplingConfig(SamplingConfig):
    n: int = Field(7, ge=1, description="K responses per prompt (paper: 7)")


class MetaJudgeJudgeConfig(JudgeConfig):
    """The judge (prompts/judge.jinja), N times per response: the meta-judge ranks these N."""

    n: int = Field(11, ge=2, description="N judgments per response (paper: 11); ≥ 2 so there is something to compare")


class MetaJudgeConfig(StrictModel):
    """LLM-as-a-Meta-Judge (prompts/meta_judge.jinja): which of two judgments follows the rubric better.

    For each prompt the response whose N judgments have the highest score variance is taken and
    every pair of its scored judgments is shown in both orders: k scored judgments → k(k−1)
    meta-judge calls per prompt (N = 11 → 110).

    mode: ``free`` samples the meta-judge's reasoning and parses its last ``Winner:`` line (the
    paper; a battle without a valid verdict fails and is excluded); ``logprob`` samples the
    reasoning until ``Winner:``, appends ``Winner: Judgment`` and reads the next token's
    probabilities of `` A`` and `` B``: the larger wins, so every battle gets a verdict even
    from a model too weak to write the format line (the mode is recorded per battle).
    debias_position (logprob mode; beyond the paper): decide each battle on the log-odds
    ln p(A) − ln p(B) minus the prompt's mean log-odds, i.e. after removing the meta-judge's
    preference for a position. Without it, a weak model that always names the same position
    gets ω = 0 for that position and never yields a judge pair (see
    ``alignment.meta_rewarding.meta_judge_battles``).
    """

    mode: Literal["free", "logprob"] = "free"
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.9, gt=0, le=1)
    max_tokens: int = Field(512, ge=1, description="meta-judge reasoning tokens per battle")
    debias_position: bool = Field(False, description="logprob mode: subtract the prompt's mean log-odds (position prior)")
    min_verdict_mass: float = Field(
        0.0, ge=0, le=1, description="logprob mode: a battle whose probability mass p(' A') + p(' B') after "
                                     "'Winner: Judgment' is below this fails (the meta-judge was not about to "
                                     "name a judgment); 0 = only zero mass fails")
    length_cap: int | None = Field(
        None, ge=1, description="judgments longer than this many tokens are never chosen or rejected "
                                "(keeps the judge from being trained towards verbosity); None = no cap")
    position_weights: Literal["prompt", "iteration"] = Field(
        "prompt", description="count the positional win rates (ω1, ω2) per prompt, or pooled over the iteration's battles")
    prior: float = Field(0.1, gt=0, description="Bradley–Terry pseudo-wins per pair and direction (keeps ratings finite)")
    train_judge_iterations: list[int] = Field(
        [1, 2], description="iterations whose judge pairs are trained (paper: 1 and 2); other iterations "
                            "skip the meta-judge stages (no meta-judge calls)")

    @field_validator("train_judge_iterations")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if any(t < 1 for t in value):
            raise ValueError("iterations are numbered from 1")
        return sorted(set(value))

    @model_validator(mode="after")
    def _debias_needs_logprob(self) -> MetaJudgeConfig:
        if self.debias_position and self.mode != "logprob":
            raise ValueError("debias_position needs mode 'logprob' (it works on the verdict probabilities)")
        return self


class MetaPairsConfig(StrictModel):
    """Actor pairs with length control (README, Meta-Rewarding): ρ = 0 is plain highest vs lowest mean score.

    ``rho``: one value for every iteration, or one per iteration (iteration t uses entry t; the
    last entry repeats). Larger ρ widens the "near the top" / "near the bottom" score bands, in
    which the shortest high response is chosen and the longest low one rejected.
    """

    rho: float | list[float] = Field(0.0, description="length-control strength in [0, 1), or a per-iteration list")

    @field_validator("rho")
    @classmethod
    def _range(cls, value):
        values = value if isinstance(value, list) else [value]
        if not values:
            raise ValueError("give a number or a non-empty list")
        for v in values:
            if not (0.0 <= v < 1.0):
                raise ValueError(f"every value must satisfy 0 <= rho < 1, got {v}")
        return value

    def rho_for(self, t: int) -> float:
        """ρ of iteration t (1-based): the t-th entry, or the last one past the list's end."""
        values = self.rho if isinstance(self.rho, list) else [self.rho]
        return float(values[min(t, len(values)) - 1])


class MetaRewardingRecipe(SelfRewardingRecipe):
    """Meta-Rewarding: Self-Rewarding's actor and judge plus a meta-judge that trains the judge."""

    algorithm: Literal["meta-rewarding"]  # type: ignore[assignment]
    name: str = Field("meta-rewarding", pattern=r"^[A-Za-z0-9._-]+$")
    iterations: int = Field(4, ge=1, description="paper: 4")
    generation: MetaSamplingConfig = MetaSamplingConfig()
    judge: MetaJudgeJudgeConfig = MetaJudgeJudgeConfig()
    meta_judge: MetaJudgeConfig = MetaJudgeConfig()
    pairs: MetaPairsConfig = MetaPairsConfig()

    @model_validator(mode="before")
    @classmethod
    def _no_separate_judge(cls, data):
        judge = data.get("judge") if isinstance(data, dict) else None
        named = [k for k in ("model", "engine") if isinstance(judge, dict) and judge.get(k) is not None]
        if named:
            raise ValueError(f"field judge.{named[0]}: Meta-Rewarding trains its judge, so the judge must be the "
                             "policy itself (a separate judge is a Self-Rewarding option)")
        return data


    def trains_judge(self, t: int) -> bool:
        """Whether iteration t meta-judges and adds judge pairs to its DPO step (entries past
        ``iterations`` are allowed and never reached, so ``--set iterations=1`` works)."""
        return t in self.meta_judge.train_judge_iterations


register(MetaRewardingRecipe)

__all__ = ["MetaJudgeConfig", "MetaJudgeJudgeConfig", "MetaPairsConfig", "MetaRewardingRecipe", "MetaSamplingConfig"]
