"""Exporting a run's model: the adapter an iteration trained, or base + adapter merged into a
standalone model directory that transformers and vLLM load as-is (no PEFT, no selfalign)."""

from __future__ import annotations

import shutil
from pathlib import Path

from alignment.models import build_model_dir, merge_adapter, resolve
from alignment.store import RunStore


class ExportError(ValueError):
    """What cannot be exported, said in one line (the CLI exits 2)."""


def trained_iterations(store: RunStore) -> list[int]:
    """Iterations whose training stage (``train``, or PERL's ``ppo``) is complete."""
    return [t for t in store.iterations() if store.manifest(t, "train") or store.manifest(t, "ppo")]


def iteration_adapter(store: RunStore, t: int) -> str | None:
    """The adapter of the model iteration t produced (M_{t+1}); None when that model is the base
    itself (an iteration that trained nothing on a base-model run)."""
    train = store.manifest(t, "train")
    if train is not None:
        rel = train["info"].get("adapter")
        return str(store.root / rel) if rel else None  # root / absolute = absolute
    if store.manifest(t, "ppo") is not None:
        return str(store.stage_dir(t, "ppo") / "adapter")
    done = trained_iterations(store)
    raise ExportError(f"{store.root}: iteration {t} has not trained a model"
                      + (f" (trained: {', '.join(map(str, done))})" if done else " (nothing trained yet)"))


def export_model(store: RunStore, out: str | Path, *, iteration: int | None = None, merged: bool) -> tuple[int, Path]:
    """Write iteration ``iteration``'s model (default: the last trained) to ``out``: the adapter
    directory as trained, or with ``merged`` the full model W' = W + (α/r)·B·A. ``out`` must not
    exist (nothing is overwritten); it appears complete or not at all."""
    done = trained_iterations(store)
    if iteration is None:
        if not done:
            raise ExportError(f"{store.root}: nothing trained yet")
        iteration = done[-1]
    target = Path(out)
    if target.exists():
        raise ExportError(f"{target} exists; export writes a new directory")
    adapter = iteration_adapter(store, iteration)
    if adapter is None:
        raise ExportError(f"{store.root}: iteration {iteration} trained nothing; its model is the base model")
    if merged:
        base = resolve(adapter).base  # the base the adapter names in its adapter_config.json
        return iteration, merge_adapter(base, adapter, target)
    return iteration, build_model_dir(target, lambda tmp: shutil.copytree(adapter, tmp, dirs_exist_ok=True),
                                      marker="adapter_config.json")
