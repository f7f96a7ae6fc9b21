"""The command line: help texts and clear errors without tracebacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from xsockd.cli import parse_args
from xsockd.demo import DaemonProcess, write_config


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


def test_demo_help_states_ring_size_default_unit_and_range():
    out = xsockd("demo", "--help").stdout
    assert "default 256KiB" in out and "4KiB to 1MiB" in out and "64KiB" in out
    assert "--keep" not in out and "kept" in out  # --dir is the one way to keep the logs


@pytest.mark.parametrize("args, says", [
    (["--ring-size", "1000"], "4KiB to 1MiB"),
    (["--ring-size", "0"], "4KiB to 1MiB"),
    (["--ring-size", "8388608"], "4KiB to 1MiB"),
    (["--ring-size", "2MiB"], "4KiB to 1MiB"),  # a valid size, but more than 1024 grant pages
    (["--ring-size", "lots"], "not a size"),
    (["--mib", "-1"], "positive integer"),
    (["--mib", "0"], "positive integer"),
    (["--keep"], "unrecognized arguments"),
])
def test_demo_refuses_bad_options_before_starting_anything(args, says):
    r = xsockd("demo", *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert says in r.stderr and r.stderr.startswith("usage: xsockd demo")
    assert r.stdout == ""  # nothing started


def test_daemon_that_fails_to_start_reports_why(tmp_path):
    """start() waits until the process is reaped, so its stderr is always in the error."""
    conf = write_config(tmp_path / "c.conf", rundir=tmp_path / "run", sim_dir=tmp_path / "sim",
                        peers=[2], ring_size="1000")
    for i in range(5):
        d = DaemonProcess(1, conf, tmp_path / f"xsockd-{i}.log")
        with pytest.raises(RuntimeError, match=r"exited with status 1\):\n.*link\.ring_size"):
            d.start()
        d.stop()


def test_demo_shows_the_tables_with_the_stream_open_and_dir_keeps_the_logs(tmp_path):
    work = tmp_path / "work"
    r = xsockd("demo", "--mib", "1", "--ring-size", "16KiB", "--dir", str(work))
    assert r.returncode == 0 and "demo passed" in r.stdout, r.stdout + r.stderr
    assert r.stdout.count("during the transfer (stream open)") == 2
    assert r.stdout.count("channel table (1 channel,") == 2
    assert "ring 16384 bytes/direction" in r.stdout
    assert f"kept in {work}" in r.stdout
    assert (work / "xsockd-1.log").stat().st_size and (work / "xsockd-2.log").stat().st_size
    # The directory is the demo's now: a second run may overwrite it.
    r = xsockd("demo", "--mib", "1", "--ring-size", "16KiB", "--dir", str(work))
    assert r.returncode == 0 and "demo passed" in r.stdout, r.stdout + r.stderr


def test_demo_refuses_a_directory_that_is_not_its_own(tmp_path):
    """--dir /tmp once overwrote dom1.conf, echo.sock, run1/ and sim/ there silently."""
    (tmp_path / "dom1.conf").write_text("someone else's\n")
    r = xsockd("demo", "--mib", "1", "--dir", str(tmp_path))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"{tmp_path} is not empty" in r.stderr and "new or empty directory" in r.stderr
    assert r.stdout == ""  # nothing started
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dom1.conf"]
    assert (tmp_path / "dom1.conf").read_text() == "someone else's\n"


@pytest.mark.parametrize("argv", [
    ["--json", "--address", "unix:path=/b", "show", "7"],
    ["show", "7", "--json", "--address", "unix:path=/b"],
    ["--address", "unix:path=/b", "show", "--json", "7"],
    ["--json", "show", "7", "--address", "unix:path=/b"],
])
def test_xsockctl_global_options_before_or_after_the_command(argv):
    args = parse_args(argv)
    assert (args.command, args.id, args.json, args.address) == ("show", 7, True, "unix:path=/b")


def test_xsockctl_defaults_and_conflicting_buses(capsys):
    args = parse_args(["list"])
    assert (args.json, args.system, args.address) == (False, False, None)
    with pytest.raises(SystemExit) as e:
        parse_args(["--system", "list", "--address", "unix:path=/b"])
    assert e.value.code == 2 and "two different buses" in capsys.readouterr().err


def test_show_names_the_default_service_as_list_does():
    from xsockd.cli import format_fields
    assert "service: (default)" in format_fields({"id": 3, "service": ""}).splitlines()
    assert "service: web" in format_fields({"id": 3, "service": "web"}).splitlines()


@pytest.mark.parametrize("value", ["-3", "32752", "x"])
def test_daemon_refuses_an_impossible_domid(value):
    conf = str(Path(__file__).resolve().parent.parent / "conf" / "xsockd.conf")
    r = xsockd("--check-config", conf, "--domid", value)
    assert r.returncode == 2 and "argument --domid" in r.stderr, r.stderr


def test_simhost_refuses_a_domain_listed_twice(tmp_path):
    r = subprocess.run([sys.executable, "-m", "xsockd.sim.host", "--dir", str(tmp_path),
                        "--domains", "1,1"], capture_output=True, text=True)
    assert r.returncode == 2 and "listed twice" in r.stderr and "Traceback" not in r.stderr
