"""alignment/stages.py (skip / redo / shards), faults.py, and the resume parts of training/launch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from alignment import faults
from alignment.stages import (
    error_message,
    interrupted_stages,
    lock_state,
    run_sharded,
    run_table_stage,
    shard_key,
    shard_totals,
)
from alignment.store import RunStore
from tests.conftest import restore_sigint

ROWS = [{"prompt_id": f"p{i}", "x": i} for i in range(5)]


@pytest.fixture
def store(tmp_path):
    return RunStore.create(tmp_path / "run", recipe={"a": 1}, algorithm="self-rewarding")


class Counter:
    def __init__(self, rows=ROWS):
        self.calls = 0
        self.rows = rows

    def __call__(self):
        self.calls += 1
        return [dict(r) for r in self.rows], {"n": len(self.rows)}


def _stage(store, compute, *, inputs=None, recipe_hash="r", log=None):
    return run_table_stage(store, 1, "generate", inputs=inputs or {"prompts": "h1"}, recipe_hash=recipe_hash,
                           compute=compute, log=log or (lambda m: None))


# --------------------------------------------------------------------------- run_table_stage


def test_stage_runs_once_then_is_skipped(store):
    compute, lines = Counter(), []
    h1 = _stage(store, compute)
    h2 = _stage(store, compute, log=lines.append)
    assert compute.calls == 1 and h1 == h2
    assert lines == ["iter 1 generate: complete, skipped"]
    assert store.read_rows(1, "generate") == ROWS
    assert [e["event"] for e in store.events()] == ["start", "done", "skip"]


def test_skip_removes_leftovers_of_a_kill_after_commit(store):
    """Killed between writing the manifest and cleaning up: the next skip cleans up."""
    _stage(store, Counter())
    d = store.stage_dir(1, "generate")
    (d / "shards" / "abc").mkdir(parents=True)
    (d / "shards" / "abc" / "shard_00000.parquet").write_bytes(b"x")
    (d / ".data.parquet.tmp-1-ab").write_bytes(b"x")
    store.scratch_dir(1, "generate", "checkpoints")
    _stage(store, Counter())
    assert sorted(p.name for p in d.iterdir()) == ["data.parquet", "manifest.json"]


@pytest.mark.parametrize("change, reason", [
    (dict(inputs={"prompts": "h2"}), "inputs changed: prompts"),
    (dict(recipe_hash="r2"), "recipe changed"),
])
def test_stage_redone_when_inputs_or_recipe_change(store, change, reason):
    compute, lines = Counter(), []
    _stage(store, compute)
    _stage(store, compute, log=lines.append, **change)
    assert compute.calls == 2
    assert lines == [f"iter 1 generate: redoing ({reason})"]
    assert store.events()[-3] | {"time": 0, "pid": 0} == {
        "time": 0, "pid": 0, "event": "redo", "iteration": 1, "stage": "generate", "reason": reason}


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupted_stage_file_is_detected_redone_and_reported(store, damage):
    compute, lines = Counter(), []
    first = _stage(store, compute)
    data = store.stage_dir(1, "generate") / "data.parquet"
    raw = data.read_bytes()
    if damage == "truncate":
        data.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":
        data.write_bytes(raw[:100] + bytes([raw[100] ^ 1]) + raw[101:])
    else:
        data.unlink()
    again = _stage(store, compute, log=lines.append)
    assert compute.calls == 2
    reason = "output missing: data.parquet" if damage == "delete" else "output corrupted: data.parquet (sha256 mismatch)"
    assert lines == [f"iter 1 generate: redoing ({reason})"]
    assert again == first  # deterministic output -> same hash -> downstream stages stay valid
    assert store.read_rows(1, "generate") == ROWS


def test_unreadable_manifest_is_redone(store):
    compute, lines = Counter(), []
    _stage(store, compute)
    (store.stage_dir(1, "generate") / "manifest.json").write_text('{"stage": "gen')
    _stage(store, compute, log=lines.append)
    assert compute.calls == 2 and lines[0].startswith("iter 1 generate: redoing (manifest unreadable")


def test_failure_and_interrupt_are_recorded_and_nothing_committed(store):
    def boom():
        raise ValueError("bad")

    with pytest.raises(ValueError):
        _stage(store, boom)
    assert store.manifest(1, "generate") is None
    assert store.events()[-1]["message"] == "ValueError: bad"

    def ctrl_c():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _stage(store, ctrl_c)
    assert store.events()[-1]["message"] == "interrupted (Ctrl-C / SIGINT)"
    assert error_message(KeyboardInterrupt()) == "interrupted (Ctrl-C / SIGINT)"


# --------------------------------------------------------------------------- run_sharded


def _sharded(store, compute, items=ROWS, key="k1", lines=None):
    return run_sharded(store, 1, "judge", items, shard_size=2, key=shard_key(key),
                       compute=compute, log=(lines.append if lines is not None else lambda m: None))


def test_sharded_resume_continues_at_the_first_missing_shard(store):
    calls = []

    def compute(chunk, i):
        calls.append(i)
        if i == 1 and len(calls) == 2:
            raise KeyboardInterrupt  # "killed" while computing shard 1
        return [dict(r, shard=i) for r in chunk]

    with pytest.raises(KeyboardInterrupt):
        _sharded(store, compute)
    assert calls == [0, 1]
    lines = []
    rows = _sharded(store, compute, lines=lines)
    assert calls == [0, 1, 1, 2]  # shard 0 not recomputed; shard 1 (in progress) redone
    assert [r["x"] for r in rows] == [0, 1, 2, 3, 4]  # item order, no duplicates
    assert lines[0] == "iter 1 judge: 1/3 shards already done"
    assert shard_totals(store) == {(1, "judge"): 3}


def test_sharded_ignores_shards_of_other_inputs(store):
    _sharded(store, lambda chunk, i: [dict(r, v="old") for r in chunk], key="old-inputs")
    rows = _sharded(store, lambda chunk, i: [dict(r, v="new") for r in chunk], key="new-inputs")
    assert {r["v"] for r in rows} == {"new"}


def test_sharded_drops_a_torn_shard_and_recomputes_it(store):
    calls = []

    def compute(chunk, i):
        calls.append(i)
        return [dict(r) for r in chunk]

    _sharded(store, compute)
    shard = next((store.stage_dir(1, "judge") / "shards").rglob("shard_00001-*.parquet"))
    shard.write_bytes(shard.read_bytes()[:20])
    (shard.parent / ".shard_00002-ab.parquet.tmp-1-ab").write_bytes(b"half")  # killed writer
    rows = _sharded(store, compute)
    assert calls == [0, 1, 2, 1] and len(rows) == 5
    assert not list(shard.parent.glob(".*tmp-*"))


def test_shard_crash_point_fires_after_the_shard_is_on_disk(store, monkeypatch):
    fired = []
    monkeypatch.setattr("alignment.stages.crash_point", fired.append)
    _sharded(store, lambda chunk, i: list(chunk))
    assert fired == ["iter1/judge/shard0", "iter1/judge/shard1", "iter1/judge/shard2"]


# --------------------------------------------------------------------------- status helpers


def test_interrupted_stages_and_lock_state(store):
    assert lock_state(store) is None
    store.log_event("start", t=1, stage="prompts")
    store.log_event("done", t=1, stage="prompts")
    store.log_event("start", t=1, stage="generate")
    store.log_event("shards", t=1, stage="generate", total=4, done=0)
    store.log_event("start", t=1, stage="judge")
    store.log_event("error", t=1, stage="judge", message="x")
    assert list(interrupted_stages(store)) == [(1, "generate")]
    # A lock left by a dead process (SIGKILL leaves the file) is reported stale, a live one live.
    import socket

    (store.root / "lock").write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname(), "since": "s"}))
    assert lock_state(store)["live"] is False
    (store.root / "lock").unlink()
    with store.lock():  # live = a process holds the lock, not merely "the pid exists"
        assert lock_state(store)["live"] is True
    (store.root / "lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "s"}))
    assert lock_state(store)["live"] is None


# --------------------------------------------------------------------------- faults


def _child(code: str, **env):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=dict(os.environ, **env),
                          capture_output=True, text=True, timeout=60, preexec_fn=restore_sigint)


def test_crash_point_kills_only_at_its_name():
    code = """
        from alignment.faults import crash_point
        crash_point("iter1/generate/shard0"); print("passed shard0", flush=True)
        crash_point("iter1/generate/shard1"); print("passed shard1", flush=True)
    """
    p = _child(code, SELFALIGN_CRASH_AT="iter1/generate/shard1", PYTHONPATH=str(Path(__file__).parents[2]))
    assert p.returncode == -signal.SIGKILL and p.stdout == "passed shard0\n"
    faults.crash_point("iter1/generate/shard1")  # unset here: a no-op


def test_crash_point_can_send_sigint_once():
    code = """
        from alignment.faults import crash_point
        try:
            crash_point("p")
            import time; time.sleep(5)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        crash_point("p"); print("second pass ok")
    """
    p = _child(code, SELFALIGN_CRASH_AT="p", SELFALIGN_CRASH_SIGNAL="SIGINT", PYTHONPATH=str(Path(__file__).parents[2]))
    assert p.returncode == 0 and p.stdout == "interrupted\nsecond pass ok\n"


class _Killed(BaseException):
    """Stands in for the SIGKILL of a crash point in this process."""


def test_trainer_crash_points_fire_on_their_step_and_save(monkeypatch):
    """The DPO and reward-model trainers share this callback; the kill tests rely on its names.
    Run in this process, with the kill itself replaced by an exception (that ``crash_point`` really
    SIGKILLs is ``test_crash_point_kills_only_at_its_name``): a child importing the trainer took ~30 s."""
    from types import SimpleNamespace

    from alignment.training import crash_points_callback

    def kill(pid, sig):
        assert (pid, sig) == (os.getpid(), signal.SIGKILL)
        raise _Killed

    def run_until_killed(point: str) -> list[str]:
        monkeypatch.setenv("SELFALIGN_CRASH_AT", point)
        passed: list[str] = []
        cb = crash_points_callback("iter2/train")
        with pytest.raises(_Killed):
            for step in (1, 2):
                state = SimpleNamespace(global_step=step)
                cb.on_step_end(None, state, None)
                passed.append(f"step{step}")
                cb.on_save(None, state, None)
                passed.append(f"saved{step}")
        return passed

    monkeypatch.delenv("SELFALIGN_RUN_PID", raising=False)
    monkeypatch.delenv("SELFALIGN_CRASH_SIGNAL", raising=False)
    monkeypatch.setattr(faults.os, "kill", kill)
    assert run_until_killed("iter2/train/saved2") == ["step1", "saved1", "step2"]
    assert run_until_killed("iter2/train/step1") == []


# --------------------------------------------------------------------------- training resume


def _ckpt(d: Path, step: int, *, state=True, weights=True, rng=True, torn=False):
    c = d / f"checkpoint-{step}"
    c.mkdir(parents=True)
    if weights:
        (c / "adapter_model.safetensors").write_bytes(b"w")
    if rng:
        (c / "rng_state.pth").write_bytes(b"r")
    if state:
        (c / "trainer_state.json").write_text('{"global_step": 1' if torn else json.dumps({"global_step": step}))
    return c


def test_latest_checkpoint_skips_incomplete_ones(tmp_path):
    from alignment.training import latest_checkpoint

    assert latest_checkpoint(str(tmp_path / "none")) is None
    _ckpt(tmp_path, 2)
    _ckpt(tmp_path, 10)
    _ckpt(tmp_path, 12, torn=True)  # killed while writing trainer_state.json
    _ckpt(tmp_path, 14, state=False)  # killed before it
    _ckpt(tmp_path, 16, rng=False)
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")  # numeric, not lexical


def test_checkpoints_of_another_training_job_are_discarded(tmp_path):
    from alignment.training import DPOSpec, _prepare_checkpoint_dir, resume_key

    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    ck = tmp_path / "ck"
    spec = DPOSpec(base="m", data=str(data), output_dir="o1", checkpoint_dir=str(ck))
    _prepare_checkpoint_dir(spec)
    _ckpt(ck, 1)
    # Another attempt of the same job (new temp paths, other save_steps): checkpoints kept.
    same = DPOSpec(base="m", data=str(data), output_dir="o2", checkpoint_dir=str(ck), save_steps=3)
    assert resume_key(same) == resume_key(spec)
    _prepare_checkpoint_dir(same)
    assert (ck / "checkpoint-1").is_dir()
    # Different data (e.g. review corrections applied after the kill): discarded.
    data.write_text('{"prompt": "p", "chosen": "b", "rejected": "a"}\n')
    _prepare_checkpoint_dir(same)
    assert not (ck / "checkpoint-1").exists()


def test_trainer_subprocess_does_not_outlive_an_interrupted_run(tmp_path, monkeypatch):
    """Ctrl-C in the flow process kills the trainer, so a resume cannot race a live trainer."""
    from alignment.launch import run_dpo
    from alignment.training import DPOSpec

    fake = tmp_path / "fake_trainer.py"
    pid_file = tmp_path / "pid"
    fake.write_text(textwrap.dedent(f"""
        import os, time
        open({str(pid_file)!r}, "w").write(str(os.getpid()))
        print("[train] step 1/100", flush=True)
        time.sleep(60)
    """))
    monkeypatch.setenv("SELFALIGN_TRAIN_LAUNCHER", f"{sys.executable} {fake}")
    spec = DPOSpec(base="m", data="d", output_dir=str(tmp_path), checkpoint_dir=str(tmp_path / "ck"))

    def log(line):
        if line.startswith("step"):
            raise KeyboardInterrupt

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_dpo(spec, launcher="subprocess", spec_path=tmp_path / "spec.json", log=log)
    assert time.monotonic() - started < 30
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_training_resumed_from_a_checkpoint_equals_uninterrupted_training(tmp_path, tiny_model_dir):
    """Iteration >= 2 (an initial adapter, so TRL adds a frozen "ref" copy): resuming from the
    last checkpoint, or from an earlier one, gives the uninterrupted run's adapter exactly."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from alignment.training import DPOSpec, train_dpo

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}?", "chosen": f"good {i}", "rejected": f"bad answer {i}"}) + "\n"
                            for i in range(6)))

    def spec(name, init=None):
        return DPOSpec(base=str(tiny_model_dir), data=str(data), output_dir=str(tmp_path / name / "out"),
                       checkpoint_dir=str(tmp_path / name / "ck"), init_adapter=init, max_length=64, save_steps=1,
                       learning_rate=1e-2)

    def weights(name):
        return load_file(str(tmp_path / name / "out" / "adapter_model.safetensors"))

    train_dpo(spec("iter1"))
    init = str(tmp_path / "iter1" / "out")
    train_dpo(spec("ref", init))
    want = weights("ref")
    assert any(not torch.equal(want[k], weights("iter1")[k]) for k in want)  # it did train

    # Killed after the last checkpoint, before the adapter was committed: 0 steps left. The
    # uninterrupted run is exactly such a run once its adapter is gone (its checkpoints stay until
    # the stage commits), so it is reused instead of training the same job a third time.
    shutil.rmtree(tmp_path / "ref" / "out")
    metrics = train_dpo(spec("ref", init))
    assert metrics["resumed_from"].endswith("checkpoint-3")
    got = weights("ref")
    assert all(torch.equal(got[k], want[k]) for k in want)

    # Killed after checkpoint-2: one step left.
    shutil.rmtree(tmp_path / "ref" / "ck" / "checkpoint-3")
    shutil.rmtree(tmp_path / "ref" / "out")
    metrics = train_dpo(spec("ref", init))
    assert metrics["resumed_from"].endswith("checkpoint-2")
    got = weights("ref")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_shards_of_another_shard_size_are_never_reused(store):
    """Kill after shard 0 with size 2, resume with size 4: items 2-3 must still be computed."""
    lines, events_before = [], len(store.events())

    def killed_after_first(chunk, i):
        if i == 1:
            raise KeyboardInterrupt
        return [dict(r, size=2) for r in chunk]

    with pytest.raises(KeyboardInterrupt):
        run_sharded(store, 1, "generate", ROWS, shard_size=2, key=shard_key("same"), compute=killed_after_first,
                    log=lambda m: None)
    rows = run_sharded(store, 1, "generate", ROWS, shard_size=4, key=shard_key("same"),
                       compute=lambda chunk, i: [dict(r, size=4) for r in chunk], log=lines.append)
    assert [r["x"] for r in rows] == [0, 1, 2, 3, 4]
    assert {r["size"] for r in rows} == {4}  # nothing of the old layout mixed in
    assert any("another layout" in line for line in lines), lines
    stale = [e for e in store.events()[events_before:] if e["event"] == "stale_shards"]
    assert stale and stale[0]["removed"] == 1
    assert len(list((store.stage_dir(1, "generate") / "shards").rglob("shard_*.parquet"))) == 2


def test_a_shard_whose_items_changed_is_redone(store):
    """Same key and size, but the chunk holds other items (a caller forgot an input): not reused."""
    run_sharded(store, 1, "generate", ROWS, shard_size=2, key=shard_key("same"),
                compute=lambda chunk, i: [dict(r, v="old") for r in chunk], log=lambda m: None)
    changed = [dict(r, x=r["x"] + 10) if r["x"] >= 2 else r for r in ROWS]
    store.stage_dir(1, "generate")  # shards stay (no commit in this helper)
    rows = run_sharded(store, 1, "generate", changed, shard_size=2, key=shard_key("same"),
                       compute=lambda chunk, i: [dict(r, v="new") for r in chunk], log=lambda m: None)
    assert [(r["x"], r["v"]) for r in rows] == [(0, "old"), (1, "old"), (12, "new"), (13, "new"), (14, "new")]
