"""Meta-Rewarding: the model judges its own judgments (Wu et al., 2024, §2.2).

For each prompt, the response whose judgments disagree most is picked; every pair of its
judgments is shown to a meta-judge (``prompts/meta_judge.jinja``) in both orders; wins are
weighted against position bias; Bradley–Terry strengths (Elo scale) are fitted to the weighted
wins; the highest-rated judgment becomes "chosen" and the lowest "rejected" of a DPO pair whose
prompt is the judge prompt. Pure functions over plain rows, no I/O.

A *battle* is a dict ``{"a": int, "b": int, "verdict": "A" | "B" | None, "text": str}``:
judgment ``a`` was shown as "Judgment A", ``b`` as "Judgment B", ``verdict`` is
:func:`parse_verdict` of the meta-judge's ``text``. A None verdict is a failed battle: counted,
never used.
"""

from __future__ import annotations

import math
import re
import statistics
from itertools import combinations

from alignment.judge import BLANK, end_of_last

# Ratings are on the Elo scale: R = ELO_BASE + ELO_SCALE · log10(strength), strengths
# normalised to geometric mean 1, so the mean rating of a prompt's judgments is ELO_BASE and a
# 400-point gap means 10:1 odds of winning.
ELO_BASE = 1000.0
ELO_SCALE = 400.0
# Pseudo-wins added to both directions of every pair before fitting (see fit_bradley_terry).
DEFAULT_PRIOR = 0.1
RATING_TOL = 1e-9
VARIANCE_TOL = 1e-12


# ---------------------------------------------------------------- verdict parsing

# Linear time on any text (possessive quantifiers, one search for the last label; see
# alignment.judge). "Winner" must start a word; the verdict is read on the label's line.
_WINNER_LABEL_REVERSED = re.compile(rf":[{BLANK}]*+renniw(?![^\W_])", re.IGNORECASE)
_REST_OF_LINE = re.compile(r"[^\n\r\v\f\x1c-\x1e\x85\u2028\u2029]*+")
# After "Winner:": optional markdown/quotes/brackets, optional "Judgment"/"Judgement", then the
# letter, which must not run on into a word ("both", "Answer").
_CHOICE_RE = re.compile(
    rf"""[{BLANK}*_`"'\[(]*+(?:judge?ment[{BLANK}]*+)?+([ab])(?![^\W_])""", re.IGNORECASE
)
# A hedge: right after the letter, an alternative ("or", "vs", "versus", "and", "nor", "|",
# "/", "&", ","), any run of further connectors, hedging adverbs ("maybe", "perhaps", ...) and
# separators, then a second candidate: "Judgment A|B", a capital "A"/"B" as a word, or a small
# "a"/"b" that ends the phrase — so "A or maybe B", "A vs B", "[Judgement A | Judgement B]" are
# no decision, while "Judgment A and a clear one" (an article) and "B, because A misreads
# the rubric" (a clause) stay clear verdicts. A hedge is a short phrase: at most 40 such
# pieces are read, which also bounds the time spent on the line.
_HEDGE_RE = re.compile(
    rf"""[{BLANK}*_`"'()\[\]{{}}.-]*+"""
    r"""(?:(?:or|vs|versus|and|nor)(?![^\W_])\.?|[|/&,])"""
    rf"""(?:[{BLANK}*_`"'(\[]++|(?:or|vs|versus|and|nor)(?![^\W_])\.?|[|/&,]"""
    r"""|(?:maybe|perhaps|possibly|probably|arguably|rather|also|even|just|equally|potentially)(?![^\W_]))"""
    r"""{0,40}+"""
    rf"""(?:judge?ment[{BLANK}]*+[ab](?![^\W_])|(?-i:[AB])(?![^\W_])"""
    rf"""|[ab][{BLANK}]*+(?:$|[\])}}*_`"'.|,;:!?]))""",
    re.IGNORECASE,
)


# log p(" A") − log p(" B") with probabilities floored here, so a candidate missing from vLLM's
# top-k logprobs gives a large finite log-odds instead of infinity.
PROB_FLOOR = 1e-12
LOG_ODDS_TOL = 1e-12


def log_odds(p_a: float, p_b: float) -> float | None:
    """ℓ = ln p(A) − ln p(B) (probabilities floored at ``PROB_FLOOR``); None if neither has mass."""
    if p_a <= 0 and p_b <= 0:
        return None
    return math.log(max(p_a, PROB_FLOOR)) - math.log(max(p_b, PROB_FLOOR))


def verdict_from_probs(p_a: float, p_b: float, offset: float = 0.0, *, min_mass: float = 0.0) -> str | None:
    """"A" if ln p(A) − ln p(B) − offset > 0, "B" if < 0; None when p(A) + p(B) is 0 or below
    ``min_mass`` (the judge was not about to name one) or the difference is 0.

    ``offset`` = 0 is the plain argmax of p(A) vs p(B) (the meta-judge's verdict, the eval
    stage's pairwise verdict). With ``offset`` = the prompt's mean log-odds
    (``alignment.meta_rewarding.position_offsets``) the verdict is position-debiased.
    """
    if p_a + p_b <= 0 or p_a + p_b < min_mass:
        return None
    ell = log_odds(p_a, p_b)
    if ell is None or abs(ell - offset) <= LOG_ODDS_TOL:
        return None
    return "A" if ell > offset else "B"


def parse_verdict(text: str) -> str | None:
    """"A" or "B" from the meta-judge's output, or None for a failed meta-judgment.

    Only the LAST ``Winner:`` in the text counts (case-insensitive, "Winner" starting a word):
    a verdict quoted or drafted earlier in the reasoning is superseded by a later one. The
    rest of that line must start (after markdown ``*``/``_``, quotes or brackets) with
    ``Judgment A|B``, ``Judgement A|B`` or a bare ``A|B``; a clause may follow
    (``**Winner: Judgment A**``, ``winner: judgment b.``, ``Winner: B, because A misreads
    the rubric``). If the last ``Winner:`` is not a valid verdict (``Winner: Judgment C``,
    ``Winner: both``) or hedges (``Winner: A or B``, ``Winner: A or maybe B``,
    ``Winner: A vs B``, see ``_HEDGE_RE``) the result is None — we do not fall back to an
    earlier verdict, because the meta-judge's final word was not a decision. Linear time.
    """
    if not isinstance(text, str):
        return None
    end = end_of_last(_WINNER_LABEL_REVERSED, text)
    if end is None:
        return None
    rest = _REST_OF_LINE.match(text, end).group()
    m = _CHOICE_RE.match(rest)
    if m is None or _HEDGE_RE.match(rest, m.end()):
        return None
    return m.group(1).upper()


def make_battle(a: int, b: int, text: str) -> dict:
    """A battle record for judgment ``a`` shown as "Judgment A" and ``b`` as "Judgment B"."""
    return {"a": a, "b": b, "verdict": parse_verdict(text), "text": text}


# ---------------------------------------------------------------- which response, which pairs


def valid_scores(row: dict) -> list[float]:
    """The non-None per-judgment scores of a judge row."""
    return [float(s) for s in row["scores"] if s is not None]


def valid_judgment_indices(row: dict) -> list[int]:
    """Indices into ``row["judgments"]`` of the judgments that produced a score."""
    return [i for i, s in enumerate(row["scores"]) if s is not None]


def pick_meta_response(rows_of_one_prompt: list[dict]) -> dict | None:
    """The response whose judgments disagree most: argmax of Var(scores), or None.

    Var is the population variance of the non-None scores, σ² = (1/N)·Σ(s_i − s̄)²
    (``statistics.pvariance``, exact for floats). Responses with fewer than two scored
    judgments are skipped. Ties go to the lowest ``response_index``. None when every response
    has σ² = 0 (or none has two scores): all judgments agree, so there is nothing for the
    meta-judge to separate.
    """
    best: dict | None = None
    best_var = VARIANCE_TOL
    for row in sorted(rows_of_one_prompt, key=lambda r: r["response_index"]):
        scores = valid_scores(row)
        if len(scores) < 2:
            continue
        var = statistics.pvariance(scores)
        if var > best_var + VARIANCE_TOL:
            best, best_var = row, var
    return best


def battle_plan(judgment_indices: list[int]) -> list[tuple[int, int]]:
    """Every unordered pair of judgments, in both orders: [(i, j), (j, i), ...] for i before j.

    ``(a, b)`` means judgment ``a`` is shown as "Judgment A". k judgments → k(k−1) battles
    (the paper's N = 11 → 110 meta-judge calls per prompt).
    """
    if len(set(judgment_indices)) != len(judgment_indices):
        raise ValueError(f"judgment_indices has duplicates: {judgment_indices}")
    plan: list[tuple[int, int]] = []
    for i, j in combinations(judgment_indices, 2):
        plan += [(i, j), (j, i)]
    return plan


# ---------------------------------------------------------------- position-bias weighting


def position_wins(battles: list[dict]) -> tuple[int, int]:
    """(win_A, win_B): valid battles won by the judgment shown first / second."""
    win_a = sum(1 for b in battles if b["verdict"] == "A")
    win_b = sum(1 for b in battles if b["verdict"] == "B")
    return win_a, win_b


def position_weights(battles: list[dict]) -> tuple[float, float]:
    """(ω1, ω2): the weight of a win in position A (first) and in position B (second).

    Wu et al. (2024, §2.2): count the wins of each position over the valid battles, then

        ω1 = win_B / (win_A + win_B)      (weight of a win as "Judgment A")
        ω2 = win_A / (win_A + win_B)      (weight of a win as "Judgment B")

    so a win in the position the meta-judge favours counts less (ω1 + ω2 = 1; no bias →
    ω1 = ω2 = ½). If one position never wins, its ω is 1 and the other's is 0: every win was
    in the favoured position, so — as in the paper's formula — no win carries information and
    all ratings come out equal (no judge pair). Only win_A + win_B = 0 (no valid battle) would
    divide by zero; then there is nothing to weight and (½, ½) is returned.
    """
    win_a, win_b = position_wins(battles)
    total = win_a + win_b
    if total == 0:
        return 0.5, 0.5
    return win_b / total, win_a / total


def battle_scores(
    battles: list[dict], n: int, weights: tuple[float, float] | None = None
) -> list[list[float]]:
    """The weighted battle matrix B (n × n): B[m][k] = weighted wins of judgment m over k.

        B[m][k] = ω1 · #{battles (a=m, b=k) with verdict A}
                + ω2 · #{battles (a=k, b=m) with verdict B}

    (the paper's B_mn = ω1·1[m wins as A] + ω2·1[m wins as B], summed over battles).
    ``weights`` = (ω1, ω2) defaults to :func:`position_weights` of these battles (this prompt);
    pass weights counted over a whole iteration to pool the position statistics instead.
    Failed battles (verdict None) contribute nothing.
    """
    w1, w2 = position_weights(battles) if weights is None else weights
    matrix = [[0.0] * n for _ in range(n)]
    for battle in battles:
        a, b = battle["a"], battle["b"]
        if not (0 <= a < n and 0 <= b < n) or a == b:
            raise ValueError(f"battle indices out of range for n={n}: a={a}, b={b}")
        if battle["verdict"] == "A":
            matrix[a][b] += w1
        elif battle["verdict"] == "B":
            matrix[b][a] += w2
    return matrix


# ---------------------------------------------------------------- Bradley–Terry / Elo


def fit_bradley_terry(
    n: int,
    weighted_wins: list[list[float]],
    prior: float = DEFAULT_PRIOR,
    tol: float = 1e-10,
    max_iter: int = 100_000,
) -> list[float]:
    """Elo-scale Bradley–Terry ratings from a weighted win matrix W (W[i][j] = wins of i over j).

    Model: P(i beats j) = p_i / (p_i + p_j) (the paper's ε_i = ln p_i). Maximise

        L(p) = Σ_{i≠j} W'[i][j] · ln(p_i / (p_i + p_j)),   W'[i][j] = W[i][j] + prior

    with the MM iteration of Hunter (2004):

        p_i ← Σ_j W'[i][j] / Σ_{j≠i} (W'[i][j] + W'[j][i]) / (p_i + p_j)

    renormalising to geometric mean 1 after each step, until max |Δ ln p_i| < tol.
    ``prior`` > 0 pseudo-wins in both directions of every pair (a symmetric Beta-like prior;
    departs from the paper's plain maximum likelihood) keep an undefeated judgment's rating
    finite and make the fit unique even when some pairs never met. For two items this gives
    the closed form p_0 / p_1 = (W[0][1] + prior) / (W[1][0] + prior).

    Returns R_i = 1000 + 400 · log10 p_i (mean rating 1000). Deterministic.
    """
    if prior <= 0:
        raise ValueError(f"prior must be > 0, got prior={prior!r}")
    if len(weighted_wins) != n or any(len(r) != n for r in weighted_wins):
        raise ValueError(f"weighted_wins must be {n}x{n}")
    if any(w < 0 for r in weighted_wins for w in r):
        raise ValueError("weighted_wins must be non-negative")
    if n == 0:
        return []
    wins = [[0.0 if i == j else weighted_wins[i][j] + prior for j in range(n)] for i in range(n)]
    totals = [sum(r) for r in wins]
    games = [[wins[i][j] + wins[j][i] for j in range(n)] for i in range(n)]
    p = [1.0] * n
    for _ in range(max_iter):
        new = [
            totals[i] / sum(games[i][j] / (p[i] + p[j]) for j in range(n) if j != i)
            if n > 1
            else 1.0
            for i in range(n)
        ]
        log_gm = sum(math.log(x) for x in new) / n
        new = [x / math.exp(log_gm) for x in new]
        delta = max(abs(math.log(x) - math.log(y)) for x, y in zip(new, p))
        p = new
        if delta < tol:
            break
    return [ELO_BASE + ELO_SCALE * math.log10(x) for x in p]


def rate_judgments(
    battles: list[dict],
    n: int,
    prior: float = DEFAULT_PRIOR,
    weights: tuple[float, float] | None = None,
) -> list[float | None]:
    """Ratings for judgments 0..n−1 of one response; None for those in no valid battle.

    The fit runs only over judgments that took part in at least one valid battle (failed
    judgments are never battled, and a judgment whose battles all failed has no evidence), so
    bystanders neither get a rating nor pull the others towards 1000 through the prior.
    """
    valid = [b for b in battles if b["verdict"] is not None]
    players = sorted({b["a"] for b in valid} | {b["b"] for b in valid})
    if weights is None:
        weights = position_weights(valid)
    slot = {j: k for k, j in enumerate(players)}
    local = [{**b, "a": slot[b["a"]], "b": slot[b["b"]]} for b in valid]
    matrix = battle_scores(local, len(players), weights)
    fitted = fit_bradley_terry(len(players), matrix, prior)
    ratings: list[float | None] = [None] * n
    for j, r in zip(players, fitted):
        if not 0 <= j < n:
            raise ValueError(f"battle index {j} out of range for n={n}")
        ratings[j] = r
    return ratings


# ---------------------------------------------------------------- judge pairs


def judge_pair(
    ratings: list[float | None],
    judgments: list[str],
    lengths: list[int],
    length_cap: int | None = None,
) -> dict | None:
    """Chosen = highest-rated judgment, rejected = lowest-rated, among the eligible ones.

    Eligible: rating not None and length ≤ ``length_cap`` (None = no cap; the paper drops
    over-long judgments so the judge is not trained towards verbosity). Ties: the lowest index
    wins both roles. None if fewer than two are eligible or max rating − min rating ≤ 1e-9
    (no preference). Returns ``chosen_index``, ``rejected_index``, ``chosen``, ``rejected``,
    ``chosen_rating``, ``rejected_rating``.
    """
    eligible = [
        i
        for i, r in enumerate(ratings)
        if r is not None and (length_cap is None or lengths[i] <= length_cap)
    ]
    if len(eligible) < 2:
        return None
    chosen = min(eligible, key=lambda i: (-ratings[i], i))
    rejected = min(eligible, key=lambda i: (ratings[i], i))
    if ratings[chosen] - ratings[rejected] <= RATING_TOL:
        return None
    return {
        "chosen_index": chosen,
        "rejected_index": rejected,
        "chosen": judgments[chosen],
        "rejected": judgments[rejected],
        "chosen_rating": ratings[chosen],
        "rejected_rating": ratings[rejected],
    }
