"""Win rate, bootstrap interval and length-controlled win rate against hand-computed values."""

import math
import random

import pytest

from alignment.evaluation import (bootstrap_ci, fit_logistic, length_controlled_win_rate, length_feature, sigmoid,
                                  win_rate)


def test_win_rate_counts_a_tie_as_half():
    assert win_rate([1, 1, 0.5, 0]) == pytest.approx(2.5 / 4)
    assert win_rate([]) is None


def test_bootstrap_is_seeded_and_brackets_the_mean():
    values = [0.13, 0.92, 0.55, 0.31, 0.77, 0.05, 0.68, 0.49, 0.86, 0.22]
    ci = bootstrap_ci(values, resamples=500, seed=3)
    assert ci == bootstrap_ci(values, resamples=500, seed=3)  # same values, same interval
    assert ci != bootstrap_ci(values, resamples=500, seed=4)
    assert ci[0] < win_rate(values) < ci[1]
    assert bootstrap_ci([1.0]) is None
    assert bootstrap_ci([0.7, 0.7, 0.7]) == pytest.approx([0.7, 0.7])  # no spread, no width


def test_bootstrap_by_hand_with_two_resamples():
    # B = 3 resampled means of random.Random(0).choices([0, 1], k=2), sorted; q = 0.025:
    # lower = m[floor(0.025 * 2)] = m[0], upper = m[floor(0.975 * 2)] = m[1]
    rng = random.Random(0)
    means = sorted(sum(rng.choices([0.0, 1.0], k=2)) / 2 for _ in range(3))
    assert bootstrap_ci([0.0, 1.0], resamples=3, seed=0) == [means[0], means[1]]


def test_sigmoid_is_stable_at_the_extremes():
    assert sigmoid(0) == 0.5 and sigmoid(800) == 1.0 and sigmoid(-800) == 0.0
    assert sigmoid(1.0) == pytest.approx(1 / (1 + math.exp(-1)))


def test_length_feature():
    # d = [-2, 2]: sd (population) = 2, x = tanh(±1)
    assert length_feature([-2, 2]) == pytest.approx([math.tanh(-1), math.tanh(1)])
    assert length_feature([5, 5, 5]) == [0.0, 0.0, 0.0]


def test_logistic_fit_matches_the_closed_form():
    # Two groups at x = +1 and x = -1 (10 prompts each) with win shares 0.8 and 0.4. Without the
    # penalty the MLE solves σ(a + b) = 0.8, σ(a − b) = 0.4: a = (logit 0.8 + logit 0.4) / 2,
    # b = (logit 0.8 − logit 0.4) / 2.
    x = [1.0] * 10 + [-1.0] * 10
    y = [1] * 8 + [0] * 2 + [1] * 4 + [0] * 6
    a, b = fit_logistic(x, y, l2=0.0)
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    assert a == pytest.approx((logit(0.8) + logit(0.4)) / 2, abs=1e-9)  # 0.490415
    assert b == pytest.approx((logit(0.8) - logit(0.4)) / 2, abs=1e-9)  # 0.895880


def test_length_controlled_win_rate_removes_a_length_preference():
    # The candidate wins 80% when its answer is longer, 40% when shorter (raw win rate 0.6):
    # at zero length difference it would win σ(a) = σ(0.490415) = 0.620204.
    outcomes = [1] * 8 + [0] * 2 + [1] * 4 + [0] * 6
    diffs = [30] * 10 + [-30] * 10  # tanh(±1): the same x as the closed-form test
    assert win_rate(outcomes) == pytest.approx(0.6)
    assert length_controlled_win_rate(outcomes, diffs, l2=0.0) == pytest.approx(0.620204, abs=1e-6)
    # A win that only ever comes with the longer answer is not a win at equal length.
    assert length_controlled_win_rate([1] * 10 + [0] * 10, diffs) == pytest.approx(0.5, abs=1e-6)
    # No length difference: the length-controlled rate is the raw one.
    assert length_controlled_win_rate([1, 1, 0.5, 0], [0, 0, 0, 0], l2=0.0) == pytest.approx(0.625)
    assert length_controlled_win_rate([], []) is None
