"""Head-to-head comparison (alignment.head_to_head): verdicts of both orders, the summary, and the
judge loop on a scripted generator. Expected values are computed by hand in the comments."""

import math

import pytest

from alignment.evaluation import bootstrap_ci
from alignment.generation import Completion
from alignment.head_to_head import (
    PairwiseSettings,
    compare,
    letter_probs,
    outcome_label,
    pair_outcome,
    pairwise_prompt,
    summarize,
    verdict_from_probs,
)


# ------------------------------------------------------------------------------ verdicts
@pytest.mark.parametrize("first, second, outcome, label", [
    ("A", "B", 1.0, "win"),    # candidate chosen as A and as B
    ("B", "A", 0.0, "loss"),   # baseline chosen in both orders
    ("A", "A", 0.5, "tie"),    # the judge named the first position twice: inconsistent
    ("B", "B", 0.5, "tie"),
    (None, "B", None, "failed"),
    ("A", None, None, "failed"),
])
def test_pair_outcome_of_both_orders(first, second, outcome, label):
    assert pair_outcome(first, second) == outcome
    assert outcome_label(outcome) == label


def test_verdict_from_probabilities():
    assert letter_probs({" A": 0.25, "A": 0.05, " B": 0.5, "X": 0.2}) == (0.30, 0.5)
    assert verdict_from_probs(0.3, 0.5) == "B" and verdict_from_probs(0.6, 0.1) == "A"
    assert verdict_from_probs(0.3, 0.3) is None          # no preference
    assert verdict_from_probs(0.0, 0.0) is None          # no mass
    assert verdict_from_probs(0.05, 0.02, min_mass=0.1) is None  # 0.07 < 0.1: not about to name one
    assert verdict_from_probs(0.08, 0.02, min_mass=0.1) == "A"   # 0.10 >= 0.1


def test_pairwise_prompt_shows_both_answers_in_order():
    text = pairwise_prompt("What is 2+2?", "four", "five")
    assert text.index("<response_a>four</response_a>") < text.index("<response_b>five</response_b>")
    assert "What is 2+2?" in text and text.rstrip().endswith('"Winner: X", where X is A or B.')


# ------------------------------------------------------------------------------ summary
def test_summary_counts_rates_and_interval():
    # outcomes 1, 1, ½, 0 and one failed: win rate (2 + ½) / 4 = 0.625; the failed one counts apart.
    outcomes = [1.0, 1.0, 0.5, 0.0, None]
    s = summarize(outcomes, [12, 10, 10, 10, 30], [10, 10, 10, 10, 10], seed=3, resamples=500)
    assert (s["prompts"], s["wins"], s["ties"], s["losses"], s["failed"]) == (5, 2, 1, 1, 1)
    assert s["win_rate"] == 0.625
    assert s["win_rate_ci"] == bootstrap_ci([1.0, 1.0, 0.5, 0.0], resamples=500, seed=3)  # the same seeded draws
    lo, hi = s["win_rate_ci"]
    assert 0 <= lo <= 0.625 <= hi <= 1
    assert s["mean_length_candidate"] == 72 / 5 and s["mean_length_baseline"] == 10  # failed prompts included
    assert summarize(outcomes, [1] * 5, [1] * 5, seed=3, resamples=500)["win_rate_ci"] == s["win_rate_ci"]


def test_lc_win_rate_without_length_differences_is_the_penalised_win_rate():
    # d_i all 0 → x_i = 0: maximise Σ[y log σ(a) + (1 − y) log(1 − σ(a))] − ½·1e-3·a², i.e.
    # 4·(0.625 − σ(a)) = 1e-3·a, so σ(a) ≈ 0.625 − 1e-3·logit(0.625)/4 = 0.625 − 1e-3·ln(5/3)/4.
    s = summarize([1.0, 1.0, 0.5, 0.0], [10] * 4, [10] * 4)
    assert s["lc_win_rate"] == pytest.approx(0.625 - 1e-3 * math.log(5 / 3) / 4, abs=1e-6)


def test_lc_win_rate_removes_a_preference_for_length():
    # Longer by 10 tokens in 4 prompts: 3 wins, 1 loss; equal length in 2: 1 win, 1 loss.
    # Raw win rate 4/6; at zero length difference (x = 0) the fit gives σ(a) = 1/2 (the
    # equal-length group fixes a = logit(1/2) = 0 up to the tiny L2 term).
    s = summarize([1.0, 1.0, 1.0, 0.0, 1.0, 0.0], [20, 20, 20, 20, 10, 10], [10] * 6)
    assert s["win_rate"] == pytest.approx(4 / 6)
    assert s["lc_win_rate"] == pytest.approx(0.5, abs=1e-3)


def test_summary_of_nothing():
    s = summarize([], [], [])
    assert (s["prompts"], s["win_rate"], s["win_rate_ci"], s["lc_win_rate"]) == (0, None, None, None)
    assert summarize([None], [3], [4])["failed"] == 1


# ------------------------------------------------------------------------------ the judge loop
class ScriptedJudge:
    """A generator whose judgment is ``rule(answer_a, answer_b)`` and whose logprob reading
    prefers the letter that judgment named."""

    def __init__(self, rule):
        self.rule, self.calls, self.seeds = rule, 0, []

    def chat(self, convs, sampling, *, adapter=None, seed=0, continue_final=False):
        self.calls += len(convs)
        self.seeds += list(seed)
        out = []
        for conv in convs:
            text = conv[0]["content"]
            a = text.split("<response_a>")[1].split("</response_a>")[0]
            b = text.split("<response_b>")[1].split("</response_b>")[0]
            out.append([Completion(text=self.rule(a, b), n_tokens=5)])
        return out

    def next_token_probs(self, convs, candidates, *, adapter=None):
        named = [c[-1]["content"].split("Winner:")[-2].strip()[-1:] for c in convs]  # the letter named before
        return [{" A": 0.7, " B": 0.2} if n == "A" else {" A": 0.1, "B": 0.3} if n == "B" else {} for n in named]


ITEMS = [{"prompt_id": "p1", "prompt": "q1", "candidate": "good answer", "baseline": "bad"},
         {"prompt_id": "p2", "prompt": "q2", "candidate": "bad", "baseline": "good one"},
         {"prompt_id": "p3", "prompt": "q3", "candidate": "same  text", "baseline": "same text"}]


def test_compare_asks_both_orders_and_skips_identical_answers():
    judge = ScriptedJudge(lambda a, b: "Reasoning.\nWinner: A" if "good" in a else "Winner: B")
    rows = compare(judge, ITEMS, PairwiseSettings(), seed=7)
    assert judge.calls == 4  # two orders of p1 and p2; p3's answers are equal up to whitespace
    assert [r["outcome"] for r in rows] == [1.0, 0.0, 0.5]
    assert (rows[0]["verdict_candidate_first"], rows[0]["verdict_baseline_first"]) == ("A", "B")
    assert rows[2]["identical"] and rows[2]["verdict_candidate_first"] is None
    assert rows[0]["judgment_candidate_first"].endswith("Winner: A")
    again = ScriptedJudge(judge.rule)
    compare(again, list(reversed(ITEMS)), PairwiseSettings(), seed=7)
    assert sorted(again.seeds) == sorted(judge.seeds)  # a request's seed is (seed, prompt, order), not its place


def test_compare_position_bias_is_a_tie_and_no_verdict_fails():
    assert [r["outcome"] for r in compare(ScriptedJudge(lambda a, b: "Winner: A"), ITEMS[:2], PairwiseSettings())] \
        == [0.5, 0.5]
    failed = compare(ScriptedJudge(lambda a, b: "I cannot decide. Winner: X"), ITEMS[:2], PairwiseSettings())
    assert [r["outcome"] for r in failed] == [None, None]


def test_compare_logprob_mode_reads_the_letter_probabilities():
    judge = ScriptedJudge(lambda a, b: "Thinking Winner: A" if "good" in a else "Thinking Winner: B")
    rows = compare(judge, ITEMS[:2], PairwiseSettings(mode="logprob"))
    assert [r["outcome"] for r in rows] == [1.0, 0.0]
    assert rows[0]["judgment_candidate_first"].endswith("\nWinner: A")
    # p(A) + p(B) = 0.4 for a "B" reading: below a 0.5 floor that verdict fails, and with it the pair.
    strict = compare(judge, ITEMS[:2], PairwiseSettings(mode="logprob", min_verdict_mass=0.5))
    assert [r["outcome"] for r in strict] == [None, None]


def test_score_gains_are_paired_and_skip_unscored_prompts():
    from alignment.head_to_head import score_gain_summary, score_gains

    before, after = [2.0, 3.0, None, 4.0, 1.0], [2.5, 3.0, 5.0, None, 2.0]
    assert score_gains(before, after) == [0.5, 0.0, 1.0]  # prompts 3 and 4 lack a side
    s = score_gain_summary(before, after, seed=0, resamples=500)
    assert s["score_gain"] == pytest.approx(0.5)
    assert s == score_gain_summary(before, after, seed=0, resamples=500)  # seeded
    low, high = s["score_gain_ci"]
    assert 0.0 <= low <= 0.5 <= high <= 1.0  # resampled means of {0.5, 0, 1} stay within [0, 1]
    assert score_gain_summary([1.0], [2.0]) == {"score_gain": 1.0, "score_gain_ci": None}
    assert score_gain_summary([None], [2.0]) == {"score_gain": None, "score_gain_ci": None}
