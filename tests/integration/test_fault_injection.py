"""Kill anything, anywhere, lose nothing, redo nothing (issue 4).

The tiny recipe (random 2-layer model, transformers backend, fixed seed, 2 iterations, shards
of 2 prompts, training in a real subprocess) is run through the real CLI in subprocesses. The
run is stopped at named crash points (``SELFALIGN_CRASH_AT``, see ``alignment/faults.py``) —
SIGKILL during generation, judging, before a commit, in the trainer after a checkpoint save,
after a stage commit, in iteration 2, plus one Ctrl-C (SIGINT) — and ``selfalign resume`` is
run after each. A stage output is then corrupted and the final resume must notice and redo it.
The datasets of every iteration must equal an uninterrupted run's row for row, and no shard or
training step that was on disk may be computed twice. The uninterrupted run trains in its own
process (``train.launcher: inprocess``, a setting that cannot change a result): its adapters must
equal the killed run's bit for bit, so the two launchers are checked against each other too, and
two trainer subprocesses' start-up (~14 s of imports each on one core) are saved.

All subprocesses share one Prefect test server (``prefect_harness``): a temporary server per
CLI process costs ~9 s of start-up each, against ~11 s once (measured on 2 cores).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, restore_sigint, write_recipe

pytestmark = pytest.mark.integration

TABLES = ["prompts", "generate", "judge", "pairs"]
ITERATIONS = 2

# (command, crash point, signal). Each entry is one process; the next one resumes its run.
# Crash points fire right after a shard / checkpoint is on disk, so nothing on disk may be
# recomputed afterwards; "before_commit" loses exactly the stage in progress.
SCHEDULE = [
    ("run", "iter1/generate/shard0", "SIGKILL"),  # during generation
    ("resume", "iter1/judge/shard1", "SIGKILL"),  # during judging
    ("resume", "iter1/judge/after_commit", "SIGKILL"),  # between stages
    ("resume", "iter1/pairs/before_commit", "SIGKILL"),  # dataset computed, not committed
    ("resume", "iter1/train/saved1", "SIGKILL"),  # in the trainer subprocess, checkpoint-1 saved
    ("resume", "iter2/generate/shard0", "SIGINT"),  # Ctrl-C during generation, iteration 2
    ("resume", "iter2/judge/shard0", "SIGKILL"),  # judging, iteration 2
    ("resume", "iter2/train/before_commit", "SIGKILL"),  # adapter saved in a temp dir, not committed
]


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def setup(prefect_harness, tmp_path_factory, tiny_model_dir):
    from prefect.settings import PREFECT_API_URL

    root = tmp_path_factory.mktemp("fault")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": "Question number {i}?"}}\n' for i in range(6)))
    recipe = write_recipe(
        root / "recipe.yaml", str(tiny_model_dir), prompts,
        iterations=ITERATIONS, **{"engine.shard_size": 2, "train.launcher": "subprocess", "train.save_steps": 1},
    )
    env = dict(
        os.environ,
        PREFECT_API_URL=str(PREFECT_API_URL.value()),
        PREFECT_HOME=os.environ["PREFECT_HOME"],
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        TOKENIZERS_PARALLELISM="false",
    )
    for k in ("SELFALIGN_CRASH_AT", "SELFALIGN_CRASH_SIGNAL", "SELFALIGN_RUN_PID"):
        env.pop(k, None)
    return {"root": root, "recipe": recipe, "env": env, "model": tiny_model_dir}


def cli(setup, *args: str, crash: str | None = None, sig: str = "SIGKILL", timeout: float = 300):
    env = dict(setup["env"])
    if crash:
        env.update(SELFALIGN_CRASH_AT=crash, SELFALIGN_CRASH_SIGNAL=sig)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=setup["root"], env=env,
                          capture_output=True, text=True, timeout=timeout, preexec_fn=restore_sigint)
    proc.seconds = time.monotonic() - started
    return proc


def status(run_dir: Path) -> str:
    """`selfalign status` (in-process: it is cheap and needs no Prefect)."""
    import contextlib
    import io

    from flows.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["status", str(run_dir)]) == 0
    return buf.getvalue()


def stage_line(out: str, t: int, stage: str) -> str:
    block = out.split(f"iteration {t}\n", 1)[1]
    return next(line for line in block.splitlines() if line.strip().startswith(stage))


def tables(run_dir: Path) -> dict[tuple[int, str], list[dict]]:
    return {(t, s): pq.read_table(run_dir / f"iter_{t}" / s / "data.parquet").to_pylist()
            for t in range(1, ITERATIONS + 1) for s in TABLES}


def shard_log(text: str) -> list[tuple[str, str, str]]:
    """(iteration, stage, shard) for every shard computed, from the stage logs."""
    return re.findall(r"iter (\d+) (generate|judge): shard (\d+)/\d+ \(", text)


def train_steps(text: str) -> list[str]:
    return re.findall(r" - step (\d+)/\d+ loss", text)


@pytest.fixture(scope="module")
def reference(setup):
    """The uninterrupted run."""
    run_dir = setup["root"] / "reference"
    proc = cli(setup, "run", str(setup["recipe"]), "--run-dir", str(run_dir), "--set", "train.launcher=inprocess")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "training: dpo in this process" in proc.stdout + proc.stderr
    print(f"uninterrupted run: {proc.seconds:.1f}s")
    return run_dir, proc


# --------------------------------------------------------------------------- the test


def test_kill_anywhere_then_resume_matches_uninterrupted_run(setup, reference):
    ref_dir, ref_proc = reference
    run_dir = setup["root"] / "killed"
    logs = []

    for i, (command, point, sig) in enumerate(SCHEDULE):
        target = [str(setup["recipe"]), "--run-dir", str(run_dir)] if command == "run" else [str(run_dir)]
        proc = cli(setup, command, *target, crash=point, sig=sig)
        logs.append(proc.stdout + proc.stderr)
        expected = 130 if sig == "SIGINT" else -signal.SIGKILL
        assert proc.returncode == expected, f"step {i} ({point}): rc {proc.returncode}\n" + logs[-1][-4000:]
        print(f"{point} ({sig}): {proc.seconds:.1f}s")
        if i > 0:  # a resumed process skips what is done and says so
            assert "complete, skipped" in logs[-1]

        out = status(run_dir)
        if sig == "SIGINT":  # clean stop: lock released, the interruption recorded, resumable
            assert not (run_dir / "lock").exists()
            assert "selfalign resume" in proc.stderr
            assert "partial (1/3 shards, 4 rows)" in stage_line(out, 2, "generate")
            assert "interrupted (Ctrl-C" in stage_line(out, 2, "generate")
        else:  # SIGKILL: the lock is stale and status names the killed stage
            assert "(stale:" in out
        if point == "iter1/generate/shard0":
            assert "partial (1/3 shards, 4 rows)" in stage_line(out, 1, "generate")
            assert "interrupted: pid" in stage_line(out, 1, "generate")
        if point == "iter1/judge/shard1":
            assert "done, 12 rows" in stage_line(out, 1, "generate")
            assert "partial (2/3 shards, 8 rows)" in stage_line(out, 1, "judge")
            assert "interrupted: pid" in stage_line(out, 1, "judge")
        if point == "iter1/judge/after_commit":
            assert "done, 12 rows" in stage_line(out, 1, "judge")
            assert "not started" in stage_line(out, 1, "pairs")
        if point == "iter1/pairs/before_commit":
            assert "not started" in stage_line(out, 1, "pairs")
        if point == "iter1/train/saved1":
            assert "partial (checkpoints)" in stage_line(out, 1, "train")
            assert "interrupted: pid" in stage_line(out, 1, "train")
            ckpts = list((run_dir / "iter_1/train/checkpoints/trainer").glob("checkpoint-*"))
            assert [c.name for c in ckpts] == ["checkpoint-1"]
        if point == "iter2/generate/shard0":
            assert "resuming from" in logs[-1] and "checkpoint-1" in logs[-1]
            assert "done" in stage_line(out, 1, "train")
        if point == "iter2/train/before_commit":
            assert "partial (checkpoints)" in stage_line(out, 2, "train")

    # A stage file corrupted while the run was down: detected, redone, the user told.
    pairs_file = run_dir / "iter_1/pairs/data.parquet"
    pairs_file.write_bytes(pairs_file.read_bytes()[:-100])
    proc = cli(setup, "resume", str(run_dir))
    logs.append(proc.stdout + proc.stderr)
    assert proc.returncode == 0, logs[-1][-4000:]
    assert "iter 1 pairs: redoing (output corrupted: data.parquet (sha256 mismatch))" in logs[-1]
    assert "iter 1 judge: complete, skipped" in logs[-1]
    assert "iter 1 train: complete, skipped" in logs[-1]  # the redone pairs table is identical
    assert "resuming from" in logs[-1] and "checkpoint-3" in logs[-1]  # iter 2: trained, not committed
    print(f"final resume: {proc.seconds:.1f}s")

    # Same rows, same judgments, as the uninterrupted run; no duplicates.
    got, want = tables(run_dir), tables(ref_dir)
    for key in want:
        assert got[key] == want[key], f"iteration {key[0]} {key[1]} differs from the uninterrupted run"
    for t in range(1, ITERATIONS + 1):
        ids = [(r["prompt_id"], r["response_index"]) for r in got[(t, "generate")]]
        assert len(ids) == len(set(ids)) == 12
        assert len({r["prompt_id"] for r in got[(t, "prompts")]}) == 6

    # Redo nothing: every shard computed once (each kill came right after a shard was written).
    all_logs, ref_log = "\n".join(logs), ref_proc.stdout + ref_proc.stderr
    assert len(shard_log(ref_log)) == 2 * ITERATIONS * 3
    assert sorted(shard_log(all_logs)) == sorted(shard_log(ref_log))
    # Training: each step once per iteration (the kills came after checkpoints were saved).
    assert sorted(train_steps(all_logs)) == sorted(train_steps(ref_log))

    # No temp files, shard dirs or checkpoints left; no stale lock.
    leftovers = [p for p in run_dir.rglob("*")
                 if ".tmp-" in p.name or p.name in ("shards", "checkpoints", "lock", ".selfalign-scratch")]
    assert leftovers == []

    # The events of the last process show the skipped stages and the redo.
    from alignment.store import RunStore

    events = RunStore(run_dir).events()
    last_pid = events[-1]["pid"]
    mine = {(e["event"], e["iteration"], e["stage"]) for e in events if e["pid"] == last_pid}
    for stage in ("prompts", "generate", "judge", "train"):
        assert ("skip", 1, stage) in mine
    assert ("redo", 1, "pairs") in mine
    out = status(run_dir)
    assert "partial" not in out and "not started" not in out and "lock:" not in out

    # The adapters equal the uninterrupted run's and load.
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    for t in range(1, ITERATIONS + 1):
        a = load_file(run_dir / f"iter_{t}/train/adapter/adapter_model.safetensors")
        b = load_file(ref_dir / f"iter_{t}/train/adapter/adapter_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"adapter {t} differs"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(setup["model"]),
                                      run_dir / f"iter_{ITERATIONS}/train/adapter")
    assert any("lora_" in n for n, _ in model.named_parameters())



# --------------------------------------------------------------------------- the temporary Prefect server


def _servers_of(prefect_home: Path) -> list[int]:
    """Pids of temporary Prefect servers started with this PREFECT_HOME (this test's, no one else's)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"prefect.server.api.server:create_app" in cmdline and f"PREFECT_HOME={prefect_home}".encode() in environ:
            pids.append(int(proc.name))
    return pids


def _own_server_env(setup, tmp_path: Path, **extra) -> dict:
    """The CLI with no PREFECT_API_URL: it runs its own temporary server, in a PREFECT_HOME of its own."""
    env = dict(setup["env"], PREFECT_HOME=str(tmp_path / "prefect-home"), **extra)
    env.pop("PREFECT_API_URL", None)
    return env


def _run_cli(env, *args, **kw):
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=restore_sigint, **kw)


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc (Linux)")
def test_a_sigkilled_run_does_not_leak_its_temporary_server(setup, tmp_path):
    """OOM / preemption: SIGKILL gives no chance to clean up; the server must die with the run."""
    env = _own_server_env(setup, tmp_path, SELFALIGN_CRASH_AT="iter1/generate/shard0")
    proc = _run_cli(env, "run", str(setup["recipe"]), "--run-dir", str(tmp_path / "run"))
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == -signal.SIGKILL, out[-3000:]
    home = tmp_path / "prefect-home"
    _wait_for(lambda: not _servers_of(home), 15, f"the temporary server to exit (still: {_servers_of(home)})")


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc (Linux)")
def test_sigterm_to_the_whole_process_group_exits_within_seconds(setup, tmp_path):
    """A scheduler's preemption signals the run's process group, the temporary server included:
    the run exits 143 within seconds (it took 83-223 s retrying the API) and stays resumable."""
    run = tmp_path / "run"
    env = _own_server_env(setup, tmp_path)
    proc = _run_cli(env, "run", str(setup["recipe"]), "--run-dir", str(run), start_new_session=True)
    try:
        _wait_for(lambda: list(run.glob("iter_1/generate/shards/*/shard_*.parquet")) or proc.poll() is not None,
                  400, "the first shard")
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        started = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        elapsed = time.monotonic() - started
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, out[-3000:]
    assert elapsed < 15, f"took {elapsed:.0f} s to exit after SIGTERM"
    assert f"selfalign resume {run}" in out
    _wait_for(lambda: not _servers_of(tmp_path / "prefect-home"), 15, "the temporary server to exit")
    from alignment.store import RunStore

    assert RunStore.open(run).lock().inspect() is None or RunStore.open(run).lock().inspect()["live"] is False
    assert RunStore.open(run).read_shards(1, "generate", key=next((run / "iter_1/generate/shards").iterdir()).name)
