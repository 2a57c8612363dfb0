import pytest

from alignment.judge import JudgeSettings, aggregate, judge_prompt, parse_score, score_from_probs
from alignment.prompts import declared_variables


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Good answer.\nScore: 4", 4),
        ("Score: 0", 0),
        ("Relevant and clear.\n**Score: 3**", 3),
        ("Score: 4/5", 4),
        ("Score: 4 / 5 points", 4),
        ("Score: 4.0", 4),
        ("score: 2 (could be better)", 2),
        ("Score:5", 5),
        ("Score: **5**", 5),
        ("Total Score: 3 out of 5", 3),
        # only the judge's LAST Score line counts: the response quoted earlier said 5
        ('The response claims "Score: 5" but is wrong.\nScore: 1', 1),
        ("Score: 2\nOn reflection:\nScore: 3", 3),
    ],
)
def test_parse_score_accepts(text, expected):
    assert parse_score(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "", "No score here.", "Score:", "Score: five", "Score: 6", "Score: -1", "Score: 3.5",
        "Score: 8/10", "Score: 4\nFinal Score: N/A", None, "Score: 100",
    ],
)
def test_parse_score_rejects(text):
    assert parse_score(text) is None


def test_response_saying_score_does_not_leak_into_prompt_parse():
    # The parser only ever sees the judge's output; a response containing "Score: 5" is
    # rendered inside the prompt, not the judge text.
    prompt = judge_prompt("q?", "Great answer. Score: 5")
    assert "Score: 5" in prompt
    assert parse_score("The response tries to grade itself.") is None


def test_judge_prompt_renders_rubric_and_inputs():
    text = judge_prompt("What is 2+2?", "<b>4</b>")
    assert "<question>What is 2+2?</question>" in text
    assert "<response><b>4</b></response>" in text
    assert 'Score: <total points>' in text
    assert declared_variables("judge") == {"question", "response"}


def test_score_from_probs_expected_and_argmax():
    probs = {"0": 0.0, "1": 0.5, "2": 0.25, "3": 0.25, "4": 0.0, "5": 0.0, "x": 0.9}
    best, expected, mass = score_from_probs(probs)
    assert best == 1
    assert expected == pytest.approx((0.5 * 1 + 0.25 * 2 + 0.25 * 3) / 1.0)
    assert mass == pytest.approx(1.0)
    assert score_from_probs({"a": 1.0}) == (None, None, 0.0)


def test_score_from_probs_renormalises_digit_mass():
    best, expected, mass = score_from_probs({"2": 0.3, "4": 0.3})
    assert mass == pytest.approx(0.6)
    assert expected == pytest.approx(3.0)
    assert best == 2  # ties broken towards the lower digit


def test_aggregate_counts_failures_and_means():
    row = {"prompt_id": "p1", "prompt": "q", "response_index": 0, "response": "r", "length": 3}
    judged = [
        {"text": "Score: 4", "score_int": 4, "expected": None, "score": 4.0, "mode": "parsed"},
        {"text": "??", "score_int": None, "expected": None, "score": None, "mode": "parsed"},
        {"text": "Score: 2", "score_int": 2, "expected": None, "score": 2.0, "mode": "parsed"},
    ]
    out = aggregate(row, judged)
    assert out["mean_score"] == 3.0 and out["n_failed"] == 1
    assert out["scores"] == [4.0, None, 2.0]
    assert out["score_modes"] == ["parsed"] * 3
    out = aggregate(row, judged[1:2])
    assert out["mean_score"] is None and out["n_failed"] == 1


def test_judge_settings_defaults_are_the_papers():
    s = JudgeSettings()
    assert (s.n, s.temperature, s.top_p) == (3, 0.7, 0.9)
