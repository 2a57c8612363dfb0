"""Prefect flow ``meta-rewarding``: the stage list of ``alignment.meta_rewarding`` as tasks
(``flows.stage_flow``). Artifacts per iteration: the Self-Rewarding summary / review link / judge
table (``flows.common.publish_iteration``), plus the battle table, the Elo table, the judge pairs,
and a length-stats table over all iterations so far.
"""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from alignment.report import last_eval_line
from flows.common import artifact_key, publish_iteration
from flows.stage_flow import Presentation, run_stages

ARTIFACT_ROWS = 200


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


def publish_meta(run, t: int, per_iteration: list[dict]) -> None:
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


def publish(run, t: int, per_iteration: list[dict]) -> None:
    publish_iteration(run.store, t, per_iteration[-1], review_base=run.recipe.review.url)
    publish_meta(run, t, [m["length"] for m in per_iteration])


def result(run, per_iteration: list[dict]) -> dict:
    out = {"run_dir": str(run.store.root), "adapter": run.adapter(run.recipe.iterations)}
    for s in (m["length"] for m in per_iteration):
        out[f"iter {s['iteration']}"] = (f"{s['actor_pairs']} actor pairs (rho {s['rho']}, chosen/rejected length "
                                         f"{_num(s['chosen_mean_length'], 1)}/{_num(s['rejected_mean_length'], 1)}), "
                                         f"{s['judge_pairs']} judge pairs")
    line = last_eval_line(per_iteration)
    if line:  # the CLI prints the result's entries as its final lines
        out["eval"] = line
    return out


SHOW = Presentation(result=result, iteration=publish)


@flow(name="meta-rewarding", log_prints=True)
def meta_rewarding_flow(run_dir: str, recipe_path: str | None = None, overrides: list[str] | None = None) -> dict:
    """Meta-Rewarding (Wu et al., 2024): for t = 1..T, M_t acts, judges and meta-judges its own judgments;
    actor pairs and (in judge-training iterations) judge pairs train M_{t+1} together.

    ``recipe_path=None`` resumes the run with the recipe stored in ``run_dir``.
    """
    return run_stages(run_dir, recipe_path, overrides, SHOW)
