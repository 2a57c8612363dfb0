"""The tiny PERL recipe end to end through the real CLI, Prefect, TRL (RM + PPO), vLLM (CPU) and the embedded model."""

import json
import math

import pytest

from alignment.store import RunStore
from tests.integration.conftest import REPO, selfalign

pytestmark = pytest.mark.integration

# A few minutes on one core: 24 prompts (3 held out), 12 preference pairs (3 held out), 3 PPO steps of 2
# prompts with one PPO epoch each (4 prompts and 2 epochs took ~44 s a step), short answers.
SHRINK = ["--set", f"reward_model.data.source={REPO / 'data' / 'tiny_preferences.jsonl'}",
          "--set", "prompts.limit=24", "--set", "reward_model.data.limit=12", "--set", "ppo.steps=3",
          "--set", "ppo.batch_size=2", "--set", "ppo.num_ppo_epochs=1",
          "--set", "ppo.response_length=16", "--set", "eval.max_tokens=16",
          "--set", "engine.adapters=lora"]  # before/after eval on one engine (the SR run covers merged serving)


@pytest.fixture(scope="module")
def perl_run(tmp_path_factory, prefect_harness):
    run_dir = tmp_path_factory.mktemp("perl") / "run"
    proc = selfalign("run", "recipes/tiny-perl.yaml", "--run-dir", str(run_dir), *SHRINK, shared_prefect=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return RunStore.open(run_dir), proc.stdout + proc.stderr


def test_lora_reward_model_and_lora_ppo(perl_run):
    store, _ = perl_run
    metrics = json.loads((store.root / "iter_1" / "metrics.json").read_text())
    rm = metrics["reward_model"]
    assert rm["heldout_pairs"] > 0 and rm["heldout_accuracy"] is not None
    assert 0 < rm["trainable"]["share"] < 0.02  # LoRA on q/k/v/o + the score head of a 135M model
    ppo = metrics["ppo"]
    assert [p["step"] for p in ppo["curve"]] == [1, 2, 3] and 0 < ppo["trainable_policy"]["share"] < 0.02
    assert all(math.isfinite(p["reward"]) and math.isfinite(p["kl"]) for p in ppo["curve"])
    adapter = store.root / "iter_1" / "ppo" / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM" and set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    ev = metrics["eval"]
    assert ev["prompts"] == 3 and ev["reward_before"] is not None and ev["reward_after"] is not None


def test_resume_skips_every_stage(perl_run):
    store, _ = perl_run
    proc = selfalign("resume", str(store.root), shared_prefect=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    skipped = {e["stage"] for e in store.events() if e["event"] == "skip"}
    assert {"prompts", "preferences", "reward_model", "ppo", "eval"} <= skipped
