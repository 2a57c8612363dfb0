"""The terminal of a run: the project's stage lines and one progress bar per stage, nothing else.

* Formatting is pure functions (``eta_seconds``, ``rate_text``, ``duration_text``, ``bar_text``,
  ``progress_line``), formulas in their docstrings.
* :class:`Console` draws them: on a terminal (TTY) the bar is redrawn in place under the stage
  lines; anywhere else (CI, a pipe, a Prefect worker's log) each update is one plain line.
* :class:`StageLineHandler` shows the project's own log lines (records logged from the project's
  source files) on a console; every other library's records stay in the log files.
* :func:`output_to` points the process's file descriptors 1 and 2 at a log file, so what no logger
  controls — C-level prints (OpenMP / NUMA notices), warnings, the output of child processes
  such as vLLM's worker — lands there too, while the console keeps the real terminal.

No Prefect here: ``flows/`` wires these to the flows and the CLI.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, TextIO

VERBOSE_ENV = "SELFALIGN_VERBOSE"  # "1": the user asked for everything (``selfalign run -v``)
LOGS_DIR = "logs"  # RUN/logs/: what the console does not show

_CLEAR = "\r\x1b[K"  # back to the line start, erase it


# --------------------------------------------------------------------------- formatting


def eta_seconds(done: int, total: int, elapsed: float, start_done: int = 0) -> float | None:
    """Seconds left at the pace so far: ETA = (total − done) × elapsed / (done − start_done).

    ``start_done`` units were already done when the clock started (shards a killed run left on
    disk) and do not count towards the pace. None while nothing was done since the start."""
    if done >= total:
        return 0.0
    if done - start_done <= 0:
        return None
    return (total - done) * elapsed / (done - start_done)


def rate_text(count: int, elapsed: float, unit: str) -> str:
    """The pace of ``count`` units in ``elapsed`` seconds: rate = count / elapsed, written as
    "R units/s" when at least one per second, else as seconds per unit = elapsed / count
    ("25.0 s/shard": shards take seconds to minutes, a rate of 0.04 shards/s reads badly)."""
    if count <= 0:
        return f"– s/{unit}"
    if elapsed > 0 and count / elapsed < 1:
        return f"{elapsed / count:.1f} s/{unit}"
    return f"{count / max(elapsed, 1e-9):.2f} {unit}s/s"


def duration_text(seconds: float | None) -> str:
    """``m:ss`` or ``h:mm:ss``, seconds rounded down; "?" when unknown."""
    if seconds is None:
        return "?"
    s = int(seconds)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def bar_text(done: int, total: int, width: int) -> str:
    """``width`` cells, the first ⌊width × done / total⌋ filled."""
    filled = min(width, math.floor(width * done / total)) if total > 0 else 0
    return "█" * filled + "░" * (width - filled)


def progress_line(label: str, done: int, total: int, elapsed: float, *, start_done: int = 0, unit: str = "shard",
                  bar_width: int | None = None) -> str:
    """One progress line: done/total, the pace since the start (``rate_text`` of done − start_done
    units in ``elapsed``) and the ETA (``eta_seconds``); with ``bar_width`` a bar, else plain
    text ("label: 2/8 shards (25%), 25.0 s/shard, ETA 2:30"). Finished: the time it took."""
    units = f"{done}/{total} {unit}s"
    rate = rate_text(done - start_done, elapsed, unit)
    if done >= total:
        return f"{label}: {units} in {duration_text(elapsed)} ({rate})"
    eta = duration_text(eta_seconds(done, total, elapsed, start_done))
    if bar_width:
        return f"{label} {bar_text(done, total, bar_width)} {units} {rate} ETA {eta}"
    return f"{label}: {units} ({round(100 * done / max(total, 1))}%), {rate}, ETA {eta}"


# --------------------------------------------------------------------------- drawing


class Progress:
    """The bar of one stage; ``update(done, total)`` is the stages' progress callback."""

    def __init__(self, console: "Console", label: str, unit: str, start_done: int, started: float):
        self.console, self.label, self.unit, self.start_done, self.started = console, label, unit, start_done, started
        self.done, self.total = start_done, 0

    def update(self, done: int, total: int) -> None:
        self.done, self.total = done, total
        self.console.draw(self)

    def text(self, bar_width: int | None) -> str:
        return progress_line(self.label, self.done, self.total, self.console.clock() - self.started,
                             start_done=self.start_done, unit=self.unit, bar_width=bar_width)

    @property
    def finished(self) -> bool:
        return self.total > 0 and self.done >= self.total


class Console:
    """Stage lines ("HH:MM:SS - message") and progress bars on one stream. ``tty``: redraw one
    bar in place (default: whether the stream is a terminal); otherwise one plain line per
    update, none for units that were done before the stage started."""

    BAR_WIDTH = 24

    def __init__(self, stream: TextIO, *, tty: bool | None = None, width: int | None = None,
                 clock: Callable[[], float] = time.monotonic, timestamp: Callable[[], str] | None = None):
        self.stream = stream
        self.tty = _isatty(stream) if tty is None else tty
        self.width = width
        self.clock = clock
        self.timestamp = timestamp or (lambda: time.strftime("%H:%M:%S"))
        self._bar: Progress | None = None  # the bar drawn last (TTY), still unfinished
        self._lock = threading.RLock()

    def _columns(self) -> int:
        """The terminal's width; 80 where it reports none (a pty opened without a size: ``script``)."""
        if self.width:
            return self.width
        columns = 0
        with contextlib.suppress(OSError, ValueError, AttributeError):
            columns = os.get_terminal_size(self.stream.fileno()).columns
        if columns < 20:
            columns = shutil.get_terminal_size().columns
        return columns if columns >= 20 else 80

    def _write(self, text: str) -> None:
        with contextlib.suppress(OSError, ValueError):  # a closed terminal must not fail the run
            self.stream.write(text)
            self.stream.flush()

    def say(self, text: str) -> None:
        """A line as is (the CLI's own messages), above the bar."""
        with self._lock:
            if self._bar is not None:
                self._write(_CLEAR)
            self._write(text + "\n")
            if self._bar is not None:
                self._write(self._bar_line(self._bar))

    def line(self, message: str) -> None:
        """A stage line: the time, " - ", the message."""
        self.say(f"{self.timestamp()} - {message}")

    def progress(self, label: str, *, unit: str = "shard", start_done: int = 0,
                 started: float | None = None) -> Progress:
        """A bar for one stage; ``start_done`` units were done before ``started`` (default: now)."""
        return Progress(self, label, unit, start_done, self.clock() if started is None else started)

    def _bar_line(self, bar: Progress) -> str:
        return _CLEAR + bar.text(self.BAR_WIDTH)[: max(10, self._columns() - 1)]

    def draw(self, bar: Progress) -> None:
        with self._lock:
            if not self.tty:
                if bar.done > bar.start_done:  # units done before the start were reported by the stage
                    self._write(bar.text(None) + "\n")
                return
            if self._bar is not None and self._bar is not bar:
                self._write("\n")  # another stage's bar was left unfinished: keep its last state
            if bar.finished:
                self._write(_CLEAR + bar.text(None) + "\n")
                self._bar = None
            else:
                self._write(self._bar_line(bar))
                self._bar = bar

    def close(self) -> None:
        """End an unfinished bar's line (a failed or interrupted stage)."""
        with self._lock:
            if self._bar is not None:
                self._write("\n")
                self._bar = None


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


_current: Console | None = None


def current() -> Console:
    """The console of this process: the one a run installed with :func:`use`, else plain lines on
    stderr (a Prefect worker, a library caller)."""
    return _current if _current is not None else Console(sys.stderr, tty=False)


@contextlib.contextmanager
def use(console: Console) -> Iterator[Console]:
    """Make ``console`` the process's console (:func:`current`) for the block."""
    global _current
    previous, _current = _current, console
    try:
        yield console
    finally:
        console.close()
        _current = previous


# --------------------------------------------------------------------------- routing


class StageLineHandler(logging.Handler):
    """Shows on a console the records logged from files under ``sources`` (the project's own
    stage lines, whatever logger carries them: Prefect's run logger passes them as ``log=``);
    records logged from any other file (Prefect's engine, libraries) are not shown."""

    def __init__(self, console: Console, sources: Iterable[Path], level: int = logging.INFO):
        super().__init__(level)
        self.console = console
        self.sources = tuple(str(Path(s).resolve()) + os.sep for s in sources)

    def filter(self, record: logging.LogRecord) -> bool:
        return super().filter(record) and os.path.abspath(record.pathname).startswith(self.sources)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.line(record.getMessage())
        except Exception:  # noqa: BLE001 - logging must not fail the run
            self.handleError(record)


@contextlib.contextmanager
def output_to(path: str | Path) -> Iterator[TextIO]:
    """Point file descriptors 1 and 2 of this process at ``path`` (appended) for the block, and
    yield a text stream on the original stderr, for the console.

    Everything written to the fds — C-level prints, Python's ``sys.stdout``/``sys.stderr`` (and
    the logging handlers holding them), child processes started in the block, which inherit the
    fds — goes to the file. The fds are restored on exit."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    log_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    console = os.fdopen(os.dup(saved_err), "w", buffering=1, encoding="utf-8", errors="replace")
    try:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        yield console
    finally:
        for stream in (sys.stdout, sys.stderr, console):
            with contextlib.suppress(Exception):
                stream.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        for fd in (saved_out, saved_err, log_fd):
            os.close(fd)
        with contextlib.suppress(Exception):
            console.close()
