"""`selfalign export`: a run's trained model as a standalone merged model or as its adapter."""

import json

import pytest

from alignment.store import RunStore
from flows.cli import main


@pytest.fixture()
def trained_run(tmp_path, tiny_model_dir):
    """A run directory whose iteration 1 trained a (real, non-trivial) LoRA adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    store = RunStore.create(tmp_path / "run", recipe={"algorithm": "self-rewarding", "model": str(tiny_model_dir)},
                            algorithm="self-rewarding")
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                      task_type="CAUSAL_LM"))
    store.commit_dir(1, "train", lambda tmp: model.save_pretrained(tmp), inputs={}, recipe_hash="x",
                     info={"adapter": "iter_1/train/adapter", "trained": True})
    return store


def test_merged_export_loads_without_peft_and_computes_the_adapted_model(trained_run, tmp_path, capsys):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "exported"
    assert main(["export", str(trained_run.root), "--merged", str(out)]) == 0
    assert "iteration 1" in capsys.readouterr().out
    assert not (out / "adapter_config.json").exists() and (out / "config.json").is_file()
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    base = AutoModelForCausalLM.from_pretrained(json.loads(
        (trained_run.root / "iter_1/train/adapter/adapter_config.json").read_text())["base_model_name_or_path"])
    adapted = PeftModel.from_pretrained(base, trained_run.root / "iter_1/train/adapter").eval()
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-4)


def test_adapter_export_copies_the_adapter(trained_run, tmp_path):
    out = tmp_path / "a"
    assert main(["export", str(trained_run.root), "--iteration", "1", "--adapter", str(out)]) == 0
    assert (out / "adapter_model.safetensors").read_bytes() == \
        (trained_run.root / "iter_1/train/adapter/adapter_model.safetensors").read_bytes()


def test_export_refuses_what_it_cannot_do_in_one_line(trained_run, tmp_path, capsys):
    assert main(["export", str(trained_run.root), "--iteration", "2", "--merged", str(tmp_path / "x")]) == 2
    assert "iteration 2 has not trained a model (trained: 1)" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    assert main(["export", str(trained_run.root), "--adapter", str(tmp_path / "taken")]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nowhere"), "--adapter", str(tmp_path / "y")]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
