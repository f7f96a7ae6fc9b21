"""The command line: help texts and clear errors without tracebacks."""

from __future__ import annotations

import subprocess
import sys


def xsockd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xsockd.daemon", *args], capture_output=True,
                          text=True, timeout=60)


def test_help_names_every_command_and_option():
    out = xsockd("--help").stdout
    for word in ("xsockd demo", "--check-config", "--backend", "--domid", "--sim-dir",
                 "--rundir", "--config", "<rundir>/N.sock"):
        assert word in out, word


def test_demo_help():
    out = xsockd("demo", "--help").stdout
    assert "--mib" in out and "sha256" in out


def test_sim_backend_without_domid_or_host_says_what_to_do(tmp_path):
    conf = tmp_path / "c.conf"
    conf.write_text(f'[daemon]\npeers = [2]\nrundir = "{tmp_path}/run"\n'
                    f'sim_dir = "{tmp_path}/nosim"\n')
    r = xsockd("--backend", "sim", "--config", str(conf))
    assert r.returncode == 1 and "--domid" in r.stderr and "Traceback" not in r.stderr
    r = xsockd("--backend", "sim", "--domid", "1", "--config", str(conf))
    assert r.returncode == 1 and "xsockd.sim.host" in r.stderr and "Traceback" not in r.stderr


def test_xen_backend_without_xen_names_the_fix(tmp_path):
    conf = tmp_path / "c.conf"
    conf.write_text(f'[daemon]\npeers = [2]\nrundir = "{tmp_path}/run"\n')
    r = xsockd("--backend", "xen", "--config", str(conf))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "/dev/xen is missing" in r.stderr and "xen-gntalloc" in r.stderr
