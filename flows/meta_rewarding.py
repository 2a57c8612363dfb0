"""Prefect flow ``meta-rewarding``: iterations → stages, each stage a task over the run directory.

Tasks are three-line wrappers of ``MetaRewardingRun`` methods; they pass paths and hashes, not
datasets. Caching is off (``NO_CACHE``): the run directory's manifests are the record of what is
done, so a resume works with a fresh Prefect database too. Artifacts per iteration: the
Self-Rewarding summary / review link / judge table (``flows.common.publish_iteration``), plus the
battle table, the Elo table, the judge pairs, and a length-stats table over all iterations so far.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from alignment.meta_rewarding import MetaRewardingRun
from alignment.report import last_eval_line
from flows.common import artifact_key, open_run, progress_factory, publish_iteration
from flows.review_gate import before_training

TASK = dict(cache_policy=NO_CACHE, retries=0)
ARTIFACT_ROWS = 200


@task(name="prompts", **TASK)
def prompts_task(run: MetaRewardingRun, t: int) -> str:
    return run.prompts(t)


@task(name="generate", **TASK)
def generate_task(run: MetaRewardingRun, t: int) -> str:
    return run.generate(t)


@task(name="judge", **TASK)
def judge_task(run: MetaRewardingRun, t: int) -> str:
    return run.judge(t)


@task(name="pairs", **TASK)
def pairs_task(run: MetaRewardingRun, t: int) -> dict:
    return run.pairs(t)


@task(name="meta_judge", **TASK)
def meta_judge_task(run: MetaRewardingRun, t: int) -> str:
    return run.meta_judge(t)


@task(name="elo", **TASK)
def elo_task(run: MetaRewardingRun, t: int) -> str:
    return run.elo(t)


@task(name="judge_pairs", **TASK)
def judge_pairs_task(run: MetaRewardingRun, t: int) -> dict:
    return run.judge_pairs(t)


@task(name="train", **TASK)
def train_task(run: MetaRewardingRun, t: int) -> str | None:
    return run.train(t)


@task(name="eval", **TASK)
def eval_task(run: MetaRewardingRun, t: int) -> dict | None:
    return run.eval(t)


# ------------------------------------------------------------------------------ artifacts
def _cut(s: str | None, n: int = 300) -> str:
    s = s or ""
    return s if len(s) <= n else s[:n] + "…"


def _num(x, digits: int = 2):
    return None if x is None else round(float(x), digits)


def battle_table(battles: list[dict]) -> list[dict]:
    return [{"prompt_id": b["prompt_id"], "response": b["response_index"], "A": b["a"], "B": b["b"],
             "score A": _num(b["a_score"]), "score B": _num(b["b_score"]), "verdict": b["verdict"] or "(failed)",
             "mode": b["mode"], "p(A)": _num(b["p_a"], 3), "p(B)": _num(b["p_b"], 3), "meta-judge": _cut(b["text"])}
            for b in battles[:ARTIFACT_ROWS]]


def elo_table(elo_rows: list[dict], judge_pairs: list[dict]) -> list[dict]:
    role = {(p["prompt_id"], p["chosen_index"]): "chosen" for p in judge_pairs}
    role |= {(p["prompt_id"], p["rejected_index"]): "rejected" for p in judge_pairs}
    rows = sorted(elo_rows, key=lambda r: (r["prompt_id"], -(r["rating"] if r["rating"] is not None else -1e9)))
    return [{"prompt_id": r["prompt_id"], "judgment": r["judgment_index"], "score": _num(r["score"]),
             "rating": _num(r["rating"], 1), "wins": _num(r["wins"]), "losses": _num(r["losses"]),
             "battles": r["battles"], "length": r["length"], "eligible": r["eligible"],
             "role": role.get((r["prompt_id"], r["judgment_index"]), "")}
            for r in rows[:ARTIFACT_ROWS]]


def judge_pairs_table(pairs: list[dict]) -> list[dict]:
    return [{"prompt_id": p["prompt_id"], "chosen": _cut(p["chosen"]), "rejected": _cut(p["rejected"]),
             "chosen rating": _num(p["chosen_rating"], 1), "rejected rating": _num(p["rejected_rating"], 1),
             "chosen score": _num(p["chosen_score"]), "rejected score": _num(p["rejected_score"]),
             "chosen length": p["chosen_length"], "rejected length": p["rejected_length"]}
            for p in pairs[:ARTIFACT_ROWS]]


def length_markdown(per_iteration: list[dict]) -> str:
    """Length stats per iteration: is the actor's chosen response drifting longer?"""
    lines = ["# Length per iteration (tokens)", "",
             ("| iteration | ρ | actor pairs | chosen | rejected | chosen − rejected | all responses "
              "| judge pairs | judge chosen | judge rejected |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in per_iteration:
        cells = [s["iteration"], s["rho"], s["actor_pairs"], _num(s["chosen_mean_length"], 1),
                 _num(s["rejected_mean_length"], 1), _num(s["length_gap"], 1), _num(s["response_mean_length"], 1),
                 s["judge_pairs"], _num(s["judge_chosen_mean_length"], 1), _num(s["judge_rejected_mean_length"], 1)]
        lines.append("| " + " | ".join("–" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines)


def publish_meta(run: MetaRewardingRun, t: int, per_iteration: list[dict]) -> None:
    store = run.store
    name = store.run_info().get("name", store.root.name)
    if run.recipe.trains_judge(t):
        judge_pairs = store.read_rows(t, "judge_pairs")
        create_table_artifact(key=artifact_key(name, "iter", t, "battles"),
                              table=battle_table(store.read_rows(t, "meta_judge")) or [{"prompt_id": "(no battles)"}],
                              description=f"iteration {t} meta-judge battles (first {ARTIFACT_ROWS})")
        create_table_artifact(key=artifact_key(name, "iter", t, "elo"),
                              table=elo_table(store.read_rows(t, "elo"), judge_pairs) or [{"prompt_id": "(no ratings)"}],
                              description=f"iteration {t} Elo ratings of judgments per prompt (first {ARTIFACT_ROWS})")
        create_table_artifact(key=artifact_key(name, "iter", t, "judge-pairs"),
                              table=judge_pairs_table(judge_pairs) or [{"prompt_id": "(no judge pairs)"}],
                              description=f"iteration {t} judge pairs (first {ARTIFACT_ROWS})")
    create_markdown_artifact(key=artifact_key(name, "length"), markdown=length_markdown(per_iteration),
                             description="actor and judge pair lengths per iteration")


@flow(name="meta-rewarding", log_prints=True)
def meta_rewarding_flow(run_dir: str, recipe_path: str | None = None, overrides: list[str] | None = None) -> dict:
    """Meta-Rewarding (Wu et al., 2024): for t = 1..T, M_t acts, judges and meta-judges its own
    judgments; actor pairs and (in judge-training iterations) judge pairs train M_{t+1} together.

    ``recipe_path=None`` resumes the run with the recipe stored in ``run_dir``.
    """
    logger = get_run_logger()
    store, recipe = open_run(run_dir, recipe_path, overrides or [])
    per_iteration: list[dict] = []
    evaluated: list[dict] = []  # every iteration's metrics, for the last eval line
    with store.lock():
        run = MetaRewardingRun(store, recipe, log=logger.info, progress=progress_factory(store))
        try:
            for t in range(1, recipe.iterations + 1):
                prompts_task(run, t)
                generate_task(run, t)      # K responses from M_t
                judge_task(run, t)         # N judgments per response
                pairs_task(run, t)         # actor pairs, length control ρ_t
                meta_judge_task(run, t)    # battles between judgments (judge-training iterations only)
                elo_task(run, t)           # Bradley–Terry ratings of judgments
                judge_pairs_task(run, t)   # best vs worst judgment
                before_training(run, store, recipe, t, logger)  # release the engine (if asked), then the review gate
                train_task(run, t)         # one DPO step on actor + judge pairs → M_{t+1}
                eval_task(run, t)          # M_{t+1} vs M_t on held-out prompts (one log line when eval is off)
                metrics = run.metrics(t)
                evaluated.append(metrics)
                per_iteration.append(metrics["length"])
                publish_iteration(store, t, metrics, review_base=recipe.review.url)
                publish_meta(run, t, per_iteration)
        finally:
            run.close()
    store.log_event("flow_done")
    result = {"run_dir": str(store.root), "adapter": run.adapter(recipe.iterations)}
    for s in per_iteration:
        jp = s["judge_pairs"]
        result[f"iter {s['iteration']}"] = (f"{s['actor_pairs']} actor pairs (rho {s['rho']}, chosen/rejected length "
                                            f"{_num(s['chosen_mean_length'], 1)}/{_num(s['rejected_mean_length'], 1)}), "
                                            f"{jp} judge pairs")
    line = last_eval_line(evaluated)
    if line:  # the CLI prints the result's entries as its final lines
        result["eval"] = line
    return result
