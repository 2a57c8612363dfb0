"""PPO for a LoRA policy and value function: the math of one update in small pure functions, and
the update loop (epochs x mini-batches) on a fixed batch of rollouts.

The math is TRL 1.12's ``trl.experimental.ppo.PPOTrainer`` (Ziegler et al. 2019's recipe), written
out so it outlives TRL's removal of that trainer; ``bench/ppo_crosscheck.py`` runs one update of
this module and one of TRL's own loop on the same fixed batch and compares losses, KL and the updated
adapter weights. Rollout generation and scoring are the caller's; this module sees tensors only.

Notation (B rollouts, Q query tokens left-padded, R response tokens right-padded, V vocabulary):

- ``query_responses`` [B, Q+R]: query ids then response ids; the pad id marks padding on both sides.
- response mask m[b, t] [B, R]: True on the real response tokens, up to and including EOS; a prefix
  of each row (``response_mask``). last[b] = sum_t m[b, t] - 1 is the index of the last real token
  (-1 for a row with none).
- value mask m1[b, t] = t <= last[b] + 1: the real tokens and one position more (TRL's
  ``~padding_mask_p1``). The score is credited at that extra position (``token_rewards``) and the
  value there is trained, so the value of "the response has ended" is learnt too.
- Log-probabilities are of the *temperature-scaled* logits z / (T + 1e-7), as the sampler saw them.
  Outside m they count as equal to the old ones (TRL fills both with ``INVALID_LOGPROB`` = 1): the
  per-token KL and log-ratio are 0 there and the ratio is 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

TEMPERATURE_EPS = 1e-7  # TRL divides the logits by (temperature + 1e-7), at sampling and in the loss
WHITEN_EPS = 1e-8


# --------------------------------------------------------------------------------- rollout tensors
def model_inputs(query_responses: torch.Tensor, pad_token_id: int) -> dict[str, torch.Tensor]:
    """The keyword arguments a causal LM reads a padded batch with (TRL's ``forward``):
    attention_mask a = (ids != pad); position_ids p_t = sum_{s<=t} a_s - 1 (exclusive cumulative
    sum: the first real token is at position 0 whatever the left padding); input_ids with pads
    replaced by 0 (any valid id: attention never reads them)."""
    attention_mask = query_responses != pad_token_id
    return {"input_ids": torch.masked_fill(query_responses, ~attention_mask, 0), "attention_mask": attention_mask,
            "position_ids": attention_mask.cumsum(1) - attention_mask.long()}


def truncate_after(responses: torch.Tensor, stop_token_id: int, pad_token_id: int) -> torch.Tensor:
    """Each response cut after its first stop token: y'_t = y_t for t <= first stop, else pad
    (TRL's ``truncate_response``; a row without the stop token is unchanged)."""
    is_stop = responses == stop_token_id
    first = torch.where(is_stop.any(-1), is_stop.int().argmax(-1), responses.shape[1])
    return torch.masked_fill(responses, torch.arange(responses.shape[1], device=responses.device) > first[:, None],
                             pad_token_id)


def response_mask(responses: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """m[b, t] = t < (index of the first pad in row b, or R): the real tokens of truncated responses
    (TRL's ``padding_mask`` negated: sequence_length = first pad - 1)."""
    is_pad = responses == pad_token_id
    first = torch.where(is_pad.any(-1), is_pad.int().argmax(-1), responses.shape[1])
    return torch.arange(responses.shape[1], device=responses.device) < first[:, None]


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """last[b] = sum_t m[b, t] - 1: the last real token of each row (-1 for an empty row)."""
    return mask.long().sum(-1) - 1


def value_mask(mask: torch.Tensor) -> torch.Tensor:
    """m1[b, t] = t <= last[b] + 1: the real tokens and the position after them (TRL's ``~padding_mask_p1``)."""
    return torch.arange(mask.shape[1], device=mask.device) <= (last_token_index(mask) + 1)[:, None]


# --------------------------------------------------------------------------------- log-probs, KL, rewards
def scale_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """z / (T + 1e-7): the logits the sampler drew from (T = sampling temperature)."""
    return logits / (temperature + TEMPERATURE_EPS)


def response_logits(logits: torch.Tensor, response_length: int) -> torch.Tensor:
    """The logits that predict the response tokens: positions Q-1 .. Q+R-2 of the [B, Q+R, V] output
    (position t predicts token t+1)."""
    return logits[:, -response_length - 1:-1]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log pi(y_t) = z_{t, y_t} - logsumexp_v z_{t, v}, for logits z [.., V] and tokens y [..]."""
    return torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)


def per_token_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                 estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) at the sampled tokens, 0 outside the mask
    (http://joschu.net/blog/kl-approx.html; TRL's ``kl_estimator``), with log r = log pi_ref - log pi:
    k1 = -log r = log pi - log pi_ref;  k3 = (r - 1) - log r (>= 0, lower variance)."""
    logr = ref_logprobs - logprobs
    if estimator == "k1":
        kl = -logr
    elif estimator == "k3":
        kl = (logr.exp() - 1) - logr
    else:
        raise ValueError(f"kl_estimator must be 'k1' or 'k3', not {estimator!r}")
    return torch.where(mask, kl, torch.zeros_like(kl))


def missing_eos_penalty(scores: torch.Tensor, contains_eos: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """s'_b = s_b - penalty * [response b has no EOS] (unchanged when penalty is None): a response
    cut off at the length limit is scored lower than the reward model alone would score it."""
    if penalty is None:
        return scores
    return scores - penalty * (~contains_eos).to(scores.dtype)


def token_rewards(kl: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """r[b, t] = -beta * kl[b, t] + s_b * [t = e_b],  e_b = min(last[b] + 1, R - 1).

    The KL penalty at every token and the sequence score s at one token. As in TRL 1.12, that token
    is the one *after* the last real token (the first padding position, whose value is still trained:
    see ``value_mask``), or the last token when the response fills all R positions."""
    rewards = -kl_coef * kl
    end = torch.clamp(last_token_index(mask) + 1, max=kl.shape[1] - 1)
    rewards[torch.arange(kl.shape[0], device=kl.device), end] += scores
    return rewards


# --------------------------------------------------------------------------------- advantages
def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """mean over the mask: sum(x * m) / sum(m) (over ``dim``, or over everything)."""
    if dim is None:
        return (values * mask).sum() / mask.sum()
    return (values * mask).sum(dim) / mask.sum(dim)


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance over the mask: n / (n - 1) * mean_m((x - mean_m(x))^2), n = sum(m).
    Needs n >= 2 (TRL would divide by zero at n = 1 and raise at n = 0)."""
    n = mask.sum()
    if n < 2:
        raise ValueError(f"whitening needs at least 2 unmasked values, got {int(n)}")
    mean = masked_mean(values, mask)
    return masked_mean((values - mean) ** 2, mask) * (n / (n - 1))


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mu) / sqrt(var + 1e-8) with mu, var over the mask (``masked_var``: unbiased); with
    shift_mean=False the mean is added back, (x - mu) / sqrt(var + 1e-8) + mu (TRL's ``masked_whiten``).
    Positions outside the mask are transformed too; callers zero them."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + WHITEN_EPS)
    return whitened if shift_mean else whitened + mean


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over the R positions, right to left:
    delta_t = r_t + gamma * V_{t+1} - V_t  (V_R = 0);  A_t = delta_t + gamma * lam * A_{t+1}  (A_R = 0);
    returns G_t = A_t + V_t. Masking is the caller's: values (and rewards) are 0 after the value mask,
    so A_t = 0 there and nothing leaks backwards from padding."""
    advantages = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = delta + gamma * lam * next_adv
        advantages[:, t] = next_adv
        next_value = values[:, t]
    return advantages, advantages + values


# --------------------------------------------------------------------------------- losses and statistics
def log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log rho = log pi - log pi_old on the mask, 0 outside it (TRL: both are INVALID_LOGPROB there)."""
    return torch.where(mask, logprobs - old_logprobs, torch.zeros_like(logprobs))


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate, and the share of tokens where clipping binds:
    rho = exp(log pi - log pi_old) (1 outside the mask);
    L = mean_m max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps));  clipfrac = mean_m [clipped term > unclipped]."""
    ratio = torch.exp(log_ratio(logprobs, old_logprobs, mask))
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    return masked_mean(torch.max(unclipped, clipped), mask), masked_mean((clipped > unclipped).float(), mask)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss, and the share of positions where clipping binds:
    V_clip = clip(V, V_old - c, V_old + c);  L = 1/2 * mean_m max((V - G)^2, (V_clip - G)^2);
    clipfrac = mean_m [(V_clip - G)^2 > (V - G)^2]. ``mask`` is the value mask."""
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    unclipped = torch.square(values - returns)
    clipped = torch.square(clipped_values - returns)
    return 0.5 * masked_mean(torch.max(unclipped, clipped), mask), masked_mean((clipped > unclipped).float(), mask)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """H = -sum_v p_v log p_v = logsumexp(z) - sum_v softmax(z)_v * z_v, per position of logits z [.., V]."""
    return torch.logsumexp(logits, -1) - torch.sum(torch.softmax(logits, -1) * logits, -1)


def approx_kl(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1/2 * mean over all B x R positions of (log pi - log pi_old)^2, the log-ratio being 0 outside the
    mask (TRL's ``approxkl``: a plain mean, so padding counts in the denominator)."""
    return 0.5 * (log_ratio(logprobs, old_logprobs, mask) ** 2).mean()


# --------------------------------------------------------------------------------- the update
@dataclass(frozen=True)
class PPOUpdateConfig:
    """The knobs of one PPO update (defaults: ``PPOSpec``'s)."""

    num_ppo_epochs: int = 4
    num_mini_batches: int = 1
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    whiten_rewards: bool = False
    temperature: float = 0.7


@dataclass(frozen=True)
class Rollouts:
    """A batch of sampled, scored rollouts, computed before the update with no gradient.

    query_responses [B, Q+R]; mask [B, R] the response mask (``response_mask``); logprobs and
    ref_logprobs [B, R] of the sampled tokens under the sampling policy and the reference (both at
    the sampling temperature); values [B, R] the value function at the positions that predict each
    response token; scores [B] the sequence scores (any ``missing_eos_penalty`` already applied)."""

    query_responses: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor

    @property
    def responses(self) -> torch.Tensor:
        return self.query_responses[:, -self.mask.shape[1]:]


@dataclass(frozen=True)
class Advantages:
    """What the update trains towards, fixed for all its epochs: the per-token KL, the KL part of the
    reward (-beta * kl), the whitened advantages (0 outside the mask), the returns, and the values
    (0 outside the value mask)."""

    kl: torch.Tensor
    non_score_reward: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    values: torch.Tensor


def rollout_advantages(rollouts: Rollouts, config: PPOUpdateConfig) -> Advantages:
    """kl -> token rewards (optionally whitened over the value mask, mean kept) -> GAE -> advantages
    whitened over the response mask, in TRL 1.12's order. Returns are from the unwhitened advantages."""
    mask = rollouts.mask
    vmask = value_mask(mask)
    kl = per_token_kl(rollouts.logprobs, rollouts.ref_logprobs, mask, config.kl_estimator)
    rewards = token_rewards(kl, rollouts.scores, mask, config.kl_coef)
    if config.whiten_rewards:
        rewards = torch.masked_fill(whiten(rewards, vmask, shift_mean=False), ~vmask, 0)
    values = torch.masked_fill(rollouts.values, ~vmask, 0)
    advantages, returns = gae(rewards, values, config.gamma, config.lam)
    advantages = torch.masked_fill(whiten(advantages, mask), ~mask, 0)
    return Advantages(kl=kl, non_score_reward=-config.kl_coef * kl, advantages=advantages, returns=returns,
                      values=values)


def ppo_update(policy: Callable[[torch.Tensor], torch.Tensor], value_fn: Callable[[torch.Tensor], torch.Tensor],
               rollouts: Rollouts, config: PPOUpdateConfig, optimizer: torch.optim.Optimizer, *,
               permutation: Callable[[int], Sequence[int]] | None = None) -> dict[str, float]:
    """One PPO update on a fixed batch: ``num_ppo_epochs`` passes, each over a fresh permutation of
    the B rollouts cut into ``num_mini_batches`` mini-batches; one optimizer step per mini-batch on
    loss = policy_loss + vf_coef * value_loss.

    ``policy(query_responses)`` returns logits [b, Q+R, V] and ``value_fn(query_responses)`` values
    [b, Q+R] (or [b, Q+R, 1]), both with the gradient on; the optimizer holds their trainable
    parameters. ``permutation(B)`` gives each epoch's order (default ``torch.randperm``).

    Returned statistics (TRL 1.12's log name in brackets), over the rollouts:
    reward = mean s [objective/scores]; kl = mean_b sum_t kl [objective/kl];
    non_score_reward = mean_b sum_t -beta * kl [objective/non_score_reward];
    rlhf_reward = non_score_reward + reward [objective/rlhf_reward];
    entropy = mean_b sum_t -m * log pi_old [objective/entropy]; and averaged over the optimizer steps:
    policy_loss [loss/policy_avg], value_loss [loss/value_avg], approx_kl [policy/approxkl_avg],
    clipfrac [policy/clipfrac_avg], value_clipfrac [val/clipfrac_avg], policy_entropy = mean entropy
    of the scaled logits over all positions [policy/entropy_avg], ratio = mean rho over all positions
    [val/ratio] and ratio_var = its unbiased variance across steps [val/ratio_var]."""
    batch = rollouts.query_responses.shape[0]
    if config.num_ppo_epochs < 1 or config.num_mini_batches < 1 or batch % config.num_mini_batches:
        raise ValueError(f"the batch of {batch} rollouts does not split into {config.num_mini_batches} mini-batches "
                         f"(or num_ppo_epochs {config.num_ppo_epochs} < 1)")
    mini = batch // config.num_mini_batches
    order = permutation or (lambda n: torch.randperm(n).tolist())
    with torch.no_grad():
        adv = rollout_advantages(rollouts, config)
    vmask = value_mask(rollouts.mask)
    responses = rollouts.responses
    steps: list[dict[str, torch.Tensor]] = []
    for _ in range(config.num_ppo_epochs):
        perm = torch.as_tensor(list(order(batch)), dtype=torch.long)
        for start in range(0, batch, mini):
            idx = perm[start:start + mini]
            m, vm = rollouts.mask[idx], vmask[idx]
            logits = scale_logits(response_logits(policy(rollouts.query_responses[idx]), responses.shape[1]),
                                  config.temperature)
            logprobs = token_logprobs(logits, responses[idx])
            values = value_fn(rollouts.query_responses[idx])
            values = values.squeeze(-1) if values.dim() == 3 else values
            values = torch.masked_fill(values[:, -responses.shape[1] - 1:-1], ~vm, 0)
            pg_loss, pg_clipfrac = policy_loss(logprobs, rollouts.logprobs[idx], adv.advantages[idx], m,
                                               config.cliprange)
            vf_loss, vf_clipfrac = value_loss(values, adv.values[idx], adv.returns[idx], vm, config.cliprange_value)
            loss = pg_loss + config.vf_coef * vf_loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            with torch.no_grad():
                steps.append({"policy_loss": pg_loss.detach(), "value_loss": vf_loss.detach(),
                              "approx_kl": approx_kl(logprobs, rollouts.logprobs[idx], m), "clipfrac": pg_clipfrac,
                              "value_clipfrac": vf_clipfrac, "policy_entropy": entropy(logits).mean(),
                              "ratio": log_ratio(logprobs, rollouts.logprobs[idx], m).exp().mean()})
    with torch.no_grad():
        per_step = {k: torch.stack([s[k] for s in steps]) for k in steps[0]}
        stats = {k: float(v.mean()) for k, v in per_step.items()}
        stats["ratio_var"] = float(per_step["ratio"].var()) if len(steps) > 1 else float("nan")
        return stats | rollout_stats(rollouts, adv)


def rollout_stats(rollouts: Rollouts, adv: Advantages) -> dict[str, float]:
    """The batch's objective (see ``ppo_update``): reward = mean s; kl = mean_b sum_t kl;
    non_score_reward = mean_b sum_t -beta * kl; rlhf_reward = non_score_reward + reward;
    entropy = mean_b sum_t -m * log pi_old (a sampled-token estimate of the sequence entropy)."""
    scores, non_score = rollouts.scores, adv.non_score_reward.sum(1).mean()
    sampled = torch.where(rollouts.mask, -rollouts.logprobs, torch.zeros_like(rollouts.logprobs))
    return {"reward": float(scores.mean()), "kl": float(adv.kl.sum(1).mean()), "non_score_reward": float(non_score),
            "rlhf_reward": float(non_score + scores.mean()), "entropy": float(sampled.sum(1).mean())}
