"""Serving an adapter per request (lora) or as merged weights (merged): same model, one engine at a time."""

import pytest

from alignment.adapter_serving import MergedAdapters, serving_mode
from alignment.algorithms import algorithm_run
from alignment.config import load_recipe
from alignment.generation import EngineSpec, HFGenerator, Sampling, open_generator
from alignment.models import merge_adapter
from alignment.store import RunStore
from tests.conftest import write_recipe

CONVS = [[{"role": "user", "content": "Name a colour."}], [{"role": "user", "content": "What is 2 + 2?"}]]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_dir):
    """A LoRA adapter that changes the model (random B, not PEFT's zero init)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    where = tmp_path_factory.mktemp("adapter") / "a"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],
                                      init_lora_weights=False, task_type="CAUSAL_LM"))
    model.save_pretrained(where)
    return where


@pytest.mark.parametrize("requested, backend, on_gpu, mode", [
    ("auto", "vllm", False, "merged"), ("auto", "vllm", True, "lora"), ("auto", "transformers", False, "lora"),
    ("lora", "vllm", False, "lora"), ("merged", "vllm", True, "merged"), ("merged", "transformers", False, "merged"),
])
def test_serving_mode(requested, backend, on_gpu, mode):
    assert serving_mode(requested, backend, on_gpu) == mode


def test_merged_checkpoint_computes_what_the_adapter_does(tmp_path, tiny_model_dir, adapter):
    merged = merge_adapter(str(tiny_model_dir), adapter, tmp_path / "merged")
    assert (merged / "config.json").is_file() and (merged / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    spec = EngineSpec(base=str(tiny_model_dir), backend="transformers", enable_lora=True)
    with_lora = HFGenerator(spec)
    candidates = [str(d) for d in range(10)]
    via_lora = with_lora.next_token_probs([c + [{"role": "assistant", "content": "Score:"}] for c in CONVS],
                                          candidates, adapter=str(adapter))
    base = with_lora.next_token_probs([c + [{"role": "assistant", "content": "Score:"}] for c in CONVS], candidates)
    via_merged = HFGenerator(EngineSpec(base=str(merged), backend="transformers")).next_token_probs(
        [c + [{"role": "assistant", "content": "Score:"}] for c in CONVS], candidates)
    for lo, me, ba in zip(via_lora, via_merged, base):  # relative: a random model's digit probabilities are ~1/vocab
        assert max(abs(lo[c] - me[c]) / lo[c] for c in candidates) < 1e-4
        assert max(abs(lo[c] - ba[c]) / lo[c] for c in candidates) > 1e-2  # the adapter does change the model


def test_one_engine_at_a_time_restarted_only_when_the_adapter_changes(tmp_path, tiny_model_dir, adapter):
    opened, merges = [], []

    def open_engine(spec):
        opened.append(spec)
        return open_generator(spec)

    def merged_dir(a):
        merges.append(a)
        return str(merge_adapter(str(tiny_model_dir), a, tmp_path / "m"))

    served = MergedAdapters(EngineSpec(base=str(tiny_model_dir), backend="transformers", enable_lora=True),
                            merged_dir, open_engine=open_engine, log=lambda _: None)
    sampling = Sampling(n=1, max_tokens=4)
    assert served.chat([], sampling, adapter=str(adapter)) == [] and not opened  # nothing asked: nothing started
    base_out = served.chat(CONVS, sampling, seed=[1, 2])
    served.chat(CONVS, sampling, seed=[1, 2])
    assert [s.base for s in opened] == [str(tiny_model_dir)] and served.serving is None
    served.chat(CONVS, sampling, adapter=str(adapter), seed=[1, 2])
    served.next_token_probs([c + [{"role": "assistant", "content": "Score:"}] for c in CONVS], ["1"], adapter=str(adapter))
    assert [s.base for s in opened] == [str(tiny_model_dir), str(tmp_path / "m")]
    assert not any(s.enable_lora for s in opened)  # merged engines never pay for LoRA support
    assert served.serving == str(adapter) and merges == [str(adapter)]
    assert served.chat(CONVS, sampling, seed=[1, 2]) == base_out  # back on the base: same texts as before
    served.close()
    assert served.serving is None


def test_merged_serving_is_part_of_the_models_identity_only_with_an_adapter(tmp_path, tiny_model_dir, prompts_file, adapter):
    def run(mode):
        recipe_path = write_recipe(tmp_path / f"{mode}.yaml", str(adapter), prompts_file, **{"engine.adapters": mode})
        recipe, data = load_recipe(recipe_path)
        return algorithm_run(RunStore.create(tmp_path / mode, recipe=data, algorithm=recipe.algorithm), recipe,
                                log=lambda _: None)

    lora, merged = run("lora"), run("merged")
    assert lora.adapter_serving() == "lora" and merged.adapter_serving() == "merged"
    assert lora.model_hash(1) != merged.model_hash(1)  # M_1 is the adapter: merged samples differently

    base_recipe, data = load_recipe(write_recipe(tmp_path / "b.yaml", str(tiny_model_dir), prompts_file,
                                                 **{"engine.adapters": "merged"}))
    base_run = algorithm_run(RunStore.create(tmp_path / "b", recipe=data, algorithm=base_recipe.algorithm), base_recipe)
    base_recipe_lora, data2 = load_recipe(write_recipe(tmp_path / "c.yaml", str(tiny_model_dir), prompts_file))
    base_lora = algorithm_run(RunStore.create(tmp_path / "c", recipe=data2, algorithm=base_recipe_lora.algorithm),
                                 base_recipe_lora)
    assert base_run.model_hash(1) == base_lora.model_hash(1)  # no adapter: the serving mode changes nothing


def test_a_merged_run_builds_each_adapter_once_in_the_run_dir(tmp_path, tiny_model_dir, prompts_file, adapter):
    recipe, data = load_recipe(write_recipe(tmp_path / "r.yaml", str(adapter), prompts_file,
                                            **{"engine.adapters": "merged"}))
    run = algorithm_run(RunStore.create(tmp_path / "run", recipe=data, algorithm=recipe.algorithm), recipe,
                           log=lambda _: None)
    try:
        run.run_stage("prompts", 1)
        run.run_stage("generate", 1)
        run.run_stage("judge", 1)
        merged = list((tmp_path / "run" / "merged").iterdir())
        assert len(merged) == 1 and (merged[0] / "config.json").is_file()
        assert run.generator().serving == str(adapter.resolve())
    finally:
        run.close()
