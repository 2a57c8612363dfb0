"""Prefect flow ``perl``: prompts → preferences → LoRA reward model → LoRA PPO → before/after eval.

The stage list of ``alignment.perl`` as tasks (``flows.stage_flow``): a resume (same command,
or ``selfalign resume RUN``) skips finished stages, and PPO continues from its last checkpoint.
Artifacts: the reward model's held-out accuracy and trainable share, the PPO reward and KL
curves per step, and sample generations of the initial and the PPO policy side by side.
"""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from alignment.perl import samples
from flows.common import artifact_key
from flows.stage_flow import Presentation, run_stages

def _f(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def summary_markdown(m: dict) -> str:
    lines = [f"# PERL run: {m['model']}", ""]
    rm = m.get("reward_model")
    if rm:
        tr = rm.get("trainable") or {}
        acc_b, acc = rm.get("heldout_accuracy_before"), rm.get("heldout_accuracy")
        lines += ["## Reward model (LoRA)", "",
                  f"- pairs: {rm.get('pairs')} train, {rm.get('heldout_pairs')} held out; {rm.get('steps')} steps, "
                  f"final train loss {_f(rm.get('train_loss'), 4)}",
                  f"- **held-out pairwise accuracy: {_pct(acc_b)} (untrained head) → {_pct(acc)}**",
                  f"- trainable parameters: {tr.get('trainable', 0):,} of {tr.get('total', 0):,} "
                  f"({100 * (tr.get('share') or 0):.3f}%)", ""]
    ppo = m.get("ppo")
    if ppo:
        curve = ppo.get("curve") or []
        tp = ppo.get("trainable_policy") or {}
        lines += ["## PPO (LoRA policy and value)", "",
                  f"- reward source: {ppo.get('reward_source')}; {ppo.get('steps')} steps",
                  f"- trainable policy parameters: {tp.get('trainable', 0):,} of {tp.get('total', 0):,} "
                  f"({100 * (tp.get('share') or 0):.3f}%)"]
        if curve:
            lines.append(f"- reward per rollout {_f(curve[0].get('reward'))} → {_f(curve[-1].get('reward'))}; "
                         f"KL to the initial policy {_f(curve[-1].get('kl'))} at the last step")
        lines.append("")
    ev = m.get("eval")
    if ev:
        lines += ["## Held-out prompts, initial policy vs PPO policy", "",
                  "| | before | after | gain |", "|---|---|---|---|",
                  f"| reward | {_f(ev.get('reward_before'))} | {_f(ev.get('reward_after'))} | {_f(ev.get('reward_gain'))} |"]
        if ev.get("scorer"):
            lines.append(f"| {ev['scorer']} | {_f(ev.get('scorer_before'))} | {_f(ev.get('scorer_after'))} | "
                         f"{_f(ev.get('scorer_gain'))} |")
        lines.append(f"| length (tokens) | {_f(ev.get('length_before'), 1)} | {_f(ev.get('length_after'), 1)} | |")
        for key, label in (("reward", "reward"), ("scorer", ev.get("scorer"))):
            if ev.get(f"{key}_gain_ci95"):
                lines.append(f"\n{label} gain: {_gain_detail(ev, key)}.")
        lines.append(f"\n{ev.get('prompts')} prompts ({'held out' if ev.get('heldout') else 'training prompts: none held out'}).")
    return "\n".join(lines) + "\n"


def _gain_detail(ev: dict, key: str) -> str:
    lo, hi = ev[f"{key}_gain_ci95"]
    return (f"{_f(ev.get(f'{key}_gain'))}, 95% bootstrap interval over prompts [{_f(lo)}, {_f(hi)}]; "
            f"{ev.get(f'{key}_prompts_better')} prompts better, {ev.get(f'{key}_prompts_worse')} worse")


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def publish(run, metrics: dict) -> None:
    name = run.store.run_info().get("name", run.store.root.name)
    create_markdown_artifact(key=artifact_key(name, "perl", "summary"), markdown=summary_markdown(metrics),
                             description="PERL: reward-model accuracy, PPO curve ends, before/after eval")
    curve = (metrics.get("ppo") or {}).get("curve") or []
    if curve:
        cols = ("step", "reward", "kl", "rlhf_reward", "policy_loss", "value_loss", "entropy")
        create_table_artifact(key=artifact_key(name, "perl", "ppo-curve"), table=[{k: p.get(k) for k in cols} for p in curve],
                              description="PPO per step: mean reward (RM or function), KL to the initial policy, losses")
    rm_curve = (metrics.get("reward_model") or {}).get("curve") or []
    if rm_curve:
        create_table_artifact(key=artifact_key(name, "perl", "rm-curve"), table=rm_curve,
                              description="reward-model training: loss and batch pairwise accuracy per step")
    shown = samples(run)
    if shown:
        create_table_artifact(key=artifact_key(name, "perl", "samples"), table=shown,
                              description="held-out prompts: initial policy (before) vs PPO policy (after)")


def result(run, per_iteration: list[dict]) -> dict:
    metrics = per_iteration[-1]
    out = {"run_dir": str(run.store.root), "adapter": str(run.store.stage_dir(1, "ppo") / "adapter")}
    rm = metrics.get("reward_model")
    if rm:
        out["reward model held-out accuracy"] = rm.get("heldout_accuracy")
    curve = (metrics.get("ppo") or {}).get("curve") or []
    if curve:
        out["ppo reward first -> last"] = f"{curve[0]['reward']:.4f} -> {curve[-1]['reward']:.4f} (kl {curve[-1]['kl']:.4f})"
    ev = metrics.get("eval")
    if ev:
        out["eval reward before -> after"] = f"{_f(ev.get('reward_before'))} -> {_f(ev.get('reward_after'))}"
        if ev.get("scorer"):
            out[f"eval {ev['scorer']} before -> after"] = f"{_f(ev.get('scorer_before'))} -> {_f(ev.get('scorer_after'))}"
            if ev.get("scorer_gain_ci95"):
                out[f"eval {ev['scorer']} gain"] = _gain_detail(ev, "scorer")
    return out


SHOW = Presentation(result=result, iteration=lambda run, t, done: publish(run, done[-1]))


@flow(name="perl", log_prints=True)
def perl_flow(run_dir: str, recipe_path: str | None = None, overrides: list[str] | None = None) -> dict:
    """PERL (Sidahmed et al., 2024): train a LoRA reward model on preference pairs, then PPO in which
    only LoRA adapters (policy, value) are trained, with KL to the initial policy.

    ``recipe_path=None`` resumes the run with the recipe stored in ``run_dir``.
    """
    return run_stages(run_dir, recipe_path, overrides, SHOW)
