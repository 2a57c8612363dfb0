from pathlib import Path

import pytest
import yaml

from alignment.config import RecipeError, apply_overrides, load_recipe, parse_recipe

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path, data) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


BASE = {"algorithm": "self-rewarding", "prompts": {"source": "p.jsonl"}}


def test_every_shipped_recipe_loads():
    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        recipe, data = load_recipe(path)
        assert data["algorithm"] == recipe.algorithm
        header = path.read_text().splitlines()[0]
        assert header.startswith("#"), f"{path.name}: header comment with the command that runs it"


def test_defaults_are_the_papers():
    r = parse_recipe(dict(BASE))
    assert (r.generation.n, r.generation.temperature, r.generation.top_p) == (4, 0.7, 0.9)
    assert r.judge.n == 3 and r.train.beta == 0.1 and r.pairs.rho == 0.0


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"judge": {"n": "three"}}, "judge.n"),
        ({"judge": {"nn": 3}}, "judge.nn"),
        ({"bogus": 1}, "bogus"),
        ({"pairs": {"rho": 1.0}}, "pairs.rho"),
        ({"train": {"lora": {"r": 0}}}, "train.lora.r"),
        ({"engine": {"backend": "tpu"}}, "engine.backend"),
    ],
)
def test_bad_fields_name_the_field(tmp_path, patch, field):
    data = apply_overrides(dict(BASE), [])
    data.update(patch)
    path = _write(tmp_path, data)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert str(path) in msg and f"field {field}" in msg and "\n" not in msg


def test_unknown_algorithm_and_not_a_mapping(tmp_path):
    with pytest.raises(RecipeError, match="field algorithm"):
        load_recipe(_write(tmp_path, {"algorithm": "rlhf-magic"}))
    with pytest.raises(RecipeError, match="YAML mapping"):
        load_recipe(_write(tmp_path, "- a\n- b\n"))
    with pytest.raises(RecipeError, match="invalid YAML"):
        load_recipe(_write(tmp_path, "a: [1, 2\n"))
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_cross_field_checks():
    with pytest.raises(RecipeError, match="expected"):
        parse_recipe(BASE | {"judge": {"score": "expected", "mode": "free"}})
    with pytest.raises(RecipeError, match="constrained"):
        parse_recipe(BASE | {"judge": {"mode": "constrained"}, "engine": {"backend": "transformers"}})


def test_overrides_parse_yaml_values_and_nest(tmp_path):
    path = _write(tmp_path, BASE)
    recipe, data = load_recipe(path, ["iterations=1", "judge.n=5", "train.lora.target_modules=[q_proj]", "name=x-1"])
    assert recipe.iterations == 1 and recipe.judge.n == 5
    assert recipe.train.lora.target_modules == ["q_proj"] and data["name"] == "x-1"
    with pytest.raises(RecipeError, match="key=value"):
        load_recipe(path, ["iterations"])
    with pytest.raises(RecipeError, match="field judge.n"):
        load_recipe(path, ["judge.n=0"])


def test_relative_prompt_source_resolves_against_recipe_dir(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    _, data = load_recipe(_write(tmp_path, BASE))
    assert data["prompts"]["source"] == str((tmp_path / "p.jsonl").resolve())


def test_unreadable_recipes_say_what_is_wrong(tmp_path):
    from alignment.config import RecipeError, load_recipe

    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("algorithm: self-rewarding\nname: caf\xe9\n".encode("latin-1"))
    with pytest.raises(RecipeError, match=r"latin1.yaml: not UTF-8 text"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match=r"is a directory, not a recipe file"):
        load_recipe(tmp_path)


@pytest.mark.parametrize("item", ["=5", " =5", "a..b=1", "train.=1"])
def test_an_override_without_a_key_names_the_override(item):
    from alignment.config import RecipeError, apply_overrides

    with pytest.raises(RecipeError, match=f"--set {item!r}: no field name"):
        apply_overrides({}, [item])


def test_result_dump_leaves_out_fields_that_cannot_change_a_result(tmp_path):
    from alignment.config import result_dump

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"algorithm": "self-rewarding", "prompts": {"source": "x.jsonl"}}))
    recipe, _ = load_recipe(path)
    dumped = result_dump(recipe)
    for gone in ("save_steps", "launcher", "release_engine"):
        assert gone not in dumped["train"]
    assert dumped["review"] == {} and dumped["train"]["beta"] == 0.1 and dumped["train"]["lora"]["r"] == 8
    other, _ = load_recipe(path, ["train.save_steps=99", "train.launcher=inprocess", "review.gate=true"])
    assert result_dump(other) == dumped
    assert result_dump(load_recipe(path, ["train.beta=0.2"])[0]) != dumped


def test_result_dump_of_every_shipped_recipe_ignores_checkpoint_and_launcher_settings():
    """Each algorithm's recipe declares its checkpoint cadence and launcher as NO_EFFECT (PERL has
    its own: reward_model.save_steps, ppo.save_steps, launcher), so changing them redoes nothing."""
    import copy

    from alignment.config import result_dump
    from alignment.pipeline_config import step_data

    def recipes():  # (name, recipe dict): every shipped recipe, and every step of a shipped pipeline
        for path in sorted((REPO / "recipes").glob("*.yaml")):
            recipe, data = load_recipe(path)
            if recipe.algorithm != "pipeline":
                yield path.name, data
            for k in range(1, len(getattr(recipe, "steps", [])) + 1):
                yield f"{path.name} step {k}", parse_recipe(step_data(recipe, k, recipe.model)).model_dump(mode="json")

    for name, data in recipes():
        recipe = parse_recipe(data)
        changes = [f"{section}.save_steps=97" for section in ("train", "reward_model", "ppo") if section in data]
        changes += [f"{prefix}launcher=inprocess" for prefix in ("", "train.")
                    if "launcher" in (data if not prefix else data.get("train", {}))]
        assert changes, name
        changed = parse_recipe(apply_overrides(copy.deepcopy(data), changes))
        assert result_dump(changed) == result_dump(recipe), (name, changes)


def test_engine_parallelism_and_extra_vllm_arguments(tmp_path, tiny_model_dir):
    """engine.tensor_parallel_size and engine.extra reach vLLM's engine arguments; an argument selfalign
    sets itself is refused at load, one vLLM does not know before the run starts (preflight)."""
    base = {"algorithm": "self-rewarding", "model": str(tiny_model_dir), "prompts": {"source": "p.jsonl"}}
    recipe = parse_recipe(base | {"engine": {"tensor_parallel_size": 2, "extra": {"enable_prefix_caching": False}}})
    assert recipe.engine.vllm_args() == {"enable_prefix_caching": False, "tensor_parallel_size": 2}
    assert parse_recipe(base).engine.vllm_args() == {}
    with pytest.raises(RecipeError, match=r"field engine: extra: 'seed' is set by selfalign \(the recipe's seed\)"):
        parse_recipe(base | {"engine": {"extra": {"seed": 3}}})
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    bad = parse_recipe(base | {"prompts": {"source": str(prompts)},
                               "engine": {"backend": "vllm", "extra": {"enable_prefix_caching": True, "warp_drive": 9}}})
    with pytest.raises(RecipeError, match=r"field engine.extra: 'warp_drive' is not a vLLM engine argument"):
        bad.preflight()
