"""Pair selection against hand-built judge rows (schema "judge", docs/data-contracts.md)."""

from __future__ import annotations

import math

import pytest

from alignment.pairs import PAIR_KEYS, build_pairs, select_pair, tie_rate


def row(pid, idx, score, length, scores=None, n_failed=0):
    """One judge row; ``scores`` defaults to three judgments equal to the mean."""
    if scores is None:
        scores = [score] * 3 if score is not None else [None] * 3
    return {
        "prompt_id": pid,
        "prompt": f"question {pid}",
        "response_index": idx,
        "response": f"{pid}-r{idx}",
        "length": length,
        "judgments": ["..."] * len(scores),
        "scores": scores,
        "mean_score": score,
        "n_failed": n_failed,
    }


def picked(pairs):
    return [(p["prompt_id"], p["chosen_index"], p["rejected_index"]) for p in pairs]


# ---------------------------------------------------------------- plain max / min (rho = 0)


def test_plain_max_min():
    rows = [row("p", 0, 3.0, 50), row("p", 1, 4.5, 80), row("p", 2, 1.0, 20), row("p", 3, 2.0, 90)]
    pairs, stats = build_pairs(rows)
    assert picked(pairs) == [("p", 1, 2)]
    p = pairs[0]
    assert set(p) == set(PAIR_KEYS)
    assert p == {
        "prompt_id": "p",
        "prompt": "question p",
        "chosen": "p-r1",
        "rejected": "p-r2",
        "chosen_index": 1,
        "rejected_index": 2,
        "chosen_score": 4.5,
        "rejected_score": 1.0,
        "chosen_length": 80,
        "rejected_length": 20,
    }
    assert stats["pairs"] == 1 and stats["ties"] == 0 and stats["unscored"] == 0


def test_all_equal_scores_is_a_tie():
    rows = [row("p", i, 3.0, 10 * (i + 1)) for i in range(4)]
    pairs, stats = build_pairs(rows)
    assert pairs == []
    assert stats["ties"] == 1 and stats["pairs"] == 0


def test_float_noise_is_a_tie():
    rows = [row("p", 0, 0.1 + 0.2, 10), row("p", 1, 0.3, 20)]
    assert build_pairs(rows)[0] == []


def test_all_failed_prompt_is_unscored():
    rows = [row("p", i, None, 10, n_failed=3) for i in range(3)]
    pairs, stats = build_pairs(rows)
    assert pairs == []
    assert stats["unscored"] == 1
    assert stats["failed_judgments"] == 9 and stats["judgments"] == 9


def test_single_response_is_unscored():
    pairs, stats = build_pairs([row("p", 0, 4.0, 10)])
    assert pairs == [] and stats["unscored"] == 1


def test_one_scored_among_failed_is_unscored():
    rows = [row("p", 0, 4.0, 10), row("p", 1, None, 10, n_failed=3)]
    pairs, stats = build_pairs(rows)
    assert pairs == [] and stats["unscored"] == 1


def test_failed_responses_are_excluded():
    # Response 1 would be the "lowest" if None were read as 0; it must be ignored instead.
    rows = [row("p", 0, 4.0, 10), row("p", 1, None, 99, n_failed=3), row("p", 2, 2.0, 10)]
    assert picked(build_pairs(rows)[0]) == [("p", 0, 2)]


# ---------------------------------------------------------------- deterministic tie-breaking


def test_rho0_equal_top_scores_pick_shortest_then_lowest_index():
    rows = [
        row("p", 0, 5.0, 40),
        row("p", 1, 5.0, 30),
        row("p", 2, 5.0, 30),
        row("p", 3, 1.0, 10),
    ]
    assert picked(build_pairs(rows)[0]) == [("p", 1, 3)]


def test_rho0_equal_bottom_scores_pick_longest_then_lowest_index():
    rows = [
        row("p", 0, 5.0, 40),
        row("p", 1, 1.0, 30),
        row("p", 2, 1.0, 60),
        row("p", 3, 1.0, 60),
    ]
    assert picked(build_pairs(rows)[0]) == [("p", 0, 2)]


def test_all_equal_lengths():
    rows = [row("p", i, s, 25) for i, s in enumerate([2.0, 4.0, 4.0, 1.0, 1.0])]
    # Equal lengths: chosen = lowest index among the top, rejected = lowest among the bottom.
    assert picked(build_pairs(rows)[0]) == [("p", 1, 3)]
    # With rho the bands widen, and at equal length the higher-scored chosen /
    # lower-scored rejected is preferred.
    assert picked(build_pairs(rows, rho=0.5)[0]) == [("p", 1, 3)]


def test_output_order_is_first_seen_prompt_order():
    rows = [
        row("b", 0, 1.0, 10),
        row("a", 0, 5.0, 10),
        row("b", 1, 3.0, 10),
        row("a", 1, 2.0, 10),
    ]
    assert picked(build_pairs(rows)[0]) == [("b", 1, 0), ("a", 0, 1)]


def test_input_order_within_prompt_does_not_matter():
    rows = [row("p", 0, 5.0, 30), row("p", 1, 5.0, 30), row("p", 2, 1.0, 50), row("p", 3, 1.0, 50)]
    assert picked(build_pairs(rows)[0]) == picked(build_pairs(rows[::-1])[0]) == [("p", 0, 2)]


# ---------------------------------------------------------------- length control (rho)

# Scores 1..5, S_max=5, S_min=1.
#   rho=0.25: high band >= 0.75*5 + 0.25*1 = 4.0 ; low band <= 0.75*1 + 0.25*5 = 2.0
#   rho=0.5 : high band >= 3.0 ; low band <= 3.0 (overlap at 3.0)
LC_ROWS = [
    row("p", 0, 5.0, 100),
    row("p", 1, 4.0, 60),
    row("p", 2, 3.0, 10),
    row("p", 3, 2.0, 200),
    row("p", 4, 1.0, 50),
]


def test_rho_zero_is_plain_max_min_even_with_lengths():
    assert picked(build_pairs(LC_ROWS, rho=0.0)[0]) == [("p", 0, 4)]


def test_rho_quarter_prefers_short_chosen_long_rejected():
    pairs, stats = build_pairs(LC_ROWS, rho=0.25)
    assert picked(pairs) == [("p", 1, 3)]
    assert pairs[0]["chosen_score"] == 4.0 and pairs[0]["rejected_score"] == 2.0
    assert stats["chosen_mean_length"] == 60 and stats["rejected_mean_length"] == 200
    assert stats["rho"] == 0.25


def test_band_edges_are_inclusive():
    # S=[4.0, 1.0], rho=1/3 -> hi = 3.0, lo = 2.0 (up to float rounding): both edges are in.
    rows = [row("p", 0, 4.0, 90), row("p", 1, 3.0, 10), row("p", 2, 2.0, 95), row("p", 3, 1.0, 5)]
    assert picked(build_pairs(rows, rho=1 / 3)[0]) == [("p", 1, 2)]


def test_rho_half_overlapping_bands():
    # rho=0.5, S=[5, 1]: both bands meet at 3.0, so the 3.0 response is in both.
    rows = [row("p", 0, 5.0, 100), row("p", 1, 3.0, 5), row("p", 2, 1.0, 50)]
    # Shortest of the high band {0, 1} is 1; longest of the low band {1, 2} is 2: valid pair.
    assert picked(build_pairs(rows, rho=0.5)[0]) == [("p", 1, 2)]
    # Equal lengths: the higher score is chosen, the lower rejected.
    rows = [row("p", 0, 5.0, 10), row("p", 1, 1.0, 10), row("p", 2, 3.0, 10)]
    assert picked(build_pairs(rows, rho=0.5)[0]) == [("p", 0, 1)]


def test_response_both_shortest_high_and_longest_low_is_a_tie():
    # rho=0.5: high band {0 (len 100), 1 (len 60)} -> shortest = 1;
    #          low band  {1 (len 60), 2 (len 50)}  -> longest  = 1. Same response: dropped.
    rows = [row("p", 0, 5.0, 100), row("p", 1, 3.0, 60), row("p", 2, 1.0, 50)]
    pairs, stats = build_pairs(rows, rho=0.5)
    assert pairs == [] and stats["ties"] == 1
    # rho=0.9: bands [1.4, 5] and [1, 4.6]; response 2 (3.0) is the shortest of
    # {0 (50), 2 (45)} and the longest of {1 (40), 2 (45)}.
    rows = [row("p", 0, 5.0, 50), row("p", 1, 1.0, 40), row("p", 2, 3.0, 45)]
    pairs, stats = build_pairs(rows, rho=0.9)
    assert pairs == [] and stats["ties"] == 1


def test_chosen_not_above_rejected_is_a_tie():
    # rho=0.9, S=[5, 1]: high band >= 1.4, low band <= 4.6.
    # chosen = shortest in high = response 1 (2.0, len 5); rejected = longest in low =
    # response 2 (4.0, len 500): chosen scores below rejected -> dropped.
    rows = [
        row("p", 0, 5.0, 100),
        row("p", 1, 2.0, 5),
        row("p", 2, 4.0, 500),
        row("p", 3, 1.0, 50),
    ]
    pairs, stats = build_pairs(rows, rho=0.9)
    assert pairs == [] and stats["ties"] == 1


def test_rho_just_below_one():
    # rho=0.999: high band excludes only S_min, low band excludes only S_max.
    # Response 0 (S_max) is the longest overall and 3 (S_min) the shortest, yet neither can
    # take the opposite role.
    rows = [
        row("p", 0, 5.0, 1000),
        row("p", 1, 4.0, 20),
        row("p", 2, 2.0, 300),
        row("p", 3, 1.0, 10),
    ]
    assert picked(build_pairs(rows, rho=0.999)[0]) == [("p", 1, 2)]
    # Two responses only: the bands never include the other extreme, so plain max/min.
    two = [row("q", 0, 5.0, 900), row("q", 1, 1.0, 1)]
    assert picked(build_pairs(two, rho=0.999)[0]) == [("q", 0, 1)]


@pytest.mark.parametrize("rho", [-0.1, 1.0, 1.5, math.nan])
def test_invalid_rho_rejected(rho):
    with pytest.raises(ValueError, match="rho"):
        build_pairs(LC_ROWS, rho=rho)
    with pytest.raises(ValueError, match="rho"):
        select_pair(LC_ROWS, rho=rho)


# ---------------------------------------------------------------- stats


def test_stats_counts():
    rows = [
        # p1: pair (chosen len 10, rejected len 30); one failed judgment
        row("p1", 0, 4.0, 10, scores=[4.0, 4.0, None], n_failed=1),
        row("p1", 1, 2.0, 30),
        # p2: tie
        row("p2", 0, 3.0, 10),
        row("p2", 1, 3.0, 20),
        # p3: all failed
        row("p3", 0, None, 10, n_failed=3),
        row("p3", 1, None, 10, n_failed=3),
        # p4: pair (chosen len 20, rejected len 50); two judgments per response
        row("p4", 0, 1.0, 50, scores=[1.0, 1.0]),
        row("p4", 1, 5.0, 20, scores=[5.0, 5.0]),
        # p5: single response
        row("p5", 0, 5.0, 10),
    ]
    pairs, stats = build_pairs(rows)
    assert picked(pairs) == [("p1", 0, 1), ("p4", 1, 0)]
    assert stats == {
        "prompts": 5,
        "pairs": 2,
        "ties": 1,
        "unscored": 2,
        "judgments": 3 + 3 + 3 + 3 + 3 + 3 + 2 + 2 + 3,
        "failed_judgments": 7,
        "chosen_mean_length": 15.0,
        "rejected_mean_length": 40.0,
        "rho": 0.0,
    }


def test_empty_input():
    pairs, stats = build_pairs([])
    assert pairs == []
    assert stats["prompts"] == 0 and stats["judgments"] == 0
    assert stats["chosen_mean_length"] is None and stats["rejected_mean_length"] is None


def test_prompts_partition():
    pairs, stats = build_pairs(LC_ROWS + [row("t", 0, 2.0, 1), row("t", 1, 2.0, 2)])
    assert stats["pairs"] + stats["ties"] + stats["unscored"] == stats["prompts"] == 2


# ---------------------------------------------------------------- tie_rate


def test_tie_rate_integer_vs_expected():
    rows = [
        # p1: integer top two tie (4, 4); expected values separate them
        {**row("p1", 0, 4.0, 10), "int_score": 4, "exp_score": 3.7},
        {**row("p1", 1, 4.0, 10), "int_score": 4, "exp_score": 3.9},
        {**row("p1", 2, 2.0, 10), "int_score": 2, "exp_score": 2.2},
        # p2: no tie at the top in either (tie at the bottom does not count)
        {**row("p2", 0, 5.0, 10), "int_score": 5, "exp_score": 4.6},
        {**row("p2", 1, 1.0, 10), "int_score": 1, "exp_score": 1.2},
        {**row("p2", 2, 1.0, 10), "int_score": 1, "exp_score": 1.1},
        # p3: only one scored response -> not counted
        {**row("p3", 0, 5.0, 10), "int_score": 5, "exp_score": 4.0},
        {**row("p3", 1, None, 10), "int_score": None, "exp_score": None},
    ]
    assert tie_rate(rows, "int_score") == 0.5
    assert tie_rate(rows, "exp_score") == 0.0
    assert tie_rate(rows) == 0.5  # mean_score: p1 ties at 4.0


def test_tie_rate_none_when_nothing_eligible():
    assert tie_rate([]) is None
    assert tie_rate([row("p", 0, 3.0, 1), row("p", 1, None, 1)]) is None
