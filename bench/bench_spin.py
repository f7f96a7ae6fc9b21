"""Round trips with and without the pump's spin on the rx ring (XSOCKD_RING_SPIN), interleaved.

Paths: direct, socat, another tree's xsockd (``--baseline``, e.g. a worktree of main) and this
tree's xsockd once per value of XSOCKD_RING_SPIN in ``--modes`` (default ``off,on``: without
and with the spin).  This machine's speed changes by 2-3x from one minute to the next (other
work, the host), so round trips are interleaved finely: one client process holds a connection
through every path and does ``--batch`` round trips on each in turn, ``--count`` per path in
all, and reads each relay's CPU (its threads' and children's schedstat) around each of its
batches.  That is done ``--rounds`` times, at 1 byte and at 4 KiB.  Then one stream of
``--tput`` MiB in 64 KiB writes on each path in turn (MB/s, relay CPU per GiB), ``--rounds``
times, and each xsockd's CPU over ``--idle`` seconds without traffic.  Prints every round,
then the medians with ratios to the baseline.  docs/PERFORMANCE.md, "What was tried".

    .venv/bin/python -m bench.bench_spin --baseline /work/base [--rounds 5] [--count 5000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.suite import BASELINE, Direct, Path_, Socat, Xsockd, client, pct, start_server

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# The mixing client: argv = size, batch, batches, then a JSON list of [socket path, [pids]].
# A relay's CPU is its pids' threads and their children's (socat forks one per connection).
MIX = r"""
import json, os, socket, sys, time
size, batch, batches = (int(x) for x in sys.argv[1:4]); paths = json.loads(sys.argv[4])

def cpu(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except OSError:
            kids = []
        for p in [pid] + kids:
            try:
                tasks = os.listdir(f"/proc/{p}/task")
            except OSError:
                continue
            for t in tasks:
                try:
                    with open(f"/proc/{p}/task/{t}/schedstat") as f:
                        total += int(f.read().split()[0])
                except OSError:
                    pass
    return total

socks = []
for path, _ in paths:
    s = socket.socket(socket.AF_UNIX); s.connect(path); socks.append(s)
msg = b"e" * size; buf = bytearray(size); view = memoryview(buf)

def rt(s, out):
    t0 = time.perf_counter_ns(); s.sendall(msg); got = 0
    while got < size:
        k = s.recv_into(view[got:])
        if not k:
            raise SystemExit("mix: a connection ended")
        got += k
    if out is not None:
        out.append(time.perf_counter_ns() - t0)

for s in socks:
    for _ in range(max(100, batch)):
        rt(s, None)
lat = [[] for _ in paths]; used = [0] * len(paths)
for b in range(batches):
    k = b % len(paths)
    for i in list(range(k, len(paths))) + list(range(k)):
        c0 = cpu(paths[i][1]) if paths[i][1] else 0
        for _ in range(batch):
            rt(socks[i], lat[i])
        if paths[i][1]:
            used[i] += cpu(paths[i][1]) - c0
print(json.dumps({"lat": lat, "cpu_ns": used}))
"""


def relay_pids(p: Path_) -> list[int]:
    if isinstance(p, Xsockd):
        return [d.proc.pid for d in p.daemons if d.proc]
    if isinstance(p, Socat):
        return [p.proc.pid]
    return []


def mixed(paths: list[Path_], size: int, count: int, batch: int) -> dict[str, dict[str, float]]:
    """One round of round trips of ``size`` through every path, finely interleaved."""
    spec = json.dumps([[p.connect, relay_pids(p)] for p in paths])
    r = subprocess.run([sys.executable, "-c", MIX, str(size), str(batch),
                        str(count // batch * len(paths)), spec],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"mix client failed: {r.stderr.strip()[-2000:]}")
    got = json.loads(r.stdout)
    out = {}
    for p, lat, ns in zip(paths, got["lat"], got["cpu_ns"], strict=True):
        us = [x / 1e3 for x in lat]
        out[p.name] = {"p50": pct(us, 50), "p99": pct(us, 99),
                       "cpu": ns / 1e3 / len(us) if relay_pids(p) else float("nan")}
    return out


def tput_round(p: Path_, total: int) -> dict[str, float]:
    before = p.cpu()
    dt = float(client(p, "tput", total, 64 * KiB))  # type: ignore[arg-type]
    after = p.cpu()
    return {"MB/s": total / dt / 1e6,
            "s/GiB": (after - before) / (total / GiB) if before is not None and
            after is not None else float("nan")}


def idle_cpu(x: Xsockd, seconds: float) -> float:
    """CPU ms per second of both daemons (all threads) while no stream moves a byte."""
    before = x.cpu()
    time.sleep(seconds)
    return (x.cpu() - before) / seconds * 1e3


def cell(x: float, base: float | None, digits: int = 0) -> str:
    if x != x:
        return "-"
    s = f"{x:.{digits}f}"
    if base is not None and base == base and base:
        s += f" ({x / base:.2f}x)"
    return s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.bench_spin", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", type=Path, required=True, metavar="TREE")
    ap.add_argument("--modes", default="off,on",
                    help="XSOCKD_RING_SPIN values for this tree's daemons, comma-separated")
    ap.add_argument("--base-last", action="store_true",
                    help="start (and interleave) the baseline after this tree's daemons")
    ap.add_argument("--also", type=Path, action="append", default=[], metavar="TREE",
                    help="one more path through this tree's xsockd (repeatable; a second "
                         "daemon pair of the baseline shows how far two identical ones differ)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--count", type=int, default=5000, help="round trips per path and round")
    ap.add_argument("--batch", type=int, default=250, help="round trips per turn of a path")
    ap.add_argument("--tput", type=int, default=256, help="MiB of the throughput figure")
    ap.add_argument("--idle", type=float, default=3.0, help="seconds of the idle CPU figure")
    args = ap.parse_args(argv)
    # `python -m` puts the working directory ahead of PYTHONPATH: without this, a baseline's
    # daemons started from this source tree would import this tree's xsockd, not the baseline's.
    os.environ["PYTHONSAFEPATH"] = "1"
    work = Path(tempfile.mkdtemp(prefix="xsockd-spin-"))
    os.chmod(work, 0o755)
    server, spath = start_server(work)
    paths: list[Path_] = []
    saved = os.environ.get("XSOCKD_RING_SPIN")

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    rts: dict[int, dict[str, list[dict[str, float]]]] = {}
    tp: dict[str, list[dict[str, float]]] = {}
    idle: dict[str, float] = {}
    try:
        paths += [Direct(spath), Socat(work, spath, 256 * KiB)]
        if not args.base_last:
            paths.append(Xsockd(work, spath, "1MiB", "1MiB", args.baseline.resolve()))
        for i, mode in enumerate(args.modes.split(",")):
            (work / f"m{i}").mkdir()
            os.environ["XSOCKD_RING_SPIN"] = mode
            x = Xsockd(work / f"m{i}", spath, "1MiB", "1MiB")
            x.name = f"spin-{mode}" + (f"-{i}" if args.modes.split(",").count(mode) > 1 else "")
            paths.append(x)
        if args.base_last:  # started after this tree's daemons: does the order matter?
            paths.append(Xsockd(work, spath, "1MiB", "1MiB", args.baseline.resolve()))
        for i, tree in enumerate(args.also):
            (work / f"t{i}").mkdir()
            x = Xsockd(work / f"t{i}", spath, "1MiB", "1MiB", tree.resolve())
            x.name = f"tree-{i + 1}"
            paths.append(x)
        if saved is None:
            os.environ.pop("XSOCKD_RING_SPIN", None)
        else:
            os.environ["XSOCKD_RING_SPIN"] = saved
        for p in paths:
            if isinstance(p, Xsockd):
                client(p, "open", 1)  # the link comes up: not what is measured
        for size in (1, 4 * KiB):
            rts[size] = {p.name: [] for p in paths}
            for r in range(args.rounds):
                got = mixed(paths, size, args.count, args.batch)
                for name, m in got.items():
                    rts[size][name].append(m)
                say(f"round trip {size} B, round {r + 1}: " + ", ".join(
                    f"{n} {m['p50']:.0f}/{m['p99']:.0f} us cpu {m['cpu']:.0f}"
                    for n, m in got.items()))
        tp = {p.name: [] for p in paths}
        for r in range(args.rounds):
            k = r % len(paths)
            for p in paths[k:] + paths[:k]:
                tp[p.name].append(tput_round(p, args.tput * MiB))
            say(f"one stream, round {r + 1}: " + ", ".join(
                f"{n} {v[-1]['MB/s']:.0f} MB/s {v[-1]['s/GiB']:.2f} s/GiB"
                for n, v in tp.items()))
        time.sleep(0.5)  # the last stream's close settles
        for p in paths:
            if isinstance(p, Xsockd):
                idle[p.name] = idle_cpu(p, args.idle)
        say("idle: " + ", ".join(f"{n} {v:.2f} ms/s" for n, v in idle.items()))
    finally:
        for p in reversed(paths):
            p.close()
        server.kill()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)
    med = statistics.median
    print(f"{args.rounds} rounds of {args.count} round trips per path in batches of "
          f"{args.batch} (medians of the rounds), {args.tput} MiB at 64 KiB; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    head = ["rt 1 B p50", "p99", "CPU/rt", "rt 4 KiB p50", "p99", "CPU/rt", "MB/s",
            "CPU s/GiB", "idle CPU ms/s"]
    print("| path (us) | " + " | ".join(head) + " |")
    print("|---" * (len(head) + 1) + "|")
    for p in paths:
        n = p.name
        vals: list[tuple[float, float, int]] = []
        for size in (1, 4 * KiB):
            for f in ("p50", "p99", "cpu"):
                vals.append((med(m[f] for m in rts[size][n]),
                             med(m[f] for m in rts[size][BASELINE]), 0))
        for f, d in (("MB/s", 0), ("s/GiB", 2)):
            vals.append((med(m[f] for m in tp[n]), med(m[f] for m in tp[BASELINE]), d))
        vals.append((idle.get(n, float("nan")), idle[BASELINE], 2))
        cells = [cell(x, b if n.startswith(("spin-", "tree-")) else None, d) for x, b, d in vals]
        print(f"| {n} | " + " | ".join(cells) + " |")
    for p in paths:
        if not p.name.startswith(("spin-", "tree-")):
            continue
        wins = []
        for size in (1, 4 * KiB):
            for f in ("p50", "cpu"):
                pairs = list(zip(rts[size][p.name], rts[size][BASELINE], strict=True))
                wins.append(f"rt {size} B {f} {sum(m[f] < b[f] for m, b in pairs)}/{len(pairs)}")
        pairs_t = list(zip(tp[p.name], tp[BASELINE], strict=True))
        wins.append(f"MB/s {sum(m['MB/s'] > b['MB/s'] for m, b in pairs_t)}/{len(pairs_t)}")
        wins.append(f"s/GiB {sum(m['s/GiB'] < b['s/GiB'] for m, b in pairs_t)}/{len(pairs_t)}")
        print(f"{p.name}, rounds better than {BASELINE}: " + ", ".join(wins))
    return 0


if __name__ == "__main__":
    sys.exit(main())
