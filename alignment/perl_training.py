"""PERL training jobs: a LoRA reward model (TRL ``RewardTrainer``) and LoRA PPO (``alignment.ppo_trainer``).

Runs in-process or as ``python -m alignment.perl_training rm|ppo SPEC.json`` (what the flow does),
so a cluster can put ``accelerate launch -m alignment.perl_training`` in its place.

Reward model: ``AutoModelForSequenceClassification`` (one output) on the base, LoRA on the
attention projections with ``task_type="SEQ_CLS"`` (PEFT then also trains the new ``score``
head, which has no pretrained weights), Bradley-Terry loss −log σ(r(x, y_c) − r(x, y_r)).
The tokens it trains on are exactly those it scores and PPO shows it (``rm_input_ids``): the
chat-template prompt with the assistant header, tokenized without special tokens (the template
holds any BOS), + the response + EOS; the score is read at the EOS token.

PPO (``alignment.ppo_trainer``, the update math in ``alignment.ppo``): one frozen base carries the
policy adapter, the value adapter (+ scalar head, initialised from the reward model's adapter and
head when there is one) and the reward model's adapter (+ its head); the reference is the base with
adapters disabled. Each step's rollouts are sampled by the project's generation engine
(``spec.engine``: transformers, vLLM or an OpenAI-compatible server) with the current policy adapter.

Padding. SmolLM2 (and many chat models) use EOS ``<|im_end|>`` as the pad token, and that token
also ends every chat turn inside the prompt. PPO treats every pad-id token as padding (it masks it
out of the attention), which would silently delete the turn ends from every prompt.
``choose_pad_token`` picks a special token that the chat template never emits (``<|endoftext|>``
for SmolLM2) for both the RM and PPO; no embedding is resized, so the adapters stay valid on the
unmodified base (vLLM serves them as is).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

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
    # The rollout engine: EngineSpec fields (backend, dtype, batch_size, ...; base, seed and LoRA are set
    # by the trainer). Unit tests and benches without an engine section sample with transformers.
    engine: dict = field(default_factory=lambda: {"backend": "transformers"})
    max_failed_share: float = 0.1  # reward function: stop once more of all rollouts so far failed
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


ENGINE_NO_EFFECT = ("cpu_threads", "base_url", "api_key_env", "request_timeout_s", "max_concurrency", "kv_cache_gib")


def resume_key(spec) -> str:
    """What a checkpoint must come from to be resumed: data / reward adapter *content* and every
    hyperparameter (not paths, save_steps, crash_prefix)."""
    import hashlib

    d = asdict(spec)
    for k in ("output_dir", "checkpoint_dir", "save_steps", "crash_prefix"):
        d.pop(k, None)
    for k in ENGINE_NO_EFFECT:  # where the engine runs and how it is reached change no rollout
        d.get("engine", {}).pop(k, None)
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


# --------------------------------------------------------------------------------- PPO
def _tokenize_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    return [prompt_ids(tokenizer, p) for p in prompts]


def train_ppo(spec: PPOSpec) -> dict:
    """LoRA PPO against the reward model or a reward function (``alignment.ppo_trainer``: rollouts
    through the engine ``spec.engine`` names, one frozen base); save the policy adapter (and the value
    adapter + head in ``value/``); return metrics.

    Resume: every ``save_steps`` updates the policy and value adapters, the value head, the optimizer
    state, the RNG state and the curve go to ``checkpoint_dir/step-N`` (renamed into place when
    complete); a restarted job loads the newest one and runs the remaining updates, with the same
    prompts and rollout seeds (derived from the seed and the step): on the transformers backend the
    result is bit-identical to an uninterrupted run.
    """
    from alignment.faults import crash_point
    from alignment.perl_data import RewardFunctionError, call_reward, load_reward_function
    from alignment.ppo_trainer import run_ppo

    tokenizer = load_tokenizer(spec.base, padding_side="left")
    rows = _read_jsonl(spec.prompts)
    if not rows:
        raise ValueError(f"{spec.prompts}: no prompts")
    prompts = [r["prompt"] for r in rows]
    if spec.output_dir:
        _prepare_checkpoint_dir(spec)
    reward_fn = None
    if not spec.reward_adapter:
        fn = load_reward_function(spec.reward_function)
        reward_fn = lambda prompt, response: call_reward(fn, prompt, response, spec.reward_function)  # noqa: E731
    result = run_ppo(spec, tokenizer=tokenizer, prompts=prompts,
                     prompt_ids=[str(r.get("prompt_id", i)) for i, r in enumerate(rows)],
                     queries=_tokenize_prompts(tokenizer, prompts), reward_fn=reward_fn,
                     reward_error=RewardFunctionError, log=lambda line: print(line, flush=True))
    crash_point(f"{spec.crash_prefix}/before_save")
    share = result.models.trainable_share()
    metrics = {
        "steps": spec.steps, "prompts": len(prompts), "rollout_batch": spec.batch_size * spec.grad_accum,
        "resumed_from": str(result.resumed_from) if result.resumed_from else None,
        "reward_source": "reward_model" if spec.reward_adapter else "function",
        "trainable_policy": share["policy"], "trainable_value": share["value"], "lora": spec.lora,
        "rollout_backend": result.backend, "failed_rewards": result.failed, "rollouts": result.rollouts,
        "step_seconds": result.step_seconds, "rollout_seconds": result.rollout_seconds,
        "peak_rss_mib": _peak_rss_mib(), "curve": result.curve,
    }
    if spec.output_dir:
        result.models.save_policy(Path(spec.output_dir))
        result.models.save_value(Path(spec.output_dir, "value"))
        Path(spec.output_dir, "train_metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


# --------------------------------------------------------------------------------- launching
JOBS = {"rm": (RMSpec, train_reward_model), "ppo": (PPOSpec, train_ppo)}


def run_job(kind: str, spec, *, launcher: str, spec_path: Path, log=print) -> dict:
    """Run a job in this process or as ``python -m alignment.perl_training KIND SPEC.json`` (dies
    with its parent); ``auto`` picks as the DPO launcher does (``resolve_launcher``: in this
    process on CPU). Either way its output goes to ``RUN/logs/iter_1-<stage>-<kind>.log``."""
    from alignment.generation import has_cuda
    from alignment.launch import resolve_launcher, run_inprocess, run_subprocess

    if resolve_launcher(launcher, on_gpu=has_cuda()) == "inprocess":
        return run_inprocess(lambda: JOBS[kind][1](spec), kind, spec_path=spec_path, log=log)
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
    sys.exit(main())
