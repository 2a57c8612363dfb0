"""``selfalign``: run, resume, inspect and review self-alignment runs.

Lives in ``flows/`` because it triggers Prefect flows; ``alignment/`` stays Prefect-free.
User mistakes (recipe, data, model, run directory) print one line and exit 2, before anything
is written; a failed or interrupted run prints how to resume it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

EXIT_USER = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, what a shell reports for a process killed by it


def _user_errors() -> tuple[type[BaseException], ...]:
    from alignment.config import RecipeError
    from alignment.data import DataError
    from alignment.generation import GenerationError
    from alignment.models import ModelError
    from alignment.prompts import TemplateError
    from alignment.files import StoreError

    return (RecipeError, DataError, ModelError, StoreError, TemplateError, GenerationError)


def _fail(message: str, code: int = EXIT_USER) -> int:
    print(f"selfalign: error: {message}", file=sys.stderr)
    return code


def _quiet_prefect_defaults() -> None:
    # A local, self-contained Prefect home unless the user configured one.
    os.environ.setdefault("PREFECT_HOME", str(Path(".prefect").resolve()))
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # No telemetry from the temporary server: it only costs failed DNS lookups offline.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The temporary server's 20 s start-up limit is too tight on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


def vllm_logging_config(path: Path) -> dict:
    """vLLM's ``logging.config.dictConfig`` (``VLLM_LOGGING_CONFIG_PATH``): its loggers, in this
    process and in its model worker (a child that inherits the environment), appended to ``path``."""
    return {
        "version": 1,
        "disable_existing_loggers": False,  # vLLM applies it at import: Prefect's loggers must survive
        "formatters": {"plain": {"format": "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"}},
        "handlers": {"file": {"class": "logging.FileHandler", "filename": str(path), "formatter": "plain"}},
        "loggers": {"vllm": {"handlers": ["file"], "level": "INFO", "propagate": False}},
    }


def console_environment(logs: Path, *, verbose: bool) -> dict[str, str]:
    """The settings that keep engine and library output off the terminal (none with ``-v``):
    Prefect's console handler shows CRITICAL only (its documented ``PREFECT_LOGGING_[PATH]``
    override of logging.yml's ``handlers.console.level``; its records still reach the log file),
    and vLLM logs to ``logs/vllm.log`` through its own logging-config hook."""
    from alignment.console import VERBOSE_ENV

    if verbose:
        return {VERBOSE_ENV: "1"}
    return {"PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "CRITICAL", "VLLM_CONFIGURE_LOGGING": "1",
            "VLLM_LOGGING_CONFIG_PATH": str(logs / "vllm-logging.json")}


@contextlib.contextmanager
def run_console(root: Path, *, verbose: bool = False):
    """The console of one run (:mod:`alignment.console`), yielded for the CLI's own messages.

    Quiet (default): the terminal shows the project's stage lines and a progress bar per stage;
    ``RUN/logs/`` gets the rest: ``run.log`` (every Python log record of this process: Prefect,
    the stage lines, libraries, warnings), ``vllm.log`` (vLLM, scheduler and worker), ``output.log``
    (raw output of this process and its children — vLLM's worker, the temporary Prefect server —
    including C-level prints such as OpenMP/NUMA notices, only catchable at the fd level) and one
    ``iter_<t>-<stage>-<job>.log`` per training subprocess (``alignment.launch``).
    ``verbose`` (``-v``): the terminal shows everything as before, progress as plain lines;
    ``run.log`` and the training logs are still written."""
    import logging

    from alignment import console as con

    logs = root / con.LOGS_DIR
    logs.mkdir(exist_ok=True)
    env = {k: v for k, v in console_environment(logs, verbose=verbose).items() if k not in os.environ}
    if "VLLM_LOGGING_CONFIG_PATH" in env:
        (logs / "vllm-logging.json").write_text(json.dumps(vllm_logging_config(logs / "vllm.log"), indent=1))
    os.environ.update(env)
    _quiet_prefect_defaults()
    root_logger = logging.getLogger()
    handlers: list[logging.Handler] = []
    try:
        with contextlib.ExitStack() as stack:
            if verbose:
                console = con.Console(sys.stderr, tty=False)
            else:  # before Prefect's import: its telemetry notice is output too
                console = con.Console(stack.enter_context(con.output_to(logs / "output.log")))
            from prefect.logging.configuration import ensure_logging_setup

            ensure_logging_setup()  # Prefect's handlers exist (with the settings above) before ours are added
            handlers.append(logging.FileHandler(logs / "run.log", encoding="utf-8"))
            handlers[0].setFormatter(logging.Formatter("%(asctime)s | %(levelname)-7s | %(name)s - %(message)s"))
            if not verbose:  # with -v Prefect's console handler shows the stage lines already
                project = Path(__file__).resolve().parent.parent
                handlers.append(con.StageLineHandler(console, sources=[project / "alignment", project / "flows"]))
            for handler in handlers:
                root_logger.addHandler(handler)
            logging.captureWarnings(True)  # warnings are records of "py.warnings": to run.log
            stack.enter_context(con.use(console))
            console.say(f"selfalign: engine and library logs: {logs}/" + ("" if verbose else " (-v shows them here)"))
            yield console
    finally:
        logging.captureWarnings(False)
        for handler in handlers:
            root_logger.removeHandler(handler)
            handler.close()
        for key in env:
            os.environ.pop(key, None)


def _ui_hint() -> str:
    url = os.environ.get("PREFECT_API_URL")
    if url:
        return url.removesuffix("/api")
    return "none (temporary server); run `make ui` and export PREFECT_API_URL=http://127.0.0.1:4200/api to watch runs live"


TERM_GRACE_S = 10.0  # after SIGTERM, at most this long to record the stop before exiting anyway
TERM_FLUSH_S = 2.0  # after a recorded stop, what Prefect's exit-time flushing may still take


def _exit_now(code: int) -> None:
    """Exit without running exit handlers (they are what hangs), after flushing our own output."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def stop_on_sigterm(store=None, stopped=None):
    """SIGTERM raises :class:`alignment.stages.Terminated` in the main thread, so a preempted or
    ``kill``-ed run stops like Ctrl-C: the stage records why, the lock is released, a trainer
    subprocess is stopped. (A run killed without a chance to clean up is resumable too.)

    A clean stop must not take minutes: if it has not finished ``TERM_GRACE_S`` seconds later
    (e.g. Prefect retrying calls to an API server that was signalled too), the process exits
    with 143 anyway. Every write is atomic and the kernel drops the lock, so it stays resumable.
    ``stopped`` (a threading.Event) is set once the stop is recorded; the process then still gets
    ``TERM_FLUSH_S`` only, as Prefect's exit-time flushing retries a server that is already gone."""
    import signal
    import threading

    from alignment.stages import Terminated

    if threading.current_thread() is not threading.main_thread():
        return None

    def exit_anyway() -> None:
        if stopped is not None and stopped.wait(TERM_GRACE_S):
            time.sleep(TERM_FLUSH_S)
            _exit_now(EXIT_TERMINATED)
        if stopped is None:
            time.sleep(TERM_GRACE_S)
        with contextlib.suppress(Exception):
            if store is not None:
                store.log_event("error", message=f"terminated (SIGTERM); no clean stop within {TERM_GRACE_S:.0f} s")
            from alignment import console  # the terminal, also while fds 1/2 go to RUN/logs/

            console.current().say(f"selfalign: terminated (SIGTERM), stopped after {TERM_GRACE_S:.0f} s without a "
                                  f"clean stop; the run is resumable"
                                  + (f": selfalign resume {store.root}" if store is not None else ""))
        _exit_now(EXIT_TERMINATED)

    def on_sigterm(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM kills at once
        threading.Thread(target=exit_anyway, name="selfalign-sigterm-deadline", daemon=True).start()
        raise Terminated()

    return signal.signal(signal.SIGTERM, on_sigterm)


def _restore_sigterm(previous) -> None:
    if previous is not None:
        import signal

        signal.signal(signal.SIGTERM, previous)


def _run_flow(run_dir: str | None, recipe: str | None, overrides: list[str], *, change: bool = False,
              verbose: bool = False) -> int:
    """Validate, lock, (change the stored recipe,) run the flow. ``change``: the user asked to
    change an existing run's settings (``resume --set``, ``run --change-recipe``)."""
    from alignment.runs import commit_run, load_for_run
    from alignment.run_lock import RunLock
    from alignment.store import RUN_FILE

    errors = _user_errors()
    lock = None
    try:  # validate everything before the flow (and the run dir) exists
        parsed, data, path = load_for_run(run_dir, recipe, overrides)
        parsed.preflight()
        # Hold the lock from here to the end (the flow inherits it), so a second run is refused
        # at once. A settings change is written only under the lock; otherwise commit_run writes
        # nothing to an existing run, so a refused recipe leaves even a stale lock file as it was.
        if change and (path / RUN_FILE).is_file():
            lock = RunLock(path).acquire(inheritable=True)
        store, made = commit_run(path, parsed, data, change=change)
        if lock is None:
            lock = store.lock().acquire(inheritable=True)
    except errors as err:
        if lock is not None:
            lock.release()
        return _fail(str(err))
    try:
        if made is not None:
            print(f"selfalign: changed settings of {store.root} (recorded in recipe.yaml and events.jsonl):")
            for line in made.lines():
                print(f"  {line}")
        return _run_locked(store, parsed, recipe, overrides, verbose)
    finally:
        lock.release()


def _run_locked(store, parsed, recipe: str | None, overrides: list[str], verbose: bool = False) -> int:
    errors = _user_errors()
    print(f"selfalign: {parsed.algorithm} run directory {store.root}", flush=True)
    import threading

    stopped = threading.Event()
    previous = stop_on_sigterm(store, stopped)
    try:
        with run_console(store.root, verbose=verbose):  # quiet terminal, RUN/logs/ (restored before the messages below)
            from flows.registry import flow_for
            from flows.temp_server import temporary_server

            # The server dies with this process, even on SIGKILL. While it starts, import what the run
            # imports anyway (the flow, and vLLM unless the recipe asks for transformers).
            with temporary_server(meanwhile=lambda: warm_imports(parsed)):
                result = flow_for(parsed.algorithm)(run_dir=str(store.root), recipe_path=recipe, overrides=overrides)
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM (Terminated)
        from alignment.stages import Terminated, error_message

        store.log_event("error", message=error_message(err))
        what = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"
        print(f"\nselfalign: {what}; the run is resumable: selfalign resume {store.root}", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(err, Terminated) else EXIT_INTERRUPTED
    except errors as err:
        return _fail(str(err))
    except Exception as err:  # a real failure: say where, keep the run resumable
        print(f"selfalign: run failed: {type(err).__name__}: {err}", file=sys.stderr)
        from alignment.console import LOGS_DIR

        print(f"selfalign: details in {store.root / LOGS_DIR / 'run.log'}", file=sys.stderr)
        print(f"selfalign: fix the cause, then: selfalign resume {store.root}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        stopped.set()  # only a SIGTERM arms the deadline that reads it
        _restore_sigterm(previous)
    print("selfalign: done")
    names = {"run_dir": "run directory"}
    for key, value in result.items():
        print(f"  {(names.get(key, key.replace('_', ' ')) + ':').ljust(14)} {value}")
    from alignment.pipeline import started_steps

    runs = [s for _, s in started_steps(store)] if parsed.algorithm == "pipeline" else [store]
    learnt = last_training_line(runs[-1]) if runs else None
    if learnt:
        print(f"  {'training:':<15}{learnt}")
    print(f"  {'Prefect UI:':<15}{_ui_hint()}")
    for run in runs:
        if run.run_info().get("algorithm") in ("self-rewarding", "meta-rewarding"):  # the algorithms with judge data
            print(f"  {'review:':<15}selfalign review {run.root}")
    return 0


def warm_imports(parsed) -> None:
    """Import the algorithm's flow module and the generation engine's library (vLLM unless the
    recipe's engine is transformers): seconds of imports the run pays anyway."""
    from alignment.generation import vllm_available
    from flows.registry import flow_for

    flow_for(parsed.algorithm)
    engine = getattr(parsed, "engine", None)
    if engine is not None and engine.backend in ("auto", "vllm"):
        vllm_available()


def last_training_line(store) -> str | None:
    """How the last trained iteration's DPO moved on its own pairs (report.learning_line)."""
    from alignment.report import learning_line

    for t in reversed(store.iterations()):
        metrics = store.read_json(t, "metrics.json")
        curve = ((metrics or {}).get("train_metrics") or {}).get("curve") or []
        line = learning_line(curve)
        if line:
            return f"iteration {t}: {line}"
    return None


def cmd_run(args) -> int:
    return _run_flow(args.run_dir, args.recipe, args.set or [], change=args.change_recipe, verbose=args.verbose)


def cmd_resume(args) -> int:
    return _run_flow(args.run_dir, None, args.set or [], change=bool(args.set), verbose=args.verbose)


def cmd_status(args) -> int:
    from alignment.algorithms import stage_names
    from alignment.pipeline import started_steps
    from alignment.files import StoreError
    from alignment.store import RunStore

    try:
        store = RunStore.open(args.run_dir)
        info = store.run_info()
        steps = started_steps(store) if info.get("algorithm") == "pipeline" else [(None, store)]
        tables = [(k, s, s.status(stages=stage_names(s))) for k, s in steps]
    except StoreError as err:
        return _fail(str(err))
    from alignment.stages import lock_state

    print(f"run {info.get('name')} ({info.get('algorithm')}) at {store.root}")
    lock = lock_state(store)
    if lock:
        who = f"pid {lock.get('pid')} on {lock.get('host')} since {lock.get('since')}"
        state = {True: "running", False: "stale: that process is gone (killed?); `selfalign resume` takes it over",
                 None: "on another host, cannot check if it is alive"}[lock["live"]]
        if lock["live"] is False and lock.get("pid_alive"):  # the pid was reused after the run died
            state = ("stale: that pid is alive but does not hold the lock (an unrelated process; "
                     "the run was killed?); `selfalign resume` takes it over")
        print(f"lock: {who} ({state})")
    unfinished = info.get("algorithm") == "pipeline" and len(steps) < len(store.recipe().get("steps") or [])
    for k, step_store, rows in tables:
        if k is not None:
            print(f"step {k}: {step_store.run_info().get('algorithm')} at {step_store.root}")
        unfinished |= _print_stage_rows(step_store, rows, lock, indent="  " if k is not None else "")
    if info.get("algorithm") == "pipeline" and not steps:
        print("no step started yet")
    last = max((s.last_error() or {} for _, s, _ in tables), key=lambda e: e.get("time") or "", default={})
    if last:
        where = f"iter {last.get('iteration')} {last.get('stage')}: " if last.get("stage") else ""
        print(f"last error: {where}{last.get('message')} ({last.get('time')})")
    if unfinished and not (lock and lock["live"]):
        print(f"resume with: selfalign resume {store.root}")
    return 0


def _not_a_pipeline(store, command: str):
    """``store``, or StoreError naming the step directories when it is a pipeline's root."""
    from alignment.pipeline import started_steps
    from alignment.files import StoreError

    if store.run_info().get("algorithm") != "pipeline":
        return store
    steps = [str(s.root) for _, s in started_steps(store)]
    raise StoreError(f"{store.root} is a pipeline: {command} one of its steps' run directories"
                     + (f" ({', '.join(steps)})" if steps else " (none started yet)"))


def _print_stage_rows(store, rows: list[dict], lock: dict | None, indent: str = "") -> bool:
    """Print one run directory's stages per iteration; True if any is not done."""
    from alignment.stages import interrupted_stages, shard_totals

    events = store.events()
    # SIGKILL leaves no error event: a stage still "started" with no live owner was killed.
    killed = {} if lock and lock["live"] is not False else interrupted_stages(store, events)
    totals = shard_totals(store, events)
    current = None
    for row in rows:
        if row["iteration"] != current:
            current = row["iteration"]
            print(f"{indent}iteration {current}")
        detail = row.get("detail") or ""
        total = totals.get((row["iteration"], row["stage"]))
        if row["state"] == "partial" and total and detail.endswith(" shards"):
            detail = f"{detail.split()[0]}/{total} shards, {row['rows']} rows"
        detail = f" ({detail})" if detail else ""
        count = f", {row['rows']} rows" if row.get("rows") is not None and row["state"] == "done" else ""
        err = f"  last error: {row['error']}" if row.get("error") else ""
        start = killed.get((row["iteration"], row["stage"]))
        if start and not row.get("error") and row["state"] != "done":
            err = f"  interrupted: pid {start.get('pid')} stopped without finishing (killed?)"
        print(f"{indent}  {row['stage']:<10} {row['state']}{detail}{count}{err}")
    return any(r["state"] != "done" for r in rows)


def cmd_review(args) -> int:
    from alignment.files import StoreError
    from alignment.store import RunStore

    try:
        _not_a_pipeline(RunStore.open(args.run_dir), "review")
    except StoreError as err:
        return _fail(str(err))
    from alignment.review_app import serve

    serve(args.run_dir, host=args.host, port=args.port)
    return 0


def cmd_plan(args) -> int:
    from alignment.algorithms import algorithm_run
    from alignment.pipeline import plan_steps
    from alignment.runs import load_for_run
    from alignment.stages import plan
    from alignment.store import RUN_FILE, RunStore

    target = Path(args.target)
    is_run = (target / RUN_FILE).is_file()
    try:
        recipe, _, _ = load_for_run(target if is_run else None, None if is_run else target, args.set or [])
        store = RunStore.open(target) if is_run else None
        if recipe.algorithm == "pipeline":
            blocks = [(f"step {k}: {run.recipe.algorithm}", run, rows) for k, run, rows in plan_steps(store, recipe)]
        else:
            run = algorithm_run(store, recipe, log=lambda _: None)
            blocks = [(None, run, plan(run) if is_run else None)]
    except _user_errors() as err:
        return _fail(str(err))
    iterations = sum(run.recipe.iterations for _, run, _ in blocks)
    print(f"plan of {'run' if is_run else 'recipe'} {target}: {recipe.algorithm}, {iterations} "
          f"iteration{'s' if iterations > 1 else ''}, model {recipe.model}" + ("" if is_run else " (nothing run yet)"))
    for k, (title, run, rows) in enumerate(blocks):
        indent = "  " if title else ""
        if title:
            print(title + ("" if rows is not None or not is_run else f" (not started{', after step ' + str(k) if k else ''})"))
        states = {(r["iteration"], r["stage"]): r for r in rows or []}
        for t in run.iterations():
            print(f"{indent}iteration {t}")
            for stage in run.algorithm.stages:
                off = stage.off(run.recipe)
                row = states.get((t, stage.name)) or {"state": "off" if off else "run", "reason": off or ""}
                print(f"{indent}  {stage.name:<13} {row['state']:<7} {_declared(run, stage, t, row['reason'])}")
    return 0


def _declared(run, stage, t: int, reason: str) -> str:
    """What a plan line says beyond the state: the reason, what the stage reads and which settings count."""
    if reason and stage.off(run.recipe):
        return f"({reason})"
    reads = list(stage.reads) + ([f"M_{t}"] if stage.model else [])
    settings = stage.settings(run, t) if stage.settings else {}
    shown = {k: v for k, v in settings.items() if not isinstance(v, dict)}  # rho, beta, on ...; not whole sections
    parts = ([f"({reason})"] if reason else []) + [f"reads {', '.join(reads)}" if reads else "reads inputs only"]
    if stage.fields:
        parts.append("recipe " + _fields(stage.fields))
    if shown:
        parts.append(", ".join(f"{k}={v}" for k, v in shown.items()))
    if stage.sharded:
        parts.append("sharded")
    return "; ".join(parts)


def _fields(fields: tuple[str, ...]) -> str:
    """("meta_judge.mode", "meta_judge.top_p", "model") -> "meta_judge.{mode, top_p}, model"."""
    groups: dict[str, list[str]] = {}
    for f in fields:
        head, _, tail = f.partition(".")
        groups.setdefault(head, []).append(tail)
    return ", ".join(head if tails == [""] else f"{head}.{tails[0]}" if len(tails) == 1
                     else f"{head}.{{{', '.join(tails)}}}" for head, tails in groups.items())


def cmd_export(args) -> int:
    from alignment.export import ExportError, export_model
    from alignment.models import ModelError
    from alignment.files import StoreError
    from alignment.store import RunStore

    try:
        store = _not_a_pipeline(RunStore.open(args.run_dir), "export")
        t, out = export_model(store, args.merged or args.adapter, iteration=args.iteration, merged=bool(args.merged))
    except (ExportError, StoreError, ModelError) as err:
        return _fail(str(err))
    what = "base + adapter merged (a full model)" if args.merged else "the adapter (PEFT)"
    print(f"selfalign: exported iteration {t}'s model (M_{t + 1}), {what}, to {out}")
    return 0


def cmd_eval(args) -> int:
    """Score a prompts file with the run's models (alignment.benchmark_eval): parse, print, nothing else."""
    from alignment import benchmark_eval as be
    from alignment import console as con
    from alignment.store import RunStore

    errors = _user_errors() + (be.EvalError,)
    try:
        _not_a_pipeline(RunStore.open(args.run_dir), "eval")
        plan = be.plan_eval(args.run_dir, args.prompts, field=args.field, iterations=args.iterations,
                            max_tokens=args.max_tokens, max_prompts=args.max_prompts)
    except errors as err:
        return _fail(str(err))
    models = ", ".join(be.model_label(t) for t in plan.iterations)
    print(f"selfalign: eval of {models} of {plan.store.root} on {len(plan.prompts)} prompts of {plan.prompts_file}",
          flush=True)
    logs = plan.store.root / con.LOGS_DIR
    try:
        with contextlib.ExitStack() as stack:
            # The lock before anything is written (the eval's own lock inherits it): a run active on the
            # directory is refused with one line.
            stack.callback(plan.store.lock().acquire(inheritable=True).release)
            if args.verbose:
                console = con.Console(sys.stderr, tty=False)
            else:  # engine and library output to RUN/logs/eval.log, the console on the terminal
                logs.mkdir(exist_ok=True)
                console = con.Console(stack.enter_context(con.output_to(logs / "eval.log")))
                console.say(f"selfalign: engine and library logs: {logs / 'eval.log'} (-v shows them here)")
            stack.enter_context(con.use(console))
            result = be.run_eval(plan, log=console.line, progress=console.progress)
    except KeyboardInterrupt:
        print("\nselfalign: interrupted; the models scored so far are kept, run the same command to go on",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except errors as err:
        return _fail(str(err))
    if result.reused:
        print(f"selfalign: {', '.join(result.reused)}: read from {result.directory} "
              f"(scored before on this prompts file with these settings; not recomputed)")
    judge = result.summary["judge"]["model"]
    who = {"base": "base model (no adapter)", "initial": "initial model M_1", "judge": "recipe's separate judge"}[judge]
    print(f"selfalign: scores by the {who} "
          f"with the project's 5-point judge; results in {result.directory}")
    for line in be.table_lines(result.summary["models"]):
        print(f"  {line}")
    return 0


def cmd_serve(args) -> int:
    """Serve the flows as Prefect deployments, so runs can be triggered from the UI."""
    _quiet_prefect_defaults()
    from prefect import serve

    from flows.registry import all_flows

    serve(*[f.to_deployment(name=args.name) for f in all_flows()])
    return 0


def cmd_serve_model(args) -> int:
    """Start vLLM's OpenAI-compatible server (``vllm serve``) on a model reference, with runtime LoRA
    loading on, and print the base URL for a recipe once it answers; runs until stopped (Ctrl-C or
    SIGTERM, passed on to vLLM)."""
    import signal
    import socket
    import subprocess

    from alignment.generation import has_cuda
    from alignment.models import ModelError, resolve
    from alignment.openai_engine import vllm_serve_command, vllm_serve_env, wait_until_serving

    try:
        model = resolve(args.model)
    except ModelError as err:
        return _fail(str(err))
    on_gpu = has_cuda()
    cmd = vllm_serve_command(model.base, args.model if model.adapter is None else model.base, host=args.host,
                             port=args.port, max_lora_rank=args.max_lora_rank, max_model_len=args.max_model_len,
                             on_gpu=on_gpu, extra=args.vllm_args)
    everywhere = args.host in ("0.0.0.0", "::")  # listening on every interface: name this machine
    url = f"http://{socket.gethostname() if everywhere else args.host}:{args.port}/v1"
    local = f"http://127.0.0.1:{args.port}/v1" if everywhere else url
    print(f"selfalign: starting vLLM on {model.base} ({'GPU' if on_gpu else 'CPU'}): {' '.join(cmd[3:])}", flush=True)
    proc = subprocess.Popen(cmd, env=os.environ | vllm_serve_env(on_gpu, args.cpu_threads))
    previous = signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    try:
        if wait_until_serving(local, proc.poll):
            print(f"selfalign: serving {args.model} at {url}\n  recipe: engine: {{backend: openai, base_url: {url}}}"
                  f"\n  or:     --set engine.backend=openai --set engine.base_url={url}", flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous)


VERBOSE_HELP = ("show everything on the terminal (engine, Prefect and library logs); by default they go to "
                "RUN/logs/ and the terminal shows the stage lines and a progress bar per stage")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selfalign", description=__doc__.split("\n")[0].strip("`: "))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run a recipe (re-running the same recipe and run dir resumes it)")
    p.add_argument("recipe", help="YAML recipe, e.g. recipes/tiny-self-rewarding.yaml")
    p.add_argument("--run-dir", help="run directory (default: runs/<recipe name>)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe field, e.g. --set iterations=1")
    p.add_argument("--change-recipe", action="store_true",
                   help="the run dir exists with other settings: replace them (stages they affect are redone)")
    p.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("resume", help="continue a killed or failed run with the recipe stored in it")
    p.add_argument("run_dir")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="change a setting of the run, e.g. --set train.batch_size=1 after an OOM; only the "
                        "stages it affects are redone")
    p.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("status", help="per iteration and stage: done / partial / not started, and the last error")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("plan", help="print the stage plan of a recipe, or of a run: what is done, what would "
                       "run or be redone and why (runs nothing)")
    p.add_argument("target", metavar="RECIPE_OR_RUN")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="plan with a changed setting (a run: what that change would redo)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("review", help="serve the review web UI over a run directory")
    p.add_argument("run_dir")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.set_defaults(func=cmd_review)

    p = sub.add_parser("export", help="write a run's trained model: the adapter, or merged into a standalone model")
    p.add_argument("run_dir")
    p.add_argument("--iteration", type=int, default=None, help="the iteration whose trained model (default: the last)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--merged", metavar="OUT", help="a new directory for base + adapter merged (PEFT "
                       "merge_and_unload): loads in transformers / vLLM as-is")
    where.add_argument("--adapter", metavar="OUT", help="a new directory for the adapter as trained (PEFT)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("eval", help="score a prompts file with the run's models (M_1 and each trained iteration's), "
                       "by a fixed judge with the 5-point judge prompt; results in RUN/evals/")
    p.add_argument("run_dir")
    p.add_argument("--prompts", required=True, metavar="FILE", help="JSONL / JSON / CSV / parquet file of prompts")
    p.add_argument("--field", default="prompt", help="the key (column) holding the prompt (default: prompt)")
    p.add_argument("--iterations", default="all", metavar="LIST",
                   help="which models: 'all' (default), or e.g. 0,1,3 (0 = the initial model M_1, t = the model "
                        "iteration t trained, M_{t+1})")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N",
                   help="answer length limit (default: the recipe's eval.max_tokens)")
    p.add_argument("--max-prompts", type=int, default=None, metavar="N", help="score only the first N prompts")
    p.add_argument("-v", "--verbose", action="store_true", help="show engine and library logs on the terminal "
                   "(by default they go to RUN/logs/eval.log)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("serve-model", help="start vLLM's OpenAI-compatible server on a model (runtime LoRA loading "
                       "on) and print the base URL for engine.backend openai",
                       usage="selfalign serve-model MODEL [options] [-- more vllm serve arguments, e.g. --api-key KEY]")
    p.add_argument("model", help="smollm2-135m (embedded), a local model/adapter dir, or a hub id")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--cpu-threads", type=int, default=None,
                   help="CPU: model threads, on the first cores of this process's affinity (pin with taskset -c)")
    p.add_argument("--max-lora-rank", type=int, default=16, help="the largest LoRA rank it can serve (8, 16, 32, 64 ...)")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.set_defaults(func=cmd_serve_model, vllm_args=[])

    p = sub.add_parser("serve", help="serve the flows as Prefect deployments (trigger runs from the UI)")
    p.add_argument("--name", default="selfalign")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `serve-model MODEL [options] -- VLLM ARGS`: what follows a lone `--` goes to vLLM untouched
    # (argparse cannot take a trailing list after a subcommand's options).
    cut = argv.index("--") if "--" in argv else len(argv)
    parser = build_parser()
    args = parser.parse_args(argv[:cut])
    if cut < len(argv):
        if args.command != "serve-model":
            parser.error(f"{args.command} takes no arguments after --")
        args.vllm_args = argv[cut + 1:]
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
