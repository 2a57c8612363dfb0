"""`selfalign plan`: the stage plan of a recipe, and of a run (what is done, what would run or be
redone, and why), computed from the stage declarations without running anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignment.algorithms import ALGORITHMS
from alignment.config import load_recipe
from flows.cli import main
from tests.conftest import copy_judged_run

REPO = Path(__file__).resolve().parents[2]


def plan_lines(capsys, *argv: str) -> dict[tuple, str]:
    """(iteration, stage) -> the rest of its plan line; for a pipeline (step, iteration, stage)."""
    assert main(["plan", *argv]) == 0
    out, step, t, lines = capsys.readouterr().out, None, 0, {}
    for line in out.splitlines():
        text = line.strip()
        if line.startswith("step "):
            step = int(text.split()[1].rstrip(":"))
        elif text.startswith("iteration "):
            t = int(text.split()[1])
        elif line.startswith("  ") and t:
            name, rest = text.split(maxsplit=1)
            lines[(t, name) if step is None else (step, t, name)] = rest
    return lines


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "recipes").glob("*.yaml")))
def test_plan_of_every_shipped_recipe_lists_its_stages_per_iteration(capsys, recipe):
    lines = plan_lines(capsys, str(REPO / "recipes" / recipe))
    parsed, _ = load_recipe(REPO / "recipes" / recipe)
    steps = dict(enumerate(parsed.step_recipes(), 1)) if parsed.algorithm == "pipeline" else {None: parsed}
    expected = {}
    for k, step in steps.items():
        algorithm = ALGORITHMS[step.algorithm]
        for t in range(1, step.iterations + 1):
            for stage in algorithm.stages:
                expected[(t, stage.name) if k is None else (k, t, stage.name)] = "off" if stage.off(step) else "run"
    assert sorted(lines) == sorted(expected)
    for key, rest in lines.items():
        assert rest.startswith(expected[key]), (key, rest)


def test_plan_of_a_half_done_run_names_what_is_done_and_what_would_be_redone(tmp_path, capsys, judged_tiny_run):
    store, _ = copy_judged_run(judged_tiny_run, tmp_path / "run")
    run_dir = str(store.root)
    lines = plan_lines(capsys, run_dir)
    assert [lines[(1, s)].split()[0] for s in ("prompts", "generate", "judge", "pairs", "train")] == \
        ["done", "done", "done", "done", "run"]
    # A changed judge setting: judge is redone, and so is what reads it; generation is kept.
    lines = plan_lines(capsys, run_dir, "--set", "judge.temperature=0.3")
    assert lines[(1, "generate")].startswith("done")
    assert lines[(1, "judge")].startswith("redo    (recipe changed)")
    assert lines[(1, "pairs")].startswith("redo    (after judge)")
    # A second iteration waits on the first one's training (M_2).
    lines = plan_lines(capsys, run_dir, "--set", "iterations=2")
    assert lines[(2, "prompts")].startswith("run")
    assert lines[(2, "generate")].startswith("run     (after prompts, M_2 (iteration 1 train))")
    # A damaged output is named; nothing was written by planning.
    (store.stage_dir(1, "pairs") / "data.parquet").write_bytes(b"garbage")
    events = len(store.events())
    lines = plan_lines(capsys, run_dir)
    assert lines[(1, "pairs")].startswith("redo    (output corrupted: data.parquet")
    assert len(store.events()) == events and store.recipe()["iterations"] == 1


def test_plan_of_a_missing_recipe_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["plan", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.yaml" in err
