"""Where the CPU of a stream open goes: each xsockd daemon's loop thread and its pumps.

Runs the suite's open figure (connect, 1-byte echo, close, N times in turn) through xsockd and,
with ``--baseline TREE``, through another tree's xsockd, interleaved, ``--repeat`` rounds; and
reads ``/proc/<pid>/task/<tid>/schedstat`` of every daemon thread before and after each round.
The thread whose id is the process id is the daemon's Python loop; the others are its link's
pump threads.  Prints, per path, the median open p50, opens per second and CPU us per open of
xsockd 1's loop, xsockd 1's pumps, xsockd 2's loop and xsockd 2's pumps.

``--busy dbus`` measures the opens while the daemons' Python control plane is kept busy: each
daemon serves D-Bus on a private bus of its own, and during each round (and only then) a client
process calls GetStatistics and ListChannels on both daemons back to back, without pause.
``--busy sigusr1`` instead sends both daemons SIGUSR1 (a channel table written to the log)
every millisecond during each round.  The load is the same for every path.  ``--gap MS``
spaces the D-Bus calls; ``--hold N`` keeps N idle streams open through each path for the whole
run, so that each ListChannels (and each SIGUSR1 table) is long: with a gap, the loop is then
held for a while at a time without the machine's CPUs being saturated by the load itself.

    .venv/bin/python -m bench.bench_opens [--opens N] [--repeat R] [--baseline TREE]
                                          [--busy {dbus,sigusr1}] [--gap MS] [--hold N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.suite import Xsockd, client, interleaved, pct, start_server

PARTS = ("loop 1", "pumps 1", "loop 2", "pumps 2")

# The D-Bus load: both daemons' GetStatistics and ListChannels, ``gap`` ms apart (0: back to
# back), until SIGTERM; then it prints the mean ms of its ListChannels calls.
DBUS_LOAD = r"""
import signal, sys, time
from gi.repository import Gio, GLib
from xsockd.constants import DBUS_INTERFACE, DBUS_NAME, DBUS_PATH
flags = (Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT
         | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION)
gap = float(sys.argv[1]) / 1000
cons = [Gio.DBusConnection.new_for_address_sync(a, flags, None, None) for a in sys.argv[2:]]
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
lists = []
print("ready", flush=True)
while not stop:
    for con in cons:
        for method, reply in (("GetStatistics", "(a{sv})"), ("ListChannels", "(aa{sv})")):
            t0 = time.perf_counter()
            con.call_sync(DBUS_NAME, DBUS_PATH, DBUS_INTERFACE, method, None,
                          GLib.VariantType(reply), Gio.DBusCallFlags.NONE, 30_000, None)
            if method == "ListChannels":
                lists.append(time.perf_counter() - t0)
            if gap:
                time.sleep(gap)
print(sum(lists) / max(1, len(lists)) * 1000, flush=True)
"""

# The signal load: SIGUSR1 to every pid given, every millisecond, until killed.
SIGNAL_LOAD = r"""
import os, signal, sys, time
pids = [int(a) for a in sys.argv[1:]]
print("ready", flush=True)
while True:
    for pid in pids:
        os.kill(pid, signal.SIGUSR1)
    time.sleep(0.001)
"""


def start_bus() -> tuple[str, int]:
    """Starts a private dbus-daemon; returns its address and pid."""
    out = subprocess.run(["dbus-daemon", "--session", "--fork", "--print-address=1",
                          "--print-pid=1"], capture_output=True, text=True, check=True).stdout
    address, pid = out.split()[:2]
    return address, int(pid)


def start_load(busy: str, path: Xsockd, buses: dict[int, str],
               gap: float) -> subprocess.Popen[str]:
    """Starts the ``busy`` load against ``path``'s daemons; returns once it runs."""
    if busy == "dbus":
        cmd = [sys.executable, "-c", DBUS_LOAD, str(gap), *buses.values()]
    else:
        cmd = [sys.executable, "-c", SIGNAL_LOAD,
               *(str(d.proc.pid) for d in path.daemons if d.proc)]
    load = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert load.stdout is not None
    if load.stdout.readline().strip() != "ready":
        raise RuntimeError(f"the {busy} load did not start (status {load.wait()})")
    return load


def hold_streams(path: Xsockd, n: int) -> list[socket.socket]:
    """Opens ``n`` streams through ``path`` (each echoes a byte, so it is open end to end)
    and returns them, to be kept idle."""
    held = []
    for _ in range(n):
        c = socket.socket(socket.AF_UNIX)
        held.append(c)
        c.connect(path.connect)
        c.sendall(b"h")
        if c.recv(1) != b"h":
            raise RuntimeError(f"a held stream through {path.name} did not echo")
    return held


def stop_load(load: subprocess.Popen[str]) -> float:
    """Stops a load; returns the mean ms of its ListChannels calls (0 for SIGUSR1)."""
    load.send_signal(signal.SIGTERM)
    assert load.stdout is not None
    out = load.stdout.read().strip()  # the signal load dies of SIGTERM, saying nothing
    load.wait()
    load.stdout.close()
    return float(out) if out else 0.0


def threads_cpu(pid: int) -> tuple[float, float]:
    """Returns (CPU s of the main thread, CPU s of every other live thread) of ``pid``."""
    main = others = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                ns = int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(task) == pid:
            main += ns
        else:
            others += ns
    return main / 1e9, others / 1e9


def split_cpu(path: Xsockd) -> list[float]:
    out: list[float] = []
    for d in path.daemons:
        assert d.proc is not None
        out += threads_cpu(d.proc.pid)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.bench_opens", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--opens", type=int, default=3000, help="opens per round (default 3000)")
    p.add_argument("--repeat", type=int, default=3, help="rounds, the median kept (default 3)")
    p.add_argument("--baseline", type=Path, metavar="TREE",
                   help="also another source tree's xsockd (its C core built in place)")
    p.add_argument("--busy", choices=("dbus", "sigusr1"),
                   help="keep the daemons' Python control plane busy during each round")
    p.add_argument("--gap", type=float, default=0.0, metavar="MS",
                   help="with --busy dbus: ms between calls (default 0: back to back)")
    p.add_argument("--hold", type=int, default=0, metavar="N",
                   help="idle streams held open through each path (default 0)")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="xsockd-opens-"))
    os.chmod(work, 0o755)
    server, server_path = start_server(work)
    paths: list[Xsockd] = []
    held: list[socket.socket] = []
    bus_pids: list[int] = []
    buses: dict[str, dict[int, str]] = {}  # path name -> domain -> its private bus

    def new_buses() -> dict[int, str]:
        if args.busy != "dbus":
            return {}
        out = {}
        for domid in (1, 2):
            out[domid], pid = start_bus()
            bus_pids.append(pid)
        return out

    try:
        b = new_buses()
        paths.append(Xsockd(work, server_path, "1MiB", "1MiB", dbus=b))
        buses[paths[-1].name] = b
        if args.baseline:
            b = new_buses()
            paths.append(Xsockd(work, server_path, "1MiB", "1MiB", args.baseline.resolve(),
                                dbus=b))
            buses[paths[-1].name] = b
        for path in paths:
            client(path, "open", 1)  # sets up the link: a first stream is not what is measured
            held += hold_streams(path, args.hold)

        def measure(path: object) -> dict[str, float]:
            assert isinstance(path, Xsockd)
            load = start_load(args.busy, path, buses[path.name], args.gap) if args.busy else None
            list_ms = 0.0
            try:
                before = split_cpu(path)
                r = client(path, "open", args.opens)
                after = split_cpu(path)
            finally:
                if load:
                    list_ms = stop_load(load)
            lat = [x / 1e3 for x in r["lat"]]  # type: ignore[index]
            cpu = {name: (a - b) / args.opens * 1e6
                   for name, a, b in zip(PARTS, after, before, strict=True)}
            return {"p50": pct(lat, 50), "p99": pct(lat, 99),
                    "per_s": args.opens / r["wall"], **cpu,  # type: ignore[index]
                    "list_ms": list_ms}

        runs = interleaved(paths, args.repeat, measure)  # type: ignore[arg-type]
    finally:
        for c in held:
            c.close()
        for path in reversed(paths):
            path.close()
        server.kill()
        server.wait()
        for pid in bus_pids:
            os.kill(pid, signal.SIGTERM)
        shutil.rmtree(work, ignore_errors=True)
    keys: tuple[str, ...] = ("p50", "p99", "per_s", *PARTS)
    busy_dbus = args.busy == "dbus"
    if busy_dbus:
        keys += ("list_ms",)
    if args.busy:
        print(f"while busy: {args.busy}, gap {args.gap:g} ms, {args.hold} streams held open")
    print("| path | open p50 (us) | p99 (us) | opens/s | " +
          " | ".join(f"{k} (us CPU/open)" for k in PARTS) +
          (" | ListChannels (ms, mean)" if busy_dbus else "") + " | total |")
    print("|---" * (len(keys) + 2) + "|")
    for name, rounds in runs.items():
        med = {k: statistics.median(r[k] for r in rounds) for k in keys}  # type: ignore[index]
        spread = {k: (min(r[k] for r in rounds), max(r[k] for r in rounds))  # type: ignore[index]
                  for k in keys}
        dg = {k: 1 if k == "list_ms" else 0 for k in keys}
        cells = [f"{med[k]:.{dg[k]}f} ({spread[k][0]:.{dg[k]}f}-{spread[k][1]:.{dg[k]}f})"
                 for k in keys]
        print(f"| {name} | " + " | ".join(cells) +
              f" | {sum(med[k] for k in PARTS):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
