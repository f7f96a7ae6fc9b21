"""The benchmark suite runs end to end in quick mode: every figure in its JSON, both plots drawn.

No timing is asserted: the figures of a quick run on a shared machine mean nothing; this checks
that the suite measures what it says it does (bench/suite.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.strace_opens import parse_summary

ROOT = Path(__file__).resolve().parent.parent
PATHS = {"direct", "socat", "xsockd"}


def test_quick_suite_writes_every_figure_and_the_plots(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bench.suite", "--quick", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "suite.json").read_text())["results"]
    assert set(res["throughput_mb_s"]) == {"4096", "65536", "1048576"}
    for by_path in res["throughput_mb_s"].values():
        assert set(by_path) == PATHS and all(v > 0 for v in by_path.values())
    assert set(res["streams_mb_s"]) == PATHS and all(v > 0 for v in res["streams_mb_s"].values())
    assert set(res["round_trip_us"]) == {"1", "4096"}
    for by_path in res["round_trip_us"].values():
        assert set(by_path) == PATHS
        assert all(0 < v["p50"] <= v["p99"] for v in by_path.values())
    assert set(res["open"]) == PATHS
    assert all(v["p50"] > 0 and v["per_s"] > 0 for v in res["open"].values())
    cpu = res["cpu_s_per_gib"]
    assert cpu["direct"] is None and cpu["socat"] > 0 and cpu["xsockd"] > 0, cpu
    for relay in ("socat", "xsockd"):
        assert all(v[relay]["cpu_us"] > 0 for v in res["round_trip_us"].values()), relay
        assert res["open"][relay]["cpu_us"] > 0, relay
    for png in ("throughput.png", "latency.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    # The table names every figure, with xsockd's ratios.
    assert "| round trip, 1 byte, p50 (us) |" in r.stdout
    assert "| opens per second" in r.stdout and "xsockd/socat" in r.stdout
    assert_no_zero_cpu(r.stdout)


def assert_no_zero_cpu(table: str) -> None:
    """Every relay moved data, so no relay CPU figure may read 0: a 0 is a clock too coarse
    for the run (socat's reaped children were once counted in 10 ms ticks)."""
    lines = [line for line in table.splitlines() if line.startswith("| case |")]
    assert lines, "no table header in the output"
    names = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [line for line in table.splitlines() if line.startswith("| relay CPU")]
    assert len(rows) == 4, rows
    for row in rows:
        cells = dict(zip(names, (c.strip() for c in row.strip("|").split("|")), strict=False))
        for relay in ("socat", "xsockd"):
            assert cells[relay] not in ("-", "") and float(cells[relay]) > 0, row


def _opens_row(out: str) -> list[str]:
    """The cells of bench_opens' xsockd row, which must be there."""
    rows = [line for line in out.splitlines() if line.startswith("| xsockd |")]
    assert len(rows) == 1, out
    return [c.strip() for c in rows[0].strip("|").split("|")]


def test_opens_while_the_loop_is_busy_with_dbus():
    """bench_opens --busy dbus: the load ran (its ListChannels times are reported, over the
    held streams) and the opens were measured all the same."""
    r = subprocess.run([sys.executable, "-m", "bench.bench_opens", "--opens", "100",
                        "--repeat", "1", "--busy", "dbus", "--gap", "1", "--hold", "20"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "while busy: dbus, gap 1 ms, 20 streams held open" in r.stdout, r.stdout
    cells = _opens_row(r.stdout)
    assert float(cells[3].split()[0]) > 0, cells  # opens/s
    assert float(cells[8].split()[0]) > 0, cells  # ListChannels ms: the load called


def test_opens_while_the_loop_is_busy_with_sigusr1():
    r = subprocess.run([sys.executable, "-m", "bench.bench_opens", "--opens", "100",
                        "--repeat", "1", "--busy", "sigusr1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "while busy: sigusr1" in r.stdout, r.stdout
    cells = _opens_row(r.stdout)
    assert float(cells[1].split()[0]) > 0 and float(cells[3].split()[0]) > 0, cells


def test_a_baseline_tree_is_the_one_its_daemons_load(tmp_path, monkeypatch):
    """Regression: run from a source tree (as every bench is), "python -m" put that tree
    ahead of the baseline's PYTHONPATH, and --baseline measured this tree twice."""
    from bench.suite import Xsockd

    tree = tmp_path / "other"
    shutil.copytree(ROOT / "xsockd", tree / "xsockd",
                    ignore=shutil.ignore_patterns("__pycache__"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(ROOT)  # the daemons' working directory: this tree
    path = Xsockd(work, str(tmp_path / "server.sock"), "64KiB", "64KiB", tree)
    try:
        for d in path.daemons:
            assert d.proc is not None
            maps = Path(f"/proc/{d.proc.pid}/maps").read_text()
            cores = {line.split()[-1] for line in maps.splitlines() if "_ring_core" in line}
            assert cores == {str(tree / "xsockd" / "_ring_core.abi3.so")}, cores
    finally:
        path.close()


def test_strace_summary_is_read_with_and_without_errors():
    text = """% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 40.00    0.004000           1      3000      1000 recvmsg
 10.00    0.001000           1      1000           close
------ ----------- ----------- --------- --------- ----------------
100.00    0.005000           1      4000      1000 total
"""
    assert parse_summary(text) == {"recvmsg": (3000, 1000), "close": (1000, 0)}


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_strace_opens_counts_each_daemons_calls_per_open():
    r = subprocess.run([sys.executable, "-m", "bench.strace_opens", "--opens", "50"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")[1:]]
            for line in r.stdout.splitlines() if line.startswith("| ")}
    assert rows["accept4"][0].startswith("1.00"), r.stdout  # the opening side accepts
    assert rows["connect"] == ["0.00", "1.00"], r.stdout  # the accepting side connects
    assert float(rows["total"][0]) > 5 and float(rows["total"][1]) > 5, r.stdout
