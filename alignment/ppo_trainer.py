"""The PPO loop PERL runs: rollouts through the project's generation engine, scoring, and
``alignment.ppo.ppo_update`` on one frozen base model carrying every adapter.

One base, four roles (PEFT multi-adapter on one ``AutoModelForCausalLM``):

- policy    = base + LoRA adapter ``default`` (saved as a plain CAUSAL_LM adapter, what vLLM serves);
- reference = base with every adapter disabled (the KL is to the initial policy);
- value     = base + LoRA adapter ``value``, the last hidden state through a scalar head (a
              ``Linear(hidden, 1)``); initialised from the reward model's adapter and head when
              there is one (TRL's convention: value model = reward model at the start);
- reward    = base + the trained reward-model adapter ``reward`` (frozen) and its score head, read
              at the last real token of query + response (what ``rm_scores`` reads at the EOS).

So the trainer holds one copy of the base weights where TRL 1.12's ``PPOTrainer`` held three
(policy, value model, merged reward model). On the transformers backend the rollouts are sampled
from that same model with the policy adapter active (``SharedBaseModels.rollout_model``): the job
holds one base. vLLM holds its own copy (its weights and KV cache): two bases, sampled faster
(1.5x at 294M parameters on CPU; more with longer responses and on GPU); an OpenAI-compatible
server holds its copy elsewhere.

A step (``steps`` of them, numbered from 1):

1. prompts: ``step_prompts`` (seeded epoch permutations of the prompt file);
2. rollouts: the current policy adapter is saved and the engine samples one response per prompt
   with it (temperature T, top-p 1, ``response_length`` tokens), each request seeded by
   ``rollout_seed`` (seed, step, prompt id). The engine returns text: ``response_tokens`` turns it
   back into ids (+ EOS when the engine stopped before the length limit). Log-probs for the loss
   are recomputed here (the engine's are not trusted for the ratio, and the ``Generator`` protocol
   does not return them, so the engine-vs-trainer gap is not reported);
3. scores: the reward adapter, or a ``reward(prompt, response)`` function; a row whose function call
   raises is *failed*: counted, and scored with the mean of the batch's other scores (no advantage
   from the score); the job stops (resumable from its last checkpoint) once more than
   ``max_failed_share`` of all rollouts so far failed;
4. ``ppo_update`` (epochs x mini-batches, the mini-batch order from ``update_permutation``).

Everything random is derived from (seed, step), the models run in eval mode (no dropout, as TRL
disables it) and a checkpoint holds the adapters, the value head, the optimizer state and the RNG
state: a job killed after a checkpoint and resumed gives the same adapters, bit for bit, as one that
ran through (on the transformers backend; on vLLM up to the engine's own reproducibility).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from alignment.faults import crash_point
from alignment.generation import EngineSpec, HFGenerator, Sampling, choose_backend, derive_seed, open_generator
from alignment.ppo import (PPOUpdateConfig, Rollouts, missing_eos_penalty, model_inputs, ppo_update,
                           response_logits, response_mask, scale_logits, token_logprobs)

if TYPE_CHECKING:
    from alignment.perl_training import PPOSpec

POLICY, VALUE, REWARD = "default", "value", "reward"
VALUE_HEAD_FILE = "value_head.safetensors"
# What a step's line and the metrics' curve report (ppo_update's names), and their order.
CURVE_KEYS = ("reward", "kl", "rlhf_reward", "non_score_reward", "entropy", "policy_loss", "value_loss", "approx_kl",
              "clipfrac", "value_clipfrac", "policy_entropy", "ratio", "ratio_var")


# --------------------------------------------------------------------------------- pure helpers
def step_prompts(n_prompts: int, batch: int, step: int, seed: int) -> list[int]:
    """The prompt indices of PPO step ``step`` (1-based): positions (step-1)*B .. step*B-1 of the
    endless sequence perm_0 ++ perm_1 ++ ..., perm_e a permutation of range(n_prompts) shuffled by
    random.Random(derive_seed(seed, "ppo-prompts", e)). Each epoch sees every prompt once; a step's
    prompts depend only on (seed, step), not on where a run was resumed."""
    out, start = [], (step - 1) * batch
    for pos in range(start, start + batch):
        epoch, i = divmod(pos, n_prompts)
        perm = list(range(n_prompts))
        random.Random(derive_seed(seed, "ppo-prompts", epoch)).shuffle(perm)
        out.append(perm[i])
    return out


def rollout_seed(seed: int, step: int, prompt_id: str, occurrence: int = 0) -> int:
    """The engine seed of one rollout request: derive_seed(seed, "ppo-rollout", step, prompt_id), with
    the occurrence appended when a prompt comes twice in one batch (batch > number of prompts)."""
    parts = (step, prompt_id) if occurrence == 0 else (step, prompt_id, occurrence)
    return derive_seed(seed, "ppo-rollout", *parts)


def update_permutation(seed: int, step: int) -> Callable[[int], list[int]]:
    """Each PPO epoch's mini-batch order in step ``step``: torch.randperm(n) from a generator seeded
    with derive_seed(seed, "ppo-update", step) (one generator per step, drawn once per epoch)."""
    gen = torch.Generator().manual_seed(derive_seed(seed, "ppo-update", step))
    return lambda n: torch.randperm(n, generator=gen).tolist()


def response_tokens(tokenizer, text: str, n_tokens: int, max_tokens: int) -> list[int]:
    """The ids of a sampled response from the engine's text: ids(text)[:L] (L = max_tokens), then EOS
    when the engine stopped before the limit (n_tokens < L: it stopped at EOS; there are no stop
    strings) and there is room. An empty result is [EOS] (the response ended at once).
    On vLLM, n_tokens counts the EOS, so a response whose EOS is exactly the L-th token counts as
    cut off (missing EOS) — one position of difference, at the limit only."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    if (n_tokens < max_tokens and len(ids) < max_tokens) or not ids:
        ids = ids[:max_tokens - 1] + [tokenizer.eos_token_id]
    return ids


def pad_batch(queries: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_token_id: int) -> torch.Tensor:
    """query_responses [B, Q+R]: each query left-padded to Q = max |query|, each response right-padded
    to R = max |response|, with the pad id (``alignment.ppo``'s layout)."""
    q, r = max(map(len, queries)), max(map(len, responses))
    return torch.tensor([[pad_token_id] * (q - len(x)) + list(x) + list(y) + [pad_token_id] * (r - len(y))
                         for x, y in zip(queries, responses)])


def fill_failed(scores: Sequence[float | None]) -> list[float]:
    """Failed rows (None) scored with the mean of the others (0.0 when all failed): a failed
    rollout gets no advantage from its score, only from the KL and the value baseline."""
    ok = [s for s in scores if s is not None]
    fill = sum(ok) / len(ok) if ok else 0.0
    return [fill if s is None else float(s) for s in scores]


def update_config(spec: "PPOSpec") -> PPOUpdateConfig:
    """The update knobs of a PPO job spec (the fields both declare)."""
    from dataclasses import fields

    return PPOUpdateConfig(**{f.name: getattr(spec, f.name) for f in fields(PPOUpdateConfig)})


# --------------------------------------------------------------------------------- the models
def _lora_config(lora: dict):
    from peft import LoraConfig

    return LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                      target_modules=list(lora["target_modules"]), task_type="CAUSAL_LM")


def _split_reward_adapter(path: str) -> tuple[dict, dict[str, torch.Tensor], torch.Tensor]:
    """A SEQ_CLS reward-model adapter dir → (its LoRA settings, its LoRA tensors, its score head [1, H])."""
    from safetensors.torch import load_file

    cfg = json.loads(Path(path, "adapter_config.json").read_text())
    tensors = load_file(str(Path(path, "adapter_model.safetensors")))
    head = [k for k in tensors if ".score." in f".{k}" or k.endswith("score.weight")]
    if len(head) != 1:
        raise ValueError(f"{path}: expected one score head weight in the reward adapter, found {head or 'none'}")
    lora = {"r": cfg["r"], "alpha": cfg["lora_alpha"], "dropout": cfg.get("lora_dropout", 0.0),
            "target_modules": sorted(cfg["target_modules"])}
    return lora, {k: v for k, v in tensors.items() if k != head[0]}, tensors[head[0]].reshape(1, -1)


class SharedBaseModels:
    """Policy, reference, value and reward on one frozen base (see the module docstring)."""

    def __init__(self, spec: "PPOSpec", pad_token_id: int, device: str):
        from peft import get_peft_model, set_peft_model_state_dict
        from transformers import AutoModelForCausalLM

        if not spec.lora or not spec.value_lora:
            raise ValueError("PPO trains LoRA adapters on one frozen base: ppo.lora and ppo.value_lora are required")
        self.pad_token_id, self.device = pad_token_id, device
        dtype = torch.float32 if device == "cpu" else "auto"
        base = AutoModelForCausalLM.from_pretrained(spec.base, dtype=dtype).to(device)
        hidden = base.config.hidden_size
        self.peft = get_peft_model(base, _lora_config(spec.lora))  # adapter "default" = the policy
        self.value_head = torch.nn.Linear(hidden, 1, bias=False).to(device=device, dtype=torch.float32)
        self.reward_head: torch.nn.Linear | None = None
        if spec.reward_adapter:
            lora, tensors, head = _split_reward_adapter(spec.reward_adapter)
            for name in (REWARD, VALUE):  # value := reward model at the start
                self.peft.add_adapter(name, _lora_config(lora))
                set_peft_model_state_dict(self.peft, tensors, adapter_name=name)
            self.reward_head = torch.nn.Linear(hidden, 1, bias=False).to(device=device, dtype=torch.float32)
            with torch.no_grad():
                self.reward_head.weight.copy_(head)
                self.value_head.weight.copy_(head)
            self.reward_head.requires_grad_(False)
        else:
            self.peft.add_adapter(VALUE, _lora_config(spec.value_lora))
            with torch.no_grad():
                self.value_head.weight.normal_(0.0, getattr(base.config, "initializer_range", 0.02))
        self.peft.eval()  # no dropout anywhere (TRL disables it in PPO too); gradients still flow
        self.trainable = [p for n, p in self.peft.named_parameters() if f".{POLICY}." in n or f".{VALUE}." in n]
        self.trainable.append(self.value_head.weight)
        self._use(POLICY)

    # ---- adapters --------------------------------------------------------------------
    def _use(self, adapter: str) -> None:
        """Activate one adapter. PEFT's set_adapter also flips requires_grad (only the active one
        trains); policy and value train together, so their parameters are switched back on."""
        self.peft.set_adapter(adapter, inference_mode=True)
        for p in self.trainable:
            p.requires_grad_(True)

    def _hidden(self, query_responses: torch.Tensor, adapter: str) -> torch.Tensor:
        self._use(adapter)
        decoder = self.peft.get_base_model().get_decoder()
        return decoder(**model_inputs(query_responses.to(self.device), self.pad_token_id)).last_hidden_state

    # ---- the four roles --------------------------------------------------------------
    def policy_logits(self, query_responses: torch.Tensor) -> torch.Tensor:
        """Logits [B, Q+R, V] of the policy (base + policy adapter)."""
        self._use(POLICY)
        return self.peft(**model_inputs(query_responses.to(self.device), self.pad_token_id)).logits

    def rollout_model(self, adapter: str | None = None):
        """The model the transformers engine samples rollouts from: this base with the live policy
        adapter active (``adapter``, the step's saved copy of the same weights, is not read)."""
        self._use(POLICY)
        return self.peft

    def reference_logits(self, query_responses: torch.Tensor) -> torch.Tensor:
        """Logits of the initial policy: the base, every adapter disabled."""
        with self.peft.disable_adapter():
            return self.peft(**model_inputs(query_responses.to(self.device), self.pad_token_id)).logits

    def values(self, query_responses: torch.Tensor) -> torch.Tensor:
        """V [B, Q+R]: the value head on the last hidden state of base + value adapter."""
        return self.value_head(self._hidden(query_responses, VALUE).float()).squeeze(-1)

    def reward_scores(self, query_responses: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """r [B]: the reward head on the last hidden state of base + reward adapter at position last[b]."""
        hidden = self._hidden(query_responses, REWARD).float()
        return self.reward_head(hidden[torch.arange(hidden.shape[0]), last.to(self.device)]).squeeze(-1)

    # ---- saving and loading ----------------------------------------------------------
    def save_policy(self, path: Path) -> None:
        """The policy adapter as a plain PEFT CAUSAL_LM adapter dir (what engines serve)."""
        self.peft.save_pretrained(str(path), selected_adapters=[POLICY])

    def save_value(self, path: Path) -> None:
        """The value adapter (adapter_config.json + adapter_model.safetensors) and its head."""
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        self.peft.peft_config[VALUE].save_pretrained(str(path))
        save_file({k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(self.peft, adapter_name=VALUE).items()},
                  str(path / "adapter_model.safetensors"))
        save_file({"weight": self.value_head.weight.detach().cpu().contiguous()}, str(path / VALUE_HEAD_FILE))

    def load(self, checkpoint: Path) -> None:
        """Policy adapter, value adapter and value head from a checkpoint dir (``policy/``, ``value/``)."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(self.peft, load_file(str(checkpoint / "policy" / "adapter_model.safetensors")),
                                  adapter_name=POLICY)
        set_peft_model_state_dict(self.peft, load_file(str(checkpoint / "value" / "adapter_model.safetensors")),
                                  adapter_name=VALUE)
        with torch.no_grad():
            self.value_head.weight.copy_(load_file(str(checkpoint / "value" / VALUE_HEAD_FILE))["weight"])

    def trainable_share(self) -> dict:
        """Trainable parameters / all parameters of base + policy adapter, and of base + value adapter + head."""
        params = dict(self.peft.named_parameters())
        base = sum(p.numel() for n, p in params.items() if "lora_" not in n)
        pol = sum(p.numel() for n, p in params.items() if f".{POLICY}." in n)
        val = sum(p.numel() for n, p in params.items() if f".{VALUE}." in n) + self.value_head.weight.numel()
        return {"policy": {"trainable": pol, "total": base + pol, "share": pol / (base + pol)},
                "value": {"trainable": val, "total": base + val, "share": val / (base + val)}}


# --------------------------------------------------------------------------------- checkpoints
def latest_checkpoint(checkpoint_dir: str) -> Path | None:
    """The newest complete ``step-N`` checkpoint (state.json and rng.pt written), or None."""
    ckpts = [c for c in Path(checkpoint_dir).glob("step-*")
             if c.name.split("-")[-1].isdigit() and (c / "state.json").is_file() and (c / "rng.pt").is_file()]
    return max(ckpts, key=lambda c: int(c.name.split("-")[-1])) if ckpts else None


def rng_state() -> dict:
    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(models: SharedBaseModels, optimizer, checkpoint_dir: str, step: int, state: dict) -> Path:
    """``checkpoint_dir/step-N``: policy/, value/ (adapter + head), optimizer.pt, rng.pt, state.json;
    written under a temporary name and renamed into place; older checkpoints removed."""
    target = Path(checkpoint_dir) / f"step-{step}"
    tmp = Path(checkpoint_dir) / f".step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    models.save_policy(tmp / "policy")
    models.save_value(tmp / "value")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step} | state))
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    for old in Path(checkpoint_dir).glob("step-*"):
        if old != target and old.name.split("-")[-1].isdigit() and int(old.name.split("-")[-1]) < step:
            shutil.rmtree(old, ignore_errors=True)
    return target


# --------------------------------------------------------------------------------- the loop
@dataclass
class PPOResult:
    models: SharedBaseModels
    curve: list[dict]
    step_seconds: list[float]
    rollout_seconds: list[float]  # of each step: saving the policy adapter and the engine's sampling
    resumed_from: Path | None
    failed: int
    rollouts: int
    backend: str


class TooManyFailedRewards(RuntimeError):
    pass


def run_ppo(spec: "PPOSpec", *, tokenizer, prompts: Sequence[str], prompt_ids: Sequence[str],
            queries: Sequence[Sequence[int]], reward_fn: Callable[[str, str], float] | None = None,
            reward_error: type[Exception] = Exception, log: Callable[[str], None] = print) -> PPOResult:
    """Run (or resume) the PPO job ``spec``; returns the trained models and the curve.

    ``queries[i]`` are the token ids of ``prompts[i]`` as the engine renders it (chat template,
    assistant header); ``prompt_ids[i]`` identify the prompts in the rollout seeds. Rewards come
    from ``spec.reward_adapter`` or from ``reward_fn(prompt, response)``; a call raising
    ``reward_error`` is a failed rollout."""
    torch.manual_seed(spec.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    resume = latest_checkpoint(spec.checkpoint_dir) if spec.output_dir else None
    state = json.loads((resume / "state.json").read_text()) if resume else {"step": 0, "curve": [], "failed": 0,
                                                                          "rollouts": 0}
    done = int(state["step"])
    if resume:
        log(f"[train] resuming PPO from {resume} ({done}/{spec.steps} steps done)")
    models = SharedBaseModels(spec, tokenizer.pad_token_id, device)
    optimizer = torch.optim.AdamW(models.trainable, lr=spec.learning_rate, weight_decay=0.0)
    if resume:
        models.load(resume)
        optimizer.load_state_dict(torch.load(resume / "optimizer.pt", weights_only=True))
        set_rng_state(torch.load(resume / "rng.pt", weights_only=False))
    cfg = update_config(spec)
    batch = spec.batch_size * spec.grad_accum
    curve, failed_total, rollouts_total = list(state["curve"]), int(state["failed"]), int(state["rollouts"])
    step_times: list[float] = []
    rollout_times: list[float] = []
    share = models.trainable_share()
    engine = EngineSpec(**({"backend": "transformers"} | dict(spec.engine or {})
                           | {"base": spec.base, "seed": spec.seed, "enable_lora": True}))
    backend = choose_backend(engine.backend)
    generator = None
    if done < spec.steps:
        generator = (HFGenerator(engine, model_for=models.rollout_model) if backend == "transformers"
                     else open_generator(engine))
    log(f"[train] PPO: policy {share['policy']['trainable']:,} of {share['policy']['total']:,} trainable "
        f"({100 * share['policy']['share']:.3f}%), value {100 * share['value']['share']:.3f}%; rewards from "
        f"{'reward model ' + spec.reward_adapter if spec.reward_adapter else 'reward function ' + str(spec.reward_function)}; "
        f"rollouts by the {backend} engine; "
        + ("one base model, shared by the rollouts" if backend == "transformers" else "one base model in the trainer"))
    sampling = Sampling(n=1, temperature=spec.temperature, top_p=1.0, max_tokens=spec.response_length)
    scratch = Path(tempfile.mkdtemp(prefix="selfalign-ppo-rollout-"))
    try:
        for step in range(done + 1, spec.steps + 1):
            t0 = time.perf_counter()
            idx = step_prompts(len(prompts), batch, step, spec.seed)
            seeds = [rollout_seed(spec.seed, step, prompt_ids[i], idx[:k].count(i)) for k, i in enumerate(idx)]
            adapter = scratch / f"step-{step}"
            models.save_policy(adapter)
            out = generator.chat([[{"role": "user", "content": prompts[i]}] for i in idx], sampling,
                                 adapter=str(adapter), seed=seeds)
            rollout_times.append(time.perf_counter() - t0)
            responses = [response_tokens(tokenizer, per[0].text, per[0].n_tokens, spec.response_length) for per in out]
            rollouts, failed = make_rollouts(models, tokenizer, [queries[i] for i in idx], responses,
                                             [prompts[i] for i in idx], spec, reward_fn, reward_error)
            stats = ppo_update(models.policy_logits, models.values, rollouts, cfg, optimizer,
                               permutation=update_permutation(spec.seed, step))
            failed_total, rollouts_total = failed_total + failed, rollouts_total + batch
            point = {"step": step} | {k: stats[k] for k in CURVE_KEYS} | {
                "eos_count": int((rollouts.responses == tokenizer.eos_token_id).any(-1).sum()), "failed_rewards": failed}
            curve.append(point)
            step_times.append(time.perf_counter() - t0)
            log(f"[train] ppo step {step}/{spec.steps} reward {point['reward']:.4f} kl {point['kl']:.4f} "
                f"policy loss {point['policy_loss']:.4f}" + (f" ({failed} failed rewards)" if failed else ""))
            if failed_total > spec.max_failed_share * rollouts_total:
                raise TooManyFailedRewards(
                    f"reward function {spec.reward_function!r} failed on {failed_total} of {rollouts_total} rollouts "
                    f"(more than max_failed_share {spec.max_failed_share}); fix it and resume from the last checkpoint")
            if spec.output_dir and step % spec.save_steps == 0 and step < spec.steps:
                save_checkpoint(models, optimizer, spec.checkpoint_dir, step,
                                {"curve": curve, "failed": failed_total, "rollouts": rollouts_total})
                crash_point(f"{spec.crash_prefix}/saved{step}")
            crash_point(f"{spec.crash_prefix}/step{step}")
            shutil.rmtree(adapter, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if generator is not None:
            generator.close()
    return PPOResult(models=models, curve=curve, step_seconds=step_times, rollout_seconds=rollout_times,
                     resumed_from=resume, failed=failed_total,
                     rollouts=rollouts_total, backend=backend)


def make_rollouts(models: SharedBaseModels, tokenizer, queries: Sequence[Sequence[int]],
                  responses: Sequence[Sequence[int]], prompts: Sequence[str], spec: "PPOSpec",
                  reward_fn: Callable[[str, str], float] | None, reward_error: type[Exception]) -> tuple[Rollouts, int]:
    """The rollout tensors of one step, with no gradient: old and reference log-probs of the sampled
    tokens (temperature-scaled), values, scores (missing-EOS penalty applied); and how many rows'
    reward failed."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    query_responses = pad_batch(queries, responses, pad).to(models.device)
    width = max(map(len, responses))
    tokens = query_responses[:, -width:]
    mask = response_mask(tokens, pad)
    with torch.no_grad():
        logprobs = token_logprobs(scale_logits(response_logits(models.policy_logits(query_responses), width),
                                               spec.temperature), tokens)
        ref_logprobs = token_logprobs(scale_logits(response_logits(models.reference_logits(query_responses), width),
                                                   spec.temperature), tokens)
        values = models.values(query_responses)[:, -width - 1:-1]
        if reward_fn is None:
            last = query_responses.shape[1] - width + mask.long().sum(-1) - 1
            raw, failed = models.reward_scores(query_responses, last).float(), 0
        else:
            texts = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in responses]
            got: list[float | None] = []
            for prompt, text in zip(prompts, texts):
                try:
                    got.append(reward_fn(prompt, text))
                except reward_error:
                    got.append(None)
            failed = sum(g is None for g in got)
            raw = torch.tensor(fill_failed(got), dtype=torch.float32, device=models.device)
        scores = missing_eos_penalty(raw, (tokens == eos).any(-1), spec.missing_eos_penalty)
    return Rollouts(query_responses=query_responses, mask=mask, logprobs=logprobs, ref_logprobs=ref_logprobs,
                    values=values, scores=scores), failed
