"""DPO training job: what TRL drops or cuts at max_length is counted and reported, and an initial
adapter's LoRA shape (which training keeps) is reported against the recipe's."""

import json

from alignment.algorithms import algorithm_run
from alignment.config import load_recipe
from alignment.store import RunStore
from alignment.training import DPOSpec, train_dpo, truncation_report, truncation_warnings
from tests.conftest import write_recipe

LONG = " ".join(f"word{i}" for i in range(120))  # well over 64 tokens


def _pairs(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_truncation_report_hand_computed():
    # rows 0..3; TRL kept 0, 2, 3. max_length 10: row 2 is 4 + 7 > 10 (cut), row 3 4 + 6 = 10 (whole).
    r = truncation_report([(0, 3, 2, 5), (2, 4, 7, 1), (3, 4, 6, 6)], ["pair", "pair", "judge", "judge"], 10)
    assert (r["rows"], r["trained_rows"], r["dropped"], r["truncated"]) == (4, 3, 1, 1)
    assert r["dropped_rows"] == [1] and r["truncated_rows"] == [2]
    assert r["cut_by_kind"] == {"pair": {"dropped": 1, "truncated": 0}, "judge": {"dropped": 0, "truncated": 1}}


def test_dpo_counts_and_warns_about_dropped_and_cut_rows(tmp_path, tiny_model_dir):
    data = _pairs(tmp_path / "pairs.jsonl", [
        {"prompt": "Short question?", "chosen": "Short answer.", "rejected": "No."},
        {"prompt": LONG, "chosen": "A.", "rejected": "B."},  # prompt alone over max_length: TRL drops it
        {"prompt": "Another?", "chosen": LONG, "rejected": "No."},  # cut
        {"prompt": "Judge this.", "chosen": LONG + "\nScore: 4", "rejected": "Bad.\nScore: 1", "kind": "judge"},
    ])
    spec = DPOSpec(base=str(tiny_model_dir), data=str(data), output_dir=str(tmp_path / "out"),
                   checkpoint_dir=str(tmp_path / "ckpt"), max_length=64, batch_size=2, save_steps=100)
    metrics = train_dpo(spec)
    assert (metrics["pairs"], metrics["trained_rows"], metrics["dropped"], metrics["truncated"]) == (4, 3, 1, 2)
    assert metrics["dropped_rows"] == [1] and metrics["truncated_rows"] == [2, 3]
    assert metrics["cut_by_kind"]["judge"] == {"dropped": 0, "truncated": 1}
    assert truncation_warnings(metrics) == [
        "0 judge pairs (a cut judgment can lose its final 'Score:' line) dropped (prompt alone >= max_length 64 "
        "tokens), 1 cut to max_length; raise train.max_length to keep them whole",
        "1 pair rows dropped (prompt alone >= max_length 64 tokens), 1 cut to max_length; raise train.max_length "
        "to keep them whole"]


def test_train_stage_reports_dropped_and_cut_pairs_in_manifest_and_log(tmp_path, tiny_model_dir, prompts_file):
    recipe_path = write_recipe(tmp_path / "r.yaml", str(tiny_model_dir), prompts_file, **{"train.max_length": 64})
    recipe, data = load_recipe(recipe_path)
    store = RunStore.create(tmp_path / "run", recipe=data, algorithm=recipe.algorithm)
    logs = []
    run = algorithm_run(store, recipe, log=logs.append)
    store.write_rows(1, "pairs", [
        {"prompt_id": "a", "prompt": "Short question?", "chosen": "Short answer.", "rejected": "No."},
        {"prompt_id": "b", "prompt": LONG, "chosen": "A.", "rejected": "B."},
        {"prompt_id": "c", "prompt": "Another?", "chosen": LONG, "rejected": "No."},
    ], inputs={}, recipe_hash="x")
    run.run_stage("train", 1)
    info = store.manifest(1, "train")["info"]
    assert (info["pairs"], info["trained_rows"], info["dropped"], info["truncated"]) == (3, 2, 1, 1)
    assert any("WARNING iter 1 train: 1 pair rows dropped" in line for line in logs), logs
    metrics = json.loads((store.root / info["adapter"] / "train_metrics.json").read_text())
    assert (metrics["dropped_rows"], metrics["truncated_rows"]) == ([1], [2])


def test_initial_adapter_shape_is_kept_and_reported(tmp_path, tiny_model_dir, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "init"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                   LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                              task_type="CAUSAL_LM")).save_pretrained(adapter)
    data = _pairs(tmp_path / "pairs.jsonl", [{"prompt": "Q?", "chosen": "Yes.", "rejected": "No."}] * 2)
    spec = DPOSpec(base=str(tiny_model_dir), data=str(data), output_dir=str(tmp_path / "out"),
                   checkpoint_dir=str(tmp_path / "ckpt"), init_adapter=str(adapter), max_length=64, save_steps=100)
    metrics = train_dpo(spec)
    assert metrics["lora"] == {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    out = capsys.readouterr().out
    assert "WARNING training continues the LoRA of" in out and "r 4 (recipe 8)" in out
    assert "target_modules ['q_proj', 'v_proj'] (recipe ['k_proj', 'o_proj', 'q_proj', 'v_proj'])" in out
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["r"] == 4
