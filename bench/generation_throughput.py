"""Generation throughput, vLLM vs transformers, and where an iteration's wall time goes.

Part 1 generates K responses for the same prompts with both backends, in one run, on the
embedded model, and prints tokens/s and the ratio. Part 2 runs one Self-Rewarding iteration
through the Prefect flow (vLLM backend) with the model calls timed, and prints the share of
wall time spent outside them (orchestration and I/O).

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


class Timer:
    def __init__(self):
        self.model = 0.0
        self.startup = 0.0


def timed_iteration(limit: int, max_tokens: int) -> tuple[float, Timer]:
    import alignment.self_rewarding as sr
    from flows.self_rewarding import self_rewarding_flow

    timer = Timer()
    real_open, real_dpo = sr.open_generator, sr.run_dpo

    class Timed:
        def __init__(self, inner):
            self.inner, self.backend = inner, inner.backend

        def chat(self, *a, **k):
            t = time.perf_counter()
            try:
                return self.inner.chat(*a, **k)
            finally:
                timer.model += time.perf_counter() - t

        def next_token_probs(self, *a, **k):
            t = time.perf_counter()
            try:
                return self.inner.next_token_probs(*a, **k)
            finally:
                timer.model += time.perf_counter() - t

        def close(self):
            self.inner.close()

    def open_timed(spec):
        t = time.perf_counter()
        g = Timed(real_open(spec))
        timer.startup += time.perf_counter() - t
        return g

    def dpo_timed(*a, **k):
        t = time.perf_counter()
        try:
            return real_dpo(*a, **k)
        finally:
            timer.model += time.perf_counter() - t

    sr.open_generator, sr.run_dpo = open_timed, dpo_timed
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        self_rewarding_flow(
            run_dir=str(Path(tmp) / "run"), recipe_path=str(REPO / "recipes" / "tiny-self-rewarding.yaml"),
            overrides=["iterations=1", f"prompts.limit={limit}", f"generation.max_tokens={max_tokens}",
                       f"judge.max_tokens={max_tokens}"],
        )
        wall = time.perf_counter() - t0
    sr.open_generator, sr.run_dpo = real_open, real_dpo
    return wall, timer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--skip-iteration", action="store_true")
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

    if not args.skip_iteration:
        wall, timer = timed_iteration(limit=4, max_tokens=32)
        outside = wall - timer.model - timer.startup
        print("\n== one Self-Rewarding iteration through Prefect (vLLM, 4 prompts) ==")
        print(f"wall {wall:.1f}s = model calls {timer.model:.1f}s + engine start {timer.startup:.1f}s "
              f"+ orchestration and I/O {outside:.1f}s")
        print(f"share outside model calls (orchestration and I/O): {100 * outside / wall:.1f}% "
              f"(excluding engine start from the wall: {100 * outside / (wall - timer.startup):.1f}%)")


if __name__ == "__main__":
    main()
