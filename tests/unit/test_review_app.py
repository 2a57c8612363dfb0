"""Review app and corrections: pages, correction forms, escaping, export, apply_corrections."""

from __future__ import annotations

import io
import json
import re

import pyarrow.parquet as pq
import pytest
from starlette.testclient import TestClient

from alignment.corrections import (
    CORRECTIONS_FILE,
    add_correction,
    apply_corrections,
    export_pairs,
    load_corrections,
    reviewed_pairs,
    validate_correction,
)
from alignment.files import StoreError
from alignment.generation import Completion
from alignment.meta_judge import DEFAULT_PRIOR
from alignment.meta_rewarding import (
    MetaJudgeSettings,
    build_judge_pair_rows,
    meta_items,
    meta_judge_battles,
    rate_items,
)
from alignment.pairs import build_pairs
from alignment.review_app import META_STAGES, create_app
from alignment.review_views import eval_charts, judge_identity, line_chart, training_curve_charts
from alignment.self_rewarding import eval_summary
from alignment.store import RunStore

SCRIPT = "<script>alert('x')</script>"


def judge_row(prompt_id: str, index: int, scores: list, length: int, response: str | None = None) -> dict:
    valid = [s for s in scores if s is not None]
    return {
        "prompt_id": prompt_id,
        "prompt": f"Question {prompt_id}?",
        "response_index": index,
        "response": response or f"answer {index} to {prompt_id}",
        "length": length,
        "judgments": [f"rationale {j} for {prompt_id}/{index}\nScore: {s}" for j, s in enumerate(scores)],
        "scores": scores,
        "score_ints": [None if s is None else int(s) for s in scores],
        "expected_scores": [None] * len(scores),
        "score_modes": ["parsed"] * len(scores),
        "mean_score": sum(valid) / len(valid) if valid else None,
        "n_failed": len(scores) - len(valid),
    }


def judge_rows() -> list[dict]:
    return [
        # p-pair: r0 best (4), r1 worst (1) -> chosen 0, rejected 1
        judge_row("p-pair", 0, [4.0, 4.0, 4.0], 30),
        judge_row("p-pair", 1, [1.0, 1.0, 1.0], 80),
        judge_row("p-pair", 2, [3.0, 3.0, 3.0], 50),
        # p-tie: every response scores 3 -> no pair
        judge_row("p-tie", 0, [3.0, 3.0, 3.0], 20),
        judge_row("p-tie", 1, [3.0, 3.0, 3.0], 40),
        # p-xss: a failed judgment and a response that is an HTML script
        judge_row("p-xss", 0, [5.0, None, 5.0], 10, response=SCRIPT),
        judge_row("p-xss", 1, [0.0, 5.0, 1.0], 90),
    ]


@pytest.fixture()
def run(tmp_path):
    store = RunStore.create(tmp_path / "run", recipe={"algorithm": "self_rewarding", "pairs": {"rho": 0.0}},
                            algorithm="self_rewarding")
    rows = judge_rows()
    store.write_rows(1, "judge", rows, inputs={}, recipe_hash="x")
    pairs, stats = build_pairs(rows)
    store.write_rows(1, "pairs", pairs, inputs={}, recipe_hash="x", info=stats)
    store.write_rows(1, "meta_judge", [{"prompt_id": "p-xss", "battles": [{"a": 0, "b": 1, "verdict": "A"}],
                                        "ratings": [1040.0, 960.0]}], inputs={}, recipe_hash="x")
    # Iteration 2 is being judged: only a shard, no manifest.
    store.write_shard(2, "judge", 0, rows[:2], key="abc")
    store.write_rows(2, "prompts", [{"prompt_id": "q", "prompt": "Q", "source": "seed"}],
                     inputs={}, recipe_hash="x")
    return store


@pytest.fixture()
def client(run):
    return app_client(run.root)


def app_client(root) -> TestClient:
    """A client of the review app as a browser on the default address sees it."""
    return TestClient(create_app(root), base_url="http://127.0.0.1:8765")


def post(client, action, prompt_id, t=1, **fields):
    """A correction form as the pages post it (with the session's CSRF token)."""
    data = {"action": action, "prompt_id": prompt_id, "who": "tester", "csrf_token": csrf_token(client),
            **{k: str(v) for k, v in fields.items()}}
    return client.post(f"/iter/{t}/corrections", data=data, follow_redirects=False)


# ---------------------------------------------------------------------------- pages


def test_every_page_renders(client):
    for url in ["/", "/healthz", "/iter/1", "/iter/1?show=ties", "/iter/1/prompt?id=p-pair",
                "/iter/1/corrections", "/iter/1/stage/meta_judge", "/iter/1/export?format=jsonl",
                "/iter/1/export?format=parquet"]:
        response = client.get(url)
        assert response.status_code == 200, (url, response.text[:500])
    assert client.get("/healthz").json()["status"] == "ok"


def test_overview_shows_counts_charts_and_in_progress_stage(client):
    page = client.get("/").text
    assert "<svg" in page and "Judgment scores" in page
    assert "in progress" in page  # iteration 2's judge has only a shard
    assert "Chosen vs rejected mean length" in page


def test_browser_rows_and_highlighting(client):
    page = client.get("/iter/1").text
    assert "3 of 3 prompts" in page
    assert 'class="resp chosen"' in page and 'class="resp rejected"' in page
    assert "rationale 1 for p-pair/0" in page  # each judgment's rationale is there


@pytest.mark.parametrize("show, expected", [
    ("ties", {"p-tie"}),
    ("failed", {"p-xss"}),
    ("high_variance", {"p-xss"}),
    ("rejected_longer", {"p-pair", "p-xss"}),
    ("chosen_longer", set()),
])
def test_filters(client, show, expected):
    page = client.get(f"/iter/1?show={show}").text
    shown = {pid for pid in ("p-pair", "p-tie", "p-xss") if f'data-prompt-id="{pid}"' in page}
    assert shown == expected


def test_search_sort_and_pagination(client):
    page = client.get("/iter/1?q=ANSWER+1+TO+P-TIE").text
    assert 'data-prompt-id="p-tie"' in page and 'data-prompt-id="p-pair"' not in page
    page = client.get("/iter/1?sort=variance&per_page=10").text
    assert page.index('data-prompt-id="p-xss"') < page.index('data-prompt-id="p-pair"')
    assert client.get("/iter/1?page=99").status_code == 200  # clamped to the last page


def test_bad_query_parameters_are_400(client):
    for url in ["/iter/1?show=nope", "/iter/1?sort=__class__", "/iter/1?page=-1", "/iter/1?per_page=100000"]:
        response = client.get(url)
        assert response.status_code == 400, url
        assert 'class="error"' in response.text


def test_incomplete_stage_not_shown(client):
    response = client.get("/iter/2")
    assert response.status_code == 404 and "in progress" in response.text
    assert client.get("/iter/2/stage/judge").status_code == 404
    assert client.get("/iter/1/stage/nothing").status_code == 404
    assert client.get("/iter/7").status_code == 404


def test_model_text_is_escaped(client):
    page = client.get("/iter/1/prompt?id=p-xss").text
    assert SCRIPT not in page
    assert "&lt;script&gt;" in page
    assert SCRIPT not in client.get("/iter/1").text


def test_meta_judge_rows_shown_generically(client):
    assert "1040" in client.get("/iter/1/prompt?id=p-xss").text
    assert "verdict" in client.get("/iter/1/stage/meta_judge").text


def test_not_a_run_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="not a selfalign run"):
        create_app(tmp_path)
    with pytest.raises(StoreError, match="does not exist"):
        create_app(tmp_path / "missing")


# ---------------------------------------------------------------------------- meta-judge view
# Meta-Rewarding stages written by the producing code (meta_items → meta_judge_battles →
# rate_items → build_judge_pair_rows) with a scripted meta-judge, so the view is checked
# against the real table schemas.

JUDGMENT_LENGTHS = [40, 30, 20]  # tokens of judgments 0, 1, 2; judgment 0 is over LENGTH_CAP
LENGTH_CAP = 35
_JUDGMENT_PAIR = re.compile(r"<judgment_a>(.*?)</judgment_a>.*<judgment_b>(.*?)</judgment_b>", re.DOTALL)
_JUDGMENT_ID = re.compile(r"rationale (\d+) for ([\w-]+)/")


def meta_rows() -> list[dict]:
    # p-xss #1 (scores 0, 5, 1) is the only response of p-xss with disputed judgments;
    # p-nopair #0 (2, 4) is meta-judged but every battle fails; p-pair and p-tie all agree.
    return judge_rows() + [judge_row("p-nopair", 0, [2.0, 4.0], 15), judge_row("p-nopair", 1, [3.0, 3.0], 25)]


def scripted_meta_judgment(text_a: str, text_b: str) -> tuple[str | None, str]:
    """(verdict, reasoning): the higher judgment index is better; 0 vs 1 and all of p-nopair fail;
    the battle 2 vs 0 answers with a script tag."""
    (ja, pid), (jb, _) = (_JUDGMENT_ID.search(x).groups() for x in (text_a, text_b))
    ja, jb = int(ja), int(jb)
    if pid == "p-nopair" or (ja, jb) == (0, 1):
        return None, "Both judgments look the same to me."
    return ("A" if ja > jb else "B"), (SCRIPT if (ja, jb) == (2, 0) else f"Judgment {max(ja, jb)} follows the rubric.")


class ScriptedMetaJudge:
    """A Generator stand-in for meta_judge_battles (free and logprob modes)."""

    def _judged(self, conversations):
        return [scripted_meta_judgment(*_JUDGMENT_PAIR.search(c[0]["content"]).groups()) for c in conversations]

    def chat(self, conversations, sampling, *, adapter=None, seed=0):
        logprob = "Winner:" in sampling.stop  # the reasoning stops before the verdict
        return [[Completion(reason + (f"\nWinner: Judgment {verdict}" if verdict and not logprob else ""), 9)]
                for verdict, reason in self._judged(conversations)]

    def next_token_probs(self, conversations, candidates, *, adapter=None):
        probs = {"A": {" A": 0.8, " B": 0.1}, "B": {" A": 0.1, " B": 0.8}, None: {}}
        return [probs[verdict] for verdict, _ in self._judged(conversations)]


def write_meta_stages(store, t: int, rows: list[dict], mode: str = "free") -> None:
    items, _ = meta_items(rows)
    battles = meta_judge_battles(ScriptedMetaJudge(), items, MetaJudgeSettings(mode=mode))
    lengths = {(i["prompt_id"], i["response_index"]): JUDGMENT_LENGTHS[:len(i["judgments"])] for i in items}
    elo = rate_items(items, battles, lengths, prior=DEFAULT_PRIOR, pooled=False, length_cap=LENGTH_CAP)
    judge_pairs, _ = build_judge_pair_rows(items, elo, LENGTH_CAP)
    for stage, stage_rows in zip(META_STAGES, (battles, elo, judge_pairs)):
        store.write_rows(t, stage, stage_rows, inputs={}, recipe_hash="x", info={"judge_training": True})


def meta_store(tmp_path, mode: str = "free") -> RunStore:
    store = RunStore.create(tmp_path / "meta-run", recipe={"algorithm": "meta_rewarding", "pairs": {"rho": 0.0}},
                            algorithm="meta_rewarding")
    rows = meta_rows()
    store.write_rows(1, "judge", rows, inputs={}, recipe_hash="x")
    store.write_rows(1, "pairs", build_pairs(rows)[0], inputs={}, recipe_hash="x")
    write_meta_stages(store, 1, rows, mode)
    return store


@pytest.fixture()
def meta_run(tmp_path):
    return meta_store(tmp_path)


@pytest.fixture()
def meta_client(meta_run):
    return app_client(meta_run.root)


def meta_section(page: str) -> str | None:
    """The meta-judge card of a prompt page, None if there is none."""
    if 'id="meta-judge"' not in page:
        return None
    return page.split('id="meta-judge"', 1)[1].split("<h2>Add a note</h2>", 1)[0]


def table_of(section: str, css_class: str) -> str:
    return section.split(f'<table class="{css_class}">', 1)[1].split("</table>", 1)[0]


def test_meta_judge_section_ranks_judgments_by_rating(meta_client, meta_run):
    page = meta_client.get("/iter/1/prompt?id=p-xss").text
    section = meta_section(page)
    assert section is not None and "Response <strong>#1</strong> was meta-judged" in section
    assert '<a class="badge meta" href="#meta-judge">meta-judged</a>' in page  # on response #1's card
    elo = [r for r in meta_run.read_rows(1, "elo") if r["prompt_id"] == "p-xss"]
    by_rating = sorted(elo, key=lambda r: -r["rating"])
    # the scripted meta-judge prefers higher judgment indices: 2 > 1 > 0
    ratings = table_of(section, "meta-ratings")
    assert re.findall(r'data-judgment="(\d+)"', ratings) == ["2", "1", "0"] == [str(r["judgment_index"]) for r in by_rating]
    shown = [float(x) for x in re.findall(r'<td class="num rating">([^<]*)</td>', ratings)]
    assert shown == sorted(shown, reverse=True) and len(shown) == 3
    assert shown == [pytest.approx(r["rating"], abs=0.5) for r in by_rating]


def test_meta_judge_section_marks_the_judge_pair(meta_client, meta_run):
    section = meta_section(meta_client.get("/iter/1/prompt?id=p-xss").text)
    pair = next(r for r in meta_run.read_rows(1, "judge_pairs") if r["prompt_id"] == "p-xss")
    # judgment 0 rates lowest but is over the length cap: judgment 1 is the rejected one
    assert (pair["chosen_index"], pair["rejected_index"]) == (2, 1)
    ratings = table_of(section, "meta-ratings")
    assert dict(re.findall(r'data-judgment="(\d+)" data-role="(\w+)"', ratings)) == {"2": "chosen", "1": "rejected"}
    assert 'data-judgment="0">' in ratings and "no (over length cap)" in ratings
    assert "<span class=\"badge chosen\">chosen</span> judgment 2" in section
    assert "no judge pair" not in section


def test_meta_judge_battles_show_failed_verdicts_and_escape_text(meta_client):
    page = meta_client.get("/iter/1/prompt?id=p-xss").text
    battles = table_of(meta_section(page), "meta-battles")
    # battle plan (0,1), (1,0), (0,2), (2,0), (1,2), (2,1); 0 vs 1 has no verdict
    assert re.findall(r'data-verdict="(\w+)"', battles) == ["failed", "A", "B", "A", "B", "A"]
    first = battles.split('data-battle="1"', 1)[1].split("</tr>", 1)[0]
    assert '<span class="failed">failed</span>' in first and "<td>—</td>" in first  # no winner
    assert "judgment 2" in battles.split('data-battle="4"', 1)[1].split("</tr>", 1)[0]
    assert SCRIPT not in page and "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in battles
    assert "<details>" in battles and "Judgment 2 follows the rubric." in battles
    assert "<th>p_a</th>" not in battles  # parsed mode: no probabilities


def test_meta_judge_without_a_judge_pair(meta_client):
    section = meta_section(meta_client.get("/iter/1/prompt?id=p-nopair").text)
    assert section is not None and "no judge pair" in section and "data-role" not in section
    # every battle failed: no evidence to rate, so no judgment is eligible
    assert re.findall(r'<td class="num rating">([^<]*)</td>', section) == ["unrated", "unrated"]
    assert section.count("no (unrated)") == 2
    assert re.findall(r'data-verdict="(\w+)"', section) == ["failed", "failed"]


def test_no_meta_section_without_meta_rows(meta_client, client):
    page = meta_client.get("/iter/1/prompt?id=p-pair").text  # its judgments all agree
    assert meta_section(page) is None and "meta-judged" not in page
    # a Self-Rewarding run: no Meta-Rewarding stages (only a stray meta_judge table, shown generically)
    page = client.get("/iter/1/prompt?id=p-xss").text
    assert meta_section(page) is None and "meta-note" not in page


def test_meta_section_replaces_the_generic_cards_and_links_the_tables(meta_client):
    page = meta_client.get("/iter/1/prompt?id=p-xss").text
    assert "<h2>meta_judge</h2>" not in page and "<h2>elo</h2>" not in page
    links = re.findall(r'href="(/iter/1/stage/(?:meta_judge|elo|judge_pairs)\?[^"]+)"', page)
    assert len(links) == 3
    for link in links:
        assert 'href="/iter/1/prompt?id=p-xss"' in meta_client.get(link.replace("&amp;", "&")).text


def test_meta_judge_logprob_mode_shows_probabilities(tmp_path):
    client = app_client(meta_store(tmp_path, mode="logprob").root)
    battles = table_of(meta_section(client.get("/iter/1/prompt?id=p-xss").text), "meta-battles")
    assert "<th>p_a</th>" in battles and "<th>p_b</th>" in battles and "<th>offset</th>" in battles
    second = battles.split('data-battle="2"', 1)[1].split("</tr>", 1)[0]
    assert '<td class="num">0.8</td><td class="num">0.1</td>' in second
    assert re.findall(r'data-verdict="(\w+)"', battles) == ["failed", "A", "B", "A", "B", "A"]


def test_meta_judge_section_without_optional_columns(tmp_path):
    store = RunStore.create(tmp_path / "run", recipe={"algorithm": "meta_rewarding"}, algorithm="meta_rewarding")
    store.write_rows(1, "judge", meta_rows(), inputs={}, recipe_hash="x")
    # older/minimal tables: no mode, p_a, p_b, offset, winner, text, length, eligible, omegas
    store.write_rows(1, "meta_judge", [
        {"prompt_id": "p-xss", "response_index": 1, "a": 0, "b": 2, "verdict": "B"},
        {"prompt_id": "p-xss", "response_index": 1, "a": 2, "b": 0, "verdict": None},
    ], inputs={}, recipe_hash="x")
    store.write_rows(1, "elo", [
        {"prompt_id": "p-xss", "response_index": 1, "judgment_index": 0, "score": 0.0, "rating": 990.0},
        {"prompt_id": "p-xss", "response_index": 1, "judgment_index": 2, "score": 1.0, "rating": 1010.0},
    ], inputs={}, recipe_hash="x")
    store.write_rows(1, "judge_pairs", [], inputs={}, recipe_hash="x")
    response = app_client(store.root).get("/iter/1/prompt?id=p-xss")
    assert response.status_code == 200
    section = meta_section(response.text)
    assert re.findall(r'data-judgment="(\d+)"', section) == ["2", "0"] and "no judge pair" in section
    battles = table_of(section, "meta-battles")
    assert "<th>p_a</th>" not in battles
    assert "judgment 2" in battles.split('data-battle="1"', 1)[1].split("</tr>", 1)[0]  # winner from the verdict
    assert re.findall(r'data-verdict="(\w+)"', battles) == ["B", "failed"]


def test_judge_training_off_iteration_has_a_one_line_note(tmp_path):
    store = RunStore.create(tmp_path / "run", recipe={"algorithm": "meta_rewarding"}, algorithm="meta_rewarding")
    store.write_rows(1, "judge", meta_rows(), inputs={}, recipe_hash="x")
    for stage in META_STAGES:  # what meta_rewarding.judge_training_off commits
        store.write_rows(1, stage, [], inputs={}, recipe_hash="x", info={"judge_training": False})
    page = app_client(store.root).get("/iter/1/prompt?id=p-xss").text
    assert meta_section(page) is None
    assert "judge training is off in iteration 1" in page and page.count('class="muted meta-note"') == 1


def test_meta_tables_are_read_and_indexed_once(meta_run, monkeypatch):
    reads = []
    read_table = RunStore.read_table
    monkeypatch.setattr(RunStore, "read_table", lambda self, t, stage: reads.append(stage) or read_table(self, t, stage))
    client = app_client(meta_run.root)
    for pid in ("p-xss", "p-nopair", "p-pair", "p-xss"):
        assert client.get(f"/iter/1/prompt?id={pid}").status_code == 200
    assert sorted(s for s in reads if s in META_STAGES) == sorted(META_STAGES)


# ---------------------------------------------------------------------------- corrections via the app


def test_each_correction_kind_is_stored(client, run):
    assert post(client, "exclude_pair", "p-pair").status_code == 303
    assert post(client, "swap", "p-xss").status_code == 303
    assert post(client, "override_score", "p-tie", response_index=1, judgment_index=2, value="4.5").status_code == 303
    assert post(client, "note", "p-tie", note="judge ignores the question").status_code == 303
    records = load_corrections(run, 1)
    assert [r["action"] for r in records] == ["exclude_pair", "swap", "override_score", "note"]
    override = records[2]
    assert (override["response_index"], override["judgment_index"], override["value"]) == (1, 2, 4.5)
    assert records[3]["note"] == "judge ignores the question"
    assert all(r["who"] == "tester" and r["iteration"] == 1 and r["id"] and r["time"] for r in records)
    # the file is append-only JSON lines
    lines = (run.root / CORRECTIONS_FILE).read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [r["id"] for r in records]


def test_corrections_show_up_in_pages(client):
    post(client, "override_score", "p-tie", response_index=1, judgment_index=2, value="4.5")
    page = client.get("/iter/1/prompt?id=p-tie").text
    assert "override" in page and "<s>3</s>" in page
    assert 'class="resp chosen"' in page  # the tie became a pair
    assert "p-tie" not in client.get("/iter/1?show=ties").text.split("<h1>", 1)[1].split("</h1>", 1)[1]


@pytest.mark.parametrize("with_pairs", [True, False])
def test_an_excluded_prompt_shows_one_excluded_badge(tmp_path, with_pairs):
    store = RunStore.create(tmp_path / "run", recipe={"algorithm": "self_rewarding", "pairs": {"rho": 0.0}},
                            algorithm="self_rewarding")
    rows = judge_rows()
    store.write_rows(1, "judge", rows, inputs={}, recipe_hash="x")
    if with_pairs:  # otherwise the pairs stage has not run yet: the status itself reads "excluded"
        store.write_rows(1, "pairs", build_pairs(rows)[0], inputs={}, recipe_hash="x")
    client = app_client(store.root)
    post(client, "exclude_pair", "p-pair")
    assert client.get("/iter/1/prompt?id=p-pair").text.count("excluded</span>") == 1
    listing = client.get("/iter/1?show=excluded").text
    assert "p-pair" in listing and listing.count("excluded</span>") == 1


@pytest.mark.parametrize("fields, message", [
    ({"action": "swap", "prompt_id": "nope"}, "is not in iteration 1"),
    ({"action": "override_score", "prompt_id": "p-tie", "response_index": "9", "judgment_index": "0",
      "value": "3"}, "no response_index 9"),
    ({"action": "override_score", "prompt_id": "p-tie", "response_index": "0", "judgment_index": "3",
      "value": "3"}, "no judgment_index 3"),
    ({"action": "override_score", "prompt_id": "p-tie", "response_index": "0", "judgment_index": "0",
      "value": "7"}, "between 0 and 5"),
    ({"action": "override_score", "prompt_id": "p-tie", "response_index": "0", "judgment_index": "0",
      "value": "nan"}, "between 0 and 5"),
    ({"action": "override_score", "prompt_id": "p-tie", "response_index": "0", "judgment_index": "0",
      "value": "four"}, "between 0 and 5"),
    ({"action": "override_score", "prompt_id": "p-tie", "response_index": "x", "judgment_index": "0",
      "value": "1"}, "must be an integer"),
    ({"action": "delete_everything", "prompt_id": "p-tie"}, "action must be one of"),
    ({"action": "note", "prompt_id": "p-tie", "note": "   "}, "needs some text"),
])
def test_bad_corrections_rejected_with_message(client, run, fields, message):
    response = client.post("/iter/1/corrections", data={**fields, "csrf_token": csrf_token(client)},
                           follow_redirects=False)
    assert response.status_code == 400
    assert message in response.text.replace("&#39;", "'")
    assert load_corrections(run) == []


def test_correction_for_unknown_or_incomplete_iteration(client, run):
    assert post(client, "swap", "p-pair", t=9).status_code == 404
    assert post(client, "swap", "p-pair", t=2).status_code == 404
    assert load_corrections(run) == []


def test_cross_origin_post_refused(client, run):
    response = client.post("/iter/1/corrections", data={"action": "swap", "prompt_id": "p-pair",
                                                         "csrf_token": csrf_token(client)},
                           headers={"Origin": "http://evil.example"}, follow_redirects=False)
    assert response.status_code == 403 and load_corrections(run) == []


def test_return_to_cannot_leave_the_app(client):
    response = post(client, "swap", "p-pair", return_to="https://evil.example/")
    assert response.headers["location"].startswith("/iter/1/prompt?")
    response = post(client, "swap", "p-pair", return_to="/iter/1?show=ties")
    assert response.headers["location"] == "/iter/1?show=ties"


# ---------------------------------------------------------------------------- export


def test_export_applies_corrections_in_trl_format(client, run):
    post(client, "swap", "p-pair")
    post(client, "exclude_pair", "p-xss")
    lines = client.get("/iter/1/export?format=jsonl").text.splitlines()
    assert len(lines) == 1
    row = json.loads(lines[0])
    assert row == {
        "prompt": [{"role": "user", "content": "Question p-pair?"}],
        "chosen": [{"role": "assistant", "content": "answer 1 to p-pair"}],  # swapped
        "rejected": [{"role": "assistant", "content": "answer 0 to p-pair"}],
    }
    table = pq.read_table(io.BytesIO(client.get("/iter/1/export?format=parquet").content))
    assert table.to_pylist() == [row]
    assert export_pairs(run, 1, "jsonl").decode().splitlines() == lines
    assert client.get("/iter/1/export?format=csv").status_code == 400


def test_export_equals_what_training_reads(client, run):
    """The app exports from its cache; it must match reviewed_pairs (re-read from disk)."""
    post(client, "override_score", "p-pair", response_index=2, judgment_index=0, value="5")
    post(client, "override_score", "p-pair", response_index=2, judgment_index=1, value="5")
    post(client, "override_score", "p-tie", response_index=0, judgment_index=0, value="0")
    post(client, "swap", "p-xss")
    for fmt in ("jsonl", "parquet"):
        assert client.get(f"/iter/1/export?format={fmt}").content == export_pairs(run, 1, fmt)
    prompts = [json.loads(line)["prompt"][0]["content"] for line in export_pairs(run, 1).decode().splitlines()]
    assert prompts == ["Question p-pair?", "Question p-xss?", "Question p-tie?"]


# ---------------------------------------------------------------------------- corrections module


def record(action, prompt_id, **kw):
    return {"id": f"{action}-{prompt_id}-{len(kw)}", "action": action, "prompt_id": prompt_id, **kw}


def test_apply_override_changes_the_pair():
    rows = judge_rows()
    pairs, _ = build_pairs(rows)
    # Make response 2 of p-pair the best: its mean becomes (5 + 5 + 5) / 3.
    corr = [record("override_score", "p-pair", response_index=2, judgment_index=j, value=5.0, id=f"o{j}")
            for j in range(3)]
    out, applied = apply_corrections(rows, pairs, corr, rho=0.0)
    pair = next(p for p in out if p["prompt_id"] == "p-pair")
    assert (pair["chosen_index"], pair["rejected_index"], pair["chosen_score"]) == (2, 1, 5.0)
    assert applied == ["o0", "o1", "o2"]
    assert rows[2]["scores"] == [3.0, 3.0, 3.0]  # inputs untouched


def test_apply_override_turns_a_tie_into_a_pair_appended_last():
    rows = judge_rows()
    pairs, _ = build_pairs(rows)
    out, applied = apply_corrections(rows, pairs, [record("override_score", "p-tie", response_index=0,
                                                          judgment_index=0, value=0.0)], rho=0.0)
    assert [p["prompt_id"] for p in out] == ["p-pair", "p-xss", "p-tie"]
    tie = out[2]
    assert (tie["chosen_index"], tie["rejected_index"]) == (1, 0)
    assert tie["rejected_score"] == pytest.approx(2.0)
    assert len(applied) == 1


def test_apply_exclude_removes_the_pair():
    rows = judge_rows()
    pairs, _ = build_pairs(rows)
    out, applied = apply_corrections(rows, pairs, [record("exclude_pair", "p-pair"), record("exclude_pair", "p-tie")])
    assert [p["prompt_id"] for p in out] == ["p-xss"]
    assert applied == ["exclude_pair-p-pair-0"]  # p-tie had no pair: nothing applied


def test_apply_swap_swaps_and_double_swap_cancels():
    rows = judge_rows()
    pairs, _ = build_pairs(rows)
    original = next(p for p in pairs if p["prompt_id"] == "p-pair")
    out, _ = apply_corrections(rows, pairs, [record("swap", "p-pair")])
    swapped = next(p for p in out if p["prompt_id"] == "p-pair")
    for side, other in (("chosen", "rejected"), ("rejected", "chosen")):
        for suffix in ("", "_index", "_score", "_length"):
            assert swapped[side + suffix] == original[other + suffix]
    out, applied = apply_corrections(rows, pairs, [record("swap", "p-pair", id="a"), record("swap", "p-pair", id="b")])
    assert next(p for p in out if p["prompt_id"] == "p-pair") == original
    assert applied == ["a", "b"]


def test_apply_notes_change_nothing():
    rows = judge_rows()
    pairs, _ = build_pairs(rows)
    assert apply_corrections(rows, pairs, [record("note", "p-pair", note="hm")]) == (pairs, [])


def test_validate_fills_fields_and_add_load_roundtrip(run):
    clean = validate_correction(run, {"action": "swap", "prompt_id": "p-pair", "iteration": "1"})
    assert clean["iteration"] == 1 and clean["id"] and clean["time"] and clean["who"]
    stored = add_correction(run, {"action": "note", "prompt_id": "p-tie", "iteration": 1, "note": "x"})
    assert load_corrections(run, 1) == [stored] and load_corrections(run, 2) == []
    with pytest.raises(ValueError, match="iteration 5 does not exist"):
        validate_correction(run, {"action": "swap", "prompt_id": "p-pair", "iteration": 5})
    with pytest.raises(ValueError, match="no complete judge stage"):
        validate_correction(run, {"action": "swap", "prompt_id": "q", "iteration": 2})


def test_torn_last_line_is_skipped(run):
    add_correction(run, {"action": "swap", "prompt_id": "p-pair", "iteration": 1})
    with open(run.root / CORRECTIONS_FILE, "a") as f:
        f.write('{"action": "swap", "prom')  # a writer killed mid-line
    assert len(load_corrections(run)) == 1
    add_correction(run, {"action": "exclude_pair", "prompt_id": "p-pair", "iteration": 1})
    assert [r["action"] for r in load_corrections(run)] == ["swap", "exclude_pair"]


def test_reviewed_pairs_is_what_training_gets(run):
    add_correction(run, {"action": "exclude_pair", "prompt_id": "p-pair", "iteration": 1})
    pairs, applied = reviewed_pairs(run, 1)
    assert [p["prompt_id"] for p in pairs] == ["p-xss"] and len(applied) == 1


def test_overview_statistics_follow_overrides(client):
    data = client.app.state.data
    before = data.state(1).stats
    # p-pair 9 judgments, p-tie 6, p-xss 6 of which one failed.
    assert before["judgments"] == 21 and before["failed"] == 1 and sum(before["histogram"]) == 20
    assert before["histogram"][6] == 6 + 3  # score 3: p-tie's six and p-pair #2's three
    p_xss = {r["response_index"]: r for r in data.state(1).light["p-xss"]}
    assert p_xss[1]["variance"] == pytest.approx(((0 - 2) ** 2 + (5 - 2) ** 2 + (1 - 2) ** 2) / 3)
    assert p_xss[0]["variance"] == 0.0  # two valid scores, one failed
    post(client, "override_score", "p-tie", response_index=0, judgment_index=0, value="0.5")
    after = data.state(1).stats
    assert after["histogram"][6] == 8 and after["histogram"][1] == 1
    assert after["mean_score"] == pytest.approx(before["mean_score"] + (0.5 - 3) / 20)
    assert data.state(1).light["p-tie"][0]["variance"] == pytest.approx(((0.5 - 13 / 6) ** 2 + 2 * (3 - 13 / 6) ** 2) / 3)


# ---------------------------------------------------------------------------- corrections order (issue 11, item 3)
# p-pair: r0 [4, 4, 4] (30 tok), r1 [1, 1, 1] (80 tok), r2 [3, 3, 3] (50 tok): pair chosen 0 / rejected 1.
# Overriding r0's judgment 0 to 0 makes r0's mean 8/3 < 3, so the scores select chosen 2 / rejected 1.

SWAP = record("swap", "p-pair", id="swap")
LOWER_R0 = record("override_score", "p-pair", response_index=0, judgment_index=0, value=0.0, id="lower-r0")


def pair_of(pairs: list[dict], prompt_id: str = "p-pair") -> tuple[int, int] | None:
    pair = next((p for p in pairs if p["prompt_id"] == prompt_id), None)
    return None if pair is None else (pair["chosen_index"], pair["rejected_index"])


def test_a_later_override_reselects_the_pair_an_earlier_swap_flipped():
    rows = judge_rows()
    pairs, _ = build_pairs(rows)
    out, applied = apply_corrections(rows, pairs, [SWAP, LOWER_R0])
    assert pair_of(out) == (2, 1)  # the override, recorded last, decides: the scores' pair
    assert applied == ["swap", "lower-r0"]


def test_a_later_swap_flips_the_pair_an_earlier_override_selected():
    rows = judge_rows()
    pairs, _ = build_pairs(rows)
    out, _ = apply_corrections(rows, pairs, [LOWER_R0, SWAP])
    assert pair_of(out) == (1, 2)
    pair = next(p for p in out if p["prompt_id"] == "p-pair")
    assert (pair["chosen_score"], pair["rejected_score"]) == (1.0, 3.0)


def replay_one(rows: list[dict], pairs: list[dict], excluded: set[str], c: dict, rho: float = 0.0):
    """Reference semantics of one correction on the state left by the earlier ones
    (judge rows, pairs by prompt, excluded prompts): the rule written out, prompt by prompt."""
    pid = c["prompt_id"]
    if c["action"] == "override_score":
        rows = [dict(r, scores=[c["value"] if j == c["judgment_index"] else s for j, s in enumerate(r["scores"])])
                if (r["prompt_id"], r["response_index"]) == (pid, c["response_index"]) else r for r in rows]
        for r in rows:
            valid = [s for s in r["scores"] if s is not None]
            r["mean_score"] = sum(valid) / len(valid) if valid else None
        reselected = {p["prompt_id"]: p for p in build_pairs([r for r in rows if r["prompt_id"] == pid], rho)[0]}
        pairs = {**pairs, pid: reselected.get(pid)}
    elif c["action"] == "swap" and pairs.get(pid) is not None and pid not in excluded:
        p = pairs[pid]
        pairs = {**pairs, pid: {**p, **{f"{a}{k}": p[f"{b}{k}"] for a, b in (("chosen", "rejected"), ("rejected", "chosen"))
                                        for k in ("", "_index", "_score", "_length")}}}
    elif c["action"] == "exclude_pair":
        excluded = excluded | {pid}
    return rows, pairs, excluded


def random_corrections(rng, n: int) -> list[dict]:
    shape = {r["prompt_id"]: {} for r in judge_rows()}
    for r in judge_rows():
        shape[r["prompt_id"]][r["response_index"]] = len(r["scores"])
    out = []
    for i in range(n):
        pid = rng.choice(sorted(shape))
        action = rng.choice(["swap", "swap", "override_score", "override_score", "exclude_pair", "note"])
        c = record(action, pid, id=f"c{i}")
        if action == "override_score":
            ri = rng.choice(sorted(shape[pid]))
            c.update(response_index=ri, judgment_index=rng.randrange(shape[pid][ri]), value=rng.choice([0.0, 1.5, 3.0, 5.0]))
        out.append(c)
    return out


def test_corrections_apply_in_the_order_recorded_random_sequences():
    """For 300 random sequences: the result equals replaying the corrections one by one."""
    import random

    rng = random.Random(11)
    for _ in range(300):
        corrections = random_corrections(rng, rng.randrange(1, 8))
        rows = [dict(r) for r in judge_rows()]
        stored, _ = build_pairs(rows)
        state = (rows, {p["prompt_id"]: p for p in stored}, set())
        for c in corrections:
            state = replay_one(*state, c)
        _, by_prompt, excluded = state
        expected = {pid: (p["chosen_index"], p["rejected_index"]) for pid, p in by_prompt.items()
                    if p is not None and pid not in excluded}
        out, _ = apply_corrections(judge_rows(), stored, corrections)
        assert {p["prompt_id"]: (p["chosen_index"], p["rejected_index"]) for p in out} == expected, corrections


def test_app_shows_what_training_gets_after_swap_then_override(client, run):
    post(client, "swap", "p-pair")
    assert "swapped</span>" in client.get("/iter/1/prompt?id=p-pair").text
    post(client, "override_score", "p-pair", response_index=0, judgment_index=0, value="0")
    pairs, _ = reviewed_pairs(run, 1)
    assert pair_of(pairs) == (2, 1)
    page = client.get("/iter/1/prompt?id=p-pair").text
    assert re.search(r'class="resp chosen" data-response="2"', page)
    assert re.search(r'class="resp rejected" data-response="1"', page)
    assert "swapped</span>" not in page  # the override re-selected the pair: it is not swapped any more
    assert client.get("/iter/1/export?format=jsonl").content == export_pairs(run, 1, "jsonl")


# ---------------------------------------------------------------------------- the app as an attack surface (issue 11, items 12-14)

CSRF_FIELD = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_token(client, t: int = 1) -> str:
    """The session's CSRF token, read from a page as a browser would (the GET sets the session cookie)."""
    match = CSRF_FIELD.search(client.get(f"/iter/{t}/prompt?id=p-pair").text)
    assert match, "the prompt page has no csrf_token field"
    return match.group(1)


def raw_post(client, data: dict, t: int = 1, **kw):
    return client.post(f"/iter/{t}/corrections", data=data, follow_redirects=False, **kw)


SWAP_FORM = {"action": "swap", "prompt_id": "p-pair", "who": "tester"}


@pytest.mark.parametrize("headers", [{}, {"Origin": "null"}], ids=["no-origin", "origin-null"])
def test_post_without_the_session_token_is_refused(client, run, headers):
    assert raw_post(client, SWAP_FORM, headers=headers).status_code == 403
    assert load_corrections(run) == []


def test_post_with_origin_null_is_refused_even_with_a_token(client, run):
    token = csrf_token(client)
    assert raw_post(client, {**SWAP_FORM, "csrf_token": token}, headers={"Origin": "null"}).status_code == 403
    assert load_corrections(run) == []


def test_token_of_another_session_is_refused(client, run):
    other = TestClient(client.app, base_url=str(client.base_url))
    stolen = csrf_token(other)
    assert raw_post(client, {**SWAP_FORM, "csrf_token": stolen}).status_code == 403  # no session cookie here
    csrf_token(client)  # now a session of its own, with a different token
    assert raw_post(client, {**SWAP_FORM, "csrf_token": stolen}).status_code == 403
    assert load_corrections(run) == []


def test_every_post_form_carries_the_token(client):
    for url in ["/iter/1", "/iter/1/prompt?id=p-pair", "/iter/1/prompt?id=p-tie"]:
        page = client.get(url).text
        forms = re.findall(r'<form[^>]*method="post".*?</form>', page, re.DOTALL)
        assert forms and all('name="csrf_token"' in f for f in forms), url


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8765", "127.0.0.1.evil.example", "attacker"])
def test_foreign_host_header_is_400(client, host):
    for url in ["/", "/iter/1", "/iter/1/export?format=jsonl", "/healthz"]:
        assert client.get(url, headers={"Host": host}).status_code == 400, (host, url)


def test_host_names_the_server_was_started_for_are_allowed(run):
    for base in ["http://127.0.0.1:8765", "http://localhost:8765", "http://localhost"]:
        assert TestClient(create_app(run.root), base_url=base).get("/").status_code == 200, base
    app = create_app(run.root, host="review.lab.internal")
    assert TestClient(app, base_url="http://review.lab.internal:9000").get("/").status_code == 200
    assert TestClient(app, base_url="http://other.lab.internal:9000").get("/").status_code == 400


def test_security_headers_on_every_response(client):
    for url in ["/", "/iter/1", "/iter/1/prompt?id=p-pair", "/iter/1/export?format=jsonl", "/iter/99",
                "/iter/1?show=nope", "/healthz"]:
        headers = client.get(url).headers
        assert headers.get("x-frame-options") == "DENY", url
        assert headers.get("x-content-type-options") == "nosniff", url
        csp = headers.get("content-security-policy", "")
        assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp, url
    assert client.get("/", headers={"Host": "evil.example"}).headers.get("x-frame-options") == "DENY"


def test_pages_have_no_inline_script_or_style(client):
    """What the CSP (no 'unsafe-inline') needs: the stylesheet is a file served by the app."""
    for url in ["/", "/iter/1", "/iter/1/prompt?id=p-pair", "/iter/1/corrections", "/iter/1/stage/meta_judge"]:
        page = client.get(url).text
        assert "<script" not in page and "<style" not in page and " style=" not in page, url
    sheet = re.search(r'<link rel="stylesheet" href="([^"]+)"', client.get("/").text).group(1)
    response = client.get(sheet)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/css")
    assert ".resp.chosen" in response.text


def test_reviewer_name_outside_latin1_is_stored_once_and_remembered(client, run):
    name = "Zoë 李明 🙂"
    response = raw_post(client, {**SWAP_FORM, "who": name, "csrf_token": csrf_token(client)})
    assert response.status_code == 303
    assert [r["who"] for r in load_corrections(run)] == [name]
    assert f'name="who" value="{name}"' in client.get("/iter/1/prompt?id=p-pair").text


@pytest.mark.parametrize("url", ["/iter/" + "9" * 5000, "/iter/" + "9" * 5000 + "/prompt?id=p-pair",
                                 "/iter/" + "9" * 5000 + "/export", "/iter/1?page=" + "9" * 5000])
def test_huge_numbers_are_not_a_500(client, url):
    assert client.get(url).status_code in (400, 404)


def test_huge_iteration_in_a_post_is_404(client, run):
    response = raw_post(client, {**SWAP_FORM, "csrf_token": csrf_token(client)}, t="9" * 5000)
    assert response.status_code == 404 and load_corrections(run) == []


def test_multipart_posts_are_refused(client, run):
    response = client.post("/iter/1/corrections", data={**SWAP_FORM, "csrf_token": csrf_token(client)},
                           files={"upload": ("x.bin", b"\0" * 10_000)}, follow_redirects=False)
    assert response.status_code == 415 and load_corrections(run) == []


def test_oversized_form_is_refused(client, run):
    data = {**SWAP_FORM, "csrf_token": csrf_token(client), "note": "x" * 200_000}
    assert raw_post(client, data).status_code == 413 and load_corrections(run) == []


# ---------------------------------------------------------------------------- published links (issue 11, item 7)


@pytest.mark.parametrize("base", ["http://127.0.0.1:8765", "http://127.0.0.1:8765/", "http://localhost:8765"])
def test_published_iteration_urls_resolve(run, base):
    from alignment.review_urls import iteration_url

    client = TestClient(create_app(run.root), base_url=base)
    url = iteration_url(base, 1)
    response = client.get(url)
    assert response.status_code == 200 and "Iteration 1 · judge dataset" in response.text, url


@pytest.mark.parametrize("value", ["9" * 5000, "²", "-"])
def test_integer_fields_of_a_correction_are_checked_before_int(run, value):
    with pytest.raises(ValueError, match="response_index must be an integer"):
        validate_correction(run, {"action": "override_score", "prompt_id": "p-tie", "iteration": 1,
                                  "response_index": value, "judgment_index": "0", "value": "1"})


@pytest.mark.parametrize("header, name", [("127.0.0.1:8765", "127.0.0.1"), ("LocalHost", "localhost"),
                                          ("[::1]:8765", "::1"), ("[::1]", "::1"), ("", "")])
def test_host_name_of_a_host_header(header, name):
    from alignment.review_app import host_name

    assert host_name(header) == name


def test_ipv6_and_wildcard_binds(run):
    import socket

    from alignment.review_app import allowed_hosts

    assert TestClient(create_app(run.root, host="::1"), base_url="http://[::1]:8765").get("/").status_code == 200
    assert socket.gethostname().lower() in allowed_hosts("0.0.0.0")
    assert "0.0.0.0" in allowed_hosts("0.0.0.0") and "evil.example" not in allowed_hosts("0.0.0.0")


@pytest.mark.parametrize("token", ["é" * 64, "", "0" * 64])
def test_a_wrong_token_of_any_shape_is_a_403(client, run, token):
    csrf_token(client)  # a session
    assert raw_post(client, {**SWAP_FORM, "csrf_token": token}).status_code == 403
    assert load_corrections(run) == []


# ---------------------------------------------------------------------------- overview charts (issue 16, item 1)
# line_chart maps (x, y) to px = left + (x − x_min)/(x_max − x_min)·(width − left − right),
# py = top + (y_max − y)/(y_max − y_min)·(height − top − bottom). With width 200, height 100,
# left 20, right 10, top 10, bottom 20 the plot is 170 × 70 px from (20, 10).
BOX = {"width": 200, "height": 100, "left": 20, "right": 10, "top": 10, "bottom": 20}


def coords(chart: dict, index: int = 0) -> list[tuple[float, float]]:
    return [(p["x"], p["y"]) for p in chart["series"][index]["points"]]


def test_line_chart_geometry_skips_missing_values():
    chart = line_chart([1, 2, 3], [("a", [2.0, None, 4.0]), ("b", [3.0, float("nan"), None])], x_title="step", **BOX)
    # x span [1, 3] (x = 2 has no plotted point), y span [2, 4]:
    # a (1, 2) → (20 + 0·170, 10 + (4 − 2)/2·70) = (20, 80); a (3, 4) → (190, 10); b (1, 3) → (20, 45).
    assert coords(chart, 0) == [(20.0, 80.0), (190.0, 10.0)]
    assert coords(chart, 1) == [(20.0, 45.0)]
    assert chart["series"][0]["path"] == "20.0,80.0 190.0,10.0"
    assert (chart["left"], chart["right"], chart["top"], chart["bottom"]) == (20, 190, 10, 80)
    assert [(t["x"], t["label"]) for t in chart["x_ticks"]] == [(20.0, "1"), (190.0, "3")]
    assert [(t["y"], t["label"]) for t in chart["y_ticks"]] == [(80.0, "2"), (10.0, "4")]
    assert [entry["name"] for entry in chart["legend"]] == ["a", "b"]
    assert chart["series"][0]["points"][1]["title"] == "a at step 3: 4"


def test_line_chart_error_bars_rules_and_a_single_x():
    chart = line_chart([1], [("win", [0.75])], errors={"win": [(0.5, 1.0)]}, rules=[("0.5", 0.5)],
                       include=(0.0, 1.0), **BOX)
    # One x: its span is (0, 2), so the point is centred: 20 + (1 − 0)/2·170 = 105.
    # y span [0, 1]: py = 10 + (1 − y)·70.
    assert coords(chart) == [(105.0, 27.5)]
    assert [(e["x"], e["low"], e["high"]) for e in chart["errors"]] == [(105.0, 45.0, 10.0)]
    assert [(r["y"], r["label"]) for r in chart["rules"]] == [(45.0, "0.5")]
    # A flat series: y span (v − 1, v + 1), drawn at mid-height (10 + 70/2).
    assert coords(line_chart([0, 1], [("flat", [3.0, 3.0])], **BOX)) == [(20.0, 45.0), (190.0, 45.0)]


def test_line_chart_without_a_plottable_point_is_none():
    assert line_chart([1, 2], [("a", [None, float("nan")])]) is None
    assert line_chart([None, float("inf")], [("a", [1.0, 2.0])]) is None
    assert line_chart([], [("a", [])]) is None


# The DPO train metrics as alignment.training.train_dpo writes them (TRL's log names).
CURVE = [
    {"step": 1, "loss": 0.6931, "rewards/margins": 0.0, "rewards/accuracies": 0.0,
     "logps/chosen": -52.0, "logps/rejected": -55.0},
    {"step": 2, "loss": 0.61, "rewards/margins": 0.25, "rewards/accuracies": 1.0,
     "logps/chosen": -50.0, "logps/rejected": -58.0},
    {"step": 3, "loss": 0.5, "rewards/accuracies": 1.0, "logps/chosen": -49.0, "logps/rejected": -61.0},
]


def test_training_curve_charts_from_metrics():
    charts = training_curve_charts({"iteration": 1, "train_metrics": {"steps": 3, "curve": CURVE}})
    assert [c["title"] for c in charts] == ["loss and reward margin", "log-probabilities of the answers"]
    loss_margin, logps = (c["chart"] for c in charts)
    assert [s["name"] for s in loss_margin["series"]] == ["loss", "reward margin"]
    assert len(loss_margin["series"][0]["points"]) == 3 and len(loss_margin["series"][1]["points"]) == 2
    assert [s["name"] for s in logps["series"]] == ["log p(chosen)", "log p(rejected)"]
    assert [t["label"] for t in logps["y_ticks"]] == ["-61", "-49"]
    assert training_curve_charts(None) == [] and training_curve_charts({"train_metrics": None}) == []
    assert training_curve_charts({"train_metrics": {"curve": []}}) == []


def eval_rows(outcomes: list, before: list[int], after: list[int]) -> list[dict]:
    """Eval table rows with the columns eval_summary reads (alignment.self_rewarding.compute_eval's)."""
    return [{"prompt_id": f"e{k}", "outcome": o, "length_before": b, "length_after": a, "score_before": None,
             "score_after": None, "identical": False, "reference": None}
            for k, (o, b, a) in enumerate(zip(outcomes, before, after))]


def eval_info(outcomes, before, after) -> dict:
    return eval_summary(eval_rows(outcomes, before, after), seed=0, resamples=200)


def test_eval_charts_view_model():
    first = eval_info([1.0, 1.0, 0.0, 0.5], [10, 20, 30, 40], [12, 22, 32, 42])
    second = eval_info([0.0, 0.0, 1.0, None], [20, 20, 20, 20], [30, 30, 30, 30])
    charts = eval_charts([(1, first), (2, None), (3, second)])
    assert [r["t"] for r in charts["rows"]] == [1, 3]  # iteration 2 has no eval: not a point
    assert charts["rows"][0]["win_rate"] == pytest.approx(0.625) and charts["rows"][1]["win_rate"] == pytest.approx(1 / 3)
    assert charts["rows"][0]["ci"] == tuple(first["win_rate_ci"])
    assert (charts["rows"][0]["length_before"], charts["rows"][0]["length_after"]) == (25.0, 27.0)
    win = charts["win"]
    assert [s["name"] for s in win["series"]] == ["win rate (95% interval)", "LC win rate"]
    # y spans at least [0, 1] (py = 10 + (1 − y)·(180 − 10 − 54)) and x spans the iterations 1..3.
    height = 180 - 10 - 54
    assert [r["y"] for r in win["rules"]] == [pytest.approx(10 + 0.5 * height)]
    assert coords(win)[0] == (pytest.approx(46), pytest.approx(10 + (1 - 0.625) * height))
    assert coords(win)[1][0] == pytest.approx(350)
    lo, hi = first["win_rate_ci"]
    assert (win["errors"][0]["low"], win["errors"][0]["high"]) == (
        pytest.approx(10 + (1 - lo) * height, abs=0.01), pytest.approx(10 + (1 - hi) * height, abs=0.01))
    length = charts["length"]
    assert [s["name"] for s in length["series"]] == ["M_t (before)", "M_t+1 (after)"]
    assert [t["label"] for t in length["y_ticks"]] == ["0", "30"]  # from 0 to the longest mean


def test_eval_charts_none_without_eval_results():
    assert eval_charts([]) is None
    assert eval_charts([(1, None), (2, {}), (3, {"win_rate": None, "prompts": 0})]) is None


def test_judge_identity_from_the_judge_manifest():
    assert judge_identity(None, 1) is None
    assert judge_identity({"inputs": {"model": "abc"}, "info": {"judge_model": "M_2"}}, 2) == {
        "separate": False, "text": "the policy M_2 (self-judging)", "identity": None}
    assert judge_identity({"inputs": {"judge_model": "f" * 64}, "info": {"judge_model": "org/judge-7b"}}, 1) == {
        "separate": True, "text": "org/judge-7b", "identity": "f" * 64}
    assert judge_identity({"inputs": {"judge_model": "f" * 64}, "info": {}}, 1)["text"] == "f" * 64


def add_eval_and_metrics(store, t: int = 1) -> dict:
    """Iteration t's eval stage (rows and summary as the eval stage writes them) and a
    metrics.json with the DPO curve, as self_rewarding.iteration_metrics writes it."""
    rows = eval_rows([1.0, 0.0, 1.0], [10, 20, 30], [15, 25, 35])
    info = eval_summary(rows, seed=0, resamples=200)
    store.write_rows(t, "eval", rows, inputs={}, recipe_hash="x", info=info)
    metrics = {"iteration": t, "train_metrics": {"steps": 3, "train_loss": 0.6, "curve": CURVE}, "eval": info}
    store.write_json(t, "metrics.json", metrics)
    return metrics


def svg_of(page: str, css_class: str) -> str | None:
    """The <svg> inside the element with ``css_class`` (the overview's chart wrappers)."""
    m = re.search(rf'class="{css_class}">.*?(<svg.*?</svg>)', page, re.DOTALL)
    return m.group(1) if m else None


def test_overview_shows_training_curve_eval_chart_and_raw_metrics(run):
    add_eval_and_metrics(run)
    page = app_client(run.root).get("/").text
    curve = svg_of(page, "training-curve")
    assert curve is not None and curve.count("<polyline") == 2 and "reward margin" in curve
    assert "Training: log-probabilities of the answers" in page
    win, length = svg_of(page, "eval-win"), svg_of(page, "eval-length")
    assert win is not None and 'class="rule"' in win and 'class="err k0"' in win and "LC win rate" in win
    assert length is not None and "M_t+1 (after)" in length
    assert 'id="eval"' in page and "0.6667 [" in page  # the table: 2 wins of 3
    raw = re.search(r'<details class="raw-metrics"><summary>metrics.json \(raw\)</summary><pre class="raw">(.*?)</pre>',
                    page, re.DOTALL)
    assert raw is not None and "rewards/margins" in raw.group(1) and "&#34;curve&#34;" in raw.group(1)
    assert " style=" not in page and "<script" not in page  # the CSP allows neither


def test_overview_without_eval_or_training_has_no_such_charts(client):
    page = client.get("/").text
    assert 'id="eval"' not in page and "eval-win" not in page
    assert "training-curve" not in page and "raw-metrics" not in page


def test_training_curve_without_eval_shows_no_eval_chart(run):
    run.write_json(1, "metrics.json", {"iteration": 1, "train_metrics": {"curve": CURVE}})
    page = app_client(run.root).get("/").text
    assert svg_of(page, "training-curve") is not None and 'id="eval"' not in page


def test_judge_identity_on_overview_and_iteration_page(client, run):
    line = '<p class="judge-line" data-judge="self">judge:'
    assert line in client.get("/").text and "the policy M_1 (self-judging)" in client.get("/iter/1").text
    identity = "ab12" * 16
    rows = judge_rows()
    run.write_rows(1, "judge", rows, inputs={"judge_model": identity}, recipe_hash="x",
                   info={"judge_model": "org/judge-7b"})
    for url in ("/", "/iter/1"):
        page = app_client(run.root).get(url).text
        assert '<p class="judge-line" data-judge="separate">judge:' in page, url
        assert "<strong>org/judge-7b</strong>" in page and f'title="{identity}"' in page, url
        assert "self-judging" not in page, url


@pytest.fixture(scope="module")
def evaluated_real_run(tmp_path_factory, tiny_model_dir):
    """One iteration of the test recipe on the tiny model through every Self-Rewarding stage,
    train and eval included, with a separate judge (``judge.model``: the tiny model's directory):
    the manifests and metrics.json the overview reads, as the stages write them."""
    from tests.conftest import run_one_iteration, write_recipe

    root = tmp_path_factory.mktemp("review-eval")
    prompts = root / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question number {i}?"}) + "\n" for i in range(6)))
    return run_one_iteration(write_recipe(root / "r.yaml", str(tiny_model_dir), prompts, **{
        "eval.heldout_fraction": 0.34, "eval.max_tokens": 8, "eval.judge.mode": "logprob",
        "eval.judge.max_tokens": 4, "judge.model": str(tiny_model_dir)}), root / "run")


def test_overview_of_a_real_run_with_eval_and_a_separate_judge(evaluated_real_run, tiny_model_dir):
    store = evaluated_real_run
    curve = store.read_json(1, "metrics.json")["train_metrics"]["curve"]
    assert curve and all("loss" in c and "logps/chosen" in c for c in curve)
    client = app_client(store.root)
    page = client.get("/").text
    loss_chart = svg_of(page, "training-curve")
    assert loss_chart is not None and loss_chart.count('<circle class="s0"') == len(curve)  # one loss point a step
    assert svg_of(page, "eval-win") is not None and svg_of(page, "eval-length") is not None
    assert "<details class=\"raw-metrics\">" in page
    assert f"<td>{store.manifest(1, 'eval')['info']['judge']}</td>" in page  # the fixed eval judge
    identity = store.manifest(1, "judge")["inputs"]["judge_model"]
    for url in ("/", "/iter/1"):
        text = client.get(url).text
        assert '<p class="judge-line" data-judge="separate">judge:' in text, url
        assert f"<strong>{tiny_model_dir}</strong>" in text and f'title="{identity}"' in text, url
