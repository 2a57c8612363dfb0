"""The review app's view models: what a page shows of a prompt, its judgments, the meta-judge's
battles and the charts, as plain dicts for the templates."""

from __future__ import annotations

import json
import math
from urllib.parse import urlencode

from alignment.pairs import group_by_prompt
from alignment.review_data import PER_PAGE, IterationState, MetaTables, PromptRows, score_variance


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
             "original": state.overridden.get((prompt_id, ri, j), NOT_OVERRIDDEN)}
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


NOT_OVERRIDDEN = object()


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




# ---------------------------------------------------------------------------- line charts

MAX_MARKERS = 40  # a series with more points is drawn as a line only (one <circle> per point below)
LEGEND_CHAR_PX = 6  # legend layout: the width of a legend entry is 22 + 6 px per character of its name


def finite(value) -> bool:
    """Whether ``value`` is a plottable number: an int or float, not a bool, not NaN or ±inf."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def span(values: list[float]) -> tuple[float, float]:
    """(min, max) of ``values``; a single value v widens to (v − 1, v + 1), so it is drawn centred."""
    low, high = min(values), max(values)
    return (low - 1, high + 1) if low == high else (low, high)


def line_chart(x: list, series: list[tuple[str, list]], *, errors: dict[str, list] | None = None,
               rules: list[tuple[str, float]] = (), include: tuple[float, ...] = (), x_title: str = "",
               width: int = 360, height: int = 180, left: int = 46, right: int = 10, top: int = 10,
               bottom: int = 54) -> dict | None:
    """Geometry of a line chart for the ``line_chart`` template macro (no JS): one polyline per
    series over the shared ``x`` values, a legend, optional error bars and horizontal rules.

    A point whose x or y is None, NaN or ±inf is skipped (the line joins its neighbours).
    Data (x, y) maps to SVG pixels (y grows downwards) by

        px = left + (x − x_min) / (x_max − x_min) · (width − left − right)
        py = top  + (y_max − y) / (y_max − y_min) · (height − top − bottom)

    with [x_min, x_max] the span of the plotted points' x and [y_min, y_max] the span of their
    y, the error bars' ends, the ``rules`` and ``include`` (e.g. 0 and 1 for a rate); a span of
    one value v is (v − 1, v + 1), so a single x or a flat series is drawn centred.

    ``errors``: {series name: [(low, high) or None, one per x]}, drawn as vertical bars at the
    series' x; ``rules``: [(label, y)] reference lines across the plot. None when no point of
    any series is plottable.
    """
    errors = errors or {}
    plotted = [[(xv, yv) for xv, yv in zip(x, values) if finite(xv) and finite(yv)] for _, values in series]
    points = [p for ps in plotted for p in ps]
    if not points:
        return None
    bars = []  # (x, low, high, series index)
    for index, (name, _) in enumerate(series):
        for xv, interval in zip(x, errors.get(name, ())):
            if interval is not None and finite(xv) and all(finite(v) for v in interval):
                bars.append((xv, interval[0], interval[1], index))
    x_min, x_max = span([xv for xv, _ in points])
    y_min, y_max = span([yv for _, yv in points] + [v for _, lo, hi, _ in bars for v in (lo, hi)]
                        + [y for _, y in rules] + list(include))
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(xv: float) -> float:
        return round(left + (xv - x_min) / (x_max - x_min) * plot_w, 2)

    def py(yv: float) -> float:
        return round(top + (y_max - yv) / (y_max - y_min) * plot_h, 2)

    shown = []
    for index, ((name, _), ps) in enumerate(zip(series, plotted)):
        coords = [{"x": px(xv), "y": py(yv), "title": f"{name} at {x_title} {format_value(xv)}: {format_value(yv)}"}
                  for xv, yv in ps]
        shown.append({"name": name, "index": index, "points": coords, "markers": len(coords) <= MAX_MARKERS,
                      "path": " ".join(f"{p['x']},{p['y']}" for p in coords)})
    xs = sorted({xv for xv, _ in points})
    ticks = xs if len(xs) <= 6 else [xs[0], xs[len(xs) // 2], xs[-1]]
    legend, offset = [], left
    for index, (name, _) in enumerate(series):
        legend.append({"name": name, "index": index, "x": offset})
        offset += 22 + LEGEND_CHAR_PX * len(name)
    return {
        "width": width, "height": height, "left": left, "right": width - right, "top": top,
        "bottom": height - bottom, "middle": round(left + plot_w / 2, 2), "x_title": x_title, "series": shown,
        "legend": legend,
        "errors": [{"x": px(xv), "low": py(lo), "high": py(hi), "index": index,
                    "title": f"{series[index][0]} 95% interval: [{format_value(lo)}, {format_value(hi)}]"}
                   for xv, lo, hi, index in bars],
        "rules": [{"y": py(y), "label": label} for label, y in rules],
        "x_ticks": [{"x": px(xv), "label": format_value(xv)} for xv in ticks],
        "y_ticks": [{"y": py(yv), "label": format_value(float(yv))} for yv in (y_min, y_max)],
    }


# ---------------------------------------------------------------------------- overview charts

# The DPO training curve (``metrics.json`` → ``train_metrics.curve``, one row per logged step, TRL's
# names): two panels, since the log-probabilities are on another scale than the loss and margin.
CURVE_PANELS = (
    ("loss and reward margin", (("loss", "loss"), ("reward margin", "rewards/margins"))),
    ("log-probabilities of the answers", (("log p(chosen)", "logps/chosen"), ("log p(rejected)", "logps/rejected"))),
)


def training_curve_charts(metrics: dict | None) -> list[dict]:
    """The training curve of an iteration's ``metrics.json`` as line charts over the optimizer
    step, one per ``CURVE_PANELS`` entry that has a plottable value: [{"title", "chart"}].
    Empty without a curve (training skipped, not run yet, or an algorithm without DPO)."""
    train = (metrics or {}).get("train_metrics") if isinstance(metrics, dict) else None
    curve = [c for c in (train.get("curve") or []) if isinstance(c, dict)] if isinstance(train, dict) else []
    steps = [c.get("step") for c in curve]
    charts = []
    for title, columns in CURVE_PANELS:
        chart = line_chart(steps, [(name, [c.get(key) for c in curve]) for name, key in columns], x_title="step")
        if chart is not None:
            charts.append({"title": title, "chart": chart})
    return charts


EVAL_KEYS = ("win_rate", "lc_win_rate", "mean_length_before", "mean_length_after")


def interval_of(ci) -> tuple[float, float] | None:
    """A stored ``[low, high]`` interval as a tuple; None when missing or not two finite numbers."""
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(finite(v) for v in ci):
        return float(ci[0]), float(ci[1])
    return None


def eval_charts(evals: list[tuple[int, dict | None]]) -> dict | None:
    """The eval stage's results across iterations: M_{t+1} against M_t for each iteration t whose
    eval summary (``alignment.self_rewarding.eval_summary``: the eval stage's manifest info) has
    one of ``EVAL_KEYS``.

    ``win``: win rate with its bootstrap 95% interval as an error bar, LC win rate, a rule at
    0.5 (no change), the y axis spanning at least [0, 1]; ``length``: mean answer length
    (tokens) of each side, from 0; ``rows``: the numbers per iteration (and the fixed eval
    judge, the summary's ``judge``). None when no iteration has eval results."""
    shown = [(t, ev) for t, ev in evals if isinstance(ev, dict) and any(finite(ev.get(k)) for k in EVAL_KEYS)]
    if not shown:
        return None
    ts = [t for t, _ in shown]
    rows = [{"t": t, "win_rate": ev.get("win_rate"), "ci": interval_of(ev.get("win_rate_ci")),
             "lc_win_rate": ev.get("lc_win_rate"), "length_before": ev.get("mean_length_before"),
             "length_after": ev.get("mean_length_after"), "prompts": ev.get("prompts"), "wins": ev.get("wins"),
             "ties": ev.get("ties"), "losses": ev.get("losses"), "failed": ev.get("failed"),
             "judge": ev.get("judge")} for t, ev in shown]
    x_title = "iteration t"
    win = line_chart(ts, [("win rate (95% interval)", [r["win_rate"] for r in rows]),
                          ("LC win rate", [r["lc_win_rate"] for r in rows])],
                     errors={"win rate (95% interval)": [r["ci"] for r in rows]}, rules=[("0.5", 0.5)],
                     include=(0.0, 1.0), x_title=x_title)
    length = line_chart(ts, [("M_t (before)", [r["length_before"] for r in rows]),
                             ("M_t+1 (after)", [r["length_after"] for r in rows])], include=(0.0,), x_title=x_title)
    return {"win": win, "length": length, "rows": rows}


def judge_identity(manifest: dict | None, t: int) -> dict | None:
    """Who judged iteration t, from its judge stage's manifest: a separate judge, whose identity
    the stage records in its inputs as ``judge_model`` (its info names the model), or else the
    policy M_t itself. None without a complete judge stage (or for an algorithm without one)."""
    if not isinstance(manifest, dict):
        return None
    identity = (manifest.get("inputs") or {}).get("judge_model")
    if identity is None:
        return {"separate": False, "text": f"the policy M_{t} (self-judging)", "identity": None}
    name = (manifest.get("info") or {}).get("judge_model")
    return {"separate": True, "text": str(name or identity), "identity": str(identity)}


def pretty_json(value) -> str:
    """``value`` as indented JSON for a raw-data disclosure (NaN stays NaN, as Python writes it)."""
    return json.dumps(value, indent=1, ensure_ascii=False, default=str)
