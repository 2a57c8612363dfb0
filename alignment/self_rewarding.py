"""Self-Rewarding (Yuan et al., 2024) as a list of stages per iteration.

    M_t generates prompts (optional self-instruct) → K responses per prompt → judges each J
    times → pairs (highest vs lowest mean) → DPO with LoRA → M_{t+1}
    → (with ``eval`` on) M_{t+1} against M_t on held-out prompts, by a fixed judge.

Each stage is declared once (``alignment.stages.Stage``: what it reads, which recipe fields
change its result, whether it is sharded); its compute function reads upstream tables and calls
the pure functions of ``actor``, ``judge`` and ``pairs``; ``alignment.stages.execute`` skips,
redoes, shards and commits it. Nothing here imports Prefect.
"""

from __future__ import annotations

import collections
import statistics
from pathlib import Path

from alignment import corrections
from alignment.actor import generate_responses, self_instruct
from alignment.config import result_dump
from alignment.data import load_prompts
from alignment.dpo_stage import dpo_output
from alignment.eval_config import load_reference
from alignment.files import hash_obj, sha256_file
from alignment.generation import Sampling, derive_seed
from alignment.head_to_head import (PairwiseSettings, compare, mean_or_none, outcome_label, score_gain_summary,
                                    summarize)
from alignment.judge import JudgeSettings, judge_responses
from alignment.pairs import build_pairs, tie_rate
from alignment.report import eval_line
from alignment.spin import split_heldout
from alignment.stages import Algorithm, Stage, Table


# ------------------------------------------------------------------------- held-out prompts
def eval_file_prompts(run) -> list[dict]:
    """The prompts of ``eval.prompts`` (ids as the prompts stage's), or none."""
    ev = run.recipe.eval
    return load_prompts(ev.prompts, field=ev.field) if ev.prompts else []


def split_prompts(run, seeds: list[dict]) -> tuple[list[dict], list[dict]]:
    """(training, held-out) seed prompts: a seed prompt that is also in ``eval.prompts`` is
    never trained on; of the others, ``eval.heldout_fraction`` is held out by the hash of
    (seed, prompt id) (``alignment.spin.split_heldout``: a prompt keeps its side when rows are
    added or reordered)."""
    in_file = {r["prompt_id"] for r in eval_file_prompts(run)}
    rest = [r for r in seeds if r["prompt_id"] not in in_file]
    return split_heldout(rest, run.recipe.eval.heldout_fraction, run.recipe.seed)


def eval_prompts(run) -> list[dict]:
    """What the eval stage compares on: the ``eval.prompts`` file's prompts, then the held-out
    seed prompts not already among them; the first ``eval.max_prompts``."""
    cfg, ev = run.recipe.prompts, run.recipe.eval
    _, held = split_prompts(run, load_prompts(cfg.source, field=cfg.field, split=cfg.split, limit=cfg.limit))
    rows = eval_file_prompts(run)
    rows += [r for r in held if r["prompt_id"] not in {x["prompt_id"] for x in rows}]
    return rows[: ev.max_prompts]


def prompt_inputs(run) -> dict:
    """Identity of the prompt files: the seed prompts' source and, if set, ``eval.prompts``."""
    cfg, ev = run.recipe.prompts, run.recipe.eval
    source = Path(cfg.source)
    inputs = {"source": sha256_file(source) if source.is_file() else cfg.source}
    if ev.prompts:
        inputs["eval_prompts"] = sha256_file(Path(ev.prompts))
    return inputs


def judge_settings(j) -> JudgeSettings:
    """The recipe's judge section as the judge's settings."""
    return JudgeSettings(n=j.n, mode=j.mode, score=j.score, temperature=j.temperature, top_p=j.top_p,
                         max_tokens=j.max_tokens, min_digit_mass=j.min_digit_mass)


# ----------------------------------------------------------------------------------- stages
def compute_prompts(run, t: int, ctx) -> Table:
    """Seed prompts (less the held-out ones when ``eval`` is on) plus optional self-instruct."""
    cfg, ev = run.recipe.prompts, run.recipe.eval
    rows = load_prompts(cfg.source, field=cfg.field, split=cfg.split, limit=cfg.limit)
    info = {"seed_prompts": len(rows)}
    kept_out: set[str] = set()
    if ev.enabled:
        train, _ = split_prompts(run, rows)
        kept_out = {r["prompt_id"] for r in rows} - {r["prompt_id"] for r in train}
        rows = train
        info["heldout"] = len(kept_out)
        run.log(f"iter {t} prompts: {len(kept_out)} of {info['seed_prompts']} seed prompts kept out of "
                f"training for the eval stage")
    if cfg.self_instruct.enabled:
        si = cfg.self_instruct
        new, stats = self_instruct(
            run.generator(), rows, n_new=si.n_new, few_shot=si.few_shot, max_attempts=si.max_attempts,
            min_chars=si.min_chars, max_chars=si.max_chars,
            sampling=Sampling(n=1, temperature=si.temperature, top_p=0.95, max_tokens=si.max_tokens),
            adapter=run.model(t).adapter, seed=derive_seed(run.recipe.seed, t, "self_instruct"),
        )
        run.log(f"iter {t} prompts: self-instruct kept {stats['kept']} of {stats['requested']} "
                f"(duplicates {stats['duplicate']}, too short {stats['too_short']}, too long {stats['too_long']})")
        # A new prompt that is an eval prompt would leak it into training.
        eval_ids = kept_out | {r["prompt_id"] for r in eval_file_prompts(run)}
        kept = [r for r in new if r["prompt_id"] not in eval_ids]
        rows += kept
        info["self_instruct"] = stats | ({"eval_prompts_dropped": len(new) - len(kept)} if ev.enabled else {})
    return Table(rows, info)


def compute_generate(run, t: int, ctx) -> Table:
    """K responses per prompt from M_t, in shards of prompts."""
    g = run.recipe.generation
    sampling = Sampling(n=g.n, temperature=g.temperature, top_p=g.top_p, max_tokens=g.max_tokens)
    prompts = run.store.read_rows(t, "prompts")
    adapter = run.model(t).adapter
    rows = ctx.shards(prompts, lambda chunk, i: generate_responses(
        run.generator(), chunk, sampling, adapter=adapter, seed=derive_seed(run.recipe.seed, t, "gen")))
    return Table(rows, {"responses": len(rows), "prompts": len(prompts)})


def compute_judge(run, t: int, ctx) -> Table:
    """J judgments of every response, sharded by prompt (all K responses of a prompt in one shard):
    by M_t itself, or by the fixed separate judge (``judge.model`` / ``judge.engine``)."""
    settings = judge_settings(run.recipe.judge)
    by_prompt = list(_group(run.store.read_rows(t, "generate")).values())
    separate = separate_judge(run.recipe)
    adapter = run.judge_model().adapter if separate else run.model(t).adapter
    engine = run.judge_generator if separate else run.generator
    rows = ctx.shards(by_prompt, lambda chunk, i: judge_responses(
        engine(), [r for group in chunk for r in group], settings, adapter=adapter,
        seed=derive_seed(run.recipe.seed, t, "judge")))
    stats = judge_stats(rows) | {"judge_model": run.recipe.judge.model or run.recipe.model if separate else f"M_{t}"}
    run.log(f"iter {t} judge: {stats['scored']}/{stats['judgments']} judgments scored "
            f"({100 * stats['scored_share']:.0f}%), modes {stats['modes']}")
    return Table(rows, stats)


def separate_judge(recipe) -> bool:
    """Whether a model other than the policy judges (``judge.model`` / ``judge.engine``; Self-Rewarding only)."""
    return getattr(recipe.judge, "model", None) is not None or getattr(recipe.judge, "engine", None) is not None


def judge_inputs(run, t: int) -> dict:
    """Who judges: M_t (the policy judges itself, its identity as every M_t-reading stage's), or the
    separate judge's identity."""
    return {"judge_model": run.judge_identity()} if separate_judge(run.recipe) else {"model": run.model_hash(t)}


def compute_pairs(run, t: int, ctx) -> Table:
    judged = run.store.read_rows(t, "judge")
    rows, stats = build_pairs(judged, rho=run.recipe.pairs.rho)
    stats["tie_rate"] = tie_rate(judged)
    return Table(rows, stats)


def report_pairs(run, t: int, stats: dict) -> None:
    run.log(f"iter {t} pairs: {stats['pairs']} pairs from {stats['prompts']} prompts "
            f"({stats['ties']} ties, {stats['unscored']} unscored, {stats['failed_judgments']} failed judgments)")


def reviewed_pairs(run, t: int) -> tuple[list[dict], list[str]]:
    """This iteration's pairs with the review corrections stored so far applied
    (``corrections.jsonl``, written by ``selfalign review``), and the applied ids, which
    the train manifest records so each adapter says what it was trained with."""
    if not corrections.load_corrections(run.store, t):
        return run.store.read_rows(t, "pairs"), []
    pairs, applied = corrections.reviewed_pairs(run.store, t)
    if applied:
        run.log(f"iter {t} train: {len(applied)} review corrections applied")
    return pairs, applied


def train_rows(run, t: int) -> tuple[list[dict], list[str]]:
    """The DPO rows of iteration t (reviewed actor pairs; ``kind`` lets the trainer say which rows
    ``max_length`` cut) and the review corrections applied."""
    pairs, applied = reviewed_pairs(run, t)
    return [{k: p[k] for k in ("prompt", "chosen", "rejected")} | {"kind": "pair"} for p in pairs], applied


def compute_train(run, t: int, ctx):
    """DPO on this iteration's pairs (with review corrections applied) → adapter of M_{t+1}."""
    rows, applied = train_rows(run, t)
    return dpo_output(run, t, ctx, rows, beta=run.recipe.train.beta, info={"corrections": applied})
def eval_judge_adapter(run) -> str | None:
    """The fixed judge's adapter: none (the base model), M_1's (``eval.judge.model: initial``) or
    the separate judge's (``judge``: ``judge.model``'s own adapter, if it is one)."""
    who = run.recipe.eval.judge.model
    return run.base.adapter if who == "initial" else run.judge_model().adapter if who == "judge" else None


def eval_judge(run):
    """The engine the fixed judge runs on: the separate judge's (``eval.judge.model: judge``), else
    the run's own engine (base or M_1 served through it)."""
    return run.judge_generator() if run.recipe.eval.judge.model == "judge" else run.generator()


def eval_judge_identity(run) -> str:
    """Who the fixed judge is, for the eval stage's inputs: M_1's identity, the separate judge's, or
    the base model's."""
    who = run.recipe.eval.judge.model
    if who == "judge":
        return run.judge_identity()
    return run.model_hash(1) if who == "initial" else hash_obj({"model": run.recipe.model, "judge": "base"})


def eval_inputs(run, t: int) -> dict:
    """The eval stage's inputs: the prompt files, M_t (before), M_{t+1} (after), the fixed judge, the references."""
    ev = run.recipe.eval
    judge_model = eval_judge_identity(run)
    inputs = prompt_inputs(run) | {"before": run.model_hash(t), "after": run.model_hash(t + 1), "judge_model": judge_model}
    if ev.reference:
        inputs["reference"] = sha256_file(Path(ev.reference))
    return inputs


def compute_eval(run, t: int, ctx) -> Table:
    """M_{t+1} ("after", the candidate) against M_t ("before") on the eval prompts.

    Both answer every eval prompt (the same per-prompt seed, so sampling noise is shared);
    the fixed judge compares each pair in both orders (``alignment.head_to_head``) and, with
    ``eval.judge.pointwise``, scores each answer with the recipe's judge settings; with
    ``eval.reference``, M_{t+1}'s answers are also compared with the reference answers.
    One row per prompt; the summary (win / tie / loss, win rate with its seeded bootstrap 95%
    interval, LC win rate, mean length and score of each side) is the manifest's info and
    ``metrics.json``'s ``eval``."""
    ev, seed = run.recipe.eval, run.recipe.seed
    prompts = eval_prompts(run)
    before, after = run.model(t), run.model(t + 1)
    gen = run.generator()
    sampling = Sampling(n=1, temperature=ev.temperature, top_p=ev.top_p, max_tokens=ev.max_tokens)
    # Every answer first, then every judgment: an engine serving merged adapters restarts
    # only when the model changes (M_t — still loaded from this iteration's judging —,
    # M_{t+1}, then the judge). Per-request seeds make the order irrelevant to the result.
    answer_seed = derive_seed(seed, "eval-answers")
    answers = {side: generate_responses(gen, prompts, sampling, adapter=model.adapter, seed=answer_seed)
               for side, model in (("before", before), ("after", after))}
    adapter, judge = eval_judge_adapter(run), eval_judge(run)
    j = ev.judge
    settings = PairwiseSettings(mode=j.mode, temperature=j.temperature, top_p=j.top_p,
                                max_tokens=j.max_tokens, min_verdict_mass=j.min_verdict_mass)
    items = [{"prompt_id": b["prompt_id"], "prompt": b["prompt"], "candidate": a["response"],
              "baseline": b["response"]} for b, a in zip(answers["before"], answers["after"])]
    verdicts = compare(judge, items, settings, adapter=adapter, seed=derive_seed(seed, "eval-judge"))
    reference = load_reference(ev.reference) if ev.reference else {}
    ref_items = [i | {"baseline": reference[i["prompt_id"]]} for i in items if i["prompt_id"] in reference]
    ref_verdicts = dict(zip((i["prompt_id"] for i in ref_items), compare(
        judge, ref_items, settings, adapter=adapter, seed=derive_seed(seed, "eval-judge-reference"))))
    ref_lengths = dict(zip((i["prompt_id"] for i in ref_items), run.token_lengths([i["baseline"] for i in ref_items])))
    scores: dict[str, list] = {side: [None] * len(prompts) for side in answers}
    if j.pointwise:
        js = judge_settings(run.recipe.judge)
        for side in answers:
            scores[side] = [r["mean_score"] for r in judge_responses(
                judge, answers[side], js, adapter=adapter, seed=derive_seed(seed, "eval-score", side))]
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
    return Table(rows, eval_summary(rows, seed=seed, resamples=ev.bootstrap_resamples) | {
        "model_before": before.label, "model_after": after.label,
        "judge": eval_judge_label(run)})


def eval_judge_label(run) -> str:
    """The fixed judge in words, for the summary: ``<base> (base)``, ``<base> (M_1)`` or
    ``<judge.model> (separate judge, <backend>)``."""
    who = run.recipe.eval.judge.model
    if who == "judge":
        return f"{run.recipe.judge.model} (separate judge, {(run.recipe.judge.engine or run.recipe.engine).backend})"
    return f"{run.base.base} ({'M_1' if who == 'initial' else 'base'})"


def report_eval(run, t: int, info: dict) -> None:
    run.log(f"iter {t} eval on {info['prompts']} prompts, M_{t + 1} vs M_{t}: {eval_line(info)}")


def eval_off(recipe) -> str | None:
    return None if recipe.eval.enabled else "eval.heldout_fraction 0 and no eval.prompts"


# ---------------------------------------------------------------------------------- reporting
def metrics(run, t: int) -> dict:
    """Per-iteration metrics, written to ``iter_<t>/metrics.json``."""
    out = iteration_metrics(run, t)
    run.store.write_json(t, "metrics.json", out)
    return out


def iteration_metrics(run, t: int) -> dict:
    """Judge, pairs and training info of iteration t, its training curve, and its eval (when on)."""
    store = run.store
    train = store.manifest(t, "train")
    out = {"iteration": t, "model": run.model(t).label, "judge": store.manifest(t, "judge")["info"],
           "pairs": store.manifest(t, "pairs")["info"], "train": train["info"] if train else None}
    adapter = run.adapter(t) if train else None
    if adapter and Path(adapter, "train_metrics.json").is_file():
        import json

        out["train_metrics"] = json.loads(Path(adapter, "train_metrics.json").read_text())
    evaluated = store.manifest(t, "eval") if run.recipe.eval.enabled else None
    if evaluated:  # no key at all with eval off: such runs write the metrics they always did
        out["eval"] = evaluated["info"]
    return out


def held_out(run, t: int) -> dict:
    """What the prompts stage holds out for the eval stage (nothing with eval off)."""
    ev = run.recipe.eval
    return {"heldout": {k: v for k, v in ev.model_dump(mode="json").items()
                        if k in ("heldout_fraction", "prompts", "field")}} if ev.enabled else {}


def prompts_stage_inputs(run, t: int) -> dict:
    """The prompt files, and M_t when it writes new prompts (self-instruct)."""
    return prompt_inputs(run) | ({"model": run.model_hash(t)} if run.recipe.prompts.self_instruct.enabled else {})


def pointwise_judge(run, t: int) -> dict:
    """The judge section, when the eval stage also scores answers with it (``eval.judge.pointwise``)."""
    return {"judge": result_dump(run.recipe)["judge"]} if run.recipe.eval.judge.pointwise else {}


PROMPTS = Stage("prompts", compute_prompts, fields=("prompts", "model"), inputs=prompts_stage_inputs, settings=held_out)
GENERATE = Stage("generate", compute_generate, reads=("prompts",), model=True, fields=("generation",), sharded=True)
JUDGE = Stage("judge", compute_judge, reads=("generate",), inputs=judge_inputs, fields=("judge",), sharded=True)
PAIRS = Stage("pairs", compute_pairs, reads=("judge",), fields=("pairs",), report=report_pairs)
TRAIN = Stage("train", compute_train, reads=("pairs",), model=True, fields=("train",), gated=True,
              releases_engine=lambda recipe: recipe.train.release_engine)
EVAL = Stage("eval", compute_eval, fields=("eval", "prompts"), inputs=eval_inputs, settings=pointwise_judge,
             off=eval_off, report=report_eval)

SELF_REWARDING = Algorithm(
    "self-rewarding", (PROMPTS, GENERATE, JUDGE, PAIRS, TRAIN, EVAL), metrics=metrics,
    # M_2.. are adapters; so is M_{t+1}, which the eval stage serves in iteration t.
    needs_lora=lambda run: run.recipe.iterations > 1 or run.recipe.eval.enabled,
    lora_rank=lambda recipe: recipe.train.lora.r,
)


def _group(rows: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = collections.OrderedDict()
    for r in rows:
        groups.setdefault(r["prompt_id"], []).append(r)
    return groups


def eval_summary(rows: list[dict], *, seed: int = 0, resamples: int = 2000) -> dict:
    """The eval table's summary: :func:`alignment.head_to_head.summarize` of M_{t+1} (after)
    against M_t (before), the mean pointwise score of each side (None where unscored) and the
    paired gain with its interval (:func:`alignment.head_to_head.score_gain_summary`), the
    identical pairs (ties without a judgment), and the same head-to-head against the reference
    answers over the prompts that have one (``reference``: None without)."""
    h = summarize([r["outcome"] for r in rows], [r["length_after"] for r in rows], [r["length_before"] for r in rows],
                  seed=seed, resamples=resamples)
    out = {k: v for k, v in h.items() if not k.startswith("mean_length")} | {
        "mean_length_before": h["mean_length_baseline"], "mean_length_after": h["mean_length_candidate"],
        "mean_score_before": mean_or_none([r["score_before"] for r in rows]),
        "mean_score_after": mean_or_none([r["score_after"] for r in rows]),
        "identical": sum(1 for r in rows if r["identical"]), "reference": None} | score_gain_summary(
        [r["score_before"] for r in rows], [r["score_after"] for r in rows], seed=seed, resamples=resamples)
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
