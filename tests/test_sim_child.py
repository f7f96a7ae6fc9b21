"""terminate(): how the host, the daemons and the peer farm are stopped (xsockd/sim/child.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from xsockd.sim.child import terminate


def _child(code: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", code + "\nprint('up', flush=True)\n"
                             "import time\ntime.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "up\n"
    return proc


def test_a_child_that_stops_on_sigterm_reports_its_status() -> None:
    proc = _child("import signal, sys\n"
                  "signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))")
    assert terminate(proc, 10) == 3
    assert terminate(proc, 10) == 3  # already reaped: nothing sent, the same status
    proc.stdout.close()  # type: ignore[union-attr]


def test_a_child_that_ignores_sigterm_is_killed_after_the_timeout() -> None:
    proc = _child("import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)")
    start = time.monotonic()
    assert terminate(proc, 0.3) == -signal.SIGKILL
    assert 0.3 <= time.monotonic() - start < 10
    proc.stdout.close()  # type: ignore[union-attr]
