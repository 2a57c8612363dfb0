"""The review gate pauses the real flow before training until a decision arrives through Prefect."""

import contextvars
import threading
import time

import pytest

from alignment.review_urls import iteration_path
from alignment.store import RunStore
from tests.conftest import write_recipe


def _paused_run(started: float, outcome: dict, timeout: float = 240):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterStateName

    with get_client(sync_client=True) as client:
        while time.monotonic() - started < timeout:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(state=dict(name=FlowRunFilterStateName(any_=["Paused"]))))
            if runs:
                return runs[0]
            assert "error" not in outcome and "result" not in outcome, f"flow ended without pausing: {outcome}"
            time.sleep(0.5)
    raise AssertionError("flow never paused")


@pytest.mark.parametrize("decision", ["approve", "stop"])
def test_gate_waits_for_the_reviewer(decision, tmp_path, tiny_model_dir, prompts_file, prefect_harness):
    from prefect.flow_runs import resume_flow_run

    from flows.self_rewarding import self_rewarding_flow

    # release_engine: the paused run must not hold the engine (on a GPU, its memory) while it waits.
    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_model_dir), prompts_file,
                          **{"review.gate": "true", "review.timeout_s": 300, "train.release_engine": "true"})
    outcome: dict = {}

    def target():
        try:
            outcome["result"] = self_rewarding_flow(run_dir=str(tmp_path / "run"), recipe_path=str(recipe))
        except BaseException as err:  # noqa: BLE001 - reported to the test thread
            outcome["error"] = err

    ctx = contextvars.copy_context()  # the Prefect test harness settings live in context vars
    thread = threading.Thread(target=ctx.run, args=(target,))
    started = time.monotonic()
    thread.start()
    paused = _paused_run(started, outcome)
    store = RunStore.open(tmp_path / "run")
    assert store.manifest(1, "pairs") is not None and store.manifest(1, "train") is None  # paused before training
    names = [e["event"] for e in store.events()]
    assert "engine_released" in names and names.index("engine_released") < names.index("review_wait"), names
    # The link the gate shows is a page the review app serves (its routes come from the same module).
    wait = next(e for e in store.events() if e["event"] == "review_wait")
    assert wait["url"].endswith(iteration_path(1)), wait
    resume_flow_run(paused.id, run_input={"decision": decision, "note": "looked at 3 prompts"})
    thread.join(timeout=300)
    events = [e for e in store.events() if e["event"] == "review_decision"]
    assert events and events[-1]["decision"] == decision
    if decision == "approve":
        assert "error" not in outcome, outcome.get("error")
        assert store.manifest(1, "train") is not None
    else:
        assert "reviewer stopped" in str(outcome["error"])
        assert store.manifest(1, "train") is None
