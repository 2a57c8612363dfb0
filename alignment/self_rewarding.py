"""One Self-Rewarding iteration (Yuan et al., 2024), stage by stage, against a run directory.

    M_t generates prompts (optional self-instruct) → K responses per prompt → judges each J
    times → pairs (highest vs lowest mean) → DPO with LoRA → M_{t+1}.

Each method is one stage: it skips if the run directory already holds its current output,
otherwise computes it with the pure functions of ``actor``, ``judge`` and ``pairs`` and commits
it through ``store``. Flows call these methods as Prefect tasks; nothing here imports Prefect.
"""

from __future__ import annotations

import collections
import statistics
from dataclasses import dataclass
from pathlib import Path

from alignment import corrections
from alignment.actor import generate_responses, self_instruct
from alignment.config import SelfRewardingRecipe
from alignment.data import load_prompts
from alignment.faults import crash_point
from alignment.generation import Sampling, derive_seed
from alignment.judge import JudgeSettings, judge_responses
from alignment.launch import run_dpo
from alignment.iterative import IterativeRun
from alignment.pairs import build_pairs, tie_rate
from alignment.stages import error_message, run_sharded, run_table_stage, shard_key, stage_outcome
from alignment.store import sha256_file
from alignment.training import DPOSpec, trained_rows_info, truncation_warnings

STAGES = ["prompts", "generate", "judge", "pairs", "train"]


@dataclass
class SelfRewardingRun(IterativeRun):
    recipe: SelfRewardingRecipe

    # ---- stages ------------------------------------------------------------------------
    def prompts(self, t: int) -> str:
        cfg = self.recipe.prompts
        source = Path(cfg.source)
        inputs = {"source": sha256_file(source) if source.is_file() else cfg.source}
        if cfg.self_instruct.enabled:
            inputs["model"] = self.model_hash(t)

        def compute():
            rows = load_prompts(cfg.source, field=cfg.field, split=cfg.split, limit=cfg.limit)
            info = {"seed_prompts": len(rows)}
            if cfg.self_instruct.enabled:
                si = cfg.self_instruct
                new, stats = self_instruct(
                    self.generator(), rows, n_new=si.n_new, few_shot=si.few_shot, max_attempts=si.max_attempts,
                    min_chars=si.min_chars, max_chars=si.max_chars,
                    sampling=Sampling(n=1, temperature=si.temperature, top_p=0.95, max_tokens=si.max_tokens),
                    adapter=self.model(t).adapter, seed=derive_seed(self.recipe.seed, t, "self_instruct"),
                )
                self.log(f"iter {t} prompts: self-instruct kept {stats['kept']} of {stats['requested']} "
                         f"(duplicates {stats['duplicate']}, too short {stats['too_short']}, too long {stats['too_long']})")
                rows += new
                info["self_instruct"] = stats
            return rows, info

        return run_table_stage(self.store, t, "prompts", inputs=inputs, recipe_hash=self._section_hash("prompts", "model"),
                               compute=compute, log=self.log)

    def generate(self, t: int) -> str:
        g = self.recipe.generation
        inputs = {"prompts": self.store.output_hash(t, "prompts"), "model": self.model_hash(t)}
        recipe_hash = self._section_hash("generation")
        sampling = Sampling(n=g.n, temperature=g.temperature, top_p=g.top_p, max_tokens=g.max_tokens)

        def compute():
            prompts = self.store.read_rows(t, "prompts")
            adapter = self.model(t).adapter
            rows = run_sharded(
                self.store, t, "generate", prompts, shard_size=self.recipe.engine.shard_size,
                key=shard_key(inputs, recipe_hash), log=self.log, progress=self._progress("generate", t),
                compute=lambda chunk, i: generate_responses(
                    self.generator(), chunk, sampling, adapter=adapter, seed=derive_seed(self.recipe.seed, t, "gen")),
            )
            return rows, {"responses": len(rows), "prompts": len(prompts)}

        return run_table_stage(self.store, t, "generate", inputs=inputs, recipe_hash=recipe_hash, compute=compute, log=self.log)

    def judge(self, t: int) -> str:
        j = self.recipe.judge
        inputs = {"generate": self.store.output_hash(t, "generate"), "model": self.model_hash(t)}
        recipe_hash = self._section_hash("judge")
        settings = JudgeSettings(n=j.n, mode=j.mode, score=j.score, temperature=j.temperature, top_p=j.top_p,
                                 max_tokens=j.max_tokens, min_digit_mass=j.min_digit_mass)

        def compute():
            responses = self.store.read_rows(t, "generate")
            # Shard by prompt (all K responses of a prompt in one shard), like generation.
            by_prompt = list(_group(responses).values())
            adapter = self.model(t).adapter
            rows = run_sharded(
                self.store, t, "judge", by_prompt, shard_size=self.recipe.engine.shard_size,
                key=shard_key(inputs, recipe_hash), log=self.log, progress=self._progress("judge", t),
                compute=lambda chunk, i: judge_responses(
                    self.generator(), [r for group in chunk for r in group], settings, adapter=adapter,
                    seed=derive_seed(self.recipe.seed, t, "judge")),
            )
            stats = judge_stats(rows)
            self.log(f"iter {t} judge: {stats['scored']}/{stats['judgments']} judgments scored "
                     f"({100 * stats['scored_share']:.0f}%), modes {stats['modes']}")
            return rows, stats

        return run_table_stage(self.store, t, "judge", inputs=inputs, recipe_hash=recipe_hash, compute=compute, log=self.log)

    def pairs(self, t: int) -> dict:
        inputs = {"judge": self.store.output_hash(t, "judge")}

        def compute():
            judged = self.store.read_rows(t, "judge")
            rows, stats = build_pairs(judged, rho=self.recipe.pairs.rho)
            stats["tie_rate"] = tie_rate(judged)
            return rows, stats

        run_table_stage(self.store, t, "pairs", inputs=inputs, recipe_hash=self._section_hash("pairs"),
                        compute=compute, log=self.log)
        stats = self.store.manifest(t, "pairs")["info"]
        self.log(f"iter {t} pairs: {stats['pairs']} pairs from {stats['prompts']} prompts "
                 f"({stats['ties']} ties, {stats['unscored']} unscored, {stats['failed_judgments']} failed judgments)")
        return stats

    def train(self, t: int) -> str | None:
        """DPO on this iteration's pairs (with review corrections applied) → adapter of M_{t+1}."""
        inputs = self.train_inputs(t)
        recipe_hash = self._section_hash("train")
        if stage_outcome(self.store, t, "train", inputs, recipe_hash, self.log) is not None:
            return self.adapter(t)
        pairs, applied = self.reviewed_pairs(t)
        # "kind" lets the trainer say which rows max_length cut: a cut judge pair loses its Score: line.
        pairs = ([{k: p[k] for k in ("prompt", "chosen", "rejected")} | {"kind": "pair"} for p in pairs]
                 + [r | {"kind": "judge"} for r in self.extra_training_rows(t)])
        if not pairs:
            self.log(f"WARNING iter {t} train: no preference pairs (all ties or failed judgments); "
                     f"skipping training, M_{t + 1} = M_{t}")
            self.store.commit_dir(t, "train", lambda tmp: (tmp / "NO_PAIRS").write_text("no pairs\n"),
                                  inputs=inputs, recipe_hash=recipe_hash, subdir="empty",
                                  info={"adapter": self._rel(self.model(t).adapter), "pairs": 0, "corrections": applied, "trained": False})
            return self.model(t).adapter
        tc = self.recipe.train
        ckpt = self.store.scratch_dir(t, "train", "checkpoints")
        self.store.log_event("start", t=t, stage="train", pairs=len(pairs))
        metrics: dict = {}

        def build(tmp: Path) -> None:
            import json

            data = tmp / "train_pairs.jsonl"
            data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
            spec = DPOSpec(
                base=self.base.base, init_adapter=self.model(t).adapter, data=str(data), output_dir=str(tmp),
                checkpoint_dir=str(ckpt / "trainer"), beta=tc.beta, learning_rate=tc.learning_rate, epochs=tc.epochs,
                batch_size=tc.batch_size, grad_accum=tc.grad_accum, max_length=tc.max_length,
                save_steps=tc.save_steps, seed=self.recipe.seed, lora=tc.lora.model_dump(), crash_prefix=f"iter{t}/train",
            )
            metrics.update(run_dpo(spec, launcher=tc.launcher, spec_path=ckpt / "spec.json", log=self.log))
            info.update(trained_rows_info(metrics))
            crash_point(f"iter{t}/train/before_commit")

        final = self.store.stage_dir(t, "train") / "adapter"
        info = {"adapter": self._rel(final), "pairs": len(pairs), "corrections": applied, "trained": True}
        try:
            self.store.commit_dir(t, "train", build, inputs=inputs, recipe_hash=recipe_hash, info=info)
        except BaseException as err:
            self.store.log_event("error", t=t, stage="train", message=error_message(err))
            raise
        self.store.log_event("done", t=t, stage="train")
        self.log(f"iter {t} train: adapter {final} (loss {metrics.get('train_loss', float('nan')):.4f}, "
                 f"{metrics.get('steps')} steps)")
        for line in truncation_warnings(metrics):
            self.log(f"WARNING iter {t} train: {line}")
        return str(final)

    def train_inputs(self, t: int) -> dict:
        """Upstream outputs the train stage depends on (subclasses add theirs)."""
        return {"pairs": self.store.output_hash(t, "pairs"), "model": self.model_hash(t)}

    def extra_training_rows(self, t: int) -> list[dict]:
        """More {prompt, chosen, rejected} rows for the same DPO step (Meta-Rewarding: judge pairs)."""
        return []

    def reviewed_pairs(self, t: int) -> tuple[list[dict], list[str]]:
        """This iteration's pairs with the review corrections stored so far applied
        (``corrections.jsonl``, written by ``selfalign review``), and the applied ids, which
        the train manifest records so each adapter says what it was trained with."""
        if not corrections.load_corrections(self.store, t):
            return self.store.read_rows(t, "pairs"), []
        pairs, applied = corrections.reviewed_pairs(self.store, t)
        if applied:
            self.log(f"iter {t} train: {len(applied)} review corrections applied")
        return pairs, applied

    # ---- reporting ---------------------------------------------------------------------
    def metrics(self, t: int) -> dict:
        """Per-iteration metrics, written to ``iter_<t>/metrics.json``."""
        judge = self.store.manifest(t, "judge")["info"]
        pairs = self.store.manifest(t, "pairs")["info"]
        train = self.store.manifest(t, "train")
        out = {"iteration": t, "model": self.model(t).label, "judge": judge, "pairs": pairs,
               "train": train["info"] if train else None}
        adapter = self.adapter(t) if train else None
        if adapter and Path(adapter, "train_metrics.json").is_file():
            import json

            out["train_metrics"] = json.loads(Path(adapter, "train_metrics.json").read_text())
        self.store.write_json(t, "metrics.json", out)
        return out

    def iteration(self, t: int) -> dict:
        """All stages of iteration t in the recipe's order (the flow does the same, one task
        per stage); each stage is the method of the same name."""
        for stage in self.recipe.STAGES:
            getattr(self, stage)(t)
        return self.metrics(t)


def _group(rows: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = collections.OrderedDict()
    for r in rows:
        groups.setdefault(r["prompt_id"], []).append(r)
    return groups


def judge_stats(rows: list[dict]) -> dict:
    scores = [s for r in rows for s in r["scores"]]
    scored = [s for s in scores if s is not None]
    modes = collections.Counter(m for r in rows for m in r["score_modes"])
    hist = collections.Counter(int(round(s)) for s in scored)
    return {
        "responses": len(rows),
        "judgments": len(scores),
        "scored": len(scored),
        "failed": len(scores) - len(scored),
        "scored_share": (len(scored) / len(scores)) if scores else 0.0,
        "modes": dict(modes),
        "mean_score": statistics.fmean(scored) if scored else None,
        "histogram": {str(k): hist.get(k, 0) for k in range(6)},
    }
