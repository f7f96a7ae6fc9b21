#!/usr/bin/env python3
"""Throughput of one stream through xsockd (sim) against the usual alternatives, in one run.

Three paths between a writer process and a reader process, each with the same write sizes:

* direct: an AF_UNIX socket pair's two ends (the ceiling: two copies);
* socat:  two socat processes relaying Unix socket -> TCP loopback -> Unix socket, the usual way
          to bridge two Unix sockets;
* xsockd: writer -> domain 1's <rundir>/2.sock -> xsockd 1 -> shared ring -> xsockd 2 -> the
          reader's Unix socket in domain 2 (four copies).

Prints MB/s per path and write size, and the ratios xsockd/direct and xsockd/socat.  Targets:
xsockd >= 0.45 x direct at 64 KiB writes, and ahead of socat at every size.

    .venv/bin/python bench/bench_stream.py [--mib N] [--repeat R]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from xsockd.demo import DaemonProcess, write_config
from xsockd.sim.host import SimHost

MiB = 1 << 20

# The reader: accept one connection, read to EOF into a reused buffer, print bytes and the
# CLOCK_MONOTONIC time of EOF (comparable across processes).
READER = r"""
import socket, sys, time
srv = socket.socket(socket.AF_UNIX); srv.bind(sys.argv[1]); srv.listen(1)
print("ready", flush=True)
conn, _ = srv.accept(); buf = bytearray(1 << 20); total = 0
while n := conn.recv_into(buf): total += n
print(total, time.monotonic(), flush=True)
"""

# The writer: connect, note the time, write N bytes in writes of SIZE, half-close.
WRITER = r"""
import socket, sys, time
path, total, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_UNIX); s.connect(path); chunk = b"\xa5" * size
t0 = time.monotonic(); left = total
while left > 0:
    s.sendall(chunk if left >= size else chunk[:left]); left -= size
s.shutdown(socket.SHUT_WR); s.recv(1)
print(t0, flush=True)
"""


def run_once(connect_path: str, listen_path: str, total: int, size: int) -> float:
    """Returns MB/s of one transfer: writer to connect_path, reader on listen_path."""
    reader = subprocess.Popen([sys.executable, "-c", READER, listen_path], stdout=subprocess.PIPE,
                              text=True)
    assert reader.stdout is not None
    reader.stdout.readline()
    if connect_path != listen_path:
        wait_for_socket(connect_path)
    writer = subprocess.run([sys.executable, "-c", WRITER, connect_path, str(total), str(size)],
                            capture_output=True, text=True, timeout=300, check=True)
    got, t_end = reader.stdout.readline().split()
    reader.wait(30)
    reader.stdout.close()
    if int(got) != total:
        raise RuntimeError(f"reader got {got} bytes of {total}")
    return total / (float(t_end) - float(writer.stdout.split()[0])) / 1e6


def wait_for_socket(path: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.01)


def wait_for_tcp_listener(port: int, timeout: float = 10.0) -> None:
    """Waits until something listens on 127.0.0.1:port (read from /proc: no probe connection,
    which a single-connection socat would take for the real one)."""
    want = f"0100007F:{port:04X}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open("/proc/net/tcp") as f:
            if any(ln.split()[1] == want and ln.split()[3] == "0A" for ln in list(f)[1:]):
                return
        time.sleep(0.01)
    raise TimeoutError(f"nothing listens on port {port}")


def best_of(repeat: int, fn: Callable[[], float]) -> float:
    return statistics.median(fn() for _ in range(repeat))


def bench_direct(work: Path, total: int, size: int, repeat: int) -> float:
    path = str(work / "direct.sock")

    def once() -> float:
        if os.path.exists(path):
            os.unlink(path)
        return run_once(path, path, total, size)
    return best_of(repeat, once)


def bench_socat(work: Path, total: int, size: int, repeat: int) -> float:
    def once() -> float:
        front, back = str(work / "socat-front.sock"), str(work / "socat-back.sock")
        for p in (front, back):
            if os.path.exists(p):
                os.unlink(p)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        # -b 1 MiB: socat's buffer, so that it is not the bottleneck at large writes.  The
        # back socat connects to the reader only when the writer's connection arrives.
        procs = [subprocess.Popen(["socat", "-b", str(MiB),
                                   f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr",
                                   f"UNIX-CONNECT:{back}"])]
        try:
            wait_for_tcp_listener(port)
            procs.append(subprocess.Popen(["socat", "-b", str(MiB), f"UNIX-LISTEN:{front}",
                                           f"TCP:127.0.0.1:{port}"]))
            return run_once(front, back, total, size)
        finally:
            for p in procs:
                p.kill()
                p.wait()
    return best_of(repeat, once)


class XsockdPath:
    """A simulated host with xsockd for domains 1 and 2; domain 2's service is the reader."""

    def __init__(self, work: Path, ring_size: str, window: str) -> None:
        self.work = work
        self.sink = work / "sink.sock"
        self.host = SimHost(work / "sim", domains=[0, 1, 2])
        self.host.__enter__()
        c1 = write_config(work / "d1.conf", rundir=work / "run1", sim_dir=work / "sim",
                          peers=[2], ring_size=ring_size, window=window)
        c2 = write_config(work / "d2.conf", rundir=work / "run2", sim_dir=work / "sim",
                          peers=[1], services={"sink": self.sink}, default="sink",
                          ring_size=ring_size, window=window)
        self.daemons = [DaemonProcess(1, c1, work / "d1.log"),
                        DaemonProcess(2, c2, work / "d2.log")]
        for d in self.daemons:
            d.start()

    def once(self, total: int, size: int) -> float:
        if self.sink.exists():
            self.sink.unlink()
        return run_once(str(self.work / "run1" / "2.sock"), str(self.sink), total, size)

    def close(self) -> None:
        for d in self.daemons:
            d.stop()
        self.host.__exit__(None, None, None)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mib", type=int, default=512, help="MiB per transfer (default 512)")
    p.add_argument("--repeat", type=int, default=3, help="transfers per figure; the median")
    p.add_argument("--ring-size", default="1MiB", help="xsockd ring bytes per direction")
    p.add_argument("--window", default="1MiB", help="xsockd per-stream window")
    p.add_argument("--sizes", default="4096,65536,1048576", help="write sizes to measure")
    args = p.parse_args()
    if not shutil.which("socat"):
        print("bench: socat is missing (apt-get install socat, or ./run setup)", file=sys.stderr)
        return 2
    total = args.mib * MiB
    work = Path(tempfile.mkdtemp(prefix="xsockd-bench-"))
    xs = XsockdPath(work, args.ring_size, args.window)
    rows = []
    try:
        for size in [int(x) for x in args.sizes.split(",")]:
            d = bench_direct(work, total, size, args.repeat)
            s = bench_socat(work, total, size, args.repeat)
            x = best_of(args.repeat, lambda size=size: xs.once(total, size))
            rows.append((size, d, s, x))
            print(f"  write {size // 1024:5d} KiB: direct {d:7.0f} MB/s  socat {s:7.0f} MB/s  "
                  f"xsockd {x:7.0f} MB/s", file=sys.stderr, flush=True)
    finally:
        xs.close()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\none stream, {args.mib} MiB per transfer, median of {args.repeat}, "
          f"xsockd ring {args.ring_size} per direction, window {args.window} (sim backend)")
    print(f"{'write':>8} {'direct':>9} {'socat/TCP':>10} {'xsockd':>9} {'x/direct':>9} "
          f"{'x/socat':>8}")
    ok = True
    for size, d, s, x in rows:
        print(f"{size // 1024:>5} KiB {d:>9.0f} {s:>10.0f} {x:>9.0f} {x / d:>9.2f} {x / s:>8.2f}")
        ok &= x > s
        if size == 65536:
            ok &= x / d >= 0.45
    print("targets (>= 0.45 x direct at 64 KiB, ahead of socat everywhere): "
          + ("met" if ok else "NOT met"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
