"""Head-to-head: a candidate's and a baseline's answers to the same prompts, compared by a fixed
judge, each pair asked in both orders (prompts/pairwise.jinja, "Winner: A" / "Winner: B").

An *item* is ``{prompt_id, prompt, candidate, baseline}`` (the two answers' texts). The judge
sees the pair twice: candidate as answer A (``candidate_first``) and candidate as answer B
(``baseline_first``). A judge that follows the position instead of the content names the same
letter both times, which is a tie, not a win for whichever model happened to be shown first.
The statistics over the outcomes (win rate, bootstrap interval, length-controlled win rate)
are :mod:`alignment.evaluation`'s; the stage that produces the answers and calls the judge is
``alignment.self_rewarding.compute_eval``.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Sequence

from alignment.evaluation import bootstrap_ci, length_controlled_win_rate, win_rate
from alignment.generation import Generator, Sampling, derive_seed
from alignment.meta_judge import parse_verdict, verdict_from_probs
from alignment.prompts import render

ORDERS = ("candidate_first", "baseline_first")
# logprob mode: the judge's reasoning is cut at "Winner:", this is appended and the next token
# decides; the letter may come with or without a space (chat templates that trim the final
# message drop a trailing space), so both spellings count, as for the judge's digits.
VERDICT_PREFIX = "\nWinner:"
LETTER_CANDIDATES = {"A": (" A", "A"), "B": (" B", "B")}


@dataclass(frozen=True)
class PairwiseSettings:
    mode: str = "free"  # free | logprob
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    min_verdict_mass: float = 0.0  # logprob mode: below this p(A) + p(B) the verdict fails


# ------------------------------------------------------------------------------ prompts
def pairwise_prompt(question: str, answer_a: str, answer_b: str) -> str:
    return render("pairwise", question=question, answer_a=answer_a, answer_b=answer_b)


def shown(item: dict, order: str) -> tuple[str, str]:
    """(answer A, answer B) of an item in one order: ``candidate_first`` shows the candidate as A."""
    if order == "candidate_first":
        return item["candidate"], item["baseline"]
    return item["baseline"], item["candidate"]


def same_answer(a: str, b: str) -> bool:
    """Equal up to whitespace: such a pair is a tie without asking the judge."""
    return " ".join(a.split()) == " ".join(b.split())


# ------------------------------------------------------------------------------ verdicts
def letter_probs(candidate_probs: dict[str, float]) -> tuple[float, float]:
    """(p(A), p(B)) after "Winner:", each the sum over its spellings (" A" and "A")."""
    return tuple(sum(candidate_probs.get(s, 0.0) for s in LETTER_CANDIDATES[x]) for x in ("A", "B"))


def pair_outcome(candidate_first: str | None, baseline_first: str | None) -> float | None:
    """The candidate's outcome on one prompt from the verdicts of both orders:

        o = (c₁ + c₂) / 2,  c₁ = [v₁ = "A"] (candidate shown as A),  c₂ = [v₂ = "B"] (candidate shown as B)

    so both orders for the candidate → 1 (win), both for the baseline → 0 (loss), one each → ½
    (a tie: the verdict followed the position). None (a failed comparison, left out of the
    win rate and counted) when either order gave no verdict."""
    if candidate_first is None or baseline_first is None:
        return None
    return ((candidate_first == "A") + (baseline_first == "B")) / 2


def outcome_label(outcome: float | None) -> str:
    """win / tie / loss / failed for an outcome 1 / ½ / 0 / None."""
    return "failed" if outcome is None else "win" if outcome == 1 else "loss" if outcome == 0 else "tie"


# ------------------------------------------------------------------------------ the judge
def compare(
    generator: Generator,
    items: Sequence[dict],
    settings: PairwiseSettings,
    *,
    adapter: str | None = None,
    seed: int = 0,
) -> list[dict]:
    """Judge every item in both orders; one row per item, in item order:
    ``verdict_candidate_first``, ``verdict_baseline_first`` ("A" | "B" | None),
    ``judgment_candidate_first``, ``judgment_baseline_first`` (the judge's texts), ``identical``
    and ``outcome`` (:func:`pair_outcome`). Identical answers are not sent to the judge: the
    outcome is ½. Each request is seeded from (seed, prompt id, order), so a pair gets the same
    verdict in any batch."""
    logprob = settings.mode == "logprob"
    plan = [(item, order) for item in items if not same_answer(item["candidate"], item["baseline"])
            for order in ORDERS]
    verdicts: dict[tuple[str, str], tuple[str | None, str]] = {}
    if plan:
        convs = [[{"role": "user", "content": pairwise_prompt(item["prompt"], *shown(item, order))}]
                 for item, order in plan]
        sampling = Sampling(n=1, temperature=settings.temperature, top_p=settings.top_p,
                            max_tokens=settings.max_tokens, stop=("Winner:",) if logprob else ())
        seeds = [derive_seed(seed, item["prompt_id"], order) for item, order in plan]
        texts = [per_conv[0].text for per_conv in generator.chat(convs, sampling, adapter=adapter, seed=seeds)]
        if logprob:
            continued = [conv + [{"role": "assistant", "content": text.rstrip() + VERDICT_PREFIX}]
                         for conv, text in zip(convs, texts)]
            candidates = tuple(s for spellings in LETTER_CANDIDATES.values() for s in spellings)
            probs = generator.next_token_probs(continued, candidates, adapter=adapter)
            found = [verdict_from_probs(*letter_probs(p), min_mass=settings.min_verdict_mass) for p in probs]
            texts = [text.rstrip() + VERDICT_PREFIX + (f" {v}" if v else "") for text, v in zip(texts, found)]
        else:
            found = [parse_verdict(text) for text in texts]
        verdicts = {(item["prompt_id"], order): (v, text) for (item, order), v, text in zip(plan, found, texts)}
    rows = []
    for item in items:
        identical = same_answer(item["candidate"], item["baseline"])
        first, second = (verdicts.get((item["prompt_id"], order), (None, None)) for order in ORDERS)
        rows.append({
            "verdict_candidate_first": first[0], "verdict_baseline_first": second[0],
            "judgment_candidate_first": first[1], "judgment_baseline_first": second[1],
            "identical": identical, "outcome": 0.5 if identical else pair_outcome(first[0], second[0]),
        })
    return rows


# ------------------------------------------------------------------------------ summary
def mean_or_none(values: Sequence[float | None]) -> float | None:
    """Mean of the values that are not None; None if there are none."""
    present = [float(v) for v in values if v is not None]
    return statistics.fmean(present) if present else None


def summarize(outcomes: Sequence[float | None], candidate_lengths: Sequence[int], baseline_lengths: Sequence[int],
              *, seed: int = 0, resamples: int = 2000) -> dict:
    """Counts and rates of one head-to-head, over the prompts whose comparison did not fail:

        win rate = (wins + ½·ties) / (wins + ties + losses)          (evaluation.win_rate)
        95% interval: percentile bootstrap of that mean, seeded         (evaluation.bootstrap_ci)
        LC win rate: σ(a) of the fit P(win_i) = σ(a + b·tanh(d_i / sd(d))),
                     d_i = length(candidate_i) − length(baseline_i)     (evaluation.length_controlled_win_rate)

    Mean lengths (tokens) are over every prompt, failed comparisons included."""
    kept = [(o, c - b) for o, c, b in zip(outcomes, candidate_lengths, baseline_lengths) if o is not None]
    scored = [o for o, _ in kept]
    labels = [outcome_label(o) for o in outcomes]
    return {
        "prompts": len(outcomes),
        "wins": labels.count("win"), "ties": labels.count("tie"), "losses": labels.count("loss"),
        "failed": labels.count("failed"),
        "win_rate": win_rate(scored),
        "win_rate_ci": bootstrap_ci(scored, resamples=resamples, seed=seed),
        "lc_win_rate": length_controlled_win_rate(scored, [d for _, d in kept]),
        "mean_length_candidate": mean_or_none(candidate_lengths),
        "mean_length_baseline": mean_or_none(baseline_lengths),
    }


def score_gains(before: Sequence[float | None], after: Sequence[float | None]) -> list[float]:
    """The paired pointwise gains g_i = score_after_i − score_before_i over the prompts where the
    fixed judge scored both answers (the same prompt, the same judge: the prompt's difficulty
    cancels, so the mean gain is measured more tightly than the two means apart)."""
    return [a - b for b, a in zip(before, after) if a is not None and b is not None]


def score_gain_summary(before: Sequence[float | None], after: Sequence[float | None], *, seed: int = 0,
                       resamples: int = 2000) -> dict:
    """``score_gain`` = (1/n) Σ g_i of :func:`score_gains` and ``score_gain_ci``, its seeded
    percentile-bootstrap 95% interval (evaluation.bootstrap_ci; None under two paired scores): an
    interval above 0 says M_{t+1}'s answers score higher than M_t's by the same fixed judge."""
    gains = score_gains(before, after)
    return {"score_gain": mean_or_none(gains), "score_gain_ci": bootstrap_ci(gains, resamples=resamples, seed=seed)}


__all__ = ["ORDERS", "PairwiseSettings", "compare", "letter_probs", "mean_or_none", "outcome_label", "pair_outcome",
           "pairwise_prompt", "same_answer", "score_gain_summary", "score_gains", "shown", "summarize",
           "verdict_from_probs"]
