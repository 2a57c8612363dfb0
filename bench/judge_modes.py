"""Judge score modes (parsed integer vs expected score) and the cost of the meta-judge, one run.

On the same K responses per prompt (embedded model by default), the judge runs N times per
response in two modes:

- ``free``: the paper; the judge writes its justification and ``Score: N``, which is parsed.
- ``logprob``: the justification is sampled up to ``Score:`` and the score token's distribution
  is read; the same judgments give the argmax integer AND the expected value.

For each score it prints the share of responses that got a score, the tie rate (share of
prompts whose two best responses have the same mean score; such a pair picks its "chosen"
arbitrarily, or is dropped) and the judge tokens generated per scored response. Then it
meta-judges the logprob judgments as the tiny Meta-Rewarding recipe does (every pair of the
most-disputed response's judgments, both orders, logprob verdict, position debiasing) and
prints its wall time and tokens relative to the logprob judge stage.

    .venv/bin/python bench/judge_modes.py [--prompts 8] [--k 4] [--n 3] [--max-tokens 48] [--backend auto]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


class Counting:
    """A Generator proxy that counts generated tokens, sequences, probability reads and model time."""

    def __init__(self, inner):
        self.inner, self.backend = inner, inner.backend
        self.reset()

    def reset(self) -> None:
        self.tokens = self.sequences = self.prob_reads = 0
        self.seconds = 0.0

    def chat(self, conversations, sampling, **kw):
        t = time.perf_counter()
        out = self.inner.chat(conversations, sampling, **kw)
        self.seconds += time.perf_counter() - t
        self.tokens += sum(c.n_tokens for per in out for c in per)
        self.sequences += sum(len(per) for per in out)
        return out

    def next_token_probs(self, conversations, candidates, **kw):
        t = time.perf_counter()
        out = self.inner.next_token_probs(conversations, candidates, **kw)
        self.seconds += time.perf_counter() - t
        self.prob_reads += len(conversations)
        return out

    def close(self):
        self.inner.close()


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def score_table(rows: list[dict], key: str) -> list[dict]:
    """Rows with ``mean_score`` replaced by the per-response mean of ``key`` (for tie_rate)."""
    return [{"prompt_id": r["prompt_id"], "mean_score": _mean(r[key])} for r in rows]


def summarize(name: str, rows: list[dict], tokens: int) -> dict:
    from alignment.pairs import group_by_prompt, tie_rate

    scored = [r for r in rows if r["mean_score"] is not None]
    eligible = sum(1 for g in group_by_prompt(rows).values() if sum(r["mean_score"] is not None for r in g) >= 2)
    return {"mode": name, "scored": len(scored), "responses": len(rows), "eligible_prompts": eligible,
            "tie_rate": tie_rate(rows), "tokens": tokens, "tokens_per_scored": tokens / len(scored) if scored else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--k", type=int, default=4, help="responses per prompt")
    parser.add_argument("--n", type=int, default=3, help="judgments per response")
    parser.add_argument("--max-tokens", type=int, default=48, help="response and judgment tokens")
    parser.add_argument("--meta-max-tokens", type=int, default=32)
    args = parser.parse_args()

    from alignment.actor import generate_responses
    from alignment.data import load_prompts
    from alignment.generation import EngineSpec, Sampling, open_generator
    from alignment.judge import JudgeSettings, judge_responses
    from alignment.meta_rewarding import (
        MetaJudgeSettings,
        battle_stats,
        meta_items,
        meta_judge_battles,
    )
    from alignment.models import resolve

    prompts = load_prompts(str(REPO / "data" / "tiny_prompts.jsonl"))
    prompts = (prompts * (args.prompts // len(prompts) + 1))[: args.prompts]
    base = resolve(args.model).base
    t0 = time.perf_counter()
    gen = Counting(open_generator(EngineSpec(base=base, backend=args.backend, seed=0, batch_size=32)))
    startup = time.perf_counter() - t0

    responses = generate_responses(gen, prompts, Sampling(n=args.k, temperature=0.7, top_p=0.9,
                                                          max_tokens=args.max_tokens), seed=1)
    results, judged = [], {}
    for mode in ("free", "logprob"):
        gen.reset()
        settings = JudgeSettings(n=args.n, mode=mode, score="expected" if mode == "logprob" else "int",
                                 temperature=0.7, top_p=0.9, max_tokens=args.max_tokens)
        t = time.perf_counter()
        rows = judge_responses(gen, responses, settings, seed=2)
        judged[mode] = {"rows": rows, "seconds": time.perf_counter() - t, "tokens": gen.tokens,
                        "calls": gen.sequences, "prob_reads": gen.prob_reads}
        if mode == "free":
            results.append(summarize("parsed integer (free)", rows, gen.tokens))
        else:
            results.append(summarize("argmax integer (logprob)", score_table(rows, "score_ints"), gen.tokens))
            results.append(summarize("expected score (logprob)", score_table(rows, "expected_scores"), gen.tokens))

    gen.reset()
    items, agree = meta_items(judged["logprob"]["rows"])
    t = time.perf_counter()
    battles = meta_judge_battles(gen, items, MetaJudgeSettings(mode="logprob", temperature=0.7, top_p=0.9,
                                                               max_tokens=args.meta_max_tokens, debias_position=True),
                                 seed=3)
    meta = {"seconds": time.perf_counter() - t, "tokens": gen.tokens, "calls": gen.sequences,
            "prob_reads": gen.prob_reads}
    gen.close()

    print(f"\n== judge score modes: {args.model} ({gen.backend}), {args.prompts} prompts x {args.k} responses x "
          f"{args.n} judgments, <= {args.max_tokens} tokens (engine start {startup:.0f}s) ==")
    print(f"{'score':<28}{'scored':>12}{'prompts w/ 2+':>15}{'tie rate':>10}{'judge tokens':>14}"
          f"{'judge tokens/scored resp.':>27}")
    for r in results:
        tie = "–" if r["tie_rate"] is None else f"{r['tie_rate']:.2f}"
        tok = "–" if r["tokens_per_scored"] is None else f"{r['tokens_per_scored']:.1f}"
        print(f"{r['mode']:<28}{r['scored']:>5}/{r['responses']:<6}{r['eligible_prompts']:>15}{tie:>10}"
              f"{r['tokens']:>14}{tok:>27}")
    lp = judged["logprob"]
    print("(logprob: both rows are the same judgments; +1 probability read per judgment, not counted as tokens)")

    stats = battle_stats(battles)
    print(f"\n== meta-judge stage vs judge stage (logprob judge, logprob + debiased meta-judge, "
          f"<= {args.meta_max_tokens} reasoning tokens) ==")
    print(f"{'stage':<12}{'calls':>8}{'tokens':>9}{'seconds':>9}")
    print(f"{'judge':<12}{lp['calls']:>8}{lp['tokens']:>9}{lp['seconds']:>9.1f}")
    print(f"{'meta_judge':<12}{meta['calls']:>8}{meta['tokens']:>9}{meta['seconds']:>9.1f}")
    ratio = meta["seconds"] / lp["seconds"] if lp["seconds"] else float("nan")
    print(f"meta-judge / judge: {meta['calls'] / max(1, lp['calls']):.2f}x calls, "
          f"{meta['tokens'] / max(1, lp['tokens']):.2f}x tokens, {ratio:.2f}x wall time "
          f"({len(items)} prompts meta-judged, {len(agree)} all-agree; {stats['battles']} battles, "
          f"{stats['failed_battles']} failed, position wins A/B {stats['wins_a']}/{stats['wins_b']})")
    n = args.n
    print(f"per prompt: judge K·N = {args.k * n} calls, meta-judge N(N−1) = {n * (n - 1)} calls; "
          f"at the paper's K=7, N=11: 77 vs 110 calls (prompts ~2x longer: two judgments + the rubric)")


if __name__ == "__main__":
    main()
