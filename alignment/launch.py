"""Launching a training job: in this process, or as a subprocess (replaceable by ``accelerate launch``)."""

from __future__ import annotations

import builtins
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
from alignment.generation import has_cuda
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


def resolve_launcher(requested: str, *, on_gpu: bool, env: dict | None = None) -> str:
    """``requested`` unless it is ``auto``: then ``subprocess`` on a GPU (the trainer's memory is
    given back when it exits) or when ``SELFALIGN_TRAIN_LAUNCHER`` names a launcher (e.g.
    ``accelerate launch -m``), else ``inprocess`` (on CPU a trainer process costs ~10 s of imports
    per training job, 8% of a demo iteration, and gives back nothing the run needs)."""
    if requested != "auto":  # subprocess, inprocess, accelerate
        return requested
    env = os.environ if env is None else env
    return "subprocess" if on_gpu or env.get("SELFALIGN_TRAIN_LAUNCHER") else "inprocess"


def accelerate_config_file(name_or_path: str) -> Path:
    """The file of a shipped accelerate config (``fsdp``, ``zero2``, ``zero3``:
    ``alignment/accelerate_configs/NAME.yaml``), else the path as given."""
    shipped = Path(__file__).resolve().parent / "accelerate_configs" / f"{name_or_path}.yaml"
    return shipped if "/" not in name_or_path and shipped.is_file() else Path(name_or_path)


def accelerate_prefix(num_processes: int, config: str | None) -> list[str]:
    """``python -m accelerate.commands.launch --num_processes N --num_machines 1`` and then either
    ``--config_file F`` (FSDP, DeepSpeed: the file says how) or, without one, DDP over the N
    processes: ``--multi_gpu``, i.e. torchrun, which is NCCL over GPUs and gloo over CPU processes
    (accelerate's ``--cpu`` would start one process); to be followed by ``-m MODULE ARGS``.
    ``--num_processes`` wins over a config file's own count. Mixed precision is left to the
    trainer (TrainingArguments sets it from the GPU)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
           "--num_machines", "1"]
    if config:
        return cmd + ["--config_file", str(accelerate_config_file(config))]
    return cmd + (["--multi_gpu"] if num_processes > 1 else []) + ["--mixed_precision", "no", "--dynamo_backend", "no"]


def accelerate_config_kind(path: Path) -> str:
    """``distributed_type`` of an accelerate config file, YAML or JSON (JSON is YAML): DEEPSPEED,
    FSDP, MULTI_GPU, ..."""
    import yaml

    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return str((data or {}).get("distributed_type", "NO")).upper() if isinstance(data, dict) else "NO"


def training_setup_problems(train, *, on_gpu: bool | None = None) -> list[str]:
    """What this machine cannot run of a train section, as "field ...: why" lines, checked before a
    run starts: an accelerate config file that is missing or unreadable, DeepSpeed without the
    ``deepspeed`` package, FSDP / DeepSpeed or ``load_in_4bit`` without a CUDA GPU, QLoRA without
    ``bitsandbytes``."""
    import importlib.util

    on_gpu = has_cuda() if on_gpu is None else on_gpu
    problems = []
    if train.accelerate_config:
        path = accelerate_config_file(train.accelerate_config)
        try:
            kind = accelerate_config_kind(path)
        except (OSError, ValueError) as err:  # yaml.YAMLError is a ValueError
            return [f"field train.accelerate_config: cannot read {path}: {getattr(err, 'strerror', None) or err}"]
        if kind in ("DEEPSPEED", "FSDP") and not on_gpu:
            problems.append(f"field train.accelerate_config: {path.name} is {kind}, which needs CUDA GPUs "
                            "(on CPU leave it out: several processes are DDP over gloo)")
        if kind == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
            problems.append(f"field train.accelerate_config: {path.name} uses DeepSpeed: pip install deepspeed")
    if train.load_in_4bit and not on_gpu:
        problems.append("field train.load_in_4bit: QLoRA's 4-bit base needs a CUDA GPU (bitsandbytes)")
    elif train.load_in_4bit and importlib.util.find_spec("bitsandbytes") is None:
        problems.append("field train.load_in_4bit: needs bitsandbytes (pip install bitsandbytes)")
    return problems


def run_dpo(spec: DPOSpec, *, launcher: str, spec_path: Path, accelerate_config: str | None = None, log=print) -> dict:
    """Train ``spec`` with the resolved launcher: in this process, a subprocess, or ``accelerate
    launch`` over ``spec.num_processes`` processes (rank 0 writes the adapter and metrics)."""
    how = resolve_launcher(launcher, on_gpu=has_cuda())
    if how == "inprocess":
        return run_inprocess(lambda: train_dpo(spec), "dpo", spec_path=spec_path, log=log)
    prefix = accelerate_prefix(spec.num_processes, accelerate_config) + ["-m"] if how == "accelerate" else None
    return run_subprocess("alignment.training", "dpo", spec, spec_path=spec_path, log=log, prefix=prefix)


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


class JobOutput:
    """Where a training job's output lines go, under either launcher: appended to
    ``RUN/logs/iter_<t>-<stage>-<job>.log``, echoed to stderr under ``selfalign run -v``, its
    ``[train]`` lines to ``log`` and (on a terminal) a step bar; the last 40 lines kept for an error."""

    def __init__(self, job: str, spec_path: Path, log, header: str):
        self.log, self.tail, self.path = log, [], job_log_path(spec_path, job)
        self.echo = os.environ.get(console.VERBOSE_ENV) == "1"
        self.bars = _StepBars(" ".join(p.replace("_", " ") for p in self.path.stem.split("-")[:2]) if self.path else job)
        self.sink = None
        if self.path is not None:
            self.path.parent.mkdir(exist_ok=True)
            self.sink = open(self.path, "a", encoding="utf-8")
            self.sink.write(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} {header}\n")

    def line(self, line: str) -> None:
        if self.sink is not None:
            self.sink.write(line if line.endswith("\n") else line + "\n")
            self.sink.flush()
        if self.echo:
            sys.stderr.write(line if line.endswith("\n") else line + "\n")
        line = line.rstrip()
        self.tail = (self.tail + [line])[-40:]
        if line.startswith("[train]"):
            self.log(line.removeprefix("[train] "))
            self.bars.update(line.removeprefix("[train] "))

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()


class _Lines:
    """A write-only text stream that hands each complete line to ``emit`` (for ``redirect_stdout``)."""

    def __init__(self, emit):
        self.emit, self.buffer = emit, ""

    def write(self, text: str) -> int:
        self.buffer += text
        *lines, self.buffer = self.buffer.split("\n")
        for line in lines:
            self.emit(line)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:  # what a trainer subprocess's stdout, a pipe, answers (transformers asks)
        return False

    def close(self) -> None:
        if self.buffer:
            self.emit(self.buffer)
            self.buffer = ""


def plain_print(*objects, sep: str | None = " ", end: str | None = "\n", file=None, flush: bool = False) -> None:
    """The builtin ``print``: ``file.write(sep.join(map(str, objects)) + end)``, ``file`` defaulting
    to ``sys.stdout`` (nothing when there is none)."""
    file = sys.stdout if file is None else file
    if file is None:
        return
    file.write((" " if sep is None else sep).join(map(str, objects)) + ("\n" if end is None else end))
    if flush:
        file.flush()


@contextlib.contextmanager
def printing_with(fn):
    """``builtins.print`` is ``fn`` inside the block, and what it was again after it."""
    outer = builtins.print
    builtins.print = fn
    try:
        yield
    finally:
        builtins.print = outer


def run_inprocess(train, job: str, *, spec_path: Path, log=print) -> dict:
    """Run ``train()`` in this process with its printed lines handled as a subprocess's are
    (:class:`JobOutput`: job log, ``[train]`` lines to ``log``, step bar) and return its metrics.

    ``train()`` runs with the plain ``print``: a Prefect flow with ``log_prints`` patches it to
    send file-less prints to the flow's logger past ``sys.stdout``, which would take the trainer's
    lines from its log and blind libraries that capture ``sys.stdout`` to read what they print
    (dill finds a function's globals in ``dis.dis`` output when datasets fingerprints a map
    function). The run's own log keeps the ``print`` of its caller."""
    stdout, outer_print = sys.stdout, builtins.print

    def log_outside(message: str) -> None:  # the run's own log prints where it always did
        with contextlib.redirect_stdout(stdout), printing_with(outer_print):
            log(message)

    output = JobOutput(job, spec_path, log_outside, header=f"in process: {job}")
    log(f"training: {job} in this process" + (f" (output: {output.path})" if output.path else ""))
    lines = _Lines(output.line)
    try:
        with contextlib.redirect_stdout(lines), printing_with(plain_print):
            return train()
    finally:
        lines.close()
        output.close()


def run_subprocess(module: str, job: str, spec, *, spec_path: Path, log=print, prefix: list[str] | None = None) -> dict:
    """Run ``PREFIX MODULE JOB SPEC.json`` — PREFIX: ``python -m``, ``$SELFALIGN_TRAIN_LAUNCHER``
    (e.g. ``accelerate launch -m``) or the given one (``accelerate_prefix`` + ``-m``) — stream
    its ``[train]`` lines to ``log``, and return the ``train_metrics.json`` it leaves in
    ``spec.output_dir``. The child dies with this process.

    Its whole output is appended to ``RUN/logs/iter_<t>-<stage>-<job>.log`` (``job_log_path``),
    and echoed to stderr under ``selfalign run -v``; on a terminal its step lines draw a bar."""
    spec_path.write_text(json.dumps(asdict(spec), indent=1))
    prefix = prefix or os.environ.get("SELFALIGN_TRAIN_LAUNCHER", f"{sys.executable} -m").split()
    cmd = prefix + [module, job, str(spec_path)]
    env = dict(os.environ, SELFALIGN_RUN_PID=os.environ.get("SELFALIGN_RUN_PID", str(os.getpid())),
               TOKENIZERS_PARALLELISM="false", TRL_EXPERIMENTAL_SILENCE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH")])))
    output = JobOutput(job, spec_path, log, header=" ".join(cmd))
    log(f"training: {' '.join(cmd)}" + (f" (output: {output.path})" if output.path else ""))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            output.line(line)
        proc.wait()
    finally:
        output.close()
        # Ctrl-C or an error in this process: the trainer must not outlive the run's lock
        # (a resume could then start while it still writes checkpoints). Its checkpoints stay.
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        where = f" (full output: {output.path})" if output.path else ""
        raise TrainingError(f"{job} training exited with code {proc.returncode}{where}; last output:\n" + "\n".join(output.tail))
    return json.loads(Path(spec.output_dir, "train_metrics.json").read_text())
