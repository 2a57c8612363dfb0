"""Prefect flow ``spin``: iterations → data, generate, pairs, train, eval; each stage a task.

Tasks are three-line wrappers of ``SpinRun`` methods and pass paths and hashes, not datasets.
Caching is off (``NO_CACHE``): the run directory's manifests say what is done, so a resume
works with a fresh Prefect database too. Artifacts per iteration: a summary (pairs, training
curve ends, held-out eval), the pair table, the training curve; at the end, held-out metrics
of every iteration side by side.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from alignment.spin import SpinRun, summary_markdown, training_curve
from flows.review_gate import before_training
from flows.common import artifact_key, open_run, progress_factory

TASK = dict(cache_policy=NO_CACHE, retries=0)


@task(name="data", **TASK)
def data_task(run: SpinRun, t: int) -> str:
    return run.data(t)


@task(name="generate", **TASK)
def generate_task(run: SpinRun, t: int) -> str:
    return run.generate(t)


@task(name="pairs", **TASK)
def pairs_task(run: SpinRun, t: int) -> dict:
    return run.pairs(t)


@task(name="train", **TASK)
def train_task(run: SpinRun, t: int) -> str | None:
    return run.train(t)


@task(name="eval", **TASK)
def eval_task(run: SpinRun, t: int) -> dict:
    return run.eval(t)


def _cut(s: str | None, n: int = 300) -> str:
    s = s or ""
    return s if len(s) <= n else s[:n] + "…"


def publish_iteration(run: SpinRun, t: int, metrics: dict) -> None:
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


def publish_eval(run: SpinRun, per_iteration: list[dict]) -> None:
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


@flow(name="spin", log_prints=True)
def spin_flow(run_dir: str, recipe_path: str | None = None, overrides: list[str] | None = None) -> dict:
    """SPIN (Chen et al., 2024): for t = 1..T, M_t answers the SFT prompts; the real answers are
    preferred over its own and M_{t+1} is trained with M_t as the reference.

    ``recipe_path=None`` resumes the run with the recipe stored in ``run_dir``.
    """
    logger = get_run_logger()
    store, recipe = open_run(run_dir, recipe_path, overrides or [])
    per_iteration = []
    with store.lock():
        run = SpinRun(store, recipe, log=logger.info, progress=progress_factory(store))
        try:
            for t in range(1, recipe.iterations + 1):
                data_task(run, t)
                generate_task(run, t)      # y′ ~ M_t
                pairs_task(run, t)         # (x, y, y′), + pairs of t−1
                before_training(run, store, recipe, t, logger)  # release the engine if the recipe asks
                train_task(run, t)         # M_{t+1} = argmin SPIN loss against M_t
                eval_task(run, t)          # held-out: M_t vs M_{t+1}
                metrics = run.metrics(t)
                publish_iteration(run, t, metrics)
                per_iteration.append(metrics)
            publish_eval(run, per_iteration)
        finally:
            run.close()
    store.log_event("flow_done")
    last = per_iteration[-1]
    result = {"run_dir": str(store.root), "adapter": run.adapter(recipe.iterations)}
    for m in per_iteration:
        ev = m.get("eval") or {}
        if ev.get("heldout"):
            wr = ev.get("win_rate")
            result[f"iter {m['iteration']} held-out"] = (
                f"loglik/token {ev['loglik_per_token_before']:.4f} -> {ev['loglik_per_token_after']:.4f}, "
                f"win rate {'–' if wr is None else f'{wr:.2f}'}")
    result["final train loss"] = (last.get("train_metrics") or {}).get("train_loss")
    return result
