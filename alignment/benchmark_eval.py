"""Scoring a fixed prompts file with every model of a run, after the fact.

``selfalign eval RUN --prompts FILE``: each chosen model of the run's chain — M_1 (the initial
model) and M_{t+1} for each iteration t whose ``train`` stage is done — answers every prompt of
FILE greedily, and the project's pointwise judge (prompts/judge.jinja, the recipe's judge
settings) scores each answer, run by a **fixed** judge: the model the eval stage judges with
(the base model without any adapter by default), so every model is scored by the same judge.
The answers come from :func:`alignment.actor.generate_responses`, the scores from
:func:`alignment.judge.judge_responses`; this module only chooses, stores and summarises.

Selection: iteration 0 is the initial model M_1, iteration t ≥ 1 the model iteration t trained
(M_{t+1}, as ``selfalign export --iteration t``).

Results: ``RUN/evals/<file stem>-<key>/`` with ``key`` = the first 12 hex digits of sha256 of
the prompts file's content and every setting that changes a score (:func:`result_key`); in it
one table per model (the judge table's rows, named by the model's identity, so an iteration that
is retrained later is scored anew) and ``summary.json``. Every file is written atomically
(``alignment.files``), so a model's table is there complete or not at all; a later call with the
same file and settings reads the tables it finds instead of recomputing them. Nothing of the
run's own stages, manifests or metrics is touched, and the run's lock is held throughout.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

from alignment.actor import generate_responses
from alignment.algorithms import ALGORITHMS
from alignment.data import DataError, load_prompts, read_records
from alignment.eval_config import EvalConfig
from alignment.evaluation import bootstrap_ci
from alignment.export import trained_iterations
from alignment.files import atomic_write_text, hash_obj, json_text, read_parquet, sha256_file, write_parquet
from alignment.generation import Sampling, derive_seed
from alignment.head_to_head import mean_or_none
from alignment.iterative import Run
from alignment.judge import JudgeSettings, judge_responses
from alignment.runs import load_for_run
from alignment.self_rewarding import eval_judge, eval_judge_adapter, eval_judge_identity, judge_settings
from alignment.store import RunStore

EVALS_DIR = "evals"
SUMMARY_FILE = "summary.json"
SUPPORTED = ("self-rewarding", "meta-rewarding", "spin")


class EvalError(ValueError):
    """What cannot be evaluated, said in one line (the CLI exits 2)."""


# ------------------------------------------------------------------------------ pure functions
def model_label(iteration: int) -> str:
    """The model iteration ``iteration`` trained: M_{iteration+1} (iteration 0: M_1, the initial model)."""
    return f"M_{iteration + 1}"


def parse_iterations(text: str, trained: list[int], root: str | Path = "") -> list[int]:
    """The iterations to score from ``--iterations``: ``all`` = [0] + trained, else a comma list
    of numbers, each 0 (the initial model) or a trained iteration; sorted, duplicates dropped.
    EvalError naming the first bad entry otherwise."""
    if text.strip().lower() == "all":
        return [0, *trained]
    chosen: set[int] = set()
    for part in text.split(","):
        try:
            t = int(part.strip())
        except ValueError:
            raise EvalError(f"--iterations {text!r}: expected 'all' or iteration numbers such as 0,1,3 "
                            f"(0 = the initial model M_1, t = the model iteration t trained)") from None
        if t != 0 and t not in trained:
            raise EvalError(f"{root}: iteration {t} has not trained a model ("
                            + (f"trained: {', '.join(map(str, trained))}" if trained else "nothing trained yet")
                            + "; 0 = the initial model)")
        chosen.add(t)
    return sorted(chosen)


def score_summary(rows: list[dict], *, seed: int = 0, resamples: int = 2000) -> dict:
    """One model's scores over the n prompts (rows of the judge table, ``mean_score`` s_i = the
    mean of the prompt's scored judgments, None when none scored; ``length`` ℓ_i in tokens):

        scored        = #{i : s_i ≠ None},   scored_share = scored / n
        mean_score    = (1/scored) · Σ_{s_i ≠ None} s_i                (None when nothing scored)
        mean_score_ci = percentile bootstrap 95% interval of that mean (evaluation.bootstrap_ci,
                        seeded: the same scores give the same interval; None under 2 scores)
        mean_length   = (1/n) · Σ_i ℓ_i"""
    scores = [float(r["mean_score"]) for r in rows if r["mean_score"] is not None]
    return {
        "prompts": len(rows), "scored": len(scores), "scored_share": len(scores) / len(rows) if rows else 0.0,
        "mean_score": mean_or_none(scores), "mean_score_ci": bootstrap_ci(scores, resamples=resamples, seed=seed),
        "mean_length": mean_or_none([r["length"] for r in rows]),
    }


def result_key(settings: dict) -> str:
    """The first 12 hex digits of sha256 of the canonical JSON of ``settings`` (the prompts file's
    sha256 and every setting that changes a score)."""
    return hash_obj(settings)[:12]


def result_name(prompts_file: str | Path, key: str) -> str:
    """``<file stem>-<key>``, the stem reduced to letters, digits, '.', '_' and '-'."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(prompts_file).stem).strip("._") or "prompts"
    return f"{stem}-{key}"


def table_name(identity: str) -> str:
    """The file of one model's rows: named by the model's identity (recipe model + adapter weights)."""
    return f"model-{identity[:16]}.parquet"


def fmt(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def table_lines(models: list[dict]) -> list[str]:
    """The summary's models as an aligned text table: model, what trained it, prompts, scored
    share, mean score with its 95% interval, mean answer length (tokens)."""
    head = ("model", "trained in", "prompts", "scored", "mean score [95% CI]", "mean length")
    body = []
    for m in models:
        ci = m["mean_score_ci"]
        score = fmt(m["mean_score"]) + (f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else "")
        body.append((m["model"], f"iteration {m['iteration']}" if m["iteration"] else "– (initial)",
                     str(m["prompts"]), f"{100 * m['scored_share']:.0f}%", score, fmt(m["mean_length"], 1)))
    widths = [max(len(row[k]) for row in (head, *body)) for k in range(len(head))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in (head, *body)]


# ------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class FixedJudge:
    """Who scores every answer, and how: the eval stage's fixed judge and the recipe's judge settings."""

    settings: JudgeSettings
    adapter: str | None  # None: the base model without any adapter
    which: str  # "base" | "initial" | "judge" (the recipe's separate judge)
    resamples: int  # of the mean score's bootstrap interval


def fixed_judge(run: Run) -> FixedJudge:
    """Self-Rewarding / Meta-Rewarding: the recipe's ``judge`` settings run by ``eval.judge.model``
    (the base model by default), as the eval stage's pointwise scores; SPIN: its ``eval.judge``
    settings run by the base model, as SPIN's eval stage."""
    recipe = run.recipe
    if recipe.algorithm == "spin":
        return FixedJudge(judge_settings(recipe.eval.judge), None, "base", EvalConfig().bootstrap_resamples)
    return FixedJudge(judge_settings(recipe.judge), eval_judge_adapter(run), recipe.eval.judge.model,
                      recipe.eval.bootstrap_resamples)


def judge_engine(run: Run):
    """The engine the fixed judge runs on: the separate judge's for ``eval.judge.model: judge``, else
    the run's own (SPIN: always the run's own, judging as the base model)."""
    return run.generator() if run.recipe.algorithm == "spin" else eval_judge(run)


def judge_identity(run: Run) -> str:
    """The fixed judge's identity (part of the results' key): as the eval stage's judge input."""
    return (hash_obj({"model": run.recipe.model, "judge": "base"}) if run.recipe.algorithm == "spin"
            else eval_judge_identity(run))


@dataclass(frozen=True)
class EvalPlan:
    """What one ``selfalign eval`` computes, validated; nothing written yet."""

    store: RunStore
    recipe: object
    prompts_file: Path
    prompts: list[dict]
    iterations: list[int]
    field: str
    max_tokens: int
    max_prompts: int | None

    @property
    def settings(self) -> dict:
        """Everything that changes a score, but the models (each table is named by its model)."""
        return {"prompts_sha256": sha256_file(self.prompts_file), "field": self.field, "max_prompts": self.max_prompts,
                "answers": {"temperature": 0.0, "top_p": 1.0, "max_tokens": self.max_tokens},
                "seed": self.recipe.seed, "model": self.recipe.model}


def read_prompts_file(source: str | Path, field: str, max_prompts: int | None = None) -> list[dict]:
    """The prompts of a local JSONL / JSON / CSV / parquet file (ids as the prompts stage's, duplicates
    dropped), the first ``max_prompts``. DataError naming the file (and line) when it is missing,
    has no prompt, or a row lacks ``field``."""
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"{source}: " + ("is a directory, expected a prompts file" if path.is_dir() else "file not found"))
    for index, record in enumerate(read_records(str(path)), start=1):
        if field not in record:
            keys = ", ".join(repr(k) for k in record if k != "__line__") or "none"
            raise DataError(f"{source}:{record.get('__line__', index)}: missing field {field!r} "
                            f"(pass --field with the key that holds the prompt; this row has {keys})")
    return load_prompts(str(path), field=field, limit=max_prompts)


def plan_eval(run_dir: str | Path, prompts_file: str | Path, *, field: str = "prompt", iterations: str = "all",
              max_tokens: int | None = None, max_prompts: int | None = None) -> EvalPlan:
    """Validate everything a user can get wrong, writing nothing: the run directory (StoreError),
    its algorithm (EvalError for PERL), its stored recipe (RecipeError), the prompts file
    (DataError) and the iterations (EvalError)."""
    for name, value in (("--max-tokens", max_tokens), ("--max-prompts", max_prompts)):
        if value is not None and value < 1:
            raise EvalError(f"{name} {value}: must be at least 1")
    store = RunStore.open(run_dir)
    algorithm = store.run_info().get("algorithm")
    if algorithm not in SUPPORTED:
        raise EvalError(f"{store.root}: eval scores the models of {', '.join(SUPPORTED)} runs, not of "
                        f"{algorithm or 'an unknown algorithm'} runs")
    recipe, _, _ = load_for_run(store.root, None, [])
    prompts = read_prompts_file(prompts_file, field, max_prompts)
    chosen = parse_iterations(iterations, trained_iterations(store), store.root)
    return EvalPlan(store, recipe, Path(prompts_file), prompts, chosen, field,
                    max_tokens or recipe.eval.max_tokens, max_prompts)


# ------------------------------------------------------------------------------ running it
def open_run(plan: EvalPlan, log: Callable[[str], None]) -> Run:
    """A run of the plan's recipe whose engine serves adapters (M_2, ... are adapters), whatever the
    recipe's own stages needed."""
    algorithm = replace(ALGORITHMS[plan.recipe.algorithm], needs_lora=lambda run: True)
    return Run(plan.store, plan.recipe, algorithm, log=log)


def out_dir(plan: EvalPlan, judge: FixedJudge, identity: str) -> Path:
    settings = plan.settings | {"judge": asdict(judge.settings), "judge_model": identity,
                                "resamples": judge.resamples}
    return plan.store.root / EVALS_DIR / result_name(plan.prompts_file, result_key(settings))


@dataclass(frozen=True)
class EvalResult:
    directory: Path
    summary: dict
    computed: list[str]  # labels of the models scored now
    reused: list[str]  # labels of the models read from an earlier call


def run_eval(plan: EvalPlan, *, log: Callable[[str], None] = print,
             progress: Callable[..., object] | None = None) -> EvalResult:
    """Score the plan's models under the run's lock (RunLocked while a run is active): read each
    model's table when an earlier call wrote it, else answer and score (every answer first, then
    every score: an engine serving merged adapters restarts only when the model changes), writing
    each table atomically; then ``summary.json`` (rewritten only when it changes)."""
    with plan.store.lock():
        run = open_run(plan, log)
        try:
            return score_models(plan, run, log, progress)
        finally:
            run.close()


def score_models(plan: EvalPlan, run: Run, log: Callable[[str], None], progress) -> EvalResult:
    judge = fixed_judge(run)
    directory = out_dir(plan, judge, judge_identity(run))
    models = [(t, model_label(t), run.model(t + 1), run.model_hash(t + 1)) for t in plan.iterations]
    todo = {identity: (label, model) for t, label, model, identity in models
            if not (directory / table_name(identity)).is_file()}
    if todo:
        compute(plan, run, judge, directory, todo, log, progress)
    rows = {identity: read_parquet(directory / table_name(identity)) for *_, identity in models}
    summary = {
        "prompts_file": str(plan.prompts_file), "settings": plan.settings,
        "judge": {"model": judge.which, "settings": asdict(judge.settings)},
        "models": [{"model": label, "iteration": t, "identity": identity, "table": table_name(identity)}
                   | score_summary(rows[identity], seed=plan.recipe.seed, resamples=judge.resamples)
                   for t, label, _, identity in models],
    }
    text, path = json_text(summary), directory / SUMMARY_FILE
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        atomic_write_text(path, text)
    computed = [label for _, label, _, identity in models if identity in todo]
    return EvalResult(directory, summary, computed, [label for _, label, *_ in models if label not in computed])


def compute(plan: EvalPlan, run: Run, judge: FixedJudge, directory: Path, todo: dict, log, progress) -> None:
    """Answer the prompts with each model of ``todo`` ({identity: (label, model)}), then score every
    answer with the fixed judge and write each model's table."""
    seed = plan.recipe.seed
    bar = progress(f"eval {', '.join(label for label, _ in todo.values())}", unit="step") if progress else None
    total, done = 2 * len(todo), 0
    started = time.monotonic()
    if bar:
        bar.update(0, total)
    sampling = Sampling(n=1, temperature=0.0, top_p=1.0, max_tokens=plan.max_tokens)
    answers = {}
    for identity, (label, model) in todo.items():
        log(f"eval: {label} answers {len(plan.prompts)} prompts")
        # The eval stage's answer seed (the answers are greedy: the seed matters only to a sampling engine).
        answers[identity] = generate_responses(run.generator(), plan.prompts, sampling, adapter=model.adapter,
                                               seed=derive_seed(seed, "eval-answers"))
        done += 1
        if bar:
            bar.update(done, total)
    for identity, (label, _) in todo.items():
        log(f"eval: the {judge.which} judge scores {label}'s answers")
        # One judge seed for every model: the same answer to the same prompt gets the same score.
        rows = judge_responses(judge_engine(run), answers[identity], judge.settings, adapter=judge.adapter,
                               seed=derive_seed(seed, "eval-score"))
        write_parquet(directory / table_name(identity), rows)
        done += 1
        if bar:
            bar.update(done, total)
    log(f"eval: scored {len(todo)} model(s) in {time.monotonic() - started:.0f} s")


__all__ = ["EVALS_DIR", "EvalError", "EvalPlan", "EvalResult", "FixedJudge", "SUMMARY_FILE", "fixed_judge",
           "judge_engine", "judge_identity", "model_label", "parse_iterations", "plan_eval", "read_prompts_file", "result_key", "result_name",
           "run_eval", "score_summary", "table_lines", "table_name"]
