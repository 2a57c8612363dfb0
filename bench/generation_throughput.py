"""Generation throughput, vLLM vs transformers.

Generates K responses for the same prompts with both backends, in one run, on the embedded
model, and prints tokens/s and the ratio. (Where a whole run's time goes: bench/iteration_split.py;
engine thread binding and adapter serving: bench/engine_speed.py.)

    .venv/bin/python bench/generation_throughput.py [--prompts 8] [--n 4] [--max-tokens 64]
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


def load_prompts(n: int) -> list[dict]:
    from alignment.data import load_prompts as load

    rows = load(str(REPO / "data" / "tiny_prompts.jsonl"))
    return (rows * (n // len(rows) + 1))[:n]


def throughput(backend: str, prompts, sampling, base) -> tuple[float, int, float]:
    from alignment.actor import generate_responses
    from alignment.generation import EngineSpec, open_generator

    started = time.perf_counter()
    gen = open_generator(EngineSpec(base=base, backend=backend, batch_size=32))
    startup = time.perf_counter() - started
    generate_responses(gen, prompts[:2], sampling, seed=0)  # warm-up
    t0 = time.perf_counter()
    rows = generate_responses(gen, prompts, sampling, seed=1)
    seconds = time.perf_counter() - t0
    gen.close()
    return seconds, sum(r["length"] for r in rows), startup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="bench-prefect-"))

    from alignment.generation import Sampling
    from alignment.models import resolve

    base = resolve("smollm2-135m").base
    prompts = load_prompts(args.prompts)
    sampling = Sampling(n=args.n, temperature=0.7, top_p=0.9, max_tokens=args.max_tokens)
    results = {b: throughput(b, prompts, sampling, base) for b in ("vllm", "transformers")}
    print(f"\n== generation: {args.prompts} prompts x {args.n} responses, <= {args.max_tokens} tokens, embedded model, CPU ==")
    print(f"{'backend':<14}{'tokens':>8}{'seconds':>10}{'tokens/s':>10}{'startup s':>11}")
    for b, (s, tokens, startup) in results.items():
        print(f"{b:<14}{tokens:>8}{s:>10.1f}{tokens / s:>10.1f}{startup:>11.1f}")
    (sv, tv, _), (sh, th, _) = results["vllm"], results["transformers"]
    print(f"vLLM / transformers throughput ratio: {(tv / sv) / (th / sh):.2f}x")


if __name__ == "__main__":
    main()
