"""Time per SPIN iteration on the tiny recipe, split into generation / training / eval.

Runs the tiny SPIN recipe's iterations stage by stage (``alignment.stages.execute``, no Prefect) in a fresh run
directory and prints, per iteration, the seconds spent generating y′, training (the DPO
subprocess, including its start-up) and evaluating, with their shares of the iteration. Engine
start-up is printed apart (it is paid once per run, not per iteration).

    .venv/bin/python bench/spin_iteration.py [--limit 24] [--iterations 2] [--backend auto] [--eval]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="use only the first N prompts of the tiny SFT set")
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--backend", default="auto", choices=["auto", "vllm", "transformers"])
    ap.add_argument("--eval", action="store_true", help="also run (and time) the held-out evaluation")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from alignment.config import load_recipe
    from alignment.algorithms import algorithm_run
    from alignment.store import RunStore

    overrides = [f"data.source={REPO / 'data' / 'tiny_sft.jsonl'}", f"iterations={args.iterations}",
                 f"engine.backend={args.backend}", f"eval.enabled={str(args.eval).lower()}"]
    if args.limit:
        overrides.append(f"data.limit={args.limit}")
    recipe, data = load_recipe(REPO / "recipes" / "tiny-spin.yaml", overrides)
    recipe.preflight()
    run_dir = Path(tempfile.mkdtemp(prefix="spin-bench-")) / "run"
    store = RunStore.create(run_dir, recipe=data, algorithm="spin", name=recipe.name)
    run = algorithm_run(store, recipe, log=lambda m: None)

    t0 = time.perf_counter()
    backend = run.generator().backend
    startup = time.perf_counter() - t0
    rows = []
    try:
        for t in range(1, recipe.iterations + 1):
            took = {}
            for stage in run.algorithm.stages:  # what run.iteration(t) does, timed per stage
                started = time.perf_counter()
                run.run_stage(stage.name, t)
                took[stage.name] = time.perf_counter() - started
            run.metrics(t)
            info = store.manifest(t, "pairs")["info"]
            rows.append((t, info["pairs"], took["generate"], took["train"], took["eval"], sum(took.values())))
    finally:
        run.close()

    train_prompts = store.manifest(1, "data")["info"]["train"]
    print(f"SPIN tiny recipe: {train_prompts} training prompts, {backend} backend, "
          f"engine start-up {startup:.1f}s (once per run, not counted below)")
    print(f"{'iter':>4} {'pairs':>6} {'generate s':>11} {'train s':>9} {'eval s':>8} {'total s':>8}  "
          f"{'gen share':>9} {'train share':>11} {'train/gen':>9}")
    for t, pairs, gen, train, ev, total in rows:
        print(f"{t:>4} {pairs:>6} {gen:>11.1f} {train:>9.1f} {ev:>8.1f} {total:>8.1f}  "
              f"{100 * gen / total:>8.0f}% {100 * train / total:>10.0f}% {train / max(gen, 1e-9):>9.1f}")
    print(f"run dir: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
