"""Launching a training job: in this process, or as a subprocess (replaceable by ``accelerate launch``)."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from alignment.training import DPOSpec, train_dpo


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


def run_subprocess(module: str, job: str, spec, *, spec_path: Path, log=print) -> dict:
    """Run ``python -m MODULE JOB SPEC.json`` (or ``$SELFALIGN_TRAIN_LAUNCHER -m ...``, e.g.
    ``accelerate launch -m``), stream its ``[train]`` lines to ``log``, and return the
    ``train_metrics.json`` it leaves in ``spec.output_dir``. The child dies with this process."""
    spec_path.write_text(json.dumps(asdict(spec), indent=1))
    cmd = os.environ.get("SELFALIGN_TRAIN_LAUNCHER", f"{sys.executable} -m").split() + [module, job, str(spec_path)]
    env = dict(os.environ, SELFALIGN_RUN_PID=os.environ.get("SELFALIGN_RUN_PID", str(os.getpid())),
               TOKENIZERS_PARALLELISM="false", TRL_EXPERIMENTAL_SILENCE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH")])))
    log(f"training: {' '.join(cmd)}")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    tail: list[str] = []
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            line = line.rstrip()
            tail = (tail + [line])[-40:]
            if line.startswith("[train]"):
                log(line.removeprefix("[train] "))
        proc.wait()
    finally:
        # Ctrl-C or an error in this process: the trainer must not outlive the run's lock
        # (a resume could then start while it still writes checkpoints). Its checkpoints stay.
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise TrainingError(f"{job} training exited with code {proc.returncode}; last output:\n" + "\n".join(tail))
    return json.loads(Path(spec.output_dir, "train_metrics.json").read_text())
