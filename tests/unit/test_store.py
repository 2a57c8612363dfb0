"""Tests for the run directory (alignment/store.py, files.py, run_lock.py): atomicity, manifests, shards,
locking, events, status."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from alignment import run_lock as run_lock_mod
from alignment import store as store_mod
from alignment.files import StoreError, atomic_write_bytes, atomic_write_json, hash_obj, sha256_file
from alignment.run_lock import RunLock, RunLocked
from alignment.store import RunStore

RECIPE = {"model": "tiny", "iterations": 2, "generation": {"n": 4, "temperature": 0.7}}
ROWS = [
    {"prompt_id": "p1", "prompt": "hi", "scores": [1.0, None], "ok": True, "n": 1},
    {"prompt_id": "p2", "prompt": "yo", "scores": [], "ok": False, "n": None},
]


@pytest.fixture
def run(tmp_path):
    return RunStore.create(tmp_path / "run", recipe=RECIPE, algorithm="self_rewarding")


def _files(d):
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*"))


# ------------------------------------------------------------------ helpers / atomic writes


def test_hash_obj_is_canonical():
    assert hash_obj({"a": 1, "b": [1, 2]}) == hash_obj({"b": [1, 2], "a": 1})
    assert hash_obj({"a": 1}) != hash_obj({"a": 2})
    assert len(hash_obj(None)) == 64


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "sub" / "f.json"
    atomic_write_json(p, {"a": 1})
    atomic_write_json(p, {"a": 2})
    assert json.loads(p.read_text()) == {"a": 2}
    assert _files(tmp_path) == ["sub", "sub/f.json"]


def test_atomic_write_failure_keeps_old_content_and_cleans_temp(tmp_path, monkeypatch):
    p = tmp_path / "f.bin"
    atomic_write_bytes(p, b"old")

    def boom(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod.os, "replace", boom)
    with pytest.raises(StoreError) as ei:
        atomic_write_bytes(p, b"new")
    msg = str(ei.value)
    assert str(p) in msg and "No space left on device" in msg
    assert ei.value.path == p
    assert p.read_bytes() == b"old"
    assert _files(tmp_path) == ["f.bin"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_atomic_write_permission_denied(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    atomic_write_bytes(d / "f", b"old")
    d.chmod(0o555)
    try:
        with pytest.raises(StoreError, match="Permission denied"):
            atomic_write_bytes(d / "f", b"new")
        assert (d / "f").read_bytes() == b"old"
    finally:
        d.chmod(0o755)


def test_write_rows_failure_keeps_previous_stage(run, monkeypatch):
    h1 = run.write_rows(1, "generate", ROWS, inputs={"prompts": "a"}, recipe_hash="r")
    real_replace = os.replace

    def boom(src, dst):
        if str(dst).endswith("data.parquet"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(store_mod.os, "replace", boom)
    with pytest.raises(StoreError, match="data.parquet.*No space left"):
        run.write_rows(1, "generate", ROWS[:1], inputs={"prompts": "b"}, recipe_hash="r")
    monkeypatch.undo()
    assert run.check_stage(1, "generate", inputs={"prompts": "a"}, recipe_hash="r") == (True, "")
    assert run.output_hash(1, "generate") == h1
    assert run.read_rows(1, "generate") == ROWS
    assert _files(run.stage_dir(1, "generate")) == ["data.parquet", "manifest.json"]

    # failure while writing the data itself (disk fills up mid-file)
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod.pq, "write_table", full)
    with pytest.raises(StoreError, match="No space left"):
        run.write_rows(1, "generate", ROWS[:1], inputs={"prompts": "b"}, recipe_hash="r")
    monkeypatch.undo()
    assert run.check_stage(1, "generate", inputs={"prompts": "a"}, recipe_hash="r") == (True, "")
    assert _files(run.stage_dir(1, "generate")) == ["data.parquet", "manifest.json"]


def test_commit_dir_rename_failure_keeps_previous(run, monkeypatch):
    run.commit_dir(1, "train", _build(b"w1"), inputs={}, recipe_hash="r")
    real_rename = os.rename

    def boom(src, dst):
        if str(src).split("/")[-1].startswith(".adapter.tmp-"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(store_mod.os, "rename", boom)
    with pytest.raises(StoreError, match="adapter.*No space left"):
        run.commit_dir(1, "train", _build(b"w2"), inputs={}, recipe_hash="r")
    monkeypatch.undo()
    assert run.check_stage(1, "train", inputs={}, recipe_hash="r") == (True, "")
    d = run.stage_dir(1, "train")
    assert (d / "adapter" / "sub" / "adapter_model.safetensors").read_bytes() == b"w1"
    assert sorted(p.name for p in d.iterdir()) == ["adapter", "manifest.json"]


# ------------------------------------------------------------------ create / open


def test_create_writes_run_files(run):
    info = run.run_info()
    assert info["algorithm"] == "self_rewarding" and info["name"] == "run"
    assert "selfalign_version" in info and "created" in info
    assert run.recipe() == RECIPE
    assert (run.root / "recipe.yaml").read_text().startswith("model: tiny")  # sort_keys=False


def test_create_same_recipe_returns_run(run):
    again = RunStore.create(run.root, recipe=dict(RECIPE), algorithm="self_rewarding")
    assert again.root == run.root


def test_create_different_recipe_errors(run):
    other = dict(RECIPE, iterations=3)
    with pytest.raises(StoreError) as ei:
        RunStore.create(run.root, recipe=other, algorithm="self_rewarding")
    msg = str(ei.value)
    assert "iterations" in msg and "generation" not in msg and "--run-dir" in msg and str(run.root) in msg


def test_create_in_nonrun_dir_errors(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "stuff.txt").write_text("hi")
    with pytest.raises(StoreError, match="not a selfalign run"):
        RunStore.create(tmp_path / "x", recipe=RECIPE, algorithm="spin")
    # an empty existing dir is fine
    (tmp_path / "empty").mkdir()
    RunStore.create(tmp_path / "empty", recipe=RECIPE, algorithm="spin")


def test_open_errors(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        RunStore.open(tmp_path / "nope")
    with pytest.raises(StoreError, match=r"is not a selfalign run \(no run.json\)"):
        RunStore.open(tmp_path)


def test_paths_and_iterations(run):
    assert run.stage_dir(2, "judge") == run.root / "iter_2" / "judge"
    for t in (10, 2, 1):
        run.write_json(t, "metrics.json", {"t": t})
    assert run.iterations() == [1, 2, 10]
    assert run.read_json(2, "metrics.json") == {"t": 2}
    assert run.read_json(3, "metrics.json") is None
    with pytest.raises(ValueError):
        run.stage_dir(1, "../evil")


# ------------------------------------------------------------------ tables + manifests


def test_write_read_rows_and_manifest(run):
    h = run.write_rows(1, "generate", ROWS, inputs={"prompts": "abc"}, recipe_hash="r1", info={"k": 1})
    assert run.read_rows(1, "generate") == ROWS
    m = run.manifest(1, "generate")
    assert m["stage"] == "generate" and m["iteration"] == 1 and m["rows"] == 2
    assert m["inputs"] == {"prompts": "abc"} and m["recipe_hash"] == "r1" and m["info"] == {"k": 1}
    assert m["code_version"] == store_mod.CODE_VERSION
    assert m["outputs"] == {"data.parquet": sha256_file(run.stage_dir(1, "generate") / "data.parquet")}
    assert h == run.output_hash(1, "generate") == hash_obj(m["outputs"])


def test_rows_with_differing_keys_keep_all_columns(run):
    rows = [{"a": 1}, {"a": 2, "b": "x"}]
    run.write_rows(1, "s", rows, inputs={}, recipe_hash="r")
    assert run.read_rows(1, "s") == [{"a": 1, "b": None}, {"a": 2, "b": "x"}]


def test_empty_rows(run):
    run.write_rows(1, "pairs", [], inputs={}, recipe_hash="r")
    assert run.read_rows(1, "pairs") == []
    assert run.check_stage(1, "pairs", inputs={}, recipe_hash="r") == (True, "")


def test_read_rows_incomplete_errors(run):
    with pytest.raises(StoreError, match="not complete"):
        run.read_rows(1, "judge")


def test_check_stage_reasons(run):
    inputs = {"generate": "g1", "prompts": "p1"}
    assert run.check_stage(1, "judge", inputs=inputs, recipe_hash="r") == (False, "not started")
    run.write_rows(1, "judge", ROWS, inputs=inputs, recipe_hash="r")
    assert run.check_stage(1, "judge", inputs=inputs, recipe_hash="r") == (True, "")
    assert run.check_stage(1, "judge", inputs=inputs, recipe_hash="r2") == (False, "recipe changed")
    assert run.check_stage(1, "judge", inputs={**inputs, "generate": "g2"}, recipe_hash="r") == (
        False, "inputs changed: generate")
    assert run.check_stage(1, "judge", inputs={**inputs, "extra": "x"}, recipe_hash="r") == (
        False, "inputs changed: extra")
    # truncate data.parquet
    data = run.stage_dir(1, "judge") / "data.parquet"
    raw = data.read_bytes()
    data.write_bytes(raw[: len(raw) // 2])
    assert run.check_stage(1, "judge", inputs=inputs, recipe_hash="r") == (
        False, "output corrupted: data.parquet (sha256 mismatch)")
    data.unlink()
    assert run.check_stage(1, "judge", inputs=inputs, recipe_hash="r") == (False, "output missing: data.parquet")
    # redo: fine again
    run.write_rows(1, "judge", ROWS, inputs=inputs, recipe_hash="r")
    assert run.check_stage(1, "judge", inputs=inputs, recipe_hash="r") == (True, "")


def test_code_version_not_compared(run, monkeypatch):
    run.write_rows(1, "generate", ROWS, inputs={}, recipe_hash="r")
    monkeypatch.setattr(store_mod, "CODE_VERSION", "99.0")
    assert run.check_stage(1, "generate", inputs={}, recipe_hash="r") == (True, "")


# ------------------------------------------------------------------ shards


def test_shards(run):
    key, other = hash_obj({"recipe": 1}), hash_obj({"recipe": 2})
    run.write_shard(1, "generate", 0, ROWS[:1], key=key)
    run.write_shard(1, "generate", 3, ROWS[1:], key=key)
    run.write_shard(1, "generate", 1, [{"x": 1}], key=other)
    assert run.read_shards(1, "generate", key=key) == {0: ROWS[:1], 3: ROWS[1:]}
    assert run.read_shards(1, "generate", key=other) == {1: [{"x": 1}]}
    assert run.read_shards(1, "generate", key=hash_obj("none")) == {}
    assert (run.stage_dir(1, "generate") / "shards" / key[:16] / "shard_00003.parquet").is_file()
    assert run.check_stage(1, "generate", inputs={}, recipe_hash="r") == (False, "partial (3 shards)")

    # corrupt shard: ignored and deleted; a leftover temp file is ignored too
    bad = run.stage_dir(1, "generate") / "shards" / key[:16] / "shard_00003.parquet"
    bad.write_bytes(b"PAR1garbage")
    (bad.parent / ".shard_00004.parquet.tmp-1-abcd").write_bytes(b"half")
    assert run.read_shards(1, "generate", key=key) == {0: ROWS[:1]}
    assert not bad.exists()

    run.write_rows(1, "generate", ROWS, inputs={}, recipe_hash="r")
    assert not (run.stage_dir(1, "generate") / "shards").exists()
    assert _files(run.stage_dir(1, "generate")) == ["data.parquet", "manifest.json"]


# ------------------------------------------------------------------ commit_dir


def _build(content):
    def build(tmp):
        (tmp / "adapter_config.json").write_text("{}")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "adapter_model.safetensors").write_bytes(content)
    return build


def test_commit_dir_replaces_crashed_partial(run):
    d = run.stage_dir(1, "train")
    ckpt = run.scratch_dir(1, "train")
    (ckpt / "checkpoint-10").mkdir()
    # a crash left an incomplete adapter dir and a temp dir
    (d / "adapter").mkdir()
    (d / "adapter" / "junk").write_text("partial")
    (d / ".adapter.tmp-123-dead").mkdir()
    (d / ".adapter.tmp-123-dead" / "x").write_text("partial")
    assert run.status()[0]["state"] == "partial"

    h = run.commit_dir(1, "train", _build(b"w1"), inputs={"pairs": "p"}, recipe_hash="r")
    assert _files(d) == ["adapter", "adapter/adapter_config.json", "adapter/sub",
                         "adapter/sub/adapter_model.safetensors", "manifest.json"]
    m = run.manifest(1, "train")
    assert set(m["outputs"]) == {"adapter/adapter_config.json", "adapter/sub/adapter_model.safetensors"}
    assert h == run.output_hash(1, "train")
    assert run.output_path(1, "train") == d / "adapter"
    assert run.check_stage(1, "train", inputs={"pairs": "p"}, recipe_hash="r") == (True, "")
    (d / "adapter" / "sub" / "adapter_model.safetensors").unlink()
    assert run.check_stage(1, "train", inputs={"pairs": "p"}, recipe_hash="r") == (
        False, "output missing: adapter/sub/adapter_model.safetensors")

    # redo replaces the old complete one
    h2 = run.commit_dir(1, "train", _build(b"w2"), inputs={"pairs": "p"}, recipe_hash="r")
    assert h2 != h
    assert (d / "adapter" / "sub" / "adapter_model.safetensors").read_bytes() == b"w2"
    assert [p.name for p in d.iterdir() if p.name.startswith(".")] == []


def test_commit_dir_build_failure_keeps_old(run):
    run.commit_dir(1, "train", _build(b"w1"), inputs={}, recipe_hash="r")

    def bad(tmp):
        (tmp / "half").write_text("x")
        raise RuntimeError("training crashed")

    with pytest.raises(RuntimeError):
        run.commit_dir(1, "train", bad, inputs={}, recipe_hash="r")
    assert run.check_stage(1, "train", inputs={}, recipe_hash="r") == (True, "")
    assert sorted(p.name for p in run.stage_dir(1, "train").iterdir()) == ["adapter", "manifest.json"]


# ------------------------------------------------------------------ lock


def test_lock_second_acquire_fails_naming_holder(run):
    with run.lock() as lk:
        assert json.loads((run.root / "lock").read_text())["pid"] == os.getpid()
        with pytest.raises(RunLocked) as ei:
            run.lock().acquire()
        msg = str(ei.value)
        assert f"locked by pid {os.getpid()} on host {socket.gethostname()} since" in msg
        assert str(run.root) in msg
        assert lk.held
    assert not (run.root / "lock").exists()


def test_lock_held_by_other_process(run):
    code = textwrap.dedent(f"""
        import sys, time
        from alignment.store import RunStore
        lk = RunStore.open({str(run.root)!r}).lock().acquire()
        print("ready", flush=True)
        sys.stdin.readline()
        lk.release()
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True, cwd=os.getcwd())
    try:
        assert p.stdout.readline().strip() == "ready"
        with pytest.raises(RunLocked, match=f"locked by pid {p.pid} "):
            run.lock().acquire()
    finally:
        p.stdin.write("\n")
        p.stdin.flush()
        p.wait(timeout=30)
    with run.lock():
        pass


def test_lock_killed_holder_is_taken_over(run):
    code = f"from alignment.store import RunStore; RunStore.open({str(run.root)!r}).lock().acquire(); " \
           "print('ready', flush=True); import time; time.sleep(60)"
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    assert p.stdout.readline().strip() == "ready"
    p.kill()
    p.wait()
    lk = run.lock().acquire()
    assert lk.took_over["pid"] == p.pid
    lk.release()


def test_stale_lock_from_dead_pid_taken_over(run):
    p = subprocess.Popen(["true"])
    p.wait()
    (run.root / "lock").write_text(json.dumps({"pid": p.pid, "host": socket.gethostname(), "since": "then"}))
    lk = run.lock()
    lk.acquire()
    assert lk.took_over["pid"] == p.pid
    assert json.loads((run.root / "lock").read_text())["pid"] == os.getpid()
    lk.release()
    assert not (run.root / "lock").exists()


def test_lock_from_other_host_is_not_taken_over(run):
    (run.root / "lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "then"}))
    with pytest.raises(RunLocked, match="locked by pid 1 on host elsewhere since then.*delete"):
        run.lock().acquire()


def test_lock_fallback_without_flock(run, monkeypatch):
    monkeypatch.setattr(run_lock_mod, "fcntl", None)
    p = subprocess.Popen(["true"])
    p.wait()
    (run.root / "lock").write_text(json.dumps({"pid": p.pid, "host": socket.gethostname(), "since": "x"}))
    lk = RunLock(run.root).acquire()
    assert lk.took_over["pid"] == p.pid
    with pytest.raises(RunLocked, match=f"pid {os.getpid()}"):
        RunLock(run.root).acquire()
    lk.release()
    assert not (run.root / "lock").exists()


def _other_process_can_lock(root) -> bool:
    code = f"from alignment.store import RunStore\nfrom alignment.run_lock import RunLocked\n" \
           f"try:\n    RunStore.open({str(root)!r}).lock().acquire().release()\nexcept RunLocked:\n    raise SystemExit(3)"
    return subprocess.run([sys.executable, "-c", code], cwd=os.getcwd(), timeout=60).returncode == 0


def test_an_inheritable_lock_is_inherited_by_the_same_process_only(run):
    """The CLI takes the lock before Prefect starts and keeps it; the flow's own ``with
    store.lock()`` (same process) inherits it and must not release it on exit."""
    outer = run.lock().acquire(inheritable=True)
    with run.lock() as inner:
        assert inner.held and inner.info == outer.info
    assert outer.held and (run.root / "lock").exists()
    assert not _other_process_can_lock(run.root)
    outer.release()
    assert not (run.root / "lock").exists() and _other_process_can_lock(run.root)
    with run.lock():  # plain locks are not inheritable: a second one in-process still fails
        with pytest.raises(RunLocked):
            run.lock().acquire()


def test_lock_inspect_tells_a_live_holder_from_an_unrelated_live_pid(run):
    assert run.lock().inspect() is None
    with run.lock():
        assert run.lock().inspect()["live"] is True
    # A lock file left by a SIGKILLed run whose pid now belongs to another process: no flock.
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        (run.root / "lock").write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "since": "x"}))
        state = run.lock().inspect()
        assert state["live"] is False and state["pid_alive"] is True
    finally:
        sleeper.kill()
        sleeper.wait()


# ------------------------------------------------------------------ events / status


def test_events_tolerate_truncated_line(run):
    run.log_event("start", t=1, stage="generate")
    with open(run.root / "events.jsonl", "a") as f:
        f.write('{"time": "x", "event": "do')  # killed mid-write
    assert [e["event"] for e in run.events()] == ["start"]
    run.log_event("error", t=1, stage="generate", message="CUDA OOM")
    ev = run.events()
    assert [e["event"] for e in ev] == ["start", "error"]
    assert ev[1]["iteration"] == 1 and ev[1]["stage"] == "generate" and ev[1]["pid"] == os.getpid()
    assert run.last_error()["message"] == "CUDA OOM"


def test_status(run):
    key = hash_obj("k")
    run.log_event("start", t=1, stage="prompts")
    run.write_rows(1, "prompts", ROWS, inputs={}, recipe_hash="r")
    run.log_event("done", t=1, stage="prompts")
    run.log_event("start", t=1, stage="generate")
    run.write_shard(1, "generate", 0, ROWS, key=key)
    run.write_shard(1, "generate", 1, ROWS[:1], key=key)
    run.write_shard(1, "generate", 2, ROWS[:1], key=key)
    run.log_event("error", t=1, stage="generate", message="killed")
    st = run.status()
    assert [(s["stage"], s["state"], s["detail"], s["rows"]) for s in st] == [
        ("prompts", "done", "", 2),
        ("generate", "partial", "3 shards", 4),
    ]
    assert st[1]["error"] == "killed" and st[0]["error"] is None

    st = run.status(stages=["prompts", "generate", "judge", "pairs", "train"])
    assert [(s["stage"], s["state"]) for s in st] == [
        ("prompts", "done"), ("generate", "partial"), ("judge", "not started"),
        ("pairs", "not started"), ("train", "not started")]
    assert run.last_error()["message"] == "killed"
