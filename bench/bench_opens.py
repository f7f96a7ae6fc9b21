"""Where the CPU of a stream open goes: each xsockd daemon's loop thread and its pumps.

Runs the suite's open figure (connect, 1-byte echo, close, N times in turn) through xsockd and,
with ``--baseline TREE``, through another tree's xsockd, interleaved, ``--repeat`` rounds; and
reads ``/proc/<pid>/task/<tid>/schedstat`` of every daemon thread before and after each round.
The thread whose id is the process id is the daemon's Python loop; the others are its link's
pump threads.  Prints, per path, the median open p50, opens per second and CPU us per open of
xsockd 1's loop, xsockd 1's pumps, xsockd 2's loop and xsockd 2's pumps.

    .venv/bin/python -m bench.bench_opens [--opens N] [--repeat R] [--baseline TREE]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.suite import Xsockd, client, interleaved, pct
from bench.workers import SERVER

PARTS = ("loop 1", "pumps 1", "loop 2", "pumps 2")


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
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="xsockd-opens-"))
    os.chmod(work, 0o755)
    server_path = str(work / "server.sock")
    server = subprocess.Popen([sys.executable, "-c", SERVER, server_path],
                              stdout=subprocess.PIPE, text=True)
    paths: list[Xsockd] = []
    try:
        assert server.stdout is not None
        server.stdout.readline()
        paths.append(Xsockd(work, server_path, "1MiB", "1MiB"))
        if args.baseline:
            paths.append(Xsockd(work, server_path, "1MiB", "1MiB", args.baseline.resolve()))
        for path in paths:
            client(path, "open", 1)  # sets up the link: a first stream is not what is measured

        def measure(path: object) -> dict[str, float]:
            assert isinstance(path, Xsockd)
            before = split_cpu(path)
            r = client(path, "open", args.opens)
            after = split_cpu(path)
            lat = [x / 1e3 for x in r["lat"]]  # type: ignore[index]
            cpu = {name: (a - b) / args.opens * 1e6
                   for name, a, b in zip(PARTS, after, before, strict=True)}
            return {"p50": pct(lat, 50), "p99": pct(lat, 99),
                    "per_s": args.opens / r["wall"], **cpu}  # type: ignore[index]

        runs = interleaved(paths, args.repeat, measure)  # type: ignore[arg-type]
    finally:
        for path in reversed(paths):
            path.close()
        server.kill()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)
    keys = ("p50", "p99", "per_s", *PARTS)
    print("| path | open p50 (us) | p99 (us) | opens/s | " +
          " | ".join(f"{k} (us CPU/open)" for k in PARTS) + " | total |")
    print("|---" * (len(keys) + 2) + "|")
    for name, rounds in runs.items():
        med = {k: statistics.median(r[k] for r in rounds) for k in keys}  # type: ignore[index]
        spread = {k: (min(r[k] for r in rounds), max(r[k] for r in rounds))  # type: ignore[index]
                  for k in keys}
        cells = [f"{med[k]:.0f} ({spread[k][0]:.0f}-{spread[k][1]:.0f})" for k in keys]
        print(f"| {name} | " + " | ".join(cells) +
              f" | {sum(med[k] for k in PARTS):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
