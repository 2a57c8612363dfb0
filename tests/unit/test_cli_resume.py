"""CLI level: `selfalign status` on killed runs, the lock message, bad input (exit 2, nothing written).

Fast: no model is run (run directories are built with the store, as a killed run leaves them).
The end-to-end kill/resume cycle is tests/integration/test_fault_injection.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from alignment.config import load_recipe
from alignment.stages import run_sharded, shard_key
from alignment.store import RunStore
from flows.cli import main
from tests.conftest import REPO, write_recipe


@pytest.fixture
def recipe(tmp_path, tiny_model_dir, prompts_file):
    return write_recipe(tmp_path / "recipe.yaml", str(tiny_model_dir), prompts_file)


@pytest.fixture
def run_dir(tmp_path, recipe):
    """A run as a SIGKILL during judging leaves it: prompts/generate done, 1 of 2 judge shards,
    a stale lock file naming the dead process, a "start" event with no end."""
    _, data = load_recipe(recipe)
    store = RunStore.create(tmp_path / "run", recipe=data, algorithm="self-rewarding", name="test")
    rows = [{"prompt_id": f"p{i}", "prompt": f"q{i}"} for i in range(4)]
    for stage in ("prompts", "generate"):
        store.log_event("start", t=1, stage=stage)
        store.write_rows(1, stage, rows, inputs={}, recipe_hash="r")
        store.log_event("done", t=1, stage=stage, rows=4)
    store.log_event("start", t=1, stage="judge")
    dead = 2**22 + 4321  # above pid_max: never a live process
    with pytest.raises(KeyboardInterrupt):  # "killed" while computing the second shard
        run_sharded(store, 1, "judge", rows, shard_size=2, key=shard_key("x"), log=lambda m: None,
                    compute=lambda chunk, i: list(chunk) if i == 0 else (_ for _ in ()).throw(KeyboardInterrupt()))
    (store.root / "lock").write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "since": "2025-01-01T00:00"}))
    return store.root


def _snapshot(path):
    return sorted((p.relative_to(path).as_posix(), p.stat().st_size) for p in path.rglob("*")) if path.exists() else None


def _cli(*args, timeout=60):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    for k in ("SELFALIGN_CRASH_AT", "SELFALIGN_CRASH_SIGNAL"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


# --------------------------------------------------------------------------- status


def test_status_reports_a_killed_run(run_dir, capsys):
    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert "lock: pid 4198625 on" in out and "(stale: that process is gone" in out
    assert "done, 4 rows" in lines["prompts"] and "done, 4 rows" in lines["generate"]
    assert "partial (1/2 shards, 2 rows)" in lines["judge"]
    assert "interrupted: pid" in lines["judge"]
    for stage in ("pairs", "train"):
        assert "not started" in lines[stage]
    assert f"resume with: selfalign resume {run_dir}" in out


def test_status_reports_ctrl_c_and_the_last_error(run_dir, capsys):
    store = RunStore(run_dir)
    store.log_event("error", t=1, stage="judge", message="interrupted (Ctrl-C / SIGINT)")
    store.log_event("error", message="interrupted (Ctrl-C)")
    (run_dir / "lock").unlink()
    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    judge = next(line for line in out.splitlines() if line.strip().startswith("judge"))
    assert "partial (1/2 shards, 2 rows)  last error: interrupted (Ctrl-C / SIGINT)" in judge
    assert "interrupted: pid" not in judge  # the error event says what happened
    assert "last error: interrupted (Ctrl-C) (" in out and "lock:" not in out


def test_status_of_a_live_run_says_running(run_dir, capsys):
    with RunStore(run_dir).lock():
        assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"lock: pid {os.getpid()} on {socket.gethostname()}" in out and "(running)" in out
    assert "interrupted: pid" not in out  # a live run's current stage is not "killed"
    assert "resume with" not in out


def test_status_says_a_garbage_manifest_is_damaged(run_dir, capsys):
    (run_dir / "iter_1" / "prompts" / "manifest.json").write_text("{garbage")
    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    prompts = next(line for line in out.splitlines() if line.strip().startswith("prompts"))
    assert "damaged" in prompts and "manifest.json" in prompts and "not started" not in prompts


def test_status_reports_a_lock_naming_a_live_unrelated_process(run_dir, capsys):
    sleeper = subprocess.Popen(["sleep", "30"])  # pid reuse: the lock's pid is alive, but it is not our run
    try:
        (run_dir / "lock").write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "since": "x"}))
        assert main(["status", str(run_dir)]) == 0
    finally:
        sleeper.kill()
        sleeper.wait()
    out = capsys.readouterr().out
    assert f"lock: pid {sleeper.pid}" in out and "(running)" not in out
    assert "alive but does not hold the lock" in out
    assert "interrupted: pid" in out and f"resume with: selfalign resume {run_dir}" in out


def test_status_of_a_non_run_exits_2(tmp_path, capsys):
    assert main(["status", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "nope").exists()


# --------------------------------------------------------------------------- lock


def test_second_process_exits_at_once_naming_the_holder(run_dir):
    with RunStore(run_dir).lock():
        before = _snapshot(run_dir)
        started = time.monotonic()
        proc = _cli("resume", str(run_dir))
        elapsed = time.monotonic() - started
        after = _snapshot(run_dir)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("selfalign: error: run dir")
    assert f"is locked by pid {os.getpid()} on host {socket.gethostname()} since" in proc.stderr
    assert "Prefect" not in proc.stdout + proc.stderr and elapsed < 30
    assert after == before


def test_the_lock_is_held_from_the_check_on(run_dir, tmp_path):
    """Between the CLI's lock check and the flow taking the lock (Prefect's start-up, ~20 s) a
    second run must already find the run locked and exit 2 at once."""
    ready, go = tmp_path / "ready", tmp_path / "go"
    script = textwrap.dedent(f"""
        import pathlib, sys, time
        import flows.registry
        from alignment.store import RunStore

        def slow_flow(run_dir, recipe_path=None, overrides=None):  # a flow whose Prefect start is slow
            pathlib.Path({str(ready)!r}).write_text("")
            while not pathlib.Path({str(go)!r}).exists():
                time.sleep(0.05)
            with RunStore(run_dir).lock():  # what every flow does: inherits the CLI's lock
                pass
            return {{"run_dir": run_dir}}

        flows.registry.flow_for = lambda algorithm: slow_flow
        from flows.cli import main
        sys.exit(main(["resume", {str(run_dir)!r}]))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    first = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), first.communicate()
        try:
            second = _cli("resume", str(run_dir), timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("the second run was not refused: it passed the lock check and went on")
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"is locked by pid {first.pid} on host" in second.stderr
    finally:
        go.write_text("")
        out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err[-2000:]
    assert not (run_dir / "lock").exists()


# --------------------------------------------------------------------------- bad input: exit 2, nothing written


@pytest.mark.parametrize("argv, message", [
    (["run", "{tmp}/missing.yaml", "--run-dir", "{tmp}/new"], "recipe file not found"),
    (["run", "{recipe}", "--run-dir", "{tmp}/new", "--set", "train.batch_size=0"], "field train.batch_size"),
    (["run", "{recipe}", "--run-dir", "{tmp}/new", "--set", "prompts.source={tmp}/none.jsonl"], "none.jsonl"),
    (["resume", "{tmp}/new"], "does not exist"),
    (["run", "{tmp}", "--run-dir", "{tmp}/new"], "is a directory, not a recipe file"),
    (["run", "{recipe}", "--run-dir", "{tmp}/new", "--set", "=5"], "--set '=5': no field name"),
    (["run", "{tmp}/latin1.yaml", "--run-dir", "{tmp}/new"], "latin1.yaml: not UTF-8 text"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, recipe, capsys, argv, message):
    argv = [a.format(tmp=tmp_path, recipe=recipe) for a in argv]
    (tmp_path / "latin1.yaml").write_bytes("algorithm: self-rewarding\nname: caf\xe9\n".encode("latin-1"))
    before = _snapshot(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("selfalign: error:") and message in err and err.count("\n") == 1
    assert _snapshot(tmp_path) == before


def test_resume_of_a_plain_directory_exits_2(tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x.txt").write_text("mine")
    assert main(["resume", str(tmp_path / "plain")]) == 2
    assert "is not a selfalign run" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["x.txt"]


def test_run_with_another_recipe_on_an_existing_run_exits_2(run_dir, recipe, capsys):
    other = write_recipe(recipe.parent / "other.yaml", load_recipe(recipe)[0].model, recipe.parent / "prompts.jsonl",
                         seed=1)
    before = _snapshot(run_dir)
    assert main(["run", str(other), "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "different recipe" in err and "seed" in err and f"selfalign resume {run_dir}" in err
    assert _snapshot(run_dir) == before


@pytest.mark.parametrize("name, content, message", [
    ("run.json", "[1, 2]", "run.json: not a JSON object"),
    ("recipe.yaml", b"algorithm: self-rewarding\nname: caf\xe9\n", "recipe.yaml: not UTF-8 text"),
    ("recipe.yaml", "- a list\n", "recipe.yaml: not a YAML mapping"),
])
@pytest.mark.parametrize("command", ["resume", "status"])
def test_a_damaged_run_file_is_one_line_exit_2(run_dir, capsys, command, name, content, message):
    path = run_dir / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    before = _snapshot(run_dir)
    code = main([command, str(run_dir)])
    err = capsys.readouterr().err
    if command == "status" and name == "recipe.yaml":
        assert code == 0  # status does not need the recipe
        return
    assert code == 2 and err.startswith("selfalign: error:") and message in err and err.count("\n") == 1, err
    assert _snapshot(run_dir) == before


@pytest.mark.parametrize("argv", [["resume", "{run}", "--set", "train.beta=0.5"],
                                  ["run", "{recipe}", "--run-dir", "{run}", "--change-recipe", "--set", "train.beta=0.5"]])
def test_a_recipe_change_is_refused_while_the_run_is_locked(run_dir, recipe, capsys, argv):
    argv = [a.format(run=run_dir, recipe=recipe) for a in argv]
    with RunStore(run_dir).lock():
        before = _snapshot(run_dir)
        assert main(argv) == 2
        after = _snapshot(run_dir)
    assert "is locked by pid" in capsys.readouterr().err
    assert after == before


def test_a_bad_override_on_resume_names_the_field_and_writes_nothing(run_dir, capsys):
    (run_dir / "lock").unlink()
    before = _snapshot(run_dir)
    assert main(["resume", str(run_dir), "--set", "train.beta=-1"]) == 2
    err = capsys.readouterr().err
    assert "field train.beta" in err and err.count("\n") == 1
    assert _snapshot(run_dir) == before


def test_resume_with_a_damaged_stored_recipe_exits_2(run_dir, capsys):
    (run_dir / "recipe.yaml").write_text("algorithm: self-rewarding\nmodel: [\n")
    before = _snapshot(run_dir)
    assert main(["resume", str(run_dir)]) == 2
    assert "recipe.yaml" in capsys.readouterr().err
    assert _snapshot(run_dir) == before


def test_disk_full_while_writing_is_a_clear_error(tmp_path, recipe, prefect_harness):
    """ENOSPC from the first stage write: one clear line naming the file, the reason and what to do.

    Runs the real CLI in a subprocess whose parquet writer fails with ENOSPC (running the flow
    in-process under capsys would leave Prefect's log handlers on a closed stream)."""
    from prefect.settings import PREFECT_API_URL

    script = (
        "import errno, sys\n"
        "import pyarrow.parquet as pq\n"
        "def full(*a, **k):\n"
        "    raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "pq.write_table = full\n"
        "from flows.cli import main\n"
        f"sys.exit(main(['run', {str(recipe)!r}, '--run-dir', {str(tmp_path / 'run')!r}]))\n"
    )
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    err = [line for line in proc.stderr.splitlines() if line.startswith("selfalign: error:")]
    assert len(err) == 1, proc.stderr[-2000:]
    assert "cannot write" in err[0] and "prompts/data.parquet" in err[0]
    assert "No space left on device (errno 28); free some disk space and resume the run" in err[0]
    assert not list((tmp_path / "run").rglob("*.tmp-*"))
    assert not (tmp_path / "run" / "lock").exists()


def test_sigterm_stops_cleanly_and_the_run_resumes(tmp_path, recipe, prefect_harness):
    """`kill PID` / a scheduler's preemption: exit 143, the stage records "terminated (SIGTERM)",
    the lock is released, the shard on disk is kept and a resume finishes the run."""
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), SELFALIGN_CRASH_AT="iter1/generate/shard0",
               SELFALIGN_CRASH_SIGNAL="SIGTERM",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(recipe), "--run-dir", str(run),
                           "--set", "engine.shard_size=2"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 143, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"terminated (SIGTERM); the run is resumable: selfalign resume {run}" in proc.stderr
    assert not (run / "lock").exists()
    store = RunStore.open(run)
    assert ("error", "generate", "terminated (SIGTERM)") in {(e["event"], e["stage"], e.get("message"))
                                                             for e in store.events()}
    assert store.read_shards(1, "generate", key=next(iter(_shard_keys(run))))  # shard 0 kept
    env.pop("SELFALIGN_CRASH_AT")
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "resume", str(run)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "iter 1 generate: 1/2 shards already done" in proc.stdout + proc.stderr


def _shard_keys(run):
    return [p.name for p in (run / "iter_1" / "generate" / "shards").iterdir()]


def _stage_events(run, since):
    events = RunStore.open(run).events()[since:]
    return ({e["stage"] for e in events if e["event"] == "redo"},
            {e["stage"] for e in events if e["event"] == "skip"}, events)


@pytest.mark.integration
def cli_on_test_server(*args, check: bool = True, timeout: int = 400) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess reporting to the session's Prefect test server (``prefect_harness``
    must be active); with ``check`` it must succeed."""
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert not check or proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_settings_change_on_resume_redoes_exactly_the_stages_they_affect(tmp_path, recipe, prefect_harness):
    """A tiny-model run, then `resume --set`: save_steps (cannot change a result) redoes nothing;
    train.beta redoes train only; the change is in recipe.yaml and events.jsonl and is printed."""
    run = tmp_path / "run"

    def cli(*args):
        proc = cli_on_test_server(*args)
        return proc.stdout + proc.stderr

    cli("run", str(recipe), "--run-dir", str(run))
    stages = {"prompts", "generate", "judge", "pairs", "train"}

    n = len(RunStore.open(run).events())
    out = cli("resume", str(run), "--set", "train.save_steps=7")
    redone, skipped, events = _stage_events(run, n)
    assert redone == set() and skipped == stages, out[-3000:]
    assert "train.save_steps: 1 -> 7 (cannot change a result: nothing is redone)" in out
    assert [e["changes"] for e in events if e["event"] == "recipe_changed"] == [{"train.save_steps": [1, 7]}]
    assert RunStore.open(run).recipe()["train"]["save_steps"] == 7

    n = len(RunStore.open(run).events())
    out = cli("resume", str(run), "--set", "train.beta=0.2")
    redone, skipped, events = _stage_events(run, n)
    assert redone == {"train"} and skipped == stages - {"train"}, out[-3000:]
    assert "train.beta: 0.1 -> 0.2 (stages that use it are redone)" in out
    assert "iter 1 train: redoing (recipe changed)" in out
    assert RunStore.open(run).recipe()["train"]["beta"] == 0.2

    # `run` with a changed recipe file on the existing run dir: refused, unless --change-recipe.
    changed = write_recipe(tmp_path / "changed.yaml", load_recipe(recipe)[0].model, tmp_path / "prompts.jsonl",
                           **{"train.beta": 0.2, "train.save_steps": 3})
    proc = cli_on_test_server("run", str(changed), "--run-dir", str(run), check=False, timeout=120)
    assert proc.returncode == 2 and "--change-recipe" in proc.stderr
    n = len(RunStore.open(run).events())
    out = cli("run", str(changed), "--run-dir", str(run), "--change-recipe")
    redone, skipped, _ = _stage_events(run, n)
    assert redone == set() and skipped == stages, out[-3000:]


def sigterm_exits_143_within_10_s(script: str) -> str:
    """Run ``script`` (it prints "ready" once its handler is set), SIGTERM it, check it exited 143
    within 10 s; its stderr."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "ready"
    started = time.monotonic()
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and time.monotonic() - started < 10, err[-2000:]
    return err


def test_a_stop_that_hangs_after_sigterm_is_cut_short():
    """Whatever hangs after SIGTERM (an API that was signalled too, retried for minutes), the
    process exits 143 once the grace period is over."""
    script = textwrap.dedent("""
        import threading, time
        import flows.cli as cli
        cli.TERM_GRACE_S = 1.0
        cli.stop_on_sigterm(None, threading.Event())
        try:
            print("ready", flush=True)
            time.sleep(60)
        except KeyboardInterrupt:
            time.sleep(60)  # the clean stop hangs
    """)
    err = sigterm_exits_143_within_10_s(script)
    assert "terminated (SIGTERM), stopped after 1 s without a clean stop; the run is resumable" in err


def test_after_a_recorded_stop_hanging_exit_handlers_do_not_delay_the_exit():
    """The stop was recorded, but an exit handler retries a server that is gone (Prefect's log
    flushing did, for 82 s): the process is gone TERM_FLUSH_S later, exit 143, no false alarm."""
    script = textwrap.dedent("""
        import atexit, threading, time
        import flows.cli as cli
        cli.TERM_GRACE_S, cli.TERM_FLUSH_S = 30.0, 0.5
        stopped = threading.Event()
        cli.stop_on_sigterm(None, stopped)
        atexit.register(time.sleep, 60)
        try:
            print("ready", flush=True)
            time.sleep(60)
        except KeyboardInterrupt:
            stopped.set()
    """)
    err = sigterm_exits_143_within_10_s(script)
    assert "without a clean stop" not in err


# --------------------------------------------------------------------------- the console


def test_console_shows_stage_lines_and_progress_and_logs_the_rest(tmp_path, recipe, prefect_harness):
    """Not a terminal (a pipe, as in CI): the stage lines, plain progress lines per shard and the
    logs path once; no Prefect engine or library lines. They are in RUN/logs/, with the trainer
    subprocess's whole output. ``resume -v`` shows everything (Prefect's own lines included)."""
    run = tmp_path / "run"
    cli = cli_on_test_server

    proc = cli("run", str(recipe), "--run-dir", str(run), "--set", "train.launcher=subprocess")
    out = proc.stdout + proc.stderr
    logs = run / "logs"
    assert out.count(f"engine and library logs: {logs}/") == 1
    assert "iter 1 generate: shard 1/2 (" in out and "iter 1 judge: shard 2/2 (" in out  # stage lines
    assert "iter 1 generate: 1/2 shards (50%), " in out and "iter 1 judge: 2/2 shards in " in out  # progress
    assert " - step 1/" in out  # the trainer's step lines are stage lines too
    for noise in ("Finished in state", "| INFO", "Beginning flow run", "Created task run", "Warning"):
        assert noise not in out, noise
    assert "\r" not in out and "\x1b[" not in out  # no bar drawing off a terminal
    run_log = (logs / "run.log").read_text()
    assert "Finished in state Completed()" in run_log and "iter 1 generate: shard 1/2 (" in run_log
    train_log = (logs / "iter_1-train-dpo.log").read_text()
    assert "[train] step 1/" in train_log and len(train_log.splitlines()) > out.count(" - step ")
    assert (logs / "output.log").exists()

    proc = cli("resume", str(run), "-v")
    out = proc.stdout + proc.stderr
    assert out.count(f"engine and library logs: {logs}/") == 1
    assert "Finished in state Completed()" in out and "iter 1 train: complete, skipped" in out


@pytest.mark.parametrize("how", ["run", "resume"])
def test_a_run_stored_before_a_new_recipe_field_still_resumes(recipe, tmp_path, how):
    """A newer selfalign adds recipe fields with defaults (engine.base_url, eval ...). A run whose
    recipe.yaml was written before them is the same recipe read by today's schema: `run` with the
    same file and `resume` reopen it; they must not refuse it as "a different recipe"."""
    import yaml

    from alignment.runs import commit_run, load_for_run

    r, data = load_recipe(recipe)
    store = RunStore.create(tmp_path / "old", recipe=data, algorithm=r.algorithm, name=r.name)
    stored = yaml.safe_load((store.root / "recipe.yaml").read_text())
    del stored["engine"]["adapters"], stored["engine"]["cpu_threads"]  # as an older version wrote it
    (store.root / "recipe.yaml").write_text(yaml.safe_dump(stored))
    before = _snapshot(store.root)
    again, data, _ = load_for_run(store.root, recipe if how == "run" else None, [])
    reopened, change = commit_run(store.root, again, data, change=False)
    assert reopened.root == store.root and change is None
    assert _snapshot(store.root) == before  # the stored recipe is left as it was written
    with pytest.raises(Exception, match="different recipe"):  # a real difference is still refused
        commit_run(store.root, *load_for_run(store.root, recipe, ["seed=5"])[:2], change=False)
