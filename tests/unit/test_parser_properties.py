"""Judge and meta-judge parsers: properties over generated judge outputs, and linear time.

Both parsers read model output of any length and shape; a regex that backtracks turns one
long judgment into minutes of CPU (``"Score: " + 32768 spaces`` took ~19 s before).
"""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alignment.judge import parse_score
from alignment.meta_judge import parse_verdict

# Free text a judge might write before its verdict, including labels, digits and markdown.
_WORDS = st.sampled_from(
    ["Score:", "score", "Subscore: 5", "Score: 9", "Winner:", "Winner: Judgment A", "Judgment B", "or", "vs",
     "A", "B", "4/5", "**", "_", "`", " ", "\n", "\t", "good", "the response", ":", "5", "maybe", "—"]
)
_PROSE = st.lists(st.one_of(_WORDS, st.text(max_size=12)), max_size=30).map(" ".join)
# A line ending: nothing that could continue a number ("4" + "5", "4" + "/10", "4" + ".5").
_TAIL = st.sampled_from(["", ".", " points", " (could be better)", " because it is relevant", "\nThanks!",
                         " — a fair answer", "**", " / 5", " out of 5", "/5."])
_BOLD = st.sampled_from([("", ""), ("**", "**"), ("__", "__"), ("`", "`"), ("*", "*")])


@settings(max_examples=300, deadline=None)
@given(prose=_PROSE, score=st.integers(0, 5), bold=_BOLD, inner=_BOLD, space=st.sampled_from(["", " ", "  ", "\t"]),
       label=st.sampled_from(["Score:", "score:", "SCORE :", "Final Score:", "Score："]), tail=_TAIL)
def test_the_last_score_line_counts_whatever_came_before(prose, score, bold, inner, space, label, tail):
    text = f"{prose}\n{bold[0]}{label}{space}{inner[0]}{score}{inner[1]}{bold[1]}{tail}"
    assert parse_score(text) == score


@settings(max_examples=200, deadline=None)
@given(prose=_PROSE, score=st.integers(0, 5), prefix=st.sampled_from(["Sub", "sub", "Total", "x", "9", "Re"]),
       other=st.integers(0, 9))
def test_a_label_inside_a_word_is_no_score(prose, score, prefix, other):
    # "Subscore: 7" after the real score line neither replaces nor spoils it.
    assert parse_score(f"{prose}\nScore: {score}\n{prefix}score: {other}") == score
    assert parse_score(f"{prefix}score: {score}") is None


@settings(max_examples=200, deadline=None)
@given(prose=_PROSE, junk=st.sampled_from(["N/A", "", "five", "6", "-1", "3.5", "8/10", "4 out of 10", "**", "?"]))
def test_a_last_label_without_a_valid_score_fails_without_falling_back(prose, junk):
    assert parse_score(f"{prose}\nScore: 4\nScore: {junk}") is None


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=300))
def test_parse_score_never_raises_and_stays_in_range(text):
    assert parse_score(text) in (None, 0, 1, 2, 3, 4, 5)
    assert parse_verdict(text) in (None, "A", "B")


_CLAUSE = st.sampled_from(["", ".", "!", " (it follows the rubric)", ", because B misreads the rubric",
                           " since Judgment B is too generous", " — A applies the criteria",
                           " and a clear one at that",
                           ", as the other overstates the score", "**", ". Judgment B gives 5 points."])
_LABEL = st.sampled_from(["Winner:", "winner:", "WINNER :", "**Winner:**", "Final winner:"])
_NAME = st.sampled_from(["Judgment ", "Judgement ", "judgment ", "", "Judgment"])
_QUOTE = st.sampled_from([("", ""), ("**", "**"), ('"', '"'), ("[", "]"), ("(", ")"), ("`", "`")])


@settings(max_examples=300, deadline=None)
@given(prose=_PROSE, letter=st.sampled_from("AB"), label=_LABEL, name=_NAME, quote=_QUOTE, clause=_CLAUSE)
def test_a_clear_last_verdict_counts_even_with_a_clause(prose, letter, label, name, quote, clause):
    text = f"{prose}\n{label} {quote[0]}{name}{letter}{quote[1]}{clause}"
    assert parse_verdict(text) == letter


_HEDGE = st.sampled_from([" or ", " or maybe ", " vs ", " vs. ", " versus ", "/", " / ", " | ", " or, perhaps, ",
                          ", or possibly ", " and ", " & ", ", ", " nor ", " (or ", " and/or "])


@settings(max_examples=300, deadline=None)
@given(prose=_PROSE, first=st.sampled_from("AB"), second=st.sampled_from("AB"), label=_LABEL, name=_NAME,
       name2=st.sampled_from(["Judgment ", "Judgement ", ""]), hedge=_HEDGE,
       tail=st.sampled_from(["", ".", ")", " is better", " — hard to say", "]"]))
def test_a_hedged_last_verdict_is_no_verdict(prose, first, second, label, name, name2, hedge, tail):
    text = f"Winner: Judgment A\n{prose}\n{label} {name}{first}{hedge}{name2}{second}{tail}"
    assert parse_verdict(text) is None


@pytest.mark.parametrize("text, expected", [
    ("Winner: A or maybe B", None), ("Winner: A vs B", None), ("Winner: Judgment A vs. Judgment B", None),
    ("Winner: A or perhaps B is better", None),
    ("Winner: Judgment A and a clear one", "A"), ("Subwinner: A", None), ("Winner: B\nRunnerwinner: A", "B"),
])
def test_parse_verdict_hedges_and_word_boundary(text, expected):
    assert parse_verdict(text) == expected


_MB = 1 << 20
# The shapes that make a backtracking regex quadratic: long runs after a label, labels or
# separators repeated a million times, an unfinished value, a run of markdown.
WORST = [
    "Score: " + " " * _MB, "Score:" * (_MB // 6), "score " * (_MB // 6), "Score: 4/" + " " * _MB,
    "Score: 4" + " " * _MB + "x", "Score: " + "* " * (_MB // 2), "Score: 4 out" + " " * _MB, " " * _MB,
    ":" * _MB, ": " * (_MB // 2), "Score: " + "9" * _MB, "Score" + "\t" * _MB, "s" * _MB,
    "Winner: " + " " * _MB, "Winner:" * (_MB // 7), "Winner: A or" + " " * _MB, "Winner: A" + " /" * (_MB // 2),
    "Winner: A " + "or maybe " * (_MB // 9), "Winner: Judgment" + " " * _MB + "A", "Winner: [" + "(" * _MB,
    "Winner: A" + ", " * (_MB // 2) + "because", "winner " * (_MB // 7),
]


@pytest.mark.parametrize("text", WORST, ids=[f"{t[:12]!r}x{len(t)}" for t in WORST])
def test_parsers_are_linear_on_a_megabyte(text):
    # Best of three, so a busy machine does not fail the test; linear code takes ~10–40 ms here.
    for parse in (parse_score, parse_verdict):
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            parse(text)
            best = min(best, time.perf_counter() - start)
        assert best < 0.1, f"{parse.__name__} took {best * 1000:.0f} ms on {text[:20]!r}... ({len(text)} chars)"
