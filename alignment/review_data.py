"""The review app's data: a run's judge tables as Arrow, per-prompt summaries, filters and sorts.

Speed on 10,000 prompts: the judge table is kept as Arrow, cached per (iteration, output
hash); only its small columns (scores, lengths) become Python rows, and a page materialises
the few dozen prompts it shows. The per-prompt summaries that filters and sorts run over are
cached per (tables, corrections).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from urllib.parse import urlencode

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from alignment.corrections import (
    PromptReview,
    load_corrections,
    override_scores,
    pairs_rho,
    review,
)
from alignment.pairs import group_by_prompt, select_pair
from alignment.store import DATA_FILE, RunStore

MAX_INT_DIGITS = 9  # iterations and pages; longer is no page (Python refuses int() over 4300 digits)
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


