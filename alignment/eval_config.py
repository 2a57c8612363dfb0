"""Recipe section ``eval`` of Self-Rewarding and Meta-Rewarding: the head-to-head evaluation
stage (``alignment.head_to_head``), run after each iteration's training.

Iteration t compares M_{t+1} (candidate) with M_t (baseline) on prompts kept out of training:
the held-out share of the seed prompts (``heldout_fraction``) and/or the prompts of a file
(``prompts``). A **fixed** judge — the base model by default, the same in every iteration —
compares the two answers of each prompt in both orders, and scores each answer with the
project's pointwise judge. Off by default (``heldout_fraction`` 0, no ``prompts``), so a recipe
without an ``eval`` section computes and hashes exactly what it did before.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from alignment.data import DataError, load_prompts, read_records

# As alignment.config.StrictModel: alignment.config imports this module (the recipe's ``eval``
# field), so this module cannot import it back.
STRICT = ConfigDict(extra="forbid", validate_assignment=True)


class PairwiseJudgeConfig(BaseModel):
    """The fixed judge of the head-to-head (prompts/pairwise.jinja: question, answer A, answer B,
    "Winner: A|B").

    mode: ``free`` samples the judge's reasoning and parses its last ``Winner:`` line (no
    verdict = a failed comparison, counted); ``logprob`` samples the reasoning up to
    ``Winner:`` and reads p(A) vs p(B) for the next token, so a model too weak to write the
    format line still gives a verdict. ``pointwise``: also score each answer alone with the
    project's 5-point judge (prompts/judge.jinja) under the recipe's ``judge`` settings, run by
    this same fixed model.
    """

    model_config = STRICT

    model: Literal["base", "initial", "judge"] = Field(
        "base", description="who judges: base = the base model without any adapter; initial = M_1, the recipe's "
                            "model (differs from base when the recipe's model is an adapter); judge = the recipe's "
                            "separate judge (judge.model on judge.engine, e.g. a bigger model on a server)")
    mode: Literal["free", "logprob"] = "free"
    temperature: float = Field(0.0, ge=0, description="0 = greedy: the same pair gets the same verdict")
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(256, ge=1, description="the judge's reasoning before its verdict")
    min_verdict_mass: float = Field(
        0.0, ge=0, le=1, description="logprob mode: a verdict whose p(A) + p(B) after 'Winner:' is below this "
                                     "fails (the judge was not about to name an answer)")
    pointwise: bool = Field(True, description="mean 5-point score of each side's answers (the recipe's judge "
                                              "settings, run by this fixed judge)")


class EvalConfig(BaseModel):
    """Per iteration, M_{t+1} against M_t on held-out prompts (win / tie / loss, win rate with a
    seeded bootstrap 95% interval, length-controlled win rate, mean answer length and pointwise
    score of each side; optionally M_{t+1} against reference answers)."""

    model_config = STRICT

    heldout_fraction: float = Field(
        0.0, ge=0, lt=1, description="share of the seed prompts kept out of training and evaluated "
                                     "(hash of (seed, prompt id)); 0 = none")
    prompts: str | None = Field(
        None, description="JSONL/CSV/parquet file of eval prompts (relative to the recipe); ids as the prompts stage's "
                          "(sha256 of the text), and any training prompt with the same id is kept out of training")
    field: str = Field("prompt", description="column holding the prompt in the eval prompts file")
    max_prompts: int | None = Field(None, ge=1, description="evaluate only the first N eval prompts")
    temperature: float = Field(0.0, ge=0, description="answers of both models: 0 = greedy (less noise between models)")
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(256, ge=1)
    bootstrap_resamples: int = Field(2000, ge=100, description="resamples of the win rate's 95% interval (seeded)")
    judge: PairwiseJudgeConfig = PairwiseJudgeConfig()
    reference: str | None = Field(
        None, description="JSONL/CSV/parquet of reference answers (columns prompt_id, answer; e.g. a stronger model's): "
                          "adds the win rate of M_{t+1} against them")

    @property
    def enabled(self) -> bool:
        """The stage runs when there is something to evaluate on."""
        return self.heldout_fraction > 0 or self.prompts is not None


def heldout_count(n: int, fraction: float) -> int:
    """Prompts held out of n: k = round(fraction · n), at least 1 when fraction > 0
    (``alignment.spin.split_heldout`` takes the k smallest hashes of (seed, prompt id))."""
    return 0 if fraction <= 0 else max(1, round(fraction * n))


def check_heldout(n_prompts: int, fraction: float) -> None:
    """DataError (a user error: one line, exit 2) unless holding out ``fraction`` of ``n_prompts`` seed prompts leaves at least
    one to train on."""
    k = heldout_count(n_prompts, fraction)
    if k and n_prompts - k < 1:
        raise DataError(f"eval.heldout_fraction {fraction}: holds out {k} of {n_prompts} prompts and leaves none "
                          f"to train on (lower it, or give more prompts)")


def load_reference(source: str) -> dict[str, str]:
    """Reference answers ``{prompt_id: answer}`` from a file with columns ``prompt_id`` and
    ``answer``; a row without either (or a repeated id) is a DataError naming the field and line."""
    try:
        records = read_records(source)
    except DataError as err:
        raise DataError(f"eval.reference: {err}") from None
    out: dict[str, str] = {}
    for index, record in enumerate(records, start=1):
        where = f"{source}:{record.get('__line__', index)}"
        for key in ("prompt_id", "answer"):
            value = record.get(key)
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"eval.reference: {where}: field {key!r} missing or empty "
                                  f"(each row needs prompt_id and answer)")
        if record["prompt_id"] in out:
            raise DataError(f"eval.reference: {where}: prompt_id {record['prompt_id']!r} repeated")
        out[record["prompt_id"]] = record["answer"].strip()
    if not out:
        raise DataError(f"eval.reference: {source}: no reference answers")
    return out


def check_eval(ev: EvalConfig, seed_prompts: list[dict]) -> None:
    """Preflight of the ``eval`` section against the recipe's seed prompts (rows with
    ``prompt_id``), before anything runs: the eval prompts file loads; what is left to train on
    — the seed prompts not in that file, less ``heldout_fraction`` of them — is not empty; the
    reference file has a prompt_id and an answer on every row, and some of its ids are prompts
    of this recipe."""
    if not ev.enabled and ev.reference is None:
        return
    ids = {r["prompt_id"] for r in seed_prompts}
    file_ids = {r["prompt_id"] for r in load_prompts(ev.prompts, field=ev.field)} if ev.prompts else set()
    remaining = len(ids - file_ids)
    if remaining == 0:
        raise DataError(f"eval.prompts {ev.prompts}: holds every seed prompt, so none is left to train on")
    check_heldout(remaining, ev.heldout_fraction)
    if ev.reference is not None:
        if not ev.enabled:
            raise DataError("eval.reference: needs eval prompts (set eval.heldout_fraction or eval.prompts)")
        if not load_reference(ev.reference).keys() & (ids | file_ids):
            raise DataError(f"eval.reference {ev.reference}: no prompt_id matches a prompt of this recipe "
                            f"(ids are 'p' + the first 12 hex digits of sha256 of the prompt text)")


__all__ = ["EvalConfig", "PairwiseJudgeConfig", "check_eval", "check_heldout", "heldout_count", "load_reference"]
