"""Multi-process DPO training (``train.launcher: accelerate``): two real processes over gloo on CPU
train on the same batches as one process at the same effective batch, rank 0 alone writes and
speaks; the launch fields refuse what cannot run, in one line, before anything starts."""

import json
from pathlib import Path

import pytest

from alignment.config import RecipeError, TrainConfig, load_recipe
from alignment.launch import accelerate_config_file, accelerate_prefix, run_dpo, training_setup_problems
from alignment.training import DPOSpec, per_device_batch, resume_key
from tests.conftest import write_recipe

# 16 distinct pairs: 4 optimizer steps of 4 rows.
PAIRS = [{"prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f"It is {2 * i}.",
          "rejected": f"I do not know, maybe {i}{i}."} for i in range(16)]


def _spec(tmp_path, tiny_model_dir, name: str, **kw) -> DPOSpec:
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    return DPOSpec(base=str(tiny_model_dir), data=str(data), output_dir=str(tmp_path / name / "out"),
                   checkpoint_dir=str(tmp_path / name / "ckpt"), batch_size=4, learning_rate=5e-3, max_length=64,
                   save_steps=2, lora={"r": 8, "alpha": 16, "dropout": 0.0,  # no dropout: no per-rank randomness
                                       "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}, **kw)


def _adapter(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory, tiny_model_dir):
    """The same DPO job in this process and as ``accelerate launch`` over 2 processes."""
    tmp = tmp_path_factory.mktemp("ddp")
    out = {}
    for name, launcher, n in (("one", "inprocess", 1), ("two", "accelerate", 2)):
        spec = _spec(tmp, tiny_model_dir, name, num_processes=n)
        (tmp / name).mkdir()
        lines = []
        metrics = run_dpo(spec, launcher=launcher, spec_path=tmp / name / "spec.json", log=lines.append)
        out[name] = (spec, metrics, lines)
    return out


def test_two_processes_follow_the_one_process_loss_curve(one_and_two):
    (_, one, _), (_, two, _) = one_and_two["one"], one_and_two["two"]
    assert one["steps"] == two["steps"] == 4
    for a, b in zip(one["curve"], two["curve"], strict=True):
        assert a["step"] == b["step"]
        for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-4), (a["step"], key)
    assert one["curve"][-1]["loss"] < one["curve"][0]["loss"]  # it learnt: the comparison is not of two flat lines


def test_two_processes_save_the_same_adapter_once(one_and_two):
    import torch

    (spec1, _, _), (spec2, metrics, lines) = one_and_two["one"], one_and_two["two"]
    a, b = _adapter(Path(spec1.output_dir)), _adapter(Path(spec2.output_dir))
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4), k
    # rank 0 speaks: one line per step, not one per process
    steps = [line for line in lines if line.startswith("step ")]
    assert [s.split()[1] for s in steps] == ["1/4", "2/4", "3/4", "4/4"], lines
    assert any("accelerate.commands.launch --num_processes 2" in line for line in lines)
    assert metrics["trained_rows"] == 16
    ckpt = Path(spec2.checkpoint_dir)
    assert (ckpt / "resume_key").read_text().strip() == resume_key(spec2)
    assert sorted(p.name for p in ckpt.glob("checkpoint-4/rng_state*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]


def test_the_process_count_is_in_the_resume_key_only_beyond_one(tmp_path, tiny_model_dir):
    spec = _spec(tmp_path, tiny_model_dir, "k")
    old_style = resume_key(spec)
    assert resume_key(DPOSpec(**{**spec.__dict__, "num_processes": 2})) != old_style
    assert resume_key(DPOSpec(**{**spec.__dict__, "gradient_checkpointing": True})) == old_style


def test_per_device_batch():
    assert per_device_batch(8, 1) == 8 and per_device_batch(8, 4) == 2
    with pytest.raises(ValueError):
        per_device_batch(6, 4)


def test_accelerate_command():
    cmd = accelerate_prefix(2, None)
    assert cmd[1:] == ["-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
                       "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    assert "--multi_gpu" not in accelerate_prefix(1, None)
    zero3 = accelerate_prefix(8, "zero3")
    assert zero3[3:] == ["--num_processes", "8", "--num_machines", "1", "--config_file", str(accelerate_config_file("zero3"))]
    assert accelerate_config_file("zero3").is_file() and accelerate_config_file("my/own.yaml").as_posix() == "my/own.yaml"


@pytest.mark.parametrize("override, message", [
    (["train.num_processes=2"], "field train.num_processes: needs train.launcher 'accelerate'"),
    (["train.launcher=accelerate", "train.num_processes=3"],
     "field train.batch_size: 2 does not split over train.num_processes 3"),
    (["train.launcher=accelerate", "train.accelerate_config=zero4"],
     "field train.accelerate_config: 'zero4' is neither a shipped config (fsdp, zero2, zero3)"),
])
def test_bad_launch_fields_are_one_line(tmp_path, tiny_model_dir, prompts_file, override, message):
    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_model_dir), prompts_file)
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe, override)
    assert f"r.yaml: {message}" in str(err.value) and "\n" not in str(err.value)


def test_what_this_machine_cannot_run_is_refused_before_the_run(tmp_path, tiny_model_dir, prompts_file):
    cpu = lambda **kw: training_setup_problems(TrainConfig(**kw), on_gpu=False)  # noqa: E731
    assert cpu(launcher="accelerate", num_processes=2) == []
    assert cpu(launcher="accelerate", accelerate_config="fsdp") == [
        "field train.accelerate_config: fsdp.yaml is FSDP, which needs CUDA GPUs (on CPU leave it out: several "
        "processes are DDP over gloo)"]
    assert cpu(load_in_4bit=True) == ["field train.load_in_4bit: QLoRA's 4-bit base needs a CUDA GPU (bitsandbytes)"]
    missing = cpu(launcher="accelerate", accelerate_config=str(tmp_path / "nope.yaml"))
    assert missing[0].startswith("field train.accelerate_config: cannot read") and "nope.yaml" in missing[0]
    # relative to the recipe, and checked by preflight (the CLI's exit 2 before a run directory exists)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "ds.yaml").write_text("distributed_type: DEEPSPEED\n")
    recipe_path = write_recipe(tmp_path / "r.yaml", str(tiny_model_dir), prompts_file)
    recipe, data = load_recipe(recipe_path, ["train.launcher=accelerate", "train.accelerate_config=cfg/ds.yaml"])
    assert data["train"]["accelerate_config"] == str(tmp_path / "cfg" / "ds.yaml")
    with pytest.raises(RecipeError, match="ds.yaml is DEEPSPEED, which needs CUDA GPUs"):
        recipe.preflight()


def test_a_run_trains_its_iteration_over_two_processes(tmp_path, tiny_model_dir, prompts_file):
    from alignment.algorithms import algorithm_run
    from alignment.store import RunStore

    recipe_path = write_recipe(tmp_path / "r.yaml", str(tiny_model_dir), prompts_file, **{
        "train.launcher": "accelerate", "train.num_processes": 2, "train.batch_size": 2, "train.max_length": 64})
    recipe, data = load_recipe(recipe_path)
    store = RunStore.create(tmp_path / "run", recipe=data, algorithm=recipe.algorithm)
    logs = []
    run = algorithm_run(store, recipe, log=logs.append)
    store.write_rows(1, "pairs", [{"prompt_id": str(i), **PAIRS[i]} for i in range(4)], inputs={}, recipe_hash="x")
    run.run_stage("train", 1)
    info = store.manifest(1, "train")["info"]
    assert info["trained"] and info["trained_rows"] == 4
    assert (store.root / info["adapter"] / "adapter_model.safetensors").is_file()
    assert any("--num_processes 2" in line and "--multi_gpu" in line for line in logs), logs
    assert [line.split()[1] for line in logs if line.startswith("step ")] == ["1/2", "2/2"]
