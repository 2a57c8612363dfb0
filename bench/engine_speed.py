"""vLLM-CPU engine speed: thread binding, and serving an adapter per request vs merged.

    .venv/bin/python bench/engine_speed.py [--prompts 32] [--n 2]

Each configuration runs in its own process (vLLM reads its CPU binding from the environment when
the engine starts), one after another in this run, on the embedded model:

1. generation, ``--prompts`` prompts x ``--n`` samples x 96 tokens: vLLM's default binding
   (``VLLM_CPU_OMP_THREADS_BIND=auto``, one core reserved) vs the project's (every usable core,
   none reserved); tokens/s and the ratio.
2. judging, judge-length prompts x ``--n`` samples x 64 tokens, the way iteration 1 (the base) and
   iteration 2 (base + the iteration-1 LoRA adapter, r=8 on q/k/v/o as the tiny recipe trains)
   use the engine: ``lora`` (one engine with LoRA enabled; the adapter per request) vs ``merged``
   (an engine on the base, then one on the merged checkpoint). The adapter is PEFT's initial one
   (B = 0): its outputs equal the base's, so both iterations generate the same tokens and the
   time ratio is the cost of serving the adapter. Prints iteration-2 / iteration-1 judge time per
   mode, and the merge + engine restart that ``merged`` pays once per iteration.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RESPONSE = ("Here is a short answer. First, consider what the question asks and the facts that bear on it. "
            "Then weigh the options one by one, and finally give a clear recommendation with a reason.")


def questions(n: int) -> list[str]:
    from alignment.data import load_prompts

    rows = load_prompts(str(REPO / "data" / "neutral_prompts.jsonl"))
    return [r["prompt"] for r in (rows * (n // len(rows) + 1))[:n]]


def timed_chat(gen, convs, sampling, adapter=None) -> tuple[float, int]:
    from alignment.generation import derive_seed

    gen.chat(convs[:2], sampling, adapter=adapter, seed=[1, 2])  # warm-up (and the first LoRA load)
    t0 = time.perf_counter()
    out = gen.chat(convs, sampling, adapter=adapter, seed=[derive_seed(0, i) for i in range(len(convs))])
    return time.perf_counter() - t0, sum(c.n_tokens for per in out for c in per)


def worker(config: str, prompts: int, n: int, adapter: str) -> dict:
    from alignment.adapter_serving import MergedAdapters
    from alignment.generation import EngineSpec, Sampling, open_generator
    from alignment.judge import judge_prompt
    from alignment.models import merge_adapter, resolve

    base = resolve("smollm2-135m").base
    spec = EngineSpec(base=base, backend="vllm", enable_lora=config == "judge-lora", max_lora_rank=8)
    if config.startswith("gen"):
        gen = open_generator(spec)
        convs = [[{"role": "user", "content": q}] for q in questions(prompts)]
        seconds, tokens = timed_chat(gen, convs, Sampling(n=n, max_tokens=96))
        return {"seconds": seconds, "tokens": tokens}
    convs = [[{"role": "user", "content": judge_prompt(q, RESPONSE)}] for q in questions(prompts)]
    sampling = Sampling(n=n, max_tokens=64)
    merge_s = []

    def merged_dir(a):
        t0 = time.perf_counter()
        out = merge_adapter(base, a, Path(tempfile.mkdtemp()) / "merged")
        merge_s.append(time.perf_counter() - t0)
        return str(out)

    t0 = time.perf_counter()
    gen = open_generator(spec) if config == "judge-lora" else MergedAdapters(spec, merged_dir, log=lambda _: None)
    it1 = timed_chat(gen, convs, sampling)
    start1 = time.perf_counter() - t0 - it1[0]
    t0 = time.perf_counter()
    it2 = timed_chat(gen, convs, sampling, adapter=adapter)
    switch = time.perf_counter() - t0 - it2[0]  # merged: merge + engine restart (+ warm-up), lora: warm-up
    gen.close()
    return {"it1": it1, "it2": it2, "start_s": start1, "switch_s": switch, "merge_s": sum(merge_s)}


def make_adapter(where: Path) -> str:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from alignment.models import resolve

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(resolve("smollm2-135m").base),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                      task_type="CAUSAL_LM"))
    model.save_pretrained(where)
    return str(where)


def run(config: str, args, adapter: str, env: dict) -> dict:
    result = Path(tempfile.mkdtemp()) / "result.json"  # not stdout: vLLM logs there
    cmd = [sys.executable, __file__, "--worker", config, "--prompts", str(args.prompts), "--n", str(args.n),
           "--adapter", adapter, "--out", str(result)]
    out = subprocess.run(cmd, env=dict(os.environ, **env), capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{config} failed:\n{out.stderr[-3000:]}")
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--worker")
    parser.add_argument("--adapter")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.worker:
        Path(args.out).write_text(json.dumps(worker(args.worker, args.prompts, args.n, args.adapter)))
        return
    adapter = make_adapter(Path(tempfile.mkdtemp()) / "adapter")
    vllm_default = {"VLLM_CPU_OMP_THREADS_BIND": "auto", "VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}
    gen_default = run("gen", args, adapter, vllm_default)
    gen_ours = run("gen", args, adapter, {})
    print(f"\n== generation: {args.prompts} prompts x {args.n} samples x <= 96 tokens, embedded model, "
          f"{len(os.sched_getaffinity(0))} usable cores ==")
    print(f"{'binding':<40}{'tokens':>8}{'seconds':>10}{'tokens/s':>10}")
    for name, r in (("vLLM default (auto, 1 core reserved)", gen_default), ("every usable core (selfalign)", gen_ours)):
        print(f"{name:<40}{r['tokens']:>8}{r['seconds']:>10.1f}{r['tokens'] / r['seconds']:>10.1f}")
    speedup = (gen_ours["tokens"] / gen_ours["seconds"]) / (gen_default["tokens"] / gen_default["seconds"])
    print(f"tokens/s, every core / default: {speedup:.2f}x")

    lora, merged = run("judge-lora", args, adapter, {}), run("judge-merged", args, adapter, {})
    print(f"\n== judging: {args.prompts} judge prompts x {args.n} samples x <= 64 tokens; iteration 1 = base, "
          "iteration 2 = base + LoRA r=8 ==")
    print(f"{'adapters':<10}{'it1 s':>8}{'it1 tok/s':>11}{'it2 s':>8}{'it2 tok/s':>11}{'it2/it1':>9}"
          f"{'switch s':>10}{'(merge s)':>11}")
    for name, r in (("lora", lora), ("merged", merged)):
        (s1, k1), (s2, k2) = r["it1"], r["it2"]
        print(f"{name:<10}{s1:>8.1f}{k1 / s1:>11.1f}{s2:>8.1f}{k2 / s2:>11.1f}{s2 / s1:>9.2f}"
              f"{r['switch_s']:>10.1f}{r['merge_s']:>11.1f}")
    ratio = (merged["it2"][1] / merged["it2"][0]) / (lora["it2"][1] / lora["it2"][0])
    print(f"iteration-2 judge tokens/s, merged / lora: {ratio:.2f}x "
          f"(switch = merge + engine restart, paid once per iteration)")


if __name__ == "__main__":
    main()
