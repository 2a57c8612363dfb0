"""The tiny Self-Rewarding recipe through the real CLI, Prefect, vLLM (CPU) and the embedded model."""

import json

import pyarrow.parquet as pq
import pytest

from alignment.store import RunStore
from tests.integration.conftest import SR_RECIPE, selfalign

pytestmark = pytest.mark.integration


@pytest.fixture
def vllm_run(sr_vllm_run):
    """The session's tiny Self-Rewarding run on vLLM (tests/integration/conftest.py)."""
    return sr_vllm_run


def test_two_iterations_with_vllm_train_and_chain(vllm_run):
    store, out = vllm_run
    assert "adapter:" in out and "run directory:" in out and "Prefect UI:" in out
    m1 = json.loads((store.iter_dir(1) / "metrics.json").read_text())
    m2 = json.loads((store.iter_dir(2) / "metrics.json").read_text())
    # The tiny recipe must score >= 95% of judgments on the embedded model, or the demo trains on nothing.
    assert m1["judge"]["scored_share"] >= 0.95 and m2["judge"]["scored_share"] >= 0.95
    assert m1["pairs"]["pairs"] > 0 and m1["train"]["trained"]
    adapter1 = store.root / m1["train"]["adapter"]
    assert str(adapter1) in m2["model"]  # iteration 2 generated and judged with M_2 = base + adapter_1
    assert store.run_info()["algorithm"] == "self-rewarding"


def test_trained_adapter_loads_and_generates(vllm_run, embedded_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    store, _ = vllm_run
    adapter = store.root / json.loads((store.iter_dir(1) / "metrics.json").read_text())["train"]["adapter"]
    tok = AutoTokenizer.from_pretrained(embedded_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(embedded_dir), adapter)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_both_backends_write_the_same_schema(vllm_run, tiny_model_dir, tmp_path):
    """The same recipe on the transformers backend writes the vLLM run's table schemas. A schema
    does not depend on the weights, so the tiny random model stands in for the embedded one (with
    min_digit_mass 0: its digit mass is tiny, and a table of failed judgments would have no pairs),
    and the run stops once its pairs are committed: training writes no table compared here."""
    store, _ = vllm_run
    run_dir = tmp_path / "hf"
    proc = selfalign("run", str(SR_RECIPE), "--run-dir", str(run_dir), "--set", f"model={tiny_model_dir}",
                     "--set", "engine.backend=transformers", "--set", "iterations=1", "--set", "prompts.limit=2",
                     "--set", "generation.max_tokens=8", "--set", "judge.max_tokens=8",
                     "--set", "judge.min_digit_mass=0",
                     env_extra={"SELFALIGN_CRASH_AT": "iter1/pairs/after_commit", "SELFALIGN_CRASH_SIGNAL": "SIGTERM"})
    assert proc.returncode == 143, proc.stdout[-3000:] + proc.stderr[-3000:]
    hf = RunStore.open(run_dir)
    assert hf.read_rows(1, "pairs"), "the transformers run formed pairs: its pairs schema is a real table's"
    for stage in ("prompts", "generate", "judge", "pairs"):
        a = pq.read_schema(store.stage_dir(1, stage) / "data.parquet")
        b = pq.read_schema(hf.stage_dir(1, stage) / "data.parquet")
        assert a.remove_metadata() == b.remove_metadata(), stage
