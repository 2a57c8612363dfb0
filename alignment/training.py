"""TRL training with LoRA: DPO (Self-Rewarding, Meta-Rewarding, SPIN).

Runs in-process or as ``python -m alignment.training SPEC.json`` so a cluster can put
``accelerate launch -m alignment.training`` in its place.

Reference model with LoRA: the policy of iteration t is M_t = base + adapter_{t-1}, and DPO
needs M_t as the reference. We load adapter_{t-1} as the *trainable* adapter and pass no
``peft_config``; TRL's DPOTrainer then adds a frozen copy of it named ``ref`` and computes the
reference log-probs through that copy, so the reference is exactly M_t and the new adapter
starts from M_t. In iteration 1 there is no adapter: a fresh LoRA is added and the reference is
the base with adapters disabled (again M_1). The saved adapter is always a delta on the same
base, so vLLM serves every iteration's model from one engine with ``LoRARequest``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class DPOSpec:
    base: str
    data: str  # parquet/jsonl of pairs with prompt / chosen / rejected strings
    output_dir: str  # where the adapter goes
    checkpoint_dir: str  # TRL checkpoints (resume unit)
    init_adapter: str | None = None
    beta: float = 0.1
    loss_type: str = "sigmoid"
    learning_rate: float = 5e-6
    epochs: float = 1.0
    batch_size: int = 2
    grad_accum: int = 1
    max_length: int = 1024
    save_steps: int = 10
    seed: int = 0
    lora: dict = field(default_factory=lambda: {"r": 8, "alpha": 16, "dropout": 0.05,
                                                "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]})
    crash_prefix: str = ""  # fault-injection point prefix, e.g. "iter1/train"
    num_processes: int = 1  # world size of the job (accelerate launch); batch_size is over all of them
    gradient_checkpointing: bool = False
    load_in_4bit: bool = False  # QLoRA (CUDA + bitsandbytes)
    # Trackers (recipe ``report``, see alignment.trackers.trainer_report); none changes the result.
    report_to: list[str] = field(default_factory=list)  # TRL's report_to: tensorboard, wandb, mlflow
    logging_dir: str | None = None  # the job's TensorBoard directory
    run_name: str | None = None  # the job's run in wandb / MLflow
    report_env: dict = field(default_factory=dict)  # the trackers' environment (WANDB_MODE, MLFLOW_TRACKING_URI ...)


def to_conversational(rows: list[dict]) -> list[dict]:
    """Pairs table rows -> TRL's conversational preference format."""
    return [
        {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        }
        for r in rows
    ]


def truncation_report(kept: list[tuple[int, int, int, int]], kinds: list[str], max_length: int) -> dict:
    """What TRL's DPO (trl 1.12, ``truncation_mode="keep_start"``) did to rows over ``max_length``.

    ``kept``: (row index, prompt, chosen, rejected token counts) of every row TRL's tokenized
    dataset still holds; ``kinds``: the kind of every input row ("pair", or "judge" for a
    Meta-Rewarding judge pair). TRL drops a row whose prompt alone has >= max_length tokens (it
    would keep no completion token), and cuts prompt + completion to its first max_length tokens,
    so a row is truncated when prompt + max(chosen, rejected) > max_length: the end of a
    completion is lost (a judgment's final ``Score:`` line, an answer's conclusion).
    """
    kept_ids = {i for i, *_ in kept}
    dropped = [i for i in range(len(kinds)) if i not in kept_ids]
    truncated = sorted(i for i, p, c, r in kept if p + max(c, r) > max_length)
    by_kind: dict[str, dict[str, int]] = {}
    for what, rows in (("dropped", dropped), ("truncated", truncated)):
        for i in rows:
            by_kind.setdefault(kinds[i], {"dropped": 0, "truncated": 0})[what] += 1
    return {"rows": len(kinds), "trained_rows": len(kept), "dropped": len(dropped), "truncated": len(truncated),
            "max_length": max_length, "dropped_rows": dropped[:50], "truncated_rows": truncated[:50],
            "cut_by_kind": by_kind}


def truncation_warnings(report: dict) -> list[str]:
    """One warning line per kind of row TRL dropped or cut (empty when nothing was)."""
    lines = []
    for kind, n in sorted(report["cut_by_kind"].items()):
        what = "judge pairs (a cut judgment can lose its final 'Score:' line)" if kind == "judge" else f"{kind} rows"
        lines.append(f"{n['dropped']} {what} dropped (prompt alone >= max_length {report['max_length']} tokens), "
                     f"{n['truncated']} cut to max_length; raise train.max_length to keep them whole")
    return lines


def trained_rows_info(metrics: dict) -> dict:
    """What a train manifest records of a DPO job's rows: trained, dropped and cut at max_length,
    and the LoRA shape it trained (missing keys, from a job of an older version, stay out)."""
    return {k: metrics[k] for k in ("trained_rows", "dropped", "truncated", "max_length", "cut_by_kind", "lora")
            if k in metrics}


def lora_settings(peft_config) -> dict:
    """A PEFT ``LoraConfig`` in the recipe's terms (``train.lora``: r, alpha, dropout, target_modules)."""
    targets = peft_config.target_modules
    return {"r": peft_config.r, "alpha": peft_config.lora_alpha, "dropout": peft_config.lora_dropout,
            "target_modules": sorted(targets) if isinstance(targets, (list, set, tuple)) else targets}


def lora_differences(used: dict, recipe: dict) -> list[str]:
    """The recipe LoRA fields an initial adapter overrides, as "field used (recipe value)"."""
    out = []
    for k in ("r", "alpha", "dropout", "target_modules"):
        a, b = used.get(k), recipe.get(k)
        if k == "target_modules" and isinstance(a, list) and isinstance(b, (list, tuple)):
            a, b = sorted(a), sorted(b)
        if a != b:
            out.append(f"{k} {a} (recipe {b})")
    return out


def _read_rows(path: str) -> list[dict]:
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _complete_checkpoint(c: Path) -> bool:
    """Trainer writes trainer_state.json last (not atomically): complete = it parses and the
    weights and RNG state are beside it. A kill mid-save leaves a dir that fails this."""
    try:
        state = json.loads((c / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    weights = any((c / n).is_file() for n in ("adapter_model.safetensors", "model.safetensors", "adapter_model.bin"))
    return isinstance(state, dict) and weights and any(c.glob("rng_state*.pth"))


def file_hash(path: str | Path | None) -> str | None:
    """sha256 of a file, or None when there is no such file (a missing input hashes as None)."""
    from alignment.files import sha256_file

    return sha256_file(path) if path and Path(path).is_file() else None


def latest_checkpoint(checkpoint_dir: str) -> str | None:
    ckpts = [p for p in Path(checkpoint_dir).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    ckpts = sorted(ckpts, key=lambda p: int(p.name.split("-")[-1]))
    ckpts = [c for c in ckpts if _complete_checkpoint(c)]
    return str(ckpts[-1]) if ckpts else None


def resume_key(spec: DPOSpec) -> str:
    """What a checkpoint must have been trained on to be resumed from: data and initial adapter
    *content* and every hyperparameter (not paths, which change between attempts, nor
    save_steps/crash_prefix or the trackers, which do not change the result)."""
    import hashlib

    d = asdict(spec)
    for k in ("data", "output_dir", "checkpoint_dir", "save_steps", "crash_prefix", "init_adapter",
              "gradient_checkpointing", "report_to", "logging_dir", "run_name", "report_env"):
        d.pop(k)
    if d["num_processes"] == 1 and not d["load_in_4bit"]:  # a job of an older version resumes as before
        del d["num_processes"], d["load_in_4bit"]
    d["data_sha256"] = file_hash(spec.data)
    d["init_adapter_sha256"] = (file_hash(Path(spec.init_adapter, "adapter_model.safetensors"))
                                if spec.init_adapter else None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def _prepare_checkpoint_dir(spec: DPOSpec) -> None:
    """Keep checkpoints only if they were made by the same training job (``resume_key``)."""
    import shutil

    d = Path(spec.checkpoint_dir)
    key = resume_key(spec)
    key_file = d / "resume_key"
    if d.is_dir():
        old = key_file.read_text().strip() if key_file.is_file() else None
        if old != key and any(d.glob("checkpoint-*")):
            print("[train] discarding checkpoints of a different training job (data or settings changed)", flush=True)
            for c in d.glob("checkpoint-*"):
                shutil.rmtree(c, ignore_errors=True)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / ".resume_key.tmp"
    tmp.write_text(key + "\n")
    os.replace(tmp, key_file)


def _restore_trained_adapter(model, checkpoint: str) -> None:
    """Load the trainable adapter ("default") from a checkpoint, before ``Trainer.train`` resumes.

    From iteration 2 on the model holds two adapters (the trainable "default" and TRL's frozen
    "ref" copy), which PEFT saves as ``adapter_model.safetensors`` (default) plus ``ref/``.
    transformers 5.x ``Trainer._load_from_checkpoint`` then loads only the sub-directories
    (``ref``) and never the root: the resumed run silently continued from the *initial*
    adapter with the step counter advanced (found by the fault-injection test: the iteration-2
    adapter resumed from its last checkpoint equalled the iteration-1 adapter). Loading it here
    is harmless in iteration 1 (single adapter), where the Trainer loads the same weights again.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(checkpoint, "adapter_model.safetensors")
    if not path.is_file() or not hasattr(model, "peft_config") or "default" not in model.peft_config:
        return
    result = set_peft_model_state_dict(model, load_file(str(path)), adapter_name="default")
    missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if missing:
        raise RuntimeError(f"checkpoint {checkpoint} does not match the model's adapter: {missing[:3]}")


def crash_points_callback(prefix: str):
    """A Trainer callback that passes the crash points ``{prefix}/step{n}`` (after each optimizer
    step) and ``{prefix}/saved{n}`` (checkpoint n on disk) for the fault-injection tests."""
    from transformers import TrainerCallback

    from alignment.faults import crash_point

    class _CrashPoints(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            crash_point(f"{prefix}/step{state.global_step}")

        def on_save(self, args, state, control, **kw):
            crash_point(f"{prefix}/saved{state.global_step}")

    return _CrashPoints()


def process_rank(env) -> int:
    """This process's rank in a job started by ``accelerate launch`` / torchrun (``RANK``), 0 alone."""
    return int(env.get("RANK", "0"))


def per_device_batch(batch_size: int, num_processes: int) -> int:
    """Rows per process and micro-step when one optimizer step takes ``batch_size`` rows (before
    gradient accumulation) over ``num_processes`` processes: batch_size / num_processes. The
    recipe refuses a batch that does not divide (``config.training_launch_problems``)."""
    if batch_size % num_processes:
        raise ValueError(f"batch_size {batch_size} does not split over {num_processes} processes")
    return batch_size // num_processes


def base_model_kwargs(spec: DPOSpec, on_gpu: bool) -> dict:
    """``from_pretrained`` arguments of the frozen base: fp32 on CPU, the checkpoint's dtype on GPU,
    or (``load_in_4bit``, QLoRA) NF4 weights with bf16 compute on this process's GPU."""
    import torch

    if not spec.load_in_4bit:
        return {"dtype": "auto" if on_gpu else torch.float32}
    if not on_gpu:
        raise ValueError("train.load_in_4bit needs a CUDA GPU (bitsandbytes 4-bit weights)")
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_use_double_quant=True,
                                                      bnb_4bit_compute_dtype=torch.bfloat16),
            "device_map": {"": int(os.environ.get("LOCAL_RANK", "0"))}, "dtype": torch.bfloat16}


def save_adapter(trainer, output_dir: str) -> None:
    """Save the trained adapter ("default", not TRL's frozen "ref" copy) once, from rank 0.

    Under FSDP or DeepSpeed ZeRO-3 each process holds a shard of every weight, so the full state
    dict is gathered first (a collective: every rank takes part); elsewhere rank 0 saves its own
    copy, which DDP keeps identical on every rank."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    sharded = trainer.is_fsdp_enabled or (trainer.is_deepspeed_enabled and
                                          trainer.accelerator.state.deepspeed_plugin.zero_stage == 3)
    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped) if sharded else None
    if trainer.accelerator.is_main_process:
        model.save_pretrained(output_dir, selected_adapters=["default"],
                              **({"state_dict": state_dict} if sharded else {}))
    trainer.accelerator.wait_for_everyone()


def train_dpo(spec: DPOSpec) -> dict:
    """Train one DPO step with LoRA; save the adapter to ``spec.output_dir``; return metrics. The
    trackers' environment (``spec.report_env``, TensorBoard's ``TENSORBOARD_LOGGING_DIR``) holds for
    the job only."""
    from alignment.trackers import environment

    env = dict(spec.report_env) | ({"TENSORBOARD_LOGGING_DIR": spec.logging_dir} if spec.logging_dir else {})
    with environment(env):
        try:
            return dpo_job(spec)
        finally:
            if "wandb" in spec.report_to and "wandb" in sys.modules and sys.modules["wandb"].run is not None:
                sys.modules["wandb"].run.finish()  # transformers leaves its run open


def use_tensorboard_writer(trainer, spec: DPOSpec, resume: str | None) -> None:
    """Give the trainer's TensorBoard callback a writer on ``spec.logging_dir`` that logs no step twice
    (``alignment.trackers.tensorboard_writer``: a redone job replaces the old curve, a resumed one
    drops what the killed attempt logged after its checkpoint). Rank 0 only."""
    from transformers.integrations import TensorBoardCallback

    from alignment.trackers import tensorboard_writer

    step = int(Path(resume).name.split("-")[-1]) if resume else None
    trainer.remove_callback(TensorBoardCallback)
    trainer.add_callback(TensorBoardCallback(tb_writer=tensorboard_writer(spec.logging_dir, step)))


def dpo_job(spec: DPOSpec) -> dict:
    """``train_dpo`` in the trackers' environment."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from alignment.faults import crash_point

    started = time.monotonic()  # after the imports: what the job costs beyond starting Python
    torch.manual_seed(spec.seed)
    on_gpu = torch.cuda.is_available()
    main = process_rank(os.environ) == 0
    say = print if main else (lambda *a, **k: None)  # every rank's output shares one pipe: rank 0 speaks
    tokenizer = AutoTokenizer.from_pretrained(spec.base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(spec.base, **base_model_kwargs(spec, on_gpu))
    if spec.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec.gradient_checkpointing)
    peft_config = None
    if spec.init_adapter:
        model = PeftModel.from_pretrained(model, spec.init_adapter, is_trainable=True)
        # The adapter's own LoRA shape wins over the recipe's: M_{t+1} must be one delta on the
        # base starting from M_t, so it trains on in the adapter's shape. Say so when they differ.
        lora_used = lora_settings(model.peft_config["default"])
        changed = lora_differences(lora_used, spec.lora)
        if changed:
            say(f"[train] WARNING training continues the LoRA of {spec.init_adapter} in its own shape, not the "
                  f"recipe's train.lora: {', '.join(changed)}", flush=True)
    else:
        lora_used = dict(spec.lora, target_modules=sorted(spec.lora["target_modules"]))
        peft_config = LoraConfig(
            r=spec.lora["r"], lora_alpha=spec.lora["alpha"], lora_dropout=spec.lora["dropout"],
            target_modules=list(spec.lora["target_modules"]), task_type="CAUSAL_LM",
        )

    raw = _read_rows(spec.data)
    rows = to_conversational(raw)
    # "row" survives TRL's tokenization and filtering, so the rows it dropped can be counted.
    dataset = Dataset.from_list([r | {"row": i} for i, r in enumerate(rows)])
    args = DPOConfig(
        output_dir=spec.checkpoint_dir,
        beta=spec.beta,
        loss_type=[spec.loss_type],
        learning_rate=spec.learning_rate,
        num_train_epochs=spec.epochs,
        per_device_train_batch_size=per_device_batch(spec.batch_size, spec.num_processes),
        gradient_accumulation_steps=spec.grad_accum,
        max_length=spec.max_length,
        logging_steps=1,
        save_strategy="steps",
        save_steps=spec.save_steps,
        save_total_limit=2,
        seed=spec.seed,
        report_to=list(spec.report_to),
        run_name=spec.run_name,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        use_cpu=not on_gpu,
        dataloader_num_workers=0,
        disable_tqdm=True,
        gradient_checkpointing=spec.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if spec.gradient_checkpointing else None,
    )
    if args.world_size != spec.num_processes:
        raise ValueError(f"this job runs in {args.world_size} process(es) but was set up for train.num_processes "
                         f"{spec.num_processes} (its batch_size {spec.batch_size} is split over that many)")

    class _Progress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs and state.is_world_process_zero:
                margin = logs.get("rewards/margins")
                extra = f" margin {margin:.4f}" if isinstance(margin, (int, float)) else ""
                print(f"[train] step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f}{extra}", flush=True)

    trainer = DPOTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
        peft_config=peft_config, callbacks=[_Progress(), crash_points_callback(spec.crash_prefix)],
    )
    kept = trainer.train_dataset
    report = truncation_report(
        [(r, len(p), len(c), len(j)) for r, p, c, j in
         zip(kept["row"], kept["prompt_ids"], kept["chosen_ids"], kept["rejected_ids"])],
        [r.get("kind", "pair") for r in raw], spec.max_length)
    if not report["trained_rows"]:
        raise ValueError(f"every training row has a prompt of >= max_length {spec.max_length} tokens; "
                         "raise train.max_length")
    with args.main_process_first(local=False, desc="checkpoint directory"):  # the others wait for rank 0
        if main:
            _prepare_checkpoint_dir(spec)
    resume = latest_checkpoint(spec.checkpoint_dir)
    if resume:
        say(f"[train] resuming from {resume}", flush=True)
        _restore_trained_adapter(trainer.model, resume)
    if main and spec.logging_dir and "tensorboard" in spec.report_to:
        use_tensorboard_writer(trainer, spec, resume)
    result = trainer.train(resume_from_checkpoint=resume)
    crash_point(f"{spec.crash_prefix}/before_save")
    save_adapter(trainer, spec.output_dir)
    if not main:
        return {}
    tokenizer.save_pretrained(spec.output_dir)
    history = [h for h in trainer.state.log_history if "loss" in h]
    keys = ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected", "logps/chosen",
            "logps/rejected")
    metrics = {
        "pairs": len(rows),
        **{k: report[k] for k in ("trained_rows", "dropped", "truncated", "max_length", "dropped_rows",
                                  "truncated_rows", "cut_by_kind")},
        "lora": lora_used,
        "steps": trainer.state.global_step,
        "steps_per_epoch": max(1, math.ceil(report["trained_rows"] / (spec.batch_size * spec.grad_accum))),
        "train_loss": result.training_loss,
        "resumed_from": resume,
        # Wall seconds of the optimizer loop (TRL's train_runtime) and of the whole job after imports
        # (model load, tokenization, loop, save): bench/iteration_split.py reads them.
        "train_seconds": round(float(result.metrics.get("train_runtime", 0.0)), 2),
        "job_seconds": round(time.monotonic() - started, 2),
        "curve": [{"step": h.get("step")} | {k: h[k] for k in keys if k in h} for h in history],
    }
    Path(spec.output_dir, "train_metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "dpo":
        print("usage: python -m alignment.training dpo SPEC.json", file=sys.stderr)
        return 2
    spec = DPOSpec(**json.loads(Path(argv[1]).read_text()))
    metrics = train_dpo(spec)  # {} on every rank but 0
    for line in truncation_warnings(metrics) if metrics else ():  # the stage logs these itself (not "[train]" lines)
        print(f"WARNING {line}", flush=True)
    return 0


def spec_json(spec: DPOSpec) -> str:
    return json.dumps(asdict(spec), indent=1)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
