"""Named crash points for fault-injection tests of resume.

``SELFALIGN_CRASH_AT=<point>`` makes the run SIGKILL itself the first time it reaches that
point (e.g. ``iter1/judge/shard1``, ``iter1/train/step2``), so tests kill at a known stage
instead of sleeping for a guessed time. ``SELFALIGN_RUN_PID`` names the process to kill, so a
crash inside the training subprocess takes the whole run down, as a real SIGKILL/OOM would.
Unset (always, outside tests), this is a dictionary lookup.
"""

from __future__ import annotations

import os
import signal


def crash_point(name: str) -> None:
    if os.environ.get("SELFALIGN_CRASH_AT") != name:
        return
    run_pid = int(os.environ.get("SELFALIGN_RUN_PID", os.getpid()))
    if run_pid != os.getpid():
        os.kill(run_pid, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
