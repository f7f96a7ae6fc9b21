"""Stopping a child process of the simulation (the host, a daemon, the tests' peer farm)."""

from __future__ import annotations

import signal
import subprocess
from typing import Any

__all__ = ["terminate"]


def terminate(proc: subprocess.Popen[Any], timeout: float) -> int:
    """Asks ``proc`` to stop with SIGTERM, so that it can release what it holds and report
    leaks; kills it if it has not exited within ``timeout`` seconds.  Returns its exit status.
    Its pipes are the caller's to close."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
