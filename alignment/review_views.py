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


