"""Trigger a run the way the Prefect UI does: `selfalign serve` serves the deployments, a client
creates a flow run of `self-rewarding/selfalign`, the served runner executes it."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignment.store import RunStore
from tests.conftest import write_recipe

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def test_deployment_run_from_the_api(tmp_path, tiny_model_dir, prompts_file, prefect_harness):
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_model_dir), prompts_file)
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), PREFECT_HOME=str(tmp_path / "prefect"))
    server = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--name", "selfalign"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        from prefect.client.orchestration import get_client

        deadline = time.monotonic() + 120
        with get_client(sync_client=True) as client:
            while True:
                try:
                    client.read_deployment_by_name("self-rewarding/selfalign")
                    break
                except Exception:
                    assert time.monotonic() < deadline and server.poll() is None, "deployment never appeared"
                    time.sleep(1)
        flow_run = run_deployment(
            "self-rewarding/selfalign",
            parameters={"run_dir": str(tmp_path / "run"), "recipe_path": str(recipe)},
            timeout=600,
        )
        assert flow_run.state.is_completed(), flow_run.state
        store = RunStore.open(tmp_path / "run")
        assert store.manifest(1, "train") is not None
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
