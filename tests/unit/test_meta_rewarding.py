"""Meta-Rewarding stages: pure pieces with a scripted generator, then the whole flow on the tiny
random model (transformers backend) through the real Prefect engine."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from alignment import prompts
from alignment.algorithms import algorithm_run
from alignment.config import RecipeError, load_recipe
from alignment.generation import Completion
from alignment.judge import judge_prompt
from alignment.meta_rewarding import (
    META_REWARDING,
    MetaJudgeSettings,
    judge_training_rows,
    build_judge_pair_rows,
    judge_rubric,
    log_odds,
    meta_items,
    meta_judge_battles,
    position_offsets,
    rate_items,
    tie_rates,
    verdict_from_probs,
)
from alignment.store import RunStore
from tests.conftest import write_recipe

STAGES = [name for name in META_REWARDING.names() if name != "eval"]  # eval is off in these recipes

REPO = Path(__file__).resolve().parents[2]
_JA = re.compile(r"<judgment_a>(.*?)</judgment_a>", re.DOTALL)
_JB = re.compile(r"<judgment_b>(.*?)</judgment_b>", re.DOTALL)


# ------------------------------------------------------------------------------ helpers
class ScriptedGenerator:
    """A Generator whose meta-judge answers are functions of (judgment A text, judgment B text)."""

    backend = "scripted"

    def __init__(self, text=lambda a, b: "", probs=lambda a, b: {" A": 0.5, " B": 0.5}, fail_on_call=None):
        self.text, self.probs, self.fail_on_call = text, probs, fail_on_call
        self.chat_calls = self.prob_calls = 0
        self.conversations = []

    @staticmethod
    def _ab(conv):
        user = conv[0]["content"]
        return _JA.search(user).group(1), _JB.search(user).group(1)

    def chat(self, conversations, sampling, *, adapter=None, seed=0, continue_final=False):
        self.chat_calls += 1
        if self.fail_on_call == self.chat_calls:
            raise RuntimeError("killed")
        self.conversations += list(conversations)
        return [[Completion(self.text(*self._ab(c)), 5)] for c in conversations]

    def next_token_probs(self, conversations, candidates, *, adapter=None):
        self.prob_calls += 1
        assert tuple(candidates) == (" A", " B")
        assert all(c[-1]["role"] == "assistant" and c[-1]["content"].endswith("Winner: Judgment") for c in conversations)
        return [self.probs(*self._ab(c)) for c in conversations]

    def close(self):
        pass


def judge_row(pid, idx, scores, judgments=None, length=10):
    judgments = judgments or [f"{pid}-r{idx}-j{k} Score: {s}" for k, s in enumerate(scores)]
    valid = [s for s in scores if s is not None]
    return {"prompt_id": pid, "prompt": f"question {pid}", "response_index": idx, "response": f"answer {pid}{idx}",
            "length": length, "judgments": judgments, "scores": scores,
            "score_ints": [None if s is None else int(round(s)) for s in scores],
            "expected_scores": [None] * len(scores), "score_modes": ["parsed"] * len(scores),
            "mean_score": sum(valid) / len(valid) if valid else None, "n_failed": scores.count(None)}


def quality(text: str) -> int:
    """Scripted meta-judge's view of a judgment: its 'j<k>' number is its quality."""
    return int(re.search(r"-j(\d+)", text).group(1))


# ------------------------------------------------------------------------------ prompts
def test_rubric_is_shared_by_judge_and_meta_judge():
    rubric = judge_rubric()
    assert rubric.startswith("- Add 1 point") and rubric.rstrip().endswith("insightful answer.")
    assert rubric.count("\n- ") == 4 and "{#" not in rubric
    judge = prompts.render("judge", question="q", response="r")
    assert rubric in judge and "<question>q</question>" in judge
    assert judge.index("criterion:\n\n- Add 1 point") > 0 and "answer.\n\n<question>" in judge


# ------------------------------------------------------------------------------ verdicts
def test_log_odds_and_verdict_from_probs():
    assert log_odds(0.0, 0.0) is None
    assert log_odds(0.6, 0.2) == pytest.approx(math.log(3))
    assert log_odds(0.5, 0.0) == pytest.approx(math.log(0.5) - math.log(1e-12))  # floored, finite
    assert verdict_from_probs(0.6, 0.2) == "A" and verdict_from_probs(0.2, 0.6) == "B"
    assert verdict_from_probs(0.3, 0.3) is None and verdict_from_probs(0.0, 0.0) is None
    # with the position prior removed: ln 3 ≈ 1.10 < offset 1.5 → B
    assert verdict_from_probs(0.6, 0.2, offset=1.5) == "B"
    assert verdict_from_probs(0.6, 0.2, offset=0.5) == "A"


def test_position_offsets_are_the_mean_log_odds_per_prompt():
    # ℓ = b + s: b = 2 for prompt p (s = ±1 cancels over both orders), b = −1 for q; None ignored
    off = position_offsets(["p", "p", "q", "q", "q"], [3.0, 1.0, -1.0, None, -1.0])
    assert off == {"p": pytest.approx(2.0), "q": pytest.approx(-1.0)}


# ------------------------------------------------------------------------------ items / battles
def test_meta_items_pick_most_disputed_response_and_report_agreement():
    rows = [judge_row("p", 0, [3.0, 3.0, 3.0]), judge_row("p", 1, [1.0, 5.0, 3.0]),
            judge_row("q", 0, [4.0, 4.0, 4.0]), judge_row("q", 1, [2.0, 2.0, None]),
            judge_row("r", 0, [None, None, 1.0])]
    items, agree = meta_items(rows)
    assert [(i["prompt_id"], i["response_index"]) for i in items] == [("p", 1)]
    assert agree == ["q", "r"]  # zero variance / fewer than two scores: no judge pair, reported


def test_free_mode_parses_last_winner_line_and_fails_without_one():
    items, _ = meta_items([judge_row("p", 0, [1.0, 5.0, None])])

    def text(a, b):
        if quality(a) == 0:  # j0 shown first: no verdict at all
            return "Both are fine."
        return "Winner: Judgment A\n...on reflection\nWinner: Judgment B"  # the last line counts

    gen = ScriptedGenerator(text=text)
    rows = meta_judge_battles(gen, items, MetaJudgeSettings(mode="free"))
    assert [(r["a"], r["b"]) for r in rows] == [(0, 1), (1, 0)]  # judgment 2 failed: never battled
    assert rows[0]["verdict"] is None and rows[0]["winner"] is None
    assert rows[1]["verdict"] == "B" and rows[1]["winner"] == 0
    assert {r["mode"] for r in rows} == {"parsed"} and rows[1]["p_a"] is None
    assert (rows[1]["a_score"], rows[1]["b_score"]) == (5.0, 1.0) and gen.prob_calls == 0
    # the rubric, the question and both judgments are in the meta-judge prompt
    user = gen.conversations[0][0]["content"]
    assert judge_rubric() in user and "question p" in user and "answer p0" in user


def _biased_probs(a, b, bias=2.0, scale=0.5):
    """log-odds = position bias + (quality(a) − quality(b))·scale: always "A" by argmax."""
    ell = bias + scale * (quality(a) - quality(b))
    return {" A": 1 / (1 + math.exp(-ell)), " B": 1 / (1 + math.exp(ell))}


def test_logprob_mode_always_decides_and_debiasing_recovers_content_preference():
    items, _ = meta_items([judge_row("p", 0, [1.0, 2.0, 5.0])])
    plain = meta_judge_battles(ScriptedGenerator(probs=_biased_probs), items, MetaJudgeSettings(mode="logprob"))
    assert len(plain) == 6 and {r["verdict"] for r in plain} == {"A"}  # pure position bias
    assert all(r["text"].endswith("Winner: Judgment A") and r["mode"] == "logprob" for r in plain)
    fair = meta_judge_battles(ScriptedGenerator(probs=_biased_probs), items,
                              MetaJudgeSettings(mode="logprob", debias_position=True))
    assert all(r["offset"] == pytest.approx(2.0) for r in fair)
    assert all(r["winner"] == max(r["a"], r["b"]) for r in fair)  # higher j wins, in both orders
    # and that ranks judgment 2 first, 0 last → judge pair (2 over 0)
    lengths = {("p", 0): [5, 5, 5]}
    elo = rate_items(items, fair, lengths, prior=0.1, pooled=False, length_cap=None)
    ratings = [r["rating"] for r in elo]
    assert ratings[2] > ratings[1] > ratings[0]
    assert elo[2]["wins"] == pytest.approx(2.0) and elo[0]["losses"] == pytest.approx(2.0)  # ω = ½ each
    pairs, stats = build_judge_pair_rows(items, elo, length_cap=None)
    assert (pairs[0]["chosen_index"], pairs[0]["rejected_index"]) == (2, 0)
    assert pairs[0]["prompt"] == judge_prompt("question p", "answer p0")
    assert pairs[0]["chosen"] == items[0]["judgments"][2] and stats["judge_pairs"] == 1
    # without debiasing every win was in the favoured position: ω_A = 0, all ratings tie, no pair
    elo_plain = rate_items(items, plain, lengths, prior=0.1, pooled=False, length_cap=None)
    assert len({round(r["rating"], 9) for r in elo_plain}) == 1
    assert build_judge_pair_rows(items, elo_plain, None)[1]["no_pair"] == 1


def test_pooled_position_weights_are_counted_over_the_iteration():
    items, _ = meta_items([judge_row("p", 0, [1.0, 2.0, 5.0]), judge_row("q", 0, [1.0, 3.0])])
    # p: pure position bias (6 × "A"); q: one battle each way, both won by judgment 1 → A 1, B 1
    plain = meta_judge_battles(ScriptedGenerator(probs=lambda a, b: _biased_probs(a, b, bias=5.0)),
                               items[:1], MetaJudgeSettings(mode="logprob"))
    q = meta_judge_battles(ScriptedGenerator(probs=lambda a, b: _biased_probs(a, b, bias=0.0)),
                           items[1:], MetaJudgeSettings(mode="logprob"))
    battles = plain + q
    own = rate_items(items, battles, {("p", 0): [1] * 3, ("q", 0): [1] * 2}, prior=0.1, pooled=False, length_cap=None)
    pooled = rate_items(items, battles, {("p", 0): [1] * 3, ("q", 0): [1] * 2}, prior=0.1, pooled=True, length_cap=None)
    assert [(r["omega1"], r["omega2"]) for r in own if r["prompt_id"] == "p"][0] == (0.0, 1.0)
    assert {(r["omega1"], r["omega2"]) for r in pooled} == {(1 / 8, 7 / 8)}  # 7 A-wins, 1 B-win in all
    # but a position-only meta-judge is symmetric over both orders: no weighting invents a preference
    assert len({round(r["rating"], 6) for r in pooled if r["prompt_id"] == "p"}) == 1
    q_ratings = [r["rating"] for r in pooled if r["prompt_id"] == "q"]
    assert q_ratings[1] > q_ratings[0]  # q's judgment 1 won in both positions


def test_length_cap_excludes_long_judgments_from_the_pair():
    items, _ = meta_items([judge_row("p", 0, [1.0, 2.0, 5.0])])
    fair = meta_judge_battles(ScriptedGenerator(probs=_biased_probs), items,
                              MetaJudgeSettings(mode="logprob", debias_position=True))
    elo = rate_items(items, fair, {("p", 0): [5, 5, 50]}, prior=0.1, pooled=False, length_cap=10)
    assert [r["eligible"] for r in elo] == [True, True, False]
    pairs, stats = build_judge_pair_rows(items, elo, length_cap=10)
    assert (pairs[0]["chosen_index"], pairs[0]["rejected_index"]) == (1, 0) and stats["over_cap_judgments"] == 1


def test_tie_rates_under_both_score_modes():
    def row(pid, idx, ints, expected):
        r = judge_row(pid, idx, [float(e) for e in expected])
        r["score_ints"], r["expected_scores"] = ints, expected
        return r

    rows = [row("p", 0, [4, 4], [4.2, 3.9]), row("p", 1, [4, 4], [3.6, 3.8]),   # int tie, expected 4.05 vs 3.7
            row("q", 0, [5, 3], [4.6, 3.1]), row("q", 1, [2, 2], [2.2, 2.0])]   # no tie either way
    rates = tie_rates(rows)
    assert rates["tie_rate_int"] == 0.5 and rates["tie_rate_expected"] == 0.0 and rates["tie_rate"] == 0.0


# ------------------------------------------------------------------------------ config
def test_shipped_recipes_have_paper_and_tiny_settings():
    paper, _ = load_recipe(REPO / "recipes/paper-meta-rewarding.yaml")
    assert (paper.iterations, paper.generation.n, paper.judge.n) == (4, 7, 11)
    assert paper.meta_judge.train_judge_iterations == [1, 2] and paper.meta_judge.mode == "free"
    assert [paper.trains_judge(t) for t in (1, 2, 3, 4)] == [True, True, False, False]
    tiny, _ = load_recipe(REPO / "recipes/tiny-meta-rewarding.yaml")
    assert tiny.meta_judge.mode == "logprob" and tiny.meta_judge.debias_position
    assert STAGES == ["prompts", "generate", "judge", "pairs", "meta_judge", "elo", "judge_pairs", "train"]
    assert STAGES.index("judge_pairs") < STAGES.index("train")


def test_rho_schedule_and_bad_fields(tmp_path, prompts_file):
    path = write_recipe(tmp_path / "r.yaml", "m", prompts_file, algorithm="meta-rewarding", **{"pairs.rho": "[0.0, 0.25]"})
    recipe, _ = load_recipe(path)
    assert [recipe.pairs.rho_for(t) for t in (1, 2, 3)] == [0.0, 0.25, 0.25]
    for key, value, field in [("pairs.rho", "[0.1, 1.0]", "pairs.rho"), ("judge.n", "1", "judge.n"),
                              ("meta_judge.debias_position", "true", "meta_judge"),
                              ("meta_judge.train_judge_iterations", "[0]", "meta_judge.train_judge_iterations")]:
        with pytest.raises(RecipeError, match=f"field {re.escape(field)}"):
            load_recipe(path, [f"{key}={value}"])


# ------------------------------------------------------------------------------ stages on a store
@pytest.fixture
def judged_store(tmp_path, tiny_model_dir, prompts_file):
    """A run whose iteration-1 judge table is hand-written (3 prompts, one all-agree)."""
    path = write_recipe(tmp_path / "r.yaml", str(tiny_model_dir), prompts_file, algorithm="meta-rewarding",
                        iterations=2, **{"judge.n": 3, "meta_judge.mode": "logprob", "meta_judge.debias_position": "true",
                                         "meta_judge.train_judge_iterations": "[1]", "engine.shard_size": 1})
    recipe, data = load_recipe(path)
    store = RunStore.create(tmp_path / "run", recipe=data, algorithm=recipe.algorithm)
    rows = [judge_row("p", 0, [1.0, 2.0, 5.0]), judge_row("p", 1, [3.0, 3.0, 3.0]),
            judge_row("q", 0, [2.0, 4.0, 3.0]), judge_row("q", 1, [1.0, 1.0, 1.0]),
            judge_row("z", 0, [2.0, 2.0, 2.0]), judge_row("z", 1, [2.0, 2.0, 2.0])]
    for t in (1, 2):
        store.write_rows(t, "judge", rows, inputs={}, recipe_hash="x")
    return store, recipe


def test_meta_stages_resume_from_shards_and_report_agreement(judged_store):
    store, recipe = judged_store
    crashing = ScriptedGenerator(probs=_biased_probs, fail_on_call=2)
    run = algorithm_run(store, recipe, log=lambda s: None, _generator=crashing)
    with pytest.raises(RuntimeError, match="killed"):
        run.run_stage("meta_judge", 1)  # dies in shard 2 of 2 (shard_size 1: one prompt per shard)
    fresh = ScriptedGenerator(probs=_biased_probs)
    logs = []
    run = algorithm_run(store, recipe, log=logs.append, _generator=fresh)
    run.run_stage("meta_judge", 1)
    assert fresh.chat_calls == 1  # only the missing shard
    battles = store.read_rows(1, "meta_judge")
    assert len(battles) == 12 and {b["prompt_id"] for b in battles} == {"p", "q"}
    info = store.manifest(1, "meta_judge")["info"]
    assert (info["meta_prompts"], info["all_agree"], info["all_agree_ids"]) == (2, 1, ["z"])
    assert info["failed_battles"] == 0 and info["modes"] == {"logprob": 12}
    assert any("all agree" in line for line in logs)
    run.run_stage("elo", 1)
    stats = run.run_stage("judge_pairs", 1)
    assert stats["judge_pairs"] == 2 and stats["all_agree"] == 1
    # the judge pairs join the actor pairs in the one DPO step of iteration 1
    extra = judge_training_rows(run, 1)
    assert len(extra) == 2 and set(extra[0]) == {"prompt", "chosen", "rejected"}
    assert extra[0]["prompt"].startswith("Review the user's question")


def test_judge_training_off_makes_no_meta_judge_calls(judged_store):
    store, recipe = judged_store
    gen = ScriptedGenerator(probs=_biased_probs)
    run = algorithm_run(store, recipe, log=lambda s: None, _generator=gen)
    run.run_stage("meta_judge", 2)
    run.run_stage("elo", 2)
    stats = run.run_stage("judge_pairs", 2)
    assert gen.chat_calls == 0 and gen.prob_calls == 0
    assert stats["judge_training"] is False and store.read_rows(2, "judge_pairs") == []
    assert judge_training_rows(run, 2) == []


# ------------------------------------------------------------------------------ the flow
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir, prefect_harness):
    from flows.meta_rewarding import meta_rewarding_flow

    tmp = tmp_path_factory.mktemp("mr")
    prompts_path = tmp / "prompts.jsonl"
    prompts_path.write_text("".join(f'{{"prompt": "Question number {i}?"}}\n' for i in range(4)))
    recipe = write_recipe(
        tmp / "recipe.yaml", str(tiny_model_dir), prompts_path, algorithm="meta-rewarding", iterations=2,
        **{"judge.n": 3, "meta_judge.mode": "logprob", "meta_judge.debias_position": "true", "meta_judge.max_tokens": 4,
           "meta_judge.train_judge_iterations": "[1]", "pairs.rho": "[0.0, 0.3]", "train.max_length": 640})
    result = meta_rewarding_flow(run_dir=str(tmp / "run"), recipe_path=str(recipe))
    return RunStore.open(tmp / "run"), result


def test_flow_layout_battles_and_ratings(finished_run):
    store, result = finished_run
    assert store.iterations() == [1, 2] and store.run_info()["algorithm"] == "meta-rewarding"
    for stage in STAGES:
        assert store.manifest(1, stage) is not None, stage
    judged = store.read_rows(1, "judge")
    assert len(judged) == 8 and all(len(r["judgments"]) == 3 for r in judged)
    battles = store.read_rows(1, "meta_judge")
    info = store.manifest(1, "meta_judge")["info"]
    # every pair of a prompt's scored judgments, in both orders
    for pid in {b["prompt_id"] for b in battles}:
        mine = {(b["a"], b["b"]) for b in battles if b["prompt_id"] == pid}
        assert mine == {(a, b) for a in range(3) for b in range(3) if a != b}
    assert len(battles) == 6 * info["meta_prompts"] and info["meta_prompts"] + info["all_agree"] == 4
    assert all(b["verdict"] in ("A", "B") and b["mode"] == "logprob" for b in battles)  # logprob always decides
    elo = store.read_rows(1, "elo")
    assert len(elo) == 3 * info["meta_prompts"]
    assert {"rating", "wins", "losses", "length", "eligible", "omega1", "omega2"} <= set(elo[0])


def test_flow_trains_actor_and_judge_pairs_in_one_step(finished_run):
    store, _ = finished_run
    actor = store.read_rows(1, "pairs")
    judge_pairs = store.read_rows(1, "judge_pairs")
    train = store.manifest(1, "train")
    assert train["info"]["pairs"] == len(actor) + len(judge_pairs)
    assert "judge_pairs" in train["inputs"]
    assert judge_pairs, "the debiased meta-judge of the tiny model yields judge pairs (deterministic seed)"
    for p in judge_pairs:
        assert p["chosen_rating"] > p["rejected_rating"] and p["chosen_index"] != p["rejected_index"]
        assert p["prompt"].startswith("Review the user's question")
    # iteration 2 does not train the judge: empty meta tables, actor pairs only
    assert store.manifest(2, "meta_judge")["info"]["judge_training"] is False
    assert store.read_rows(2, "judge_pairs") == []
    assert store.manifest(2, "train")["info"]["pairs"] == len(store.read_rows(2, "pairs"))
    assert "judge_pairs" not in store.manifest(2, "train")["inputs"]


def test_flow_reports_rho_schedule_length_and_tie_rates(finished_run):
    store, result = finished_run
    m1 = json.loads((store.iter_dir(1) / "metrics.json").read_text())
    m2 = json.loads((store.iter_dir(2) / "metrics.json").read_text())
    assert m1["pairs"]["rho"] == 0.0 and m2["pairs"]["rho"] == 0.3
    for m in (m1, m2):
        assert {"chosen_mean_length", "rejected_mean_length", "response_mean_length", "length_gap"} <= set(m["length"])
        assert {"tie_rate_int", "tie_rate_expected"} <= set(m["pairs"])
    assert m1["judge_pairs"]["judge_training"] is True and m2["judge_pairs"]["judge_training"] is False
    assert "judge pairs" in result["iter 1"] and result["run_dir"] == str(store.root)


def test_flow_rerun_skips_every_stage(finished_run):
    from flows.meta_rewarding import meta_rewarding_flow

    store, _ = finished_run
    before = len(store.events())
    meta_rewarding_flow(run_dir=str(store.root))
    new = store.events()[before:]
    assert {e["event"] for e in new if e.get("stage")} == {"skip"}
    assert len([e for e in new if e["event"] == "skip"]) == 2 * len(STAGES)
