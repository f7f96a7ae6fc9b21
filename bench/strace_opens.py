"""The system calls of a stream open: ``strace -c -f`` of each xsockd daemon (every thread:
its Python loop and its link's pumps) while a client opens streams in turn through the sim
(connect, 1-byte echo, close: the suite's open figure).  Prints, per daemon, the calls per
open of each kind, those that failed (EAGAIN, mostly) in brackets, and their total.

xsockd 1 is the opening side (the pump accepts the application), xsockd 2 the accepting
side (its pump connects the service).  ``--baseline TREE`` also measures another tree's
xsockd, after this one (counts, unlike times, do not need interleaving).  strace slows the
daemons down many times: only the counts mean something, not the time they took.

    .venv/bin/python -m bench.strace_opens [--opens N] [--baseline TREE]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.suite import Xsockd, client, start_server

Counts = dict[str, tuple[int, int]]  # syscall -> (calls, errors)


def parse_summary(text: str) -> Counts:
    """Reads ``strace -c``'s table: ``% time seconds usecs/call calls [errors] syscall``."""
    out: Counts = {}
    for line in text.splitlines():
        f = line.split()
        if len(f) in (5, 6) and f[0][0].isdigit() and f[-1] != "total":
            out[f[-1]] = (int(f[3]), int(f[4]) if len(f) == 6 else 0)
    return out


def measure(work: Path, server_path: str, opens: int, tree: Path | None) -> list[Counts]:
    """Counts the system calls of each daemon of one path during ``opens`` opens."""
    path = Xsockd(work, server_path, "1MiB", "1MiB", tree)
    try:
        client(path, "open", 1)  # sets up the link: a first stream is not what is measured
        traces = []
        for d in path.daemons:
            assert d.proc is not None
            out = work / f"strace-{path.name}-{d.domid}.txt"
            tracer = subprocess.Popen(["strace", "-c", "-f", "-o", str(out), "-p",
                                       str(d.proc.pid)], stderr=subprocess.DEVNULL)
            traces.append((tracer, out))
        time.sleep(1.0)  # strace has attached to every thread
        client(path, "open", opens)
        for tracer, _ in traces:
            tracer.send_signal(signal.SIGINT)  # detaches and writes the summary
            tracer.wait()
        return [parse_summary(out.read_text()) for _, out in traces]
    finally:
        path.close()


def table(name: str, counts: list[Counts], opens: int) -> list[str]:
    names = sorted({k for c in counts for k in c},
                   key=lambda k: (-sum(c.get(k, (0, 0))[0] for c in counts), k))
    lines = [f"{name} ({opens} opens; per open, failed calls in brackets)",
             "| system call | xsockd 1 (opens) | xsockd 2 (accepts) |", "|---|---|---|"]
    for k in names:
        cells = []
        for c in counts:
            calls, errs = c.get(k, (0, 0))
            cells.append(f"{calls / opens:.2f}" + (f" ({errs / opens:.2f})" if errs else ""))
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    totals = [sum(v[0] for v in c.values()) / opens for c in counts]
    lines.append("| total | " + " | ".join(f"{t:.2f}" for t in totals) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.strace_opens", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--opens", type=int, default=5000, help="opens counted (default 5000)")
    p.add_argument("--baseline", type=Path, metavar="TREE",
                   help="also another source tree's xsockd (its C core built in place)")
    args = p.parse_args(argv)
    if shutil.which("strace") is None:
        print("strace is not installed", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="xsockd-strace-"))
    os.chmod(work, 0o755)
    server, server_path = start_server(work)
    try:
        runs = [("xsockd", measure(work, server_path, args.opens, None))]
        if args.baseline:
            runs.append(("baseline", measure(work, server_path, args.opens,
                                             args.baseline.resolve())))
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)
    for name, counts in runs:
        print("\n".join(table(name, counts, args.opens)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
