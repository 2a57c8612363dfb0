"""The eval stage (M_{t+1} vs M_t on held-out prompts) in a 1-iteration Self-Rewarding flow on the
tiny random model, and the eval section's bad input, refused before anything runs."""

import json

import pytest

from alignment.config import RecipeError, load_recipe
from alignment.data import DataError, prompt_id
from alignment.store import RunStore
from tests.conftest import write_recipe

QUESTIONS = [f"Question number {i}?" for i in range(6)]


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory, tiny_model_dir, prefect_harness):
    from flows.self_rewarding import self_rewarding_flow

    tmp = tmp_path_factory.mktemp("eval")
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUESTIONS))
    reference = tmp / "reference.jsonl"
    reference.write_text("".join(json.dumps({"prompt_id": prompt_id(q), "answer": f"The answer to {q}"}) + "\n"
                                 for q in QUESTIONS))
    recipe = write_recipe(tmp / "recipe.yaml", str(tiny_model_dir), prompts, **{
        "eval.heldout_fraction": 0.34, "eval.max_tokens": 8, "eval.reference": str(reference),
        "eval.judge.mode": "logprob", "eval.judge.max_tokens": 4,
        "train.learning_rate": 0.05})  # the adapter moves enough that M_2 answers differ from M_1
    result = self_rewarding_flow(run_dir=str(tmp / "run"), recipe_path=str(recipe))
    return RunStore.open(tmp / "run"), result


def test_eval_table_metrics_and_cli_line(evaluated_run):
    store, result = evaluated_run
    rows = store.read_rows(1, "eval")
    assert len(rows) == 2  # round(0.34 · 6) held out
    for r in rows:
        assert r["response_before"] is not None and r["response_after"] is not None
        assert r["result"] in ("win", "tie", "loss", "failed") and r["reference"].startswith("The answer to")
        assert r["verdict_after_first"] in ("A", "B") or r["identical"]  # logprob mode always decides
    m = json.loads((store.iter_dir(1) / "metrics.json").read_text())
    ev = m["eval"]
    assert ev == store.manifest(1, "eval")["info"]
    assert ev["prompts"] == 2 and ev["wins"] + ev["ties"] + ev["losses"] + ev["failed"] == 2
    assert ev["win_rate"] is not None and len(ev["win_rate_ci"]) == 2 and ev["lc_win_rate"] is not None
    assert ev["mean_length_before"] > 0 and ev["mean_length_after"] > 0
    assert ev["mean_score_before"] is not None and ev["mean_score_after"] is not None  # pointwise, logprob judge
    assert ev["score_gain"] == pytest.approx(ev["mean_score_after"] - ev["mean_score_before"])  # every prompt scored
    assert "; score " in result["eval"] and "(gain " in result["eval"]
    assert ev["reference"]["prompts"] == 2 and ev["reference"]["mean_length_reference"] > 0
    assert ev["model_before"] != ev["model_after"]
    assert result["eval"].startswith("iteration 1: win rate ") and " → " in result["eval"]
    from alignment.report import summary_markdown  # the iteration's summary artifact

    md = summary_markdown(m)
    assert "## Eval: M_2 vs M_1 on 2 held-out prompts" in md and "| M_2 vs reference |" in md


def test_held_out_prompts_are_not_trained_on(evaluated_run):
    store, _ = evaluated_run
    held = {r["prompt_id"] for r in store.read_rows(1, "eval")}
    trained = {r["prompt_id"] for r in store.read_rows(1, "prompts")}
    assert len(trained) == 4 and not held & trained and held | trained == {prompt_id(q) for q in QUESTIONS}
    assert not held & {r["prompt_id"] for r in store.read_rows(1, "pairs")}
    assert not held & {r["prompt_id"] for r in store.read_rows(1, "generate")}
    assert store.manifest(1, "prompts")["info"]["heldout"] == 2


def test_resumed_run_redoes_nothing(evaluated_run):
    from flows.self_rewarding import self_rewarding_flow

    store, first = evaluated_run
    before = len(store.events())
    again = self_rewarding_flow(run_dir=str(store.root))
    new = store.events()[before:]
    assert {e["event"] for e in new if e.get("stage")} == {"skip"}
    assert sorted(e["stage"] for e in new if e["event"] == "skip") == sorted(
        ["prompts", "generate", "judge", "pairs", "train", "eval"])
    assert again["eval"] == first["eval"]


def test_the_recipes_separate_judge_can_be_the_eval_judge(evaluated_run, tmp_path, tiny_model_dir):
    """``eval.judge.model: judge``: the head-to-head and the pointwise scores come from the separate
    judge's engine (``judge.model`` / ``judge.engine``), whose identity is the stage's judge input."""
    import shutil

    from alignment.algorithms import algorithm_run

    store, _ = evaluated_run
    shutil.copytree(store.root, tmp_path / "run")
    copy = RunStore.open(tmp_path / "run")
    recipe, _ = load_recipe(copy.root / "recipe.yaml", [f"judge.model={tiny_model_dir}", "eval.judge.model=judge"])
    logs = []
    run = algorithm_run(copy, recipe, log=logs.append)
    run.run_stage("eval", 1)
    m = copy.manifest(1, "eval")
    assert m["inputs"]["judge_model"] == run.judge_identity() != store.manifest(1, "eval")["inputs"]["judge_model"]
    assert m["info"]["judge"] == f"{tiny_model_dir} (separate judge, transformers)"
    assert any(line.startswith("starting transformers engine for the judge") for line in logs), logs
    assert m["info"]["prompts"] == 2 and m["info"]["mean_score_after"] is not None


def test_the_separate_judge_as_eval_judge_needs_one(tmp_path, tiny_model_dir, prompts_file):
    with pytest.raises(RecipeError, match=r"field eval.judge.model: 'judge' evaluates with the recipe's separate judge"):
        _preflight(tmp_path, tiny_model_dir, prompts_file, heldout_fraction=0.25, **{"judge.model": "judge"})


# ------------------------------------------------------------------------------ bad input
def _preflight(tmp_path, model, prompts_file, **eval_fields):
    recipe, _ = load_recipe(write_recipe(tmp_path / "r.yaml", str(model), prompts_file,
                                         **{f"eval.{k}": v for k, v in eval_fields.items()}))
    recipe.preflight()
    return recipe


def test_a_fraction_that_leaves_no_training_prompt_is_refused(tmp_path, tiny_model_dir):
    one = tmp_path / "one.jsonl"
    one.write_text('{"prompt": "Only one?"}\n')
    with pytest.raises(DataError, match=r"^eval.heldout_fraction 0.5: holds out 1 of 1 prompts and leaves none") as err:
        _preflight(tmp_path, tiny_model_dir, one, heldout_fraction=0.5)
    assert "\n" not in str(err.value)


def test_a_reference_file_without_prompt_ids_is_refused(tmp_path, tiny_model_dir, prompts_file):
    ref = tmp_path / "ref.jsonl"
    ref.write_text('{"prompt": "Question number 0?", "answer": "Zero."}\n')
    with pytest.raises(DataError, match=r"^eval.reference: .*ref.jsonl:1: field 'prompt_id' missing or empty"):
        _preflight(tmp_path, tiny_model_dir, prompts_file, heldout_fraction=0.25, reference=str(ref))
    ref.write_text('{"prompt_id": "p000000000000", "answer": "Zero."}\n')
    with pytest.raises(DataError, match=r"no prompt_id matches a prompt of this recipe"):
        _preflight(tmp_path, tiny_model_dir, prompts_file, heldout_fraction=0.25, reference=str(ref))


def test_eval_off_keeps_the_prompts_stage_as_it_was(tmp_path, tiny_model_dir, prompts_file):
    """Off by default: the prompts stage's inputs and recipe hash have no eval part, so runs
    without eval keep every stage's hash; the eval stage writes nothing."""
    from alignment.algorithms import algorithm_run
    from alignment.files import hash_obj, sha256_file

    recipe = _preflight(tmp_path, tiny_model_dir, prompts_file)
    assert not recipe.eval.enabled
    store = RunStore.create(tmp_path / "run", recipe=recipe.model_dump(mode="json"), algorithm=recipe.algorithm)
    logs = []
    run = algorithm_run(store, recipe, log=logs.append)
    run.run_stage("prompts", 1)
    m = store.manifest(1, "prompts")
    dumped = recipe.model_dump(mode="json")
    assert m["inputs"] == {"source": sha256_file(prompts_file)}
    assert m["recipe_hash"] == hash_obj({"prompts": dumped["prompts"], "model": dumped["model"],
                                         "backend": "transformers", "seed": 0})
    assert len(store.read_rows(1, "prompts")) == 4 and "heldout" not in m["info"]
    assert run.run_stage("eval", 1) is None and store.manifest(1, "eval") is None
    assert logs[-1] == "iter 1 eval: off (eval.heldout_fraction 0 and no eval.prompts); skipped"
    assert [s.name for s in run.algorithm.active(recipe)] == ["prompts", "generate", "judge", "pairs", "train"]
