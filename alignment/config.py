"""Recipes: one typed config model per algorithm, validated on load.

A recipe is YAML that maps 1:1 onto these models (``extra="forbid"``: an unknown field is an
error that names it). Defaults are the papers' settings; the tiny recipes override them to fit
a laptop CPU. ``load_recipe`` turns every problem into a ``RecipeError`` whose one-line message
names the file and the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from alignment.eval_config import EvalConfig, check_eval
from alignment.models import DEFAULT_MODEL


class RecipeError(ValueError):
    """A user mistake in a recipe or an override; the message is shown as-is (exit code 2)."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# Declared on a field (``Field(..., json_schema_extra=NO_EFFECT)``) whose value cannot change what
# any stage computes (checkpoint frequency, launcher, review gate ...): ``result_dump`` leaves it
# out, so every recipe hash ignores it and changing it on resume redoes nothing.
NO_EFFECT: dict[str, Any] = {"affects_result": False}


def affects_result(field_info: Any) -> bool:
    """False iff the field is declared with ``NO_EFFECT``."""
    extra = field_info.json_schema_extra
    return not (isinstance(extra, dict) and extra.get("affects_result") is False)


def result_dump(model: BaseModel) -> dict[str, Any]:
    """``model.model_dump(mode="json")`` without the fields declared ``NO_EFFECT``, at any depth:
    what every recipe hash is computed from (the one place that decides it, so none can forget)."""
    data = model.model_dump(mode="json")

    def strip(m: Any, d: Any) -> Any:
        if isinstance(m, BaseModel) and isinstance(d, dict):
            fields = type(m).model_fields
            return {k: strip(getattr(m, k, None), v) for k, v in d.items()
                    if k not in fields or affects_result(fields[k])}
        if isinstance(m, (list, tuple)) and isinstance(d, list):
            return [strip(a, b) for a, b in zip(m, d)]
        return d

    return strip(model, data)


def changed_fields(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the leaves that differ between two recipe dicts (sorted)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            out += changed_fields(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


class SelfInstructConfig(StrictModel):
    """Self-instruction creation: the model writes new prompts from few-shot seed examples."""

    enabled: bool = False
    n_new: int = Field(8, ge=1, description="new prompts to keep (after dedupe and filtering)")
    few_shot: int = Field(3, ge=1, description="seed prompts shown per request")
    max_attempts: int = Field(4, ge=1, description="requests per kept prompt before giving up")
    min_chars: int = Field(10, ge=1)
    max_chars: int = Field(400, ge=1)
    temperature: float = Field(0.9, ge=0)
    max_tokens: int = Field(64, ge=1)


class PromptsConfig(StrictModel):
    source: str = Field(..., description="JSONL/CSV/parquet file (relative to the recipe) or an HF dataset id")
    field: str = Field("prompt", description="column holding the prompt text")
    split: str = Field("train", description="split, for HF dataset ids")
    limit: int | None = Field(None, ge=1, description="use only the first N prompts")
    self_instruct: SelfInstructConfig = SelfInstructConfig()


class SamplingConfig(StrictModel):
    n: int = Field(4, ge=1, description="samples per prompt")
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.9, gt=0, le=1)
    max_tokens: int = Field(256, ge=1)


class JudgeConfig(StrictModel):
    """LLM-as-a-Judge with the additive 5-point prompt (prompts/judge.jinja).

    mode: ``free`` parses the judge's own last ``Score:`` line (the paper; small models
    often fail it); ``constrained`` forces the text to end with ``Score: <0-5>`` by structured
    decoding (vLLM only); ``logprob`` generates the justification up to ``Score:`` and reads
    the next token's distribution over 0–5, so every judgment gets a score.
    score: ``int`` uses the integer score (the paper); ``expected`` uses the expected value
    over the score token where one was read (``logprob`` mode), which ties far less often.
    """

    n: int = Field(3, ge=1, description="judgments per response (paper: 3)")
    mode: Literal["free", "constrained", "logprob"] = "free"
    score: Literal["int", "expected"] = "int"
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.9, gt=0, le=1)
    max_tokens: int = Field(256, ge=1)
    min_digit_mass: float = Field(
        0.0, ge=0, le=1, description="logprob mode: a judgment whose probability mass on the digits 0–5 after "
                                     "'Score:' is below this fails (the judge was not about to write a score, "
                                     "and the renormalised digits would be noise); stored per judgment as "
                                     "digit_masses. 0 = only zero mass fails")


class PairsConfig(StrictModel):
    rho: float = Field(0.0, ge=0, lt=1, description="length-control strength; 0 = plain max/min")


class LoraConfig(StrictModel):
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]


# accelerate configs shipped in alignment/accelerate_configs/ (train.accelerate_config: NAME): LoRA with
# FSDP, DeepSpeed ZeRO-2 and ZeRO-3 (GPU only; the two DeepSpeed ones need `pip install deepspeed`).
ACCELERATE_CONFIGS = ("fsdp", "zero2", "zero3")


class TrainConfig(StrictModel):
    beta: float = Field(0.1, gt=0, description="DPO beta (paper: 0.1)")
    learning_rate: float = Field(5e-5, gt=0, description="LoRA learning rate (the paper's 1e-6 is for full fine-tuning)")
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(2, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(1024, ge=16)
    save_steps: int = Field(10, ge=1, description="TRL checkpoint every N steps (for resume)",
                            json_schema_extra=NO_EFFECT)
    launcher: Literal["auto", "subprocess", "inprocess", "accelerate"] = Field(
        "auto", description="subprocess: `python -m alignment.training` (or SELFALIGN_TRAIN_LAUNCHER); inprocess: in "
        "the run's process; accelerate: `accelerate launch` with train.num_processes (DDP, or FSDP / DeepSpeed by "
        "train.accelerate_config); auto = subprocess on GPU or with SELFALIGN_TRAIN_LAUNCHER set, else inprocess",
        json_schema_extra=NO_EFFECT,
    )
    num_processes: int = Field(
        1, ge=1, description="processes of the training job (one per GPU; launcher accelerate). batch_size stays the "
        "batch of one optimizer step over all processes, so 1 or 8 processes train on the same batches",
        json_schema_extra=NO_EFFECT)
    accelerate_config: str | None = Field(
        None, description="launcher accelerate: an accelerate config file, or a shipped one: "
        + ", ".join(ACCELERATE_CONFIGS) + "; none = plain DDP", json_schema_extra=NO_EFFECT)
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass (less memory, ~30% slower; same result)",
        json_schema_extra=NO_EFFECT)
    load_in_4bit: bool = Field(
        False, description="QLoRA: train the adapter on a 4-bit (NF4) base; needs a CUDA GPU and bitsandbytes")
    release_engine: bool = Field(
        False, description="close the generation engine before training (GPU: frees its memory for the trainer)",
        json_schema_extra=NO_EFFECT,
    )
    lora: LoraConfig = LoraConfig()

    @model_validator(mode="after")
    def _processes(self) -> "TrainConfig":
        for problem in training_launch_problems(self):
            raise ValueError(problem)
        return self


def training_launch_problems(train) -> list[str]:
    """What is wrong with a train section's launch fields, as "field ...: why" lines: several
    processes or an accelerate config without ``launcher: accelerate``, a batch that does not split
    evenly over the processes (batch_size = num_processes x per-device batch), a config that is
    neither a shipped name nor a .yaml/.json file (whether the file reads is preflight's:
    ``launch.training_setup_problems``)."""
    problems = []
    if train.launcher != "accelerate":
        for name, value, default in (("num_processes", train.num_processes, 1),
                                     ("accelerate_config", train.accelerate_config, None)):
            if value != default:
                problems.append(f"field train.{name}: needs train.launcher 'accelerate' (it is {train.launcher!r})")
    if train.batch_size % train.num_processes:
        problems.append(f"field train.batch_size: {train.batch_size} does not split over train.num_processes "
                        f"{train.num_processes} (batch_size is one optimizer step's batch over all processes; "
                        "make it a multiple)")
    config = train.accelerate_config
    if config and config not in ACCELERATE_CONFIGS and not config.endswith((".yaml", ".yml", ".json")):
        problems.append(f"field train.accelerate_config: {config!r} is neither a shipped config "
                        f"({', '.join(ACCELERATE_CONFIGS)}) nor a .yaml/.json file")
    return problems


# vLLM engine arguments selfalign sets itself: engine.extra may not name them (where to set each instead).
ENGINE_OWNED = {
    "model": "the recipe's model", "seed": "the recipe's seed", "dtype": "engine.dtype",
    "max_model_len": "engine.max_model_len", "gpu_memory_utilization": "engine.gpu_memory_utilization",
    "enforce_eager": "engine.enforce_eager", "tensor_parallel_size": "engine.tensor_parallel_size",
    "enable_lora": "from the run's adapters", "max_lora_rank": "from the adapters' rank", "max_loras": "one adapter at a time",
}


class EngineConfig(StrictModel):
    backend: Literal["auto", "vllm", "transformers", "openai"] = Field(
        "auto", description="auto = vLLM wherever it imports, else transformers; openai = OpenAI-compatible "
        "servers at base_url (e.g. `selfalign serve-model`)"
    )
    dtype: str = "auto"
    max_model_len: int = Field(2048, ge=64)
    kv_cache_gib: float = Field(1.0, gt=0, description="VLLM_CPU_KVCACHE_SPACE on CPU")
    gpu_memory_utilization: float = Field(0.6, gt=0, le=1)
    enforce_eager: bool | None = Field(None, description="None = True on CPU, False on GPU")
    shard_size: int = Field(8, ge=1, description="prompts per shard for generation/judging (resume unit)")
    batch_size: int = Field(16, ge=1, description="transformers backend: sequences per generate call")
    adapters: Literal["auto", "lora", "merged"] = Field(
        "auto", description="how a LoRA adapter is served: lora = per request on one engine; merged = an engine "
        "on base + adapter merged (cached in RUN/merged/); auto = merged for vLLM on CPU, else lora",
    )
    cpu_threads: int | None = Field(
        None, ge=1, description="CPU: model threads (None = every core the process may use)", json_schema_extra=NO_EFFECT,
    )
    tensor_parallel_size: int = Field(
        1, ge=1, description="vLLM: GPUs one engine spans (tensor parallelism; on CPU, thread groups). For more "
        "engines (data parallelism) start several `selfalign serve-model` servers and list them in base_url",
    )
    extra: dict[str, Any] = Field(
        default_factory=dict, description="more vLLM engine arguments by their EngineArgs names (e.g. quantization, "
        "enable_prefix_caching, pipeline_parallel_size); unknown names fail before the run starts",
    )
    # backend openai. Where the servers are, how long to wait for them and how many requests each
    # gets at once change no result: they must serve the recipe's model, and every request carries its
    # own seed, so which server answers it does not decide its text.
    base_url: str | list[str] | None = Field(
        None, description="backend openai: base URL(s) of OpenAI-compatible servers of the recipe's model, e.g. "
        "http://127.0.0.1:8000/v1; a list spreads the requests over the servers (data parallelism)",
        json_schema_extra=NO_EFFECT,
    )
    api_key_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="backend openai: the name of the environment "
        "variable holding the API key (the key itself is never stored)", json_schema_extra=NO_EFFECT,
    )
    request_timeout_s: float = Field(600.0, gt=0, description="backend openai: seconds one request may take",
                                     json_schema_extra=NO_EFFECT)
    max_concurrency: int = Field(16, ge=1, description="backend openai: requests in flight per server",
                                 json_schema_extra=NO_EFFECT)

    @model_validator(mode="after")
    def _check_servers(self) -> "EngineConfig":
        urls = [self.base_url] if isinstance(self.base_url, str) else list(self.base_url or [])
        if self.backend == "openai" and not urls:
            raise ValueError("base_url is required when backend is openai "
                             "(e.g. http://127.0.0.1:8000/v1, from `selfalign serve-model`)")
        bad = [u for u in urls if not u.startswith(("http://", "https://"))]
        if bad:
            raise ValueError(f"base_url {bad[0]!r} is not an http(s) URL")
        if self.backend == "openai" and self.adapters == "merged":
            raise ValueError("adapters 'merged' needs an in-process engine; backend openai loads "
                             "adapters into the servers (use lora or auto)")
        owned = sorted(set(self.extra) & set(ENGINE_OWNED))
        if owned:
            raise ValueError(f"extra: {owned[0]!r} is set by selfalign ({ENGINE_OWNED[owned[0]]}), not in engine.extra")
        return self

    def vllm_args(self) -> dict[str, Any]:
        """The vLLM engine arguments the recipe adds to selfalign's own: ``extra`` and, when above 1,
        ``tensor_parallel_size``."""
        return dict(self.extra) | ({"tensor_parallel_size": self.tensor_parallel_size} if self.tensor_parallel_size > 1 else {})


class SelfRewardingJudgeConfig(JudgeConfig):
    """The judge of Self-Rewarding: the policy M_t itself (the paper), or a fixed judge of its own."""

    # Which model judges is part of the judge stage's inputs (like M_t's identity), not of its recipe
    # hash; the connection settings of its engine change no result, as the main engine's.
    model: str | None = Field(
        None, description="a separate, fixed judge: its model reference (a local model/adapter dir, hub id, "
        "smollm2-135m); None = the policy M_t judges itself (the paper)", json_schema_extra=NO_EFFECT)
    engine: EngineConfig | None = Field(
        None, description="the separate judge's engine (e.g. backend openai with a base_url serving a bigger model); "
        "None with judge.model set = an engine like the recipe's", json_schema_extra=NO_EFFECT)

class ReviewConfig(StrictModel):
    """Human review before training (see README "Reviewing judge data")."""

    # The gate only pauses; what is trained on is the reviewed data, hashed as the train stage's input.
    gate: bool = Field(False, description="pause before each training stage until a person approves in the Prefect UI",
                       json_schema_extra=NO_EFFECT)
    timeout_s: int = Field(86400, ge=10, description="how long the gate waits before failing the run (resumable)",
                           json_schema_extra=NO_EFFECT)
    url: str = Field("http://127.0.0.1:8765", description="where `selfalign review` serves, for links in artifacts",
                     json_schema_extra=NO_EFFECT)


class RecipeBase(StrictModel):
    """Fields every algorithm's recipe has. Subclasses add their sections and set ``algorithm``."""

    name: str = Field("run", pattern=r"^[A-Za-z0-9._-]+$", description="default run dir: runs/<name>")
    model: str = Field(DEFAULT_MODEL, description="smollm2-135m (embedded), a local model/adapter dir, or a hub id")
    seed: int = 0
    iterations: int = Field(3, ge=1)
    engine: EngineConfig = EngineConfig()
    review: ReviewConfig = ReviewConfig()
    # Where metrics go changes no result: left out of every stage hash (see alignment.trackers).
    report: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list, description="experiment trackers for training, judge and eval metrics (TRL's "
        "report_to for the trainers, one tracker run per iteration grouped under the run's name); offline by "
        "default, under RUN/logs/ (tensorboard/, wandb/, mlruns/); [] = none", json_schema_extra=NO_EFFECT)


    def preflight(self) -> None:
        """Load what the run will read (datasets, reward functions) so user mistakes fail
        before the run directory is created. Subclasses extend this."""
        from alignment.models import resolve
        from alignment.trackers import missing_tracker_packages

        for problem in missing_tracker_packages(self.report):
            raise RecipeError(problem)
        resolve(self.model)
        judge = getattr(self, "judge", None)
        if getattr(judge, "model", None):
            resolve(judge.model)
        train = getattr(self, "train", None)
        if isinstance(train, TrainConfig):
            from alignment.launch import training_setup_problems

            for problem in training_setup_problems(train):
                raise RecipeError(problem)
        if self.engine.extra and self.engine.backend in ("auto", "vllm"):
            from alignment.generation import unknown_vllm_args, vllm_available

            unknown = unknown_vllm_args(self.engine.extra) if vllm_available() else []
            if unknown:
                raise RecipeError(f"field engine.extra: {', '.join(map(repr, unknown))} "
                                  f"{'is not a vLLM engine argument' if len(unknown) == 1 else 'are not vLLM engine arguments'} "
                                  "(vllm.engine.arg_utils.EngineArgs)")


class SelfRewardingRecipe(RecipeBase):
    """Self-Rewarding Language Models (Yuan et al., 2024)."""

    algorithm: Literal["self-rewarding"]
    name: str = Field("self-rewarding", pattern=r"^[A-Za-z0-9._-]+$")
    iterations: int = Field(3, ge=1, description="paper: M1 -> M2 -> M3")
    prompts: PromptsConfig
    generation: SamplingConfig = SamplingConfig()
    judge: SelfRewardingJudgeConfig = SelfRewardingJudgeConfig()
    pairs: PairsConfig = PairsConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()


    def preflight(self) -> None:
        from alignment.data import load_prompts

        super().preflight()
        p = self.prompts
        check_eval(self.eval, load_prompts(p.source, field=p.field, split=p.split, limit=p.limit))

    @model_validator(mode="after")
    def _check(self) -> "SelfRewardingRecipe":
        if self.judge.mode == "constrained" and self.engine.backend == "transformers":
            raise ValueError("judge.mode 'constrained' needs engine.backend vllm (or auto with vLLM installed)")
        if self.judge.score == "expected" and self.judge.mode != "logprob":
            raise ValueError("judge.score 'expected' needs judge.mode 'logprob'")
        if self.eval.judge.model == "judge" and not self.judge.model:
            raise ValueError("field eval.judge.model: 'judge' evaluates with the recipe's separate judge, and "
                             "judge.model is not set (set it, or use 'base')")
        return self


RECIPES: dict[str, type[RecipeBase]] = {"self-rewarding": SelfRewardingRecipe}


def register(recipe_cls: type[RecipeBase]) -> type[RecipeBase]:
    """Add an algorithm's recipe model (called by the module that defines it)."""
    algorithm = recipe_cls.model_fields["algorithm"].annotation.__args__[0]
    RECIPES[algorithm] = recipe_cls
    return recipe_cls


def load_algorithms() -> None:
    # Recipe models of the other algorithms live next to their logic; importing registers them.
    import importlib

    for module in ("alignment.meta_rewarding_config", "alignment.spin_config", "alignment.perl_config",
                   "alignment.pipeline_config"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise


def _format_error(source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if not str(p).startswith("function-after"))
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown field"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    # A whole-recipe check, or a section's check naming a field inside it, names the field itself.
    if msg.startswith("field ") and (not loc or msg.startswith(f"field {loc}.")):
        return f"{source}: {msg}{more}"
    return f"{source}: field {loc or '<root>'}: {msg}{more}"


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (value parsed as YAML) to a recipe dict."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(part.strip() for part in parts):
            raise RecipeError(f"--set {item!r}: no field name before '=' (expected e.g. train.beta=0.2)")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"--set {key}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def parse_recipe(data: Any, source: str = "<recipe>") -> RecipeBase:
    load_algorithms()
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a YAML mapping")
    algorithm = data.get("algorithm")
    if algorithm not in RECIPES:
        raise RecipeError(f"{source}: field algorithm: must be one of {sorted(RECIPES)}, got {algorithm!r}")
    try:
        return RECIPES[algorithm].model_validate(data)
    except ValidationError as err:
        raise RecipeError(_format_error(source, err)) from None


PATH_FIELDS = ("prompts.source", "data.source", "reward_model.data.source", "reward_model.path",
               "eval.prompts", "eval.reference", "train.accelerate_config")


def resolve_paths(data: dict, base: Path) -> None:
    """Make the dataset and model paths of a recipe dict (``PATH_FIELDS``) that exist relative to
    ``base`` absolute, in place."""
    for dotted in PATH_FIELDS:
        *parents, leaf = dotted.split(".")
        node = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        src = node.get(leaf) if isinstance(node, dict) else None
        if isinstance(src, str) and not Path(src).is_absolute() and (base / src).exists():
            node[leaf] = str((base / src).resolve())


def load_recipe(path: str | Path, overrides: list[str] = ()) -> tuple[RecipeBase, dict[str, Any]]:
    """Read, override and validate a recipe; return the model and the resolved dict.

    Relative prompt sources are resolved against the recipe's directory, so a recipe works
    from any working directory and the stored copy in a run directory stays valid.
    """
    path = Path(path)
    if path.is_dir():
        raise RecipeError(f"{path}: is a directory, not a recipe file (give the .yaml file)")
    if not path.exists():
        raise RecipeError(f"{path}: recipe file not found")
    if not path.is_file():  # a FIFO would block, /dev/zero never ends
        raise RecipeError(f"{path}: not a regular file, expected a YAML recipe")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise RecipeError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise RecipeError(f"{path}: cannot read ({err.strerror or err})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}:{where} invalid YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping")
    data = apply_overrides(data, list(overrides))
    # Dataset and model paths in a recipe (and in a pipeline's steps) are relative to the recipe file.
    for body in [data] + [s for s in data.get("steps") or [] if isinstance(s, dict)]:
        resolve_paths(body, path.parent)
    recipe = parse_recipe(data, str(path))
    return recipe, recipe.model_dump(mode="json")
