"""Resume overhead, measured side by side in one run (issue 4).

    .venv/bin/python bench/resume_overhead.py [--prompts 8] [--shard-size 2]

Runs the tiny recipe (random 2-layer model, transformers backend, 1 iteration, training in a
subprocess) through the real CLI, all processes against one Prefect test server:

1. uninterrupted: wall time, and when each stage/shard finished;
2. for each kill (SIGKILL at a crash point right after a shard/checkpoint, and SIGKILL at a
   *time* in the middle of a shard — the realistic case), then `selfalign resume`:
   - startup:    resume process start -> flow running (Python + Prefect; paid by any restart)
   - reach:      resume process start -> first new work (the killed point reached again)
   - skip cost:  reach - startup: time spent re-establishing what is already done (~0)
   - lost:       work done before the kill and done again after it, in seconds of compute
                 and in shards (<= 1 shard by design), and training steps redone.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHARD_LINE = re.compile(r"iter (\d+) (generate|judge): shard (\d+)/(\d+) \(\d+ items, ([\d.]+)s\)")
STEP_LINE = re.compile(r" - step (\d+)/(\d+) loss")
FLOW_START = "Beginning flow run"
NEW_WORK = re.compile(r"resuming \(partial|shards already done|: shard \d+/|training: |redoing \(")


def tiny_model(out: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from alignment.models import embedded_model_dir

    tok = AutoTokenizer.from_pretrained(embedded_model_dir())
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


class Proc:
    """A CLI process whose output lines are time-stamped on arrival."""

    def __init__(self, args: list[str], env: dict, *, kill_when=None):
        self.lines: list[tuple[float, str]] = []
        self.t0 = time.monotonic()
        self.p = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], env=env, cwd=env["BENCH_CWD"],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.killed_at: float | None = None
        self._kill_when = kill_when
        assert self.p.stdout is not None
        for line in self.p.stdout:
            now = time.monotonic() - self.t0
            self.lines.append((now, line.rstrip()))
            if self._kill_when and self.killed_at is None:
                delay = self._kill_when(line)
                if delay is not None:
                    threading.Timer(delay, self._kill).start()
        self.rc = self.p.wait()
        self.seconds = time.monotonic() - self.t0

    def _kill(self):
        if self.p.poll() is None:
            self.killed_at = time.monotonic() - self.t0
            os.kill(self.p.pid, signal.SIGKILL)

    def first(self, pattern) -> float | None:
        for t, line in self.lines:
            if (pattern.search(line) if hasattr(pattern, "search") else pattern in line):
                return t
        return None

    def shards(self) -> list[tuple[str, str, str, float]]:
        return [(m[1], m[2], m[3], float(m[5])) for _, line in self.lines if (m := SHARD_LINE.search(line))]

    def steps(self) -> list[str]:
        return [m[1] for _, line in self.lines if (m := STEP_LINE.search(line))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--shard-size", type=int, default=2)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="selfalign-resume-bench-"))
    os.environ["PREFECT_HOME"] = str(work / "prefect")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    from tests.conftest import write_recipe

    model = tiny_model(work / "tiny")
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": "Question number {i}?"}}\n' for i in range(args.prompts)))
    recipe = write_recipe(work / "recipe.yaml", str(model), prompts, iterations=1,
                          **{"engine.shard_size": args.shard_size, "train.launcher": "subprocess",
                             "train.save_steps": 1})
    n_shards = -(-args.prompts // args.shard_size)

    with prefect_test_harness(server_startup_timeout=120):
        env = dict(os.environ, PREFECT_API_URL=str(PREFECT_API_URL.value()), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", BENCH_CWD=str(work))
        for k in ("SELFALIGN_CRASH_AT", "SELFALIGN_CRASH_SIGNAL"):
            env.pop(k, None)

        print(f"tiny recipe: {args.prompts} prompts, shards of {args.shard_size} ({n_shards} per stage), "
              f"1 iteration, work dir {work}", flush=True)
        ref = Proc(["run", str(recipe), "--run-dir", str(work / "reference")], env)
        assert ref.rc == 0, "\n".join(line for _, line in ref.lines[-30:])
        ref_startup = ref.first(FLOW_START)
        judge_shards = [s[3] for s in ref.shards() if s[1] == "judge"]
        one_judge_shard = sum(judge_shards) / len(judge_shards)

        scenarios = [
            ("judge shard1 written (crash point)", dict(crash="iter1/judge/shard1")),
            ("mid judge shard 2 (timed SIGKILL)", dict(at_line="iter 1 judge: shard 2/", delay=one_judge_shard / 2)),
            ("train after checkpoint-1 (crash point)", dict(crash="iter1/train/saved1")),
            ("train after step 2, before its save", dict(crash="iter1/train/step2")),
        ]
        rows = []
        for name, sc in scenarios:
            run_dir = work / re.sub(r"\W+", "-", name)
            kenv = dict(env)
            kill_when = None
            if "crash" in sc:
                kenv["SELFALIGN_CRASH_AT"] = sc["crash"]
            else:
                kill_when = lambda line, sc=sc: sc["delay"] if sc["at_line"] in line else None  # noqa: E731
            killed = Proc(["run", str(recipe), "--run-dir", str(run_dir)], kenv, kill_when=kill_when)
            assert killed.rc == -signal.SIGKILL, f"{name}: rc {killed.rc}"
            resumed = Proc(["resume", str(run_dir)], env)
            assert resumed.rc == 0, "\n".join(line for _, line in resumed.lines[-30:])
            startup = resumed.first(FLOW_START)
            reach = resumed.first(NEW_WORK)
            # Lost work: shards/steps computed in the resume that the killed process had started.
            done_before = {s[:3] for s in killed.shards()}
            redone = [s for s in resumed.shards() if s[:3] in done_before]  # must be empty
            lost_s, lost_shards = sum(s[3] for s in redone), float(len(redone))
            if killed.killed_at is not None:  # killed mid-shard: the partial shard's compute is lost
                last_done = max((t for t, line in killed.lines if SHARD_LINE.search(line)), default=0.0)
                lost_s += killed.killed_at - last_done
                lost_shards += (killed.killed_at - last_done) / one_judge_shard
            # Training: steps the killed trainer completed minus the checkpoint the resume starts from.
            progress = max([int(x) for x in killed.steps()] + [int(m[1]) for m in [re.search(r"/step(\d+)$", sc.get("crash", ""))] if m] + [0])
            ckpt = next((int(m[1]) for _, line in resumed.lines if (m := re.search(r"resuming from .*checkpoint-(\d+)", line))), 0)
            steps_redone = max(0, progress - ckpt)
            rows.append((name, killed.seconds, resumed.seconds, startup, reach, reach - startup, lost_s,
                         lost_shards, steps_redone))
            print(f"  done: {name}", flush=True)

    total = ref.seconds
    print()
    print(f"uninterrupted run: {total:.1f}s (process + Prefect startup {ref_startup:.1f}s); "
          f"one judge shard {one_judge_shard:.2f}s")
    head = ("kill point", "killed run", "resume", "startup", "reach pt", "skip cost", "lost s", "lost shards", "steps redone")
    print(f"{head[0]:<40}" + "".join(f"{h:>13}" for h in head[1:]))
    for r in rows:
        print(f"{r[0]:<40}" + "".join(f"{v:>12.2f}s" for v in r[1:7]) + f"{r[7]:>13.2f}{r[8]:>13d}")
    print("\nstartup = resume start -> flow running; reach pt = resume start -> first new work; "
          "skip cost = reach - startup (checking manifests of done stages);\nlost = compute done before "
          "the kill and repeated after it (<= 1 shard / 1 training step by design)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
