"""The run's console: rate / ETA / bar formatting (hand-computed numbers), the bar on a terminal,
plain lines elsewhere, the stage-line handler and the fd-level redirect of everything else."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from alignment.console import (
    Console,
    StageLineHandler,
    bar_text,
    duration_text,
    eta_seconds,
    progress_line,
    rate_text,
)
from tests.conftest import REPO


# --------------------------------------------------------------------------- pure formatting


def test_eta_is_remaining_times_elapsed_over_done():
    assert eta_seconds(done=3, total=10, elapsed=60.0) == pytest.approx(140.0)  # 7 × 60 / 3
    assert eta_seconds(done=10, total=10, elapsed=60.0) == 0.0
    assert eta_seconds(done=0, total=10, elapsed=60.0) is None  # no pace yet


def test_eta_ignores_units_done_before_the_clock_started():
    # 4 shards were on disk from a killed run; 2 more took 50 s: 25 s each, 4 left -> 100 s.
    assert eta_seconds(done=6, total=10, elapsed=50.0, start_done=4) == pytest.approx(100.0)
    assert eta_seconds(done=4, total=10, elapsed=0.1, start_done=4) is None


def test_rate_reads_per_second_or_seconds_per_unit():
    assert rate_text(3, 75.0, "shard") == "25.0 s/shard"  # 75 / 3
    assert rate_text(30, 12.0, "step") == "2.50 steps/s"  # 30 / 12
    assert rate_text(1, 1.0, "step") == "1.00 steps/s"
    assert rate_text(0, 5.0, "shard") == "– s/shard"


@pytest.mark.parametrize("seconds, text", [(0, "0:00"), (59.4, "0:59"), (61, "1:01"), (3600, "1:00:00"),
                                           (3725, "1:02:05"), (None, "?")])
def test_durations(seconds, text):
    assert duration_text(seconds) == text


def test_bar_fills_in_proportion():
    assert bar_text(1, 4, 8) == "██░░░░░░"
    assert bar_text(4, 4, 8) == "████████"
    assert bar_text(0, 0, 4) == "░░░░"


def test_progress_lines_plain_bar_and_finished():
    assert progress_line("iter 1 judge", 2, 8, 50.0, unit="shard") == \
        "iter 1 judge: 2/8 shards (25%), 25.0 s/shard, ETA 2:30"  # 6 × 50 / 2 = 150 s
    assert progress_line("iter 1 judge", 2, 8, 50.0, unit="shard", bar_width=8) == \
        "iter 1 judge ██░░░░░░ 2/8 shards 25.0 s/shard ETA 2:30"
    assert progress_line("iter 1 judge", 8, 8, 200.0, unit="shard") == \
        "iter 1 judge: 8/8 shards in 3:20 (25.0 s/shard)"
    # resumed: 3 of 8 on disk, 1 more in 40 s -> 4 left × 40 s
    assert progress_line("iter 2 generate", 4, 8, 40.0, start_done=3, unit="shard") == \
        "iter 2 generate: 4/8 shards (50%), 40.0 s/shard, ETA 2:40"


# --------------------------------------------------------------------------- the console


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_plain_console_prints_one_line_per_update_and_stage_lines_with_time():
    out, clock = io.StringIO(), FakeClock()
    console = Console(out, tty=False, clock=clock, timestamp=lambda: "12:00:00")
    bar = console.progress("iter 1 generate", unit="shard", start_done=1)
    bar.update(1, 3)  # on disk already: the stage said so, nothing to add
    clock.now += 30
    bar.update(2, 3)
    console.line("iter 1 generate: shard 2/3 (4 items, 30.0s)")
    clock.now += 30
    bar.update(3, 3)
    assert out.getvalue().splitlines() == [
        "iter 1 generate: 2/3 shards (67%), 30.0 s/shard, ETA 0:30",
        "12:00:00 - iter 1 generate: shard 2/3 (4 items, 30.0s)",
        "iter 1 generate: 3/3 shards in 1:00 (30.0 s/shard)",
    ]
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()


def test_tty_console_redraws_the_bar_under_the_stage_lines():
    out, clock = io.StringIO(), FakeClock()
    console = Console(out, tty=True, width=100, clock=clock, timestamp=lambda: "12:00:00")
    bar = console.progress("iter 1 judge", unit="shard")
    clock.now += 10
    bar.update(1, 2)
    console.line("iter 1 judge: shard 1/2")
    clock.now += 10
    bar.update(2, 2)
    text = out.getvalue()
    assert "\r\x1b[K12:00:00 - iter 1 judge: shard 1/2\n" in text  # the bar is cleared, the line printed
    assert text.count("1/2 shards") == 2  # drawn, then redrawn under the line
    assert text.endswith("iter 1 judge: 2/2 shards in 0:20 (10.0 s/shard)\n")  # the finished bar stays


def test_close_ends_an_unfinished_bar():
    out = io.StringIO()
    console = Console(out, tty=True, width=80)
    console.progress("iter 1 judge", unit="shard").update(1, 3)
    console.close()
    assert out.getvalue().endswith("\n")


def test_stage_line_handler_shows_only_records_logged_from_the_given_sources(tmp_path):
    out = io.StringIO()
    console = Console(out, tty=False, timestamp=lambda: "t")
    handler = StageLineHandler(console, sources=[REPO / "tests"])
    logger = logging.getLogger("test-console-stage-lines")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        logger.info("iter 1 generate: shard 1/2")  # logged from a project file: shown
        library = tmp_path / "library.py"
        library.write_text("def log(logger):\n    logger.info('Finished in state Completed()')\n")
        namespace: dict = {}
        exec(compile(library.read_text(), str(library), "exec"), namespace)
        namespace["log"](logger)  # logged from a library file: not shown
    finally:
        logger.removeHandler(handler)
    assert out.getvalue() == "t - iter 1 generate: shard 1/2\n"


def test_output_to_sends_fd_level_output_of_this_process_and_children_to_the_file(tmp_path):
    """C-level prints and child processes write to fds 1/2: they land in the log file; the
    console stream still reaches the original stderr; the fds are back afterwards."""
    script = textwrap.dedent(f"""
        import os, subprocess, sys
        from alignment.console import output_to
        with output_to({str(tmp_path / 'output.log')!r}) as console:
            os.write(2, b"C-level notice\\n")
            print("a library print", flush=True)
            subprocess.run([sys.executable, "-c", "import sys; print('child stderr', file=sys.stderr)"])
            console.write("for the terminal\\n")
            console.flush()
        print("after", file=sys.stderr)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == "for the terminal\nafter\n"
    log = Path(tmp_path / "output.log").read_text()
    assert "C-level notice" in log and "a library print" in log and "child stderr" in log


# --------------------------------------------------------------------------- log files


def test_trainer_log_is_named_for_its_iteration_stage_and_job(tmp_path):
    from alignment.launch import job_log_path

    (tmp_path / "run.json").write_text("{}")
    spec = tmp_path / "iter_2" / "train" / "checkpoints" / "spec.json"
    assert job_log_path(spec, "dpo") == tmp_path / "logs" / "iter_2-train-dpo.log"
    assert job_log_path(tmp_path.parent / "elsewhere" / "spec.json", "dpo") is None  # not in a run dir


@pytest.mark.parametrize("line, step", [("step 3/10 loss 0.6931 margin 0.0", (None, 3, 10)),
                                        ("ppo step 2/4 reward 0.1 kl 0.0", ("ppo", 2, 4)),
                                        ("rm step 1/5 loss 0.7", ("rm", 1, 5)),
                                        ("resuming from checkpoint-1", None), ("steps 1/2", None)])
def test_trainer_step_lines_feed_the_training_bar(line, step):
    from alignment.launch import step_progress

    assert step_progress(line) == step


def test_vllm_logs_go_to_the_file_named_by_its_logging_config(tmp_path):
    """The hook the CLI uses (VLLM_LOGGING_CONFIG_PATH, applied by vLLM's engine from the environment,
    in this process and in its worker, which inherits it): vLLM's records land in the file, none on
    stdout/stderr, and other loggers' configuration survives vLLM's dictConfig."""
    pytest.importorskip("vllm")
    from flows.cli import vllm_logging_config

    config = tmp_path / "vllm-logging.json"
    config.write_text(__import__("json").dumps(vllm_logging_config(tmp_path / "vllm.log")))
    script = ("import logging; other = logging.getLogger('other'); other.addHandler(logging.StreamHandler()); "
              "from vllm.config.logging import LoggingConfig; from vllm.logger import configure_logging, init_logger; "
              "configure_logging(LoggingConfig()); init_logger('vllm.test').info('engine says hello'); "
              "other.warning('still here')")
    env = dict(os.environ, VLLM_CONFIGURE_LOGGING="1", VLLM_LOGGING_CONFIG_PATH=str(config))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "engine says hello" in (tmp_path / "vllm.log").read_text()
    assert "engine says hello" not in proc.stdout + proc.stderr and "still here" in proc.stderr


def test_trainer_output_goes_whole_to_its_log_and_a_failure_names_it(tmp_path, monkeypatch):
    """Only the ``[train]`` lines reach the stage log; everything the trainer writes (stderr too)
    is in RUN/logs/iter_1-train-dpo.log, which the error names."""
    from alignment.launch import TrainingError, run_dpo
    from alignment.training import DPOSpec

    (tmp_path / "run.json").write_text("{}")
    ckpt = tmp_path / "iter_1" / "train" / "checkpoints"
    ckpt.mkdir(parents=True)
    fake = tmp_path / "fake_trainer.py"
    fake.write_text("import sys\nprint('loading weights', flush=True)\nprint('[train] step 1/2 loss 0.69', flush=True)\n"
                    "print('Traceback: boom', file=sys.stderr)\nsys.exit(3)\n")
    monkeypatch.setenv("SELFALIGN_TRAIN_LAUNCHER", f"{sys.executable} {fake}")
    spec = DPOSpec(base="m", data="d", output_dir=str(tmp_path), checkpoint_dir=str(ckpt / "trainer"))
    lines: list[str] = []
    with pytest.raises(TrainingError, match="exited with code 3 .full output: .*iter_1-train-dpo.log"):
        run_dpo(spec, launcher="subprocess", spec_path=ckpt / "spec.json", log=lines.append)
    log = (tmp_path / "logs" / "iter_1-train-dpo.log").read_text()
    assert "loading weights" in log and "Traceback: boom" in log and "[train] step 1/2 loss 0.69" in log
    assert "step 1/2 loss 0.69" in lines and not any("loading weights" in line for line in lines)


@pytest.mark.parametrize("requested, on_gpu, env, launcher", [
    ("auto", False, {}, "inprocess"),
    ("auto", True, {}, "subprocess"),
    ("auto", False, {"SELFALIGN_TRAIN_LAUNCHER": "accelerate launch -m"}, "subprocess"),
    ("subprocess", False, {}, "subprocess"),
    ("inprocess", True, {}, "inprocess"),
])
def test_auto_launcher_trains_in_process_on_cpu_only(requested, on_gpu, env, launcher):
    from alignment.launch import resolve_launcher

    assert resolve_launcher(requested, on_gpu=on_gpu, env=env) == launcher


def test_in_process_training_output_goes_where_a_subprocess_output_goes(tmp_path, capsys):
    """The same routing as a trainer subprocess: everything printed to the job's log, the ``[train]``
    lines (only) to the stage log, nothing on this process's stdout; an unfinished last line kept."""
    from alignment.launch import run_inprocess

    (tmp_path / "run.json").write_text("{}")
    spec_path = tmp_path / "iter_1" / "train" / "checkpoints" / "spec.json"
    spec_path.parent.mkdir(parents=True)

    def train():
        print("loading weights")
        print("[train] step 1/2 loss 0.69", flush=True)
        print("[train] step 2/2 ", end="")
        print("loss 0.55")
        print("no newline at the end", end="")
        return {"loss": 0.55}

    lines: list[str] = []
    assert run_inprocess(train, "dpo", spec_path=spec_path, log=lines.append) == {"loss": 0.55}
    log = (tmp_path / "logs" / "iter_1-train-dpo.log").read_text()
    assert "loading weights\n[train] step 1/2 loss 0.69\n[train] step 2/2 loss 0.55\nno newline at the end\n" in log
    assert lines[1:] == ["step 1/2 loss 0.69", "step 2/2 loss 0.55"] and "in this process" in lines[0]
    assert capsys.readouterr().out == ""


def test_in_process_training_keeps_the_run_log_on_its_own_stream(tmp_path, capsys):
    """A stage log that prints (the default ``log=print``) prints to the run's stdout, not back
    into the job's output."""
    from alignment.launch import run_inprocess

    (tmp_path / "run.json").write_text("{}")
    spec_path = tmp_path / "iter_1" / "train" / "checkpoints" / "spec.json"
    spec_path.parent.mkdir(parents=True)
    run_inprocess(lambda: print("[train] step 1/1 loss 0.5") or {}, "dpo", spec_path=spec_path)
    assert capsys.readouterr().out.splitlines()[-1] == "step 1/1 loss 0.5"
    assert (tmp_path / "logs" / "iter_1-train-dpo.log").read_text().count("step 1/1") == 1


def test_in_process_training_output_reaches_its_log_under_prefects_log_prints(tmp_path, prefect_harness):
    """A flow with ``log_prints=True`` (every selfalign flow) patches ``print`` to send file-less
    prints to Prefect's logger, past ``sys.stdout``: the trainer's lines then skipped the job log,
    and libraries that capture ``sys.stdout`` to read what they print (dill reads a function's
    globals from ``dis.dis`` output while datasets fingerprints a map function) lost it to the run
    log. Inside a flow, in-process training must route its output as it does outside one."""
    import dill.detect
    from prefect import flow

    from alignment.launch import run_inprocess

    (tmp_path / "run.json").write_text("{}")
    spec_path = tmp_path / "iter_1" / "train" / "checkpoints" / "spec.json"
    spec_path.parent.mkdir(parents=True)
    lines: list[str] = []

    def train():
        print("loading weights")
        print("[train] step 1/1 loss 0.5", flush=True)
        return {"globals": sorted(dill.detect.nestedglobals(_reads_two_globals))}

    @flow(log_prints=True)
    def job():
        return run_inprocess(train, "dpo", spec_path=spec_path, log=lines.append)

    assert job() == {"globals": ["json", "os"]}
    log = (tmp_path / "logs" / "iter_1-train-dpo.log").read_text()
    assert "loading weights\n[train] step 1/1 loss 0.5\n" in log and "LOAD_GLOBAL" not in log
    assert lines[1:] == ["step 1/1 loss 0.5"]


def _reads_two_globals():
    return os.sep + json.dumps(1)
