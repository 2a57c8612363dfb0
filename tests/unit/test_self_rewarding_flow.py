"""The whole Self-Rewarding flow on the tiny random model, through the real Prefect engine."""

import json

import pytest

from alignment.algorithms import algorithm_run
from alignment.config import load_recipe
from alignment.store import RunStore
from tests.conftest import copy_judged_run, write_recipe


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir, prefect_harness):
    from flows.self_rewarding import self_rewarding_flow

    tmp = tmp_path_factory.mktemp("sr")
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": "Question number {i}?"}}\n' for i in range(4)))
    recipe = write_recipe(tmp / "recipe.yaml", str(tiny_model_dir), prompts, iterations=2)
    result = self_rewarding_flow(run_dir=str(tmp / "run"), recipe_path=str(recipe))
    return RunStore.open(tmp / "run"), result


def test_layout_and_schemas(finished_run):
    store, result = finished_run
    assert store.iterations() == [1, 2]
    for t in (1, 2):
        for stage in ("prompts", "generate", "judge", "pairs"):
            assert (store.stage_dir(t, stage) / "data.parquet").is_file()
            assert store.manifest(t, stage)["stage"] == stage
        assert (store.iter_dir(t) / "metrics.json").is_file()
    gen = store.read_rows(1, "generate")
    assert len(gen) == 4 * 2 and set(gen[0]) == {"prompt_id", "prompt", "response_index", "response", "length"}
    judge = store.read_rows(1, "judge")
    assert len(judge) == 8 and all(len(r["judgments"]) == 2 for r in judge)
    pairs = store.read_rows(1, "pairs")
    for p in pairs:
        assert p["chosen_score"] > p["rejected_score"]
        assert p["chosen_index"] != p["rejected_index"]
    assert (store.root / "recipe.yaml").is_file() and (store.root / "run.json").is_file()


def test_second_iteration_uses_the_first_adapter(finished_run):
    store, result = finished_run
    m1 = json.loads((store.iter_dir(1) / "metrics.json").read_text())
    m2 = json.loads((store.iter_dir(2) / "metrics.json").read_text())
    # The fixture is deterministic (seeded random model, transformers backend, expected-value
    # scores that do not tie), so iteration 1 always trains: nothing here may depend on luck.
    assert m1["pairs"]["pairs"] > 0 and m1["train"]["trained"] is True
    adapter1 = store.root / m1["train"]["adapter"]
    assert (adapter1 / "adapter_model.safetensors").is_file()
    assert str(adapter1) in m2["model"]
    assert store.manifest(2, "generate")["inputs"]["model"] != store.manifest(1, "generate")["inputs"]["model"]
    assert result["run_dir"] == str(store.root)


def test_adapter_loads_with_peft(finished_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    store, result = finished_run
    assert result["adapter"] == str(store.root / json.loads((store.iter_dir(2) / "metrics.json").read_text())["train"]["adapter"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), result["adapter"])
    assert any("lora" in n for n, _ in model.named_parameters())


def test_rerun_skips_every_stage(finished_run, tmp_path_factory):
    from flows.self_rewarding import self_rewarding_flow

    store, _ = finished_run
    before = len(store.events())
    self_rewarding_flow(run_dir=str(store.root))
    new = store.events()[before:]
    assert {e["event"] for e in new if e.get("stage")} == {"skip"}
    assert len([e for e in new if e["event"] == "skip"]) == 10


def test_no_pairs_skips_training_with_a_warning(tmp_path, tiny_model_dir, prompts_file):
    recipe_path = write_recipe(tmp_path / "r.yaml", str(tiny_model_dir), prompts_file)
    recipe, data = load_recipe(recipe_path)
    store = RunStore.create(tmp_path / "run", recipe=data, algorithm=recipe.algorithm)
    logs = []
    run = algorithm_run(store, recipe, log=logs.append)
    store.write_rows(1, "pairs", [], inputs={}, recipe_hash="x")
    run.run_stage("train", 1)
    assert run.adapter(1) is None
    assert any("no preference pairs" in line for line in logs)
    assert store.manifest(1, "train")["info"]["trained"] is False
    assert run.model(2).adapter is None


def test_training_applies_review_corrections(tmp_path, judged_tiny_run):
    import json as _json

    from alignment.corrections import add_correction

    store, run = copy_judged_run(judged_tiny_run, tmp_path / "run")
    pairs = store.read_rows(1, "pairs")
    assert len(pairs) >= 2, "tiny model should produce some non-tied prompts"
    excluded, swapped = pairs[0], pairs[1]
    c1 = add_correction(store, {"iteration": 1, "action": "exclude_pair", "prompt_id": excluded["prompt_id"], "who": "t"})
    c2 = add_correction(store, {"iteration": 1, "action": "swap", "prompt_id": swapped["prompt_id"], "who": "t"})
    run.run_stage("train", 1)
    adapter = run.adapter(1)
    info = store.manifest(1, "train")["info"]
    assert sorted(info["corrections"]) == sorted([c1["id"], c2["id"]])
    trained = [_json.loads(line) for line in (store.root / info["adapter"] / "train_pairs.jsonl").read_text().splitlines()]
    assert len(trained) == len(pairs) - 1
    assert excluded["prompt"] not in [p["prompt"] for p in trained]
    flipped = next(p for p in trained if p["prompt"] == swapped["prompt"])
    assert (flipped["chosen"], flipped["rejected"]) == (swapped["rejected"], swapped["chosen"])
    assert adapter and run.model(2).adapter == adapter


def _outside_adapter(where, base_dir, r: int):
    """A real PEFT LoRA adapter on the tiny base, saved outside any run directory."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(where)
    return where


def test_no_pairs_from_an_adapter_outside_the_run_dir_keeps_that_adapter(tmp_path, tiny_model_dir, prompts_file):
    adapter = _outside_adapter(tmp_path / "outside-adapter", tiny_model_dir, r=4)
    recipe_path = write_recipe(tmp_path / "r.yaml", str(adapter), prompts_file)
    recipe, data = load_recipe(recipe_path)
    store = RunStore.create(tmp_path / "run", recipe=data, algorithm=recipe.algorithm)
    run = algorithm_run(store, recipe, log=lambda _: None)
    store.write_rows(1, "pairs", [], inputs={}, recipe_hash="x")
    run.run_stage("train", 1)
    assert run.adapter(1) == str(adapter.resolve())
    assert store.manifest(1, "train")["info"]["trained"] is False
    assert run.model(2).adapter == str(adapter.resolve())
    run.run_stage("train", 1)
    assert run.adapter(1) == str(adapter.resolve())  # and again when the stage is skipped


def test_engine_lora_rank_fits_the_starting_adapter(tmp_path, tiny_model_dir, prompts_file):
    from alignment.iterative import lora_rank_slot

    adapter = _outside_adapter(tmp_path / "outside-adapter", tiny_model_dir, r=32)
    recipe_path = write_recipe(tmp_path / "r.yaml", str(adapter), prompts_file, **{"train.lora.r": 8})
    recipe, data = load_recipe(recipe_path)
    run = algorithm_run(RunStore.create(tmp_path / "run", recipe=data, algorithm=recipe.algorithm), recipe,
                           log=lambda _: None)
    try:
        assert run.generator().spec.max_lora_rank == lora_rank_slot(32) == 32
    finally:
        run.close()


def test_a_separate_judge_judges_and_is_an_input_of_the_judge_stage(tmp_path, tiny_model_dir, prompts_file):
    """``judge.model`` (Self-Rewarding): a fixed judge on its own engine scores M_t's responses; which
    judge it is enters the judge stage's inputs (another judge redoes judging, not generation);
    Meta-Rewarding, which trains its judge, refuses one."""
    from alignment.config import RecipeError
    from alignment.stages import plan

    judge = _outside_adapter(tmp_path / "judge-adapter", tiny_model_dir, r=4)
    recipe_path = write_recipe(tmp_path / "r.yaml", str(tiny_model_dir), prompts_file, **{"judge.model": str(judge)})
    recipe, data = load_recipe(recipe_path)
    recipe.preflight()
    store = RunStore.create(tmp_path / "run", recipe=data, algorithm=recipe.algorithm)
    run = algorithm_run(store, recipe, log=lambda _: None)
    try:
        for stage in ("prompts", "generate", "judge"):
            run.run_stage(stage, 1)
    finally:
        run.close()
    m = store.manifest(1, "judge")
    assert set(m["inputs"]) == {"generate", "judge_model"} and m["info"]["judge_model"] == str(judge)
    assert m["info"]["scored"] == m["info"]["judgments"] > 0
    started = [e["model"] for e in store.events() if e["event"] == "engine_started"]
    assert len(started) == 2  # the policy's engine generated, the judge's own engine judged
    other = algorithm_run(store, load_recipe(recipe_path, [f"judge.model={tiny_model_dir}"])[0], log=lambda _: None)
    states = {r["stage"]: r for r in plan(other)}
    assert states["generate"]["state"] == "done"
    assert states["judge"]["state"] == "redo" and states["judge"]["reason"] == "inputs changed: judge_model"
    meta = write_recipe(tmp_path / "m.yaml", str(tiny_model_dir), prompts_file, algorithm="meta-rewarding",
                        **{"judge.model": str(judge)})
    with pytest.raises(RecipeError, match="field judge.model: Meta-Rewarding trains its judge"):
        load_recipe(meta)
