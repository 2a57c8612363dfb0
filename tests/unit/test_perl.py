"""PERL: reward functions, preference data, splits, trainable share, RM + PPO on the tiny model, the flow."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from alignment.config import RecipeError, load_recipe, parse_recipe
from alignment.data import DataError
from alignment.models import ModelError
from alignment.perl import eval_summary
from alignment.perl_data import (
    RewardFunctionError,
    call_reward,
    check_rm_adapter,
    load_reward_function,
    pairs_from_run,
    pairs_from_scores,
    split_by_prompt,
    to_preference_rows,
)
from alignment.perl_training import choose_pad_token, trainable_share

REWARDS = '''
import math
def good(prompt, response):
    return len(response) / 10
def as_int(prompt, response):
    return 3
def as_text(prompt, response):
    return "0.5"
def as_nan(prompt, response):
    return math.nan
def as_bool(prompt, response):
    return True
def boom(prompt, response):
    raise RuntimeError("API down")
not_callable = 4
'''


@pytest.fixture
def rewards_file(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_rewards", None)
    return path


# ------------------------------------------------------------------------------ reward functions
def test_reward_function_loads_from_module_and_file(rewards_file):
    assert load_reward_function("my_rewards:good", probe=True)("p", "abcde") == 0.5
    fn = load_reward_function(f"{rewards_file}:good", probe=True)
    assert call_reward(fn, "p", "0123456789") == 1.0
    assert call_reward(load_reward_function("my_rewards:as_int"), "p", "r") == 3.0  # ints are numbers
    assert load_reward_function("alignment.rewards.vader:reward", probe=True)("p", "I love this, wonderful!") > 0.5


@pytest.mark.parametrize("path, message", [
    ("no_such_module_xyz:f", "cannot import no_such_module_xyz"),
    ("my_rewards:missing", "has no attribute 'missing'"),
    ("my_rewards:not_callable", "is not callable"),
    ("my_rewards", "expected 'module:function'"),
    ("/nope/rewards.py:f", "not found"),
    ("my_rewards:as_text", "returned str '0.5'; expected a float"),
    ("my_rewards:as_nan", "expected a finite float"),
    ("my_rewards:as_bool", "returned bool"),
    ("my_rewards:boom", "raised RuntimeError: API down"),
])
def test_reward_function_errors_name_the_problem(rewards_file, path, message):
    with pytest.raises(RewardFunctionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_reward_function(path, probe=True)


def test_numpy_and_torch_scalars_are_floats():
    import numpy as np
    import torch

    assert call_reward(lambda p, r: np.float32(0.25), "p", "r") == 0.25
    assert call_reward(lambda p, r: torch.tensor(0.5), "p", "r") == 0.5
    with pytest.raises(RewardFunctionError):
        call_reward(lambda p, r: [1.0], "p", "r")


# ------------------------------------------------------------------------------ preference data
def test_preference_rows_from_strings_and_conversations():
    records = [
        {"prompt": "Q1?", "chosen": "good", "rejected": "bad", "__line__": 1},
        {"prompt": [{"role": "user", "content": "Q2?"}], "chosen": [{"role": "assistant", "content": "yes"}],
         "rejected": [{"role": "assistant", "content": "no"}]},
        # TRL implicit prompt: whole conversations
        {"chosen": [{"role": "user", "content": "Q3?"}, {"role": "assistant", "content": "A"}],
         "rejected": [{"role": "user", "content": "Q3?"}, {"role": "assistant", "content": "B"}]},
    ]
    rows = to_preference_rows(records, source="f.jsonl")
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [("Q1?", "good", "bad"), ("Q2?", "yes", "no"),
                                                                         ("Q3?", "A", "B")]
    assert rows[0]["prompt_id"] != rows[1]["prompt_id"]


@pytest.mark.parametrize("record, message", [
    ({"prompt": "q", "rejected": "b"}, "f.jsonl:7: missing field 'chosen'"),
    ({"prompt": "q", "chosen": "a", "rejected": None}, "f.jsonl:7: missing field 'rejected'"),
    ({"prompt": "q", "chosen": "a", "rejected": "  "}, "field 'rejected' is empty"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "are identical"),
    ({"chosen": "a", "rejected": "b"}, "missing field 'prompt'"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "must be text or a list of chat messages"),
])
def test_bad_preference_rows_name_file_and_line(record, message):
    with pytest.raises(DataError, match=message):
        to_preference_rows([record | {"__line__": 7}], source="f.jsonl")


def test_preflight_rejects_bad_preference_file_before_the_run_dir_exists(tmp_path, tiny_model_dir, prompts_file):
    from alignment.runs import open_run

    bad = tmp_path / "prefs.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q2", "chosen": "a"}\n')
    recipe = _write_recipe(tmp_path / "r.yaml", tiny_model_dir, prompts_file, bad)
    with pytest.raises(DataError, match=r"prefs.jsonl:2: missing field 'rejected'"):
        open_run(tmp_path / "run", recipe, [])
    assert not (tmp_path / "run").exists()


def test_preflight_rejects_bad_reward_function(tmp_path, tiny_model_dir, prompts_file, rewards_file):
    from alignment.runs import open_run

    recipe = _write_recipe(tmp_path / "r.yaml", tiny_model_dir, prompts_file, None,
                           **{"reward.source": "function", "reward.function": "my_rewards:as_text"})
    with pytest.raises(RewardFunctionError, match="expected a float"):
        open_run(tmp_path / "run", recipe, [])
    assert not (tmp_path / "run").exists()


def test_recipe_validation_messages(tmp_path):
    base = {"algorithm": "perl", "prompts": {"source": "p.jsonl"}}
    with pytest.raises(RecipeError, match="reward.source 'reward_model' needs a reward_model section"):
        parse_recipe(base)
    with pytest.raises(RecipeError, match="field reward: .*needs reward.function"):
        parse_recipe(base | {"reward": {"source": "function"}})
    with pytest.raises(RecipeError, match="exactly one of source"):
        parse_recipe(base | {"reward_model": {"data": {"source": "x.jsonl", "generate": {"scorer": "a:b"}}}})
    with pytest.raises(RecipeError, match="multiple of num_mini_batches"):
        parse_recipe(base | {"reward_model": {"data": {"source": "x"}}, "ppo": {"batch_size": 3, "num_mini_batches": 2}})
    ok = parse_recipe(base | {"reward": {"source": "function", "function": "m:f"}})
    from alignment.perl import PERL

    assert ok.iterations == 1 and PERL.names() == ["prompts", "preferences", "reward_model", "ppo", "eval"]


def test_shipped_perl_recipes_load():
    root = Path(__file__).resolve().parents[2] / "recipes"
    for name in ("tiny-perl", "paper-perl", "vader-sentiment-perl"):
        recipe, _ = load_recipe(root / f"{name}.yaml")
        assert recipe.algorithm == "perl"


def test_split_by_prompt_is_deterministic_and_groups_prompts():
    rows = [{"prompt_id": f"p{i % 10}", "i": i} for i in range(30)]
    train, held = split_by_prompt(rows, 0.2, seed=0)
    assert len({r["prompt_id"] for r in held}) == 2 and len(train) + len(held) == 30
    assert not {r["prompt_id"] for r in train} & {r["prompt_id"] for r in held}
    assert split_by_prompt(list(reversed(rows)), 0.2, seed=0)[1] == list(reversed(held))
    assert split_by_prompt(rows, 0.0) == (rows, [])
    assert split_by_prompt(rows[:1], 0.5) == (rows[:1], [])


def test_pairs_from_scores_hand_computed():
    rows = [
        {"prompt_id": "a", "prompt": "A", "response": "x", "score": 0.1},
        {"prompt_id": "a", "prompt": "A", "response": "y", "score": 0.9},
        {"prompt_id": "a", "prompt": "A", "response": "z", "score": -0.4},
        {"prompt_id": "b", "prompt": "B", "response": "u", "score": 0.0},
        {"prompt_id": "b", "prompt": "B", "response": "v", "score": 0.0},
    ]
    pairs, stats = pairs_from_scores(rows)
    assert pairs == [{"prompt_id": "a", "prompt": "A", "chosen": "y", "rejected": "z", "chosen_score": 0.9,
                      "rejected_score": -0.4}]
    assert stats == {"prompts": 2, "pairs": 1, "ties": 1}
    assert pairs_from_scores(rows, min_margin=2.0)[0] == []


def test_pairs_per_prompt_pairs_ranks_from_both_ends():
    scores = {"r0": 0.2, "r1": 0.9, "r2": -0.5, "r3": 0.5, "r4": 0.2, "r5": -0.1}
    rows = [{"prompt_id": "a", "prompt": "A", "response": k, "score": v} for k, v in scores.items()]
    pairs, stats = pairs_from_scores(rows, pairs_per_prompt=3)
    # ranked: r1 .9, r3 .5, r0 .2, r4 .2, r5 -.1, r2 -.5 → (r1, r2), (r3, r5), (r0, r4) tied → dropped
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("r1", "r2"), ("r3", "r5")]
    assert stats == {"prompts": 1, "pairs": 2, "ties": 0}
    assert len(pairs_from_scores(rows, pairs_per_prompt=9)[0]) == 2  # at most n // 2 pairs, each sample once
    assert pairs_from_scores(rows)[0] == pairs[:1]
    assert [p["chosen"] for p in pairs_from_scores(rows, pairs_per_prompt=2, min_margin=1.0)[0]] == ["r1"]


def test_eval_summary():
    rows = [{"prompt_id": "a", "policy": "before", "reward": 1.0, "scorer": 0.0, "length": 4},
            {"prompt_id": "a", "policy": "after", "reward": 2.0, "scorer": 0.5, "length": 6},
            {"prompt_id": "b", "policy": "after", "reward": 4.0, "scorer": None, "length": 2}]
    s = eval_summary(rows)
    assert (s["reward_before"], s["reward_after"], s["reward_gain"]) == (1.0, 3.0, 2.0)
    assert (s["scorer_after"], s["scorer_gain"], s["prompts"]) == (0.5, 0.5, 2)


def test_eval_summary_paired_gain():
    def row(pid, policy, score):
        return {"prompt_id": pid, "policy": policy, "reward": 0.0, "scorer": score, "length": 1}

    # a: +0.5; b: +0.5; c: (0.0 + 0.5)/2 - 0.25 = 0.0; d: only "after" scored
    rows = [row("a", "before", 0.0), row("a", "after", 0.5), row("b", "before", -0.5), row("b", "after", 0.0),
            row("c", "before", 0.25), row("c", "after", 0.0), row("c", "after", 0.5), row("d", "after", 1.0)]
    s = eval_summary(rows)
    assert (s["scorer_prompts_better"], s["scorer_prompts_worse"]) == (2, 0)
    lo, hi = s["scorer_gain_ci95"]
    assert lo == 0.0 and hi == 0.5  # resampling {0.5, 0.5, 0.0}: the extremes are all-zero and all-0.5
    assert s["reward_gain_ci95"] == [0.0, 0.0] and s["reward_prompts_better"] == 0
    assert eval_summary(rows) == s  # seeded: same rows, same interval
    one = eval_summary(rows[:2])
    assert one["scorer_gain_ci95"] is None and one["scorer_prompts_better"] == 1


def test_pairs_from_run_applies_review_corrections(tmp_path):
    from alignment.corrections import add_correction
    from alignment.store import RunStore

    store = RunStore.create(tmp_path / "sr", recipe={"algorithm": "self-rewarding"}, algorithm="self-rewarding")
    judge = [{"prompt_id": pid, "prompt": pid, "response_index": k, "response": f"{pid}{k}", "length": 1,
              "judgments": ["j"], "scores": [float(k)], "mean_score": float(k)} for pid in ("p1", "p2") for k in (0, 1)]
    store.write_rows(1, "judge", judge, inputs={}, recipe_hash="x")
    pairs = [{"prompt_id": pid, "prompt": f"question {pid}", "chosen": f"{pid}1", "rejected": f"{pid}0"} for pid in ("p1", "p2")]
    store.write_rows(1, "pairs", pairs, inputs={}, recipe_hash="x")
    add_correction(store, {"iteration": 1, "action": "exclude_pair", "prompt_id": "p1"})
    add_correction(store, {"iteration": 1, "action": "swap", "prompt_id": "p2"})
    rows, info = pairs_from_run(str(store.root))
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [("question p2", "p20", "p21")]
    assert info["iteration"] == 1 and info["corrections_applied"] == 2
    with pytest.raises(DataError, match="iteration 2 has no complete pairs stage"):
        pairs_from_run(str(store.root), 2)


# ------------------------------------------------------------------------------ models
def test_trainable_share_hand_computed():
    import torch.nn as nn

    m = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 1))  # 110 + 11 parameters
    m[0].requires_grad_(False)
    assert trainable_share(m) == {"trainable": 11, "total": 121, "share": 11 / 121}


def test_lora_share_is_small(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"))
    share = trainable_share(model)
    # q,o: 32x32; k,v: 32x16 (2 KV heads of 8); LoRA r=8 adds r*(in+out) per matrix, 2 layers.
    assert share["trainable"] == 2 * 8 * ((32 + 32) * 2 + (32 + 16) * 2)
    assert share["share"] < 0.01


def test_pad_token_is_not_eos_nor_in_the_chat_template(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tok.pad_token == tok.eos_token  # the problem (SmolLM2)
    pad = choose_pad_token(tok)
    assert pad != tok.eos_token and pad not in tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)


def test_rm_adapter_from_another_base_is_refused(tmp_path, tiny_model_dir):
    adapter = tmp_path / "rm"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/other-model", "task_type": "SEQ_CLS"}))
    with pytest.raises(ModelError, match="trained on base model 'org/other-model'"):
        check_rm_adapter(str(adapter), str(tiny_model_dir))
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_model_dir), "task_type": "CAUSAL_LM"}))
    with pytest.raises(ModelError, match="expected SEQ_CLS"):
        check_rm_adapter(str(adapter), str(tiny_model_dir))
    with pytest.raises(ModelError, match="not a PEFT adapter"):
        check_rm_adapter(str(tmp_path), str(tiny_model_dir))


# ------------------------------------------------------------------------------ training (tiny model)
def _pairs(path: Path, n: int, offset: int = 0) -> Path:
    good, bad = ["Sure, here is a clear answer.", "Happy to help with that."], ["no.", "whatever"]
    path.write_text("".join(json.dumps({"prompt": f"Question {i}?", "chosen": good[i % 2], "rejected": bad[i % 2]}) + "\n"
                            for i in range(offset, offset + n)))
    return path


def test_reward_model_then_ppo_on_tiny_model(tmp_path, tiny_model_dir, rewards_file):
    from alignment.perl_config import PerlRecipe
    from alignment.perl_training import PPOSpec, RMSpec, run_job, train_ppo
    from alignment.perl_training import main as perl_training_main

    # The reward model through the stage's launcher: `auto` (the recipe default) trains in this
    # process on CPU, its output going where a trainer subprocess's goes (the job log, step lines).
    (tmp_path / "run.json").write_text("{}")
    ckpt = tmp_path / "iter_1" / "reward_model" / "checkpoints"
    ckpt.mkdir(parents=True)
    lines: list[str] = []
    rm = run_job("rm", RMSpec(
        base=str(tiny_model_dir), train_data=str(_pairs(tmp_path / "t.jsonl", 8)),
        heldout_data=str(_pairs(tmp_path / "h.jsonl", 4, 100)), output_dir=str(tmp_path / "rm"),
        checkpoint_dir=str(ckpt / "trainer"), batch_size=4, max_length=64, learning_rate=1e-3, save_steps=1),
        launcher=PerlRecipe.model_fields["launcher"].default,
        spec_path=ckpt / "spec.json", log=lines.append)
    assert lines[0].startswith("training: rm in this process") and any(line.startswith("rm step 2/2") for line in lines)
    assert "rm step 2/2" in (tmp_path / "logs" / "iter_1-reward_model-rm.log").read_text()
    assert rm["steps"] == 2 and 0 < rm["trainable"]["share"] < 0.01 and rm["heldout_pairs"] == 4
    assert rm["heldout_accuracy"] is not None and 0 <= rm["heldout_accuracy"] <= 1
    assert json.loads((tmp_path / "rm" / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say something about {i}."}) + "\n" for i in range(4)))
    common = dict(base=str(tiny_model_dir), prompts=str(prompts), steps=2, batch_size=2, num_ppo_epochs=1,
                  response_length=6, save_steps=1)
    # PPO as the subprocess launcher runs it: `python -m alignment.perl_training ppo SPEC.json`.
    spec = tmp_path / "ppo_spec.json"
    spec.write_text(json.dumps(asdict(PPOSpec(**common, output_dir=str(tmp_path / "ppo"),
                                              checkpoint_dir=str(tmp_path / "ppock"), reward_adapter=str(tmp_path / "rm")))))
    assert perl_training_main(["ppo", str(spec)]) == 0
    out = json.loads((tmp_path / "ppo" / "train_metrics.json").read_text())
    assert [p["step"] for p in out["curve"]] == [1, 2] and out["trainable_policy"]["share"] < 0.01
    assert all(math.isfinite(p["reward"]) and math.isfinite(p["kl"]) for p in out["curve"])
    assert abs(out["curve"][0]["kl"]) < 1e-3  # step 1 samples from the initial policy: KL to it is ~0
    assert (tmp_path / "ppo" / "adapter_model.safetensors").is_file() and (tmp_path / "ppo" / "value").is_dir()
    # engine.adapters merged (auto on vLLM-CPU) serves the PPO policy from base + policy adapter merged.
    from alignment.models import merge_adapter

    assert (merge_adapter(str(tiny_model_dir), tmp_path / "ppo", tmp_path / "merged") / "config.json").is_file()

    # A reward function in place of the RM: the score it returns is what PPO sees.
    fn = train_ppo(PPOSpec(**common, output_dir=str(tmp_path / "ppof"), checkpoint_dir=str(tmp_path / "ppofck"),
                           reward_function="my_rewards:as_int"))
    assert [p["reward"] for p in fn["curve"]] == [3.0, 3.0]

    # Resume: the job left its step-1 checkpoint (save_steps=1); the same job again resumes there
    # and runs only step 2, continuing the curve (what a killed PPO stage does on `selfalign resume`).
    assert (tmp_path / "ppofck" / "step-1" / "policy" / "adapter_model.safetensors").is_file()
    again = train_ppo(PPOSpec(**common, output_dir=str(tmp_path / "ppof2"), checkpoint_dir=str(tmp_path / "ppofck"),
                              reward_function="my_rewards:as_int"))
    assert again["resumed_from"].endswith("step-1") and [p["step"] for p in again["curve"]] == [1, 2]
    assert len(again["step_seconds"]) == 1


# ------------------------------------------------------------------------------ the flow
def _write_recipe(path: Path, model, prompts: Path, prefs: Path | None, **overrides) -> Path:
    from alignment.config import apply_overrides

    data = {
        "algorithm": "perl", "name": "test-perl", "model": str(model), "seed": 0,
        "prompts": {"source": str(prompts), "heldout_fraction": 0.25},
        "reward_model": {"data": {"source": str(prefs), "heldout_fraction": 0.25}, "batch_size": 2, "max_length": 64,
                         "learning_rate": 1e-3, "save_steps": 1} if prefs else None,
        "ppo": {"steps": 2, "batch_size": 2, "num_ppo_epochs": 1, "response_length": 6, "save_steps": 1},
        "eval": {"max_tokens": 6, "max_prompts": 2},
        "launcher": "inprocess",
        "engine": {"backend": "transformers"},
    }
    if prefs is None:
        del data["reward_model"]
    data = apply_overrides(data, [f"{k}={v}" for k, v in overrides.items()])
    path.write_text(yaml.safe_dump(data))
    return path


def test_perl_flow_end_to_end_and_resume(tmp_path, tiny_model_dir, prompts_file, prefect_harness):
    from flows.perl import perl_flow
    from alignment.store import RunStore

    recipe = _write_recipe(tmp_path / "r.yaml", tiny_model_dir, prompts_file, _pairs(tmp_path / "prefs.jsonl", 8))
    run_dir = tmp_path / "run"
    result = perl_flow(str(run_dir), str(recipe))
    assert list(result)[0] == "run_dir" and Path(result["adapter"], "adapter_model.safetensors").is_file()
    store = RunStore.open(run_dir)
    for stage in ("prompts", "preferences", "reward_model", "ppo", "eval"):
        assert store.manifest(1, stage) is not None, stage
    metrics = json.loads((run_dir / "iter_1" / "metrics.json").read_text())
    assert metrics["reward_model"]["heldout_pairs"] == 2 and len(metrics["ppo"]["curve"]) == 2
    ev = metrics["eval"]
    assert ev["prompts"] == 1 and ev["reward_before"] is not None and ev["reward_after"] is not None
    rows = store.read_rows(1, "eval")
    assert {r["policy"] for r in rows} == {"before", "after"}

    perl_flow(str(run_dir))  # resume with the stored recipe: everything is done
    skipped = [e["stage"] for e in store.events() if e["event"] == "skip"]
    assert {"prompts", "preferences", "reward_model", "ppo", "eval"} <= set(skipped)


def test_generated_preferences_are_sharded_scored_and_ranked(tmp_path, tiny_model_dir, rewards_file):
    from alignment.algorithms import algorithm_run
    from alignment.runs import open_run

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(f'{{"prompt": "Say something about object {i}."}}\n' for i in range(6)))
    recipe = _write_recipe(tmp_path / "r.yaml", tiny_model_dir, prompts, prompts, **{
        "prompts.heldout_fraction": 0.0, "engine.shard_size": 2, "reward_model.data.source": "null",
        "reward_model.data.generate.scorer": f"{rewards_file}:good", "reward_model.data.generate.n": 4,
        "reward_model.data.generate.max_tokens": 8, "reward_model.data.generate.pairs_per_prompt": 2})
    store, cfg = open_run(tmp_path / "run", recipe, [])
    logs: list[str] = []
    run = algorithm_run(store, cfg, log=logs.append)
    try:
        run.run_stage("prompts", 1)
        run.run_stage("preferences", 1)
    finally:
        run.close()
    assert [m for m in logs if "preferences: shard" in m][-1].startswith("iter 1 preferences: shard 3/3")
    info = store.manifest(1, "preferences")["info"]
    rows = store.read_rows(1, "preferences")
    assert info["samples"] == 24 and info["pairs"] == len(rows) > 6  # more than one pair for some prompt
    for r in rows:  # the scorer is len(response) / 10: chosen is the longer answer
        assert r["chosen_score"] == len(r["chosen"]) / 10 > r["rejected_score"] == len(r["rejected"]) / 10
    assert not (store.stage_dir(1, "preferences") / "shards").exists()


def test_summary_markdown_states_the_gain_interval():
    from flows.perl import summary_markdown

    ev = {"prompts": 32, "heldout": True, "scorer": "alignment.rewards.vader:reward", "reward_before": 0.0,
          "reward_after": 0.2, "reward_gain": 0.2, "reward_gain_ci95": [0.1, 0.3], "reward_prompts_better": 30,
          "reward_prompts_worse": 2, "scorer_before": 0.2, "scorer_after": 0.3, "scorer_gain": 0.1,
          "scorer_gain_ci95": [-0.05, 0.25], "scorer_prompts_better": 17, "scorer_prompts_worse": 15,
          "length_before": 30.0, "length_after": 31.0}
    md = summary_markdown({"model": "m", "eval": ev})
    assert "alignment.rewards.vader:reward gain: 0.100, 95% bootstrap interval over prompts [-0.050, 0.250]; " \
           "17 prompts better, 15 worse." in md
    assert "reward gain: 0.200, 95% bootstrap interval over prompts [0.100, 0.300]" in md
    assert "gain:" not in summary_markdown({"model": "m", "eval": ev | {"scorer_gain_ci95": None, "reward_gain_ci95": None}})


@pytest.fixture(scope="module")
def bos_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model with a Llama-style tokenizer: it adds BOS to every encoded text, and its chat
    template starts with BOS too (so text that went through the template must not get another)."""
    import shutil

    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("bos-model")
    for f in tiny_model_dir.iterdir():
        if f.is_file() and not f.name.startswith("tokenizer") and f.name != "chat_template.jinja":
            shutil.copy(f, out / f.name)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir, add_bos_token=True, bos_token="<|endoftext|>")
    tok.chat_template = "{{ bos_token }}" + tok.chat_template
    tok.save_pretrained(out)
    check = AutoTokenizer.from_pretrained(out)
    assert check("hi")["input_ids"][0] == check.bos_token_id and check.bos_token == "<|endoftext|>"
    return out


def test_reward_model_trains_on_the_tokens_it_scores(tmp_path, bos_model_dir, monkeypatch):
    """One tokenization for RM training, RM scoring and PPO: BOS once, then the PPO query, the response, EOS."""
    from trl import RewardTrainer

    from alignment.perl_training import (RMSpec, _seq_cls, _tokenize_prompts, load_tokenizer, rm_scores,
                                         train_reward_model)

    trained = []
    prepare = RewardTrainer._prepare_dataset

    def record(self, dataset, *args, **kw):  # the real preparation; keep what the trainer will train on
        out = prepare(self, dataset, *args, **kw)
        trained.append(out)
        return out

    monkeypatch.setattr(RewardTrainer, "_prepare_dataset", record)
    data = _pairs(tmp_path / "t.jsonl", 2)
    train_reward_model(RMSpec(base=str(bos_model_dir), train_data=str(data), heldout_data=None, output_dir="",
                              checkpoint_dir=str(tmp_path / "ck"), batch_size=2, max_length=128, max_steps=1))
    pair = json.loads(data.read_text().splitlines()[0])
    train_ids = trained[0][0]["chosen_ids"]

    tok = load_tokenizer(str(bos_model_dir))
    scored = []
    model = _seq_cls(str(bos_model_dir), tok.pad_token_id)
    model.register_forward_pre_hook(lambda m, args, kw: scored.append(kw["input_ids"][0].tolist()), with_kwargs=True)
    rm_scores(model, tok, [pair["prompt"]], [pair["chosen"]], max_length=128)

    assert train_ids.count(tok.bos_token_id) == 1 and train_ids[0] == tok.bos_token_id
    assert train_ids == scored[0]
    query = _tokenize_prompts(tok, [pair["prompt"]])[0]
    assert train_ids[:len(query)] == query and train_ids[-1] == tok.eos_token_id



def lora_adapter(where, base_dir, *, zero: bool = True):
    """A fresh PEFT LoRA on q/v. ``zero``: B = 0, so base + adapter computes exactly the base model;
    else B is random too (``init_lora_weights=False``) and the adapter changes the model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", init_lora_weights=zero)
    get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config).save_pretrained(where)
    return where


def eval_with_adapter(tmp_path, model, rewards_file, backend: str, adapter_zero: bool) -> list[dict]:
    """The PERL eval stage of a run whose PPO output is a fresh LoRA (:func:`lora_adapter`): its rows."""
    import shutil

    from alignment.algorithms import algorithm_run
    from alignment.runs import open_run

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(f'{{"prompt": "Say something about object {i}."}}\n' for i in range(8)))
    recipe = _write_recipe(tmp_path / "r.yaml", model, prompts, None, **{
        "prompts.heldout_fraction": 0.5, "reward.source": "function", "reward.function": f"{rewards_file}:good",
        "eval.max_prompts": 4, "eval.samples": 2, "eval.temperature": 1.0, "eval.top_p": 1.0, "eval.max_tokens": 12,
        "engine.backend": backend})
    store, cfg = open_run(tmp_path / "run", recipe, [])
    run = algorithm_run(store, cfg, log=lambda _: None)
    run.run_stage("prompts", 1)
    adapter = lora_adapter(tmp_path / "adapter", model, zero=adapter_zero)
    store.commit_dir(1, "ppo", lambda tmp: [shutil.copy(f, tmp / f.name) for f in adapter.iterdir()],
                     inputs={}, recipe_hash="x")
    try:
        run.run_stage("eval", 1)
    finally:
        run.close()
    return store.read_rows(1, "eval")


def before_and_after(rows: list[dict]) -> tuple[dict, dict]:
    """{(prompt id, sample): response} of the eval's before and after policies."""
    answers = {(r["policy"], r["prompt_id"], r["sample"]): r["response"] for r in rows}
    return ({k[1:]: v for k, v in answers.items() if k[0] == "before"},
            {k[1:]: v for k, v in answers.items() if k[0] == "after"})


@pytest.mark.parametrize("backend", ["transformers", pytest.param("vllm", marks=pytest.mark.integration)])
def test_eval_before_and_after_differ_only_by_the_adapter(tmp_path, request, rewards_file, backend):
    """The eval's claim: before and after sample with the same random numbers, so with a PPO adapter
    that changes nothing (LoRA B = 0) every before answer equals its after answer."""
    model = request.getfixturevalue("tiny_model_dir" if backend == "transformers" else "tiny_vllm_model_dir")
    before, after = before_and_after(eval_with_adapter(tmp_path, model, rewards_file, backend, adapter_zero=True))
    assert len(before) == 8 and before == after
    assert len(set(before.values())) > 1  # sampled (temperature 1), not one fixed answer


def test_eval_answers_change_with_an_adapter_that_changes_the_model(tmp_path, tiny_model_dir, rewards_file):
    """The other half of the claim: the after answers are the PPO adapter's. (An embedded-model run
    of a few PPO steps may still print the same reward before and after: its LoRA B is ~1e-4 and the
    same random numbers then draw the same tokens.)"""
    before, after = before_and_after(eval_with_adapter(tmp_path, tiny_model_dir, rewards_file, "transformers",
                                                       adapter_zero=False))
    assert len(before) == 8 and any(before[k] != after[k] for k in before)
