"""A private dbus-daemon for tests: what a by-hand run uses instead of the system bus.

    dbus-daemon --session --fork --print-address=1 --print-pid=1

prints the bus's address and its pid; ``xsockd --dbus-address ADDR`` serves it and
``xsockctl --address ADDR`` talks to it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


class PrivateBus:
    """A dbus-daemon of our own; ready once it has printed its address and pid."""

    def __init__(self, config: Path | None = None) -> None:
        how = [f"--config-file={config}"] if config else ["--session"]
        out = subprocess.run(["dbus-daemon", *how, "--fork", "--print-address=1",
                              "--print-pid=1"], capture_output=True, text=True, check=True,
                             timeout=30).stdout.split()
        self.address, self.pid = out[0], int(out[1])

    def close(self) -> None:
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.02)
        os.kill(self.pid, signal.SIGKILL)
