"""A run of one algorithm: its stage list, the model chain M_t and one generation engine.

``Run.iteration(t)`` executes the algorithm's stages of iteration t in order through
``alignment.stages.execute`` (the flows do the same, one Prefect task per stage).

M_1 is the recipe's model; M_{t+1} = the same base + the LoRA adapter trained in iteration t
(recorded in ``iter_<t>/train/manifest.json``, relative to the run directory so a run can be
moved). Every adapter is a delta on one base, so one engine serves all iterations.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from alignment.adapter_serving import MergedAdapters, serving_mode
from alignment.files import hash_obj, sha256_file
from alignment.generation import EngineSpec, Generator, choose_backend, has_cuda, open_generator
from alignment.models import ResolvedModel, adapter_rank, merge_adapter, resolve, with_adapter
from alignment.stages import Algorithm, Log, Progress, execute
from alignment.store import RunStore
from alignment.trackers import report_iteration


def adapter_digest(adapter: str | Path) -> str:
    """sha256 of an adapter's weights file: what identifies the adapter's content."""
    return sha256_file(Path(adapter) / "adapter_model.safetensors")


def lora_rank_slot(r: int) -> int:
    """vLLM accepts max_lora_rank only from a fixed set (8, 16, 32, ...): the smallest that fits r."""
    slot = 8
    while slot < r:
        slot *= 2
    return slot


@dataclass
class Run:
    store: RunStore
    recipe: object  # the algorithm's recipe model (alignment.config.RecipeBase subclass)
    algorithm: Algorithm
    log: Log = print
    progress: Callable[[str, int], Progress] | None = None  # (stage, t) -> progress callback
    _generator: Generator | None = field(default=None, repr=False)
    _base: ResolvedModel | None = field(default=None, repr=False)
    _judge: Generator | None = field(default=None, repr=False)
    _tokenizer: object = field(default=None, repr=False)
    models_read: list[int] | None = field(default=None, repr=False)  # the t of each model_hash(t) (planning)

    # ---- the model chain ---------------------------------------------------------------
    @property
    def base(self) -> ResolvedModel:
        if self._base is None:
            self._base = resolve(self.recipe.model)
        return self._base

    def model(self, t: int) -> ResolvedModel:
        """M_t: the recipe's model for t=1, else base + the adapter trained in iteration t-1."""
        if t == 1:
            return self.base
        adapter = self.adapter(t - 1)
        return with_adapter(self.base, adapter) if adapter else self.model(t - 1)

    def adapter(self, t: int) -> str | None:
        """The adapter trained in iteration t, or None if that iteration trained nothing."""
        manifest = self.store.manifest(t, "train")
        if manifest is None:
            raise RuntimeError(f"iteration {t} has not been trained yet")
        rel = manifest["info"].get("adapter")
        return str(self.store.root / rel) if rel else None

    def model_hash(self, t: int) -> str:
        """Identity of M_t for stage inputs: the recipe's model, the adapter's weights, and how the
        engine serves the adapter when that is not per request (merged weights sample differently)."""
        if self.models_read is not None:
            self.models_read.append(t)
        m = self.model(t)
        if m.adapter is None:
            return hash_obj({"model": self.recipe.model})
        served = {"served": "merged"} if self.adapter_serving() == "merged" else {}
        return hash_obj({"model": self.recipe.model, "adapter": adapter_digest(m.adapter)} | served)

    def rel(self, path: str | Path | None) -> str | None:
        """How a manifest records an adapter: relative to the run directory when inside it (the run
        can be moved), else absolute (the recipe's own adapter, which M_{t+1} keeps when iteration t
        trains nothing). ``adapter`` reads either: ``root / absolute`` is the absolute path."""
        if path is None:
            return None
        p = Path(path).resolve()
        return p.relative_to(self.store.root.resolve()).as_posix() if p.is_relative_to(self.store.root.resolve()) else str(p)

    def token_lengths(self, texts: list[str]) -> list[int]:
        """Token counts of texts under the base model's tokenizer (loaded once)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.base.base)
        return [len(ids) for ids in self._tokenizer(list(texts), add_special_tokens=False)["input_ids"]] if texts else []

    # ---- the engine --------------------------------------------------------------------
    def needs_lora(self) -> bool:
        """Whether the engine must serve adapters: an adapter as the model, or the algorithm's own reasons."""
        return self.base.adapter is not None or self.algorithm.needs_lora(self)

    def lora_rank(self) -> int:
        """The LoRA rank of the adapters this run trains (the engine also fits the recipe's own adapter)."""
        return self.algorithm.lora_rank(self.recipe)

    def adapter_serving(self) -> str:
        """``lora`` or ``merged``: the recipe's ``engine.adapters`` with ``auto`` resolved for this
        backend and device (see alignment.adapter_serving)."""
        return serving_mode(self.recipe.engine.adapters, choose_backend(self.recipe.engine.backend), has_cuda())

    def merged_dir(self, adapter: str) -> str:
        """base + ``adapter`` merged, built once per adapter content in ``RUN/merged/<digest>``."""
        out = self.store.root / "merged" / adapter_digest(adapter)[:16]
        if not (out / "config.json").is_file():
            self.log(f"merging adapter {self.rel(adapter)} into the base -> {self.rel(out)}")
            started = time.monotonic()
            merge_adapter(self.base.base, adapter, out)
            self.store.log_event("adapter_merged", adapter=self.rel(adapter), seconds=round(time.monotonic() - started, 2))
        return str(out)

    def open_engine(self, spec: EngineSpec) -> Generator:
        """Start an engine, recording an ``engine_started`` event with the seconds it took."""
        started = time.monotonic()
        engine = open_generator(spec)
        self.store.log_event("engine_started", backend=engine.backend, model=self.rel(spec.base),
                             seconds=round(time.monotonic() - started, 2))
        return engine

    def engine_spec(self, e, base: ResolvedModel, *, enable_lora: bool) -> EngineSpec:
        """An engine for ``base`` with the settings of engine section ``e``."""
        return EngineSpec(
            base=base.base, backend=e.backend, seed=self.recipe.seed, dtype=e.dtype,
            max_model_len=e.max_model_len, kv_cache_gib=e.kv_cache_gib,
            gpu_memory_utilization=e.gpu_memory_utilization, enforce_eager=e.enforce_eager,
            enable_lora=enable_lora, batch_size=e.batch_size, cpu_threads=e.cpu_threads,
            # An adapter given as the model keeps its own rank (DPO trains on from it), which
            # may exceed the recipe's: vLLM refuses adapters above max_lora_rank.
            max_lora_rank=lora_rank_slot(max(self.lora_rank(), adapter_rank(base.adapter))),
            base_url=e.base_url, api_key_env=e.api_key_env, request_timeout_s=e.request_timeout_s,
            max_concurrency=e.max_concurrency, extra=e.vllm_args(),
        )

    def generator(self) -> Generator:
        """One engine per flow run, reused for generation and judging in every iteration (with
        merged adapters: restarted when the iteration's adapter changes)."""
        if self._generator is None:
            e = self.recipe.engine
            merged = self.adapter_serving() == "merged"
            spec = self.engine_spec(e, self.base, enable_lora=self.needs_lora() and not merged)
            if merged:  # the engine starts on first use, on the checkpoint of the adapter asked for
                self._generator = MergedAdapters(spec, self.merged_dir, open_engine=self.open_engine, log=self.log)
            else:
                self.log(f"starting {choose_backend(e.backend)} engine for {self.base.base} (adapters per request)")
                self._generator = self.open_engine(spec)
                self.log(f"engine ready ({self._generator.backend})")
        return self._generator

    # ---- a separate judge (Self-Rewarding's judge.model / judge.engine) ---------------------
    def judge_model(self) -> ResolvedModel:
        """The separate judge's model: ``judge.model``, else the recipe's model (on ``judge.engine``)."""
        return resolve(self.recipe.judge.model or self.recipe.model)

    def judge_identity(self) -> str:
        """What a separate judge is, for the judge stage's inputs: its model reference (and its
        adapter's weights) and its backend."""
        j = self.recipe.judge
        m = self.judge_model()
        return hash_obj({"judge_model": j.model or self.recipe.model, "backend": (j.engine or self.recipe.engine).backend,
                         "adapter": adapter_digest(m.adapter) if m.adapter else None})

    def judge_generator(self) -> Generator:
        """The separate judge's engine, opened once per flow run (its adapter, if any, per request)."""
        if self._judge is None:
            e = self.recipe.judge.engine or self.recipe.engine
            model = self.judge_model()
            self.log(f"starting {choose_backend(e.backend)} engine for the judge {self.recipe.judge.model or model.base}")
            self._judge = self.open_engine(self.engine_spec(e, model, enable_lora=model.adapter is not None))
        return self._judge

    def close(self) -> bool:
        """Stop the engines (they restart on the next use); True if one was running."""
        running = [g for g in (self._generator, self._judge) if g is not None]
        for g in running:
            g.close()
        self._generator = self._judge = None
        return bool(running)

    # ---- stages --------------------------------------------------------------------------
    def stage_progress(self, stage: str, t: int) -> Progress | None:
        return self.progress(stage, t) if self.progress else None

    def iterations(self) -> range:
        return range(1, self.recipe.iterations + 1)

    def run_stage(self, name: str, t: int) -> dict | None:
        """Execute one stage of iteration t (skipped if current); its manifest's info."""
        return execute(self, self.algorithm.stage(name), t)

    def iteration(self, t: int) -> dict:
        """Every stage of iteration t in order, then the iteration's metrics."""
        for stage in self.algorithm.stages:
            execute(self, stage, t)
        return self.metrics(t)

    def metrics(self, t: int) -> dict:
        """The iteration's metrics, written to ``iter_<t>/metrics.json`` and, once every stage of the
        iteration is done, to the recipe's trackers (``report``; each gets them once, never failing
        the run: alignment.trackers)."""
        out = self.algorithm.metrics(self, t)
        if self.recipe.report and self.iteration_done(t):
            report_iteration(self.recipe.report, self.store.root, self.recipe.name, t, out, log=self.log)
        return out

    def iteration_done(self, t: int) -> bool:
        """Whether every stage this recipe runs in iteration t has its manifest (the review gate asks
        for the metrics before training: those are not the iteration's)."""
        return all(self.store.manifest(t, s.name) is not None for s in self.algorithm.active(self.recipe))
