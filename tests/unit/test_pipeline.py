"""Pipelines: SPIN then Self-Rewarding on one run directory, through the CLI on the tiny model.

Step 2's M_1 is step 1's last model; a kill in step 2 resumes there (step 1 is not redone) and
ends with the datasets of an uninterrupted run; bad step lists are one line, exit 2, nothing written.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from alignment.store import RunStore
from flows.cli import main
from tests.conftest import REPO

STEP_TABLES = {"1-spin": ("data", "generate", "pairs"), "2-self-rewarding": ("prompts", "generate", "judge", "pairs")}


def pipeline_recipe(path, model, sft, prompts, **top) -> str:
    train = {"batch_size": 2, "max_length": 128, "save_steps": 1, "launcher": "inprocess", "learning_rate": 1e-3}
    data = {
        "algorithm": "pipeline", "name": "pipe", "model": str(model), "seed": 0,
        "engine": {"backend": "transformers", "shard_size": 2},
        "steps": [
            {"algorithm": "spin", "iterations": 1, "data": {"source": str(sft), "heldout_fraction": 0.0},
             "generation": {"n": 1, "max_tokens": 8}, "train": train | {"beta": 0.1}, "eval": {"enabled": False}},
            {"algorithm": "self-rewarding", "iterations": 1, "prompts": {"source": str(prompts)},
             "generation": {"n": 2, "max_tokens": 8},
             "judge": {"n": 2, "mode": "logprob", "score": "expected", "max_tokens": 8}, "train": train},
        ],
    } | top
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir, prefect_harness):
    from prefect.settings import PREFECT_API_URL

    tmp_path = tmp_path_factory.mktemp("pipeline")
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(f'{{"prompt": "Name thing {i}.", "answer": "Thing {i} is a thing."}}\n' for i in range(4)))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": "Tell me about topic {i}."}}\n' for i in range(4)))
    env = dict(os.environ, PREFECT_API_URL=str(PREFECT_API_URL.value()), PREFECT_HOME=os.environ["PREFECT_HOME"],
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               TOKENIZERS_PARALLELISM="false")
    for k in ("SELFALIGN_CRASH_AT", "SELFALIGN_CRASH_SIGNAL", "SELFALIGN_RUN_PID"):
        env.pop(k, None)
    return {"root": tmp_path, "recipe": pipeline_recipe(tmp_path / "pipe.yaml", tiny_model_dir, sft, prompts),
            "env": env, "sft": sft, "prompts": prompts, "model": tiny_model_dir}


def cli(setup, *args, crash=None):
    env = dict(setup["env"]) | ({"SELFALIGN_CRASH_AT": crash} if crash else {})
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=setup["root"], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def whole(setup):
    """The pipeline run once, uninterrupted."""
    run_dir = setup["root"] / "whole"
    done = cli(setup, "run", setup["recipe"], "--run-dir", str(run_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def tables(run_dir) -> dict:
    out = {}
    for step, stages in STEP_TABLES.items():
        store = RunStore.open(run_dir / "steps" / step)
        out |= {(step, s): store.read_rows(1, s) for s in stages}
    return out


def test_a_pipeline_killed_in_its_second_step_resumes_there_with_the_same_datasets(setup, whole):
    killed = setup["root"] / "killed"
    spin = RunStore.open(whole / "steps" / "1-spin")
    sr = RunStore.open(whole / "steps" / "2-self-rewarding")
    # Step 2 starts from step 1's last model: base + SPIN's adapter.
    spin_adapter = str(spin.root / spin.manifest(1, "train")["info"]["adapter"])
    assert sr.recipe()["model"] == spin_adapter and sr.manifest(1, "train")["info"]["trained"]

    crashed = cli(setup, "run", setup["recipe"], "--run-dir", str(killed), crash="iter1/judge/after_commit")
    assert crashed.returncode == -9, crashed.stderr[-3000:]
    step1_events = len(RunStore.open(killed / "steps" / "1-spin").events())
    assert main(["plan", str(killed)]) == 0  # the half-done pipeline plans without running anything
    resumed = cli(setup, "resume", str(killed))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    new = RunStore.open(killed / "steps" / "1-spin").events()[step1_events:]
    assert {e["event"] for e in new if e.get("stage")} <= {"skip"}, new  # step 1 was not redone
    skipped = [e["stage"] for e in RunStore.open(killed / "steps" / "2-self-rewarding").events() if e["event"] == "skip"]
    assert {"prompts", "generate", "judge"} <= set(skipped)
    assert tables(killed) == tables(whole)


def test_status_and_plan_of_a_pipeline_name_its_steps(setup, whole, capsys):
    run_dir = whole
    assert main(["plan", setup["recipe"]]) == 0
    out = capsys.readouterr().out
    assert "step 1: spin" in out and "step 2: self-rewarding" in out
    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "step 1: spin" in out and "step 2: self-rewarding" in out and "not started" not in out
    assert main(["plan", str(run_dir)]) == 0
    out = capsys.readouterr().out
    states = {line.split()[1] for line in out.splitlines() if line.startswith("    ")}
    assert states <= {"done", "off"}, out


@pytest.mark.parametrize("steps, says", [
    ([], "field steps: a pipeline needs at least one step"),
    ([{"algorithm": "dpo-magic", "iterations": 1}], "field steps[1] (dpo-magic): field algorithm: must be one of"),
    ([{"algorithm": "spin", "data": {"source": "x.jsonl"}},
      {"algorithm": "self-rewarding", "model": "other-model", "prompts": {"source": "p.jsonl"}}],
     "field steps[2] (self-rewarding): field model: 'other-model' is not the pipeline's model"),
])
def test_a_bad_step_list_is_one_line_exit_2_and_writes_nothing(tmp_path, tiny_model_dir, capsys, steps, says):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump({"algorithm": "pipeline", "model": str(tiny_model_dir), "steps": steps}))
    assert main(["run", str(recipe), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err and "bad.yaml" in err, err
    assert not (tmp_path / "run").exists()


def test_the_pipelines_trackers_reach_every_step_unless_a_step_names_its_own(tmp_path, tiny_model_dir):
    from alignment.config import load_recipe
    from alignment.pipeline_config import step_data

    sft, prompts = tmp_path / "sft.jsonl", tmp_path / "prompts.jsonl"
    sft.write_text('{"prompt": "Name a thing.", "answer": "A thing."}\n')
    prompts.write_text('{"prompt": "Tell me about a topic."}\n')
    path = pipeline_recipe(tmp_path / "p.yaml", tiny_model_dir, sft, prompts, report=["tensorboard"])
    data = yaml.safe_load(open(path))
    data["steps"][1]["report"] = []
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(data))
    pipeline, _ = load_recipe(path)
    assert [step_data(pipeline, k, pipeline.model)["report"] for k in (1, 2)] == [["tensorboard"], []]
