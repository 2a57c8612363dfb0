"""Experiment trackers: the recipe's ``report`` (tensorboard, wandb, mlflow) gets every iteration's metrics.

Two writers feed them, into one tree per run (``RUN/logs``, offline unless the user says otherwise):

* the trainers: TRL's ``report_to`` with the settings of ``trainer_report`` (the per-step training
  curve, TensorBoard under ``tensorboard/<run name>/iter_<t>/train``);
* the project's own stages: ``report_iteration`` writes an iteration's ``metrics.json`` dict, flattened
  by ``flatten_metrics``, as one tracker run per iteration (``iter_<t>``) grouped under the run's name.

Layout (``tensorboard_dir``, ``tracker_settings``): TensorBoard event files under
``RUN/logs/tensorboard/<name>/iter_<t>/``; wandb offline runs under ``RUN/logs/wandb/`` (project
``selfalign``, group ``<name>``); MLflow's file store ``RUN/logs/mlruns`` (experiment ``<name>``).
A variable the user set (``WANDB_MODE``, ``MLFLOW_TRACKING_URI``, ...) wins over these defaults.

Write once: ``RUN/logs/trackers/iter_<t>.json`` records, per tracker, the digest of the series it
was given. The same digest again (a resumed run re-reading a finished iteration, the review gate
asking for metrics) writes nothing; a different one (the iteration was redone) writes again:
TensorBoard replaces its event files of that iteration, wandb and MLflow get a new run.

A tracker never fails a run: its error is one WARNING line and the run goes on.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

from alignment.console import LOGS_DIR
from alignment.files import atomic_write_json

# tracker -> the package it needs (import name = pip name)
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
WANDB_PROJECT = "selfalign"
MARKERS_DIR = "trackers"
EVENT_FILES = "events.out.tfevents.*"

Series = dict[str, list[tuple[int, float]]]


def missing_tracker_packages(report: Sequence[str], importable: Callable[[str], bool] | None = None) -> list[str]:
    """One line per tracker in ``report`` whose package does not import, naming the recipe field and
    the pip command: ``field report: 'wandb' needs the wandb package (pip install wandb)``."""
    importable = importable or (lambda name: importlib.util.find_spec(name) is not None)
    return [f"field report: {tracker!r} needs the {TRACKER_PACKAGES[tracker]} package "
            f"(pip install {TRACKER_PACKAGES[tracker]})"
            for tracker in dict.fromkeys(report) if not importable(TRACKER_PACKAGES[tracker])]


def flatten_metrics(metrics: Mapping, step: int) -> Series:
    """An iteration's metrics dict as scalar series ``{key: [(step, value), ...]}``, keys sorted.

    * nested keys are joined with "/": ``{"judge": {"scored_share": 0.5}}`` -> ``"judge/scored_share"``;
    * a number (int or float; not a bool) is one point at ``step`` (the iteration t):
      ``[(t, 0.5)]``;
    * a list of dicts is a per-step record (the DPO ``curve``): element i is a point at its own
      integer ``"step"``, else at i + 1, its other keys flattened as above under the list's key:
      ``{"curve": [{"step": 1, "loss": 0.69}, {"step": 2, "loss": 0.6}]}`` ->
      ``{"curve/loss": [(1, 0.69), (2, 0.6)]}``;
    * anything else (strings, bools, None, lists of numbers or strings, lists inside a per-step
      element) is left out.
    """
    out: Series = {}

    def walk(node, key: str, at: int, in_record: bool) -> None:
        if isinstance(node, bool) or node is None:
            return
        if isinstance(node, (int, float)):
            out.setdefault(key, []).append((at, float(node)))
        elif isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{key}/{k}" if key else str(k), at, in_record)
        elif isinstance(node, list) and node and not in_record and all(isinstance(e, Mapping) for e in node):
            for i, element in enumerate(node):
                own = element.get("step")
                at_i = own if isinstance(own, int) and not isinstance(own, bool) else i + 1
                walk({k: v for k, v in element.items() if k != "step"}, key, at_i, True)

    walk(metrics, "", step, False)
    return dict(sorted(out.items()))


def rows_by_step(series: Series) -> list[tuple[int, dict[str, float]]]:
    """The series as rows ``(step, {key: value})`` in increasing step (what wandb's ``log`` takes:
    its step may never go down)."""
    rows: dict[int, dict[str, float]] = {}
    for key, points in series.items():
        for step, value in points:
            rows.setdefault(step, {})[key] = value
    return sorted(rows.items())


def series_digest(series: Series) -> str:
    """sha256 of the series as sorted JSON: what the write-once marker compares."""
    return hashlib.sha256(json.dumps(series, sort_keys=True).encode()).hexdigest()


def tensorboard_dir(logs: Path, name: str, t: int) -> Path:
    """``logs/tensorboard/<name>/iter_<t>``: one TensorBoard run per iteration under the run's name
    (the trainer's curve goes to its ``train`` subdirectory)."""
    return Path(logs) / "tensorboard" / name / f"iter_{t}"


def tracker_settings(report: Sequence[str], logs: Path, name: str, environ: Mapping[str, str]) -> dict[str, str]:
    """The trackers' environment: for each variable the user's value when set in ``environ``, else
    the run's default. wandb: ``WANDB_MODE`` offline, ``WANDB_DIR`` logs, ``WANDB_PROJECT`` selfalign,
    ``WANDB_RUN_GROUP`` name; mlflow: ``MLFLOW_TRACKING_URI`` file:logs/mlruns,
    ``MLFLOW_EXPERIMENT_NAME`` name. Only the trackers in ``report`` have variables."""
    defaults: dict[str, str] = {}
    if "wandb" in report:
        defaults |= {"WANDB_MODE": "offline", "WANDB_DIR": str(Path(logs).resolve()), "WANDB_PROJECT": WANDB_PROJECT,
                     "WANDB_RUN_GROUP": name}
    if "mlflow" in report:
        defaults |= {"MLFLOW_TRACKING_URI": (Path(logs).resolve() / "mlruns").as_uri(), "MLFLOW_EXPERIMENT_NAME": name}
    return {k: environ.get(k) or v for k, v in defaults.items()}


def trainer_report(report: Sequence[str], root: Path, name: str, t: int, environ: Mapping[str, str]) -> dict:
    """A DPO job's tracker fields (``DPOSpec``): ``report_to`` = the recipe's ``report``,
    ``logging_dir`` = ``tensorboard_dir(...)/train``, ``run_name`` ``iter_<t>/train`` and the
    trackers' environment ``report_env`` (``tracker_settings``). Empty with no trackers."""
    if not report:
        return {}
    logs = Path(root) / LOGS_DIR
    return {"report_to": list(report), "logging_dir": str(tensorboard_dir(logs, name, t) / "train"),
            "run_name": f"iter_{t}/train", "report_env": tracker_settings(report, logs, name, environ)}


@contextlib.contextmanager
def environment(values: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` set for the block, restored after."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def tensorboard_writer(directory: str | Path, resumed_step: int | None):
    """A ``SummaryWriter`` for ``directory`` that leaves no point twice: a fresh job removes the
    event files an earlier attempt left there; a job resumed from step n starts with TensorBoard's
    purge marker at n + 1, so the points a killed attempt logged after its checkpoint are dropped."""
    from torch.utils.tensorboard import SummaryWriter

    directory = Path(directory)
    if resumed_step is None:
        for old in directory.glob(EVENT_FILES):
            old.unlink()
    return SummaryWriter(log_dir=str(directory), purge_step=None if resumed_step is None else resumed_step + 1)


def write_tensorboard(series: Series, logs: Path, name: str, t: int, settings: Mapping[str, str]) -> None:
    """Every point as a scalar of the iteration's TensorBoard run (its earlier event files replaced;
    the trainer's ``train`` subdirectory is not touched)."""
    writer = tensorboard_writer(tensorboard_dir(logs, name, t), None)
    try:
        for key, points in series.items():
            for step, value in points:
                writer.add_scalar(key, value, step)
    finally:
        writer.close()


def write_wandb(series: Series, logs: Path, name: str, t: int, settings: Mapping[str, str]) -> None:
    """One wandb run ``iter_<t>`` in group ``WANDB_RUN_GROUP``, rows logged in increasing step."""
    import wandb

    Path(settings["WANDB_DIR"]).mkdir(parents=True, exist_ok=True)
    if wandb.run is not None:  # a trainer's run in this process
        wandb.run.finish()
    run = wandb.init(project=settings["WANDB_PROJECT"], group=settings["WANDB_RUN_GROUP"], name=f"iter_{t}",
                     dir=settings["WANDB_DIR"], mode=settings["WANDB_MODE"], job_type="iteration")
    try:
        for step, row in rows_by_step(series):
            run.log(row, step=step)
    finally:
        run.finish()


def write_mlflow(series: Series, logs: Path, name: str, t: int, settings: Mapping[str, str]) -> None:
    """One MLflow run ``iter_<t>`` in experiment ``MLFLOW_EXPERIMENT_NAME`` (at most 1000 metrics per
    ``log_batch``, MLflow's limit)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=settings["MLFLOW_TRACKING_URI"])
    experiment = settings["MLFLOW_EXPERIMENT_NAME"]
    found = client.get_experiment_by_name(experiment)
    run = client.create_run(found.experiment_id if found else client.create_experiment(experiment), run_name=f"iter_{t}")
    now = int(time.time() * 1000)
    metrics = [Metric(key, value, now, step) for key, points in series.items() for step, value in points]
    try:
        for i in range(0, len(metrics), 1000):
            client.log_batch(run.info.run_id, metrics=metrics[i:i + 1000])
    finally:
        client.set_terminated(run.info.run_id)


WRITERS: dict[str, Callable[[Series, Path, str, int, Mapping[str, str]], None]] = {
    "tensorboard": write_tensorboard, "wandb": write_wandb, "mlflow": write_mlflow}


def marker_path(logs: Path, t: int) -> Path:
    """``logs/trackers/iter_<t>.json``: {tracker: digest of the series it was given}."""
    return Path(logs) / MARKERS_DIR / f"iter_{t}.json"


def read_marker(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_marker(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, data)


def report_iteration(report: Sequence[str], root: Path, name: str, t: int, metrics: Mapping, *,
                     environ: Mapping[str, str] | None = None, log: Callable[[str], None] = print) -> list[str]:
    """Write iteration t's metrics (``flatten_metrics``) to each tracker in ``report`` that has not
    been given these very series yet (the marker, see the module doc); the trackers written.
    Never raises: a tracker's error is a WARNING line and the others go on."""
    written: list[str] = []
    if not report:
        return written
    logs = Path(root) / LOGS_DIR
    try:
        series = flatten_metrics(metrics, t)
        digest = series_digest(series)
        marker = marker_path(logs, t)
        done = read_marker(marker)
        settings = tracker_settings(report, logs, name, os.environ if environ is None else environ)
    except Exception as err:  # noqa: BLE001 - a tracker never fails a run
        log(f"WARNING iter {t} report: metrics not logged ({type(err).__name__}: {err}); the run goes on")
        return written
    for tracker in dict.fromkeys(report):
        if done.get(tracker) == digest:
            continue
        try:
            WRITERS[tracker](series, logs, name, t, settings)
            done[tracker] = digest
            write_marker(marker, done)
        except Exception as err:  # noqa: BLE001 - a tracker never fails a run
            log(f"WARNING iter {t} report: {tracker} failed ({type(err).__name__}: {err}); the run goes on")
            continue
        written.append(tracker)
    if written:
        log(f"iter {t} report: {len(series)} series to {', '.join(written)} (under {logs})")
    return written
