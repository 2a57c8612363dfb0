"""logprob judging does not depend on how the chat template treats the end of the final message.

The probe is a real (tiny) Llama whose weights make it a bigram model: every layer's output
projections are zero, so the next-token logits depend on the last token only, and chosen
bigrams are set by hand (":" → " " → "4", like a judge about to write "Score: 4"). Run through
the transformers backend with the embedded tokenizer and two chat templates: the SmolLM2 one,
which keeps the final message as written, and a Llama-3-like one that trims it.
"""

from __future__ import annotations


import pytest

from alignment.generation import EngineSpec, HFGenerator
from alignment.judge import JudgeSettings, judge_responses

KEEPS = None  # the tokenizer's own template
TRIMS = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] | trim"
    " + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def bigram_model(src, out, bigrams: dict[str, dict[str, float]], chat_template: str | None):
    """Save a copy of the tiny model whose next-token logits are a function of the last token:
    logit(next | prev) = bigrams[prev][next] (0 for all other pairs)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(src)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    config = LlamaConfig.from_pretrained(src)
    config.tie_word_embeddings = False
    n_prev = len(bigrams)
    config.hidden_size = max(32, n_prev)
    config.intermediate_size = 8
    model = LlamaForCausalLM(config)

    def one(text: str) -> int:
        (token,) = tokenizer.encode(text, add_special_tokens=False)
        return token

    with torch.no_grad():
        for layer in model.model.layers:  # no layer writes to the residual stream
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        emb = model.model.embed_tokens.weight
        emb.zero_()
        emb[:, -1] = 1.0  # every token: a constant direction, so RMSNorm never divides by 0
        head = model.lm_head.weight
        head.zero_()
        # Token prev gets basis direction k; RMSNorm turns e_k + e_last into √(H/2)·(e_k + e_last).
        scale = (2.0 / config.hidden_size) ** 0.5
        for k, (prev, nexts) in enumerate(bigrams.items()):
            emb[one(prev), k] = 1.0
            for nxt, logit in nexts.items():
                head[one(nxt), k] = logit * scale
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def judge_once(model_dir, **settings):
    gen = HFGenerator(EngineSpec(base=str(model_dir), backend="transformers", batch_size=4))
    try:
        rows = [{"prompt_id": "p", "prompt": "What is 2+2?", "response_index": 0, "response": "4", "length": 1}]
        return judge_responses(gen, rows, JudgeSettings(n=2, mode="logprob", score="expected", max_tokens=3,
                                                        **settings), seed=0)[0]
    finally:
        gen.close()


# A judge that writes "Score: 4" (and sometimes "Score: 3"): after ":" a space, after it a digit.
WRITES_SCORE = {":": {" ": 30.0}, " ": {"4": 30.0, "3": 29.0}}


@pytest.mark.parametrize("template", [KEEPS, TRIMS], ids=["template-keeps", "template-trims"])
def test_logprob_score_is_the_same_whether_the_template_trims_or_not(tiny_model_dir, tmp_path, template):
    model = bigram_model(tiny_model_dir, tmp_path / "m", WRITES_SCORE, template)
    row = judge_once(model)
    # p(4) : p(3) = e^30 : e^29 → expected = (4e + 3) / (e + 1)
    e = 2.718281828459045
    assert row["n_failed"] == 0
    assert row["expected_scores"] == pytest.approx([(4 * e + 3) / (e + 1)] * 2, abs=1e-3)
    assert row["score_ints"] == [4, 4]
    assert row["digit_masses"] == pytest.approx([1.0, 1.0], abs=1e-3)
    assert all(j.endswith("\nScore: 4") for j in row["judgments"])


def test_digit_mass_below_the_threshold_is_a_failed_judgment(tiny_model_dir, tmp_path):
    # This "judge" ends its line after "Score:" instead of writing a digit: the digits' mass is
    # ~e^-30 and their renormalised distribution is noise.
    model = bigram_model(tiny_model_dir, tmp_path / "m", {":": {"\n": 30.0}}, KEEPS)
    noisy = judge_once(model)
    assert noisy["n_failed"] == 0 and all(m < 1e-6 for m in noisy["digit_masses"])
    failed = judge_once(model, min_digit_mass=0.5)
    assert failed["n_failed"] == 2 and failed["scores"] == [None, None] and failed["mean_score"] is None
    assert failed["expected_scores"] == [None, None] and failed["score_modes"] == ["logprob", "logprob"]
    assert all(m < 1e-6 for m in failed["digit_masses"])  # the mass is kept, to show why it failed
    assert not any(j.rstrip().endswith(("Score: 0", "Score: 1", "Score: 2", "Score: 3", "Score: 4", "Score: 5"))
                   for j in failed["judgments"])


@pytest.mark.parametrize("bigrams, threshold, verdicts", [
    ({" Judgment": {" A": 30.0, " B": 29.0}}, 0.5, ["A", "A"]),  # about to name A: decided
    ({" Judgment": {"\n": 30.0, " B": 5.0}}, 0.0, ["B", "B"]),  # mass ~e^-25: noise decides...
    ({" Judgment": {"\n": 30.0, " B": 5.0}}, 0.5, [None, None]),  # ...unless the threshold fails it
])
def test_meta_judge_verdict_mass_below_the_threshold_fails_the_battle(tiny_model_dir, tmp_path, bigrams, threshold,
                                                                      verdicts):
    from alignment.meta_rewarding import MetaJudgeSettings, meta_judge_battles

    model = bigram_model(tiny_model_dir, tmp_path / "m", bigrams, TRIMS)
    gen = HFGenerator(EngineSpec(base=str(model), backend="transformers", batch_size=4))
    try:
        item = {"prompt_id": "p", "prompt": "q?", "response_index": 0, "response": "r",
                "judgments": ["Score: 1", "Score: 5"], "scores": [1.0, 5.0]}
        rows = meta_judge_battles(gen, [item], MetaJudgeSettings(mode="logprob", max_tokens=2,
                                                                 min_verdict_mass=threshold))
    finally:
        gen.close()
    assert [r["verdict"] for r in rows] == verdicts
    assert all(r["mode"] == "logprob" and (r["p_a"] + r["p_b"] > 0.5) == (verdicts[0] == "A") for r in rows)
