"""The temporary Prefect server of one CLI run, tied to the run process's life.

Without ``PREFECT_API_URL`` Prefect starts a temporary server on first use, as a plain child
process. Two failures followed from that: a run killed with SIGKILL (OOM, preemption) left the
server running, orphaned, for good; and a SIGTERM sent to the whole process group (a scheduler,
``kill -- -PGID``) stopped the server too, so the dying flow spent minutes retrying its API
calls. The CLI therefore starts the same server itself (Prefect's own uvicorn command) with:

* ``PR_SET_PDEATHSIG`` (Linux): the kernel sends it SIGTERM when the run process dies, however;
* its own session: a signal to the run's process group does not reach it, so a stopping run can
  still record its state, then stops the server itself.

Prefect is pointed at it with ``PREFECT_API_URL`` for the flow; where the user set their own
API URL nothing is started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Callable, Iterator

SERVER_APP = "prefect.server.api.server:create_app"


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent():
    """A ``preexec_fn``: SIGTERM this child when the process that started it dies (Linux)."""
    parent = os.getpid()
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before the fork
    except (OSError, AttributeError):  # not Linux: the atexit stop below is all there is
        return None
    PR_SET_PDEATHSIG = 1

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(0)

    return preexec


def server_command(port: int) -> list[str]:
    """Prefect's temporary-server command (prefect.server.api.server.SubprocessASGIServer)."""
    import prefect

    return [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
            SERVER_APP, "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"]


def _wait_healthy(proc: subprocess.Popen, url: str, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    with httpx.Client() as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the temporary Prefect server exited with code {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"{url}/health", timeout=5).status_code == 200:
                    return
            time.sleep(0.2)
    raise RuntimeError(f"the temporary Prefect server did not answer within {timeout:.0f} s")


def send_pending_logs(timeout: float = 5) -> None:
    """Send the run's log records still queued for the API before the server stops (at most
    ``timeout`` s); Prefect's exit-time flush would find it gone and print "Error logging to API"."""
    from prefect.logging.handlers import APILogWorker

    with contextlib.suppress(Exception):
        APILogWorker.drain_all(timeout=timeout)


def stop(proc: subprocess.Popen, timeout: float = 5) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def temporary_server(timeout: float = 180, meanwhile: Callable[[], object] | None = None) -> Iterator[str | None]:
    """Yield the API URL of a temporary server living as long as this process (None, and start
    nothing, when ``PREFECT_API_URL`` is configured). ``meanwhile`` runs while the server starts
    (its imports and migrations take seconds of one core): work the run needs anyway, such as
    imports, overlaps with it instead of following it."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    if PREFECT_API_URL.value():
        if meanwhile:
            meanwhile()
        yield None
        return
    port = _free_port()
    env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True),
           "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen(server_command(port), env=env, start_new_session=True, preexec_fn=_die_with_parent(),
                            stdin=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/api"
        if meanwhile:
            meanwhile()
        _wait_healthy(proc, url, timeout)
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
            send_pending_logs()  # after a finished run only: an interrupted one must stop at once
    finally:
        stop(proc)
