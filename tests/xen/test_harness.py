"""The harness itself, without booting anything: a stand-in QEMU (a real process) shows that
steps and figures are read, and that the emulator is killed however a run ends."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import harness
import pytest

FAKE_QEMU = """#!/bin/sh
echo $$ > {pidfile}
echo "XSOCK-STEP xenstored PASS"
echo "DOMU: XSOCK-STEP domu-thing FAIL it broke"
echo "XSOCK-FIGURE xsockd.open_ms 12.5"
{rest}
"""


@pytest.fixture
def fake_qemu(tmp_path, monkeypatch):
    """Returns a function installing a fake qemu-system-x86_64 whose tail is ``rest``."""
    def install(rest: str) -> Path:
        pidfile = tmp_path / "qemu.pid"
        exe = tmp_path / "bin" / "qemu-system-x86_64"
        exe.parent.mkdir(exist_ok=True)
        exe.write_text(FAKE_QEMU.format(pidfile=pidfile, rest=rest))
        exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
        monkeypatch.setenv("PATH", f"{exe.parent}:{os.environ['PATH']}")
        monkeypatch.setattr(harness, "build", lambda *a: (tmp_path, tmp_path, tmp_path))
        return pidfile
    return install


def gone(pidfile: Path) -> bool:
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_steps_and_figures_are_read_and_the_run_ends_at_dom0_done(fake_qemu):
    pidfile = fake_qemu('echo "XSOCK-STEP dom0-done PASS"\nexec sleep 600')
    r = harness.run("", "", timeout=60, echo=False)
    assert r.steps["dom0:xenstored"] == (True, "")
    assert r.steps["domU:domu-thing"] == (False, "it broke")
    assert r.figures == {"xsockd.open_ms": "12.5"}
    assert r.seconds < 30 and gone(pidfile), "the emulator was left running after dom0-done"


def test_the_second_domus_lines_are_its_own(fake_qemu):
    fake_qemu('echo "DOMU2: XSOCK-STEP attack FAIL squatted"\n'
              'echo "DOMU2: XSOCK-FIGURE xsockd.open_ms 99"\necho "XSOCK-STEP dom0-done PASS"')
    r = harness.run("", "", timeout=60, echo=False, third_script="")
    assert r.steps["domU2:attack"] == (False, "squatted")
    assert "dom0:attack" not in r.steps and r.figures == {"xsockd.open_ms": "12.5"}


def test_a_run_past_its_time_is_a_failed_step_and_the_emulator_is_killed(fake_qemu):
    pidfile = fake_qemu("exec sleep 600")  # prints nothing more: a hung guest
    start = time.monotonic()
    r = harness.run("", "", timeout=2, echo=False)
    assert 1.5 < time.monotonic() - start < 20
    ok, why = r.steps["harness:timeout"]
    assert not ok and "past 2 s" in why
    assert gone(pidfile), "the emulator was left running after the timeout"


def test_an_interrupted_run_kills_the_emulator(fake_qemu):
    pidfile = fake_qemu("exec sleep 600")
    lines = harness.boot("", "", timeout=60)
    assert next(lines) == "XSOCK-STEP xenstored PASS"
    lines.close()  # what an exception or Ctrl-C in the caller does to the generator
    assert gone(pidfile)


def test_a_missing_emulator_fails_with_the_package_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="apt-get install qemu-system-x86"):
        next(harness.boot("", "", timeout=5))
