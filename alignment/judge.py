"""LLM-as-a-Judge: render the additive 5-point prompt, parse the score, aggregate.

The model judges its own responses (Self-Rewarding). ``parse_score`` reads only the judge's
own output and only its *last* ``Score:`` line, so a response (or a quoted example) that says
"Score: 5" cannot set its own score. Three modes turn judge text into scores:

- ``free``: the paper. Sample the judgment and parse it; no parseable score = failed judgment.
- ``constrained``: structured decoding forces the output to end with ``\\nScore: <0-5>``
  (vLLM ``StructuredOutputsParams(regex=...)``), so it always parses.
- ``logprob``: sample the justification until ``Score:``, then read the probability of each
  digit 0–5 as what follows (see :func:`digit_probs`). ``score_int`` is the most likely digit and
  ``expected_score`` = Σ d·p(d) / Σ p(d) — a finer score than the paper's integer, which
  saturates and ties (the Meta-Rewarding paper's own complaint). The mass Σ p(d) is stored with
  each judgment (``digit_masses``); below ``min_digit_mass`` the judge was not about to write a
  score and the judgment fails instead of scoring noise.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass
from typing import Sequence

from alignment.generation import Generator, Sampling, derive_seed
from alignment.prompts import render

DIGITS = tuple(str(d) for d in range(6))
# logprob mode: the justification is continued with SCORE_PREFIX and the digit read after it.
# The prefix ends at the colon, not at a space: chat templates that trim the final message
# (Llama-3's) would drop a trailing space, the next token would be the space and the digits
# would get ~0 mass. The model may write the digit with or without a space, so both count.
SCORE_PREFIX = "\nScore:"
DIGIT_CANDIDATES = tuple(f" {d}" for d in DIGITS) + DIGITS
CONSTRAINED_REGEX = r"[^\n]{0,400}\nScore: [0-5]"
# Judgments are model output of any length and shape, so both parsers run in linear time:
# quantifiers are possessive (``*+``, no backtracking) over single character classes, and the
# LAST label is found by one forward search in the reversed text (a greedy ``.*`` that backs
# off character by character is linear too, but 5× slower on 1 MB).
# Blanks: whitespace that does not break a line for ``str.splitlines``.
BLANK = "\t \xa0\u1680\u2000-\u200a\u202f\u205f\u3000"
# "Score" starting a word ("Subscore: 4" is no score), blanks, ":" or "：" — reversed.
_SCORE_LABEL_REVERSED = re.compile(rf"[:：][{BLANK}]*+erocs(?![^\W_])", re.IGNORECASE)
# After the label: optional markdown/blanks, a number, optionally "/5" or "out of 5".
_SCORE_VALUE = re.compile(
    rf"[*_`{BLANK}]*+(-?\d++(?:\.\d++)?+)"
    rf"(?:[{BLANK}]*+(?:/|out[{BLANK}]++of)[{BLANK}]*+(\d++(?:\.\d++)?+))?+",
    re.IGNORECASE,
)


def end_of_last(reversed_label: re.Pattern, text: str) -> int | None:
    """Index just after the last match of a label in ``text``, given the label's pattern for
    the reversed text; None if there is none. One search over ``text[::-1]``: linear."""
    match = reversed_label.search(text[::-1])
    return None if match is None else len(text) - match.start()


def judge_prompt(question: str, response: str) -> str:
    return render("judge", question=question, response=response)


def parse_score(text: str) -> int | None:
    """The integer 0–5 on the judge's last ``Score:`` line, else None.

    Tolerates ``**Score: 3**``, ``Score: 4/5``, ``Score: 4.0``, ``Score: 4 points``.
    Out of range (``6``, ``-1``), fractional (``3.5``), a denominator other than 5, or no
    number after the last ``Score:`` → None. Never raises.
    """
    if not isinstance(text, str):
        return None
    end = end_of_last(_SCORE_LABEL_REVERSED, text)
    if end is None:
        return None
    value = _SCORE_VALUE.match(text, end)
    if value is None:
        return None
    value, denom = value.group(1), value.group(2)
    if denom is not None and float(denom) != 5:
        return None
    number = float(value)
    if not number.is_integer() or not 0 <= number <= 5:
        return None
    return int(number)


def digit_probs(candidate_probs: dict[str, float]) -> dict[str, float]:
    """p(d) = p(" d") + p("d") after ``SCORE_PREFIX``: the two ways to write the digit d."""
    return {d: candidate_probs.get(f" {d}", 0.0) + candidate_probs.get(d, 0.0) for d in DIGITS}


def score_from_probs(probs: dict[str, float]) -> tuple[int | None, float | None, float]:
    """(argmax digit, expected value, probability mass on digits) from a digit distribution."""
    mass = sum(probs.get(d, 0.0) for d in DIGITS)
    if mass <= 0:
        return None, None, 0.0
    best = max(DIGITS, key=lambda d: (probs.get(d, 0.0), -int(d)))
    expected = sum(int(d) * probs.get(d, 0.0) for d in DIGITS) / mass
    return int(best), expected, mass


@dataclass(frozen=True)
class JudgeSettings:
    n: int = 3
    mode: str = "free"
    score: str = "int"
    temperature: float = 0.7
    top_p: float = 0.9
    max_tokens: int = 256
    min_digit_mass: float = 0.0  # logprob mode: below this Σ p(d) the judgment fails


def judge_responses(
    generator: Generator,
    rows: Sequence[dict],
    settings: JudgeSettings,
    *,
    adapter: str | None = None,
    seed: int = 0,
) -> list[dict]:
    """Judge every response ``settings.n`` times; one output row per response (schema "judge")."""
    convs = [[{"role": "user", "content": judge_prompt(r["prompt"], r["response"])}] for r in rows]
    sampling = Sampling(
        n=settings.n,
        temperature=settings.temperature,
        top_p=settings.top_p,
        max_tokens=settings.max_tokens,
        stop=("Score:",) if settings.mode == "logprob" else (),
        regex=CONSTRAINED_REGEX if settings.mode == "constrained" else None,
    )
    # Per-request seeds from the response's identity: the same judgments in any shard or batch.
    seeds = [derive_seed(seed, r["prompt_id"], r["response_index"]) for r in rows]
    completions = generator.chat(convs, sampling, adapter=adapter, seed=seeds)
    texts = [[c.text for c in per_row] for per_row in completions]

    probs: list[list[dict[str, float]]] = [[{} for _ in t] for t in texts]
    if settings.mode == "logprob":
        flat = [
            conv + [{"role": "assistant", "content": text.rstrip() + SCORE_PREFIX}]
            for conv, per_row in zip(convs, texts)
            for text in per_row
        ]
        flat_probs = iter(generator.next_token_probs(flat, DIGIT_CANDIDATES, adapter=adapter))
        probs = [[next(flat_probs) for _ in per_row] for per_row in texts]

    out = []
    for row, per_row, per_probs in zip(rows, texts, probs):
        judged = [_one_judgment(text, p, settings) for text, p in zip(per_row, per_probs)]
        out.append(aggregate(row, judged))
    return out


def _one_judgment(text: str, probs: dict[str, float], settings: JudgeSettings) -> dict:
    if settings.mode == "logprob":
        score_int, expected, mass = score_from_probs(digit_probs(probs))
        if score_int is None or mass < settings.min_digit_mass:
            return {"text": text.rstrip(), "score_int": None, "expected": None, "score": None,
                    "mode": "logprob", "digit_mass": mass}
        used = expected if settings.score == "expected" else score_int
        return {"text": text.rstrip() + f"{SCORE_PREFIX} {score_int}", "score_int": score_int,
                "expected": expected, "score": used, "mode": "logprob", "digit_mass": mass}
    score_int = parse_score(text)
    mode = "constrained" if settings.mode == "constrained" else "parsed"
    return {"text": text, "score_int": score_int, "expected": None,
            "score": None if score_int is None else float(score_int), "mode": mode, "digit_mass": None}


def aggregate(row: dict, judged: list[dict]) -> dict:
    """A response row plus its judgments, in the "judge" table schema."""
    scores = [None if j["score"] is None else float(j["score"]) for j in judged]
    valid = [s for s in scores if s is not None]
    return {
        "prompt_id": row["prompt_id"],
        "prompt": row["prompt"],
        "response_index": row["response_index"],
        "response": row["response"],
        "length": row["length"],
        "judgments": [j["text"] for j in judged],
        "scores": scores,
        "score_ints": [j["score_int"] for j in judged],
        "expected_scores": [j["expected"] for j in judged],
        "score_modes": [j["mode"] for j in judged],
        "digit_masses": [j.get("digit_mass") for j in judged],
        "mean_score": statistics.fmean(valid) if valid else None,
        "n_failed": len(scores) - len(valid),
    }
