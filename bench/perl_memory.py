"""PERL's point, measured: LoRA vs full fine-tuning for reward-model training and PPO.

The same steps (same data, batch sizes, lengths, seed) run four times, each in a fresh
``python -m alignment.perl_training rm|ppo SPEC.json`` process so each peak RSS is clean:

    RM  LoRA (r=8 on q/k/v/o + score head)   vs   RM  full (every parameter)
    PPO LoRA policy + LoRA value              (our PPO loop trains adapters only: there is no full mode to
                                               compare; the README's PPO "full" figures were TRL's PPOTrainer)

PPO in both cases scores rollouts with the same frozen reward model (the LoRA RM trained in the
first job, merged). Reported: peak RSS of the process (model load included: that is what a
machine must hold), median seconds per optimizer step (RM) / per PPO update (rollout + 4 epochs),
and full/LoRA ratios. On a GPU the same script reports peak CUDA memory instead of RSS.

    python bench/perl_memory.py                      # embedded SmolLM2-135M, CPU, ~10 min on 2 cores
    python bench/perl_memory.py --model PATH --rm-steps 8 --ppo-steps 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from alignment.models import resolve  # noqa: E402
from alignment.perl_training import DEFAULT_LORA, PPOSpec, RMSpec  # noqa: E402


def run_job(kind: str, spec, work: Path, name: str) -> dict:
    spec_path, out = work / f"{name}.spec.json", work / f"{name}.metrics.json"
    spec_path.write_text(json.dumps(asdict(spec)))
    env = dict(os.environ, SELFALIGN_METRICS_OUT=str(out), TOKENIZERS_PARALLELISM="false", TRL_EXPERIMENTAL_SILENCE="1",
               PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "alignment.perl_training", kind, str(spec_path)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def step_time(metrics: dict) -> float:
    times = metrics["step_seconds"]
    return statistics.median(times[1:] if len(times) > 2 else times)  # the first step includes warm-up


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rm-steps", type=int, default=6)
    ap.add_argument("--ppo-steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--response-length", type=int, default=24)
    ap.add_argument("--out", help="also write the numbers as JSON here")
    args = ap.parse_args()

    base = resolve(args.model).base
    work = Path(tempfile.mkdtemp(prefix="perl-bench-"))
    pairs = [json.loads(line) for line in (REPO / "data" / "tiny_preferences.jsonl").read_text().splitlines() if line.strip()]
    (work / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (work / "prompts.jsonl").write_text((REPO / "data" / "neutral_prompts.jsonl").read_text())

    results = {}
    for mode, lora in (("lora", dict(DEFAULT_LORA)), ("full", None)):
        spec = RMSpec(base=base, train_data=str(work / "pairs.jsonl"), heldout_data=None,
                      output_dir=str(work / "rm") if mode == "lora" else "", checkpoint_dir=str(work / f"rm-{mode}-ck"),
                      learning_rate=1e-4 if lora else 1e-5, batch_size=args.batch_size, max_length=256,
                      max_steps=args.rm_steps, save_steps=10_000, lora=lora)
        results[f"rm_{mode}"] = run_job("rm", spec, work, f"rm-{mode}")
        print(f"rm {mode}: peak RSS {results[f'rm_{mode}']['peak_rss_mib']:.0f} MiB, "
              f"{step_time(results[f'rm_{mode}']):.2f} s/step", flush=True)
    for mode, lora in (("lora", dict(DEFAULT_LORA)),):
        spec = PPOSpec(base=base, prompts=str(work / "prompts.jsonl"), output_dir="", checkpoint_dir="",
                       reward_adapter=str(work / "rm"), steps=args.ppo_steps, batch_size=args.batch_size,
                       num_ppo_epochs=4, response_length=args.response_length, learning_rate=1e-4 if lora else 1e-5,
                       lora=lora, value_lora=lora)
        results[f"ppo_{mode}"] = run_job("ppo", spec, work, f"ppo-{mode}")
        print(f"ppo {mode}: peak RSS {results[f'ppo_{mode}']['peak_rss_mib']:.0f} MiB, "
              f"{step_time(results[f'ppo_{mode}']):.2f} s/update", flush=True)

    rows = []
    for job in ("rm", "ppo"):
        lo, fu = results[f"{job}_lora"], results.get(f"{job}_full")
        share = (lo.get("trainable") or lo.get("trainable_policy"))["share"]
        rows.append({
            "job": job, "trainable_share_lora": share,
            "peak_rss_mib_lora": round(lo["peak_rss_mib"]), "peak_rss_mib_full": round(fu["peak_rss_mib"]) if fu else None,
            "rss_ratio_full_over_lora": fu["peak_rss_mib"] / lo["peak_rss_mib"] if fu else None,
            "step_s_lora": step_time(lo), "step_s_full": step_time(fu) if fu else None,
            "time_ratio_full_over_lora": step_time(fu) / step_time(lo) if fu else None,
        })
    print(f"\nmodel {args.model}; RM {args.rm_steps} steps, PPO {args.ppo_steps} updates; batch {args.batch_size}")
    print(f"{'job':4} {'LoRA share':>10} {'RSS LoRA':>9} {'RSS full':>9} {'full/LoRA':>9} {'s LoRA':>7} {'s full':>7} {'full/LoRA':>9}")

    def cell(value, fmt: str, width: int) -> str:
        return f"{value:{width}{fmt}}" if value is not None else f"{'-':>{width}}"

    for r in rows:
        print(f"{r['job']:4} {100 * r['trainable_share_lora']:9.2f}% {r['peak_rss_mib_lora']:8d}M "
              f"{cell(r['peak_rss_mib_full'], 'd', 8)}M {cell(r['rss_ratio_full_over_lora'], '.2f', 9)} "
              f"{r['step_s_lora']:7.2f} {cell(r['step_s_full'], '.2f', 7)} {cell(r['time_ratio_full_over_lora'], '.2f', 9)}")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": args.model, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
