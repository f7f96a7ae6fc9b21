#!/usr/bin/env python3
"""One daemon with many peers (sim): grant budget, memory per link and per stream, first opens.

Domain 0 runs a real xsockd with peers 1..N (default 100); the peers run in one process
(tests/peerfarm.py), each serving an echo.  Peers 1..E (default 10) are eager
(``[remote.N] eager = true``).  Prints:

* how the hub divided its grant budget (its log line) and what it granted;
* the hub's memory (RSS and PSS from /proc/PID/smaps_rollup) with no link, with N idle
  links, and with S idle open streams: KiB per idle link and per open stream, for the hub and
  for the peers' process;
* stream open times (connect, one byte echoed, close): the first to an eager peer, the first
  to a lazy peer (it sets the link up), and later ones (medians);
* one stream's echo throughput over a link the hub initiated (ring sized from its budget)
  and over one a peer initiated (256 KiB rings).

    .venv/bin/python bench/bench_peers.py [--peers N] [--eager E] [--streams S] [--peers-first]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from peerfarm import HubWorld, echo_time

MiB = 1 << 20


def memory_kib(pid: int) -> dict[str, int]:
    """Returns Rss, Pss and Private (clean + dirty) of ``pid`` in KiB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss", "Private_Clean", "Private_Dirty"):
                out[key] = int(rest.split()[0])
    out["Private"] = out.pop("Private_Clean") + out.pop("Private_Dirty")
    return out


def settle() -> None:
    time.sleep(1.0)  # let the daemons' loops finish what the last stream left them


def echo_throughput(path: Path, total: int = 32 * MiB) -> float:
    """Returns MB/s of ``total`` bytes sent to an echo and read back at once."""
    block = os.urandom(64 * 1024)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(path))

        def writer() -> None:
            for _ in range(total // len(block)):
                s.sendall(block)
            s.shutdown(socket.SHUT_WR)

        t0 = time.perf_counter()
        t = threading.Thread(target=writer)
        t.start()
        got, buf = 0, bytearray(1 << 20)
        while n := s.recv_into(buf):
            got += n
        t.join()
        took = time.perf_counter() - t0
    assert got == total, f"echoed {got} of {total} bytes"
    return total / took / 1e6


def delta(a: dict[str, int], b: dict[str, int], n: int) -> str:
    return ", ".join(f"{k} {(b[k] - a[k]) / n:.1f}" for k in ("Rss", "Pss", "Private"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", type=int, default=100)
    p.add_argument("--eager", type=int, default=10, help="peers 1..E are eager (default 10)")
    p.add_argument("--streams", type=int, default=1000, help="idle streams held open")
    p.add_argument("--peers-first", action="store_true",
                   help="the lazy peers past the first 2E open the links (256 KiB rings, "
                        "granted by them), not the hub")
    args = p.parse_args()
    peers = list(range(1, args.peers + 1))
    eager = peers[:args.eager]
    lazy = peers[args.eager:2 * args.eager] or peers[-1:]
    work = Path(tempfile.mkdtemp(prefix="xsock-bench-peers-"))
    hub_extra = "".join(f"[remote.{d}]\neager = true\n" for d in eager)
    w = HubWorld(work, peers, hub_extra=hub_extra)
    held: list[socket.socket] = []
    try:
        w.daemon.start()
        assert w.daemon.proc is not None
        hub = w.daemon.proc.pid
        settle()
        base = memory_kib(hub)
        w.farm.start()
        farm_base = memory_kib(w.farm.pid())
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(
                f"link with domain {d} up" in w.daemon.log() for d in eager):
            time.sleep(0.05)
        plan = re.search(r"grant budget .*", w.daemon.log())
        print(f"{args.peers} peers, {len(eager)} eager")
        print(f"hub: {plan.group(0) if plan else '(no grant budget line in its log)'}")

        # First opens: eager peers (links up already), lazy ones (the open sets it up).
        first_eager = [echo_time(w.hub_socket(d)) for d in eager]
        first_lazy = [echo_time(w.hub_socket(d)) for d in lazy]
        later = [echo_time(w.hub_socket(d)) for d in eager + lazy for _ in range(5)]
        ms = lambda xs: f"{statistics.median(xs) * 1e3:.2f} ms"  # noqa: E731
        print(f"stream open (connect, 1-byte echo, close), medians: first to an eager peer "
              f"{ms(first_eager)}, first to a lazy peer {ms(first_lazy)} (link set-up), later "
              f"{ms(later)}")

        t0 = time.perf_counter()
        rest = [d for d in peers if d not in eager and d not in lazy]
        for d in rest:
            echo_time(w.farm.socket(d) if args.peers_first else w.hub_socket(d))
        if rest:
            print(f"links set up by a first stream ({'peers' if args.peers_first else 'hub'} "
                  f"first): {len(rest)} in {time.perf_counter() - t0:.2f} s")
        settle()
        links = memory_kib(hub)
        farm_links = memory_kib(w.farm.pid())
        acct = w.host.accounting()
        print(f"hub granted {acct[0]['granted']} pages, mapped {acct[0]['mapped']}, "
              f"{acct[0]['ports']} ports; most any peer granted: "
              f"{max(acct[d]['granted'] for d in peers)}")
        print(f"memory per idle link, KiB: hub {delta(base, links, len(peers))}; "
              f"peer side {delta(farm_base, farm_links, len(peers))}")

        for i in range(args.streams):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(w.hub_socket(peers[i % len(peers)])))
            s.sendall(b"x")
            held.append(s)
        for s in held:
            assert s.recv(1) == b"x"
        settle()
        streams = memory_kib(hub)
        farm_streams = memory_kib(w.farm.pid())
        print(f"memory per idle open stream, KiB: hub {delta(links, streams, len(held))}; "
              f"peer side {delta(farm_links, farm_streams, len(held))}")
        for s in held:
            s.close()
        held.clear()

        hub_link = echo_throughput(w.hub_socket(peers[-1]))
        peer_link = echo_throughput(w.farm.socket(peers[0]))
        print(f"one stream's echo, 32 MiB each way: {hub_link:.0f} MB/s on a link the hub "
              f"initiated, {peer_link:.0f} MB/s on one a peer initiated")
    finally:
        for s in held:
            s.close()
        w.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
