"""Named crash points for fault-injection tests of resume.

``SELFALIGN_CRASH_AT=<point>`` makes the run SIGKILL itself the first time it reaches that
point (e.g. ``iter1/judge/shard1``, ``iter1/train/step2``), so tests kill at a known stage
instead of sleeping for a guessed time. ``SELFALIGN_RUN_PID`` names the process to kill, so a
crash inside the training subprocess takes the whole run down, as a real SIGKILL/OOM would.
``SELFALIGN_CRASH_SIGNAL=SIGINT`` (or ``SIGTERM``) sends that signal to the run process instead
and returns, so the process's own handling of Ctrl-C / preemption is what gets tested.
Unset (always, outside tests), this is a dictionary lookup.

Points: ``iter{t}/{stage}/shard{i}`` (shard i written), ``iter{t}/{stage}/before_commit``,
``iter{t}/{stage}/after_commit``, ``iter{t}/train/step{n}``, ``iter{t}/train/saved{n}``
(checkpoint n on disk), ``iter{t}/train/before_save``, ``iter{t}/train/before_commit``.
"""

from __future__ import annotations

import os
import signal


def crash_point(name: str) -> None:
    if os.environ.get("SELFALIGN_CRASH_AT") != name:
        return
    run_pid = int(os.environ.get("SELFALIGN_RUN_PID", os.getpid()))
    sig_name = os.environ.get("SELFALIGN_CRASH_SIGNAL", "SIGKILL").upper()
    sig = getattr(signal, sig_name if sig_name.startswith("SIG") else "SIG" + sig_name)
    if sig != signal.SIGKILL:
        # Fire once: a resumed run in the same environment must get past this point.
        os.environ.pop("SELFALIGN_CRASH_AT", None)
        os.kill(run_pid, sig)
        return
    if run_pid != os.getpid():
        os.kill(run_pid, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
