"""SPIN (Chen et al., 2024): self-play fine-tuning from an SFT dataset alone.

Iteration t (M_1 = the recipe's model):

    y′ ~ M_t(·|x) for every training prompt x            (generate)
    pairs {x, chosen = y (the real SFT answer), rejected = y′}, dropping y′ == y,
    plus the previous iteration's pairs ("mixing")       (pairs)
    M_{t+1} = argmin SPIN loss with M_t as the reference  (train)
    held-out log-likelihood of y under M_t and M_{t+1}; win rate of M_{t+1} over M_t  (eval)

Reference model with LoRA: the policy is trained as a LoRA adapter on the frozen base, and the
reference must be exactly M_t. In iteration 1, M_1 is the base: a fresh adapter (B = 0) is added
and TRL computes the reference with adapters disabled. From iteration 2 on, M_t = base +
adapter_{t−1}: we load adapter_{t−1} as the *trainable* adapter and TRL's DPOTrainer adds a
frozen copy of it named ``ref`` through which it computes the reference log-probs (see
``alignment.training``). So the policy starts at M_t, the reference stays M_t, and at step 0
their log-probs are equal (loss = ln 2, reward margins 0; tested). The alternative — merging
adapter_{t−1} into the base and adding a new adapter — would need a new base per iteration and
one vLLM engine per base; this way every M_t is a delta on the same base, served by one engine.

The pure functions (data loading, split, pairs, mixing, the loss) hold the algorithm; ``SPIN``
declares its stages (``alignment.stages``), which the executor runs over the run directory (skip
when current, shard long work); nothing here imports Prefect.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import statistics
from pathlib import Path
from typing import Sequence

from alignment.actor import generate_responses
from alignment.config import result_dump
from alignment.dpo_stage import dpo_output
from alignment.files import sha256_file
from alignment.generation import Sampling, derive_seed
from alignment.judge import JudgeSettings, judge_responses
from alignment.spin_data import load_sft
from alignment.stages import Algorithm, Stage, Table


# --------------------------------------------------------------------------------------- data
def split_heldout(rows: Sequence[dict], fraction: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held-out): the held-out prompts are those with the smallest hash of (seed, prompt_id).

    Hash-based, not positional: a prompt stays on the same side when rows are added or reordered.
    ``round(fraction · n)`` prompts are held out (at least 1 when fraction > 0), never all of them.
    """
    n = len(rows)
    k = 0 if fraction <= 0 or n < 2 else min(n - 1, max(1, round(fraction * n)))
    rank = sorted(rows, key=lambda r: hashlib.sha256(f"{seed}:{r['prompt_id']}".encode()).hexdigest())
    held = {r["prompt_id"] for r in rank[:k]}
    return [r for r in rows if r["prompt_id"] not in held], [r for r in rows if r["prompt_id"] in held]


def _norm(text: str) -> str:
    return " ".join(text.split())


def build_spin_pairs(data: Sequence[dict], generated: Sequence[dict], iteration: int) -> tuple[list[dict], dict]:
    """One pair per generated y′: ``{prompt, chosen = real answer, rejected = y′}``.

    A y′ equal to the real answer (whitespace-normalised) is dropped: the pair has no signal,
    and the paper's stopping point is exactly p_θ = p_data. ``generated_in`` records the
    iteration whose model wrote y′ (for mixing).
    """
    answers = {r["prompt_id"]: r["answer"] for r in data}
    pairs, identical, unknown = [], 0, 0
    for g in generated:
        answer = answers.get(g["prompt_id"])
        if answer is None:
            unknown += 1
            continue
        if _norm(g["response"]) == _norm(answer):
            identical += 1
            continue
        pairs.append({
            "prompt_id": g["prompt_id"], "prompt": g["prompt"], "chosen": answer, "rejected": g["response"],
            "rejected_index": int(g["response_index"]), "rejected_length": int(g["length"]), "generated_in": iteration,
        })
    stats = {"generated": len(generated), "new_pairs": len(pairs), "identical_dropped": identical,
             "unknown_prompt": unknown, "prompts": len({p["prompt_id"] for p in pairs})}
    return pairs, stats


def mix_previous(current: Sequence[dict], previous: Sequence[dict], iteration: int) -> list[dict]:
    """The paper's data mixing: iteration t trains on its own synthetic pairs plus those generated
    in iteration t−1 (only those: the previous table's own mix of t−2 is not carried further)."""
    return list(current) + [p for p in previous if p["generated_in"] == iteration - 1]


# --------------------------------------------------------------------------------------- loss
def spin_loss(
    policy_chosen_logps: Sequence[float] | float,
    policy_rejected_logps: Sequence[float] | float,
    ref_chosen_logps: Sequence[float] | float,
    ref_rejected_logps: Sequence[float] | float,
    beta: float,
    loss_type: str = "sigmoid",
) -> float:
    """Mean SPIN loss over a batch of pairs, from sequence log-probabilities.

        Δ = (log p_θ(y|x) − log p_t(y|x)) − (log p_θ(y′|x) − log p_t(y′|x))
        sigmoid (the paper's logistic ℓ(u) = log(1 + e^{−u})):  L = −log σ(β·Δ) = log(1 + e^{−β·Δ})
        hinge:                                                  L = max(0, 1 − β·Δ)

    with y the real answer, y′ ~ p_t the previous model's own answer, p_θ the policy and p_t = M_t
    the reference. This is TRL's DPO loss with ``loss_type`` sigmoid / hinge (label smoothing 0);
    the reference function the tests check TRL's training logs against.
    """
    def seq(x):
        return [float(v) for v in x] if isinstance(x, (list, tuple)) else [float(x)]

    pc, pr, rc, rr = map(seq, (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps))
    if not (len(pc) == len(pr) == len(rc) == len(rr)) or not pc:
        raise ValueError("spin_loss: the four log-prob sequences must be non-empty and of equal length")
    losses = []
    for a, b, c, d in zip(pc, pr, rc, rr):
        u = beta * ((a - c) - (b - d))
        if loss_type == "sigmoid":
            # log(1 + e^{-u}) computed stably for large |u|
            losses.append(max(-u, 0.0) + math.log1p(math.exp(-abs(u))))
        elif loss_type == "hinge":
            losses.append(max(0.0, 1.0 - u))
        else:
            raise ValueError(f"spin_loss: unknown loss_type {loss_type!r}")
    return sum(losses) / len(losses)


# --------------------------------------------------------------------------------------- eval
def answer_logliks(base: str, adapters: Sequence[str | None], rows: Sequence[dict], *, batch_size: int = 8,
                   max_length: int = 2048) -> list[list[dict]]:
    """log p(answer | prompt) under base (+ each adapter), by a transformers forward pass.

    The prompt is the chat template with the generation prompt; the answer tokens are everything
    the template adds after it for the assistant turn (the answer and its end-of-turn token),
    as TRL scores a completion. Returns, per entry of ``adapters`` (None = the base alone), a
    ``{"loglik": sum, "tokens": n}`` per row. The base is loaded once: PEFT switches between the
    adapters (the eval reads M_t and M_{t+1}; a 70B base loads in minutes).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16 if on_gpu else torch.float32)
    names = {a: f"adapter_{i}" for i, a in enumerate(dict.fromkeys(a for a in adapters if a))}
    if names:
        from peft import PeftModel

        first, *rest = names
        model = PeftModel.from_pretrained(model, first, adapter_name=names[first])
        for path in rest:
            model.load_adapter(path, adapter_name=names[path])
    model = model.to(device).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def ids(messages, gen_prompt: bool) -> list[int]:
        out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen_prompt, return_dict=True)
        return list(out["input_ids"])

    encoded = []
    for r in rows:
        user = [{"role": "user", "content": r["prompt"]}]
        p = ids(user, True)
        full = ids(user + [{"role": "assistant", "content": r["answer"]}], False)
        start = 0
        while start < min(len(p), len(full)) and p[start] == full[start]:
            start += 1
        full = full[:max_length]
        encoded.append((full, min(start, len(full) - 1)))

    def logliks() -> list[dict]:
        results = []
        for i in range(0, len(encoded), batch_size):
            batch = encoded[i : i + batch_size]
            width = max(len(f) for f, _ in batch)
            input_ids = torch.tensor([f + [pad] * (width - len(f)) for f, _ in batch], device=device)
            attention = torch.tensor([[1] * len(f) + [0] * (width - len(f)) for f, _ in batch], device=device)
            with torch.no_grad():
                logits = model(input_ids=input_ids, attention_mask=attention).logits.float()
            logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            for row, (f, start) in zip(logps, batch):
                # token j (j >= start) is predicted at position j-1
                tokens = row[start - 1 : len(f) - 1] if start > 0 else row[: len(f) - 1]
                results.append({"loglik": float(tokens.sum()), "tokens": int(tokens.numel())})
        return results

    out = []
    for adapter in adapters:
        if adapter:
            model.set_adapter(names[adapter])
        with model.disable_adapter() if names and not adapter else contextlib.nullcontext():
            out.append(logliks())
    return out


def outcome(before: float | None, after: float | None) -> str:
    """Head-to-head result of M_{t+1}'s answer (after) against M_t's (before) by judge score."""
    if before is None or after is None:
        return "unscored"
    return "win" if after > before else "loss" if after < before else "tie"


def eval_summary(rows: Sequence[dict]) -> dict:
    """Held-out means and the win rate (ties count half; unscored prompts excluded)."""
    out: dict = {"heldout": len(rows)}
    if not rows:
        return out
    for side in ("before", "after"):
        total = sum(r[f"loglik_{side}"] for r in rows)
        tokens = sum(r["answer_tokens"] for r in rows)
        out[f"loglik_{side}"] = total / len(rows)
        out[f"loglik_per_token_{side}"] = total / max(1, tokens)
    counts = {k: sum(1 for r in rows if r.get("outcome") == k) for k in ("win", "tie", "loss", "unscored")}
    scored = counts["win"] + counts["tie"] + counts["loss"]
    out.update(wins=counts["win"], ties=counts["tie"], losses=counts["loss"], unscored=counts["unscored"],
               win_rate=(counts["win"] + 0.5 * counts["tie"]) / scored if scored else None)
    for side in ("before", "after"):
        s = [r[f"score_{side}"] for r in rows if r.get(f"score_{side}") is not None]
        out[f"mean_score_{side}"] = statistics.fmean(s) if s else None
    return out


# ------------------------------------------------------------------------------------ stages
def heldout_split(run, t: int, split: str) -> list[dict]:
    """The ``train`` or ``heldout`` rows of the data stage."""
    return [r for r in run.store.read_rows(t, "data") if r["split"] == split]


def compute_data(run, t: int, ctx) -> Table:
    """The SFT set split into train / held-out (the same in every iteration)."""
    cfg = run.recipe.data
    rows = load_sft(cfg)
    train, held = split_heldout(rows, cfg.heldout_fraction, run.recipe.seed)
    held_ids = {r["prompt_id"] for r in held}
    out = [r | {"split": "heldout" if r["prompt_id"] in held_ids else "train"} for r in rows]
    return Table(out, {"prompts": len(rows), "train": len(train), "heldout": len(held)})


def data_inputs(run, t: int) -> dict:
    source = Path(run.recipe.data.source)
    return {"source": sha256_file(source) if source.is_file() else run.recipe.data.source}


def compute_generate(run, t: int, ctx) -> Table:
    """y′ ~ M_t for every training prompt (sharded: a kill loses at most one shard)."""
    g = run.recipe.generation
    sampling = Sampling(n=g.n, temperature=g.temperature, top_p=g.top_p, max_tokens=g.max_tokens)
    prompts = heldout_split(run, t, "train")
    adapter = run.model(t).adapter
    rows = ctx.shards(prompts, lambda chunk, i: generate_responses(
        run.generator(), chunk, sampling, adapter=adapter, seed=derive_seed(run.recipe.seed, t, "spin-gen")))
    return Table(rows, {"responses": len(rows), "prompts": len(prompts)})


def mixes(run, t: int) -> bool:
    return run.recipe.train.mix_previous and t > 1


def compute_pairs(run, t: int, ctx) -> Table:
    rows, stats = build_spin_pairs(heldout_split(run, t, "train"), run.store.read_rows(t, "generate"), t)
    if mixes(run, t):
        rows = mix_previous(rows, run.store.read_rows(t - 1, "pairs"), t)
    stats |= {"pairs": len(rows), "mixed_pairs": len(rows) - stats["new_pairs"],
              "rejected_mean_length": statistics.fmean(r["rejected_length"] for r in rows) if rows else None}
    return Table(rows, stats)


def report_pairs(run, t: int, stats: dict) -> None:
    run.log(f"iter {t} pairs: {stats['pairs']} pairs ({stats['new_pairs']} new, {stats['mixed_pairs']} from "
            f"iteration {t - 1}; {stats['identical_dropped']} dropped as y′ == answer)")


def compute_train(run, t: int, ctx):
    """SPIN loss (DPO against M_t) on this iteration's pairs → adapter of M_{t+1}."""
    tc = run.recipe.train
    beta = tc.beta_for(t)
    rows = [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in run.store.read_rows(t, "pairs")]
    return dpo_output(run, t, ctx, rows, beta=beta, loss_type=tc.loss_type,
                      info={"beta": beta, "loss_type": tc.loss_type},
                      empty_reason="no pairs (every y′ equals its answer)")


def train_settings(run, t: int) -> dict:
    """The train section with this iteration's β only: editing a later iteration's β must not redo this one."""
    return {"train": {k: v for k, v in result_dump(run.recipe.train).items() if k != "beta"},
            "beta": run.recipe.train.beta_for(t)}


def compute_eval(run, t: int, ctx) -> Table:
    """Held-out: log-likelihood of the real answers under M_t and M_{t+1}; win rate of
    M_{t+1}'s answers over M_t's by the project's judge, run by the base model (fixed judge)."""
    ev = run.recipe.eval
    held = heldout_split(run, t, "heldout")[: ev.max_prompts] if ev.enabled else []
    if not held:
        run.log(f"iter {t} eval: no held-out prompts (data.heldout_fraction 0 or eval disabled); skipped")
        return Table([], eval_summary([]))
    before, after = run.model(t), run.model(t + 1)
    kw = dict(batch_size=ev.batch_size, max_length=run.recipe.train.max_length)
    ll_before, ll_after = answer_logliks(run.base.base, [before.adapter, after.adapter], held, **kw)
    rows = [{"prompt_id": r["prompt_id"], "prompt": r["prompt"], "answer": r["answer"],
             "answer_tokens": a["tokens"], "loglik_before": a["loglik"], "loglik_after": b["loglik"],
             "response_before": None, "response_after": None, "score_before": None, "score_after": None,
             "outcome": "unscored"}
            for r, a, b in zip(held, ll_before, ll_after)]
    if ev.win_rate:
        sampling = Sampling(n=1, temperature=ev.temperature, top_p=ev.top_p, max_tokens=ev.max_tokens)
        j = ev.judge
        settings = JudgeSettings(n=j.n, mode=j.mode, score=j.score, temperature=j.temperature, top_p=j.top_p,
                                 max_tokens=j.max_tokens, min_digit_mass=j.min_digit_mass)
        gen = run.generator()
        # All answers first, then all judgments: an engine serving merged adapters restarts
        # only when the model changes (M_t, M_{t+1}, then the base judge). Per-request seeds
        # make the order irrelevant to the result.
        answers = {side: generate_responses(gen, held, sampling, adapter=model.adapter,
                                            seed=derive_seed(run.recipe.seed, t, "spin-eval"))
                   for side, model in (("before", before), ("after", after))}
        for side in ("before", "after"):
            judged = judge_responses(gen, answers[side], settings, adapter=None,
                                     seed=derive_seed(run.recipe.seed, t, "spin-eval-judge", side))
            for row, a in zip(rows, judged):
                row[f"response_{side}"] = a["response"]
                row[f"score_{side}"] = a["mean_score"]
        for row in rows:
            row["outcome"] = outcome(row["score_before"], row["score_after"])
    return Table(rows, eval_summary(rows) | {"model_before": before.label, "model_after": after.label})


def report_eval(run, t: int, info: dict) -> None:
    if info.get("heldout"):
        wr = info.get("win_rate")
        run.log(f"iter {t} eval on {info['heldout']} held-out prompts: log-likelihood per answer token "
                f"M_{t} {info['loglik_per_token_before']:.4f} -> M_{t + 1} {info['loglik_per_token_after']:.4f}; "
                f"win rate of M_{t + 1} over M_{t} {'–' if wr is None else f'{wr:.2f}'}")


def metrics(run, t: int) -> dict:
    """Per-iteration metrics (``iter_<t>/metrics.json``): counts, training curve, held-out eval.

    The held-out numbers are also top-level keys, so the review app's overview shows them.
    """
    def info(stage):
        m = run.store.manifest(t, stage)
        return m["info"] if m else None

    train = info("train")
    out = {"iteration": t, "model": run.model(t).label, "data": info("data"), "generate": info("generate"),
           "pairs": info("pairs"), "train": train, "eval": info("eval")}
    adapter = run.adapter(t) if train and train.get("trained") else None
    if adapter and Path(adapter, "train_metrics.json").is_file():
        out["train_metrics"] = json.loads(Path(adapter, "train_metrics.json").read_text())
    ev = out["eval"] or {}
    out |= {"heldout_loglik_per_token_before": ev.get("loglik_per_token_before"),
            "heldout_loglik_per_token_after": ev.get("loglik_per_token_after"),
            "win_rate": ev.get("win_rate")}
    run.store.write_json(t, "metrics.json", out)
    return out


SPIN = Algorithm("spin", (
    Stage("data", compute_data, fields=("data",), inputs=data_inputs),
    Stage("generate", compute_generate, reads=("data",), model=True, fields=("generation",), sharded=True),
    Stage("pairs", compute_pairs, reads=("data", "generate"), settings=lambda run, t: {"mix": mixes(run, t)},
          inputs=lambda run, t: {"previous": run.store.output_hash(t - 1, "pairs")} if mixes(run, t) else {},
          report=report_pairs),
    Stage("train", compute_train, reads=("pairs",), model=True, settings=train_settings, gated=True,
          releases_engine=lambda recipe: recipe.train.release_engine),
    Stage("eval", compute_eval, reads=("data",), fields=("eval",), report=report_eval,
          settings=lambda run, t: {"max_length": run.recipe.train.max_length},
          inputs=lambda run, t: {"before": run.model_hash(t), "after": run.model_hash(t + 1)}),
), metrics=metrics, needs_lora=lambda run: True,  # the eval stage serves the adapter trained in the same iteration
    lora_rank=lambda recipe: recipe.train.lora.r)


def training_curve(metrics: dict) -> list[dict]:
    """Rows of the training curve (loss, reward margin, chosen/rejected log-probs) per logged step."""
    curve = (metrics.get("train_metrics") or {}).get("curve") or []
    return [{"step": c.get("step"), "loss": c.get("loss"), "reward_margin": c.get("rewards/margins"),
             "logps_chosen": c.get("logps/chosen"), "logps_rejected": c.get("logps/rejected")} for c in curve]


def summary_markdown(metrics: dict) -> str:
    """Markdown summary of one SPIN iteration from its ``metrics.json``."""
    def f(x, d=4):
        return "–" if x is None else f"{x:.{d}f}" if isinstance(x, float) else str(x)

    t = metrics["iteration"]
    p, tr, ev = metrics.get("pairs") or {}, metrics.get("train") or {}, metrics.get("eval") or {}
    tm = metrics.get("train_metrics") or {}
    curve = training_curve(metrics)
    lines = [
        f"# SPIN iteration {t}", f"Opponent / reference M_{t}: `{metrics['model']}`", "",
        "| pairs | new | mixed from t−1 | dropped (y′ = y) | β | loss type | steps | train loss |",
        "|---|---|---|---|---|---|---|---|",
        f"| {p.get('pairs')} | {p.get('new_pairs')} | {p.get('mixed_pairs')} | {p.get('identical_dropped')} "
        f"| {tr.get('beta')} | {tr.get('loss_type', '–')} | {tm.get('steps', '–')} | {f(tm.get('train_loss'))} |",
    ]
    if curve:
        first, last = curve[0], curve[-1]
        lines += ["", "| step | loss | reward margin | log p(y) | log p(y′) |", "|---|---|---|---|---|"]
        lines += [f"| {c['step']} | {f(c['loss'])} | {f(c['reward_margin'])} | {f(c['logps_chosen'], 2)} "
                  f"| {f(c['logps_rejected'], 2)} |" for c in (first, last)]
    if not tr.get("trained", True):
        lines += ["", "**No pairs: training skipped.**"]
    if ev.get("heldout"):
        lines += ["", f"## Held-out evaluation ({ev['heldout']} prompts)", "",
                  f"| | M_{t} | M_{t + 1} |", "|---|---|---|",
                  f"| log-likelihood of real answers (per token) | {f(ev.get('loglik_per_token_before'))} "
                  f"| {f(ev.get('loglik_per_token_after'))} |",
                  f"| log-likelihood of real answers (per answer) | {f(ev.get('loglik_before'), 2)} "
                  f"| {f(ev.get('loglik_after'), 2)} |",
                  f"| mean judge score | {f(ev.get('mean_score_before'), 2)} | {f(ev.get('mean_score_after'), 2)} |",
                  "", f"Win rate of M_{t + 1} over M_{t}: {f(ev.get('win_rate'), 2)} "
                  f"({ev.get('wins')} wins, {ev.get('ties')} ties, {ev.get('losses')} losses, {ev.get('unscored')} unscored)"]
    return "\n".join(lines)
