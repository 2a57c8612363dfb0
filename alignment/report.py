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
    if metrics.get("eval"):
        lines += ["", *eval_markdown(t, metrics["eval"])]
    if review_url:
        lines += ["", f"[Review this iteration]({review_url})"]
    return "\n".join(lines)


def _interval(ci) -> str:
    return "[–]" if not ci else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def eval_line(info: dict) -> str:
    """One line of an eval stage's summary (M_{t+1} vs M_t):
    ``win rate 0.62 [0.40, 0.80], LC 0.58, length 35.2 → 41.0 (5 wins, 2 ties, 1 losses, 0 failed);
    score 2.16 → 2.32 (gain +0.16 [0.03, 0.31])`` (the score part when the pointwise judge ran)."""
    text = (f"win rate {_fmt(info.get('win_rate'))} {_interval(info.get('win_rate_ci'))}, "
            f"LC {_fmt(info.get('lc_win_rate'))}, length {_fmt(info.get('mean_length_before'), 1)} → "
            f"{_fmt(info.get('mean_length_after'), 1)} ({info.get('wins')} wins, {info.get('ties')} ties, "
            f"{info.get('losses')} losses, {info.get('failed')} failed)")
    if info.get("score_gain") is not None:
        text += (f"; score {_fmt(info.get('mean_score_before'))} → {_fmt(info.get('mean_score_after'))} "
                 f"(gain {info['score_gain']:+.2f} {_interval(info.get('score_gain_ci'))})")
    ref = info.get("reference")
    if ref:
        text += f"; vs reference {_fmt(ref.get('win_rate'))} {_interval(ref.get('win_rate_ci'))}"
    return text


def last_eval_line(per_iteration: list[dict]) -> str | None:
    """``iteration t: <eval_line>`` of the last iteration whose ``metrics.json`` has an eval."""
    for metrics in reversed(per_iteration):
        if (metrics or {}).get("eval"):
            return f"iteration {metrics['iteration']}: {eval_line(metrics['eval'])}"
    return None


def eval_markdown(t: int, ev: dict) -> list[str]:
    """The eval section of an iteration's summary: M_{t+1} against M_t, and the reference."""
    ref = ev.get("reference") or {}
    lines = [f"## Eval: M_{t + 1} vs M_{t} on {ev.get('prompts')} held-out prompts (fixed judge)", "",
             "| | win rate | 95% interval | LC win rate | wins | ties | losses | failed |",
             "|---|---|---|---|---|---|---|---|"]
    for name, h in ((f"M_{t + 1} vs M_{t}", ev), (f"M_{t + 1} vs reference", ref)):
        if h:
            lines.append(f"| {name} | {_fmt(h.get('win_rate'))} | {_interval(h.get('win_rate_ci'))} "
                         f"| {_fmt(h.get('lc_win_rate'))} | {h.get('wins')} | {h.get('ties')} | {h.get('losses')} "
                         f"| {h.get('failed')} |")
    lines += ["", f"| | M_{t} | M_{t + 1} |" + (" reference |" if ref else ""), "|---|---|---|" + ("---|" if ref else ""),
              f"| mean answer length (tokens) | {_fmt(ev.get('mean_length_before'), 1)} "
              f"| {_fmt(ev.get('mean_length_after'), 1)} |" + (f" {_fmt(ref.get('mean_length_reference'), 1)} |" if ref else ""),
              f"| mean pointwise score (fixed judge) | {_fmt(ev.get('mean_score_before'))} "
              f"| {_fmt(ev.get('mean_score_after'))} |" + (" – |" if ref else "")]
    if ev.get("score_gain") is not None:
        lines += ["", f"Paired pointwise gain of M_{t + 1} (same prompt, same fixed judge): "
                      f"{ev['score_gain']:+.3f}, 95% interval {_interval(ev.get('score_gain_ci'))}."]
    if ev.get("identical"):
        lines += ["", f"{ev['identical']} prompts got the same answer from both models (ties, not judged)."]
    return lines


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
