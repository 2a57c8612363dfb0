"""PERL training jobs: a LoRA reward model (TRL ``RewardTrainer``) and LoRA PPO (``trl.experimental.ppo``).

Runs in-process or as ``python -m alignment.perl_training rm|ppo SPEC.json`` (what the flow does),
so a cluster can put ``accelerate launch -m alignment.perl_training`` in its place.

Reward model: ``AutoModelForSequenceClassification`` (one output) on the base, LoRA on the
attention projections with ``task_type="SEQ_CLS"`` (PEFT then also trains the new ``score``
head, which has no pretrained weights), Bradley-Terry loss −log σ(r(x, y_c) − r(x, y_r)).
The tokens it trains on are exactly those it scores and PPO shows it (``rm_input_ids``): the
chat-template prompt with the assistant header, tokenized without special tokens (the template
holds any BOS), + the response + EOS; the score is read at the EOS token.

PPO: the policy is the base + a LoRA adapter; the reference is the same module with adapters
disabled (TRL's ``null_ref_context``), so there is no second copy of the policy; the value model
is a sequence-classification model with its own LoRA, initialised from the reward model's adapter
and head when there is one (TRL's convention: value model = reward model at start). The reward
model is merged and frozen. Rollouts are sampled by TRL with ``model.generate`` (not vLLM).

Padding. SmolLM2 (and many chat models) use EOS ``<|im_end|>`` as the pad token, and that token
also ends every chat turn inside the prompt. TRL's PPO treats every pad-id token as padding (it
masks it out of the attention and replaces it by id 0), which would silently delete the turn
ends from every prompt. ``choose_pad_token`` picks a special token that the chat template never
emits (``<|endoftext|>`` for SmolLM2) for both the RM and PPO; no embedding is resized, so the
adapters stay valid on the unmodified base (vLLM serves them as is).

A ``reward(prompt, response) -> float`` function is used in place of the reward model through
``function_reward_model``: TRL's PPO calls ``get_reward(model, ...)``, which runs
``getattr(model, model.base_model_prefix)(...)`` and reads ``model.score(hidden_states[-1])`` at the
last response token. ``function_reward_model``'s "backbone" decodes each sequence, splits it into the
known query (looked up by its token ids — the rollout queries are exactly the dataset's
``input_ids``) and the response, calls the function, and returns the score at every position,
so whichever position TRL reads is that score. No TRL code is patched.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

from alignment.training import file_hash

DEFAULT_LORA = {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}


# --------------------------------------------------------------------------------- specs
@dataclass
class RMSpec:
    base: str
    train_data: str  # jsonl of {prompt, chosen, rejected} (plain strings)
    heldout_data: str | None  # same, for pairwise accuracy (None/empty = no held-out)
    output_dir: str  # where the adapter goes ("" = do not save; the bench)
    checkpoint_dir: str
    learning_rate: float = 1e-4
    epochs: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 512
    save_steps: int = 50
    max_steps: int = -1  # > 0: stop after N optimizer steps (bench)
    seed: int = 0
    lora: dict | None = field(default_factory=lambda: dict(DEFAULT_LORA))  # None = full fine-tuning (bench)
    crash_prefix: str = ""


@dataclass
class PPOSpec:
    base: str
    prompts: str  # jsonl of {prompt}
    output_dir: str  # policy adapter; value adapter in output_dir/value ("" = do not save)
    checkpoint_dir: str
    reward_adapter: str | None = None  # RM adapter dir, or
    reward_function: str | None = None  # "module:function"
    steps: int = 10
    batch_size: int = 4
    grad_accum: int = 1
    num_mini_batches: int = 1
    num_ppo_epochs: int = 4
    learning_rate: float = 1e-4
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    response_length: int = 53
    temperature: float = 0.7
    missing_eos_penalty: float | None = None
    whiten_rewards: bool = False
    save_steps: int = 10
    seed: int = 0
    lora: dict | None = field(default_factory=lambda: dict(DEFAULT_LORA))  # None = full fine-tuning (bench)
    value_lora: dict | None = field(default_factory=lambda: dict(DEFAULT_LORA))
    crash_prefix: str = ""


# --------------------------------------------------------------------------------- helpers
def choose_pad_token(tokenizer) -> str:
    """A pad token that never occurs inside a chat-templated prompt (see module docstring)."""
    sample = ""
    if getattr(tokenizer, "chat_template", None):
        sample = tokenizer.apply_chat_template(
            [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}],
            tokenize=False)
    avoid = {tokenizer.eos_token, tokenizer.bos_token}
    pad = tokenizer.pad_token
    if pad is not None and pad not in avoid and pad not in sample:
        return pad
    for cand in list(tokenizer.all_special_tokens) + list(tokenizer.get_added_vocab()):
        if cand and cand not in avoid and cand not in sample:
            return cand
    raise ValueError("the tokenizer has no spare special token to pad with (its pad token is EOS or used by the chat "
                     "template); add one and resize the model's embeddings first")


def load_tokenizer(base: str, padding_side: str = "right"):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    tok.pad_token = choose_pad_token(tok)
    tok.padding_side = padding_side
    return tok


def render_prompt(tokenizer, prompt: str) -> str:
    """The policy's input for a prompt: the chat template with the assistant header (PPO query, RM prefix)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return prompt + "\n"


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The PPO query for a prompt as token ids: ``render_prompt`` tokenized *without* special tokens.
    The chat template already holds any BOS; a tokenizer that adds one (Llama, Mistral, Gemma)
    would double it, and vLLM's chat does not add it either."""
    return tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]


def rm_input_ids(tokenizer, prompt: str, response: str) -> list[int]:
    """What the reward model reads for (x, y), in training, scoring and PPO alike:
    ``prompt_ids(x) + ids(y) + [EOS]`` (the query PPO generates from, the response tokens, the EOS
    at which the score is read). TRL's RewardTrainer would tokenize prompt + response as one text
    with special tokens, training on a second BOS that scoring never shows it."""
    return prompt_ids(tokenizer, prompt) + tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def trainable_share(model) -> dict:
    """Trainable parameters / all parameters (PERL's point: a fraction of a percent with LoRA)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": int(trainable), "total": int(total), "share": trainable / total if total else 0.0}


def _read_jsonl(path: str | None) -> list[dict]:
    if not path or not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def _device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _seq_cls(base: str, pad_id: int):
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    on_gpu = torch.cuda.is_available()
    # The score head is new by design (LoRA trains it as modules_to_save): silence the
    # "score.weight MISSING ... newly initialized" load report, which reads like an error.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=torch.float32 if not on_gpu else "auto")
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.pad_token_id = pad_id  # the score is read at the last non-pad token (EOS)
    return model


def _lora_config(lora: dict, task_type: str):
    from peft import LoraConfig

    return LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                      target_modules=list(lora["target_modules"]), task_type=task_type)


def load_reward_model(base: str, adapter: str, tokenizer):
    """The trained RM, merged and frozen (inference only)."""
    from peft import PeftModel

    model = _seq_cls(base, tokenizer.pad_token_id)
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.config.pad_token_id = tokenizer.pad_token_id
    model.eval().requires_grad_(False)
    return model


def rm_scores(model, tokenizer, prompts: list[str], responses: list[str], *, batch_size: int = 8,
              max_length: int = 1024) -> list[float]:
    """r(x, y) for each (prompt, response): the RM's scalar at the EOS after the response."""
    import torch

    device = next(model.parameters()).device
    ids = [rm_input_ids(tokenizer, p, r)[:max_length] for p, r in zip(prompts, responses)]
    out: list[float] = []
    with torch.no_grad():
        for i in range(0, len(ids), batch_size):
            enc = tokenizer.pad({"input_ids": ids[i:i + batch_size]}, padding=True, padding_side="right",
                                return_tensors="pt").to(device)
            out += model(**enc).logits[:, 0].float().cpu().tolist()
    return out


def pairwise_accuracy(model, tokenizer, pairs: list[dict], **kw) -> float | None:
    """Share of pairs with r(x, chosen) > r(x, rejected); None without pairs."""
    if not pairs:
        return None
    prompts = [p["prompt"] for p in pairs]
    chosen = rm_scores(model, tokenizer, prompts, [p["chosen"] for p in pairs], **kw)
    rejected = rm_scores(model, tokenizer, prompts, [p["rejected"] for p in pairs], **kw)
    return sum(c > r for c, r in zip(chosen, rejected)) / len(pairs)


def resume_key(spec) -> str:
    """What a checkpoint must come from to be resumed: data / reward adapter *content* and every
    hyperparameter (not paths, save_steps, crash_prefix)."""
    import hashlib

    d = asdict(spec)
    for k in ("output_dir", "checkpoint_dir", "save_steps", "crash_prefix"):
        d.pop(k, None)
    for k in ("train_data", "heldout_data", "prompts"):
        if k in d:
            d[k] = file_hash(d[k])
    if d.get("reward_adapter"):
        d["reward_adapter"] = file_hash(str(Path(d["reward_adapter"], "adapter_model.safetensors")))
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def _prepare_checkpoint_dir(spec) -> None:
    """Keep checkpoints only if they were made by the same job (``resume_key``)."""
    import shutil

    d = Path(spec.checkpoint_dir)
    key = resume_key(spec)
    key_file = d / "resume_key"
    if d.is_dir():
        old = key_file.read_text().strip() if key_file.is_file() else None
        if old != key:
            stale = [c for c in d.iterdir() if c.is_dir()]
            if stale:
                print("[train] discarding checkpoints of a different training job (data or settings changed)", flush=True)
            for c in stale:
                shutil.rmtree(c, ignore_errors=True)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / ".resume_key.tmp"
    tmp.write_text(key + "\n")
    os.replace(tmp, key_file)


# --------------------------------------------------------------------------------- reward model
def train_reward_model(spec: RMSpec) -> dict:
    """Train the (LoRA) reward model; save the adapter; return metrics incl. held-out accuracy."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import RewardConfig, RewardTrainer

    from alignment.faults import crash_point
    from alignment.training import latest_checkpoint, crash_points_callback

    torch.manual_seed(spec.seed)
    on_gpu = torch.cuda.is_available()
    tokenizer = load_tokenizer(spec.base)
    model = _seq_cls(spec.base, tokenizer.pad_token_id)
    train_rows, held_rows = _read_jsonl(spec.train_data), _read_jsonl(spec.heldout_data)
    if not train_rows:
        raise ValueError(f"{spec.train_data}: no training pairs")
    acc_before = pairwise_accuracy(model, tokenizer, held_rows, max_length=spec.max_length)
    # Tokenized here, so TRL trains on exactly the ids rm_scores and PPO feed the model.
    rows = [{"chosen_ids": rm_input_ids(tokenizer, r["prompt"], r["chosen"]),
             "rejected_ids": rm_input_ids(tokenizer, r["prompt"], r["rejected"])} for r in train_rows]
    args = RewardConfig(
        output_dir=spec.checkpoint_dir, learning_rate=spec.learning_rate, num_train_epochs=spec.epochs,
        max_steps=spec.max_steps, per_device_train_batch_size=spec.batch_size, gradient_accumulation_steps=spec.grad_accum,
        max_length=spec.max_length, logging_steps=1, save_strategy="steps" if spec.output_dir else "no",
        save_steps=spec.save_steps, save_total_limit=2, seed=spec.seed, report_to=[],
        bf16=on_gpu and torch.cuda.is_bf16_supported(), use_cpu=not on_gpu, dataloader_num_workers=0, disable_tqdm=True,
    )
    step_times: list[float] = []

    class _Progress(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            step_times.append(time.perf_counter() - self._t)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                acc = logs.get("accuracy")
                extra = f" accuracy {acc:.2f}" if isinstance(acc, (int, float)) else ""
                print(f"[train] rm step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f}{extra}", flush=True)

    trainer = RewardTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
        peft_config=_lora_config(spec.lora, "SEQ_CLS") if spec.lora else None,
        callbacks=[_Progress(), crash_points_callback(spec.crash_prefix)],
    )
    share = trainable_share(trainer.model)
    print(f"[train] reward model: {share['trainable']:,} of {share['total']:,} parameters trainable "
          f"({100 * share['share']:.3f}%)", flush=True)
    resume = None
    if spec.output_dir:
        _prepare_checkpoint_dir(spec)
        resume = latest_checkpoint(spec.checkpoint_dir)
        if resume:
            print(f"[train] resuming from {resume}", flush=True)
    result = trainer.train(resume_from_checkpoint=resume)
    trained = trainer.model
    trained.eval()
    acc_after = pairwise_accuracy(trained, tokenizer, held_rows, max_length=spec.max_length)
    train_acc = pairwise_accuracy(trained, tokenizer, train_rows[:16], max_length=spec.max_length)
    history = [h for h in trainer.state.log_history if "loss" in h]
    metrics = {
        "pairs": len(train_rows), "heldout_pairs": len(held_rows), "kept_pairs": len(trainer.train_dataset),
        "steps": trainer.state.global_step, "train_loss": result.training_loss, "resumed_from": resume,
        "heldout_accuracy_before": acc_before, "heldout_accuracy": acc_after, "train_accuracy_first16": train_acc,
        "trainable": share, "lora": spec.lora,
        "step_seconds": step_times, "peak_rss_mib": _peak_rss_mib(),
        "curve": [{"step": h.get("step"), "loss": h.get("loss"), "accuracy": h.get("accuracy"), "margin": h.get("margin")}
                  for h in history],
    }
    print(f"[train] reward model held-out accuracy {_pct(acc_before)} -> {_pct(acc_after)} ({len(held_rows)} pairs)", flush=True)
    if spec.output_dir:
        crash_point(f"{spec.crash_prefix}/before_save")
        trained.save_pretrained(spec.output_dir)
        tokenizer.save_pretrained(spec.output_dir)
        Path(spec.output_dir, "train_metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


# --------------------------------------------------------------------------------- function reward
class _FunctionBackbone:
    """Stands in for the transformer body TRL's ``get_reward`` calls (see module docstring)."""

    def __init__(self, owner):
        self.owner = owner

    def __call__(self, input_ids, attention_mask=None, **_ignored):
        import torch

        o = self.owner
        scores = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            valid = [i for i, m in zip(ids, mask) if m]
            prompt, response_ids = o.split(valid)
            response = o.tokenizer.decode(response_ids, skip_special_tokens=True).strip()
            scores.append(o.reward(prompt, response))
        o.calls += len(scores)
        s = torch.tensor(scores, dtype=torch.float32, device=input_ids.device)
        return SimpleNamespace(hidden_states=(s[:, None, None].expand(-1, input_ids.shape[1], 1),))


def function_reward_model(fn: Callable[[str, str], float], tokenizer, queries: list[list[int]], prompts: list[str],
                          name: str = "reward"):
    """A ``reward(prompt, response) -> float`` function shaped like a TRL reward model (an ``nn.Module``)."""
    return _function_reward_cls()(fn, tokenizer, queries, prompts, name)


_FR_CLS = None


def _function_reward_cls():
    global _FR_CLS
    if _FR_CLS is not None:
        return _FR_CLS
    import torch
    import torch.nn as nn

    class _FunctionReward(nn.Module):
        base_model_prefix = "backbone"

        def __init__(self, fn: Callable[[str, str], float], tokenizer, queries: list[list[int]], prompts: list[str],
                     name: str = "reward"):
            super().__init__()
            from alignment.perl_data import call_reward

            self.fn, self.name, self.tokenizer, self.calls = fn, name, tokenizer, 0
            self._call = call_reward
            self.by_query = {tuple(q): p for q, p in zip(queries, prompts)}
            self.lengths = sorted({len(q) for q in queries}, reverse=True)
            self.backbone = _FunctionBackbone(self)
            self.score = nn.Identity()
            self.register_buffer("_anchor", torch.zeros(1), persistent=False)  # .to(device) works

        def split(self, ids: list[int]) -> tuple[str, list[int]]:
            for n in self.lengths:
                prompt = self.by_query.get(tuple(ids[:n]))
                if prompt is not None:
                    return prompt, ids[n:]
            raise RuntimeError("FunctionReward: a rollout does not start with any known query (tokenization changed?)")

        def reward(self, prompt: str, response: str) -> float:
            return self._call(self.fn, prompt, response, self.name)

    _FR_CLS = _FunctionReward
    return _FR_CLS


# --------------------------------------------------------------------------------- PPO
def _tokenize_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    return [prompt_ids(tokenizer, p) for p in prompts]


def _latest_ppo_checkpoint(checkpoint_dir: str) -> Path | None:
    ckpts = []
    for c in Path(checkpoint_dir).glob("step-*"):
        if c.name.split("-")[-1].isdigit() and (c / "state.json").is_file():
            ckpts.append(c)
    return max(ckpts, key=lambda c: int(c.name.split("-")[-1])) if ckpts else None


def train_ppo(spec: PPOSpec) -> dict:
    """LoRA PPO against the reward model or a reward function; save the policy adapter; return metrics.

    Resume: every ``save_steps`` updates the policy and value adapters, the optimizer state and the
    curve go to ``checkpoint_dir/step-N`` (renamed into place when complete). A restarted job loads
    the newest one and runs the remaining updates. TRL's PPOTrainer cannot resume by itself; the
    learning rate is constant so nothing else needs restoring (RNG state is not restored, so a
    resumed run is equivalent, not bit-identical).
    """
    import shutil

    import torch
    from datasets import Dataset
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from alignment.faults import crash_point
    from alignment.perl_data import load_reward_function

    torch.manual_seed(spec.seed)
    on_gpu = torch.cuda.is_available()
    dtype = torch.float32 if not on_gpu else "auto"
    tokenizer = load_tokenizer(spec.base, padding_side="left")
    prompts = [r["prompt"] for r in _read_jsonl(spec.prompts)]
    if not prompts:
        raise ValueError(f"{spec.prompts}: no prompts")
    queries = _tokenize_prompts(tokenizer, prompts)
    dataset = Dataset.from_list([{"input_ids": q} for q in queries])
    rollout = spec.batch_size * spec.grad_accum

    resume = None
    done_steps, curve = 0, []
    if spec.output_dir:
        _prepare_checkpoint_dir(spec)
        resume = _latest_ppo_checkpoint(spec.checkpoint_dir)
    if resume:
        state = json.loads((resume / "state.json").read_text())
        done_steps, curve = int(state["step"]), state["curve"]
        print(f"[train] resuming PPO from {resume} ({done_steps}/{spec.steps} steps done)", flush=True)

    policy = AutoModelForCausalLM.from_pretrained(spec.base, dtype=dtype)
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    policy.generation_config.eos_token_id = tokenizer.eos_token_id
    value = _seq_cls(spec.base, tokenizer.pad_token_id)
    if spec.reward_adapter:
        reward_model = load_reward_model(spec.base, spec.reward_adapter, tokenizer)
        reward_desc = f"reward model {spec.reward_adapter}"
    else:
        fn = load_reward_function(spec.reward_function)
        reward_model = function_reward_model(fn, tokenizer, queries, prompts, name=spec.reward_function)
        reward_desc = f"reward function {spec.reward_function}"

    if spec.lora:
        if resume:
            policy = PeftModel.from_pretrained(policy, str(resume / "policy"), is_trainable=True)
        else:
            policy = get_peft_model(policy, _lora_config(spec.lora, "CAUSAL_LM"))
    if spec.value_lora:
        if resume:
            value = PeftModel.from_pretrained(value, str(resume / "value"), is_trainable=True)
        elif spec.reward_adapter:
            value = PeftModel.from_pretrained(value, spec.reward_adapter, is_trainable=True)  # value := RM at start
        else:
            value = get_peft_model(value, _lora_config(spec.value_lora, "SEQ_CLS"))
    elif spec.reward_adapter:
        value = load_reward_model(spec.base, spec.reward_adapter, tokenizer).requires_grad_(True).train()
    remaining = spec.steps - done_steps
    args = PPOConfig(
        output_dir=spec.checkpoint_dir or "/tmp/selfalign-ppo-unused", per_device_train_batch_size=spec.batch_size,
        gradient_accumulation_steps=spec.grad_accum, num_mini_batches=spec.num_mini_batches,
        total_episodes=max(1, remaining) * rollout, num_ppo_epochs=spec.num_ppo_epochs, learning_rate=spec.learning_rate,
        lr_scheduler_type="constant", kl_coef=spec.kl_coef, kl_estimator=spec.kl_estimator, cliprange=spec.cliprange,
        cliprange_value=spec.cliprange_value, vf_coef=spec.vf_coef, gamma=spec.gamma, lam=spec.lam,
        response_length=spec.response_length, temperature=spec.temperature, stop_token="eos",
        missing_eos_penalty=spec.missing_eos_penalty, whiten_rewards=spec.whiten_rewards,
        local_rollout_forward_batch_size=spec.batch_size, num_sample_generations=0, save_strategy="no",
        logging_steps=1, report_to=[], seed=spec.seed + done_steps, bf16=on_gpu and torch.cuda.is_bf16_supported(),
        use_cpu=not on_gpu, dataloader_num_workers=0, disable_tqdm=True,
    )
    step_times: list[float] = []
    keys = {"objective/scores": "reward", "objective/kl": "kl", "objective/rlhf_reward": "rlhf_reward",
            "objective/non_score_reward": "non_score_reward", "objective/entropy": "entropy",
            "loss/policy_avg": "policy_loss", "loss/value_avg": "value_loss", "policy/approxkl_avg": "approx_kl",
            "policy/clipfrac_avg": "clipfrac", "val/num_eos_tokens": "eos_count"}
    holder: dict = {}

    def save_checkpoint(step: int) -> None:
        trainer = holder["trainer"]
        wrapper = trainer.accelerator.unwrap_model(trainer.model)
        target = Path(spec.checkpoint_dir) / f"step-{step}"
        tmp = Path(spec.checkpoint_dir) / f".step-{step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        wrapper.policy.save_pretrained(tmp / "policy")
        wrapper.value_model.save_pretrained(tmp / "value")
        torch.save(trainer.optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "curve": curve}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        for old in Path(spec.checkpoint_dir).glob("step-*"):
            if old != target and old.name.split("-")[-1].isdigit() and int(old.name.split("-")[-1]) < step:
                shutil.rmtree(old, ignore_errors=True)
        crash_point(f"{spec.crash_prefix}/saved{step}")

    class _Progress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if not logs or "objective/scores" not in logs:
                return
            now = time.perf_counter()
            step_times.append(now - holder.get("t", now))
            holder["t"] = now
            step = done_steps + state.global_step
            point = {"step": step} | {v: logs[k] for k, v in keys.items() if k in logs}
            curve.append(point)
            print(f"[train] ppo step {step}/{spec.steps} reward {point['reward']:.4f} kl {point['kl']:.4f} "
                  f"policy loss {point.get('policy_loss', float('nan')):.4f}", flush=True)

        def on_step_end(self, args, state, control, **kw):
            step = done_steps + state.global_step
            if spec.output_dir and step % spec.save_steps == 0 and step < spec.steps:
                save_checkpoint(step)
            crash_point(f"{spec.crash_prefix}/step{step}")

    trainer = PPOTrainer(
        args=args, processing_class=tokenizer, model=policy, ref_model=None, reward_model=reward_model,
        train_dataset=dataset, value_model=value, eval_dataset=dataset.select(range(min(len(dataset), spec.batch_size))),
        callbacks=[_Progress()],
    )
    holder["trainer"] = trainer
    if resume:
        trainer.optimizer.load_state_dict(torch.load(resume / "optimizer.pt", weights_only=True))
    wrapper = trainer.accelerator.unwrap_model(trainer.model)
    share_policy = trainable_share(wrapper.policy)
    share_value = trainable_share(wrapper.value_model)
    print(f"[train] PPO: policy {share_policy['trainable']:,} of {share_policy['total']:,} trainable "
          f"({100 * share_policy['share']:.3f}%), value {100 * share_value['share']:.3f}%; rewards from {reward_desc}; "
          f"rollouts by TRL (transformers generate)", flush=True)
    if remaining > 0:
        holder["t"] = time.perf_counter()
        trainer.train()
    crash_point(f"{spec.crash_prefix}/before_save")
    metrics = {
        "steps": spec.steps, "prompts": len(prompts), "rollout_batch": rollout, "resumed_from": str(resume) if resume else None,
        "reward_source": "reward_model" if spec.reward_adapter else "function",
        "trainable_policy": share_policy, "trainable_value": share_value, "lora": spec.lora,
        "step_seconds": step_times, "peak_rss_mib": _peak_rss_mib(), "curve": curve,
    }
    if spec.output_dir:
        wrapper.policy.save_pretrained(spec.output_dir)
        wrapper.value_model.save_pretrained(str(Path(spec.output_dir, "value")))
        Path(spec.output_dir, "train_metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


# --------------------------------------------------------------------------------- launching
JOBS = {"rm": (RMSpec, train_reward_model), "ppo": (PPOSpec, train_ppo)}


def run_job(kind: str, spec, *, launcher: str, spec_path: Path, log=print) -> dict:
    """Run a job in this process or as ``python -m alignment.perl_training KIND SPEC.json`` (dies with its parent)."""
    from alignment.launch import run_subprocess

    if launcher == "inprocess":
        return JOBS[kind][1](spec)
    return run_subprocess("alignment.perl_training", kind, spec, spec_path=spec_path, log=log)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in JOBS:
        print("usage: python -m alignment.perl_training rm|ppo SPEC.json", file=sys.stderr)
        return 2
    spec_cls, fn = JOBS[argv[0]]
    metrics = fn(spec_cls(**json.loads(Path(argv[1]).read_text())))
    if os.environ.get("SELFALIGN_METRICS_OUT"):  # the bench reads peak RSS / step times from here
        Path(os.environ["SELFALIGN_METRICS_OUT"]).write_text(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    sys.exit(main())
