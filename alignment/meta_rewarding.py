"""One Meta-Rewarding iteration (Wu et al., 2024), stage by stage, against a run directory.

    M_t writes K responses per prompt                                  (generate)
    M_t judges each response N times (additive 5-point rubric)          (judge)
    actor pairs: highest vs lowest mean score, with length control ρ_t  (pairs)
    for each prompt, the response whose N judgments disagree most:
        M_t meta-judges every pair of its judgments, in both orders     (meta_judge)
        position-weighted Bradley–Terry / Elo rating of the judgments   (elo)
        judge pair: highest- vs lowest-rated judgment under the cap     (judge_pairs)
    one DPO step on actor pairs + judge pairs → M_{t+1}                 (train)

Actor and judge pairs are trained together in ONE DPO step (``compute_train``), as in
the paper (its Fig. 1: "both preference pair sets are used together to train the model for
the next iteration"). Why not two steps: one model plays every role, so M_{t+1} must be one
adapter on top of M_t with one reference model (M_t). Two sequential DPO steps would need the
second step to pick a reference (M_t or the half-trained model), would let whichever step runs
last partly undo the other, and would cost a second trainer start-up per iteration. Mixed in
one shuffled dataset, each pair pulls with the weight of its count, against the same reference.

Judge training is per iteration (``meta_judge.train_judge_iterations``, paper: 1–2). In other
iterations the three meta stages commit empty tables and make no meta-judge call at all: the
meta-judge is the expensive part (k(k−1) calls per prompt, 110 for N = 11).

The math (variance pick, battle plan, position weights, Bradley–Terry, judge pair) is in
``alignment.meta_judge``; the stage functions here only read tables, call it and the model;
``META_REWARDING`` is Self-Rewarding's stage list with its pairs taking ρ_t, the three judge
stages inserted after them, and the judge pairs added to training. Nothing here imports Prefect.
"""

from __future__ import annotations

import collections
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace

from alignment.generation import Generator, Sampling, derive_seed
from alignment.judge import judge_prompt
from alignment.meta_judge import (
    log_odds,
    verdict_from_probs,
    battle_plan,
    battle_scores,
    judge_pair,
    make_battle,
    pick_meta_response,
    position_weights,
    position_wins,
    rate_judgments,
    valid_judgment_indices,
)
from alignment import self_rewarding as sr
from alignment.dpo_stage import dpo_output
from alignment.pairs import build_pairs, group_by_prompt, tie_rate
from alignment.prompts import render
from alignment.self_rewarding import train_rows
from alignment.stages import Algorithm, Stage, Table, insert_after, replace_stage
# logprob mode: the reasoning is cut at "Winner:", this is appended, and the next token decides.
VERDICT_PREFIX = "\nWinner: Judgment"
VERDICT_TOKENS = {"A": " A", "B": " B"}
# How many prompt ids to list (beyond the count) in a stage's info for "all judgments agree".
LIST_LIMIT = 20


# --------------------------------------------------------------------------------- prompts
def judge_rubric() -> str:
    """The judge's additive 5-point rubric (prompts/judge_rubric.jinja), as the meta-judge sees it."""
    return render("judge_rubric")


def meta_judge_prompt(question: str, response: str, judgment_a: str, judgment_b: str) -> str:
    return render("meta_judge", question=question, response=response, rubric=judge_rubric(),
                  judgment_a=judgment_a, judgment_b=judgment_b)


# ----------------------------------------------------------------------------- pure stages
def meta_items(judge_rows: Sequence[dict]) -> tuple[list[dict], list[str]]:
    """(items to meta-judge, prompt ids whose judgments all agree).

    One item per prompt: its response with the highest judgment-score variance
    (:func:`alignment.meta_judge.pick_meta_response`), as ``prompt_id``, ``prompt``,
    ``response_index``, ``response``, ``judgments``, ``scores``. A prompt whose responses all
    have zero variance (or fewer than two scored judgments) yields no item: nothing for the
    meta-judge to separate, so no judge pair — reported, not an error.
    """
    items, agree = [], []
    for prompt_id, rows in group_by_prompt(judge_rows).items():
        row = pick_meta_response(rows)
        if row is None:
            agree.append(prompt_id)
            continue
        items.append({k: row[k] for k in ("prompt_id", "prompt", "response_index", "response", "judgments", "scores")})
    return items, agree


@dataclass(frozen=True)
class MetaJudgeSettings:
    mode: str = "free"  # free | logprob
    temperature: float = 0.7
    top_p: float = 0.9
    max_tokens: int = 512
    debias_position: bool = False  # logprob mode: subtract the prompt's mean log-odds before deciding
    min_verdict_mass: float = 0.0  # logprob mode: below this p(" A") + p(" B") the battle fails


def position_offsets(plan_keys: Sequence[str], odds: Sequence[float | None]) -> dict[str, float]:
    """Per prompt: the mean log-odds ℓ̄ over its battles — the meta-judge's position prior.

    Model: ℓ(i, j) = b + s_ij with s_ji = −s_ij (b: preference for whatever is shown first;
    s_ij: preference for judgment i over j). Every pair is asked in both orders, so the mean of
    ℓ over a prompt's battles is exactly b, and ℓ(i, j) − ℓ̄ = s_ij is the content preference.
    """
    sums: dict[str, list[float]] = collections.defaultdict(list)
    for key, value in zip(plan_keys, odds):
        if value is not None:
            sums[key].append(value)
    return {key: statistics.fmean(values) for key, values in sums.items()}


def meta_judge_battles(
    generator: Generator,
    items: Sequence[dict],
    settings: MetaJudgeSettings,
    *,
    adapter: str | None = None,
    seed: int = 0,
) -> list[dict]:
    """Every battle of every item (schema "meta_judge", one row per battle).

    For an item's scored judgments, :func:`alignment.meta_judge.battle_plan` gives each pair in
    both orders; judgment ``a`` is shown as "Judgment A". Row: ``prompt_id``,
    ``response_index``, ``a``, ``b`` (judgment indices), ``a_score``, ``b_score``, ``verdict``
    ("A" | "B" | None = failed battle), ``winner`` (the winning judgment index or None),
    ``mode`` ("parsed" | "logprob"), ``p_a``, ``p_b`` (logprob mode: probabilities of " A" and
    " B" after "Winner: Judgment"; when p_a + p_b < ``settings.min_verdict_mass`` the battle
    fails, as a judgment with too little digit mass does), ``offset`` (the position prior subtracted from the
    log-odds; 0 unless debiasing), ``text`` (the meta-judge's output) and ``length`` (its tokens).

    Position debiasing (``settings.debias_position``, logprob mode only) departs from the paper.
    The paper only re-weights hard verdicts (ω1, ω2 in :func:`alignment.meta_judge.position_weights`):
    a win in the favoured position counts less. A weak model that names the same position in
    every battle gives that position ω = 0, every rating ties and no judge pair is ever made
    (measured on the tiny random model: 24/24 battles "A"). The probabilities carry more than
    the argmax, so we remove the position prior first: the verdict is the sign of
    ℓ(a, b) − ℓ̄, ℓ̄ the prompt's mean log-odds (:func:`position_offsets`).
    """
    plan = [(item, a, b) for item in items for a, b in battle_plan(valid_judgment_indices(item))]
    if not plan:
        return []
    logprob = settings.mode == "logprob"
    convs = [[{"role": "user", "content": meta_judge_prompt(item["prompt"], item["response"],
                                                          item["judgments"][a], item["judgments"][b])}]
             for item, a, b in plan]
    sampling = Sampling(n=1, temperature=settings.temperature, top_p=settings.top_p,
                        max_tokens=settings.max_tokens, stop=("Winner:",) if logprob else ())
    # A battle's seed is its identity (prompt, judgment shown as A, as B): the same text
    # whatever the shard or batch it runs in.
    seeds = [derive_seed(seed, item["prompt_id"], a, b) for item, a, b in plan]
    completions = [per_conv[0] for per_conv in generator.chat(convs, sampling, adapter=adapter, seed=seeds)]
    probs: list[dict[str, float]] = [{} for _ in plan]
    offsets: dict[str, float] = {}
    if logprob:
        continued = [conv + [{"role": "assistant", "content": c.text.rstrip() + VERDICT_PREFIX}]
                     for conv, c in zip(convs, completions)]
        probs = generator.next_token_probs(continued, tuple(VERDICT_TOKENS.values()), adapter=adapter)
        if settings.debias_position:  # a battle that fails on mass is no evidence of the position prior
            offsets = position_offsets(
                [item["prompt_id"] for item, _, _ in plan],
                [log_odds(p.get(VERDICT_TOKENS["A"], 0.0), p.get(VERDICT_TOKENS["B"], 0.0))
                 if sum(p.values()) >= settings.min_verdict_mass else None for p in probs])
    rows = []
    for (item, a, b), c, p in zip(plan, completions, probs):
        offset = offsets.get(item["prompt_id"], 0.0)
        if logprob:
            p_a, p_b = p.get(VERDICT_TOKENS["A"], 0.0), p.get(VERDICT_TOKENS["B"], 0.0)
            verdict = verdict_from_probs(p_a, p_b, offset, min_mass=settings.min_verdict_mass)
            text = c.text.rstrip() + VERDICT_PREFIX + (f" {verdict}" if verdict else "")
            battle = {"a": a, "b": b, "verdict": verdict, "text": text}
        else:
            p_a = p_b = None
            battle = make_battle(a, b, c.text)
        rows.append({
            "prompt_id": item["prompt_id"],
            "response_index": item["response_index"],
            "a": a,
            "b": b,
            "a_score": item["scores"][a],
            "b_score": item["scores"][b],
            "verdict": battle["verdict"],
            "winner": {"A": a, "B": b}.get(battle["verdict"]),
            "mode": "logprob" if logprob else "parsed",
            "p_a": p_a,
            "p_b": p_b,
            "offset": offset,
            "text": battle["text"],
            "length": c.n_tokens,
        })
    return rows


def battle_stats(battles: Sequence[dict]) -> dict:
    wins_a, wins_b = position_wins(battles)
    failed = sum(1 for b in battles if b["verdict"] is None)
    return {
        "battles": len(battles),
        "failed_battles": failed,
        "failed_share": failed / len(battles) if battles else None,
        "wins_a": wins_a,
        "wins_b": wins_b,
        "modes": dict(collections.Counter(b["mode"] for b in battles)),
    }


def rate_items(
    items: Sequence[dict],
    battles: Sequence[dict],
    lengths: dict[tuple[str, int], list[int]],
    *,
    prior: float,
    pooled: bool,
    length_cap: int | None,
) -> list[dict]:
    """The Elo table: one row per judgment of each meta-judged response.

    Ratings come from :func:`alignment.meta_judge.rate_judgments` over the prompt's valid
    battles; ``pooled`` uses position weights (ω1, ω2) counted over all battles of the
    iteration instead of the prompt's own. Row: ``prompt_id``, ``response_index``,
    ``judgment_index``, ``score``, ``length`` (tokens), ``rating`` (None: in no valid battle),
    ``wins`` / ``losses`` (position-weighted), ``battles`` (valid ones it took part in),
    ``eligible`` (rated and within ``length_cap``: may become chosen/rejected), ``omega1``, ``omega2``.
    """
    by_prompt: dict[str, list[dict]] = collections.defaultdict(list)
    for b in battles:
        by_prompt[b["prompt_id"]].append(b)
    valid_all = [b for b in battles if b["verdict"] is not None]
    pooled_weights = position_weights(valid_all) if pooled else None
    rows = []
    for item in items:
        n = len(item["judgments"])
        mine = [b for b in by_prompt.get(item["prompt_id"], []) if b["verdict"] is not None]
        weights = pooled_weights or position_weights(mine)
        ratings = rate_judgments(mine, n, prior=prior, weights=weights)
        matrix = battle_scores(mine, n, weights)
        played = collections.Counter([b["a"] for b in mine] + [b["b"] for b in mine])
        lens = lengths[(item["prompt_id"], item["response_index"])]
        for j in range(n):
            rows.append({
                "prompt_id": item["prompt_id"],
                "response_index": item["response_index"],
                "judgment_index": j,
                "score": item["scores"][j],
                "length": lens[j],
                "rating": ratings[j],
                "wins": sum(matrix[j]),
                "losses": sum(matrix[k][j] for k in range(n)),
                "battles": played.get(j, 0),
                "eligible": ratings[j] is not None and (length_cap is None or lens[j] <= length_cap),
                "omega1": weights[0],
                "omega2": weights[1],
            })
    return rows


def build_judge_pair_rows(items: Sequence[dict], elo_rows: Sequence[dict], length_cap: int | None) -> tuple[list[dict], dict]:
    """Judge-training rows (schema "judge_pairs") from the Elo table, and counts.

    Per item: :func:`alignment.meta_judge.judge_pair` over the ratings (chosen = highest rating,
    rejected = lowest, judgments over ``length_cap`` excluded). The row's ``prompt`` is the judge
    prompt of the meta-judged response, so DPO teaches the judge which judgment to write.
    Row: ``prompt_id``, ``response_index``, ``prompt``, ``chosen``, ``rejected``,
    ``chosen_index``, ``rejected_index``, ``chosen_rating``, ``rejected_rating``,
    ``chosen_score``, ``rejected_score``, ``chosen_length``, ``rejected_length``.
    """
    elo = collections.defaultdict(dict)
    for r in elo_rows:
        elo[r["prompt_id"]][r["judgment_index"]] = r
    rows, no_pair, over_cap = [], 0, 0
    for item in items:
        table = elo.get(item["prompt_id"], {})
        n = len(item["judgments"])
        ratings = [table[j]["rating"] if j in table else None for j in range(n)]
        lengths = [table[j]["length"] if j in table else 0 for j in range(n)]
        over_cap += sum(1 for j in range(n) if ratings[j] is not None and length_cap is not None
                        and lengths[j] > length_cap)
        pair = judge_pair(ratings, item["judgments"], lengths, length_cap)
        if pair is None:
            no_pair += 1
            continue
        c, r = pair["chosen_index"], pair["rejected_index"]
        rows.append({
            "prompt_id": item["prompt_id"],
            "response_index": item["response_index"],
            "prompt": judge_prompt(item["prompt"], item["response"]),
            "chosen": pair["chosen"],
            "rejected": pair["rejected"],
            "chosen_index": c,
            "rejected_index": r,
            "chosen_rating": pair["chosen_rating"],
            "rejected_rating": pair["rejected_rating"],
            "chosen_score": item["scores"][c],
            "rejected_score": item["scores"][r],
            "chosen_length": lengths[c],
            "rejected_length": lengths[r],
        })
    stats = {
        "meta_prompts": len(items),
        "judge_pairs": len(rows),
        "no_pair": no_pair,
        "over_cap_judgments": over_cap,
        "length_cap": length_cap,
        "chosen_mean_length": _mean([r["chosen_length"] for r in rows]),
        "rejected_mean_length": _mean([r["rejected_length"] for r in rows]),
    }
    return rows, stats


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _per_response_mean(values: Sequence[float | None]) -> float | None:
    valid = [float(v) for v in values if v is not None]
    return statistics.fmean(valid) if valid else None


def tie_rates(judge_rows: Sequence[dict]) -> dict:
    """Tie rate (share of prompts whose top two responses score the same) under each score mode.

    Same judgments, three scalars per response: ``mean_score`` (what the pairs used),
    the mean of the integer scores ``score_ints`` (the paper's 5-point score: parsed, or the
    argmax digit in logprob mode) and the mean of ``expected_scores`` (logprob mode only; None
    otherwise). See :func:`alignment.pairs.tie_rate`.
    """
    rows = [{"prompt_id": r["prompt_id"],
             "used": r["mean_score"],
             "int": _per_response_mean(r["score_ints"]),
             "expected": _per_response_mean(r.get("expected_scores") or [])} for r in judge_rows]
    return {"tie_rate": tie_rate(rows, "used"), "tie_rate_int": tie_rate(rows, "int"),
            "tie_rate_expected": tie_rate(rows, "expected")}


def length_stats(pair_rows: Sequence[dict], judge_rows: Sequence[dict]) -> dict:
    """Chosen / rejected mean lengths (tokens) of the actor pairs, against all responses."""
    chosen = _mean([p["chosen_length"] for p in pair_rows])
    rejected = _mean([p["rejected_length"] for p in pair_rows])
    return {
        "chosen_mean_length": chosen,
        "rejected_mean_length": rejected,
        "length_gap": None if chosen is None or rejected is None else chosen - rejected,
        "response_mean_length": _mean([r["length"] for r in judge_rows]),
    }


# ---------------------------------------------------------------------------------- stages
def compute_pairs(run, t: int, ctx) -> Table:
    """Actor pairs with this iteration's ρ; tie rates under both score modes; length stats."""
    judged = run.store.read_rows(t, "judge")
    rows, stats = build_pairs(judged, rho=run.recipe.pairs.rho_for(t))
    return Table(rows, stats | tie_rates(judged) | length_stats(rows, judged))


def report_pairs(run, t: int, s: dict) -> None:
    run.log(f"iter {t} pairs (rho={s['rho']}): {s['pairs']} pairs from {s['prompts']} prompts "
            f"({s['ties']} ties, {s['unscored']} unscored); chosen/rejected mean length "
            f"{_fmt(s['chosen_mean_length'])}/{_fmt(s['rejected_mean_length'])} tokens "
            f"(all responses {_fmt(s['response_mean_length'])}); tie rate int {_fmt(s['tie_rate_int'], 2)}, "
            f"expected {_fmt(s['tie_rate_expected'], 2)}")


def judge_training_off(run, t: int, stage: str) -> Table:
    """The empty table a meta stage commits in an iteration that does not train the judge."""
    run.log(f"iter {t} {stage}: judge training is off in this iteration "
            f"(meta_judge.train_judge_iterations={run.recipe.meta_judge.train_judge_iterations}); nothing to do")
    return Table([], {"judge_training": False})


def compute_meta_judge(run, t: int, ctx) -> Table:
    """M_t compares every pair of judgments of each prompt's most-disputed response, both orders."""
    if not run.recipe.trains_judge(t):
        return judge_training_off(run, t, "meta_judge")
    m = run.recipe.meta_judge
    settings = MetaJudgeSettings(mode=m.mode, temperature=m.temperature, top_p=m.top_p, max_tokens=m.max_tokens,
                                 debias_position=m.debias_position, min_verdict_mass=m.min_verdict_mass)
    items, agree = meta_items(run.store.read_rows(t, "judge"))
    adapter = run.model(t).adapter
    # One item per prompt; a shard is shard_size prompts (each k(k-1) meta-judge calls).
    rows = ctx.shards(items, lambda chunk, i: meta_judge_battles(
        run.generator(), chunk, settings, adapter=adapter, seed=derive_seed(run.recipe.seed, t, "meta_judge")))
    stats = {"judge_training": True, "prompts": len(items) + len(agree), "meta_prompts": len(items),
             "all_agree": len(agree), "all_agree_ids": agree[:LIST_LIMIT]} | battle_stats(rows)
    if agree:
        run.log(f"iter {t} meta_judge: {len(agree)} prompts have judgments that all agree: no judge pair "
                f"from them (e.g. {', '.join(agree[:3])})")
    run.log(f"iter {t} meta_judge: {stats['battles']} battles over {len(items)} prompts, "
            f"{stats['failed_battles']} failed (no verdict); position wins A/B {stats['wins_a']}/{stats['wins_b']}")
    return Table(rows, stats)


def compute_elo(run, t: int, ctx) -> Table:
    """Position-weighted Bradley–Terry (Elo-scale) ratings of each meta-judged response's judgments."""
    if not run.recipe.trains_judge(t):
        return judge_training_off(run, t, "elo")
    m = run.recipe.meta_judge
    items, agree = meta_items(run.store.read_rows(t, "judge"))
    battles = run.store.read_rows(t, "meta_judge")
    # The judge table keeps judgment texts, not their lengths.
    lengths = {(i["prompt_id"], i["response_index"]): run.token_lengths(i["judgments"]) for i in items}
    rows = rate_items(items, battles, lengths, prior=m.prior, pooled=m.position_weights == "iteration",
                      length_cap=m.length_cap)
    rated = [r for r in rows if r["rating"] is not None]
    return Table(rows, {"judge_training": True, "meta_prompts": len(items), "all_agree": len(agree),
                        "judgments": len(rows), "rated": len(rated), "eligible": sum(r["eligible"] for r in rows),
                        "rating_spread_mean": _mean(_spreads(rows))})


def compute_judge_pairs(run, t: int, ctx) -> Table:
    """Highest- vs lowest-rated judgment per prompt: the judge's DPO pairs."""
    if not run.recipe.trains_judge(t):
        return judge_training_off(run, t, "judge_pairs")
    items, agree = meta_items(run.store.read_rows(t, "judge"))
    rows, stats = build_judge_pair_rows(items, run.store.read_rows(t, "elo"), run.recipe.meta_judge.length_cap)
    return Table(rows, {"judge_training": True, "prompts": len(items) + len(agree), "all_agree": len(agree)} | stats)


def report_judge_pairs(run, t: int, s: dict) -> None:
    if not s.get("judge_training"):
        return
    run.log(f"iter {t} judge_pairs: {s['judge_pairs']} judge pairs from {s['prompts']} prompts "
            f"({s['all_agree']} all-agree, {s['no_pair']} without a preference); chosen/rejected judgment "
            f"length {_fmt(s['chosen_mean_length'])}/{_fmt(s['rejected_mean_length'])} tokens")
    if s["judge_pairs"] == 0:
        run.log(f"WARNING iter {t} judge_pairs: no judge pairs; this iteration trains the actor only")


def judge_training_rows(run, t: int) -> list[dict]:
    """The judge pairs of iteration t as DPO rows (none when it does not train the judge)."""
    if not run.recipe.trains_judge(t):
        return []
    return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in run.store.read_rows(t, "judge_pairs")]


def compute_train(run, t: int, ctx):
    """One DPO step on the actor pairs and (in judge-training iterations) the judge pairs."""
    rows, applied = train_rows(run, t)
    rows += [r | {"kind": "judge"} for r in judge_training_rows(run, t)]
    return dpo_output(run, t, ctx, rows, beta=run.recipe.train.beta, info={"corrections": applied})


def judge_training(run, t: int) -> dict:
    """Whether iteration t trains the judge (the meta stages commit empty tables when not)."""
    return {"on": run.recipe.trains_judge(t)}


def meta_judge_inputs(run, t: int) -> dict:
    on = run.recipe.trains_judge(t)
    return {"judge_training": str(on)} | ({"model": run.model_hash(t)} if on else {})  # M_t meta-judges


def train_inputs(run, t: int) -> dict:
    return {"judge_pairs": run.store.output_hash(t, "judge_pairs")} if run.recipe.trains_judge(t) else {}


MJ = "meta_judge."
PAIRS = Stage("pairs", compute_pairs, reads=("judge",), settings=lambda run, t: {"rho": run.recipe.pairs.rho_for(t)},
              report=report_pairs)
META_JUDGE = Stage("meta_judge", compute_meta_judge, reads=("judge",), inputs=meta_judge_inputs, sharded=True,
                   fields=tuple(MJ + f for f in ("mode", "temperature", "top_p", "max_tokens", "debias_position",
                                                 "min_verdict_mass")), settings=judge_training)
ELO = Stage("elo", compute_elo, reads=("judge", "meta_judge"), settings=judge_training,
            fields=(MJ + "prior", MJ + "position_weights", MJ + "length_cap"))
JUDGE_PAIRS = Stage("judge_pairs", compute_judge_pairs, reads=("judge", "elo"), fields=(MJ + "length_cap",),
                    settings=judge_training, report=report_judge_pairs)
TRAIN = replace(sr.TRAIN, compute=compute_train, inputs=train_inputs)

META_REWARDING = Algorithm(
    "meta-rewarding",
    # Self-Rewarding's stages, its pairs with ρ_t, the three judge-training stages, and both pair sets trained.
    insert_after(replace_stage(replace_stage(sr.SELF_REWARDING.stages, PAIRS), TRAIN), "pairs",
                 (META_JUDGE, ELO, JUDGE_PAIRS)),
    metrics=lambda run, t: metrics(run, t),
    needs_lora=sr.SELF_REWARDING.needs_lora, lora_rank=sr.SELF_REWARDING.lora_rank,
)


# ---------------------------------------------------------------------------------- reporting
def metrics(run, t: int) -> dict:
    """Self-Rewarding's metrics plus the meta stages' info and the length stats of iteration t."""
    out = sr.iteration_metrics(run, t)
    for stage in ("meta_judge", "elo", "judge_pairs"):
        manifest = run.store.manifest(t, stage)
        out[stage] = manifest["info"] if manifest else None
    p, jp = out["pairs"], out["judge_pairs"] or {}
    out["length"] = {
        "iteration": t, "rho": p.get("rho"), "actor_pairs": p.get("pairs"),
        "chosen_mean_length": p.get("chosen_mean_length"), "rejected_mean_length": p.get("rejected_mean_length"),
        "length_gap": p.get("length_gap"), "response_mean_length": p.get("response_mean_length"),
        "judge_pairs": jp.get("judge_pairs", 0),
        "judge_chosen_mean_length": jp.get("chosen_mean_length"),
        "judge_rejected_mean_length": jp.get("rejected_mean_length"),
    }
    run.store.write_json(t, "metrics.json", out)
    return out


def _spreads(elo_rows: Sequence[dict]) -> list[float]:
    """max − min rating per prompt (how decisive the meta-judge was)."""
    by_prompt: dict[str, list[float]] = collections.defaultdict(list)
    for r in elo_rows:
        if r["rating"] is not None:
            by_prompt[r["prompt_id"]].append(r["rating"])
    return [max(v) - min(v) for v in by_prompt.values() if len(v) > 1]


def _fmt(x, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"
