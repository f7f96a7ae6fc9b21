"""The systemd units: systemd-analyze verify is silent on each, and the hardening holds."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).parent.parent / "units"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def unit_dir(tmp_path_factory):
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing: apt-get install systemd")
    for tool in ("xsockd", "xsockd-simhost"):
        if not (BIN / tool).exists():
            pytest.fail(f"{BIN / tool} is missing: install the project (./run setup)")
    d = tmp_path_factory.mktemp("units")
    # ExecStart names /usr/bin (where the Debian package puts them); verify needs the binaries
    # to exist, so point the copies at this environment's.
    for unit in UNITS.glob("*.service"):
        (d / unit.name).write_text(unit.read_text().replace("/usr/bin/xsockd", f"{BIN}/xsockd"))
    # The sim drop-in, merged into a copy of the unit as systemd would apply it.
    drop_in = (UNITS / "xsockd.service.d" / "sim.conf").read_text()
    (d / "xsockd-sim.service").write_text((d / "xsockd.service").read_text() + "\n"
                                          + drop_in.replace("/usr/bin/xsockd", f"{BIN}/xsockd"))
    return d


@pytest.mark.parametrize("unit", ["xsockd.service", "xsockd-simhost.service",
                                  "xsockd-sim.service"])
def test_verify_is_silent(unit_dir, unit):
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", f"./{unit}"], cwd=unit_dir,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stdout + r.stderr


def test_security_exposure_is_low(unit_dir):
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", "./xsockd.service"],
                       cwd=unit_dir, capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for xsockd.service: ([0-9.]+)", r.stdout)
    assert m, r.stdout[-2000:] + r.stderr
    print(f"systemd-analyze security: exposure {m.group(1)}")
    assert float(m.group(1)) <= 2.0


def test_unit_runs_the_daemon_as_type_notify_with_a_watchdog():
    text = (UNITS / "xsockd.service").read_text()
    for line in ("Type=notify", "WatchdogSec=", "ExecReload=/bin/kill -HUP $MAINPID",
                 "RuntimeDirectory=xsock", "DeviceAllow=/dev/xen/gntalloc rw",
                 # Enabled on a machine without Xen, the unit is skipped, not failed.
                 "ConditionPathExists=/dev/xen"):
        assert line in text


def test_units_run_what_the_debian_package_installs():
    # The package puts console scripts in /usr/bin (debian/, ./run deb); /usr/local is not its.
    for unit in [*UNITS.glob("*.service"), UNITS / "xsockd.service.d" / "sim.conf"]:
        execs = re.findall(r"^Exec\w+=(\S+)", unit.read_text(), re.M)
        assert execs and all(e in ("/usr/bin/xsockd", "/usr/bin/xsockd-simhost", "/bin/kill")
                             for e in execs), f"{unit.name}: {execs}"
