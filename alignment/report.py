"""Human-readable summaries of an iteration (Prefect artifacts, CLI output, the README)."""

from __future__ import annotations


def _fmt(x, digits: int = 2) -> str:
    if x is None:
        return "–"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def histogram_bars(hist: dict[str, int], width: int = 30) -> str:
    top = max(hist.values(), default=0) or 1
    return "\n".join(f"{k} | {'█' * round(width * v / top):<{width}} {v}" for k, v in hist.items())


def summary_markdown(metrics: dict, *, review_url: str | None = None) -> str:
    """Markdown summary of one iteration from its ``metrics.json``."""
    t = metrics["iteration"]
    j, p = metrics["judge"], metrics["pairs"]
    train = metrics.get("train") or {}
    tm = metrics.get("train_metrics") or {}
    lines = [
        f"# Iteration {t}",
        f"Model: `{metrics['model']}`",
        "",
        "| prompts | responses | judgments | scored | failed | pairs | ties | unscored |",
        "|---|---|---|---|---|---|---|---|",
        f"| {p['prompts']} | {j['responses']} | {j['judgments']} | {j['scored']} ({100 * j['scored_share']:.0f}%) "
        f"| {j['failed']} | {p['pairs']} | {p['ties']} | {p['unscored']} |",
        "",
        f"Judge modes: {j['modes']}; mean score {_fmt(j['mean_score'])}; tie rate {_fmt(p.get('tie_rate'))}",
        f"Chosen / rejected mean length (tokens): {_fmt(p.get('chosen_mean_length'), 1)} / {_fmt(p.get('rejected_mean_length'), 1)}",
        "",
        "Score histogram (rounded per-judgment scores):",
        "```",
        histogram_bars(j["histogram"]),
        "```",
    ]
    if train.get("trained"):
        lines += [f"Trained adapter: `{train['adapter']}` on {train['pairs']} pairs, "
                  f"loss {_fmt(tm.get('train_loss'), 4)}, {tm.get('steps')} steps"]
        if train.get("corrections"):
            lines += [f"Review corrections applied: {len(train['corrections'])}"]
    elif train:
        lines += ["**No pairs: training skipped.**"]
    if review_url:
        lines += ["", f"[Review this iteration]({review_url})"]
    return "\n".join(lines)


def judge_table(rows: list[dict], limit: int = 200, text_chars: int = 300) -> list[dict]:
    """Rows of the judge table for a Prefect table artifact (texts shortened)."""
    def cut(s: str) -> str:
        return s if len(s) <= text_chars else s[:text_chars] + "…"

    return [
        {
            "prompt": cut(r["prompt"]),
            "response": cut(r["response"]),
            "scores": ", ".join(_fmt(s) for s in r["scores"]),
            "mean": _fmt(r["mean_score"]),
            "rationale": cut(r["judgments"][0]) if r["judgments"] else "",
        }
        for r in rows[:limit]
    ]


def learning_line(curve: list[dict]) -> str | None:
    """How DPO moved on its own pairs, first logged step → last: reward margin
    (β·[log π/π_ref(chosen) − log π/π_ref(rejected)], TRL's ``rewards/margins``) and reward accuracy
    (share of pairs with margin > 0, ``rewards/accuracies``). None for fewer than two steps."""
    steps = [c for c in curve if "rewards/margins" in c]
    if len(steps) < 2:
        return None
    first, last = steps[0], steps[-1]
    text = f"reward margin {first['rewards/margins']:+.3f} -> {last['rewards/margins']:+.3f}"
    if "rewards/accuracies" in first and "rewards/accuracies" in last:
        text += f", accuracy {first['rewards/accuracies']:.2f} -> {last['rewards/accuracies']:.2f}"
    return f"{text} over {len(steps)} steps (loss {first.get('loss', float('nan')):.4f} -> {last.get('loss', float('nan')):.4f})"
