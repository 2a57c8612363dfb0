"""The DPO train stage's output, shared by Self-Rewarding, Meta-Rewarding and SPIN.

M_{t+1} = base + an adapter trained by DPO from M_t's adapter (a fresh one when M_t is the base):
TRL keeps a frozen copy of the starting adapter as the reference, so the reference is exactly
M_t and every M_t is a delta on the same base, served by one engine (see ``alignment.training``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from alignment.launch import run_dpo
from alignment.stages import Directory
from alignment.trackers import trainer_report
from alignment.training import DPOSpec, trained_rows_info, truncation_warnings


def dpo_output(run, t: int, ctx, rows: list[dict], *, beta: float, loss_type: str = "sigmoid", info: dict,
               empty_reason: str = "no preference pairs (all ties or failed judgments)") -> Directory:
    """The train stage's directory: the adapter DPO trains on ``rows`` ({prompt, chosen, rejected}),
    or, without rows, an empty output that records M_{t+1} = M_t (``trained: False``)."""
    if not rows:
        run.log(f"WARNING iter {t} train: {empty_reason}; skipping training, M_{t + 1} = M_{t}")
        return Directory(lambda tmp: (tmp / "NO_PAIRS").write_text("no pairs\n"),
                         info={"adapter": run.rel(run.model(t).adapter), "pairs": 0, "trained": False} | info,
                         subdir="empty")
    tc = run.recipe.train
    ckpt = ctx.scratch("checkpoints")
    final = run.store.stage_dir(t, "train") / "adapter"
    out = {"adapter": run.rel(final), "pairs": len(rows), "trained": True} | info

    def build(tmp: Path) -> None:
        data = tmp / "train_pairs.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        spec = DPOSpec(
            # init_adapter = adapter_{t-1}: TRL keeps a frozen copy as the reference, so it is M_t.
            base=run.base.base, init_adapter=run.model(t).adapter, data=str(data), output_dir=str(tmp),
            checkpoint_dir=str(ckpt / "trainer"), beta=beta, loss_type=loss_type,
            learning_rate=tc.learning_rate, epochs=tc.epochs, batch_size=tc.batch_size, grad_accum=tc.grad_accum,
            max_length=tc.max_length, save_steps=tc.save_steps, seed=run.recipe.seed, lora=tc.lora.model_dump(),
            crash_prefix=ctx.crash_prefix, num_processes=tc.num_processes,
            gradient_checkpointing=tc.gradient_checkpointing, load_in_4bit=tc.load_in_4bit,
            # the per-step curve goes to the recipe's trackers (RUN/logs/tensorboard/<name>/iter_<t>/train)
            **trainer_report(run.recipe.report, run.store.root, run.recipe.name, t, os.environ),
        )
        metrics = run_dpo(spec, launcher=tc.launcher, spec_path=ckpt / "spec.json",
                          accelerate_config=tc.accelerate_config, log=run.log)
        out.update(trained_rows_info(metrics))
        run.log(f"iter {t} train: adapter {final} (loss {metrics.get('train_loss', float('nan')):.4f}, "
                f"{metrics.get('steps')} steps)")
        for line in truncation_warnings(metrics):
            run.log(f"WARNING iter {t} train: {line}")

    return Directory(build, out)
