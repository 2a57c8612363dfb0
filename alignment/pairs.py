"""Preference-pair selection for the actor (Self-Rewarding, Meta-Rewarding length control).

Input rows follow the "judge" schema of ``docs/data-contracts.md`` (one row per response);
output rows follow the "pairs" schema. Pure functions, no I/O.

Length control (Meta-Rewarding, Wu et al., 2024, §2.3). For one prompt, with S_max and S_min
the highest and lowest mean judge scores and ρ ∈ [0, 1)::

    chosen   = shortest response with score in [(1−ρ)·S_max + ρ·S_min, S_max]
    rejected = longest  response with score in [S_min, (1−ρ)·S_min + ρ·S_max]

ρ = 0 is the Self-Rewarding rule (Yuan et al., 2024): highest mean vs lowest mean, ties dropped.
"""

from __future__ import annotations

from collections.abc import Iterable

# Scores are means of a few judgments (and, in logprob mode, expected values), so "equal"
# means equal up to float noise.
SCORE_TOL = 1e-9

PAIR_KEYS = (
    "prompt_id",
    "prompt",
    "chosen",
    "rejected",
    "chosen_index",
    "rejected_index",
    "chosen_score",
    "rejected_score",
    "chosen_length",
    "rejected_length",
)


def group_by_prompt(rows: Iterable[dict]) -> dict[str, list[dict]]:
    """Rows grouped by ``prompt_id``, prompts in first-seen order (dicts keep insertion order)."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["prompt_id"], []).append(row)
    return groups


def _check_rho(rho: float) -> None:
    # `not (0 <= rho < 1)` also rejects NaN.
    if not (0.0 <= rho < 1.0):
        raise ValueError(f"rho must satisfy 0 <= rho < 1, got rho={rho!r}")


def select_pair(responses: list[dict], rho: float = 0.0) -> tuple[dict, dict] | None:
    """(chosen, rejected) for one prompt's scored responses, or None for a tie.

    ``responses`` must all have a non-None ``mean_score`` and there must be at least two.
    With S_max, S_min the extreme scores::

        high band = {r : score(r) >= (1−ρ)·S_max + ρ·S_min}
        low band  = {r : score(r) <= (1−ρ)·S_min + ρ·S_max}
        chosen    = argmin over high band of (length, −score, response_index)
        rejected  = argmax over low band of (length, −score, −response_index)
                    i.e. longest, then lowest score, then lowest response_index

    Deterministic tie-breaking (not specified by the paper): among equally short chosen
    candidates the higher score wins, then the lower ``response_index``; among equally long
    rejected candidates the lower score wins, then the lower ``response_index``. For ρ = 0 the
    bands hold only the responses scoring exactly S_max / S_min, so this reduces to "the
    shortest of the top-scored, then lowest index" and "the longest of the bottom-scored,
    then lowest index".

    Returns None (a tie) when S_max == S_min, and also when the bands overlap (ρ ≥ 0.5 can
    make them overlap) such that the same response would be both chosen and rejected, or the
    chosen does not score strictly above the rejected: such a pair teaches nothing (or the
    wrong thing) to DPO, so the prompt is dropped rather than re-picked.
    """
    _check_rho(rho)
    scores = [float(r["mean_score"]) for r in responses]
    s_max, s_min = max(scores), min(scores)
    if s_max - s_min <= SCORE_TOL:
        return None
    hi = (1.0 - rho) * s_max + rho * s_min
    lo = (1.0 - rho) * s_min + rho * s_max
    high = [r for r in responses if r["mean_score"] >= hi - SCORE_TOL]
    low = [r for r in responses if r["mean_score"] <= lo + SCORE_TOL]
    chosen = min(high, key=lambda r: (r["length"], -r["mean_score"], r["response_index"]))
    rejected = min(low, key=lambda r: (-r["length"], r["mean_score"], r["response_index"]))
    if chosen is rejected or chosen["mean_score"] - rejected["mean_score"] <= SCORE_TOL:
        return None
    return chosen, rejected


def pair_row(chosen: dict, rejected: dict) -> dict:
    """A row of the "pairs" schema from two judge rows of the same prompt."""
    return {
        "prompt_id": chosen["prompt_id"],
        "prompt": chosen["prompt"],
        "chosen": chosen["response"],
        "rejected": rejected["response"],
        "chosen_index": chosen["response_index"],
        "rejected_index": rejected["response_index"],
        "chosen_score": chosen["mean_score"],
        "rejected_score": rejected["mean_score"],
        "chosen_length": chosen["length"],
        "rejected_length": rejected["length"],
    }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def build_pairs(judge_rows: list[dict], rho: float = 0.0) -> tuple[list[dict], dict]:
    """Preference pairs (one per prompt at most) and counts, from judge rows.

    Per prompt (first-seen order): responses with ``mean_score`` None (all judgments failed)
    are excluded; fewer than two scored responses → no pair, counted in ``unscored``;
    otherwise :func:`select_pair` decides, a None there is counted in ``ties``.

    Stats: ``prompts`` (distinct prompt_ids), ``pairs``, ``ties``, ``unscored``,
    ``judgments`` = Σ len(scores), ``failed_judgments`` = Σ n_failed,
    ``chosen_mean_length`` / ``rejected_mean_length`` (None when there are no pairs), ``rho``.
    """
    _check_rho(rho)
    groups = group_by_prompt(judge_rows)
    pairs: list[dict] = []
    ties = unscored = 0
    for responses in groups.values():
        scored = [r for r in responses if r["mean_score"] is not None]
        if len(scored) < 2:
            unscored += 1
            continue
        picked = select_pair(scored, rho)
        if picked is None:
            ties += 1
            continue
        pairs.append(pair_row(*picked))
    stats = {
        "prompts": len(groups),
        "pairs": len(pairs),
        "ties": ties,
        "unscored": unscored,
        "judgments": sum(len(r["scores"]) for r in judge_rows),
        "failed_judgments": sum(int(r["n_failed"]) for r in judge_rows),
        "chosen_mean_length": _mean([p["chosen_length"] for p in pairs]),
        "rejected_mean_length": _mean([p["rejected_length"] for p in pairs]),
        "rho": rho,
    }
    return pairs, stats


def tie_rate(judge_rows: list[dict], score_key: str = "mean_score") -> float | None:
    """Share of prompts whose two best responses score the same.

    tie_rate = #{prompts with s_(1) == s_(2)} / #{prompts with ≥ 2 non-None scores}

    where s_(1) ≥ s_(2) are the two highest values of the scalar column ``score_key``
    (equality up to ``SCORE_TOL``). Used to compare integer scores with expected-value scores:
    integer scores tie far more often, and a tie at the top makes the choice of "chosen"
    arbitrary. None when no prompt has two scored responses.
    """
    eligible = tied = 0
    for responses in group_by_prompt(judge_rows).values():
        scores = sorted(
            (float(r[score_key]) for r in responses if r.get(score_key) is not None),
            reverse=True,
        )
        if len(scores) < 2:
            continue
        eligible += 1
        if scores[0] - scores[1] <= SCORE_TOL:
            tied += 1
    return tied / eligible if eligible else None
