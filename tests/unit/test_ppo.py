"""alignment.ppo: every formula against numbers worked out by hand (in the comments), the edge cases
(an empty response, a response without EOS, gamma = lam = 1), one update of a two-parameter
"model" computed by hand, and the TRL 1.12 cross-check on a small batch (bench/ppo_crosscheck.py)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alignment.ppo import (PPOUpdateConfig, Rollouts, approx_kl, entropy, gae, last_token_index, masked_mean,
                           masked_var, missing_eos_penalty, model_inputs, per_token_kl, policy_loss, ppo_update,
                           response_logits, response_mask, rollout_advantages, scale_logits, token_logprobs,
                           token_rewards, truncate_after, value_loss, value_mask, whiten)

REPO = Path(__file__).resolve().parents[2]
T, F = True, False
LN2 = math.log(2)


def close(actual: torch.Tensor, expected, tol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=tol, rtol=0)


# --------------------------------------------------------------------------------- rollout tensors
def test_model_inputs_mask_pads_and_count_positions_from_the_first_real_token():
    inputs = model_inputs(torch.tensor([[9, 9, 5, 6, 7, 9]]), pad_token_id=9)
    assert inputs["attention_mask"].tolist() == [[F, F, T, T, T, F]]
    assert inputs["input_ids"].tolist() == [[0, 0, 5, 6, 7, 0]]  # pads -> 0
    # cumsum(a) = [0, 0, 1, 2, 3, 3], minus a = [0, 0, 1, 1, 1, 0]
    assert inputs["position_ids"].tolist() == [[0, 0, 0, 1, 2, 3]]


def test_truncate_after_the_first_stop_token():
    responses = torch.tensor([[4, 2, 5, 6], [4, 5, 6, 7], [2, 2, 3, 3]])
    assert truncate_after(responses, stop_token_id=2, pad_token_id=0).tolist() == [
        [4, 2, 0, 0],   # EOS kept, the rest padded
        [4, 5, 6, 7],   # no EOS: unchanged
        [2, 0, 0, 0]]   # EOS first


def test_masks_and_last_token():
    mask = response_mask(torch.tensor([[4, 2, 0, 0], [4, 5, 6, 7], [0, 0, 0, 0]]), pad_token_id=0)
    assert mask.tolist() == [[T, T, F, F], [T, T, T, T], [F, F, F, F]]
    assert last_token_index(mask).tolist() == [1, 3, -1]
    # one position past the last real token, if there is one
    assert value_mask(mask).tolist() == [[T, T, T, F], [T, T, T, T], [T, F, F, F]]


# --------------------------------------------------------------------------------- log-probs, KL, rewards
def test_scale_logits_divides_by_temperature_plus_1e_7():
    close(scale_logits(torch.tensor([2.0], dtype=torch.float64), 0.5), [2 / 0.5000001], tol=1e-12)  # 3.9999992


def test_response_logits_are_the_positions_that_predict_the_response():
    logits = torch.arange(5.0).view(1, 5, 1)  # Q = 3, R = 2: positions 2 and 3 predict tokens 3 and 4
    assert response_logits(logits, 2).flatten().tolist() == [2.0, 3.0]


def test_token_logprobs():
    # z = [0, ln 2, 0] -> p = [1/4, 1/2, 1/4]
    z = torch.tensor([[[0.0, LN2, 0.0], [0.0, LN2, 0.0]]])
    close(token_logprobs(z, torch.tensor([[1, 0]])), [[math.log(0.5), math.log(0.25)]])


def test_per_token_kl_k1_and_k3():
    logp = torch.tensor([[math.log(0.5), math.log(0.25), 0.7]])
    ref = torch.tensor([[math.log(0.25), math.log(0.5), -3.0]])
    mask = torch.tensor([[T, T, F]])
    # k1 = log p - log p_ref: ln(0.5/0.25) = ln 2, ln(0.25/0.5) = -ln 2; 0 outside the mask
    close(per_token_kl(logp, ref, mask, "k1"), [[LN2, -LN2, 0.0]])
    # k3 = (r - 1) - ln r, r = p_ref / p: r = 0.5 -> -0.5 + ln 2 = 0.193147; r = 2 -> 1 - ln 2 = 0.306853
    close(per_token_kl(logp, ref, mask, "k3"), [[-0.5 + LN2, 1 - LN2, 0.0]])
    with pytest.raises(ValueError, match="k1"):
        per_token_kl(logp, ref, mask, "k2")


def test_missing_eos_penalty():
    scores, has_eos = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([T, F, T])
    close(missing_eos_penalty(scores, has_eos, 0.5), [1.0, 1.5, 3.0])  # only the row without EOS
    assert missing_eos_penalty(scores, has_eos, None) is scores


def test_token_rewards_put_the_score_after_the_last_real_token():
    mask = torch.tensor([[T, T, F, F], [T, T, T, T], [F, F, F, F]])
    kl = torch.tensor([[0.1, 0.2, 0.0, 0.0], [0.1, 0.1, 0.1, 0.1], [0.0, 0.0, 0.0, 0.0]])
    rewards = token_rewards(kl, torch.tensor([1.0, 2.0, 3.0]), mask, kl_coef=0.5)
    close(rewards, [
        [-0.05, -0.1, 1.0, 0.0],         # last = 1: the score at position 2, the first padding position
        [-0.05, -0.05, -0.05, 1.95],     # full row (no EOS): no position after it, so at the last one
        [3.0, 0.0, 0.0, 0.0]])           # empty row (last = -1): at position 0


# --------------------------------------------------------------------------------- advantages
def test_masked_mean_and_var():
    x = torch.tensor([1.0, 2.0, 3.0, 100.0])
    mask = torch.tensor([T, T, T, F])
    close(masked_mean(x, mask), 2.0)
    close(masked_mean(torch.tensor([[1.0, 3.0], [5.0, 7.0]]), torch.tensor([[T, F], [T, T]]), dim=1), [1.0, 6.0])
    # deviations -1, 0, 1: mean of squares 2/3, times n/(n-1) = 3/2 -> 1
    close(masked_var(x, mask), 1.0)
    for few in ([T, F, F, F], [F, F, F, F]):
        with pytest.raises(ValueError, match="at least 2"):
            masked_var(x, torch.tensor(few))


def test_whiten():
    x = torch.tensor([1.0, 2.0, 3.0, 100.0], dtype=torch.float64)
    mask = torch.tensor([T, T, T, F])
    s = 1 / math.sqrt(1 + 1e-8)  # mean 2, var 1 (above)
    close(whiten(x, mask), [-s, 0.0, s, 98 * s], tol=1e-12)  # outside the mask transformed too
    close(whiten(x, mask, shift_mean=False), [2 - s, 2.0, 2 + s, 2 + 98 * s], tol=1e-12)


def test_gae_by_hand():
    # gamma 0.9, lam 0.8 (gamma * lam = 0.72), r = [0, 0, 1], V = 0.5 everywhere:
    # t=2: delta = 1 - 0.5 = 0.5;                A = 0.5
    # t=1: delta = 0.9 * 0.5 - 0.5 = -0.05;      A = -0.05 + 0.72 * 0.5 = 0.31
    # t=0: delta = -0.05;                        A = -0.05 + 0.72 * 0.31 = 0.1732
    adv, ret = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.5, 0.5]]), gamma=0.9, lam=0.8)
    close(adv, [[0.1732, 0.31, 0.5]])
    close(ret, [[0.6732, 0.81, 1.0]])


def test_gae_with_gamma_and_lam_one_is_reward_to_go_minus_value():
    # A_t = sum_{k >= t} r_k - V_t: [6 - 0.5, 5 - 1, 3 - 2]; returns = reward-to-go [6, 5, 3]
    adv, ret = gae(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.5, 1.0, 2.0]]), gamma=1.0, lam=1.0)
    close(adv, [[5.5, 4.0, 1.0]])
    close(ret, [[6.0, 5.0, 3.0]])


def test_gae_nothing_leaks_back_from_zeroed_padding():
    # r = [0, 1, 0, 0], V = [0.2, 0.3, 0, 0] (zero past the value mask), gamma = lam = 1:
    # A3 = 0, A2 = 0, A1 = 1 - 0.3 = 0.7, A0 = 0 + 0.3 - 0.2 + 0.7 = 0.8
    adv, _ = gae(torch.tensor([[0.0, 1.0, 0.0, 0.0]]), torch.tensor([[0.2, 0.3, 0.0, 0.0]]), gamma=1.0, lam=1.0)
    close(adv, [[0.8, 0.7, 0.0, 0.0]])


def rollouts(mask, scores, logprobs=None, ref_logprobs=None, values=None, responses=None) -> Rollouts:
    mask = torch.tensor(mask)
    zeros = torch.zeros(mask.shape)
    responses = torch.ones(mask.shape, dtype=torch.long) if responses is None else torch.tensor(responses)
    return Rollouts(query_responses=torch.cat([torch.full((mask.shape[0], 1), 7), responses], 1), mask=mask,
                    logprobs=zeros if logprobs is None else torch.tensor(logprobs),
                    ref_logprobs=zeros if ref_logprobs is None else torch.tensor(ref_logprobs),
                    values=zeros if values is None else torch.tensor(values), scores=torch.tensor(scores))


def test_rollout_advantages_by_hand():
    # KL 0, V 0, gamma = lam = 1. Row 0 (last = 1): reward [0, 0, 1]; row 1 (full): reward [0, 0, -1].
    # A = returns = reward-to-go: row 0 [1, 1, 1], row 1 [-1, -1, -1].
    # Whitened over the response mask (5 values: 1, 1, -1, -1, -1): mean -0.2, deviations 1.2 x2, -0.8 x3,
    # var = (2 * 1.44 + 3 * 0.64) / 5 * 5/4 = 1.2 -> 1.2 / sqrt(1.2) = 1.0954451, -0.8 / sqrt(1.2) = -0.7302967
    adv = rollout_advantages(rollouts([[T, T, F], [T, T, T]], [1.0, -1.0]),
                             PPOUpdateConfig(gamma=1.0, lam=1.0, kl_coef=0.1))
    close(adv.advantages, [[1.0954451, 1.0954451, 0.0], [-0.7302967, -0.7302967, -0.7302967]])
    close(adv.returns, [[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])  # unwhitened: returns = A + V
    close(adv.kl, torch.zeros(2, 3))


def test_rollout_advantages_whitened_rewards_by_hand():
    # Rewards as above, whitened over the value mask (all 6 positions): [0, 0, 1, 0, 0, -1] has mean 0 and
    # var 2/6 * 6/5 = 0.4, so r -> r / sqrt(0.4) = +-1.5811388 (mean 0 added back). Returns: reward-to-go of
    # that; the whitened advantages are scale-free, the same as in the test above.
    adv = rollout_advantages(rollouts([[T, T, F], [T, T, T]], [1.0, -1.0]),
                             PPOUpdateConfig(gamma=1.0, lam=1.0, whiten_rewards=True))
    close(adv.returns, [[1.5811388] * 3, [-1.5811388] * 3])
    close(adv.advantages, [[1.0954451, 1.0954451, 0.0], [-0.7302967] * 3])


def test_rollout_advantages_with_kl_and_an_empty_row():
    # k1 KL of row 0 = [ln 2, 0] (log p = ln 0.5 vs ref ln 0.25 at t=0), kl_coef 0.5 -> reward -0.5 ln 2 at t=0;
    # the full row 0 gets its score 2 at t=1 (the last position). Row 1 is empty: its score -1 lands at t=0
    # (value mask keeps t=0), and it has no token to advantage.
    # gamma = lam = 1, V = 0: returns row 0 = [2 - 0.5 ln 2, 2] = [1.6534264, 2]; row 1 = [-1, 0].
    # Advantages whitened over row 0's 2 tokens: mean 1.8267132, deviations -+0.1732868, var = 2 * 0.0300283 / 2 * 2
    # = 0.0600566 -> -+0.1732868 / 0.2450645 = -+0.7071068; row 1: 0.
    adv = rollout_advantages(
        rollouts([[T, T], [F, F]], [2.0, -1.0], logprobs=[[math.log(0.5), 0.0], [0.0, 0.0]],
                 ref_logprobs=[[math.log(0.25), 0.0], [0.0, 0.0]]),
        PPOUpdateConfig(gamma=1.0, lam=1.0, kl_coef=0.5))
    close(adv.kl, [[LN2, 0.0], [0.0, 0.0]])
    close(adv.non_score_reward, [[-0.5 * LN2, 0.0], [0.0, 0.0]])
    close(adv.returns, [[2 - 0.5 * LN2, 2.0], [-1.0, 0.0]])
    close(adv.advantages, [[-0.7071068, 0.7071068], [0.0, 0.0]], tol=1e-5)


# --------------------------------------------------------------------------------- losses and statistics
def test_policy_loss_by_hand():
    # rho = [1.5, 0.5, 1.1, (masked)], A = [1, -1, 2, 100], eps = 0.2:
    # t0: max(-1.5, -1.2) = -1.2 (clipped binds); t1: max(0.5, 0.8) = 0.8 (binds); t2: -2.2 both (does not)
    # loss = (-1.2 + 0.8 - 2.2) / 3 = -0.8666667; clipfrac = 2/3
    new = torch.tensor([[math.log(1.5), math.log(0.5), math.log(1.1), 5.0]])
    loss, clipfrac = policy_loss(new, torch.zeros(1, 4), torch.tensor([[1.0, -1.0, 2.0, 100.0]]),
                                 torch.tensor([[T, T, T, F]]), cliprange=0.2)
    close(loss, -2.6 / 3)
    close(clipfrac, 2 / 3)


def test_value_loss_by_hand():
    # V_old = 0, c = 0.2, V = [0.5, -0.1, 0.3], G = [1, 1, 0]: V_clip = [0.2, -0.1, 0.2]
    # t0: max(0.25, 0.64) = 0.64 (binds); t1: 1.21 both; t2: max(0.09, 0.04) = 0.09
    # loss = 0.5 * (0.64 + 1.21 + 0.09) / 3 = 0.3233333; clipfrac 1/3
    loss, clipfrac = value_loss(torch.tensor([[0.5, -0.1, 0.3, 9.0]]), torch.zeros(1, 4),
                                torch.tensor([[1.0, 1.0, 0.0, 0.0]]), torch.tensor([[T, T, T, F]]), cliprange_value=0.2)
    close(loss, 0.5 * 1.94 / 3)
    close(clipfrac, 1 / 3)


def test_entropy():
    # uniform over 4: ln 4; p = [1/4, 3/4] (z = [0, ln 3]): -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.5623351
    close(entropy(torch.tensor([[0.0, 0.0, 0.0, 0.0]])), [math.log(4)])
    close(entropy(torch.tensor([[0.0, math.log(3)]])), [-(0.25 * math.log(0.25) + 0.75 * math.log(0.75))])


def test_approx_kl_is_a_plain_mean_over_all_positions():
    # 0.5 * (0.1^2 + 0.3^2 + 0) / 3 = 0.0166667 (the masked position counts as 0 in a mean over 3)
    close(approx_kl(torch.tensor([[0.1, 0.3, 9.0]]), torch.zeros(1, 3), torch.tensor([[T, T, F]])), 0.5 * 0.1 / 3)


# --------------------------------------------------------------------------------- the update
def test_one_update_of_a_two_parameter_model_by_hand():
    """Policy: the same logits w = [0, 0] at every position (p = 1/2); value: the same scalar v = 0 at
    every position. Two rollouts of two tokens, no EOS (full rows), sampled by this policy and its
    reference (log p = ln 1/2 for both, so KL = 0), scores [1, 0], gamma = lam = 1, one epoch, one
    mini-batch, SGD with lr 1, temperature 1 (logits / (1 + 1e-7), negligible here).

    Rewards: score at the last position -> [[0, 1], [0, 0]]; returns = A = [[1, 1], [0, 0]].
    Whitened A over 4 tokens: mean 0.5, var 4 * 0.25 / 4 * 4/3 = 1/3 -> +-0.5 * sqrt(3) = +-0.8660254.
    Policy loss at rho = 1: mean(-A) = 0. Its gradient: d log p(y) / d w_j = [j = y] - 1/2, so with
    tokens row 0 = [0, 0], row 1 = [1, 1]: dL/dw_0 = -(1/4) * (2 * 0.866 * 0.5 + 2 * (-0.866) * (-0.5))
    = -0.4330127 and dL/dw_1 = +0.4330127 -> w = [0.4330127, -0.4330127].
    Value loss: 0.5 * mean((0 - G)^2) = 0.5 * 0.5 = 0.25 over the 4 positions (value mask: all);
    d(0.1 * L_V)/dv = 0.1 * mean(v - G) = 0.1 * (-0.5) = -0.05 -> v = 0.05."""
    w = torch.nn.Parameter(torch.zeros(2))
    v = torch.nn.Parameter(torch.zeros(()))
    rolls = rollouts([[T, T], [T, T]], [1.0, 0.0], logprobs=[[-LN2, -LN2]] * 2, ref_logprobs=[[-LN2, -LN2]] * 2,
                     responses=[[0, 0], [1, 1]])
    seen = []

    def policy(query_responses):
        seen.append(query_responses.shape[0])
        return w.expand(*query_responses.shape, 2)

    stats = ppo_update(policy, lambda qr: v.expand(*qr.shape), rolls,
                       PPOUpdateConfig(num_ppo_epochs=1, num_mini_batches=1, gamma=1.0, lam=1.0, vf_coef=0.1,
                                       temperature=1.0),
                       torch.optim.SGD([w, v], lr=1.0))
    assert seen == [2]
    close(w.detach(), [0.4330127, -0.4330127])
    close(v.detach(), 0.05)
    expected = {"policy_loss": 0.0, "value_loss": 0.25, "clipfrac": 0.0, "value_clipfrac": 0.0, "approx_kl": 0.0,
                "ratio": 1.0, "policy_entropy": LN2, "kl": 0.0, "non_score_reward": 0.0, "reward": 0.5,
                "rlhf_reward": 0.5, "entropy": 2 * LN2}  # entropy: mean over rows of sum_t -log p = 2 ln 2
    assert {k: stats[k] for k in expected} == pytest.approx(expected, abs=1e-6)
    assert math.isnan(stats["ratio_var"])  # one optimizer step: no variance across steps


def test_update_epochs_and_mini_batches():
    w = torch.nn.Parameter(torch.zeros(2))
    calls, seen = [], []

    def order(n):
        calls.append(n)
        return [3, 1, 0, 2]

    def policy(query_responses):
        seen.append(query_responses[:, 0].tolist())  # the query token identifies the rollout
        return w.expand(*query_responses.shape, 2)

    rolls = rollouts([[T]] * 4, [1.0, 0.0, 1.0, 0.0], logprobs=[[-LN2]] * 4, ref_logprobs=[[-LN2]] * 4,
                     responses=[[0], [1], [0], [1]])
    rolls = Rollouts(**{**rolls.__dict__, "query_responses": torch.tensor([[10, 0], [11, 1], [12, 0], [13, 1]])})
    ppo_update(policy, lambda qr: torch.zeros(qr.shape) + 0 * w.sum(), rolls,
               PPOUpdateConfig(num_ppo_epochs=3, num_mini_batches=2), torch.optim.SGD([w], lr=0.1), permutation=order)
    assert calls == [4, 4, 4]  # one permutation per epoch
    assert seen == [[13, 11], [10, 12]] * 3  # mini-batches of 2 in the permuted order


def test_update_rejects_a_batch_that_does_not_split():
    with pytest.raises(ValueError, match="does not split into 3 mini-batches"):
        ppo_update(None, None, rollouts([[T]] * 4, [0.0] * 4), PPOUpdateConfig(num_mini_batches=3), None)


# --------------------------------------------------------------------------------- against TRL 1.12
def test_one_update_matches_trl_1_12_on_a_small_batch():
    """bench/ppo_crosscheck.py's small case: TRL 1.12's own PPOTrainer.train() on the same fixed batch,
    in its own process (the project runs a current TRL; `make install` keeps 1.12 in .venv/trl-1.12)."""
    assert (REPO / ".venv" / "trl-1.12" / "trl" / "experimental" / "ppo").is_dir(), \
        "TRL 1.12 for the cross-check is missing: run `make install`"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "ppo_crosscheck.py"), "--small"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "cross-check: PASS" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
