"""Head-to-head evaluation statistics: win rate, a seeded bootstrap interval, and the
length-controlled win rate. Pure functions over outcomes; the stages that produce the
outcomes (answers of two models, judged by a fixed judge in both orders) call them.

An outcome is the preference for the candidate model over the baseline on one prompt:
1 (win), 0.5 (tie), 0 (loss).
"""

from __future__ import annotations

import math
import random
import statistics
from typing import Sequence


def win_rate(outcomes: Sequence[float]) -> float | None:
    """(wins + ½·ties) / prompts = the mean outcome; None without outcomes."""
    return statistics.fmean(outcomes) if outcomes else None


def bootstrap_ci(values: Sequence[float], resamples: int = 2000, seed: int = 0,
                 level: float = 0.95) -> list[float] | None:
    """Percentile bootstrap interval of the mean: ``resamples`` means of n values drawn with
    replacement (``random.Random(seed)``, so the same values always give the same interval),
    sorted; the interval is [m_⌊q·(B−1)⌋, m_⌊(1−q)·(B−1)⌋] with q = (1 − level) / 2.
    None for fewer than two values."""
    if len(values) < 2:
        return None
    rng, n = random.Random(seed), len(values)
    means = sorted(statistics.fmean(rng.choices(values, k=n)) for _ in range(resamples))
    q = (1 - level) / 2
    return [means[int(q * (resamples - 1))], means[int((1 - q) * (resamples - 1))]]


def sigmoid(z: float) -> float:
    """σ(z) = 1 / (1 + e^(−z)), computed without overflow."""
    if z >= 0:
        return 1 / (1 + math.exp(-z))
    e = math.exp(z)
    return e / (1 + e)


def length_feature(length_diffs: Sequence[float]) -> list[float]:
    """AlpacaEval 2.0's length term: x_i = tanh(d_i / sd(d)) with d_i = len(candidate) − len(baseline)
    (tokens) and sd the standard deviation of the d_i; all zeros when sd = 0 (no length difference
    to control for)."""
    sd = statistics.pstdev(length_diffs) if len(length_diffs) > 1 else 0.0
    return [math.tanh(d / sd) if sd > 0 else 0.0 for d in length_diffs]


def fit_logistic(x: Sequence[float], y: Sequence[float], l2: float = 1e-3, steps: int = 50) -> tuple[float, float]:
    """(a, b) maximising Σ_i [y_i log p_i + (1 − y_i) log(1 − p_i)] − ½·l2·(a² + b²) with
    p_i = σ(a + b·x_i) and y_i ∈ [0, 1] (a tie is ½), by Newton's method from (0, 0). The small
    L2 term keeps the fit finite when outcomes separate perfectly by length; with every x_i = 0
    only a is fitted."""
    a = b = 0.0
    for _ in range(steps):
        p = [sigmoid(a + b * xi) for xi in x]
        ga = sum(yi - pi for yi, pi in zip(y, p)) - l2 * a
        gb = sum((yi - pi) * xi for xi, yi, pi in zip(x, y, p)) - l2 * b
        w = [pi * (1 - pi) for pi in p]
        haa = sum(w) + l2
        hab = sum(wi * xi for wi, xi in zip(w, x))
        hbb = sum(wi * xi * xi for wi, xi in zip(w, x)) + l2
        det = haa * hbb - hab * hab
        if det > 1e-12:
            da, db = (hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det
        else:  # every x_i = 0 and no penalty: b is not identified, fit a alone
            da, db = ga / haa, 0.0
        a, b = a + da, b + db
        if abs(da) + abs(db) < 1e-12:
            break
    return a, b


def length_controlled_win_rate(outcomes: Sequence[float], length_diffs: Sequence[float], l2: float = 1e-3) -> float | None:
    """The win rate the candidate would have at zero length difference, in the manner of AlpacaEval
    2.0: fit P(win_i) = σ(a + b·x_i) on x_i = :func:`length_feature` (d_i), then report σ(a) (x = 0).
    A judge that prefers longer answers raises the raw win rate of a longer-answering model; the
    length-controlled rate removes what the length term explains. None without outcomes."""
    if not outcomes:
        return None
    a, _ = fit_logistic(length_feature(length_diffs), outcomes, l2=l2)
    return sigmoid(a)
