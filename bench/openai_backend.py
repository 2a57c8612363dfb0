"""The openai backend against in-process vLLM: same prompts, same per-request seeds, side by side.

    .venv/bin/python bench/openai_backend.py [--port 18431] [--data-parallel]

Starts ``selfalign serve-model smollm2-135m --cpu-threads 1`` (the embedded model, one thread), sends
8 prompts x 2 samples x <= 32 tokens and 8 logprob reads through it (``engine.backend: openai``),
stops it, then runs the same requests on an in-process vLLM engine with one thread. Prints whether
the texts and probabilities are identical, and the HTTP path's time / the in-process time.

``--data-parallel`` then starts two servers, each pinned to its own core (``taskset -c`` style), and
sends 16 prompts x 2 samples through the first alone and through both (``engine.base_url`` as a
list): the time with one server / the time with two, and whether the texts are the same.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from alignment.generation import EngineSpec, Sampling, VLLMGenerator  # noqa: E402
from alignment.models import embedded_model_dir  # noqa: E402
from alignment.openai_engine import OpenAIGenerator  # noqa: E402

CANDIDATES = [" 1", " 2", " 3", " 4", " 5"]


def serve(port: int, log: Path, core: int | None = None) -> subprocess.Popen:
    """``selfalign serve-model`` on ``port`` (pinned to ``core`` if given), returned once it prints its base URL."""
    out = open(log, "w")
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve-model", "smollm2-135m", "--port", str(port),
                             "--cpu-threads", "1"], cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                            # not the thread binding an in-process engine of this script put in its environment
                            env={k: v for k, v in os.environ.items() if not k.startswith("VLLM_CPU_")},
                            preexec_fn=None if core is None else (lambda: os.sched_setaffinity(0, {core})))
    while "serving smollm2-135m at" not in log.read_text(errors="replace"):
        if proc.poll() is not None:
            sys.exit(f"serve-model exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(1)
    return proc


def requests(generator):
    """(texts, seconds for the chat call, next-token probabilities) of the fixed requests."""
    convs = [[{"role": "user", "content": f"Tell me about topic {i}."}] for i in range(8)]
    started = time.perf_counter()
    texts = generator.chat(convs, Sampling(n=2, max_tokens=32), seed=list(range(100, 108)))
    seconds = time.perf_counter() - started
    probs = generator.next_token_probs([c + [{"role": "assistant", "content": "Score:"}] for c in convs], CANDIDATES)
    return texts, seconds, probs


def data_parallel(base: str, port: int) -> dict:
    """The same 16 prompts x 2 samples through one server and through two (one core each)."""
    cores = sorted(os.sched_getaffinity(0))
    servers = [serve(port + i, Path(f"/tmp/selfalign-bench-serve-{port + i}.log"), cores[i % len(cores)]) for i in range(2)]
    convs = [[{"role": "user", "content": f"Write a short note about subject {i}."}] for i in range(16)]
    try:
        timed = {}
        for n in (1, 2):
            urls = [f"http://127.0.0.1:{port + i}/v1" for i in range(n)]
            gen = OpenAIGenerator(EngineSpec(base=base, backend="openai", base_url=urls if n > 1 else urls[0],
                                             max_concurrency=8))
            started = time.perf_counter()
            texts = gen.chat(convs, Sampling(n=2, max_tokens=32), seed=list(range(200, 216)))
            timed[n] = (time.perf_counter() - started, texts)
            gen.close()
    finally:
        for server in servers:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait()
    return {"cores": len(cores), "one_server_s": round(timed[1][0], 2), "two_servers_s": round(timed[2][0], 2),
            "1 server / 2 servers": round(timed[1][0] / timed[2][0], 2), "texts_equal": timed[1][1] == timed[2][1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=18431)
    parser.add_argument("--data-parallel", action="store_true", help="also time 1 vs 2 servers")
    args = parser.parse_args()
    base = str(embedded_model_dir())
    server = serve(args.port, Path(f"/tmp/selfalign-bench-serve-{args.port}.log"))
    try:
        http = OpenAIGenerator(EngineSpec(base=base, backend="openai", base_url=f"http://127.0.0.1:{args.port}/v1"))
        a, http_s, pa = requests(http)
        http.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait()
    local = VLLMGenerator(EngineSpec(base=base, backend="vllm", cpu_threads=1, enable_lora=True, max_lora_rank=16))
    b, local_s, pb = requests(local)
    local.close()
    print(json.dumps({
        "texts_equal": sum(x == y for p, q in zip(a, b) for x, y in zip(p, q)), "of": sum(len(p) for p in a),
        "max_prob_diff": max(abs(x[k] - y[k]) for x, y in zip(pa, pb) for k in x),
        "http_s": round(http_s, 2), "inprocess_s": round(local_s, 2), "in-process / http": round(local_s / http_s, 2)}))
    if args.data_parallel:
        print(json.dumps(data_parallel(base, args.port + 10)))


if __name__ == "__main__":
    main()
