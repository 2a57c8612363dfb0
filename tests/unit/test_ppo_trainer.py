"""The PPO loop of our own (alignment.ppo_trainer): its pure helpers, one base for every role, and
resume: a job stopped after a checkpoint and resumed gives bit-identical adapters (transformers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignment.generation import derive_seed
from alignment.ppo_trainer import (fill_failed, pad_batch, response_tokens, rollout_seed, step_prompts,
                                   update_config, update_permutation)


# ------------------------------------------------------------------------------ pure helpers
def test_step_prompts_walk_seeded_epochs():
    # 5 prompts, batches of 2: steps 1-2 and half of step 3 are epoch 0, the rest epoch 1.
    seq = [i for step in range(1, 6) for i in step_prompts(5, 2, step, seed=7)]
    assert sorted(seq[:5]) == [0, 1, 2, 3, 4] and sorted(seq[5:10]) == [0, 1, 2, 3, 4]
    assert step_prompts(5, 2, 3, seed=7) == seq[4:6]  # a step's prompts depend on (seed, step) only
    assert [step_prompts(50, 50, 1, seed=s) for s in (7, 8)][0] != step_prompts(50, 50, 1, seed=8)


def test_rollout_seed_is_derived_from_seed_step_and_prompt():
    assert rollout_seed(3, 2, "p1") == derive_seed(3, "ppo-rollout", 2, "p1")
    assert rollout_seed(3, 2, "p1", 1) == derive_seed(3, "ppo-rollout", 2, "p1", 1) != rollout_seed(3, 2, "p1")


def test_update_permutation_is_seeded_per_step():
    a, b = update_permutation(0, 1), update_permutation(0, 1)
    assert [a(6) for _ in range(3)] == [b(6) for _ in range(3)]
    assert sorted(a(6)) == list(range(6))


class _Tok:
    eos_token_id = 99

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [len(w) for w in text.split()]}


def test_response_tokens_append_eos_only_when_the_engine_stopped_early():
    tok = _Tok()
    assert response_tokens(tok, "ab cde", n_tokens=2, max_tokens=5) == [2, 3, 99]  # stopped at EOS
    assert response_tokens(tok, "a b c d e", n_tokens=5, max_tokens=5) == [1, 1, 1, 1, 1]  # cut at the limit
    assert response_tokens(tok, "a b c d e f", n_tokens=5, max_tokens=5) == [1, 1, 1, 1, 1]  # retokenized longer
    assert response_tokens(tok, "", n_tokens=0, max_tokens=5) == [99]
    assert response_tokens(tok, "", n_tokens=5, max_tokens=5) == [99]  # nothing decodable: ended


def test_pad_batch_left_pads_queries_and_right_pads_responses():
    out = pad_batch([[1, 2], [3]], [[4], [5, 6, 7]], pad_token_id=0)
    assert out.tolist() == [[1, 2, 4, 0, 0], [0, 3, 5, 6, 7]]


def test_failed_rewards_get_the_mean_of_the_others():
    assert fill_failed([1.0, None, 3.0]) == [1.0, 2.0, 3.0]
    assert fill_failed([None, None]) == [0.0, 0.0]


def test_update_config_takes_the_spec_fields():
    from alignment.perl_training import PPOSpec

    cfg = update_config(PPOSpec(base="b", prompts="p", output_dir="", checkpoint_dir="", kl_coef=0.3, lam=0.5))
    assert cfg.kl_coef == 0.3 and cfg.lam == 0.5 and cfg.num_ppo_epochs == 4


# ------------------------------------------------------------------------------ on the tiny model
def _prompts(tmp_path: Path, n: int = 3) -> Path:
    p = tmp_path / "prompts.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"Say something about {i}.", "prompt_id": f"p{i}"}) + "\n"
                         for i in range(n)))
    return p


REWARDS = """
def length(prompt, response):
    return len(response) / 10.0


def flaky(prompt, response):
    if prompt.endswith("1."):
        raise RuntimeError("API down")
    return 1.0
"""


def _rewards(tmp_path: Path, name: str) -> str:
    path = tmp_path / "ppo_rewards.py"
    path.write_text(REWARDS)
    return f"{path}:{name}"


def _adapters(out: Path) -> dict[str, bytes]:
    return {f: (out / f).read_bytes() for f in ("adapter_model.safetensors", "value/adapter_model.safetensors",
                                                 "value/value_head.safetensors")}


def test_resumed_job_is_bit_identical_to_an_uninterrupted_one(tmp_path, tiny_model_dir, monkeypatch):
    import alignment.ppo_trainer as ppo_trainer
    from alignment.perl_training import PPOSpec, train_ppo

    # Two mini-batches, two epochs, a batch larger than the prompt file (a prompt twice in a step),
    # a reward that depends on the response: every part of the state matters for step 3.
    common = dict(base=str(tiny_model_dir), prompts=str(_prompts(tmp_path)), steps=3, batch_size=4,
                  num_mini_batches=2, num_ppo_epochs=2, response_length=5, save_steps=1, learning_rate=1e-2,
                  reward_function=_rewards(tmp_path, "length"), missing_eos_penalty=0.5, crash_prefix="t")
    whole = train_ppo(PPOSpec(**common, output_dir=str(tmp_path / "a"), checkpoint_dir=str(tmp_path / "ack")))
    assert [p["step"] for p in whole["curve"]] == [1, 2, 3] and whole["rollout_backend"] == "transformers"

    class Killed(Exception):
        pass

    def crash(name):
        if name == "t/saved2":
            raise Killed(name)

    monkeypatch.setattr(ppo_trainer, "crash_point", crash)
    with pytest.raises(Killed):
        train_ppo(PPOSpec(**common, output_dir=str(tmp_path / "b"), checkpoint_dir=str(tmp_path / "bck")))
    assert (tmp_path / "bck" / "step-2" / "rng.pt").is_file() and not (tmp_path / "b" / "adapter_model.safetensors").exists()
    resumed = train_ppo(PPOSpec(**common, output_dir=str(tmp_path / "b"), checkpoint_dir=str(tmp_path / "bck")))
    assert resumed["resumed_from"].endswith("step-2") and len(resumed["step_seconds"]) == 1
    assert resumed["curve"] == whole["curve"]
    assert _adapters(tmp_path / "b") == _adapters(tmp_path / "a")
    assert whole["curve"][-1]["policy_loss"] != 0.0


def test_one_base_carries_policy_value_and_reward(tmp_path, tiny_model_dir):
    """Reward adapter + head = the trained RM's scores; reference = base logits; value starts as the RM."""
    from alignment.perl_training import (PPOSpec, RMSpec, load_reward_model, load_tokenizer, rm_input_ids,
                                         train_reward_model)
    from alignment.ppo_trainer import SharedBaseModels
    from transformers import AutoModelForCausalLM

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Q{i}?", "chosen": "Sure, gladly.", "rejected": "no."}) + "\n"
                             for i in range(4)))
    train_reward_model(RMSpec(base=str(tiny_model_dir), train_data=str(pairs), heldout_data=None,
                              output_dir=str(tmp_path / "rm"), checkpoint_dir=str(tmp_path / "rmck"), batch_size=4,
                              max_length=64, learning_rate=1e-2))
    tok = load_tokenizer(str(tiny_model_dir))
    spec = PPOSpec(base=str(tiny_model_dir), prompts="", output_dir="", checkpoint_dir="",
                   reward_adapter=str(tmp_path / "rm"))
    models = SharedBaseModels(spec, tok.pad_token_id, "cpu")
    ids = [rm_input_ids(tok, "Q1?", "Sure, gladly."), rm_input_ids(tok, "Q2?", "no.")]
    batch = pad_batch([x[:-2] for x in ids], [x[-2:] for x in ids], tok.pad_token_id)
    last = torch.tensor([batch.shape[1] - 1] * 2)
    rm = load_reward_model(str(tiny_model_dir), str(tmp_path / "rm"), tok)
    expected = [float(rm(input_ids=torch.tensor([x])).logits[0, 0]) for x in ids]
    with torch.no_grad():
        got = models.reward_scores(batch, last).tolist()
        assert got == pytest.approx(expected, abs=1e-5)
        assert models.values(batch)[:, -1].tolist() == pytest.approx(expected, abs=1e-5)  # value := RM at start
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
        ref = models.reference_logits(batch)
        from alignment.ppo import model_inputs

        assert torch.allclose(ref, base(**model_inputs(batch, tok.pad_token_id)).logits, atol=1e-5)
        # The fresh policy adapter (LoRA B = 0) is the base too.
        assert torch.allclose(models.policy_logits(batch), ref, atol=1e-5)
    share = models.trainable_share()
    assert 0 < share["policy"]["share"] < 0.5 and share["value"]["trainable"] > share["policy"]["trainable"] - 1
    # Only policy and value train: the reward adapter and head stay frozen.
    frozen = [n for n, p in models.peft.named_parameters() if ".reward." in n]
    assert frozen and not any(p.requires_grad for n, p in models.peft.named_parameters() if ".reward." in n)
    assert all(p.requires_grad for p in models.trainable)


def test_failed_reward_calls_are_counted_then_stop_the_job(tmp_path, tiny_model_dir):
    from alignment.perl_training import PPOSpec, train_ppo
    from alignment.ppo_trainer import TooManyFailedRewards

    # 3 prompts, 3 per step: "... 1." fails once per step (1 of 3 rollouts).
    common = dict(base=str(tiny_model_dir), prompts=str(_prompts(tmp_path)), steps=2, batch_size=3, num_ppo_epochs=1,
                  response_length=4, save_steps=1, reward_function=_rewards(tmp_path, "flaky"))
    ok = train_ppo(PPOSpec(**common, output_dir=str(tmp_path / "a"), checkpoint_dir=str(tmp_path / "ack"),
                           max_failed_share=0.5))
    assert ok["failed_rewards"] == 2 and ok["rollouts"] == 6 and [p["failed_rewards"] for p in ok["curve"]] == [1, 1]
    assert [p["reward"] for p in ok["curve"]] == [1.0, 1.0]  # the failed row scored with the others' mean
    with pytest.raises(TooManyFailedRewards, match="failed on 1 of 3 rollouts"):
        train_ppo(PPOSpec(**common, output_dir=str(tmp_path / "b"), checkpoint_dir=str(tmp_path / "bck")))


def test_transformers_rollouts_sample_from_the_trainers_own_base(tmp_path, tiny_model_dir, monkeypatch):
    """One base in the job: the transformers engine samples from the trainer's model with the live
    policy adapter (the old job loaded a second copy of the base for its engine), and gives the
    texts an engine loading the step's saved policy adapter from disk gives."""
    from transformers import AutoModelForCausalLM

    from alignment.generation import EngineSpec, HFGenerator, Sampling
    from alignment.perl_training import PPOSpec, load_tokenizer, train_ppo
    from alignment.ppo_trainer import SharedBaseModels

    loads = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def counted(cls, *args, **kwargs):
        loads.append(args[0] if args else kwargs.get("pretrained_model_name_or_path"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(counted))
    out = train_ppo(PPOSpec(base=str(tiny_model_dir), prompts=str(_prompts(tmp_path)), steps=1, batch_size=2,
                            num_ppo_epochs=1, response_length=4, reward_function=_rewards(tmp_path, "length"),
                            output_dir=str(tmp_path / "a"), checkpoint_dir=str(tmp_path / "ack")))
    assert out["rollout_backend"] == "transformers" and loads == [str(tiny_model_dir)]
    monkeypatch.undo()

    spec = PPOSpec(base=str(tiny_model_dir), prompts="", output_dir="", checkpoint_dir="", reward_function="x:y")
    models = SharedBaseModels(spec, load_tokenizer(str(tiny_model_dir)).pad_token_id, "cpu")
    torch.manual_seed(1)
    with torch.no_grad():  # a policy that differs from the base
        for name, p in models.peft.named_parameters():
            if ".default." in name and "lora_B" in name:
                p.normal_(0.0, 0.5)
    models.save_policy(tmp_path / "policy")
    engine = EngineSpec(base=str(tiny_model_dir), backend="transformers", enable_lora=True)
    convs = [[{"role": "user", "content": f"Say something about {i}."}] for i in range(3)]
    sampling = Sampling(n=1, temperature=1.0, top_p=1.0, max_tokens=6)
    from_disk = HFGenerator(engine).chat(convs, sampling, adapter=str(tmp_path / "policy"), seed=[5, 6, 7])
    shared = HFGenerator(engine, model_for=models.rollout_model).chat(convs, sampling, adapter=str(tmp_path / "policy"),
                                                                      seed=[5, 6, 7])
    base_only = HFGenerator(engine).chat(convs, sampling, seed=[5, 6, 7])
    assert shared == from_disk != base_only
