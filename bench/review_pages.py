"""Review app page-load times on a synthetic run: 10,000 prompts × 4 responses × 3 judgments.

    .venv/bin/python bench/review_pages.py [--prompts 10000] [--run-dir DIR]

Builds the run with RunStore (judge, pairs and a meta_judge stage), then times each page
through Starlette's TestClient twice: "first" includes reading the parquet tables into the
in-memory cache, "cached" is a later request. Target: under 1 s per page.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from starlette.testclient import TestClient  # noqa: E402

from alignment.pairs import build_pairs  # noqa: E402
from alignment.review_app import create_app  # noqa: E402
from alignment.store import RunStore  # noqa: E402

LOCAL = "http://127.0.0.1:8765"  # the app answers only for the host names it was started for

WORDS = ("the model answer explains a clear step because results data user question helpful "
         "consider example first second however therefore response detail").split()


def text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def judge_rows(n_prompts: int, n_responses: int = 4, n_judgments: int = 3, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for p in range(n_prompts):
        prompt = text(rng, 25) + "?"
        for i in range(n_responses):
            length = rng.randint(20, 300)
            scores = [None if rng.random() < 0.03 else float(rng.randint(0, 5)) for _ in range(n_judgments)]
            valid = [s for s in scores if s is not None]
            rows.append({
                "prompt_id": f"p{p:05d}", "prompt": prompt, "response_index": i,
                "response": text(rng, length // 2), "length": length,
                "judgments": [text(rng, 60) + f"\nScore: {s}" for s in scores],
                "scores": scores, "score_ints": [None if s is None else int(s) for s in scores],
                "expected_scores": [None] * n_judgments, "score_modes": ["parsed"] * n_judgments,
                "mean_score": sum(valid) / len(valid) if valid else None,
                "n_failed": n_judgments - len(valid),
            })
    return rows


def build_run(root: Path, n_prompts: int) -> RunStore:
    store = RunStore.create(root, recipe={"bench": True}, algorithm="meta_rewarding")
    rows = judge_rows(n_prompts)
    store.write_rows(1, "judge", rows, inputs={}, recipe_hash="bench")
    pairs, stats = build_pairs(rows)
    store.write_rows(1, "pairs", pairs, inputs={}, recipe_hash="bench", info=stats)
    meta = [{"prompt_id": f"p{p:05d}", "battles": [{"a": 0, "b": 1, "verdict": "A"}] * 6,
             "ratings": [1010.0, 990.0, 1000.0]} for p in range(n_prompts)]
    store.write_rows(1, "meta_judge", meta, inputs={}, recipe_hash="bench")
    return store


PAGES = [
    ("overview", "/"),
    ("browser", "/iter/1"),
    ("browser ties", "/iter/1?show=ties"),
    ("browser high variance, sorted", "/iter/1?show=high_variance&sort=variance"),
    ("browser length sort, page 200", "/iter/1?sort=length_diff&page=200"),
    ("browser text search", "/iter/1?q=therefore+response+detail"),
    ("browser 100 per page", "/iter/1?per_page=100"),
    ("prompt", "/iter/1/prompt?id=p09999"),
    ("meta_judge table", "/iter/1/stage/meta_judge?page=50"),
    ("export jsonl (download)", "/iter/1/export?format=jsonl"),
    ("export parquet (download)", "/iter/1/export?format=parquet"),
]


def timed_get(client: TestClient, url: str) -> float:
    start = time.perf_counter()
    response = client.get(url)
    elapsed = time.perf_counter() - start
    assert response.status_code == 200, (url, response.status_code, response.text[:300])
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=10_000)
    parser.add_argument("--run-dir", type=Path, default=None)
    args = parser.parse_args()
    root = args.run_dir or Path(tempfile.mkdtemp(prefix="review-bench-")) / "run"
    start = time.perf_counter()
    store = build_run(root, args.prompts)
    print(f"built {root}: {args.prompts} prompts x 4 responses x 3 judgments in {time.perf_counter() - start:.1f} s")

    # What `selfalign review` does: serve() reads the tables in a thread while the browser opens.
    app = create_app(store.root)
    start = time.perf_counter()
    app.state.data.warm()
    print(f"warm-up (serve() does this at start, in a thread): {time.perf_counter() - start:.3f} s")
    warm = TestClient(app, base_url=LOCAL)
    print(f"first overview after warm-up: {timed_get(warm, '/'):.3f} s\n")

    # Cold: a fresh app, so each page's "first" includes whatever it has to load itself.
    client = TestClient(create_app(store.root), base_url=LOCAL)
    print(f"{'page (cold app)':34s} {'first':>8s} {'cached':>8s}")
    times = {}
    for name, url in PAGES:
        times[name] = timed_get(client, url), timed_get(client, url)
        print(f"{name:34s} {times[name][0]:7.3f}s {times[name][1]:7.3f}s")

    # A correction invalidates the per-prompt summaries (not the tables): time the next load.
    token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/iter/1").text).group(1)
    client.post("/iter/1/corrections", data={"action": "swap", "prompt_id": "p00001", "csrf_token": token})
    after = timed_get(client, "/iter/1")
    print(f"{'browser after a correction':34s} {after:7.3f}s\n")

    cold_first = times[PAGES[0][0]][0]
    pages = [t for name, pair in times.items() if "download" not in name for t in pair][1:] + [after]
    downloads = [t for name, pair in times.items() if "download" in name for t in pair]
    print(f"first request of a cold app (reads the judge table): {cold_first:.3f} s")
    print(f"slowest other page: {max(pages):.3f} s (target < 1 s) -> {'OK' if max(pages) < 1 else 'OVER TARGET'}")
    print(f"slowest download: {max(downloads):.3f} s")

if __name__ == "__main__":
    main()
