"""The openai backend against small real HTTP servers started here: request bodies, data parallelism,
retries with backoff, a wrong key, a garbage body, a server killed mid-call, runtime LoRA loading."""

from __future__ import annotations

import json
import math
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from alignment.adapter_serving import serving_mode
from alignment.config import RecipeError, load_recipe, result_dump
from alignment.generation import CPU_SEEDABLE, EngineSpec, GenerationError, Sampling, open_generator
from alignment.openai_engine import (OpenAIGenerator, adapter_name, backoff_delay, base_urls, chat_body,
                                     completion_body, vllm_serve_command, vllm_serve_env)

CONVS = [[{"role": "user", "content": f"Question {i}?"}] for i in range(5)]
MODELS = {"object": "list", "data": [{"id": "served-m", "root": "/models/m", "parent": None}]}


def chat_answer(body: dict) -> dict:
    """A vLLM-shaped chat answer whose texts name the request's seed and the sample index."""
    return {"choices": [{"index": k, "message": {"role": "assistant", "content": f"seed {body['seed']} #{k}"},
                         "token_ids": [1] * (k + 2)} for k in range(body["n"])]}


class FakeServer:
    """A threaded HTTP server on a free port; ``respond(method, path, body) -> (status, payload)``
    (payload: a dict sent as JSON, or bytes as they are; None: drop the connection unanswered)."""

    def __init__(self, respond=None):
        self.requests: list[tuple[str, str, dict | None, dict]] = []
        self.respond = respond or self.default
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def handle_any(self, method):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                path = self.path.removeprefix("/v1")
                fake.requests.append((method, path, body, dict(self.headers)))
                status, payload = fake.respond(method, path, body)
                if payload is None:  # die mid-call: close without an answer
                    self.close_connection = True
                    self.connection.close()
                    return
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self.handle_any("GET")

            def do_POST(self):
                self.handle_any("POST")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @staticmethod
    def default(method, path, body):
        if path == "/models":
            return 200, MODELS
        if path == "/chat/completions":
            time.sleep(0.05)  # a request takes a while, so every server's threads get some of a call's requests
            return 200, chat_answer(body)
        if path == "/load_lora_adapter":
            return 200, b"Success"
        return 404, {"detail": "Not Found"}

    def calls(self, path: str) -> list[dict]:
        return [body for method, p, body, _ in self.requests if p == path and method == "POST"]

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def servers():
    made: list[FakeServer] = []

    def make(respond=None) -> FakeServer:
        made.append(FakeServer(respond))
        return made[-1]

    yield make
    for server in made:
        server.stop()


def generator(embedded_dir, urls, **kwargs) -> OpenAIGenerator:
    spec = EngineSpec(base=str(embedded_dir), backend="openai", base_url=urls, max_concurrency=2,
                      request_timeout_s=kwargs.pop("timeout", 10.0), api_key_env=kwargs.pop("api_key_env", None))
    return OpenAIGenerator(spec, attempts=kwargs.pop("attempts", 3), backoff_s=kwargs.pop("backoff_s", 0.01))


# ---- pure parts ------------------------------------------------------------------------------

def test_request_bodies_carry_vllms_fields():
    s = Sampling(n=3, temperature=0.5, top_p=0.8, max_tokens=7, stop=("Score:",), regex=r"Score: [0-5]")
    body = chat_body("m", CONVS[0], s, 42, continue_final=True)
    assert body == {"model": "m", "messages": CONVS[0], "n": 3, "temperature": 0.5, "top_p": 0.8, "max_tokens": 7,
                    "seed": 42, "return_token_ids": True, "stop": ["Score:"], "continue_final_message": True,
                    "add_generation_prompt": False, "structured_outputs": {"regex": r"Score: [0-5]"}}
    plain = chat_body("m", CONVS[0], Sampling(), 1, continue_final=False)
    assert not {"stop", "continue_final_message", "add_generation_prompt", "structured_outputs"} & set(plain)
    assert completion_body("m", [(1, 2), (3,)]) == {"model": "m", "prompt": [[1, 2], [3]], "max_tokens": 1,
                                                    "temperature": 0.0, "logprobs": 20,
                                                    "return_tokens_as_token_ids": True}


def test_backoff_doubles_up_to_a_cap_and_urls_normalise():
    assert [backoff_delay(a, 1.0, 10.0) for a in range(6)] == [1, 2, 4, 8, 10, 10]
    assert base_urls("http://a/v1/") == ["http://a/v1"]
    assert base_urls(["http://a/v1", "http://b/v1"]) == ["http://a/v1", "http://b/v1"]
    with pytest.raises(GenerationError, match="base_url"):
        base_urls([])
    assert adapter_name("ab" * 32) == "selfalign-" + "ab" * 8


def test_serve_command_has_lora_and_the_cpu_seedable_settings():
    cmd = vllm_serve_command("/m", "name", host="127.0.0.1", port=9, max_lora_rank=16, max_model_len=2048,
                             on_gpu=False, extra=["--api-key", "k"])
    assert CPU_SEEDABLE == {"enable_chunked_prefill": False}
    for flag in ("--enable-lora", "--no-enable-chunked-prefill", "--enforce-eager", "--served-model-name"):
        assert flag in cmd
    assert cmd[cmd.index("--distributed-executor-backend") + 1] == "mp"
    assert cmd[cmd.index("--dtype") + 1] == "float32" and cmd[-2:] == ["--api-key", "k"]
    assert "--dtype" not in vllm_serve_command("/m", "n", host="h", port=9, max_lora_rank=16, max_model_len=64,
                                               on_gpu=True)
    env = vllm_serve_env(on_gpu=False, cpu_threads=1)
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True" and "VLLM_CPU_OMP_THREADS_BIND" in env
    assert int(env["VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS"]) >= 3600 or "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS" in os.environ


def test_recipe_fields(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("algorithm: self-rewarding\nprompts: {source: p.jsonl}\n")
    with pytest.raises(RecipeError, match="field engine: base_url is required when backend is openai"):
        load_recipe(recipe, ["engine.backend=openai"])
    with pytest.raises(RecipeError, match="adapters 'merged'"):
        load_recipe(recipe, ["engine.backend=openai", "engine.base_url=http://a/v1", "engine.adapters=merged"])
    parsed, data = load_recipe(recipe, ["engine.backend=openai", "engine.base_url=[http://a/v1, http://b/v1]"])
    assert data["engine"]["base_url"] == ["http://a/v1", "http://b/v1"]
    # Where the servers are and how they are reached changes no result: no recipe hash sees it.
    other, _ = load_recipe(recipe, ["engine.backend=openai", "engine.base_url=http://c/v1", "engine.api_key_env=KEY",
                                    "engine.request_timeout_s=5", "engine.max_concurrency=3"])
    assert result_dump(parsed) == result_dump(other)
    assert serving_mode("auto", "openai", on_gpu=False) == "lora"


# ---- against servers -------------------------------------------------------------------------

def test_chat_spreads_over_two_servers_in_order(servers, embedded_dir):
    a, b = servers(), servers()
    gen = open_generator(EngineSpec(base=str(embedded_dir), backend="openai", base_url=[a.url, b.url],
                                    max_concurrency=2))
    assert isinstance(gen, OpenAIGenerator) and gen.model == "served-m"
    seeds = [11, 12, 13, 14, 15]
    out = gen.chat(CONVS, Sampling(n=2, stop=("X",)), seed=seeds, continue_final=False)
    gen.close()
    assert [[c.text for c in per] for per in out] == [[f"seed {s} #0", f"seed {s} #1"] for s in seeds]
    assert [c.n_tokens for c in out[0]] == [2, 3]  # len(token_ids) of each choice
    bodies = a.calls("/chat/completions") + b.calls("/chat/completions")
    assert sorted(x["seed"] for x in bodies) == seeds and all(x["model"] == "served-m" for x in bodies)
    assert a.calls("/chat/completions") and b.calls("/chat/completions")  # both servers worked


def test_token_count_from_the_local_tokenizer_without_token_ids(servers, embedded_dir):
    def respond(method, path, body):
        if path == "/chat/completions":
            return 200, {"choices": [{"index": 0, "message": {"content": "Hello there, friend."}}]}
        return FakeServer.default(method, path, body)

    gen = generator(embedded_dir, servers(respond).url)
    [[completion]] = gen.chat(CONVS[:1], Sampling())
    assert completion.n_tokens == len(gen.tokenizer.encode("Hello there, friend.", add_special_tokens=False))


def test_next_token_probs_read_token_id_logprobs(servers, embedded_dir):
    from alignment.generation import continuation_tokens

    seen = {}

    def respond(method, path, body):
        if path == "/completions":
            seen.update(body)
            top = {f"token_id:{space}": math.log(0.5), f"token_id:{four}": math.log(0.25), "token_id:999999": -1.0}
            return 200, {"choices": [{"index": i, "text": "", "logprobs": {"top_logprobs": [top]}}
                                     for i in range(len(body["prompt"]))]}
        return FakeServer.default(method, path, body)

    gen = generator(embedded_dir, servers(respond).url)
    conv = CONVS[0] + [{"role": "assistant", "content": "Score:"}]
    prompt = gen.tokenizer.apply_chat_template(conv, tokenize=False, continue_final_message=True)
    space, four = continuation_tokens(gen.tokenizer, prompt[-64:], " 4")  # " " + "4": two reads, chained
    [probs] = gen.next_token_probs([conv], [" 4", " 5"])
    assert probs == {" 4": pytest.approx(0.5 * 0.25), " 5": 0.0}
    assert seen["logprobs"] == 20 and seen["return_tokens_as_token_ids"] is True and seen["max_tokens"] == 1
    assert all(isinstance(t, int) for t in seen["prompt"][0])


def test_5xx_is_retried_with_backoff(servers, embedded_dir):
    state = {"fails": 2}

    def respond(method, path, body):
        if path == "/chat/completions" and state["fails"]:
            state["fails"] -= 1
            return 503, b"overloaded"
        return FakeServer.default(method, path, body)

    server = servers(respond)
    out = generator(embedded_dir, server.url, attempts=3).chat(CONVS[:1], Sampling(), seed=[7])
    assert out[0][0].text == "seed 7 #0" and len(server.calls("/chat/completions")) == 3


def test_a_wrong_key_fails_at_once_in_one_line(servers, embedded_dir, monkeypatch):
    def respond(method, path, body):
        return (401, {"error": "Unauthorized"}) if path == "/chat/completions" else FakeServer.default(method, path, body)

    server = servers(respond)
    monkeypatch.setenv("SELFALIGN_TEST_KEY", "wrong")
    gen = generator(embedded_dir, server.url, api_key_env="SELFALIGN_TEST_KEY", attempts=5)
    with pytest.raises(GenerationError) as err:
        gen.chat(CONVS[:1], Sampling())
    message = str(err.value)
    assert "401" in message and "$SELFALIGN_TEST_KEY" in message and server.url in message and "\n" not in message
    assert "wrong" not in message and len(server.calls("/chat/completions")) == 1
    assert server.requests[-1][3]["Authorization"] == "Bearer wrong"
    monkeypatch.delenv("SELFALIGN_TEST_KEY")
    with pytest.raises(GenerationError, match="SELFALIGN_TEST_KEY, which is not set"):
        generator(embedded_dir, server.url, api_key_env="SELFALIGN_TEST_KEY")


@pytest.mark.parametrize("payload, says", [
    (b"<html>bad gateway page</html>", "response is not JSON"),
    ({"result": "fine"}, "no field choices"),
    ({"choices": [{"index": 0, "text": "no message"}]}, "no field message.content"),
])
def test_a_garbage_body_names_the_url_and_field(servers, embedded_dir, payload, says):
    def respond(method, path, body):
        return (200, payload) if path == "/chat/completions" else FakeServer.default(method, path, body)

    server = servers(respond)
    with pytest.raises(GenerationError, match=says) as err:
        generator(embedded_dir, server.url).chat(CONVS[:1], Sampling())
    assert server.url + "/chat/completions" in str(err.value)


def test_a_server_killed_mid_call_is_retried_then_named(servers, embedded_dir):
    """The first chat request is dropped unanswered and the server dies with it: the next attempts
    find nothing listening, and the error names the URL (the run is resumable)."""
    holder = {}

    def respond(method, path, body):
        if path == "/chat/completions":
            threading.Thread(target=holder["server"].stop).start()
            return 0, None
        return FakeServer.default(method, path, body)

    holder["server"] = server = servers(respond)
    gen = generator(embedded_dir, server.url, attempts=3)
    with pytest.raises(GenerationError, match="no answer after 3 attempts") as err:
        gen.chat(CONVS[:2], Sampling())
    assert server.url + "/chat/completions" in str(err.value) and "resumable" in str(err.value)


def test_a_server_killed_mid_call_fails_the_call_on_two_servers(servers, embedded_dir):
    """Data parallel: when one of two servers dies, the call fails with its URL (none of the call's
    results are returned half-made; the stage's shard is redone on resume)."""
    holder = {}

    def respond(method, path, body):
        if path == "/chat/completions":
            threading.Thread(target=holder["server"].stop).start()
            return 0, None
        return FakeServer.default(method, path, body)

    live = servers()
    holder["server"] = dying = servers(respond)
    gen = generator(embedded_dir, [live.url, dying.url], attempts=2)
    with pytest.raises(GenerationError) as err:
        gen.chat(CONVS, Sampling())
    assert dying.url in str(err.value)


def test_adapter_loaded_once_per_server_and_addressed_by_name(servers, embedded_dir, tmp_path):
    from alignment.files import sha256_file

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    a, b = servers(), servers()
    gen = generator(embedded_dir, [a.url, b.url])
    for _ in range(2):
        gen.chat(CONVS, Sampling(), adapter=str(adapter))
    name = adapter_name(sha256_file(adapter / "adapter_model.safetensors"))
    for server in (a, b):
        assert server.calls("/load_lora_adapter") == [{"lora_name": name, "lora_path": str(adapter.resolve())}]
        assert {x["model"] for x in server.calls("/chat/completions")} == {name}


def test_a_server_without_runtime_lora_gets_a_clear_error(servers, embedded_dir, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"w")
    server = servers()

    def no_route(method, path, body):  # runtime LoRA updating off: vLLM has no such route
        return (404, {"detail": "Not Found"}) if path == "/load_lora_adapter" else FakeServer.default(method, path, body)

    server.respond = no_route
    with pytest.raises(GenerationError, match="selfalign serve-model.*VLLM_ALLOW_RUNTIME_LORA_UPDATING"):
        generator(embedded_dir, server.url).chat(CONVS[:1], Sampling(), adapter=str(adapter))

    def already(method, path, body):  # a resumed run meets its adapter already loaded: fine
        if path == "/load_lora_adapter":
            return 400, {"error": {"message": f"The lora adapter '{body['lora_name']}' has already been loaded."}}
        return FakeServer.default(method, path, body)

    server.respond = already
    [[completion]] = generator(embedded_dir, server.url).chat(CONVS[:1], Sampling(), adapter=str(adapter), seed=[3])
    assert completion.text == "seed 3 #0"
