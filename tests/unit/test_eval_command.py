"""`selfalign eval RUN --prompts FILE`: every model of a trained 1-iteration Self-Rewarding run on
the tiny random model scores a fixed prompts file by the fixed (base) judge; a second call reads
the stored result; the run's own files are untouched; bad input is one line, exit 2, nothing written."""

import hashlib
import json

import pytest

from alignment.benchmark_eval import (EVALS_DIR, SUMMARY_FILE, EvalError, parse_iterations, result_name,
                                      score_summary, table_lines)
from alignment.files import read_parquet
from alignment.store import RunStore
from flows.cli import main
from tests.conftest import copy_judged_run

QUESTIONS = ["What is a prime number?", "Name a colour.", "Why is the sky blue?"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, judged_tiny_run):
    """The judged tiny run, trained: iteration 1's train stage is done, so M_1 and M_2 exist."""
    store, run = copy_judged_run(judged_tiny_run, tmp_path_factory.mktemp("evalcmd") / "run")
    try:
        run.run_stage("train", 1)
    finally:
        run.close()
    assert run.adapter(1) is not None
    return store


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.jsonl"
    path.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUESTIONS))
    return path


def run_files(root) -> dict[str, str]:
    """sha256 of every file of the run's own record: stage outputs and manifests, metrics, recipe, run info."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.relative_to(root).parts[0].startswith("iter_")
            or p.name in ("recipe.yaml", "run.json")}


def snapshot(root) -> dict[str, float]:
    """Every path under the run dir with its mtime: what "nothing written" compares."""
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def eval_dir(store) -> list:
    return sorted((store.root / EVALS_DIR).iterdir())


# ------------------------------------------------------------------------------ the command
def test_scores_every_model_then_reuses_the_result(trained_run, questions, capsys):
    before = run_files(trained_run.root)
    argv = ["eval", str(trained_run.root), "--prompts", str(questions), "--max-tokens", "4"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "read from" not in out
    table = out[out.index("  model"):].splitlines()
    assert table[0].split() == ["model", "trained", "in", "prompts", "scored", "mean", "score", "[95%", "CI]",
                                "mean", "length"]
    assert table[1].split()[:5] == ["M_1", "–", "(initial)", "3", "100%"]
    assert table[2].split()[:5] == ["M_2", "iteration", "1", "3", "100%"]
    [directory] = eval_dir(trained_run)
    assert directory.name.startswith("bench-") and len(directory.name) == len("bench-") + 12
    summary = json.loads((directory / SUMMARY_FILE).read_text())
    assert [m["model"] for m in summary["models"]] == ["M_1", "M_2"]
    assert summary["judge"]["model"] == "base" and summary["judge"]["settings"]["mode"] == "logprob"
    for m in summary["models"]:
        assert set(m) >= {"model", "iteration", "identity", "table", "prompts", "scored", "scored_share", "mean_score",
                          "mean_score_ci", "mean_length"}
        assert m["prompts"] == 3 and m["scored"] == 3 and m["scored_share"] == 1.0  # logprob: every answer scored
        assert 0 <= m["mean_score"] <= 5 and len(m["mean_score_ci"]) == 2 and 0 < m["mean_length"] <= 4
        table_rows = read_parquet(directory / m["table"])
        assert [r["prompt"] for r in table_rows] == QUESTIONS
        assert all(len(r["scores"]) == 2 and r["length"] <= 4 for r in table_rows)  # the recipe's judge: n = 2
        assert m["mean_score"] == pytest.approx(sum(r["mean_score"] for r in table_rows) / 3)
    assert summary["models"][0]["identity"] != summary["models"][1]["identity"]
    assert run_files(trained_run.root) == before  # stages, manifests, metrics, recipe: untouched
    assert not (trained_run.root / "lock").exists()

    # The same file and settings again: read, not recomputed (no table or summary rewritten).
    times = {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "M_1, M_2: read from" in out and "not recomputed" in out
    assert {p.name: p.stat().st_mtime_ns for p in directory.iterdir()} == times
    assert table == out[out.index("  model"):].splitlines()

    # One of the models: read too; another answer length is another result.
    assert main(argv + ["--iterations", "1"]) == 0
    assert "M_2: read from" in capsys.readouterr().out
    assert main(argv[:-1] + ["3", "--iterations", "0", "--max-prompts", "2"]) == 0
    out = capsys.readouterr().out
    assert "read from" not in out and len(eval_dir(trained_run)) == 2
    assert run_files(trained_run.root) == before


def test_an_interrupted_eval_keeps_only_complete_tables(trained_run, questions, capsys, monkeypatch):
    """Ctrl-C while the judge scores M_2: M_1's table is complete, nothing of M_2 and no summary is
    left (no temp file either); the same command then scores M_2 only."""
    import alignment.benchmark_eval as be

    calls = []

    def interrupted(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    real = be.judge_responses
    monkeypatch.setattr(be, "judge_responses", interrupted)
    argv = ["eval", str(trained_run.root), "--prompts", str(questions), "--max-tokens", "2"]
    known = set(eval_dir(trained_run))
    assert main(argv) == 130
    assert "interrupted" in capsys.readouterr().err and not (trained_run.root / "lock").exists()
    [directory] = set(eval_dir(trained_run)) - known
    [table] = directory.iterdir()  # M_1's, complete; nothing of M_2, no summary, no temp file
    assert table.name.startswith("model-") and table.suffix == ".parquet" and len(read_parquet(table)) == 3
    monkeypatch.setattr(be, "judge_responses", real)
    assert main(argv) == 0
    assert "M_1: read from" in capsys.readouterr().out
    assert sorted(p.suffix for p in directory.iterdir()) == [".json", ".parquet", ".parquet"]


# ------------------------------------------------------------------------------ bad input
BAD = {
    "missing file": (lambda tmp: tmp / "nowhere.jsonl", "nowhere.jsonl: file not found"),
    "empty file": (lambda tmp: write(tmp / "empty.jsonl", ""), "empty.jsonl: no prompts"),
    "missing field": (lambda tmp: write(tmp / "nofield.jsonl", '{"prompt": "Hi?"}\n{"question": "Why?"}\n'),
                      "nofield.jsonl:2: missing field 'prompt' (pass --field"),
}


def write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_prompts_file_is_one_line_exit_2_and_writes_nothing(trained_run, tmp_path, capsys, case):
    make, message = BAD[case]
    before = snapshot(trained_run.root)
    assert main(["eval", str(trained_run.root), "--prompts", str(make(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("selfalign: error: ")
    assert snapshot(trained_run.root) == before


@pytest.mark.parametrize("extra, message", [
    (["--iterations", "5"], "iteration 5 has not trained a model (trained: 1; 0 = the initial model)"),
    (["--iterations", "one"], "--iterations 'one': expected 'all' or iteration numbers"),
    (["--max-tokens", "0"], "--max-tokens 0: must be at least 1"),
    (["--field", "question"], "bench.jsonl:1: missing field 'question'"),
])
def test_a_bad_option_is_one_line_exit_2_and_writes_nothing(trained_run, questions, capsys, extra, message):
    before = snapshot(trained_run.root)
    assert main(["eval", str(trained_run.root), "--prompts", str(questions), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert snapshot(trained_run.root) == before


def test_what_is_not_a_run_of_a_scored_algorithm_is_refused(tmp_path, questions, capsys):
    (tmp_path / "plain").mkdir()
    assert main(["eval", str(tmp_path / "plain"), "--prompts", str(questions)]) == 2
    assert "is not a selfalign run (no run.json)" in capsys.readouterr().err
    RunStore.create(tmp_path / "perl", recipe={"algorithm": "perl"}, algorithm="perl")
    before = snapshot(tmp_path / "perl")
    assert main(["eval", str(tmp_path / "perl"), "--prompts", str(questions)]) == 2
    err = capsys.readouterr().err
    assert "eval scores the models of self-rewarding, meta-rewarding, spin runs, not of perl runs" in err
    assert err.count("\n") == 1 and snapshot(tmp_path / "perl") == before
    RunStore.create(tmp_path / "pipe", recipe={"algorithm": "pipeline", "steps": []}, algorithm="pipeline")
    assert main(["eval", str(tmp_path / "pipe"), "--prompts", str(questions)]) == 2
    err = capsys.readouterr().err
    assert "is a pipeline: eval one of its steps' run directories" in err and err.count("\n") == 1


def test_a_locked_run_is_refused(trained_run, questions, capsys):
    from alignment.run_lock import RunLock

    with RunLock(trained_run.root):
        before = snapshot(trained_run.root)
        assert main(["eval", str(trained_run.root), "--prompts", str(questions), "--max-tokens", "4"]) == 2
        err = capsys.readouterr().err
        assert "is locked by pid" in err and err.count("\n") == 1
        assert snapshot(trained_run.root) == before


# ------------------------------------------------------------------------------ pure parts
def test_score_summary_by_hand():
    rows = [{"mean_score": 4.0, "length": 10}, {"mean_score": 2.0, "length": 20}, {"mean_score": None, "length": 30}]
    s = score_summary(rows, seed=0, resamples=200)
    assert s["prompts"] == 3 and s["scored"] == 2 and s["scored_share"] == pytest.approx(2 / 3)
    assert s["mean_score"] == 3.0 and s["mean_length"] == 20.0
    assert 2.0 <= s["mean_score_ci"][0] <= 3.0 <= s["mean_score_ci"][1] <= 4.0
    assert score_summary(rows, seed=0, resamples=200) == s  # seeded
    assert score_summary(rows[2:])["mean_score"] is None and score_summary(rows[2:])["mean_score_ci"] is None


def test_iterations_and_names():
    assert parse_iterations("all", [1, 2]) == [0, 1, 2]
    assert parse_iterations("2, 0,2", [1, 2]) == [0, 2]
    with pytest.raises(EvalError, match=r"iteration 3 has not trained a model \(trained: 1, 2"):
        parse_iterations("3", [1, 2])
    with pytest.raises(EvalError, match="nothing trained yet"):
        parse_iterations("1", [])
    assert result_name("data/my held-out.v2.jsonl", "abc") == "my_held-out.v2-abc"
    lines = table_lines([{"model": "M_1", "iteration": 0, "prompts": 3, "scored_share": 1.0, "mean_score": 2.5,
                          "mean_score_ci": [2.0, 3.0], "mean_length": 7.25},
                         {"model": "M_2", "iteration": 1, "prompts": 3, "scored_share": 0.0, "mean_score": None,
                          "mean_score_ci": None, "mean_length": 8.0}])
    assert lines[1].split() == ["M_1", "–", "(initial)", "3", "100%", "2.50", "[2.00,", "3.00]", "7.2"]
    assert lines[2].split() == ["M_2", "iteration", "1", "3", "0%", "–", "8.0"]


@pytest.mark.parametrize("algorithm, extra, mode", [
    ("self-rewarding", {"judge": {"n": 1, "mode": "free", "score": "int"}}, "free"),
    ("meta-rewarding", {}, "free"),
    ("spin", {"eval": {"judge": {"mode": "logprob", "score": "expected"}}}, "logprob"),
])
def test_the_fixed_judge_of_each_algorithm(algorithm, extra, mode):
    """The judge settings each algorithm's eval stage scores with, run by the base model."""
    from alignment.algorithms import ALGORITHMS
    from alignment.benchmark_eval import fixed_judge
    from alignment.config import parse_recipe
    from alignment.iterative import Run

    fields = {"data": {"source": "sft.jsonl"}} if algorithm == "spin" else {"prompts": {"source": "p.jsonl"}}
    recipe = parse_recipe({"algorithm": algorithm, "model": "some/model"} | fields | extra)
    judge = fixed_judge(Run(None, recipe, ALGORITHMS[algorithm]))  # eval.judge.model base: nothing to resolve
    assert judge.adapter is None and judge.which == "base" and judge.settings.mode == mode
    assert judge.resamples == 2000

