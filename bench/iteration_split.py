"""Where a run's wall time goes: the demo (tiny Self-Rewarding recipe) end to end, split per iteration.

    .venv/bin/python bench/iteration_split.py [--recipe recipes/tiny-self-rewarding.yaml] [--set KEY=VALUE ...]
    .venv/bin/python bench/iteration_split.py --launchers   # subprocess vs in-process training, one after the other

Runs ``selfalign run RECIPE`` as a user does (temporary Prefect server, vLLM, DPO)
and splits the wall time from what the run directory records:

- model calls:   generation and judging shards (``shard_done`` events), less the engine starts and
                 adapter merges that happened inside them;
- engine start:  ``engine_started`` events, plus ``adapter_merged`` (merged adapters) shown apart;
- training:      the DPO job after its imports (model load, tokenization, steps, save:
                 ``job_seconds`` in the adapter's train_metrics.json), of which ``train_seconds``
                 are the optimizer loop;
- trainer start: the train stage's wall less that job: starting the trainer (a process and its
                 imports of torch, transformers, TRL; in the run's process, the TRL import only),
                 plus the stage's own writes;
- orchestration: everything else (Prefect tasks, hashing, manifests, events, artifacts, waits);
                 the CLI start and the temporary Prefect server's are shown apart, per run.

Prints the table, the orchestration share, iteration-2 / iteration-1 judge time, the demo's wall time,
and the DPO reward margin / accuracy per step of the last iteration.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def ts(event: dict) -> float:
    return datetime.fromisoformat(event["time"]).timestamp()


def stage_window(events: list[dict], t: int, stage: str) -> float | None:
    """Seconds from a stage's start event to its done event in iteration t (None if either is missing)."""
    marks = [ts(e) for e in events if e.get("iteration") == t and e.get("stage") == stage and e["event"] in ("start", "done")]
    return max(marks) - min(marks) if len(marks) >= 2 else None


def split(events: list[dict], run_dir: Path, wall: float, started: float) -> tuple[list[dict], dict]:
    """Per iteration: window (first stage start .. train done), model, engine, merge, training, orchestration."""
    rows = []
    iterations = sorted({e["iteration"] for e in events if isinstance(e.get("iteration"), int)})
    bounds = {}
    for t in iterations:
        mine = [e for e in events if e.get("iteration") == t and e["event"] in ("start", "done", "skip")]
        bounds[t] = (min(ts(e) for e in mine), max(ts(e) for e in mine))
    for i, t in enumerate(iterations):
        lo, hi = bounds[t]
        if i + 1 < len(iterations):
            hi = bounds[iterations[i + 1]][0]  # the gap to the next iteration (artifacts, gate) is this one's
        inside = [e for e in events if lo <= ts(e) <= hi]
        engine = sum(e["seconds"] for e in inside if e["event"] == "engine_started")
        merge = sum(e["seconds"] for e in inside if e["event"] == "adapter_merged")
        shards = sum(e["seconds"] for e in inside if e["event"] == "shard_done")
        metrics_file = run_dir / f"iter_{t}" / "train" / "adapter" / "train_metrics.json"
        tm = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        judge = stage_window(events, t, "judge")
        train = stage_window(events, t, "train")
        job = tm.get("job_seconds", 0.0)
        rows.append({"t": t, "window": hi - lo, "model": shards - engine - merge, "engine": engine, "merge": merge,
                     "training": job, "steps": tm.get("train_seconds", 0.0),
                     # the trainer process's start (Python, torch / transformers / TRL imports) and the
                     # train stage's own I/O: the train stage's wall less the job after its imports
                     "trainer_start": (train - job) if train is not None else 0.0,
                     "judge": judge, "curve": tm.get("curve", [])})
    for r in rows:
        r["orchestration"] = (r["window"] - r["model"] - r["engine"] - r["merge"] - r["training"]
                              - r["trainer_start"])
    first = min(bounds[t][0] for t in iterations)
    last = max(bounds[t][1] for t in iterations)
    total = {"wall": wall, "startup": first - started, "after": started + wall - last}
    return rows, total


def run_and_split(recipe: str, overrides: list[str]) -> tuple[float, list[dict], dict]:
    """``selfalign run RECIPE --set ...`` in a fresh run directory: (wall s, per-iteration rows, run totals)."""
    run_dir = Path(tempfile.mkdtemp(prefix="bench-split-")) / "run"
    cmd = [str(REPO / ".venv" / "bin" / "selfalign"), "run", recipe, "--run-dir", str(run_dir)]
    for o in overrides:
        cmd += ["--set", o]
    # The user's PREFECT_HOME, as a user runs it: a fresh one would add the database migrations
    # (~12 s here) that only a first run ever pays.
    started = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - started
    if out.returncode != 0:
        sys.exit(f"run failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line.strip()]
    rows, total = split(events, run_dir, wall, started)
    return wall, rows, total


def report(title: str, wall: float, rows: list[dict], total: dict) -> float:
    """Print one run's split; return its orchestration share with the trainer starts (%)."""
    print(f"\n== {title}: wall {wall:.1f}s ({wall / 60:.1f} min), {len(rows)} iterations ==")
    head = (f"{'iter':<6}{'wall s':>8}{'model':>8}{'engine':>8}{'merge':>7}{'training':>10}{'(steps)':>9}"
            f"{'trainer start':>15}{'orchestr.':>11}{'share':>8}")
    print(head)
    for r in rows:
        print(f"{r['t']:<6}{r['window']:>8.1f}{r['model']:>8.1f}{r['engine']:>8.1f}{r['merge']:>7.1f}{r['training']:>10.1f}"
              f"{r['steps']:>9.1f}{r['trainer_start']:>15.1f}{r['orchestration']:>11.1f}"
              f"{100 * r['orchestration'] / r['window']:>7.1f}%")
    orch = sum(r["orchestration"] for r in rows) + total["startup"] + total["after"]
    starts = sum(r["trainer_start"] for r in rows)
    per_iteration = sum(r["orchestration"] + r["trainer_start"] for r in rows) / sum(r["window"] for r in rows)
    print(f"per iteration: orchestration + trainer start = {100 * per_iteration:.1f}% of the iterations' wall time")
    print(f"whole run: startup (CLI, Prefect server, recipe checks) {total['startup']:.1f}s, after the last stage "
          f"{total['after']:.1f}s; orchestration {orch:.1f}s = {100 * orch / wall:.1f}% of the wall time "
          f"(with the trainer starts: {100 * (orch + starts) / wall:.1f}%)")
    judges = [r["judge"] for r in rows if r["judge"]]
    if len(judges) >= 2:
        print(f"judge time: iteration 2 / iteration 1 = {judges[1]:.1f}s / {judges[0]:.1f}s = {judges[1] / judges[0]:.2f}")
    curve = rows[-1]["curve"]
    if curve:
        print(f"DPO, iteration {rows[-1]['t']}: step, loss, reward margin, reward accuracy")
        for c in curve:
            print(f"  {c.get('step'):>3} {c.get('loss', float('nan')):.4f} {c.get('rewards/margins', float('nan')):+.4f} "
                  f"{c.get('rewards/accuracies', float('nan')):.2f}")
    return 100 * per_iteration


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "tiny-self-rewarding.yaml"))
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--launchers", action="store_true",
                        help="run twice, training in a subprocess and with the default launcher (auto), side by side")
    args = parser.parse_args()
    if not args.launchers:
        report(f"{Path(args.recipe).name} {' '.join(args.overrides)}", *run_and_split(args.recipe, args.overrides))
        return
    walls = {}
    for launcher in ("subprocess", "auto"):
        result = run_and_split(args.recipe, [*args.overrides, f"train.launcher={launcher}"])
        walls[launcher] = result[0]
        report(f"{Path(args.recipe).name} train.launcher={launcher}", *result)
    print(f"\ndemo wall: launcher auto / subprocess = {walls['auto']:.1f}s / {walls['subprocess']:.1f}s "
          f"= {walls['auto'] / walls['subprocess']:.2f}")


if __name__ == "__main__":
    main()
