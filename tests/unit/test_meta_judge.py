"""Meta-Rewarding math against hand-computed numbers, and the meta-judge template/parser."""

from __future__ import annotations

import math

import pytest

from alignment import prompts
from alignment.meta_judge import (
    DEFAULT_PRIOR,
    battle_plan,
    battle_scores,
    fit_bradley_terry,
    judge_pair,
    make_battle,
    parse_verdict,
    pick_meta_response,
    position_weights,
    rate_judgments,
    valid_judgment_indices,
)


def B(a, b, verdict):
    return {"a": a, "b": b, "verdict": verdict, "text": f"Winner: Judgment {verdict}"}


# ---------------------------------------------------------------- parse_verdict


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Judgment A is better.\nWinner: Judgment A", "A"),
        ("Winner: Judgment B", "B"),
        ("**Winner: Judgment A**", "A"),
        ("Winner: **Judgment B**", "B"),
        ("Winner: A", "A"),
        ("winner: judgment b.", "B"),
        ("WINNER: JUDGEMENT A", "A"),  # the paper's spelling
        ("Winner: Judgment A (it follows the rubric)", "A"),
        ('Winner: "Judgment B"', "B"),
        ("Winner: [Judgment A]", "A"),
        ("Winner: Judgment A and a clear one at that", "A"),
        ("Winner: Judgment B, because A misreads the rubric", "B"),
        ("Winner:Judgment B", "B"),
        ("  Winner :  Judgment A  ", "A"),
        # a verdict drafted earlier is superseded by the last one
        ("At first: Winner: Judgment A.\nOn reflection...\nWinner: Judgment B", "B"),
        ("Winner: Judgment A. No wait -- Winner: Judgment B", "B"),
        ('Judgment B says "Winner: Judgment A" is wrong.\nWinner: Judgment B', "B"),
        # invalid
        ("", None),
        ("Judgment A is better.", None),
        ("Winner: Judgment C", None),
        ('Winner: Judgment X", where X is A or B', None),  # the format line echoed back
        ("Winner: both", None),
        ("Winner: neither", None),
        ("Winner: Answer A", None),
        ("Winner:", None),
        ("Winner: [Judgement A | Judgement B]", None),  # the format line echoed back
        ("Winner: Judgment A or Judgment B", None),
        ("Winner: A/B", None),
        ("Winner: A or B.", None),
        ("Winner: Judgment A, B", None),
        # the last Winner: line is invalid -> None, no fall back to the earlier valid one
        ("Winner: Judgment A\nWinner: tie", None),
        ("Winner: Judgment B\nThe winner: is unclear", None),
    ],
)
def test_parse_verdict(text, expected):
    assert parse_verdict(text) == expected


def test_make_battle():
    assert make_battle(2, 5, "blah\nWinner: Judgment B") == {
        "a": 2,
        "b": 5,
        "verdict": "B",
        "text": "blah\nWinner: Judgment B",
    }
    assert make_battle(0, 1, "no idea")["verdict"] is None


# ---------------------------------------------------------------- template


def test_meta_judge_template_renders_all_variables():
    assert prompts.declared_variables("meta_judge") == {
        "question",
        "response",
        "rubric",
        "judgment_a",
        "judgment_b",
    }
    text = prompts.render(
        "meta_judge",
        question="QQQ",
        response="RRR",
        rubric="Add 1 point if ...",
        judgment_a="JA Score: 4",
        judgment_b="JB Score: 2",
    )
    for part in ("QQQ", "RRR", "Add 1 point if ...", "JA Score: 4", "JB Score: 2"):
        assert part in text
    assert text.index("JA Score: 4") < text.index("JB Score: 2")
    assert "Winner: Judgment A" in text and "Winner: Judgment B" in text
    assert not text.startswith("{#")


def test_meta_judge_template_missing_variable_fails():
    with pytest.raises(prompts.TemplateError):
        prompts.render("meta_judge", question="q", response="r", rubric="x", judgment_a="a")


# ---------------------------------------------------------------- pick_meta_response


def resp(idx, scores):
    judgments = ["j"] * len(scores)
    return {"prompt_id": "p", "response_index": idx, "scores": scores, "judgments": judgments}


def test_pick_meta_response_highest_variance():
    rows = [
        resp(0, [3.0, 3.0, 3.0]),  # var 0
        resp(1, [1.0, 5.0, 3.0]),  # var 8/3
        resp(2, [2.0, 4.0, 3.0]),  # var 2/3
    ]
    assert pick_meta_response(rows)["response_index"] == 1


def test_pick_meta_response_ignores_none_and_uses_population_variance():
    rows = [
        resp(0, [1.0, None, 5.0]),  # [1, 5] -> pvariance 4 (sample variance would be 8)
        resp(1, [0.0, 3.0, 3.0, 6.0]),  # pvariance (9+0+0+9)/4 = 4.5
    ]
    assert pick_meta_response(rows)["response_index"] == 1
    rows[1]["scores"] = [0.0, 2.0, 2.0, 4.0]  # pvariance 2 < 4
    assert pick_meta_response(rows)["response_index"] == 0


def test_pick_meta_response_tie_goes_to_lowest_index():
    rows = [resp(3, [1.0, 2.0]), resp(1, [4.0, 5.0]), resp(2, [0.0, 0.0])]
    assert pick_meta_response(rows)["response_index"] == 1


def test_pick_meta_response_none_when_all_agree():
    assert pick_meta_response([resp(0, [3.0, 3.0]), resp(1, [2.0, 2.0, None])]) is None
    assert pick_meta_response([resp(0, [1.0, None, None]), resp(1, [None, None])]) is None
    assert pick_meta_response([]) is None


def test_valid_judgment_indices():
    assert valid_judgment_indices(resp(0, [1.0, None, 3.0, None])) == [0, 2]


# ---------------------------------------------------------------- battle_plan


def test_battle_plan():
    assert battle_plan([0, 2, 5]) == [(0, 2), (2, 0), (0, 5), (5, 0), (2, 5), (5, 2)]
    assert battle_plan([7]) == [] and battle_plan([]) == []
    assert len(battle_plan(list(range(11)))) == 110


def test_battle_plan_rejects_duplicates():
    with pytest.raises(ValueError):
        battle_plan([1, 1])


# ---------------------------------------------------------------- position weights / matrix


def test_position_weights():
    # 3 wins as A, 1 win as B, 1 failed: omega1 = 1/4, omega2 = 3/4
    battles = [B(0, 1, "A"), B(1, 0, "A"), B(0, 2, "A"), B(2, 1, "B"), B(1, 2, None)]
    assert position_weights(battles) == (0.25, 0.75)
    assert position_weights([B(0, 1, "A"), B(1, 0, "B")]) == (0.5, 0.5)


def test_position_weights_degenerate():
    assert position_weights([]) == (0.5, 0.5)
    assert position_weights([B(0, 1, None)]) == (0.5, 0.5)
    # position B never wins: a win as A carries weight 0
    assert position_weights([B(0, 1, "A"), B(1, 0, "A")]) == (0.0, 1.0)


def test_battle_scores_matrix():
    battles = [B(0, 1, "A"), B(1, 0, "A"), B(0, 2, "A"), B(2, 1, "B"), B(1, 2, None)]
    m = battle_scores(battles, 3)
    assert m == [
        [0.0, 0.25, 0.25],  # 0 beat 1 as A, 0 beat 2 as A
        [0.25, 0.0, 0.75],  # 1 beat 0 as A, 1 beat 2 as B
        [0.0, 0.0, 0.0],
    ]
    # explicit (pooled) weights override the per-prompt ones
    assert battle_scores(battles, 3, weights=(1.0, 1.0))[1] == [1.0, 0.0, 1.0]


def test_battle_scores_rejects_bad_indices():
    with pytest.raises(ValueError):
        battle_scores([B(0, 3, "A")], 3)
    with pytest.raises(ValueError):
        battle_scores([B(1, 1, "A")], 3)


# ---------------------------------------------------------------- Bradley-Terry


def test_bt_two_item_closed_form():
    # p0/p1 = (2 + 0.5) / (1 + 0.5); ratings symmetric around 1000.
    r0, r1 = fit_bradley_terry(2, [[0.0, 2.0], [1.0, 0.0]], prior=0.5)
    diff = 400 * math.log10(2.5 / 1.5)
    assert r0 - r1 == pytest.approx(diff, abs=1e-6)
    assert r0 + r1 == pytest.approx(2000.0, abs=1e-6)
    assert r0 == pytest.approx(1000 + diff / 2, abs=1e-6)


def test_bt_undefeated_is_finite():
    # 2 wins, 0 losses, prior 0.1: p0/p1 = 2.1/0.1 = 21
    r0, r1 = fit_bradley_terry(2, [[0.0, 2.0], [0.0, 0.0]])
    assert r0 - r1 == pytest.approx(400 * math.log10(21), abs=1e-6)


def test_bt_no_games_all_equal():
    assert fit_bradley_terry(3, [[0.0] * 3 for _ in range(3)]) == [1000.0] * 3
    assert fit_bradley_terry(1, [[0.0]]) == [1000.0]
    assert fit_bradley_terry(0, []) == []


def test_bt_three_item_likelihood_is_stationary():
    # Check the MM fixed point against the likelihood equations:
    # for each i, sum_j W'ij = sum_j (W'ij + W'ji) * p_i / (p_i + p_j).
    w = [[0.0, 2.0, 1.0], [1.0, 0.0, 0.5], [0.0, 1.5, 0.0]]
    prior = 0.1
    r = fit_bradley_terry(3, w, prior=prior)
    p = [10 ** ((x - 1000) / 400) for x in r]
    assert math.prod(p) == pytest.approx(1.0)
    for i in range(3):
        won = sum(w[i][j] + prior for j in range(3) if j != i)
        expected = sum(
            (w[i][j] + w[j][i] + 2 * prior) * p[i] / (p[i] + p[j]) for j in range(3) if j != i
        )
        assert won == pytest.approx(expected, rel=1e-8)


def test_bt_validation():
    with pytest.raises(ValueError, match="prior"):
        fit_bradley_terry(2, [[0, 1], [0, 0]], prior=0.0)
    with pytest.raises(ValueError):
        fit_bradley_terry(2, [[0, 1]])
    with pytest.raises(ValueError):
        fit_bradley_terry(2, [[0, -1], [0, 0]])


# ---------------------------------------------------------------- rate_judgments (requirements)


def test_judgment_winning_every_battle_ranks_first():
    plan = battle_plan([0, 1, 2])
    # 0 wins all its battles (as A and as B); 1 and 2 split theirs.
    verdicts = {(0, 1): "A", (1, 0): "B", (0, 2): "A", (2, 0): "B", (1, 2): "A", (2, 1): "A"}
    ratings = rate_judgments([B(a, b, verdicts[a, b]) for a, b in plan], 3)
    assert ratings[0] > ratings[1] and ratings[0] > ratings[2]
    assert ratings[1] == pytest.approx(ratings[2], abs=1e-6)
    assert sum(ratings) == pytest.approx(3000.0)


def test_favoured_position_win_counts_less():
    # wins as A: (0,2) 0 wins, (0,1) 0 wins, (1,0) 1 wins -> 3 ; wins as B: (2,1) 1 wins -> 1
    # omega1 = 1/4 (win as A), omega2 = 3/4 (win as B).
    # 0 and 1 split their pair (both as A). Against 2, 0 won once as A (favoured, 0.25) and 1
    # won once as B (unfavoured, 0.75); the other orders failed. Unweighted, 0 and 1 would be
    # symmetric; weighted, 1 must rate above 0.
    battles = [
        B(0, 1, "A"), B(1, 0, "A"), B(0, 2, "A"), B(2, 0, None), B(1, 2, None), B(2, 1, "B")
    ]
    r = rate_judgments(battles, 3)
    assert r[1] > r[0] > r[2]
    # Same numbers from the matrix directly.
    w = [[0.0, 0.25, 0.25], [0.25, 0.0, 0.75], [0.0, 0.0, 0.0]]
    assert r == pytest.approx(fit_bradley_terry(3, w))
    # With equal weights 0 and 1 would tie.
    r_eq = rate_judgments(battles, 3, weights=(0.5, 0.5))
    assert r_eq[0] == pytest.approx(r_eq[1], abs=1e-6)


def test_symmetric_tie_gives_equal_ratings():
    # each wins once against the other, both times in the same position
    for verdict in ("A", "B"):
        r = rate_judgments([B(0, 1, verdict), B(1, 0, verdict)], 2)
        assert r[0] == pytest.approx(r[1], abs=1e-9)
    # with a position-balanced background (so the weights are not degenerate)
    battles = [
        B(0, 1, "A"), B(1, 0, "A"), B(0, 2, "A"), B(2, 0, "B"), B(1, 2, "A"), B(2, 1, "B")
    ]
    # wins as A = 4, as B = 2 -> omega1 = 1/3, omega2 = 2/3; W01 = W10 = 1/3, W02 = W12 = 1
    r = rate_judgments(battles, 3)
    assert r[0] == pytest.approx(r[1], abs=1e-6)
    assert r[0] > r[2]


def test_always_first_position_gives_no_information():
    # The meta-judge always says "A": every win is position-favoured, weight 0 -> all equal.
    plan = battle_plan([0, 1, 2])
    r = rate_judgments([B(a, b, "A") for a, b in plan], 3)
    assert r == pytest.approx([1000.0] * 3)


def test_rate_judgments_bystanders_get_none():
    # judgment 1 failed (never battled); judgment 3's only battles failed
    battles = [B(0, 2, "A"), B(2, 0, "B"), B(0, 3, None), B(3, 0, None)]
    r = rate_judgments(battles, 4)
    assert r[1] is None and r[3] is None
    # two players only: 0 won both (once as A, once as B; omega = 1/2 each) -> 1 vs 0 wins
    assert r[0] - r[2] == pytest.approx(400 * math.log10(1.1 / 0.1), abs=1e-6)


def test_rate_judgments_no_valid_battles():
    assert rate_judgments([B(0, 1, None)], 2) == [None, None]
    assert rate_judgments([], 0) == []


# ---------------------------------------------------------------- judge_pair


def test_judge_pair_highest_vs_lowest():
    pair = judge_pair([1010.0, 1200.0, 900.0], ["j0", "j1", "j2"], [10, 20, 30])
    assert pair == {
        "chosen_index": 1,
        "rejected_index": 2,
        "chosen": "j1",
        "rejected": "j2",
        "chosen_rating": 1200.0,
        "rejected_rating": 900.0,
    }


def test_judge_pair_length_cap():
    ratings, judgments = [1010.0, 1200.0, 900.0], ["j0", "j1", "j2"]
    pair = judge_pair(ratings, judgments, [10, 20, 30], length_cap=20)  # 2 dropped; cap inclusive
    assert (pair["chosen_index"], pair["rejected_index"]) == (1, 0)
    assert judge_pair(ratings, judgments, [10, 25, 30], length_cap=20) is None  # one eligible


def test_judge_pair_none_cases():
    assert judge_pair([1000.0, 1000.0], ["a", "b"], [1, 1]) is None  # equal ratings
    assert judge_pair([1100.0, None, None], ["a", "b", "c"], [1, 1, 1]) is None
    assert judge_pair([], [], []) is None


def test_judge_pair_ties_go_to_lowest_index():
    pair = judge_pair([900.0, 1100.0, 1100.0, 900.0], list("abcd"), [1] * 4)
    assert (pair["chosen_index"], pair["rejected_index"]) == (1, 0)


# ------------------------------------------------ judge pairs: battles -> Elo table -> pairs


def test_judge_pairs_from_battles_through_the_elo_table():
    """The production path (meta_rewarding.rate_items, then build_judge_pair_rows), on hand-made
    battles: the best-rated judgment is chosen, the worst rejected, a failed battle is no evidence,
    equal ratings give no pair, a length cap promotes the next-worst."""
    from alignment.meta_rewarding import battle_stats, build_judge_pair_rows, rate_items

    plan = battle_plan([0, 1, 2])
    verdicts = {(0, 1): "A", (1, 0): "B", (0, 2): "A", (2, 0): "B", (1, 2): "A", (2, 1): None}
    items = [
        {"prompt_id": "p1", "prompt": "Q1", "response_index": 0, "response": "R1",
         "judgments": ["good judgment", "meh judgment", "bad judgment", "failed"], "scores": [4.0, 2.0, 1.0, None]},
        {"prompt_id": "p3", "prompt": "Q3", "response_index": 1, "response": "R3",  # each wins once as A: equal
         "judgments": ["x", "y"], "scores": [3.0, 5.0]},
    ]
    battles = ([B(a, b, verdicts[a, b]) | {"prompt_id": "p1", "mode": "free"} for a, b in plan]
               + [B(0, 1, "A") | {"prompt_id": "p3", "mode": "free"}, B(1, 0, "A") | {"prompt_id": "p3", "mode": "free"}])
    lengths = {("p1", 0): [30, 40, 50, 5], ("p3", 1): [1, 1]}

    def pairs(length_cap):
        elo = rate_items(items, battles, lengths, prior=DEFAULT_PRIOR, pooled=False, length_cap=length_cap)
        return build_judge_pair_rows(items, elo, length_cap)

    rows, stats = pairs(None)
    assert len(rows) == 1
    row = rows[0]
    assert row["prompt_id"] == "p1" and row["prompt"] == prompts.render("judge", question="Q1", response="R1")
    assert row["chosen"] == "good judgment" and row["chosen_score"] == 4.0
    # 1 and 2: 1 beat 2 as A (omega1); 2's only win would have been the failed battle.
    assert row["rejected"] == "bad judgment" and row["rejected_score"] == 1.0
    assert row["chosen_rating"] > 1000.0 > row["rejected_rating"]
    assert (stats["meta_prompts"], stats["judge_pairs"], stats["no_pair"]) == (2, 1, 1)
    assert {k: battle_stats(battles)[k] for k in ("battles", "failed_battles", "wins_a", "wins_b")} == {
        "battles": 8, "failed_battles": 1, "wins_a": 5, "wins_b": 2}

    # a length cap that drops the worst judgment (length 50) promotes the next-worst
    rows, _ = pairs(45)
    assert rows[0]["chosen"] == "good judgment" and rows[0]["rejected"] == "meh judgment"
