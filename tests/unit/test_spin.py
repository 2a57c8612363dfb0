"""SPIN: data loading and bad input, held-out split, pairs and mixing, the loss against hand-computed
values and TRL's training logs, the reference = M_t at step 0, and the flow on the tiny model."""

import json
import math

import pytest
import yaml

from alignment.config import RecipeError, apply_overrides, load_recipe, parse_recipe
from alignment.data import DataError
from alignment.spin import build_spin_pairs, eval_summary, mix_previous, outcome, spin_loss, split_heldout
from alignment.spin_config import SpinDataConfig
from alignment.spin_data import load_sft
from alignment.store import RunStore


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _sft(path, n=8):
    return _jsonl(path, [{"prompt": f"Question number {i}?", "answer": f"The answer is {i}."} for i in range(n)])


def write_spin_recipe(path, model, source, **overrides):
    data = {
        "algorithm": "spin", "name": "test-spin", "model": str(model), "seed": 0, "iterations": 1,
        "data": {"source": str(source), "heldout_fraction": 0.25},
        "generation": {"n": 1, "max_tokens": 8, "temperature": 0.7, "top_p": 0.9},
        "train": {"beta": [0.1, 0.2], "batch_size": 2, "max_length": 128, "save_steps": 1, "launcher": "inprocess",
                  "epochs": 1, "learning_rate": 1e-3},
        "eval": {"max_tokens": 8, "judge": {"n": 1, "mode": "logprob", "score": "expected", "max_tokens": 8}},
        "engine": {"backend": "transformers", "shard_size": 4},
    }
    data = apply_overrides(data, [f"{k}={v}" for k, v in overrides.items()])
    path.write_text(yaml.safe_dump(data))
    return path


# ------------------------------------------------------------------------------ data and bad input
def test_load_sft_fields_dedupe_limit(tmp_path):
    src = _jsonl(tmp_path / "d.jsonl", [{"q": " What? ", "a": "This. "}, {"q": "What?", "a": "dup"}, {"q": "Why?", "a": "So."}])
    rows = load_sft(SpinDataConfig(source=str(src), prompt_field="q", answer_field="a"))
    assert [(r["prompt"], r["answer"]) for r in rows] == [("What?", "This."), ("Why?", "So.")]
    assert rows[0]["prompt_id"] != rows[1]["prompt_id"]
    assert len(load_sft(SpinDataConfig(source=str(src), prompt_field="q", answer_field="a", limit=1))) == 1


def test_load_sft_chat_messages(tmp_path):
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "More?"}]
    src = _jsonl(tmp_path / "d.jsonl", [{"real": conv}])
    rows = load_sft(SpinDataConfig(source=str(src), messages_field="real"))
    assert (rows[0]["prompt"], rows[0]["answer"]) == ("Hi?", "Hello!")


@pytest.mark.parametrize(
    "rows, kwargs, match",
    [
        ([{"prompt": "a", "answer": "x"}, {"prompt": "b"}], {}, r"d\.jsonl:2: missing field 'answer'"),
        ([{"prompt": "a", "answer": "x"}, {"prompt": "b", "answer": "  "}], {}, r"d\.jsonl:2: field 'answer' is empty"),
        ([{"prompt": "a", "answer": 3}], {}, r"d\.jsonl:1: field 'answer' must be a string"),
        ([{"prompt": "a", "response": "x"}], {}, r"d\.jsonl: data\.answer_field names column 'answer', which no row has \(columns: prompt, response\)"),
        ([{"prompt": "a", "answer": "x"}], {"prompt_field": "question"}, r"data\.prompt_field names column 'question'"),
        ([{"m": [{"role": "user", "content": "a"}]}], {"messages_field": "m"}, r"d\.jsonl:1: field 'm' has no assistant answer"),
        ([{"m": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}], {"messages_field": "m"},
         r"d\.jsonl:1: assistant answer of 'm' is empty"),
    ],
)
def test_bad_rows_name_dataset_row_and_field(tmp_path, rows, kwargs, match):
    src = _jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=match):
        load_sft(SpinDataConfig(source=str(src), **kwargs))


def test_bad_dataset_fails_before_the_run_dir_exists(tmp_path, tiny_model_dir):
    from alignment.runs import open_run

    src = _jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "answer": "x"}, {"prompt": "b", "answer": ""}])
    recipe = write_spin_recipe(tmp_path / "r.yaml", tiny_model_dir, src)
    with pytest.raises(DataError, match=r"d\.jsonl:2: field 'answer' is empty"):
        open_run(tmp_path / "run", recipe, [])
    assert not (tmp_path / "run").exists()


def test_recipe_fields_are_checked(tmp_path):
    base = {"algorithm": "spin", "data": {"source": "d.jsonl"}}
    r = parse_recipe(base)
    assert r.iterations == 4 and r.generation.temperature == 1.0 and r.train.loss_type == "sigmoid"
    assert [r.train.beta_for(t) for t in (1, 2, 3, 4, 5)] == [0.1, 0.1, 0.1, 5.0, 5.0]
    assert parse_recipe(base | {"train": {"beta": 0.3}}).train.beta_for(3) == 0.3
    for patch, field in [({"train": {"loss_type": "ipo"}}, "train.loss_type"), ({"train": {"beta": [0.1, -1]}}, "train"),
                         ({"data": {"source": "d", "heldout_fraction": 1.0}}, "data.heldout_fraction"),
                         ({"review": {"gate": True}}, "<root>")]:
        p = tmp_path / "r.yaml"
        p.write_text(yaml.safe_dump(base | patch))
        with pytest.raises(RecipeError, match=f"field {field}"):
            load_recipe(p)


def test_heldout_split_is_stable_and_sized(tmp_path):
    rows = load_sft(SpinDataConfig(source=str(_sft(tmp_path / "d.jsonl", 40))))
    train, held = split_heldout(rows, 0.1, seed=0)
    assert len(held) == 4 and len(train) == 36 and not {r["prompt_id"] for r in held} & {r["prompt_id"] for r in train}
    # order-independent, and another seed picks another set
    assert split_heldout(list(reversed(rows)), 0.1, seed=0)[1] == list(reversed(held))
    assert {r["prompt_id"] for r in split_heldout(rows, 0.1, seed=1)[1]} != {r["prompt_id"] for r in held}
    assert split_heldout(rows, 0.0)[1] == [] and len(split_heldout(rows[:2], 0.01)[1]) == 1


# ------------------------------------------------------------------------------ pairs and mixing
def test_pairs_real_answer_chosen_own_answer_rejected_identical_dropped():
    data = [{"prompt_id": "p1", "prompt": "Q1", "answer": "A one."}, {"prompt_id": "p2", "prompt": "Q2", "answer": "A two."}]
    gen = [
        {"prompt_id": "p1", "prompt": "Q1", "response_index": 0, "response": "something else", "length": 3},
        {"prompt_id": "p2", "prompt": "Q2", "response_index": 0, "response": " A  two. ", "length": 3},  # == answer
    ]
    pairs, stats = build_spin_pairs(data, gen, iteration=1)
    assert pairs == [{"prompt_id": "p1", "prompt": "Q1", "chosen": "A one.", "rejected": "something else",
                      "rejected_index": 0, "rejected_length": 3, "generated_in": 1}]
    assert stats["identical_dropped"] == 1 and stats["new_pairs"] == 1


def test_mixing_takes_only_the_previous_iterations_pairs():
    prev = [{"prompt_id": "a", "generated_in": 2}, {"prompt_id": "b", "generated_in": 1}]
    cur = [{"prompt_id": "c", "generated_in": 3}]
    assert mix_previous(cur, prev, 3) == cur + [prev[0]]


# ------------------------------------------------------------------------------ the loss
def test_spin_loss_hand_computed():
    # Δ = (−10 − (−11)) − (−12 − (−11)) = 1 − (−1) = 2
    assert spin_loss(-10.0, -12.0, -11.0, -11.0, beta=0.5) == pytest.approx(math.log(1 + math.exp(-1.0)))  # 0.3132617
    assert spin_loss(-10.0, -12.0, -11.0, -11.0, beta=0.5) == pytest.approx(0.31326168751822286)
    assert spin_loss(-10.0, -12.0, -11.0, -11.0, beta=0.1) == pytest.approx(0.5981388693815918)
    assert spin_loss(-10.0, -12.0, -11.0, -11.0, beta=0.1, loss_type="hinge") == pytest.approx(0.8)
    assert spin_loss(-10.0, -12.0, -11.0, -11.0, beta=0.5, loss_type="hinge") == 0.0
    # policy == reference: ln 2 (sigmoid), 1 (hinge); a batch is the mean
    assert spin_loss([-3.0, -7.0], [-4.0, -1.0], [-3.0, -7.0], [-4.0, -1.0], beta=0.1) == pytest.approx(math.log(2))
    assert spin_loss([-10.0, -3.0], [-12.0, -4.0], [-11.0, -3.0], [-11.0, -4.0], beta=0.5) == pytest.approx(
        (0.31326168751822286 + math.log(2)) / 2)
    assert spin_loss(0.0, 1e4, 0.0, 0.0, beta=1.0) == pytest.approx(1e4)  # stable for large |βΔ|


def test_spin_loss_matches_torch_dpo_sigmoid():
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-50 * torch.rand(16, generator=g) for _ in range(4))
    trl_style = (-F.logsigmoid(0.1 * ((pc - rc) - (pr - rr)))).mean().item()
    assert spin_loss(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), beta=0.1) == pytest.approx(trl_style, rel=1e-6)


def test_eval_summary_and_outcome():
    assert (outcome(2.0, 3.0), outcome(3.0, 2.0), outcome(2.0, 2.0), outcome(None, 2.0)) == ("win", "loss", "tie", "unscored")
    rows = [{"loglik_before": -10.0, "loglik_after": -8.0, "answer_tokens": 5, "outcome": o, "score_before": 1.0,
             "score_after": 2.0} for o in ("win", "tie", "loss", "unscored")]
    s = eval_summary(rows)
    assert s["win_rate"] == pytest.approx(0.5) and s["loglik_per_token_after"] == pytest.approx(-8 * 4 / 20)
    assert eval_summary([]) == {"heldout": 0}


# ------------------------------------------------------------------------------ reference = M_t
def _random_adapter(tiny_model_dir, out):
    """A LoRA adapter with non-zero B, so base + adapter != base (a fresh one would be the identity)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                                      task_type="CAUSAL_LM"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
def test_reference_equals_policy_at_step_0_and_trl_loss_is_spin_loss(tmp_path, tiny_model_dir, loss_type):
    """With ``init_adapter`` = adapter_{t−1}, TRL's reference is a frozen copy of it: at step 0 the
    reference log-probs equal the policy's (loss = ln 2 or 1, margins 0) and both are M_t's, not the
    base's. Later steps: TRL's logged loss equals ``spin_loss`` of its logged log-probs."""
    from alignment.spin import answer_logliks
    from alignment.training import DPOSpec, train_dpo

    adapter = _random_adapter(tiny_model_dir, tmp_path / "prev_adapter")
    pairs = [{"prompt": f"Question {i}?", "chosen": f"The real answer {i}.", "rejected": f"Own words {i} {i}"}
             for i in range(4)]
    data = _jsonl(tmp_path / "pairs.jsonl", pairs)
    beta = 0.5
    spec = DPOSpec(base=str(tiny_model_dir), init_adapter=str(adapter), data=str(data), output_dir=str(tmp_path / "out"),
                   checkpoint_dir=str(tmp_path / "ckpt"), beta=beta, loss_type=loss_type, learning_rate=5e-2, epochs=1,
                   batch_size=1, max_length=64, save_steps=100, seed=0)
    curve = train_dpo(spec)["curve"]
    assert len(curve) == 4
    first = curve[0]
    assert first["loss"] == pytest.approx(math.log(2) if loss_type == "sigmoid" else 1.0, abs=1e-4)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)
    # The policy (and so the reference) at step 0 is base + adapter_{t−1}, not the base.
    row = [{"prompt": pairs[0]["prompt"], "answer": pairs[0]["chosen"]}]
    with_adapter, base_only = (r[0]["loglik"] for r in answer_logliks(str(tiny_model_dir), [str(adapter), None], row))
    # One load for both reads: the same numbers as a model loaded for each.
    assert answer_logliks(str(tiny_model_dir), [str(adapter)], row)[0][0]["loglik"] == with_adapter
    assert answer_logliks(str(tiny_model_dir), [None], row)[0][0]["loglik"] == base_only
    assert first["logps/chosen"] == pytest.approx(with_adapter, abs=1e-3)
    assert abs(with_adapter - base_only) > 1e-2
    # TRL's loss on its own log-probs is spin_loss (ref = logp − reward/β); the policy has moved by now.
    moved = False
    for c in curve[1:]:
        ref_c = c["logps/chosen"] - c["rewards/chosen"] / beta
        ref_r = c["logps/rejected"] - c["rewards/rejected"] / beta
        expected = spin_loss(c["logps/chosen"], c["logps/rejected"], ref_c, ref_r, beta, loss_type)
        assert c["loss"] == pytest.approx(expected, abs=2e-3)
        moved |= abs(c["rewards/margins"]) > 1e-3
    assert moved


# ------------------------------------------------------------------------------ the flow
@pytest.fixture(scope="module")
def spin_run(tmp_path_factory, tiny_model_dir, prefect_harness):
    from flows.spin import spin_flow

    tmp = tmp_path_factory.mktemp("spin")
    src = _sft(tmp / "sft.jsonl", 8)
    recipe = write_spin_recipe(tmp / "recipe.yaml", tiny_model_dir, src, iterations=2)
    result = spin_flow(run_dir=str(tmp / "run"), recipe_path=str(recipe))
    return RunStore.open(tmp / "run"), result


def test_flow_layout_pairs_and_mixing(spin_run):
    store, result = spin_run
    assert store.iterations() == [1, 2] and result["run_dir"] == str(store.root)
    assert store.run_info()["algorithm"] == "spin"
    data = store.read_rows(1, "data")
    assert sum(r["split"] == "heldout" for r in data) == 2 and len(data) == 8
    for t in (1, 2):
        for stage in ("data", "generate", "pairs", "eval"):
            assert store.manifest(t, stage)["stage"] == stage
        gen = store.read_rows(t, "generate")
        assert len(gen) == 6  # training prompts only
        assert (store.iter_dir(t) / "metrics.json").is_file()
    heldout = {r["prompt_id"] for r in data if r["split"] == "heldout"}
    assert not heldout & {g["prompt_id"] for g in store.read_rows(1, "generate")}
    p1, p2 = store.read_rows(1, "pairs"), store.read_rows(2, "pairs")
    answers = {r["prompt_id"]: r["answer"] for r in data}
    assert all(p["chosen"] == answers[p["prompt_id"]] and p["rejected"] != p["chosen"] for p in p1 + p2)
    assert {p["generated_in"] for p in p2} == {1, 2}  # mixing: iteration 1's pairs are trained on again
    assert len(p2) == len(p1) + store.manifest(2, "pairs")["info"]["new_pairs"]


def test_flow_chains_models_with_per_iteration_beta_and_reference(spin_run):
    store, _ = spin_run
    m1 = json.loads((store.iter_dir(1) / "metrics.json").read_text())
    m2 = json.loads((store.iter_dir(2) / "metrics.json").read_text())
    assert m1["train"]["trained"] and m2["train"]["trained"]
    assert (m1["train"]["beta"], m2["train"]["beta"]) == (0.1, 0.2)
    adapter1 = store.root / m1["train"]["adapter"]
    assert str(adapter1) in m2["model"]  # iteration 2 generated with M_2 = base + adapter_1
    # Iteration 2 starts from adapter_1 with a frozen copy as reference: first step loss ln 2, margin 0.
    for m in (m1, m2):
        first = m["train_metrics"]["curve"][0]
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
        assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
        assert {"loss", "rewards/margins", "logps/chosen", "logps/rejected"} <= set(first)


def test_flow_reports_heldout_eval(spin_run):
    store, result = spin_run
    for t in (1, 2):
        m = json.loads((store.iter_dir(t) / "metrics.json").read_text())
        ev = m["eval"]
        assert ev["heldout"] == 2 and ev["loglik_per_token_after"] < 0 and ev["loglik_per_token_before"] < 0
        assert ev["win_rate"] is None or 0 <= ev["win_rate"] <= 1
        assert m["heldout_loglik_per_token_after"] == ev["loglik_per_token_after"]
        rows = store.read_rows(t, "eval")
        assert len(rows) == 2 and all(r["response_after"] is not None for r in rows)
        assert f"iter {t} held-out" in result
    # M_2 is the "after" of iteration 1 and the "before" of iteration 2
    e1, e2 = store.manifest(1, "eval")["info"], store.manifest(2, "eval")["info"]
    assert e2["loglik_per_token_before"] == pytest.approx(e1["loglik_per_token_after"], abs=1e-5)


def test_flow_rerun_skips_every_stage(spin_run):
    from flows.spin import spin_flow

    store, _ = spin_run
    before = len(store.events())
    spin_flow(run_dir=str(store.root))
    new = store.events()[before:]
    assert {e["event"] for e in new if e.get("stage")} == {"skip"}
    assert len([e for e in new if e["event"] == "skip"]) == 10
