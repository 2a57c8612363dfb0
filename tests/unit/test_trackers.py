"""Experiment trackers (recipe ``report``): the flattened series, a real 1-iteration Self-Rewarding run
on the tiny random model reported to TensorBoard (trainer curve and the iteration's own metrics, read
back from the event files), write-once on resume, no stage hash changed, and the preflight line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from alignment.config import RecipeError, load_recipe
from alignment.trackers import (WRITERS, flatten_metrics, missing_tracker_packages, report_iteration, rows_by_step,
                                tensorboard_dir, tensorboard_writer, tracker_settings, trainer_report)
from tests.conftest import run_one_iteration, write_recipe


def scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of one TensorBoard run directory as (step, value) points, in file order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_flatten_metrics_hand_written():
    metrics = {
        "iteration": 2, "model": "M_2", "ok": True, "none": None,
        "judge": {"scored_share": 0.75, "modes": {"logprob": 6}, "hist": {"3": 2}},
        "win_rate_ci": [0.1, 0.9], "rows": ["a"],
        "train_metrics": {"train_loss": 0.5, "curve": [{"step": 1, "loss": 0.69, "rewards/margins": 0.0},
                                                       {"step": 3, "loss": 0.6, "note": "x", "nested": [1]}]},
        "records": [{"x": 1}, {"x": 2, "y": {"z": 4}}],
        "empty": [],
    }
    assert flatten_metrics(metrics, 2) == {
        "iteration": [(2, 2.0)],
        "judge/hist/3": [(2, 2.0)],
        "judge/modes/logprob": [(2, 6.0)],
        "judge/scored_share": [(2, 0.75)],
        "records/x": [(1, 1.0), (2, 2.0)],  # no own "step": element i is at i + 1
        "records/y/z": [(2, 4.0)],
        "train_metrics/curve/loss": [(1, 0.69), (3, 0.6)],
        "train_metrics/curve/rewards/margins": [(1, 0.0)],
        "train_metrics/train_loss": [(2, 0.5)],
    }
    assert rows_by_step(flatten_metrics(metrics, 2))[:2] == [
        (1, {"records/x": 1.0, "train_metrics/curve/loss": 0.69, "train_metrics/curve/rewards/margins": 0.0}),
        (2, {"iteration": 2.0, "judge/hist/3": 2.0, "judge/modes/logprob": 6.0, "judge/scored_share": 0.75,
             "records/x": 2.0, "records/y/z": 4.0, "train_metrics/train_loss": 0.5})]


def test_tracker_settings_are_offline_defaults_the_user_can_override(tmp_path):
    logs = tmp_path / "logs"
    s = tracker_settings(["wandb", "mlflow"], logs, "exp", {"WANDB_MODE": "online"})
    assert s == {"WANDB_MODE": "online", "WANDB_DIR": str(logs.resolve()), "WANDB_PROJECT": "selfalign",
                 "WANDB_RUN_GROUP": "exp", "MLFLOW_TRACKING_URI": (logs.resolve() / "mlruns").as_uri(),
                 "MLFLOW_EXPERIMENT_NAME": "exp"}
    assert tracker_settings(["tensorboard"], logs, "exp", {}) == {}
    assert trainer_report([], tmp_path, "exp", 1, {}) == {}
    assert trainer_report(["tensorboard"], tmp_path, "exp", 2, {}) == {
        "report_to": ["tensorboard"], "logging_dir": str(tmp_path / "logs" / "tensorboard" / "exp" / "iter_2" / "train"),
        "run_name": "iter_2/train", "report_env": {}}


def test_report_iteration_writes_once_rewrites_a_redone_iteration_and_never_raises(tmp_path, monkeypatch):
    lines: list[str] = []
    m = {"judge": {"scored_share": 0.5}, "curve": [{"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.6}]}
    assert report_iteration(["tensorboard"], tmp_path, "exp", 1, m, log=lines.append) == ["tensorboard"]
    assert report_iteration(["tensorboard"], tmp_path, "exp", 1, m, log=lines.append) == []  # same series: nothing
    d = tensorboard_dir(tmp_path / "logs", "exp", 1)
    assert scalars(d)["judge/scored_share"] == [(1, 0.5)]
    redone = m | {"judge": {"scored_share": 0.25}}  # the iteration was redone: its points are replaced
    assert report_iteration(["tensorboard"], tmp_path, "exp", 1, redone, log=lines.append) == ["tensorboard"]
    assert scalars(d)["judge/scored_share"] == [(1, 0.25)]
    assert scalars(d)["curve/loss"] == [(1, pytest.approx(0.7)), (2, pytest.approx(0.6))]

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setitem(WRITERS, "tensorboard", broken)
    assert report_iteration(["tensorboard"], tmp_path, "exp", 2, m, log=lines.append) == []
    assert lines[-1] == "WARNING iter 2 report: tensorboard failed (OSError: disk full); the run goes on"
    assert not (tmp_path / "logs" / "trackers" / "iter_2.json").exists()  # retried next time


def test_a_resumed_trainer_writer_drops_the_points_logged_after_its_checkpoint(tmp_path):
    first = tensorboard_writer(tmp_path, None)
    for step in range(1, 8):  # killed after step 7, last checkpoint at step 5
        first.add_scalar("train/loss", float(step), step)
    first.close()
    resumed = tensorboard_writer(tmp_path, 5)
    for step in range(6, 9):
        resumed.add_scalar("train/loss", 10.0 + step, step)
    resumed.close()
    assert scalars(tmp_path)["train/loss"] == [(s, float(s)) for s in range(1, 6)] + [(s, 10.0 + s) for s in range(6, 9)]
    fresh = tensorboard_writer(tmp_path, None)  # a redone job: the old curve goes
    fresh.add_scalar("train/loss", 1.0, 1)
    fresh.close()
    assert scalars(tmp_path)["train/loss"] == [(1, 1.0)]


def test_preflight_refuses_a_tracker_that_is_not_installed(tmp_path, prompts_file):
    assert missing_tracker_packages(["wandb", "tensorboard"], lambda name: name == "tensorboard") == [
        "field report: 'wandb' needs the wandb package (pip install wandb)"]
    recipe, _ = load_recipe(write_recipe(tmp_path / "r.yaml", "smollm2-135m", prompts_file, report="[wandb]"))
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    with pytest.raises(RecipeError) as err:
        recipe.preflight()
    assert str(err.value) == "field report: 'wandb' needs the wandb package (pip install wandb)"
    with pytest.raises(RecipeError, match="field report"):
        load_recipe(write_recipe(tmp_path / "bad.yaml", "smollm2-135m", prompts_file, report="[neptune]"))


@pytest.fixture(scope="module")
def reported_run(tmp_path_factory, tiny_model_dir):
    """Iteration 1 of the test recipe with ``report: [tensorboard]``: (store, recipe path)."""
    tmp = tmp_path_factory.mktemp("trackers")
    prompts = tmp / "p.jsonl"
    prompts.write_text("".join(f'{{"prompt": "Tell me about topic {i}."}}\n' for i in range(4)))
    recipe_path = write_recipe(tmp / "r.yaml", str(tiny_model_dir), prompts, report="[tensorboard]")
    return run_one_iteration(recipe_path, tmp / "run", preflight=True), recipe_path


def test_training_and_iteration_metrics_land_in_tensorboard(reported_run):
    store, _ = reported_run
    root = store.root / "logs" / "tensorboard" / "test" / "iter_1"
    assert list(root.glob("events.out.tfevents.*")) and list((root / "train").glob("events.out.tfevents.*"))
    metrics = json.loads((store.iter_dir(1) / "metrics.json").read_text())
    curve = metrics["train_metrics"]["curve"]
    assert curve, metrics["train_metrics"]
    train = scalars(root / "train")  # TRL's report_to: one DPO loss per step
    assert [s for s, _ in train["train/loss"]] == [c["step"] for c in curve]
    assert [v for _, v in train["train/loss"]] == pytest.approx([c["loss"] for c in curve])
    own = scalars(root)  # the iteration's own metrics
    assert own["judge/scored_share"] == [(1, pytest.approx(metrics["judge"]["scored_share"]))]
    assert own["pairs/pairs"] == [(1, float(metrics["pairs"]["pairs"]))]
    assert [s for s, _ in own["train_metrics/curve/loss"]] == [c["step"] for c in curve]
    assert math.isclose(own["train_metrics/train_loss"][0][1], metrics["train_metrics"]["train_loss"], rel_tol=1e-6)


def test_a_resumed_run_adds_no_point_and_report_changes_no_stage_hash(reported_run, tmp_path):
    from alignment.algorithms import algorithm_run
    from alignment.stages import plan, stage_recipe_hash

    store, recipe_path = reported_run
    tb = store.root / "logs" / "tensorboard"
    before = {p: p.stat().st_size for p in tb.rglob("events.out.tfevents.*")}
    own_before = scalars(tb / "test" / "iter_1")
    events = len(store.events())
    recipe, _ = load_recipe(recipe_path)
    run = algorithm_run(store, recipe, log=lambda _: None)
    try:
        run.iteration(1)  # every stage skipped, the metrics read again
    finally:
        run.close()
    assert {e["event"] for e in store.events()[events:] if e.get("stage")} == {"skip"}
    assert {p: p.stat().st_size for p in tb.rglob("events.out.tfevents.*")} == before
    assert scalars(tb / "test" / "iter_1") == own_before

    plain, _ = load_recipe(recipe_path, ["report=[]"])
    assert plain.report == [] and recipe.report == ["tensorboard"]
    quiet = algorithm_run(store, plain, log=lambda _: None)
    assert {r["state"] for r in plan(quiet)} <= {"done", "off"}
    for stage in run.algorithm.stages:
        assert stage_recipe_hash(quiet, stage, 1) == stage_recipe_hash(run, stage, 1)


def test_wandb_and_mlflow_get_one_run_per_iteration_grouped_under_the_run_name(tmp_path, monkeypatch):
    """The two optional trackers (not installed here) against stand-ins recording their calls."""
    import sys
    import types

    calls: list = []

    class FakeRun:
        def log(self, row, step):
            calls.append(("log", step, row))

        def finish(self):
            calls.append(("finish",))

    wandb = types.SimpleNamespace(run=None, init=lambda **kw: calls.append(("init", kw)) or FakeRun())

    class Client:
        def __init__(self, tracking_uri):
            calls.append(("client", tracking_uri))

        def get_experiment_by_name(self, name):
            return None

        def create_experiment(self, name):
            calls.append(("experiment", name))
            return "7"

        def create_run(self, experiment_id, run_name):
            calls.append(("run", experiment_id, run_name))
            return types.SimpleNamespace(info=types.SimpleNamespace(run_id="r1"))

        def log_batch(self, run_id, metrics):
            calls.append(("batch", [(m[0], m[1], m[3]) for m in metrics]))

        def set_terminated(self, run_id):
            calls.append(("terminated", run_id))

    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "mlflow", types.ModuleType("mlflow"))
    monkeypatch.setitem(sys.modules, "mlflow.entities", types.SimpleNamespace(Metric=lambda *a: a))
    monkeypatch.setitem(sys.modules, "mlflow.tracking", types.SimpleNamespace(MlflowClient=Client))
    m = {"judge": {"scored_share": 0.5}, "curve": [{"step": 1, "loss": 0.7}, {"step": 4, "loss": 0.6}]}
    assert report_iteration(["wandb", "mlflow"], tmp_path, "exp", 3, m, environ={}, log=lambda _: None) == [
        "wandb", "mlflow"]
    logs = tmp_path / "logs"
    assert calls[0] == ("init", {"project": "selfalign", "group": "exp", "name": "iter_3", "dir": str(logs.resolve()),
                                 "mode": "offline", "job_type": "iteration"})
    assert calls[1:5] == [("log", 1, {"curve/loss": 0.7}), ("log", 3, {"judge/scored_share": 0.5}),
                          ("log", 4, {"curve/loss": 0.6}), ("finish",)]
    assert calls[5:] == [("client", (logs.resolve() / "mlruns").as_uri()), ("experiment", "exp"), ("run", "7", "iter_3"),
                         ("batch", [("curve/loss", 0.7, 1), ("curve/loss", 0.6, 4), ("judge/scored_share", 0.5, 3)]),
                         ("terminated", "r1")]
