"""The review app: browse a run's judge datasets and record corrections before training.

A small server-rendered Starlette + Jinja2 app (autoescaping on: model text is shown, never
executed). It reads the run directory only through :mod:`alignment.store` and shows complete
stages only (a stage without a manifest is listed as in progress), so it can be pointed at a
run that is still being written. Request parameters never become paths: the iteration is an
int checked against ``store.iterations()``, stage names against the stages the store reports.

It serves on localhost, but any page the reviewer opens can reach localhost, so
(:func:`guard`, :func:`correct` in :func:`create_app`):
- only the host names the server was started for are answered (DNS rebinding: a foreign
  ``Host`` is a 400, so a page on another name cannot read the data or the export);
- a correction needs the session's CSRF token (an HMAC of the session cookie with a secret of
  this server process) and, when the browser says where the form came from, this origin
  (``Origin: null``, a sandboxed frame or a ``data:`` page, is refused);
- forms are URL-encoded and at most ``MAX_FORM_BYTES`` (no multipart, no uploads);
- every response carries a CSP without inline script or style, ``frame-ancestors 'none'``,
  ``X-Frame-Options: DENY`` and ``nosniff``.

Speed on 10,000 prompts: the judge table is kept as Arrow, cached per (iteration, output
hash); only its small columns (scores, lengths) become Python rows, and a page materialises
the few dozen prompts it shows. The per-prompt summaries that filters and sorts run over are
cached per (tables, corrections). GET handlers are plain functions, so Starlette runs them in
its thread pool and a first table load does not block other requests.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import secrets
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.middleware import Middleware
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from alignment.corrections import (
    EXPORT_FORMATS,
    PromptReview,
    add_correction,
    encode_pairs,
    load_corrections,
    override_scores,
    pairs_rho,
    review,
)
from alignment.pairs import group_by_prompt, select_pair
from alignment.review_urls import ITERATION_ROUTE
from alignment.files import StoreError
from alignment.store import DATA_FILE, RunStore

TEMPLATES_DIR = Path(__file__).resolve().parent / "review_templates"
STYLESHEET = Path(__file__).resolve().parent / "review_static" / "review.css"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
SECURITY_HEADERS = {
    # No script at all; the one stylesheet is a file of ours (review_static/review.css).
    "content-security-policy": "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    # same-origin, not no-referrer: under no-referrer browsers send `Origin: null` on a form post
    # even to the same origin, which the CSRF origin check must refuse (seen in Chromium).
    "referrer-policy": "same-origin",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
    "cache-control": "no-store",  # pages carry the CSRF token and live data
}
FORM_TYPE = "application/x-www-form-urlencoded"
MAX_FORM_BYTES = 64 * 1024  # a 2000-character note is at most 24 KiB URL-encoded
MAX_FORM_FIELDS = 20
MAX_INT_DIGITS = 9  # iterations and pages; longer is no page (Python refuses int() over 4300 digits)
CSRF_FIELD = "csrf_token"
CORE_STAGES = ("prompts", "generate", "judge", "pairs", "train")
META_STAGES = ("meta_judge", "elo", "judge_pairs")  # Meta-Rewarding; see docs/data-contracts.md
FILTERS = {
    "all": "all prompts",
    "ties": "ties (no pair)",
    "high_variance": "high judgment variance",
    "failed": "failed judgments",
    "chosen_longer": "chosen longer than rejected",
    "rejected_longer": "rejected longer than chosen",
    "corrected": "with corrections",
    "excluded": "excluded pairs",
}
SORTS = {
    "order": "dataset order",
    "variance": "variance, highest first",
    "gap": "chosen−rejected score gap, smallest first",
    "length_diff": "chosen−rejected length, largest first",
    "length_diff_asc": "chosen−rejected length, smallest first",
    "failed": "failed judgments, most first",
}
PER_PAGE = (10, 25, 50, 100)
HIGH_VARIANCE = 1.0
HIST_BINS = [b / 2 for b in range(11)]  # 0, 0.5, ..., 5 (scores rounded to the nearest half)
_RETURN_TO_RE = re.compile(r"^/iter/\d+(/prompt)?(\?[\w\-.~%&=+]*)?$")


# ---------------------------------------------------------------------------- data


LIGHT_COLUMNS = ("prompt_id", "response_index", "length", "scores", "mean_score", "n_failed")


class JudgeTable:
    """A judge stage kept as Arrow; Python rows are made only for the prompts a page shows.

    ``light`` holds every row's small columns (scores, lengths), which is all that filters,
    sorts and the overview need.
    """

    def __init__(self, table: pa.Table):
        self.table = table
        self.light = table.select(LIGHT_COLUMNS).to_pylist()
        self.positions: dict[str, list[int]] = {}
        for i, row in enumerate(self.light):
            self.positions.setdefault(row["prompt_id"], []).append(i)
        self._score_statistics()

    def _score_statistics(self) -> None:
        """Per-row variance and the score histogram, vectorised (40,000 rows in Python: ~0.5 s).

        var = Σ s² / n − mean² over a row's non-None scores (None when n < 2); the histogram
        bins scores rounded to the nearest half (``HIST_BINS``).
        """
        scores = self.table["scores"].combine_chunks()
        values = pc.list_flatten(scores).to_numpy(zero_copy_only=False).astype(float)
        parents = pc.list_parent_indices(scores).to_numpy(zero_copy_only=False)
        valid = ~np.isnan(values)
        values, parents = values[valid], parents[valid]
        n = np.bincount(parents, minlength=len(self.light))
        total = np.bincount(parents, weights=values, minlength=len(self.light))
        squares = np.bincount(parents, weights=values * values, minlength=len(self.light))
        with np.errstate(invalid="ignore", divide="ignore"):
            variance = np.maximum(squares / n - (total / n) ** 2, 0.0)
        for row, count, var in zip(self.light, n.tolist(), variance.tolist()):
            row["variance"] = var if count >= 2 else None
        self.histogram = np.bincount(np.clip(np.rint(values * 2), 0, len(HIST_BINS) - 1).astype(int),
                                     minlength=len(HIST_BINS)).tolist()
        self.score_sum, self.score_count = float(values.sum()), int(valid.sum())

    def rows(self, prompt_ids) -> list[dict]:
        """Full rows (all columns) of ``prompt_ids``, in table order."""
        positions = sorted(i for pid in prompt_ids for i in self.positions.get(pid, []))
        return self.table.take(positions).to_pylist() if positions else []

    def search(self, needle: str) -> set[str]:
        """prompt_ids whose prompt or any response contains ``needle`` (case-insensitive)."""
        mask = pc.or_(pc.match_substring(self.table["prompt"], needle, ignore_case=True),
                      pc.match_substring(self.table["response"], needle, ignore_case=True))
        return set(self.table["prompt_id"].filter(pc.fill_null(mask, False)).to_pylist())


class PromptRows:
    """A complete table stage kept as Arrow and indexed by prompt_id once.

    A page materialises only its prompt's rows: meta_judge holds k(k−1) battles per prompt,
    meta-judge texts included, so a per-request scan or a full Python copy would not do.
    A table without a ``prompt_id`` column (a zero-row stage has no columns) has no rows for any prompt.
    """

    def __init__(self, table: pa.Table):
        self.table = table
        self.positions: dict[str, list[int]] = {}
        if "prompt_id" in table.column_names:
            for i, pid in enumerate(table["prompt_id"].to_pylist()):
                self.positions.setdefault(pid, []).append(i)

    def __len__(self) -> int:
        return self.table.num_rows

    def of(self, prompt_id: str) -> list[dict]:
        """``prompt_id``'s rows (all columns), in table order."""
        positions = self.positions.get(prompt_id)
        return self.table.take(positions).to_pylist() if positions else []

    def first_position(self, prompt_id: str) -> int | None:
        positions = self.positions.get(prompt_id)
        return positions[0] if positions else None


@dataclass
class MetaTables:
    """An iteration's complete Meta-Rewarding stages, each indexed by prompt_id."""

    battles: PromptRows  # meta_judge: one row per battle
    elo: PromptRows  # one row per judgment of the meta-judged response
    judge_pairs: PromptRows  # at most one row per prompt
    judge_training: bool  # False: the stages were skipped (zero rows) in this iteration

    def by_stage(self) -> dict[str, PromptRows]:
        return dict(zip(META_STAGES, (self.battles, self.elo, self.judge_pairs)))


@dataclass
class IterationState:
    """One iteration's judge data with the corrections applied, ready for pages."""

    t: int
    rho: float
    has_pairs: bool
    judge: JudgeTable
    light: dict[str, list[dict]]  # prompt_id -> small judge rows, score overrides applied
    pairs: dict[str, dict]  # prompt_id -> effective pair (after corrections), training order
    overridden: dict[tuple[str, int, int], float]  # (prompt_id, response_index, judgment_index) -> original
    corrections: dict[str, list[dict]]  # prompt_id -> corrections, append order
    applied: set[str]
    reviewed: dict[str, PromptReview]  # prompt_id -> excluded / swapped, for the prompts with corrections
    summaries: list[dict] = field(default_factory=list)  # one per prompt, dataset order
    stats: dict = field(default_factory=dict)


class RunData:
    """Cached, read-only access to a run's complete stage tables."""

    def __init__(self, store: RunStore):
        self.store = store
        self._tables: dict[tuple[int, str, str], tuple[str, object]] = {}
        self._states: dict[int, tuple[tuple, IterationState]] = {}
        self._lock = threading.Lock()

    def complete_stages(self, t: int) -> list[str]:
        return [s["stage"] for s in self.store.status() if s["iteration"] == t and s["state"] == "done"]

    def table_hash(self, t: int, stage: str) -> str | None:
        """The output hash of a complete table stage, None if incomplete or not a table."""
        manifest = self.store.manifest(t, stage)
        if manifest is None or DATA_FILE not in (manifest.get("outputs") or {}):
            return None
        return manifest.get("output_hash") or json.dumps(manifest.get("outputs"), sort_keys=True)

    def _cached(self, t: int, stage: str, kind: str, load):
        digest = self.table_hash(t, stage)
        if digest is None:
            return None
        cached = self._tables.get((t, stage, kind))
        if cached is None or cached[0] != digest:
            cached = (digest, load())
            self._tables[(t, stage, kind)] = cached
        return cached[1]

    def rows(self, t: int, stage: str) -> list[dict] | None:
        """A complete stage's rows (cached per output hash), None if the stage is incomplete."""
        return self._cached(t, stage, "rows", lambda: self.store.read_rows(t, stage))

    def indexed(self, t: int, stage: str) -> PromptRows | None:
        """A complete table stage as :class:`PromptRows` (cached per output hash), None if incomplete."""
        return self._cached(t, stage, "indexed", lambda: PromptRows(self.store.read_table(t, stage)))

    def meta_tables(self, t: int) -> MetaTables | None:
        """The Meta-Rewarding stages of iteration ``t``, None unless all three are complete
        (a manifest with a table: what ``complete_stages`` calls done)."""
        tables = [self.indexed(t, stage) for stage in META_STAGES]
        if any(table is None for table in tables):
            return None
        info = (self.store.manifest(t, "meta_judge") or {}).get("info") or {}
        return MetaTables(*tables, judge_training=info.get("judge_training") is not False)

    def judge(self, t: int) -> JudgeTable | None:
        """The judge stage as a :class:`JudgeTable` (cached), None if incomplete."""
        return self._cached(t, "judge", "arrow", lambda: JudgeTable(self.store.read_table(t, "judge")))

    def state(self, t: int) -> IterationState | None:
        """The iteration's state (cached per tables and corrections), None without a complete judge stage."""
        with self._lock:  # one build at a time; concurrent requests wait for the cache
            judge_hash = self.table_hash(t, "judge")
            if judge_hash is None:
                return None
            corrections = load_corrections(self.store, t)
            key = (judge_hash, self.table_hash(t, "pairs"), len(corrections),
                   corrections[-1].get("id") if corrections else None)
            cached = self._states.get(t)
            if cached is None or cached[0] != key:
                state = build_state(t, self.judge(t), self.rows(t, "pairs"), corrections,
                                    pairs_rho(self.store, t))
                cached = (key, state)
                self._states[t] = cached
            return cached[1]

    def warm(self) -> None:
        """Load every iteration's tables into the cache (serve() runs this in a thread at start)."""
        for t in self.store.iterations():
            self.state(t)
            self.meta_tables(t)


def build_state(t: int, judge: JudgeTable, pair_rows: list[dict] | None,
                corrections: list[dict], rho: float) -> IterationState:
    """Apply ``corrections`` and summarise every prompt (no I/O)."""
    overrides = [c for c in corrections if c.get("action") == "override_score"]
    light, touched, _ = override_scores(judge.light, overrides)
    overridden = {}
    for before, after in zip(judge.light, light):
        if before is not after:
            after["variance"] = score_variance(after["scores"])
            for j, (a, b) in enumerate(zip(before["scores"], after["scores"])):
                if a != b:
                    overridden[(before["prompt_id"], int(before["response_index"]), j)] = a
    # The same replay training uses (corrections.review). Without a pairs stage there is no pair
    # to correct yet, but exclusions still show. Only the overridden prompts need their full rows
    # (texts) to re-select their pairs.
    reviewed = review(judge.rows(touched) if pair_rows is not None else [], pair_rows or [], corrections, rho)
    pairs = {p["prompt_id"]: p for p in reviewed.pairs} if pair_rows is not None else {}
    applied = reviewed.applied if pair_rows is not None else []
    by_prompt_corr: dict[str, list[dict]] = {}
    for c in corrections:
        by_prompt_corr.setdefault(c.get("prompt_id"), []).append(c)
    state = IterationState(t=t, rho=rho, has_pairs=pair_rows is not None, judge=judge,
                           light=group_by_prompt(light), pairs=pairs, overridden=overridden,
                           corrections=by_prompt_corr, applied=set(applied), reviewed=reviewed.prompts)
    state.summaries = [summarize(pid, rows, state) for pid, rows in state.light.items()]
    state.stats = iteration_stats(state, pair_rows)
    return state


def score_variance(scores: list) -> float | None:
    """Population variance of a response's non-None judgment scores (None if fewer than 2).

    var = Σ (s − mean)² / n. Plain floats: ``statistics.pvariance`` is exact (Fractions) and
    ~50× slower, which matters over 40,000 responses.
    """
    valid = [float(s) for s in scores if s is not None]
    if len(valid) < 2:
        return None
    mean = sum(valid) / len(valid)
    return sum((s - mean) ** 2 for s in valid) / len(valid)


def summarize(prompt_id: str, rows: list[dict], state: IterationState) -> dict:
    """What the filters and sorts of the browser need about one prompt."""
    pair = state.pairs.get(prompt_id)
    corrections = state.corrections.get(prompt_id, [])
    reviewed = state.reviewed.get(prompt_id)
    excluded = reviewed is not None and reviewed.excluded
    swapped = reviewed is not None and reviewed.swapped
    variances = [r["variance"] for r in rows if r["variance"] is not None]
    scored = [r for r in rows if r["mean_score"] is not None]
    if pair is not None:
        status = "pair"
    elif len(scored) < 2:
        status = "unscored"
    elif select_pair(scored, state.rho) is None:
        status = "tie"
    elif excluded:
        status = "excluded"
    else:
        status = "pending" if not state.has_pairs else "no pair"
    return {
        "prompt_id": prompt_id,
        "status": status,
        "excluded": excluded,
        "swapped": swapped and pair is not None,
        "max_var": max(variances) if variances else None,
        "n_failed": sum(int(r["n_failed"]) for r in rows),
        "length_diff": pair["chosen_length"] - pair["rejected_length"] if pair else None,
        "gap": pair["chosen_score"] - pair["rejected_score"] if pair else None,
        "n_corrections": len(corrections),
    }


def iteration_stats(state: IterationState, stored_pairs: list[dict] | None) -> dict:
    """Counts and chart data for the overview."""
    rows = [r for rs in state.light.values() for r in rs]
    # The table's score statistics, moved by the overridden scores.
    hist = list(state.judge.histogram)
    total, count = state.judge.score_sum, state.judge.score_count
    for (pid, ri, j), old in state.overridden.items():
        new = next(r for r in state.light[pid] if int(r["response_index"]) == ri)["scores"][j]
        for score, sign in ((old, -1), (new, 1)):
            if score is not None:
                hist[_bin(score)] += sign
                total += sign * float(score)
                count += sign
    pairs = list(state.pairs.values())
    statuses = [s["status"] for s in state.summaries]
    return {
        "prompts": len(state.summaries),
        "responses": len(rows),
        "judgments": sum(len(r["scores"]) for r in rows),
        "failed": sum(int(r["n_failed"]) for r in rows),
        "pairs": len(pairs) if state.has_pairs else None,
        "stored_pairs": len(stored_pairs) if stored_pairs is not None else None,
        "ties": statuses.count("tie"),
        "unscored": statuses.count("unscored"),
        "corrections": sum(len(c) for c in state.corrections.values()),
        "applied": len(state.applied),
        "histogram": hist,
        "chosen_length": _mean([p["chosen_length"] for p in pairs]),
        "rejected_length": _mean([p["rejected_length"] for p in pairs]),
        "mean_score": total / count if count else None,
    }


def _bin(score: float) -> int:
    return int(min(len(HIST_BINS) - 1, max(0, round(float(score) * 2))))


def _mean(values: list) -> float | None:
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------------------- filtering


@dataclass
class Query:
    show: str = "all"
    q: str = ""
    sort: str = "order"
    page: int = 1
    per_page: int = 25

    def params(self, **changes) -> str:
        values = {"show": self.show, "q": self.q, "sort": self.sort, "page": self.page,
                  "per_page": self.per_page, **changes}
        defaults = Query()
        return urlencode({k: v for k, v in values.items() if v != getattr(defaults, k)})


def parse_query(params) -> Query:
    """A validated Query from request parameters; ValueError with a message otherwise."""
    query = Query(show=params.get("show", "all"), q=params.get("q", "").strip()[:200],
                  sort=params.get("sort", "order"))
    if query.show not in FILTERS:
        raise ValueError(f"unknown filter {query.show!r}; use one of {', '.join(FILTERS)}")
    if query.sort not in SORTS:
        raise ValueError(f"unknown sort {query.sort!r}; use one of {', '.join(SORTS)}")
    query.page = _positive_int(params.get("page", "1"), "page")
    query.per_page = _positive_int(params.get("per_page", "25"), "per_page")
    if query.per_page not in PER_PAGE:
        raise ValueError(f"per_page must be one of {', '.join(map(str, PER_PAGE))}")
    return query


def _positive_int(value: str, name: str) -> int:
    number = small_int(value)
    if number is None or number < 1:
        raise ValueError(f"{name} must be a positive integer, got {value[:20]!r}")
    return number


def small_int(text: str) -> int | None:
    """``text`` as an int if it is 1 to ``MAX_INT_DIGITS`` ASCII digits, else None
    (``"²".isdigit()`` is true, and int() of 5000 digits raises)."""
    if 1 <= len(text) <= MAX_INT_DIGITS and text.isascii() and text.isdigit():
        return int(text)
    return None


def _matches(s: dict, show: str) -> bool:
    if show == "ties":
        return s["status"] == "tie"
    if show == "high_variance":
        return s["max_var"] is not None and s["max_var"] >= HIGH_VARIANCE
    if show == "failed":
        return s["n_failed"] > 0
    if show == "chosen_longer":
        return s["length_diff"] is not None and s["length_diff"] > 0
    if show == "rejected_longer":
        return s["length_diff"] is not None and s["length_diff"] < 0
    if show == "corrected":
        return s["n_corrections"] > 0
    if show == "excluded":
        return s["excluded"]
    return True


_SORT_KEYS = {
    "variance": lambda s: -s["max_var"] if s["max_var"] is not None else None,
    "gap": lambda s: s["gap"],
    "length_diff": lambda s: -s["length_diff"] if s["length_diff"] is not None else None,
    "length_diff_asc": lambda s: s["length_diff"],
    "failed": lambda s: -s["n_failed"],
}


def select(summaries: list[dict], query: Query, found: set[str] | None = None) -> list[dict]:
    """The summaries matching ``query``, sorted (prompts without a sort value last).

    ``found``: the prompt_ids whose text matches ``query.q`` (see :meth:`JudgeTable.search`).
    """
    out = [s for s in summaries if _matches(s, query.show)]
    if query.q:
        needle = query.q.lower()
        out = [s for s in out if s["prompt_id"] in (found or ()) or needle in s["prompt_id"].lower()]
    key = _SORT_KEYS.get(query.sort)
    if key is not None:
        out.sort(key=lambda s: (key(s) is None, key(s) or 0))
    return out


# ---------------------------------------------------------------------------- view models


def prompt_views(state: IterationState, prompt_ids: list[str]) -> list[dict]:
    """What each prompt's block shows (responses, judgments, pair, corrections), one table read."""
    full = group_by_prompt(state.judge.rows(prompt_ids))
    return [prompt_view(state, pid, full[pid]) for pid in prompt_ids]


def prompt_view(state: IterationState, prompt_id: str, rows: list[dict]) -> dict:
    """One prompt's block from its full judge rows; scores come from the corrected light rows."""
    corrected = {int(r["response_index"]): r for r in state.light[prompt_id]}
    pair = state.pairs.get(prompt_id)
    responses = []
    for r in sorted(rows, key=lambda r: int(r["response_index"])):
        ri = int(r["response_index"])
        scores = corrected[ri]["scores"]
        modes = r.get("score_modes") or [None] * len(scores)
        judgments = [
            {"index": j, "text": text, "score": scores[j], "mode": modes[j],
             "original": state.overridden.get((prompt_id, ri, j), _NOT_OVERRIDDEN)}
            for j, text in enumerate(r["judgments"])
        ]
        role = None
        if pair is not None:
            role = "chosen" if ri == pair["chosen_index"] else "rejected" if ri == pair["rejected_index"] else None
        responses.append({"index": ri, "text": r["response"], "length": r["length"],
                          "mean": corrected[ri]["mean_score"], "variance": score_variance(scores),
                          "n_failed": corrected[ri]["n_failed"], "judgments": judgments, "role": role})
    return {"prompt_id": prompt_id, "prompt": rows[0]["prompt"], "responses": responses,
            "pair": pair, "corrections": state.corrections.get(prompt_id, [])}


_NOT_OVERRIDDEN = object()


def meta_judge_view(tables: MetaTables, prompt_id: str, responses: list[dict]) -> dict | None:
    """One prompt's meta-judge section: the meta-judged response, its judgments ranked by Elo
    rating with the judge pair marked, and every battle. None when the prompt was not
    meta-judged (its judgments all agree, or judge training is off in this iteration).

    ``responses``: the prompt view's responses (:func:`prompt_view`), for the judgment texts.
    Scores and their variance are the ones the meta-judge saw (the elo table's), not the
    reviewer's overrides. Optional columns missing from a table read as None.
    """
    battles, elo = tables.battles.of(prompt_id), tables.elo.of(prompt_id)
    if not battles and not elo:
        return None
    response_index = (elo or battles)[0].get("response_index")
    response = next((r for r in responses if r["index"] == response_index), {"judgments": []})
    texts = {j["index"]: j["text"] for j in response["judgments"]}
    pairs = tables.judge_pairs.of(prompt_id)
    pair = pairs[0] if pairs else None
    shown = [battle_view(n, b) for n, b in enumerate(battles, 1)]
    return {
        "response_index": response_index,
        "variance": score_variance([r.get("score") for r in elo]),
        "pair": pair,
        "judgments": ranked_judgments(elo, pair, texts),
        "battles": shown,
        "has_probs": any(b["p_a"] is not None or b["p_b"] is not None for b in shown),
        "counts": {"battles": len(shown), "failed": sum(b["verdict"] is None for b in shown),
                   "A": sum(b["verdict"] == "A" for b in shown), "B": sum(b["verdict"] == "B" for b in shown)},
        "omega": (elo[0].get("omega1"), elo[0].get("omega2")) if elo else (None, None),
    }


def judge_pair_roles(pair: dict | None) -> dict[int, str]:
    """judgment index -> "chosen" | "rejected" for the prompt's judge-training pair."""
    if pair is None:
        return {}
    return {pair.get("rejected_index"): "rejected", pair.get("chosen_index"): "chosen"}


def ranked_judgments(elo: list[dict], pair: dict | None, texts: dict[int, str]) -> list[dict]:
    """The Elo rows, highest rating first (unrated last, then by judgment index)."""
    roles = judge_pair_roles(pair)
    rows = [{"index": r.get("judgment_index"), "score": r.get("score"), "rating": r.get("rating"),
             "wins": r.get("wins"), "losses": r.get("losses"), "battles": r.get("battles"),
             "length": r.get("length"), "eligible": r.get("eligible")} for r in elo]
    rows.sort(key=lambda r: (r["rating"] is None, -(r["rating"] or 0.0),
                             r["index"] if r["index"] is not None else -1))
    for rank, r in enumerate(rows, 1):
        r.update(rank=rank, role=roles.get(r["index"]), text=texts.get(r["index"]))
    return rows


def battle_view(number: int, row: dict) -> dict:
    """One meta_judge row for the battles table; the winner follows the verdict when not stored."""
    a, b, verdict = row.get("a"), row.get("b"), row.get("verdict")
    winner = row.get("winner")
    if winner is None:
        winner = {"A": a, "B": b}.get(verdict)
    return {"number": number, "a": a, "b": b, "a_score": row.get("a_score"), "b_score": row.get("b_score"),
            "verdict": verdict, "winner": winner, "mode": row.get("mode"), "p_a": row.get("p_a"),
            "p_b": row.get("p_b"), "offset": row.get("offset"), "length": row.get("length"),
            "text": row.get("text")}


def stage_page_of(rows: PromptRows, prompt_id: str, per_page: int = PER_PAGE[-1]) -> str:
    """Query string of the generic stage page that shows ``prompt_id``'s first row."""
    first = rows.first_position(prompt_id)
    return urlencode({"per_page": per_page, "page": (first or 0) // per_page + 1})


def format_value(value) -> str:
    """A cell of a generic table: numbers rounded, containers as JSON."""
    if isinstance(value, float):
        return "—" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return "—" if value is None else str(value)


def bar_chart(labels: list[str], series: list[tuple[str, list[float | None]]],
              width: int = 360, height: int = 140) -> dict:
    """Geometry of a grouped bar chart for the ``bar_chart`` template macro (no JS)."""
    top = max([v for _, vs in series for v in vs if v is not None] + [1e-9])
    pad, base = 24, height - 20
    group = (width - pad) / max(1, len(labels))
    bar = group * 0.8 / max(1, len(series))
    bars = []
    for gi, label in enumerate(labels):
        for si, (name, values) in enumerate(series):
            v = values[gi]
            h = 0 if v is None else (base - 10) * v / top
            bars.append({"x": pad + gi * group + group * 0.1 + si * bar, "y": base - h, "w": bar - 1,
                         "h": h, "series": si, "title": f"{name} {label}: {format_value(v)}"})
    ticks = [{"x": pad + gi * group + group / 2, "label": label} for gi, label in enumerate(labels)]
    return {"width": width, "height": height, "base": base, "pad": pad, "bars": bars, "ticks": ticks,
            "top": format_value(float(top)), "legend": [name for name, _ in series]}


# ---------------------------------------------------------------------------- app


def create_app(run_dir, host: str = "127.0.0.1") -> Starlette:
    """The review app over ``run_dir`` (StoreError if it is not a run), answering only the host
    names of a server started on ``host`` (:func:`allowed_hosts`)."""
    store = RunStore.open(run_dir)
    secret = secrets.token_bytes(32)  # CSRF tokens of this server process only
    # Cookies ignore the port: a name of its own keeps two review servers on one host apart.
    session_cookie = "selfalign_review_" + hashlib.sha256(secret).hexdigest()[:12]
    stylesheet = STYLESHEET.read_text(encoding="utf-8")
    data = RunData(store)
    templates = Jinja2Templates(directory=str(TEMPLATES_DIR))
    templates.env.autoescape = True  # model text is data, never markup
    templates.env.trim_blocks = templates.env.lstrip_blocks = True
    templates.env.filters["fmt"] = format_value
    templates.env.globals.update(FILTERS=FILTERS, SORTS=SORTS, PER_PAGE=PER_PAGE,
                                 NOT_OVERRIDDEN=_NOT_OVERRIDDEN, run_name=store.run_info().get("name"))

    def render(request: Request, name: str, context: dict, status: int = 200) -> HTMLResponse:
        """A page; it starts a session (cookie) if the browser has none, for the forms' token."""
        session = request.cookies.get(session_cookie, "")
        fresh = not SESSION_RE.match(session)
        if fresh:
            session = secrets.token_urlsafe(32)
        response = templates.TemplateResponse(request, name, {**context, "csrf_token": csrf_token(secret, session)},
                                              status_code=status)
        if fresh:
            response.set_cookie(session_cookie, session, httponly=True, samesite="strict")
        return response

    def iteration_of(request: Request) -> int:
        t = small_int(request.path_params["t"])
        if t is None or t not in store.iterations():
            raise HTTPException(404, f"iteration {request.path_params['t'][:20]} does not exist in this run")
        return t

    def check_csrf(request: Request, form: dict) -> None:
        """The form's token must be the one of the session cookie the browser sent with it."""
        session = request.cookies.get(session_cookie, "")
        token = form.get(CSRF_FIELD, "")
        # Bytes: compare_digest refuses str with non-ASCII characters (a TypeError, a 500).
        expected = csrf_token(secret, session).encode() if SESSION_RE.match(session) else b""
        if not expected or not hmac.compare_digest(token.encode("utf-8", "replace"), expected):
            raise HTTPException(403, "this form is from an expired session or from another site: "
                                     "reload the page and submit it again")

    def state_of(t: int) -> IterationState:
        state = data.state(t)
        if state is None:
            raise HTTPException(404, f"iteration {t} has no complete judge stage yet (in progress)")
        return state

    def overview(request: Request) -> Response:
        status = store.status()
        iterations = []
        for t in store.iterations():
            state = data.state(t)
            iterations.append({
                "t": t,
                "stages": [s for s in status if s["iteration"] == t],
                "stats": state.stats if state else None,
                "histogram": bar_chart([f"{b:g}" for b in HIST_BINS], [("judgments", state.stats["histogram"])])
                if state else None,
                "manifests": {s["stage"]: store.manifest(t, s["stage"]) for s in status
                              if s["iteration"] == t and s["state"] == "done"},
                "metrics": store.read_json(t, "metrics.json"),
            })
        with_stats = [i for i in iterations if i["stats"]]
        lengths = bar_chart([f"iter {i['t']}" for i in with_stats],
                            [("chosen", [i["stats"]["chosen_length"] for i in with_stats]),
                             ("rejected", [i["stats"]["rejected_length"] for i in with_stats])]) if with_stats else None
        return render(request, "overview.html", {"iterations": iterations, "lengths": lengths,
                                                 "run": store.run_info()})

    def browser_page(request: Request, t: int, error: str | None = None, status: int = 200) -> Response:
        state = state_of(t)
        try:
            query = parse_query(request.query_params)
        except ValueError as e:
            query, error, status = Query(), str(e), 400
        matched = select(state.summaries, query, state.judge.search(query.q) if query.q else None)
        pages = max(1, math.ceil(len(matched) / query.per_page))
        page = min(query.page, pages)
        shown = matched[(page - 1) * query.per_page: page * query.per_page]
        extra = extra_stages(t)
        return render(request, "iteration.html", {
            "t": t, "state": state, "query": query, "matched": len(matched), "page": page, "pages": pages,
            "items": list(zip(shown, prompt_views(state, [s["prompt_id"] for s in shown]))),
            "extra": extra, "error": error, "return_to": str(request.url.path) + (
                "?" + request.url.query if request.url.query else ""),
            "who": reviewer_of(request),
        }, status)

    def iteration(request: Request) -> Response:
        return browser_page(request, iteration_of(request))

    def extra_stages(t: int) -> list[str]:
        return [s for s in data.complete_stages(t) if s not in CORE_STAGES and data.table_hash(t, s)]

    def prompt_page(request: Request, t: int, prompt_id: str, error: str | None = None,
                    status: int = 200, form: dict | None = None) -> Response:
        state = state_of(t)
        if prompt_id not in state.light:
            raise HTTPException(404, f"prompt {prompt_id!r} is not in iteration {t}")
        view = prompt_views(state, [prompt_id])[0]
        meta_tables = data.meta_tables(t)
        meta = meta_judge_view(meta_tables, prompt_id, view["responses"]) if meta_tables else None
        # The meta stages have their own section; the generic cards show any other stage's rows.
        generic = [s for s in extra_stages(t) if not (meta_tables and s in META_STAGES)]
        extra = {s: table.of(prompt_id) for s in generic if (table := data.indexed(t, s)) is not None}
        summary = next(s for s in state.summaries if s["prompt_id"] == prompt_id)
        return render(request, "prompt.html", {
            "t": t, "state": state, "view": view, "summary": summary, "meta": meta,
            "meta_off": meta_tables is not None and not meta_tables.judge_training,
            "meta_links": {s: stage_page_of(rows, prompt_id) for s, rows in meta_tables.by_stage().items()}
            if meta else {},
            "extra": {s: rows for s, rows in extra.items() if rows}, "error": error, "form": form or {},
            "return_to": f"/iter/{t}/prompt?" + urlencode({"id": prompt_id}),
            "who": reviewer_of(request),
        }, status)

    def prompt(request: Request) -> Response:
        return prompt_page(request, iteration_of(request), request.query_params.get("id", ""))

    async def correct(request: Request) -> Response:
        t = iteration_of(request)
        check_same_origin(request)
        form = await read_form(request)
        check_csrf(request, form)
        state = state_of(t)
        record = {k: v for k, v in form.items() if k in
                  ("action", "prompt_id", "response_index", "judgment_index", "value", "note", "who") and v != ""}
        record["iteration"] = t
        try:
            clean = add_correction(store, record, judge_rows=data.rows(t, "judge"))
        except ValueError as e:
            prompt_id = form.get("prompt_id", "")
            if prompt_id in state.light:
                return prompt_page(request, t, prompt_id, error=str(e), status=400, form=form)
            return browser_page(request, t, error=str(e), status=400)
        return_to = form.get("return_to", "")
        if not _RETURN_TO_RE.match(return_to) or not return_to.startswith(f"/iter/{t}"):
            return_to = f"/iter/{t}/prompt?" + urlencode({"id": clean["prompt_id"]})
        response = RedirectResponse(return_to, status_code=303)
        # Percent-encoded: a header is Latin-1, a name need not be (a 500 here would come after
        # the correction is stored, and a retry would store it twice).
        response.set_cookie("reviewer", quote(clean["who"], safe=""), samesite="strict", httponly=True)
        return response

    def corrections_page(request: Request) -> Response:
        t = iteration_of(request)
        state = data.state(t)
        return render(request, "corrections.html", {
            "t": t, "corrections": load_corrections(store, t), "applied": state.applied if state else set()})

    def export(request: Request) -> Response:
        t = iteration_of(request)
        fmt = request.query_params.get("format", "jsonl")
        if fmt not in EXPORT_FORMATS:
            raise HTTPException(400, f"format must be one of {', '.join(EXPORT_FORMATS)}")
        state = state_of(t)
        if not state.has_pairs:
            raise HTTPException(404, f"iteration {t} has no complete pairs stage yet")
        # state.pairs is corrections.review's output, as in reviewed_pairs (what training gets).
        body = encode_pairs(list(state.pairs.values()), fmt)
        media = "application/x-ndjson" if fmt == "jsonl" else "application/vnd.apache.parquet"
        return Response(body, media_type=media, headers={
            "Content-Disposition": f'attachment; filename="pairs_iter_{t}_reviewed.{fmt}"'})

    def stage(request: Request) -> Response:
        t = iteration_of(request)
        name = request.path_params["stage"]
        if name not in data.complete_stages(t) or data.table_hash(t, name) is None:
            raise HTTPException(404, f"iteration {t} has no complete table stage {name!r}")
        # The same cached Arrow table the prompt pages index (meta stages): only this page becomes Python.
        rows = data.indexed(t, name)
        try:
            query = parse_query(request.query_params)
        except ValueError as e:
            raise HTTPException(400, str(e)) from e
        pages = max(1, math.ceil(len(rows) / query.per_page))
        page = min(query.page, pages)
        shown = rows.table.slice((page - 1) * query.per_page, query.per_page).to_pylist()
        columns = list(dict.fromkeys(k for r in shown for k in r))
        return render(request, "stage.html", {"t": t, "stage": name, "rows": shown, "columns": columns,
                                              "total": len(rows), "page": page, "pages": pages, "query": query})

    async def stylesheet_file(request: Request) -> Response:
        return Response(stylesheet, media_type="text/css")

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok", "run": str(store.root), "iterations": store.iterations()})

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return render(request, "error.html", {"status": exc.status_code, "message": exc.detail}, exc.status_code)

    async def store_error(request: Request, exc: StoreError) -> Response:
        return render(request, "error.html", {"status": 500, "message": str(exc)}, 500)

    routes = [
        Route("/", overview),
        Route("/healthz", healthz),
        Route("/static/review.css", stylesheet_file),
        Route(ITERATION_ROUTE, iteration),
        Route(ITERATION_ROUTE + "/prompt", prompt),
        Route(ITERATION_ROUTE + "/corrections", corrections_page, methods=["GET"]),
        Route(ITERATION_ROUTE + "/corrections", correct, methods=["POST"]),
        Route(ITERATION_ROUTE + "/export", export),
        Route(ITERATION_ROUTE + "/stage/{stage}", stage),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, StoreError: store_error},
                    middleware=[Middleware(guard, allowed=allowed_hosts(host))])
    app.state.data = data
    return app


# ---------------------------------------------------------------------------- protections

SESSION_RE = re.compile(r"^[A-Za-z0-9_-]{32,64}$")


def csrf_token(secret: bytes, session: str) -> str:
    """token = hex HMAC-SHA256(secret, session): only this server process can make it, and it
    is good only with the session cookie it was made for."""
    return hmac.new(secret, session.encode("ascii"), hashlib.sha256).hexdigest()


def reviewer_of(request: Request) -> str:
    """The reviewer name remembered in the (percent-encoded) ``reviewer`` cookie."""
    return unquote(request.cookies.get("reviewer", ""))


def check_same_origin(request: Request) -> None:
    """Refuse form posts the browser says come from elsewhere (CSRF from another tab).

    Origin, when sent, must be this server (``Origin: null`` is a sandboxed frame or a
    ``data:`` page: refused); ``Sec-Fetch-Site``, when sent, must be same-origin. A post with
    neither still needs the session's token.
    """
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc.lower() != request.headers.get("host", "").lower():
        raise HTTPException(403, "cross-origin form posts are refused")
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        raise HTTPException(403, "cross-site form posts are refused")


async def read_form(request: Request) -> dict[str, str]:
    """A URL-encoded form of at most ``MAX_FORM_BYTES`` / ``MAX_FORM_FIELDS`` (a repeated field:
    the last wins). Multipart (uploads) is a 415; a larger body a 413, read no further."""
    if request.headers.get("content-type", "").split(";", 1)[0].strip().lower() != FORM_TYPE:
        raise HTTPException(415, f"corrections are posted as {FORM_TYPE}")
    declared = small_int(request.headers.get("content-length", "0"))
    if declared is None or declared > MAX_FORM_BYTES:
        raise HTTPException(413, f"a correction form is at most {MAX_FORM_BYTES} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise HTTPException(413, f"a correction form is at most {MAX_FORM_BYTES} bytes")
    try:
        return dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS,
                              errors="strict"))
    except (UnicodeDecodeError, ValueError):
        raise HTTPException(400, "the form is not valid UTF-8 URL-encoded data") from None


def allowed_hosts(host: str) -> frozenset[str]:
    """Host names a server bound to ``host`` answers: localhost's names and ``host`` itself;
    a wildcard bind (0.0.0.0, ::) adds this machine's name. Lower case, IPv6 without brackets."""
    names = {*LOCAL_HOSTS, host.strip("[]").lower()}
    if host in WILDCARD_HOSTS:
        names.add(socket.gethostname().lower())
    return frozenset(names - {""})


def host_name(header: str) -> str:
    """The name of a ``Host`` header without the port: ``[::1]:8765`` → ``::1``,
    ``Localhost:8765`` → ``localhost``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def guard(app, allowed: frozenset[str]):
    """ASGI middleware: a request for a host name not in ``allowed`` is a 400 (DNS rebinding);
    every response gets ``SECURITY_HEADERS``."""
    encoded = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]

    async def guarded(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                message = {**message, "headers": [*message.get("headers", []),
                                                  *[(k, v) for k, v in encoded if k not in present]]}
            await send(message)

        host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
        if host_name(host) not in allowed:
            names = ", ".join(sorted(allowed))
            response = PlainTextResponse(f"400: this server answers only for the host names {names}", 400)
            return await response(scope, receive, send_with_headers)
        return await app(scope, receive, send_with_headers)

    return guarded


def serve(run_dir, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve the review app on ``host:port`` until interrupted (localhost unless told otherwise)."""
    import uvicorn

    app = create_app(run_dir, host=host)
    # Read the tables while the browser opens, so the first page does not wait for them.
    threading.Thread(target=app.state.data.warm, name="review-warm", daemon=True).start()
    print(f"selfalign review: http://{host}:{port}/  (run {app.state.data.store.root}; Ctrl-C to stop)")
    print(f"  answers only for the host names {', '.join(sorted(allowed_hosts(host)))}")
    uvicorn.run(app, host=host, port=port, log_level="warning")
