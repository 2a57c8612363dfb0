"""PERL's inputs, checked before anything runs: reward functions (``module:function`` or
``file.py:function``, probed once for a finite float), preference pairs (TRL-format files or
datasets, an earlier selfalign run's reviewed pairs, pairs built from scores), the prompt split,
and a given reward-model adapter's base. Pure functions and loaders, no stage logic: the recipe's
preflight (``perl_config``), the stages (``perl``) and the trainer (``perl_training``) all read
them from here.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from alignment.data import DataError, prompt_id, read_records
from alignment.files import hash_obj
from alignment.models import ModelError, resolve
from alignment.store import RunStore

if TYPE_CHECKING:  # annotations only: perl_config imports this module
    from alignment.perl_config import PreferenceDataConfig

PROBE = ("Write one sentence about the weather.", "It is a bright, calm day with a light breeze.")


# ------------------------------------------------------------------------------ reward functions
class RewardFunctionError(ValueError):
    """A reward function path that does not import, is not callable, or returns a non-float."""


_FN_CACHE: dict[str, Callable] = {}


def load_reward_function(path: str | None, *, probe: bool = False) -> Callable[[str, str], float]:
    """Import ``module:function`` or ``path/to/file.py:function``.

    ``probe=True`` also calls it once on a fixed (prompt, response) and checks it returns a
    finite float, so a broken function fails before any training, not after an hour of PPO.
    """
    if not path or not isinstance(path, str) or ":" not in path:
        raise RewardFunctionError(f"reward function {path!r}: expected 'module:function' or 'file.py:function'")
    target, _, name = path.rpartition(":")
    if not target or not name.isidentifier():
        raise RewardFunctionError(f"reward function {path!r}: expected 'module:function' or 'file.py:function'")
    fn = _FN_CACHE.get(path)
    if fn is None:
        try:
            if target.endswith(".py"):
                file = Path(target).expanduser()
                if not file.is_file():
                    raise RewardFunctionError(f"reward function {path!r}: file {target} not found")
                mod_name = "selfalign_reward_" + hashlib.sha256(str(file.resolve()).encode()).hexdigest()[:10]
                spec = importlib.util.spec_from_file_location(mod_name, file)
                module = importlib.util.module_from_spec(spec)
                sys.modules[mod_name] = module
                spec.loader.exec_module(module)
            else:
                module = importlib.import_module(target)
        except RewardFunctionError:
            raise
        except Exception as err:  # ImportError, SyntaxError, an error at import time ...
            raise RewardFunctionError(f"reward function {path!r}: cannot import {target} ({type(err).__name__}: {err})") from None
        fn = getattr(module, name, None)
        if fn is None:
            raise RewardFunctionError(f"reward function {path!r}: {target} has no attribute {name!r}")
        if not callable(fn):
            raise RewardFunctionError(f"reward function {path!r}: {name} is not callable")
        _FN_CACHE[path] = fn
    if probe:
        call_reward(fn, *PROBE, name=path)
    return fn


def as_reward(value, name: str = "reward") -> float:
    """A reward function's return value as a finite float, else RewardFunctionError naming it."""
    try:
        import numpy as np

        numeric = (int, float, np.integer, np.floating)
    except ImportError:  # pragma: no cover
        numeric = (int, float)
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # 0-d numpy / torch scalars
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numeric):
        raise RewardFunctionError(f"reward function {name!r} returned {type(value).__name__} {value!r}; expected a float")
    out = float(value)
    if not math.isfinite(out):
        raise RewardFunctionError(f"reward function {name!r} returned {out}; expected a finite float")
    return out


def call_reward(fn: Callable, prompt: str, response: str, name: str = "reward") -> float:
    try:
        value = fn(prompt, response)
    except Exception as err:
        raise RewardFunctionError(f"reward function {name!r} raised {type(err).__name__}: {err}") from err
    return as_reward(value, name)


# ------------------------------------------------------------------------------ preference data
def _message_text(value, where: str, name: str, *, role: str | None = None) -> str:
    """A column value as text: a string, or the last (``role``) message of a chat message list."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        msgs = [m for m in value if role is None or m.get("role") == role] or value
        content = msgs[-1].get("content")
        if isinstance(content, str):
            return content
    raise DataError(f"{where}: field {name!r} must be text or a list of chat messages, got {type(value).__name__}")


def to_preference_rows(records: Sequence[dict], *, source: str, prompt_field: str = "prompt",
                       chosen_field: str = "chosen", rejected_field: str = "rejected") -> list[dict]:
    """TRL-format preference records → rows ``{prompt_id, prompt, chosen, rejected}`` (plain text).

    Accepts TRL's explicit-prompt format (prompt / chosen / rejected as strings or message
    lists) and its implicit-prompt conversational format (no prompt column; chosen and rejected
    are whole conversations whose user turn is the prompt). A missing or empty chosen/rejected is
    an error naming the file and line; pairs with chosen == rejected are errors too (they carry
    no preference and would teach the RM nothing).
    """
    rows = []
    for index, record in enumerate(records, start=1):
        line = record.get("__line__")
        where = f"{source}:{line}" if line is not None else f"{source}: row {index}"
        for name in (chosen_field, rejected_field):
            if name not in record or record[name] is None:
                raise DataError(f"{where}: missing field {name!r} (a preference pair needs {chosen_field!r} and {rejected_field!r})")
        if prompt_field in record and record[prompt_field] is not None:
            prompt = _message_text(record[prompt_field], where, prompt_field, role="user")
        elif isinstance(record[chosen_field], list):
            prompt = _message_text(record[chosen_field], where, chosen_field, role="user")
        else:
            raise DataError(f"{where}: missing field {prompt_field!r} (and {chosen_field!r} is not a conversation)")
        chosen = _message_text(record[chosen_field], where, chosen_field, role="assistant")
        rejected = _message_text(record[rejected_field], where, rejected_field, role="assistant")
        for name, text in ((prompt_field, prompt), (chosen_field, chosen), (rejected_field, rejected)):
            if not text.strip():
                raise DataError(f"{where}: field {name!r} is empty")
        if chosen.strip() == rejected.strip():
            raise DataError(f"{where}: {chosen_field!r} and {rejected_field!r} are identical")
        rows.append({"prompt_id": prompt_id(prompt), "prompt": prompt.strip(), "chosen": chosen.strip(),
                     "rejected": rejected.strip()})
    if not rows:
        raise DataError(f"{source}: no preference pairs")
    return rows


def is_run_dir(source: str) -> bool:
    return Path(source).expanduser().is_dir() and (Path(source).expanduser() / "run.json").is_file()


def pairs_from_run(run_dir: str, iteration: int | None = None) -> tuple[list[dict], dict]:
    """An earlier selfalign run's pairs of one iteration, with its review corrections applied."""
    store = RunStore.open(run_dir)
    done = [t for t in store.iterations() if store.manifest(t, "pairs") is not None]
    if not done:
        raise DataError(f"{run_dir}: the run has no complete pairs stage")
    t = iteration if iteration is not None else done[-1]
    if t not in done:
        raise DataError(f"{run_dir}: iteration {t} has no complete pairs stage (complete: {done})")
    try:
        from alignment.corrections import reviewed_pairs
    except ImportError:  # review corrections not available in this build: use the pairs as stored
        pairs, applied = store.read_rows(t, "pairs"), []
    else:
        pairs, applied = reviewed_pairs(store, t)
    rows = to_preference_rows([{k: p.get(k) for k in ("prompt", "chosen", "rejected")} for p in pairs],
                              source=f"{run_dir} iteration {t} pairs")
    return rows, {"run": str(Path(run_dir).resolve()), "iteration": t, "corrections_applied": len(applied)}


def load_preferences(cfg: PreferenceDataConfig) -> tuple[list[dict], dict]:
    """Preference rows from ``cfg.source`` (file, HF id or run dir) and where they came from."""
    source = cfg.source
    if is_run_dir(source):
        rows, info = pairs_from_run(source, cfg.iteration)
    else:
        records = read_records(source, split=cfg.split)
        rows = to_preference_rows(records, source=source, prompt_field=cfg.prompt_field,
                                  chosen_field=cfg.chosen_field, rejected_field=cfg.rejected_field)
        info = {"source": source}
    if cfg.limit:
        rows = rows[: cfg.limit]
    return rows, info


def split_by_prompt(rows: Sequence[dict], fraction: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held-out) by a hash of (seed, prompt_id): every pair of a prompt lands on one side,
    the split does not depend on row order, and at least one row stays in train. About
    ``fraction`` of the prompts go to held-out (at least one when fraction > 0 and there are ≥ 2)."""
    if fraction <= 0 or len({r["prompt_id"] for r in rows}) < 2:
        return list(rows), []
    ids = sorted({r["prompt_id"] for r in rows}, key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())
    n_held = min(len(ids) - 1, max(1, round(fraction * len(ids))))
    held = set(ids[:n_held])
    return [r for r in rows if r["prompt_id"] not in held], [r for r in rows if r["prompt_id"] in held]


def pairs_from_scores(rows: Sequence[dict], *, min_margin: float = 1e-6,
                      pairs_per_prompt: int = 1) -> tuple[list[dict], dict]:
    """Scored samples (``prompt_id, prompt, response, score``) → up to ``pairs_per_prompt`` pairs
    per prompt: best vs worst, second best vs second worst, … (samples ranked by score, the earlier
    sample first on equal scores; each sample is used once). A pair whose scores differ by less
    than ``min_margin``, or whose texts are equal, is dropped; a prompt left with no pair is a tie."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["prompt_id"], []).append(r)
    pairs, ties = [], 0
    for pid, group in groups.items():
        ranked = sorted(group, key=lambda r: -r["score"])  # stable: the earlier sample first on equal scores
        worst_first = sorted(group, key=lambda r: r["score"])
        made = 0
        for i in range(min(pairs_per_prompt, len(group) // 2)):
            best, worst = ranked[i], worst_first[i]
            if best["score"] - worst["score"] < min_margin or best["response"].strip() == worst["response"].strip():
                continue
            pairs.append({"prompt_id": pid, "prompt": best["prompt"], "chosen": best["response"],
                          "rejected": worst["response"], "chosen_score": best["score"], "rejected_score": worst["score"]})
            made += 1
        ties += made == 0
    return pairs, {"prompts": len(groups), "pairs": len(pairs), "ties": ties}


def check_rm_adapter(path: str, base: str) -> None:
    """A given reward-model adapter must be a sequence-classification LoRA on the recipe's base."""
    p = Path(path).expanduser()
    cfg_file = p / "adapter_config.json"
    if not cfg_file.is_file():
        raise ModelError(f"reward_model.path {path}: not a PEFT adapter directory (no adapter_config.json)")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("task_type") not in (None, "SEQ_CLS"):
        raise ModelError(f"reward_model.path {path}: task_type {cfg.get('task_type')!r}, expected SEQ_CLS (a reward model)")
    rm_base = cfg.get("base_model_name_or_path")
    try:
        rm_resolved = resolve(rm_base).base if rm_base else None
    except ModelError:
        rm_resolved = rm_base
    if rm_resolved is None or _same_model(rm_resolved, base) is False:
        raise ModelError(f"reward_model.path {path} was trained on base model {rm_base!r}, but this recipe's model is "
                         f"{base!r}; train the reward model on the same base (or point model at {rm_base})")


def _same_model(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve() or _config_fingerprint(pa) == _config_fingerprint(pb)
    return a == b


def _config_fingerprint(path: Path) -> str | None:
    """Architecture + size of a model dir (a copied base dir is the same model)."""
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    keys = ("architectures", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size", "num_attention_heads")
    w = path / "model.safetensors"
    return hash_obj({k: cfg.get(k) for k in keys} | {"weights": w.stat().st_size if w.exists() else None})
