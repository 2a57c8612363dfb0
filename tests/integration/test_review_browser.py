"""The review app in a real browser: headless Debian chromium driven by Playwright.

Filters to ties, overrides a judgment's score on a tied prompt, then checks that the
correction was appended to corrections.jsonl and that the pairs the training stage reads
(``reviewed_pairs``) now contain the new pair. The forms carry the session's CSRF token and
the pages render under the app's CSP (no violation in the console, the stylesheet applies); a
form posted from another page is refused. Screenshots go to ``test-artifacts/``.

Needs ``/usr/bin/chromium`` (``apt-get install chromium``) and the ``playwright`` Python
package; Playwright's own browser download is never used.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from alignment.corrections import CORRECTIONS_FILE, reviewed_pairs
from alignment.pairs import build_pairs
from alignment.review_app import create_app
from alignment.store import RunStore
from tests.unit.test_review_app import add_eval_and_metrics, judge_rows

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
if not Path(CHROMIUM).exists() or shutil.which(CHROMIUM) is None:
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)", allow_module_level=True)
uvicorn = pytest.importorskip("uvicorn")


@pytest.fixture()
def run(tmp_path):
    store = RunStore.create(tmp_path / "run", recipe={"algorithm": "self_rewarding"}, algorithm="self_rewarding")
    rows = judge_rows()
    store.write_rows(1, "judge", rows, inputs={}, recipe_hash="x")
    pairs, stats = build_pairs(rows)
    store.write_rows(1, "pairs", pairs, inputs={}, recipe_hash="x", info=stats)
    return store


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def server(run):
    """The review app served by uvicorn on a free localhost port, in a thread."""
    port = free_port()
    config = uvicorn.Config(create_app(run.root), host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("the review server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture()
def page():
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.csp_errors = []  # what the browser refused under the app's Content-Security-Policy
            page.on("console", lambda msg: "Content Security Policy" in msg.text and page.csp_errors.append(msg.text))
            yield page
        finally:
            browser.close()


def test_filter_ties_and_correct_in_browser(server, page, run):
    ARTIFACTS.mkdir(exist_ok=True)
    page.goto(f"{server}/iter/1")
    assert page.locator(".card.prompt").count() == 3

    page.select_option("select[name=show]", "ties")
    page.click("button:has-text('apply')")
    page.wait_for_url("**show=ties**")
    cards = page.locator(".card.prompt")
    assert cards.count() == 1 and cards.first.get_attribute("data-prompt-id") == "p-tie"

    cards.first.locator("a.review-link").click()
    page.wait_for_url("**/prompt?id=p-tie")
    page.fill("[aria-label='override score of response 1 judgment 0']", "5")
    page.locator("form.override", has=page.locator("[aria-label='override score of response 1 judgment 0']")) \
        .locator("button").click()
    page.wait_for_load_state()
    assert page.locator(".resp.chosen").get_attribute("data-response") == "1"  # the tie became a pair
    page.screenshot(path=str(ARTIFACTS / "review-prompt.png"), full_page=True)

    records = [json.loads(line) for line in (run.root / CORRECTIONS_FILE).read_text().splitlines()]
    assert len(records) == 1
    assert {k: records[0][k] for k in ("iteration", "action", "prompt_id", "response_index", "judgment_index",
                                       "value")} == {"iteration": 1, "action": "override_score", "prompt_id": "p-tie",
                                                     "response_index": 1, "judgment_index": 0, "value": 5.0}
    # What the next training stage gets: the corrected pairs, with the correction's id.
    pairs, applied = reviewed_pairs(run, 1)
    tie_pair = next(p for p in pairs if p["prompt_id"] == "p-tie")
    assert (tie_pair["chosen_index"], tie_pair["rejected_index"]) == (1, 0)
    assert applied == [records[0]["id"]]

    page.goto(f"{server}/iter/1")
    assert "<script>" not in page.locator("[data-prompt-id='p-xss'] .resp").first.inner_html()
    assert page.locator("[data-prompt-id='p-xss'] .resp .text").first.inner_text() == "<script>alert('x')</script>"
    # The stylesheet (a file: the CSP allows no inline style) applies, and nothing was refused.
    assert page.locator("header").evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(29, 35, 48)"
    assert page.csp_errors == []
    page.screenshot(path=str(ARTIFACTS / "review.png"), full_page=True)


def test_overview_charts_render_in_browser(server, page, run):
    """The overview's training-curve and eval charts (inline SVG, coloured by the stylesheet)
    are laid out with a size, their legends are visible, and the raw metrics stay folded."""
    add_eval_and_metrics(run)
    page.goto(f"{server}/")
    for chart, legend in ((".training-curve svg", "reward margin"), (".training-curve svg >> nth=1", "log p(rejected)"),
                          (".eval-win svg", "LC win rate"), (".eval-length svg", "M_t+1 (after)")):
        svg = page.locator(chart).first
        box = svg.bounding_box()
        assert box is not None and box["width"] > 100 and box["height"] > 100, chart
        assert svg.locator("text", has_text=legend).first.is_visible(), (chart, legend)
        line = svg.locator("polyline").first.bounding_box()
        assert line is not None and line["width"] > 0, chart  # the series' line is drawn
    curve_line = page.locator(".training-curve polyline.k0").first
    assert curve_line.evaluate("e => getComputedStyle(e).stroke") == "rgb(53, 89, 199)"
    assert curve_line.evaluate("e => getComputedStyle(e).fill") == "none"
    assert page.locator(".eval-win .err line").count() == 3  # one error bar: the bar and its two caps
    raw = page.locator("details.raw-metrics pre").first
    assert not raw.is_visible()
    page.locator("details.raw-metrics summary").first.click()
    assert raw.is_visible() and "rewards/margins" in raw.inner_text()
    assert page.csp_errors == []
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "review-overview-charts.png"), full_page=True)


def test_form_from_another_page_is_refused_in_browser(server, page, run):
    """A page the reviewer opens (here about:blank, Origin: null) posts a correction form to the
    app: no token, and the browser says it is not the app's origin: refused, nothing stored."""
    page.goto(f"{server}/iter/1")  # the reviewer has a session with the app
    page.set_content(f'<form method="post" action="{server}/iter/1/corrections">'
                     '<input type="hidden" name="action" value="swap">'
                     '<input type="hidden" name="prompt_id" value="p-pair">'
                     '<button type="submit">win a prize</button></form>')
    with page.expect_response(lambda r: r.url.endswith("/iter/1/corrections")) as posted:
        page.click("button")
    assert posted.value.status == 403
    assert not (run.root / CORRECTIONS_FILE).exists()


def test_correction_on_a_real_run_is_used_by_the_next_training(tmp_path, judged_tiny_run, page):
    """A run directory made by the Self-Rewarding stages (the test recipe, tiny model; a copy of
    the session's ``judged_tiny_run``): filter to ties, exclude a pair in the browser, then the
    train stage trains without it and records it."""
    from tests.conftest import copy_judged_run

    store, run = copy_judged_run(judged_tiny_run, tmp_path / "run")
    pairs = store.read_rows(1, "pairs")
    ties = store.manifest(1, "pairs")["info"]["ties"]
    assert pairs, "the tiny model should give some non-tied prompts"

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(store.root), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    try:
        base = f"http://127.0.0.1:{port}"
        page.goto(f"{base}/iter/1?show=ties")
        assert page.locator(".card.prompt").count() == ties
        target = pairs[0]["prompt_id"]
        page.goto(f"{base}/iter/1")
        card = page.locator(f".card.prompt[data-prompt-id='{target}']")
        card.locator("button:has-text('exclude pair')").click()
        page.wait_for_load_state()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "review-real-run.png"), full_page=True)
    finally:
        srv.should_exit = True
        thread.join(timeout=10)

    records = [json.loads(line) for line in (store.root / CORRECTIONS_FILE).read_text().splitlines()]
    assert [(r["action"], r["prompt_id"]) for r in records] == [("exclude_pair", target)]
    run.run_stage("train", 1)
    info = store.manifest(1, "train")["info"]
    assert info["corrections"] == [records[0]["id"]]
    trained = [json.loads(line) for line in (store.root / info["adapter"] / "train_pairs.jsonl").read_text().splitlines()]
    assert len(trained) == len(pairs) - 1 and pairs[0]["prompt"] not in [p["prompt"] for p in trained]
