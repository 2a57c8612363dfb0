"""One Self-Rewarding iteration (Yuan et al., 2024), stage by stage, against a run directory.

    M_t generates prompts (optional self-instruct) → K responses per prompt → judges each J
    times → pairs (highest vs lowest mean) → DPO with LoRA → M_{t+1}
    → (with ``eval`` on) M_{t+1} against M_t on held-out prompts, by a fixed judge.

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
from alignment.eval_config import load_reference
from alignment.faults import crash_point
from alignment.generation import Sampling, derive_seed
from alignment.head_to_head import PairwiseSettings, compare, mean_or_none, outcome_label, summarize
from alignment.judge import JudgeSettings, judge_responses
from alignment.launch import run_dpo
from alignment.iterative import IterativeRun
from alignment.pairs import build_pairs, tie_rate
from alignment.report import eval_line
from alignment.spin import split_heldout
from alignment.stages import error_message, run_sharded, run_table_stage, shard_key, stage_outcome
from alignment.store import hash_obj, sha256_file
from alignment.training import DPOSpec, trained_rows_info, truncation_warnings

STAGES = ["prompts", "generate", "judge", "pairs", "train"]


@dataclass
class SelfRewardingRun(IterativeRun):
    recipe: SelfRewardingRecipe

    def needs_lora(self) -> bool:
        """Also when the eval stage serves the adapter trained in the same iteration."""
        return super().needs_lora() or self.recipe.eval.enabled

    # ---- held-out prompts ----------------------------------------------------------------
    def eval_file_prompts(self) -> list[dict]:
        """The prompts of ``eval.prompts`` (ids as the prompts stage's), or none."""
        ev = self.recipe.eval
        return load_prompts(ev.prompts, field=ev.field) if ev.prompts else []

    def split_prompts(self, seeds: list[dict]) -> tuple[list[dict], list[dict]]:
        """(training, held-out) seed prompts: a seed prompt that is also in ``eval.prompts`` is
        never trained on; of the others, ``eval.heldout_fraction`` is held out by the hash of
        (seed, prompt id) (``alignment.spin.split_heldout``: a prompt keeps its side when rows are
        added or reordered)."""
        in_file = {r["prompt_id"] for r in self.eval_file_prompts()}
        rest = [r for r in seeds if r["prompt_id"] not in in_file]
        return split_heldout(rest, self.recipe.eval.heldout_fraction, self.recipe.seed)

    def eval_prompts(self) -> list[dict]:
        """What the eval stage compares on: the ``eval.prompts`` file's prompts, then the held-out
        seed prompts not already among them; the first ``eval.max_prompts``."""
        cfg, ev = self.recipe.prompts, self.recipe.eval
        _, held = self.split_prompts(load_prompts(cfg.source, field=cfg.field, split=cfg.split, limit=cfg.limit))
        rows = self.eval_file_prompts()
        rows += [r for r in held if r["prompt_id"] not in {x["prompt_id"] for x in rows}]
        return rows[: ev.max_prompts]

    def prompt_inputs(self) -> dict:
        """Identity of the prompt files: the seed prompts' source and, if set, ``eval.prompts``."""
        cfg, ev = self.recipe.prompts, self.recipe.eval
        source = Path(cfg.source)
        inputs = {"source": sha256_file(source) if source.is_file() else cfg.source}
        if ev.prompts:
            inputs["eval_prompts"] = sha256_file(Path(ev.prompts))
        return inputs

    # ---- stages ------------------------------------------------------------------------
    def prompts(self, t: int) -> str:
        """Seed prompts (less the held-out ones when ``eval`` is on) plus optional self-instruct.

        With eval off, inputs and recipe hash are exactly what they were before the eval stage
        existed, so such runs keep every stage's hash."""
        cfg, ev = self.recipe.prompts, self.recipe.eval
        inputs = self.prompt_inputs()  # just {"source": ...} with eval off, as before
        if cfg.self_instruct.enabled:
            inputs["model"] = self.model_hash(t)
        held_out = {"heldout": {k: v for k, v in ev.model_dump(mode="json").items()
                                if k in ("heldout_fraction", "prompts", "field")}} if ev.enabled else {}

        def compute():
            rows = load_prompts(cfg.source, field=cfg.field, split=cfg.split, limit=cfg.limit)
            info = {"seed_prompts": len(rows)}
            kept_out: set[str] = set()
            if ev.enabled:
                train, _ = self.split_prompts(rows)
                kept_out = {r["prompt_id"] for r in rows} - {r["prompt_id"] for r in train}
                rows = train
                info["heldout"] = len(kept_out)
                self.log(f"iter {t} prompts: {len(kept_out)} of {info['seed_prompts']} seed prompts kept out of "
                         f"training for the eval stage")
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
                # A new prompt that is an eval prompt would leak it into training.
                eval_ids = kept_out | {r["prompt_id"] for r in self.eval_file_prompts()}
                kept = [r for r in new if r["prompt_id"] not in eval_ids]
                rows += kept
                info["self_instruct"] = stats | ({"eval_prompts_dropped": len(new) - len(kept)} if ev.enabled else {})
            return rows, info

        return run_table_stage(self.store, t, "prompts", inputs=inputs,
                               recipe_hash=self._section_hash("prompts", "model", **held_out),
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

    # ---- evaluation ----------------------------------------------------------------------
    def eval_judge_adapter(self) -> str | None:
        """The fixed judge's adapter: none (the base model) or M_1's (``eval.judge.model: initial``)."""
        return self.base.adapter if self.recipe.eval.judge.model == "initial" else None

    def token_lengths(self, texts: list[str]) -> list[int]:
        """Token counts of texts under the base model's tokenizer (loaded once)."""
        tokenizer = getattr(self, "_tokenizer", None)
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = self._tokenizer = AutoTokenizer.from_pretrained(self.base.base)
        return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]] if texts else []

    def eval(self, t: int) -> dict | None:
        """M_{t+1} ("after", the candidate) against M_t ("before") on the eval prompts.

        Both answer every eval prompt (the same per-prompt seed, so sampling noise is shared);
        the fixed judge compares each pair in both orders (``alignment.head_to_head``) and, with
        ``eval.judge.pointwise``, scores each answer with the recipe's judge settings; with
        ``eval.reference``, M_{t+1}'s answers are also compared with the reference answers.
        One row per prompt in ``iter_<t>/eval/data.parquet``; the summary (win / tie / loss, win
        rate with its seeded bootstrap 95% interval, LC win rate, mean length and score of each
        side) is the manifest's info and ``metrics.json``'s ``eval``. Off: one log line, nothing
        written."""
        ev = self.recipe.eval
        if not ev.enabled:
            self.log(f"iter {t} eval: off (eval.heldout_fraction 0 and no eval.prompts); skipped")
            return None
        judge_model = self.model_hash(1) if ev.judge.model == "initial" else hash_obj({"model": self.recipe.model,
                                                                                        "judge": "base"})
        inputs = self.prompt_inputs() | {"before": self.model_hash(t), "after": self.model_hash(t + 1),
                                         "judge_model": judge_model}
        if ev.reference:
            inputs["reference"] = sha256_file(Path(ev.reference))
        # The recipe's judge section sets the pointwise scores; the prompts section, the split.
        recipe_hash = self._section_hash("eval", "prompts", *(("judge",) if ev.judge.pointwise else ()))

        def compute():
            prompts = self.eval_prompts()
            before, after = self.model(t), self.model(t + 1)
            gen = self.generator()
            sampling = Sampling(n=1, temperature=ev.temperature, top_p=ev.top_p, max_tokens=ev.max_tokens)
            # Every answer first, then every judgment: an engine serving merged adapters restarts
            # only when the model changes (M_t — still loaded from this iteration's judging —,
            # M_{t+1}, then the judge). Per-request seeds make the order irrelevant to the result.
            answer_seed = derive_seed(self.recipe.seed, "eval-answers")
            answers = {side: generate_responses(gen, prompts, sampling, adapter=model.adapter, seed=answer_seed)
                       for side, model in (("before", before), ("after", after))}
            adapter = self.eval_judge_adapter()
            j = ev.judge
            settings = PairwiseSettings(mode=j.mode, temperature=j.temperature, top_p=j.top_p,
                                        max_tokens=j.max_tokens, min_verdict_mass=j.min_verdict_mass)
            items = [{"prompt_id": b["prompt_id"], "prompt": b["prompt"], "candidate": a["response"],
                      "baseline": b["response"]} for b, a in zip(answers["before"], answers["after"])]
            verdicts = compare(gen, items, settings, adapter=adapter, seed=derive_seed(self.recipe.seed, "eval-judge"))
            reference = load_reference(ev.reference) if ev.reference else {}
            ref_items = [i | {"baseline": reference[i["prompt_id"]]} for i in items if i["prompt_id"] in reference]
            ref_verdicts = dict(zip((i["prompt_id"] for i in ref_items), compare(
                gen, ref_items, settings, adapter=adapter, seed=derive_seed(self.recipe.seed, "eval-judge-reference"))))
            ref_lengths = dict(zip((i["prompt_id"] for i in ref_items), self.token_lengths([i["baseline"] for i in ref_items])))
            scores: dict[str, list] = {side: [None] * len(prompts) for side in answers}
            if j.pointwise:
                jc = self.recipe.judge
                js = JudgeSettings(n=jc.n, mode=jc.mode, score=jc.score, temperature=jc.temperature, top_p=jc.top_p,
                                   max_tokens=jc.max_tokens, min_digit_mass=jc.min_digit_mass)
                for side in answers:
                    scores[side] = [r["mean_score"] for r in judge_responses(
                        gen, answers[side], js, adapter=adapter, seed=derive_seed(self.recipe.seed, "eval-score", side))]
            rows = []
            for k, (b, a, v) in enumerate(zip(answers["before"], answers["after"], verdicts)):
                rv = ref_verdicts.get(b["prompt_id"], {})
                rows.append({
                    "prompt_id": b["prompt_id"], "prompt": b["prompt"],
                    "response_before": b["response"], "response_after": a["response"],
                    "length_before": b["length"], "length_after": a["length"],
                    "score_before": scores["before"][k], "score_after": scores["after"][k],
                    "verdict_after_first": v["verdict_candidate_first"], "verdict_before_first": v["verdict_baseline_first"],
                    "judgment_after_first": v["judgment_candidate_first"],
                    "judgment_before_first": v["judgment_baseline_first"],
                    "identical": v["identical"], "outcome": v["outcome"], "result": outcome_label(v["outcome"]),
                    "reference": reference.get(b["prompt_id"]), "reference_length": ref_lengths.get(b["prompt_id"]),
                    "reference_outcome": rv.get("outcome"),
                    "reference_result": outcome_label(rv["outcome"]) if rv else None,
                })
            return rows, eval_summary(rows, seed=self.recipe.seed, resamples=ev.bootstrap_resamples) | {
                "model_before": before.label, "model_after": after.label,
                "judge": f"{self.base.base} ({'M_1' if adapter else 'base'})"}

        run_table_stage(self.store, t, "eval", inputs=inputs, recipe_hash=recipe_hash, compute=compute, log=self.log)
        info = self.store.manifest(t, "eval")["info"]
        self.log(f"iter {t} eval on {info['prompts']} prompts, M_{t + 1} vs M_{t}: {eval_line(info)}")
        return info

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
        evaluated = self.store.manifest(t, "eval") if self.recipe.eval.enabled else None
        if evaluated:  # no key at all with eval off: such runs write the metrics they always did
            out["eval"] = evaluated["info"]
        self.store.write_json(t, "metrics.json", out)
        return out

    def stages(self) -> list[str]:
        """The recipe's stages, then ``eval`` when it is on."""
        return list(self.recipe.STAGES) + (["eval"] if self.recipe.eval.enabled else [])

    def iteration(self, t: int) -> dict:
        """All stages of iteration t in order (the flow does the same, one task per stage);
        each stage is the method of the same name."""
        for stage in self.stages():
            getattr(self, stage)(t)
        return self.metrics(t)


def _group(rows: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = collections.OrderedDict()
    for r in rows:
        groups.setdefault(r["prompt_id"], []).append(r)
    return groups


def eval_summary(rows: list[dict], *, seed: int = 0, resamples: int = 2000) -> dict:
    """The eval table's summary: :func:`alignment.head_to_head.summarize` of M_{t+1} (after)
    against M_t (before), the mean pointwise score of each side (None where unscored), the
    identical pairs (ties without a judgment), and the same head-to-head against the reference
    answers over the prompts that have one (``reference``: None without)."""
    h = summarize([r["outcome"] for r in rows], [r["length_after"] for r in rows], [r["length_before"] for r in rows],
                  seed=seed, resamples=resamples)
    out = {k: v for k, v in h.items() if not k.startswith("mean_length")} | {
        "mean_length_before": h["mean_length_baseline"], "mean_length_after": h["mean_length_candidate"],
        "mean_score_before": mean_or_none([r["score_before"] for r in rows]),
        "mean_score_after": mean_or_none([r["score_after"] for r in rows]),
        "identical": sum(1 for r in rows if r["identical"]), "reference": None}
    with_ref = [r for r in rows if r["reference"] is not None]
    if with_ref:
        ref = summarize([r["reference_outcome"] for r in with_ref], [r["length_after"] for r in with_ref],
                        [r["reference_length"] for r in with_ref], seed=seed, resamples=resamples)
        out["reference"] = {k: v for k, v in ref.items() if not k.startswith("mean_length")} | {
            "mean_length_after": ref["mean_length_candidate"], "mean_length_reference": ref["mean_length_baseline"]}
    return out


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
