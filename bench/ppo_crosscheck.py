"""Cross-check: one PPO update of ``alignment.ppo`` against TRL 1.12's own ``PPOTrainer`` loop.

Both start from the same fixed batch: a tiny random Llama (built here, as tests/conftest.py builds
its tiny model, with the embedded model's tokenizer and chat template), a LoRA policy and a LoRA
value model (sequence-classification head) with the same initial weights, chat-templated queries,
fixed response tokens (EOS early, EOS last, no EOS, EOS first), fixed scores. The policy's LoRA B
matrices start non-zero, so the policy differs from the reference (adapters off) and the KL is not 0.

TRL side: ``PPOTrainer.train()`` runs unmodified except that generation (``batch_generation``)
returns the fixed responses and the logits that sampled them, the reward model is a module that
returns the fixed scores, and the data loader yields the fixed queries in order. TRL itself computes
the old/ref log-probs, values, rewards, GAE, whitening and the epochs x mini-batches loop.

Ours: the same rollout tensors computed with ``alignment.ppo``'s helpers, then ``ppo_update``.

Both use the same optimizer (torch AdamW, no weight decay) and the same mini-batch permutations
(numpy's legacy RNG seeded alike: TRL draws ``np.random.permutation`` once per epoch). Compared:
every logged loss and statistic, and every trainable adapter weight after the update.

    python bench/ppo_crosscheck.py       # two cases, ~40 s on 2 CPU cores; exit 1 on any FAIL

The project itself runs a current TRL, which no longer has ``trl.experimental.ppo``; ``make install``
puts TRL 1.12 in ``.venv/trl-1.12`` (not on the venv's path), and this script puts it first on its
own path, so the check runs in its own process.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
TRL_1_12 = REPO / ".venv" / "trl-1.12"  # `make install` puts TRL 1.12 here, for this check only
sys.path.insert(0, str(REPO))
if TRL_1_12.is_dir():
    sys.path.insert(0, str(TRL_1_12))
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from alignment.ppo import (PPOUpdateConfig, Rollouts, missing_eos_penalty, model_inputs, ppo_update,  # noqa: E402
                           response_logits, response_mask, scale_logits, token_logprobs)

# Our statistic -> TRL 1.12's log name.
TRL_NAMES = {
    "reward": "objective/scores", "kl": "objective/kl", "non_score_reward": "objective/non_score_reward",
    "rlhf_reward": "objective/rlhf_reward", "entropy": "objective/entropy", "policy_loss": "loss/policy_avg",
    "value_loss": "loss/value_avg", "approx_kl": "policy/approxkl_avg", "clipfrac": "policy/clipfrac_avg",
    "value_clipfrac": "val/clipfrac_avg", "policy_entropy": "policy/entropy_avg", "ratio": "val/ratio",
    "ratio_var": "val/ratio_var",
}
# Float32 on CPU, the same operations in nearly the same order: differences are rounding only.
STAT_TOLERANCE = 1e-5     # absolute, on every statistic
WEIGHT_TOLERANCE = 1e-6   # absolute, max over every trainable adapter weight (lr 1e-3: a step moves ~1e-3)

PROMPTS = ["Name a colour.", "What is two plus two?", "Say hello.", "Write a haiku about rain.",
           "Is the sea salty?", "Count to three.", "Why is the sky blue?", "Give me a word that rhymes with cat."]


@dataclass(frozen=True)
class Case:
    """One cross-check: the batch shape, the update's knobs and the missing-EOS penalty."""

    name: str
    batch_size: int = 8
    response_length: int = 6
    update: PPOUpdateConfig = field(default_factory=PPOUpdateConfig)
    missing_eos_penalty: float | None = None
    learning_rate: float = 1e-3
    seed: int = 0


CASES = [
    Case("k1, 2 epochs x 2 mini-batches, EOS penalty",
         update=PPOUpdateConfig(num_ppo_epochs=2, num_mini_batches=2, kl_estimator="k1", kl_coef=0.05, gamma=1.0,
                                lam=0.95, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, temperature=0.7),
         missing_eos_penalty=1.0),
    Case("k3, whitened rewards, gamma 0.9, 3 epochs x 1 mini-batch",
         update=PPOUpdateConfig(num_ppo_epochs=3, num_mini_batches=1, kl_estimator="k3", kl_coef=0.2, gamma=0.9,
                                lam=0.8, cliprange=0.1, cliprange_value=0.05, vf_coef=0.5, temperature=1.0,
                                whiten_rewards=True), seed=1),
]
SMALL = Case("small: k1, 2 epochs x 2 mini-batches", batch_size=4, response_length=4,
             update=PPOUpdateConfig(num_ppo_epochs=2, num_mini_batches=2), missing_eos_penalty=0.5)


# --------------------------------------------------------------------------------- the fixed batch
def load_tokenizer():
    from transformers import AutoTokenizer

    from alignment.models import embedded_model_dir
    from alignment.perl_training import choose_pad_token

    tok = AutoTokenizer.from_pretrained(embedded_model_dir())
    tok.pad_token = choose_pad_token(tok)
    return tok


def tiny_models(tokenizer, seed: int):
    """(policy, value): a 2-layer random Llama with LoRA r=4 on q/k/v/o, and a sequence-classification
    model on the same base weights with its own LoRA and head. Dropout 0 (TRL disables it)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True, num_labels=1,
    )
    torch.manual_seed(seed)
    base = LlamaForCausalLM(config)
    critic = LlamaForSequenceClassification(config)
    critic.model.load_state_dict(base.model.state_dict())
    lora = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    policy = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **lora))
    value = get_peft_model(critic, LoraConfig(task_type="SEQ_CLS", **lora))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # B != 0: the policy starts away from its reference (adapters off)
        for name, p in [*policy.named_parameters(), *value.named_parameters()]:
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    return policy, value


def fixed_batch(tokenizer, case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(queries [B, Q] left-padded, responses [B, R], scores [B]). Response layouts cycle through:
    EOS in the middle, EOS at the last position, no EOS (cut at the length limit), EOS first."""
    from alignment.perl_training import prompt_ids

    pad, eos, r = tokenizer.pad_token_id, tokenizer.eos_token_id, case.response_length
    ids = [prompt_ids(tokenizer, PROMPTS[i % len(PROMPTS)]) for i in range(case.batch_size)]
    q = max(map(len, ids))
    queries = torch.tensor([[pad] * (q - len(x)) + x for x in ids])
    gen = torch.Generator().manual_seed(case.seed + 2)
    responses = torch.randint(3, 2000, (case.batch_size, r), generator=gen)  # ordinary tokens, none pad/EOS
    for b, eos_at in enumerate([r // 2, r - 1, None, 0][i % 4] for i in range(case.batch_size)):
        if eos_at is not None:
            responses[b, eos_at] = eos
            responses[b, eos_at + 1:] = pad
    scores = torch.randn(case.batch_size, generator=gen)
    return queries, responses, scores


def causal_logits(model, pad_token_id: int):
    return lambda query_responses: model(**model_inputs(query_responses, pad_token_id)).logits


def value_head(model, pad_token_id: int):
    """The value model read as TRL reads it: the backbone's last hidden state through the score head."""
    backbone = getattr(model, model.base_model_prefix)
    return lambda query_responses: model.score(
        backbone(**model_inputs(query_responses, pad_token_id), output_hidden_states=True).hidden_states[-1])


def trainable(*models) -> dict[str, torch.Tensor]:
    return {f"{i}.{n}": p.detach().clone() for i, m in enumerate(models) for n, p in m.named_parameters() if p.requires_grad}


def adamw(models, lr: float):
    return torch.optim.AdamW([p for m in models for p in m.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)


# --------------------------------------------------------------------------------- the two updates
def ours(policy, value, tokenizer, queries, responses, scores, case: Case) -> tuple[dict, dict]:
    cfg, pad = case.update, tokenizer.pad_token_id
    query_responses = torch.cat([queries, responses], 1)
    actor, critic = causal_logits(policy, pad), value_head(value, pad)
    with torch.no_grad():
        sampler = scale_logits(response_logits(actor(query_responses), responses.shape[1]), cfg.temperature)
        with policy.disable_adapter():
            ref = scale_logits(response_logits(actor(query_responses), responses.shape[1]), cfg.temperature)
        rollouts = Rollouts(
            query_responses=query_responses, mask=response_mask(responses, pad),
            logprobs=token_logprobs(sampler, responses), ref_logprobs=token_logprobs(ref, responses),
            values=critic(query_responses).squeeze(-1)[:, -responses.shape[1] - 1:-1],
            scores=missing_eos_penalty(scores, (responses == tokenizer.eos_token_id).any(-1), case.missing_eos_penalty))
    policy.train(), value.train()
    rng = np.random.RandomState(case.seed)
    stats = ppo_update(actor, critic, rollouts, cfg, adamw([policy, value], case.learning_rate),
                       permutation=rng.permutation)
    return stats, trainable(policy, value)


class FixedScores(torch.nn.Module):
    """A stand-in reward model for TRL's ``get_reward``: its "backbone" returns each row's fixed score
    at every position and ``score`` is the identity, so whichever position TRL reads is that score."""

    base_model_prefix = "backbone"

    def __init__(self, scores: torch.Tensor):
        super().__init__()
        self.register_buffer("scores", scores.clone())
        self.score = torch.nn.Identity()

    def backbone(self, input_ids, **_ignored):
        return SimpleNamespace(hidden_states=(self.scores[:, None, None].expand(-1, input_ids.shape[1], 1),))


def trl(policy, value, tokenizer, queries, responses, scores, case: Case, work: Path) -> tuple[dict, dict]:
    import trl.experimental.ppo.ppo_trainer as trl_ppo
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    cfg = case.update
    with torch.no_grad():
        query_responses = torch.cat([queries, responses], 1)
        sampler = scale_logits(response_logits(causal_logits(policy, tokenizer.pad_token_id)(query_responses),
                                               responses.shape[1]), cfg.temperature)
    args = PPOConfig(
        output_dir=str(work), per_device_train_batch_size=case.batch_size, gradient_accumulation_steps=1,
        num_mini_batches=cfg.num_mini_batches, total_episodes=case.batch_size, num_ppo_epochs=cfg.num_ppo_epochs,
        learning_rate=case.learning_rate, lr_scheduler_type="constant", kl_coef=cfg.kl_coef,
        kl_estimator=cfg.kl_estimator, cliprange=cfg.cliprange, cliprange_value=cfg.cliprange_value,
        vf_coef=cfg.vf_coef, gamma=cfg.gamma, lam=cfg.lam, response_length=case.response_length,
        temperature=cfg.temperature, stop_token="eos", missing_eos_penalty=case.missing_eos_penalty,
        whiten_rewards=cfg.whiten_rewards, local_rollout_forward_batch_size=case.batch_size,
        num_sample_generations=0, save_strategy="no", logging_steps=1, report_to=[], seed=case.seed, use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    dataset = Dataset.from_list([{"input_ids": q} for q in queries.tolist()])
    trainer = PPOTrainer(
        args=args, processing_class=tokenizer, model=policy, ref_model=None, reward_model=FixedScores(scores),
        train_dataset=dataset, value_model=value, optimizers=(adamw([policy, value], case.learning_rate), None),
    )
    trainer.dataloader = [{"input_ids": queries}]  # the fixed queries, in the fixed order

    def fixed_generation(model, q, *_args, **_kw):
        assert torch.equal(q, queries), "TRL asked to generate for other queries than the fixed batch"
        return query_responses, sampler

    real = trl_ppo.batch_generation
    trl_ppo.batch_generation = fixed_generation
    trainer.remove_callback(PrinterCallback)  # TRL prints every log dict; the table shows them
    try:
        np.random.seed(case.seed)  # TRL's mini-batch permutations: np.random.permutation per epoch
        with contextlib.redirect_stdout(io.StringIO()):  # "===training policy==="
            trainer.train()
    finally:
        trl_ppo.batch_generation = real
    logged = next(h for h in reversed(trainer.state.log_history) if "loss/policy_avg" in h)
    return {k: logged[v] for k, v in TRL_NAMES.items()}, trainable(policy, value)


# --------------------------------------------------------------------------------- comparison
@dataclass(frozen=True)
class Row:
    name: str
    ours: float
    trl: float
    diff: float
    tolerance: float

    @property
    def ok(self) -> bool:
        both_nan = np.isnan(self.ours) and np.isnan(self.trl)
        return both_nan or self.diff <= self.tolerance


def crosscheck(case: Case, tokenizer=None, work: Path | None = None) -> list[Row]:
    """Run both updates on the case's fixed batch; one row per statistic and one for the weights."""
    import tempfile

    tokenizer = tokenizer or load_tokenizer()
    policy, value = tiny_models(tokenizer, case.seed)
    queries, responses, scores = fixed_batch(tokenizer, case)
    before = trainable(policy, value)
    with tempfile.TemporaryDirectory() as tmp:
        ours_stats, ours_w = ours(copy.deepcopy(policy), copy.deepcopy(value), tokenizer, queries, responses, scores, case)
        trl_stats, trl_w = trl(copy.deepcopy(policy), copy.deepcopy(value), tokenizer, queries, responses, scores, case,
                               Path(work or tmp))
    rows = [Row(k, ours_stats[k], trl_stats[k], abs(ours_stats[k] - trl_stats[k]), STAT_TOLERANCE) for k in TRL_NAMES]
    assert ours_w.keys() == trl_w.keys() == before.keys()
    # The weights row: ours / TRL columns are the largest step the update made to any weight; |diff| is
    # the largest difference between the two updated weights.
    rows.append(Row(f"adapter weights ({len(before)} tensors)", max_abs(ours_w, before), max_abs(trl_w, before),
                    max_abs(ours_w, trl_w), WEIGHT_TOLERANCE))
    return rows


def max_abs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max over tensors and elements of |a - b|."""
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def table(case: Case, rows: list[Row]) -> str:
    lines = [f"## {case.name}: B={case.batch_size}, R={case.response_length}, {asdict(case.update)}",
             f"{'quantity':<32} {'ours':>14} {'TRL 1.12':>14} {'|diff|':>10} {'tolerance':>10}  result"]
    for r in rows:
        lines.append(f"{r.name:<32} {r.ours:>14.7g} {r.trl:>14.7g} {r.diff:>10.2e} {r.tolerance:>10.0e}  "
                     f"{'PASS' if r.ok else 'FAIL'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="only the small case the unit test runs")
    opts = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    tokenizer = load_tokenizer()
    failed = 0
    for case in [SMALL] if opts.small else CASES:
        t = time.perf_counter()
        rows = crosscheck(case, tokenizer)
        print(table(case, rows), f"\n({time.perf_counter() - t:.1f} s)\n", flush=True)
        failed += sum(not r.ok for r in rows)
    print("cross-check:", "FAIL" if failed else "PASS", f"({failed} rows out of tolerance)" if failed else "")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
