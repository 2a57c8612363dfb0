"""The actor's stages: self-instruction creation of new prompts, and K responses per prompt."""

from __future__ import annotations

import random
import re
from typing import Sequence

from alignment.data import prompt_id
from alignment.generation import Generator, Sampling, derive_seed
from alignment.prompts import render


def generate_responses(
    generator: Generator, prompts: Sequence[dict], sampling: Sampling, *, adapter: str | None = None, seed: int = 0
) -> list[dict]:
    """``sampling.n`` responses per prompt, rows in the "generate" schema.

    Each prompt's request is seeded with derive_seed(seed, prompt_id), so its responses do not
    depend on the shard or batch it runs in (vLLM; see :func:`alignment.generation.request_seeds`).
    """
    convs = [[{"role": "user", "content": p["prompt"]}] for p in prompts]
    seeds = [derive_seed(seed, p["prompt_id"]) for p in prompts]
    completions = generator.chat(convs, sampling, adapter=adapter, seed=seeds)
    return [
        {
            "prompt_id": p["prompt_id"],
            "prompt": p["prompt"],
            "response_index": k,
            "response": c.text.strip(),
            "length": c.n_tokens,
        }
        for p, per_prompt in zip(prompts, completions)
        for k, c in enumerate(per_prompt)
    ]


_NUMBERING = re.compile(r"^\s*(?:\d+[.)]|[-*•]|task\s*\d*:|new task:)\s*", re.IGNORECASE)


def clean_instruction(text: str) -> str:
    """First non-empty line of a generated task, without list numbering or a 'Task:' label."""
    for line in text.splitlines():
        line = _NUMBERING.sub("", line).strip().strip('"').strip()
        if line:
            return line
    return ""


def self_instruct(
    generator: Generator,
    seeds: Sequence[dict],
    *,
    n_new: int,
    few_shot: int,
    max_attempts: int,
    min_chars: int,
    max_chars: int,
    sampling: Sampling,
    adapter: str | None = None,
    seed: int = 0,
) -> tuple[list[dict], dict]:
    """New prompts written by the model from few-shot examples of the seed set (Self-Instruct).

    Candidates are deduplicated (against the seeds and each other, case/space-insensitive) and
    length-filtered; at most ``n_new * max_attempts`` requests are made. Returns rows in the
    "prompts" schema with ``source="self_instruct"`` and stats of what was filtered.
    """
    rng = random.Random(seed)
    seen = {_norm(s["prompt"]) for s in seeds}
    kept: list[dict] = []
    stats = {"requested": 0, "duplicate": 0, "too_short": 0, "too_long": 0, "kept": 0}
    budget = n_new * max_attempts
    round_ = 0
    while len(kept) < n_new and stats["requested"] < budget:
        batch = min(budget - stats["requested"], max(1, 2 * (n_new - len(kept))))
        convs = []
        for _ in range(batch):
            examples = rng.sample(list(seeds), k=min(few_shot, len(seeds)))
            convs.append([{"role": "user", "content": render("self_instruct", examples=[e["prompt"] for e in examples])}])
        stats["requested"] += batch
        outs = generator.chat(convs, sampling, adapter=adapter, seed=seed + 1000 * round_)
        round_ += 1
        for per in outs:
            text = clean_instruction(per[0].text)
            if len(text) < min_chars:
                stats["too_short"] += 1
            elif len(text) > max_chars:
                stats["too_long"] += 1
            elif _norm(text) in seen:
                stats["duplicate"] += 1
            elif len(kept) < n_new:
                seen.add(_norm(text))
                kept.append({"prompt_id": prompt_id(text), "prompt": text, "source": "self_instruct"})
    stats["kept"] = len(kept)
    return kept, stats


def _norm(text: str) -> str:
    return " ".join(text.lower().split())
