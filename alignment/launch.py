"""Launching a training job: in this process, or as a subprocess (replaceable by ``accelerate launch``)."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from alignment import console
from alignment.store import RUN_FILE
from alignment.training import DPOSpec, train_dpo

STEP_LINE = re.compile(r"^(?:(\w+) )?step (\d+)/(\d+)\b")  # "step 3/10 loss ...", "ppo step 2/4 ..."


class TrainingError(RuntimeError):
    pass


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    # A SIGKILLed flow must not leave an orphan trainer writing checkpoints into the run.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def run_dpo(spec: DPOSpec, *, launcher: str, spec_path: Path, log=print) -> dict:
    if launcher == "inprocess":
        return train_dpo(spec)
    return run_subprocess("alignment.training", "dpo", spec, spec_path=spec_path, log=log)


def job_log_path(spec_path: Path, job: str) -> Path | None:
    """``RUN/logs/iter_<t>-<stage>-<job>.log`` for a spec under ``RUN/iter_<t>/<stage>/...`` (RUN:
    the nearest parent holding ``run.json``); None outside a run directory."""
    spec_path = Path(spec_path).resolve()
    for root in spec_path.parents:
        if (root / RUN_FILE).is_file():
            where = spec_path.parent.relative_to(root).parts[:2]
            return root / console.LOGS_DIR / ("-".join([*where, job]) + ".log")
    return None


def step_progress(line: str) -> tuple[str | None, int, int] | None:
    """(kind, step, steps) of a trainer's step line ("step 3/10 loss 0.69" -> (None, 3, 10),
    "ppo step 2/4 reward ..." -> ("ppo", 2, 4)); None for any other line."""
    match = STEP_LINE.match(line)
    return (match.group(1), int(match.group(2)), int(match.group(3))) if match else None


class _StepBars:
    """Training's progress bar on a terminal, fed by the step lines; off a terminal the step lines
    themselves are the plain progress lines."""

    def __init__(self, label: str):
        self.term = console.current()
        self.label, self.started, self.bars = label, self.term.clock(), {}

    def update(self, line: str) -> None:
        step = step_progress(line)
        if step is None or not self.term.tty:
            return
        kind, done, total = step
        if kind not in self.bars:  # a resumed job starts after its checkpoint: those steps set no pace
            self.bars[kind] = self.term.progress(" ".join(filter(None, [self.label, kind])), unit="step",
                                                 start_done=done - 1, started=self.started)
        self.bars[kind].update(done, total)


def run_subprocess(module: str, job: str, spec, *, spec_path: Path, log=print) -> dict:
    """Run ``python -m MODULE JOB SPEC.json`` (or ``$SELFALIGN_TRAIN_LAUNCHER -m ...``, e.g.
    ``accelerate launch -m``), stream its ``[train]`` lines to ``log``, and return the
    ``train_metrics.json`` it leaves in ``spec.output_dir``. The child dies with this process.

    Its whole output is appended to ``RUN/logs/iter_<t>-<stage>-<job>.log`` (``job_log_path``),
    and echoed to stderr under ``selfalign run -v``; on a terminal its step lines draw a bar."""
    spec_path.write_text(json.dumps(asdict(spec), indent=1))
    cmd = os.environ.get("SELFALIGN_TRAIN_LAUNCHER", f"{sys.executable} -m").split() + [module, job, str(spec_path)]
    env = dict(os.environ, SELFALIGN_RUN_PID=os.environ.get("SELFALIGN_RUN_PID", str(os.getpid())),
               TOKENIZERS_PARALLELISM="false", TRL_EXPERIMENTAL_SILENCE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH")])))
    log_path = job_log_path(spec_path, job)
    log(f"training: {' '.join(cmd)}" + (f" (output: {log_path})" if log_path else ""))
    echo = os.environ.get(console.VERBOSE_ENV) == "1"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    tail: list[str] = []
    bars = _StepBars(" ".join(p.replace("_", " ") for p in log_path.stem.split("-")[:2]) if log_path else job)
    assert proc.stdout is not None
    try:
        with contextlib.ExitStack() as stack:
            sink = None
            if log_path is not None:
                log_path.parent.mkdir(exist_ok=True)
                sink = stack.enter_context(open(log_path, "a", encoding="utf-8"))
                sink.write(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
            for line in proc.stdout:
                if sink is not None:
                    sink.write(line)
                    sink.flush()
                if echo:
                    sys.stderr.write(line)
                line = line.rstrip()
                tail = (tail + [line])[-40:]
                if line.startswith("[train]"):
                    log(line.removeprefix("[train] "))
                    bars.update(line.removeprefix("[train] "))
            proc.wait()
    finally:
        # Ctrl-C or an error in this process: the trainer must not outlive the run's lock
        # (a resume could then start while it still writes checkpoints). Its checkpoints stay.
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        where = f" (full output: {log_path})" if log_path else ""
        raise TrainingError(f"{job} training exited with code {proc.returncode}{where}; last output:\n" + "\n".join(tail))
    return json.loads(Path(spec.output_dir, "train_metrics.json").read_text())
