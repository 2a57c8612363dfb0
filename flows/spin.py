"""Prefect flow ``spin``: the stage list of ``alignment.spin`` as tasks (``flows.stage_flow``). Artifacts per iteration: a summary (pairs, training
curve ends, held-out eval), the pair table, the training curve; at the end, held-out metrics
of every iteration side by side.
"""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from alignment.spin import summary_markdown, training_curve
from flows.common import artifact_key
from flows.stage_flow import Presentation, run_stages

def _cut(s: str | None, n: int = 300) -> str:
    s = s or ""
    return s if len(s) <= n else s[:n] + "…"


def publish_iteration(run, t: int, metrics: dict) -> None:
    name = run.store.run_info().get("name", run.store.root.name)
    create_markdown_artifact(key=artifact_key(name, "iter", t, "summary"), markdown=summary_markdown(metrics),
                             description=f"SPIN iteration {t} summary")
    pairs = run.store.read_rows(t, "pairs")
    create_table_artifact(
        key=artifact_key(name, "iter", t, "pairs"),
        table=[{"prompt": _cut(p["prompt"]), "chosen (real answer)": _cut(p["chosen"]),
                "rejected (y′)": _cut(p["rejected"]), "generated in": p["generated_in"]} for p in pairs[:200]]
        or [{"prompt": "(no pairs)"}],
        description=f"iteration {t} pairs (first 200)",
    )
    curve = training_curve(metrics)
    if curve:
        create_table_artifact(key=artifact_key(name, "iter", t, "curve"), table=curve,
                              description=f"iteration {t} training curve (loss, reward margin, log-probs per step)")


def publish_eval(run, per_iteration: list[dict]) -> None:
    name = run.store.run_info().get("name", run.store.root.name)
    rows = []
    for m in per_iteration:
        ev, t = m.get("eval") or {}, m["iteration"]
        rows.append({"iteration": t, "trained": f"M_{t} -> M_{t + 1}", "heldout": ev.get("heldout"),
                     "loglik/token before": ev.get("loglik_per_token_before"),
                     "loglik/token after": ev.get("loglik_per_token_after"),
                     "win rate (after over before)": ev.get("win_rate"),
                     "final train loss": (m.get("train_metrics") or {}).get("train_loss")})
    create_table_artifact(key=artifact_key(name, "eval"), table=rows,
                          description="SPIN held-out evaluation per iteration")


def result(run, per_iteration: list[dict]) -> dict:
    out = {"run_dir": str(run.store.root), "adapter": run.adapter(run.recipe.iterations)}
    for m in per_iteration:
        ev = m.get("eval") or {}
        if ev.get("heldout"):
            wr = ev.get("win_rate")
            out[f"iter {m['iteration']} held-out"] = (
                f"loglik/token {ev['loglik_per_token_before']:.4f} -> {ev['loglik_per_token_after']:.4f}, "
                f"win rate {'–' if wr is None else f'{wr:.2f}'}")
    out["final train loss"] = (per_iteration[-1].get("train_metrics") or {}).get("train_loss")
    return out


SHOW = Presentation(result=result, iteration=lambda run, t, done: publish_iteration(run, t, done[-1]), end=publish_eval)


@flow(name="spin", log_prints=True)
def spin_flow(run_dir: str, recipe_path: str | None = None, overrides: list[str] | None = None) -> dict:
    """SPIN (Chen et al., 2024): for t = 1..T, M_t answers the SFT prompts; the real answers are
    preferred over its own and M_{t+1} is trained with M_t as the reference.

    ``recipe_path=None`` resumes the run with the recipe stored in ``run_dir``.
    """
    return run_stages(run_dir, recipe_path, overrides, SHOW)
