"""The transformers backend on the tiny random model: shapes, seeding, stop strings, digit probabilities."""

import pytest

from alignment.actor import clean_instruction, generate_responses, self_instruct
from alignment.generation import EngineSpec, GenerationError, HFGenerator, Sampling, choose_backend
from alignment.judge import DIGITS, JudgeSettings, judge_responses


@pytest.fixture(scope="module")
def gen(tiny_model_dir):
    g = HFGenerator(EngineSpec(base=str(tiny_model_dir), backend="transformers", batch_size=8))
    yield g
    g.close()


def test_chat_returns_n_completions_with_token_counts(gen):
    convs = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "hello there"}]]
    out = gen.chat(convs, Sampling(n=3, max_tokens=5), seed=1)
    assert [len(per) for per in out] == [3, 3]
    assert all(0 < c.n_tokens <= 5 for per in out for c in per)


def test_same_seed_same_text_different_seed_differs(gen):
    conv = [[{"role": "user", "content": "tell me something"}]]
    a = gen.chat(conv, Sampling(n=2, max_tokens=8, temperature=1.0), seed=7)
    b = gen.chat(conv, Sampling(n=2, max_tokens=8, temperature=1.0), seed=7)
    c = gen.chat(conv, Sampling(n=2, max_tokens=8, temperature=1.0), seed=8)
    assert a == b and a != c


def test_next_token_probs_over_digits(gen):
    conv = [[{"role": "user", "content": "rate"}, {"role": "assistant", "content": "ok\nScore: "}]]
    (probs,) = gen.next_token_probs(conv, DIGITS)
    assert set(probs) == set(DIGITS) and 0 < sum(probs.values()) <= 1


def test_constrained_needs_vllm(gen):
    with pytest.raises(GenerationError, match="vLLM"):
        gen.chat([[{"role": "user", "content": "x"}]], Sampling(regex="a"))


def test_choose_backend_explicit():
    assert choose_backend("transformers") == "transformers"


def test_generate_and_judge_rows_follow_the_schema(gen):
    prompts = [{"prompt_id": "p1", "prompt": "q1"}, {"prompt_id": "p2", "prompt": "q2"}]
    rows = generate_responses(gen, prompts, Sampling(n=2, max_tokens=4), seed=0)
    assert [(r["prompt_id"], r["response_index"]) for r in rows] == [("p1", 0), ("p1", 1), ("p2", 0), ("p2", 1)]
    assert set(rows[0]) == {"prompt_id", "prompt", "response_index", "response", "length"}
    judged = judge_responses(gen, rows, JudgeSettings(n=2, mode="logprob", score="expected", max_tokens=4))
    assert len(judged) == 4
    for r in judged:
        assert len(r["judgments"]) == len(r["scores"]) == len(r["expected_scores"]) == 2
        assert r["score_modes"] == ["logprob", "logprob"] and r["n_failed"] == 0
        assert all(0 <= s <= 5 for s in r["scores"]) and r["judgments"][0].rstrip().endswith(f"Score: {r['score_ints'][0]}")
    free = judge_responses(gen, rows[:1], JudgeSettings(n=2, mode="free", max_tokens=4))
    assert free[0]["score_modes"] == ["parsed", "parsed"]  # random model: almost surely no parseable score
    assert free[0]["n_failed"] == sum(s is None for s in free[0]["scores"])


def test_self_instruct_dedupes_and_filters(gen):
    seeds = [{"prompt_id": f"s{i}", "prompt": f"Seed question {i}?"} for i in range(4)]
    rows, stats = self_instruct(gen, seeds, n_new=2, few_shot=2, max_attempts=2, min_chars=1, max_chars=400,
                                sampling=Sampling(n=1, max_tokens=12, temperature=1.0), seed=0)
    assert stats["requested"] <= 4 and stats["kept"] == len(rows) <= 2
    assert len({r["prompt_id"] for r in rows}) == len(rows)
    assert all(r["source"] == "self_instruct" for r in rows)


@pytest.mark.parametrize("text, expected", [
    ("1. Write a poem about cats.\nMore text", "Write a poem about cats."),
    ("Task 9: Explain gravity.", "Explain gravity."),
    ('\n\n- "Describe the sea."', "Describe the sea."),
    ("", ""),
])
def test_clean_instruction(text, expected):
    assert clean_instruction(text) == expected


def test_a_request_gives_the_same_text_whichever_shard_it_runs_in(tiny_model_dir):
    # Seeds are per request (prompt id; prompt id + response index for a judgment), not per call.
    # batch_size == n puts each request in a batch of its own, where the transformers backend
    # samples it with its own seed (larger batches share one generator: per shard, not per request).
    g = HFGenerator(EngineSpec(base=str(tiny_model_dir), backend="transformers", batch_size=2))
    try:
        prompts = [{"prompt_id": f"p{i}", "prompt": f"Question {i}?"} for i in range(4)]
        sampling = Sampling(n=2, max_tokens=6, temperature=1.0)
        whole = generate_responses(g, prompts, sampling, seed=3)
        assert generate_responses(g, prompts[2:], sampling, seed=3) == whole[4:]
        judge = JudgeSettings(n=2, mode="free", temperature=1.0, max_tokens=6)
        judged = judge_responses(g, whole, judge, seed=5)
        assert judge_responses(g, whole[3:6], judge, seed=5) == judged[3:6]
    finally:
        g.close()


@pytest.mark.parametrize("text, cores", [
    ("max 100000\n", None), ("200000 100000\n", 2.0), ("150000 100000", 1.5), ("", None), (None, None),
    ("junk", None), ("0 100000", None),
])
def test_cgroup_cpu_limit(text, cores):
    from alignment.generation import cgroup_cpu_limit

    assert cgroup_cpu_limit(text) == cores


@pytest.mark.parametrize("affinity, quota, wanted, cpus", [
    ({0, 1}, None, None, [0, 1]),          # every core of the mask
    ({3, 1, 2}, None, None, [1, 2, 3]),
    ({0, 1, 2, 3}, 1.5, None, [0]),         # a 1.5-core quota: one thread per whole core
    ({0, 1, 2, 3}, 0.5, None, [0]),         # at least one
    ({0, 1, 2, 3}, None, 2, [0, 1]),        # the recipe's engine.cpu_threads
    ({0, 1}, None, 8, [0, 1]),              # never more than the mask
])
def test_usable_cpus(affinity, quota, wanted, cpus):
    from alignment.generation import usable_cpus

    assert usable_cpus(affinity, quota, wanted) == cpus


def test_omp_bind_one_slice_per_tensor_parallel_rank():
    from alignment.generation import omp_bind

    assert omp_bind([0, 1]) == "0,1"
    assert omp_bind([0, 1, 2, 3], 2) == "0,1|2,3"
    assert omp_bind([0, 1, 2, 3, 4], 2) == "0,1|2,3,4"


def test_cpu_engine_env_binds_every_usable_core_and_reserves_none():
    import os

    from alignment.generation import cpu_engine_env

    env = cpu_engine_env(None)
    assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert sorted(int(c) for c in env["VLLM_CPU_OMP_THREADS_BIND"].split(",")) == sorted(os.sched_getaffinity(0))
    assert cpu_engine_env(1)["VLLM_CPU_OMP_THREADS_BIND"] == str(min(os.sched_getaffinity(0)))


ENGINE_THREADS_SCRIPT = """
import json, os, sys
import torch
os.sched_setaffinity(0, range(os.cpu_count()))  # every core of the machine, not the test worker's one
from alignment.generation import EngineSpec, Sampling, VLLMGenerator
def main():
    torch.set_num_threads(2)
    seen = {"before": torch.get_num_threads()}
    gen = VLLMGenerator(EngineSpec(base=sys.argv[1], backend="vllm", max_model_len=256, kv_cache_gib=1))
    gen.chat([[{"role": "user", "content": "hi"}]], Sampling(max_tokens=2))
    seen["open"] = torch.get_num_threads()
    gen.close()
    seen["closed"] = torch.get_num_threads()
    print("THREADS " + json.dumps(seen))
if __name__ == "__main__":
    main()
"""


def test_an_in_process_vllm_engine_leaves_this_process_its_torch_threads(tiny_vllm_model_dir, tmp_path):
    """A DPO job trained in the run's process after its vLLM engine gets every thread it had.
    The old worker-process executor left the run's process with one torch thread (vLLM cut it
    for its engine loop): training in that process ran on one core of two."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("vllm")
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs two cores")
    script = tmp_path / "threads.py"
    script.write_text(ENGINE_THREADS_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tiny_vllm_model_dir)], capture_output=True, text=True,
                          timeout=600, cwd=os.getcwd(), env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("THREADS ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert json.loads(lines[0][len("THREADS "):]) == {"before": 2, "open": 2, "closed": 2}
