#!/usr/bin/env python3
"""How fast xsockd's D-Bus face answers ListChannels, idle and while 16 streams run flat out.

On the simulated host, a writer process opens 16 streams from domain 1 to a sink service in
domain 2 (through both daemons and a shared ring).  With the 16 channels open, this script
times ListChannels calls to domain 1's daemon over a private dbus-daemon: first with no data
moving, then while the 16 streams move data as fast as they can.  It prints median, p99 and
max latency in ms for both, and the data rate during the loaded phase.  Target: a list answers
within 100 ms under load.

    .venv/bin/python bench/bench_dbus.py [--calls N] [--streams S]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gi.repository import Gio, GLib

from xsockd.constants import DBUS_INTERFACE, DBUS_NAME, DBUS_PATH
from xsockd.demo import DaemonProcess, write_config
from xsockd.sim.host import SimHost

# The sink: accept connections, read each to EOF into a reused buffer (one thread each).
SINK = r"""
import socket, sys, threading
srv = socket.socket(socket.AF_UNIX); srv.bind(sys.argv[1]); srv.listen(64)
print("ready", flush=True)
def drain(c):
    buf = bytearray(1 << 20)
    while c.recv_into(buf): pass
    c.close()
while True:
    c, _ = srv.accept(); threading.Thread(target=drain, args=(c,), daemon=True).start()
"""

# The writer: open S streams, say so, wait for "go", write flat out for T seconds, report bytes.
WRITER = r"""
import socket, sys, threading, time
path, n, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
socks = []
for _ in range(n):
    s = socket.socket(socket.AF_UNIX); s.connect(path); socks.append(s)
print("connected", flush=True)
sys.stdin.readline()
total = [0] * n; chunk = b"\xa5" * (1 << 20); end = time.monotonic() + secs
def pump(i):
    while time.monotonic() < end:
        socks[i].sendall(chunk); total[i] += len(chunk)
ts = [threading.Thread(target=pump, args=(i,)) for i in range(n)]
t0 = time.monotonic()
for t in ts: t.start()
for t in ts: t.join()
print(sum(total), time.monotonic() - t0, flush=True)
for s in socks: s.close()
"""


def list_latencies(con: Gio.DBusConnection, calls: int, expect: int,
                   gap: float = 0.01) -> tuple[list[float], list[float]]:
    """Returns the latencies in ms of ``calls`` ListChannels calls, ``gap`` seconds apart,
    and of as many calls of the bus daemon's own GetId (the bus round trip alone)."""
    lists, pings = [], []
    for _ in range(calls):
        t0 = time.perf_counter()
        reply = con.call_sync(DBUS_NAME, DBUS_PATH, DBUS_INTERFACE, "ListChannels", None,
                              GLib.VariantType("(aa{sv})"), Gio.DBusCallFlags.NONE, 30_000, None)
        lists.append((time.perf_counter() - t0) * 1000)
        n = len(reply.unpack()[0])
        if n != expect:
            raise RuntimeError(f"ListChannels returned {n} channels, expected {expect}")
        time.sleep(gap / 2)
        t0 = time.perf_counter()
        con.call_sync("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                      "GetId", None, GLib.VariantType("(s)"), Gio.DBusCallFlags.NONE, 30_000,
                      None)
        pings.append((time.perf_counter() - t0) * 1000)
        time.sleep(gap / 2)
    return lists, pings


def summary(ms: list[float]) -> str:
    ordered = sorted(ms)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return (f"median {statistics.median(ordered):7.2f} ms   p99 {p99:7.2f} ms   "
            f"max {ordered[-1]:7.2f} ms   ({len(ordered)} calls)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=300, help="ListChannels calls per phase")
    ap.add_argument("--streams", type=int, default=16, help="concurrent streams")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="xsockd-bench-dbus-"))
    out = subprocess.run(["dbus-daemon", "--session", "--fork", "--print-address=1",
                          "--print-pid=1"], capture_output=True, text=True, check=True).stdout
    address, bus_pid = out.split()[0], int(out.split()[1])
    procs: list[subprocess.Popen[str]] = []
    daemons: list[DaemonProcess] = []
    try:
        with SimHost(work / "sim", domains=[0, 1, 2]):
            sink_path = work / "sink.sock"
            sink = subprocess.Popen([sys.executable, "-c", SINK, str(sink_path)],
                                    stdout=subprocess.PIPE, text=True)
            procs.append(sink)
            assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
            for dom, peer in ((2, 1), (1, 2)):
                services = {"sink": sink_path} if dom == 2 else None
                conf = write_config(work / f"dom{dom}.conf", rundir=work / f"run{dom}",
                                    sim_dir=work / "sim", peers=[peer], services=services,
                                    default="sink" if services else None, ring_size="1MiB")
                d = DaemonProcess(dom, conf, work / f"xsockd-{dom}.log",
                                  dbus_address=address if dom == 1 else None)
                d.start()
                daemons.append(d)
            secs = 3600.0  # stopped by the writer's end below; the phase is bounded by calls
            writer = subprocess.Popen(
                [sys.executable, "-c", WRITER, str(work / "run1" / "2.sock"),
                 str(args.streams), str(secs)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            procs.append(writer)
            assert writer.stdin is not None and writer.stdout is not None
            assert writer.stdout.readline().strip() == "connected"
            con = Gio.DBusConnection.new_for_address_sync(
                address, Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT
                | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION, None, None)
            deadline = time.monotonic() + 10
            while True:  # every stream admitted and listed
                try:
                    list_latencies(con, 1, args.streams, 0)
                    break
                except RuntimeError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            idle, idle_ping = list_latencies(con, args.calls, args.streams)
            stats0 = con.call_sync(DBUS_NAME, DBUS_PATH, DBUS_INTERFACE, "GetStatistics", None,
                                   GLib.VariantType("(a{sv})"), Gio.DBusCallFlags.NONE, 30_000,
                                   None).unpack()[0]
            writer.stdin.write("go\n")
            writer.stdin.flush()
            time.sleep(1.0)  # let the streams reach full speed
            t0 = time.monotonic()
            loaded, loaded_ping = list_latencies(con, args.calls, args.streams)
            elapsed = time.monotonic() - t0
            stats1 = con.call_sync(DBUS_NAME, DBUS_PATH, DBUS_INTERFACE, "GetStatistics", None,
                                   GLib.VariantType("(a{sv})"), Gio.DBusCallFlags.NONE, 30_000,
                                   None).unpack()[0]
            writer.send_signal(signal.SIGKILL)
            writer.wait()
            con.close_sync(None)
            moved = stats1["bytes_out"] - stats0["bytes_out"]
            load = " ".join(f"{x:.1f}" for x in os.getloadavg())
            print(f"ListChannels on domain 1's xsockd, {args.streams} channels open "
                  f"({os.cpu_count()} CPUs, load average {load} at the end)")
            print(f"  idle:                     {summary(idle)}")
            print(f"  {args.streams} streams at full speed: {summary(loaded)}")
            print("The bus daemon's own GetId, interleaved (the bus round trip alone):")
            print(f"  idle:                     {summary(idle_ping)}")
            print(f"  {args.streams} streams at full speed: {summary(loaded_ping)}")
            print(f"  data moved during the loaded phase: {moved / elapsed / 1e6:.0f} MB/s "
                  f"({moved / 1e6:.0f} MB in {elapsed:.1f} s)")
            worst = max(loaded)
            print(f"  target: a list within 100 ms under load: "
                  f"{'met' if worst < 100 else 'NOT met'} (max {worst:.1f} ms)")
            for d in daemons:
                d.stop()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            for f in (p.stdin, p.stdout):
                if f:
                    f.close()
        for d in daemons:
            d.stop()
        os.kill(bus_pid, signal.SIGTERM)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
