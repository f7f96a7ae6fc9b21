"""xsockd's benchmark suite: direct AF_UNIX, one socat Unix relay and xsockd (sim), interleaved.

Every figure is measured on the three paths in turn (direct, socat, xsockd, direct, socat, ...),
``--repeat`` times, and the median is kept, so that a noisy shared machine hurts all three alike.
The three paths end at the same server process (echo or sink per connection, bench/workers.py):

* direct: the client connects to the server's own Unix socket;
* socat:  the client connects to one ``socat UNIX-LISTEN:...,fork UNIX-CONNECT:<server>`` relay;
* xsockd: the client connects to domain 1's ``<rundir>/2.sock``; xsockd 1 and xsockd 2 carry the
          stream over a shared ring to domain 2's service, the server (simulated host).

Figures: throughput of one stream by write size; round trip p50/p99 at 1 byte and 4 KiB;
stream opens (connect + 1-byte echo + close) per second and their p50; N concurrent streams;
relay CPU per GiB moved, per round trip and per open (both xsockd daemons; socat with its
forked children); with ``--pgbench``, PostgreSQL pgbench select-only through each path.  With
``--baseline TREE``, another tree's xsockd is a fourth path (before/after in one run).  Prints
a Markdown table, writes ``suite.json`` and PNG plots into ``--out``.  docs/PERFORMANCE.md.

    ./run bench [--quick] [--pgbench] [--baseline TREE] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.bench_stream import wait_for_socket
from bench.workers import CLIENT, SERVER
from xsockd.demo import DaemonProcess, write_config
from xsockd.sim.host import SimHost

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
PATHS = ("direct", "socat", "xsockd")
BASELINE = "xsockd-base"  # --baseline: another tree's xsockd, for a before/after in one run


def thread_cpu_seconds(pid: int) -> float:
    """CPU time of ``pid``'s live threads in ns resolution (schedstat), where ticks would be
    too coarse for a quick run; a thread that has ended no longer counts."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total / 1e9


class Path_:
    """One way from a client to the server: where to connect, and the relay's CPU so far."""

    name = ""

    def __init__(self, connect: str) -> None:
        self.connect = connect

    def cpu(self) -> float | None:
        return None

    def close(self) -> None:
        pass


class Direct(Path_):
    name = "direct"


class Socat(Path_):
    """One socat process relaying Unix to Unix, forking a child per connection.

    Its CPU counts its children, which end with their connection: the kernel adds a reaped
    child's time to its parent, but /proc shows that sum (cutime, cstime) only in clock ticks,
    10 ms, so a quick run read 0.  ``cpu()`` therefore retires the socat that served the
    connections so far (once its children are gone), takes its exact total (itself and its
    reaped children, microseconds) from ``wait4``, and starts a fresh one on the same socket;
    a socat's start-up, read from its schedstat once it listens, is not counted.
    """

    name = "socat"

    def __init__(self, work: Path, server: str, buffer: int, listen: str = "socat.sock") -> None:
        super().__init__(str(work / listen))
        # -b: socat's buffer, larger than its default 8 KiB, which would cap large writes.
        self._argv = ["socat", "-b", str(buffer), f"UNIX-LISTEN:{self.connect},fork,backlog=4096",
                      f"UNIX-CONNECT:{server}"]
        self._retired = 0.0  # CPU seconds of the socats cpu() retired
        self._start()

    def _start(self) -> None:
        Path(self.connect).unlink(missing_ok=True)
        self.proc = subprocess.Popen(self._argv)
        wait_for_socket(self.connect)
        self._startup = thread_cpu_seconds(self.proc.pid)

    def cpu(self) -> float:
        # Children count once reaped: wait (briefly) until socat has none left.
        deadline = time.monotonic() + 5
        kids = f"/proc/{self.proc.pid}/task/{self.proc.pid}/children"
        while time.monotonic() < deadline:
            with open(kids) as f:
                if not f.read().strip():
                    break
            time.sleep(0.01)
        self._retired += self._stop() - self._startup
        self._start()
        return self._retired

    def _stop(self) -> float:
        """Ends socat; returns its CPU seconds and its reaped children's, exactly."""
        self.proc.terminate()
        _, status, usage = os.wait4(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        return usage.ru_utime + usage.ru_stime

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


class Xsockd(Path_):
    """A simulated host with xsockd for domains 1 and 2; domain 2's default service is the
    server."""

    name = "xsockd"

    def __init__(self, work: Path, server: str, ring_size: str, window: str,
                 tree: Path | None = None, pg_socket: str | None = None,
                 dbus: dict[int, str] | None = None) -> None:
        if tree is not None:
            self.name = BASELINE
            work = work / "base"
            work.mkdir()
        super().__init__(str(work / "run1" / "2.sock"))
        # With --pgbench, domain 2 also offers PostgreSQL as the service "pg".
        self.pg_connect = str(work / "run1" / "2" / "pg.sock")
        services = {"bench": Path(server)}
        if pg_socket:
            services["pg"] = Path(pg_socket)
        self.host = SimHost(work / "sim", domains=[0, 1, 2])
        self.host.__enter__()
        self.daemons: list[DaemonProcess] = []
        try:
            c1 = write_config(work / "d1.conf", rundir=work / "run1", sim_dir=work / "sim",
                              peers=[2], ring_size=ring_size, window=window,
                              extra='[remote.2]\nservices = ["pg"]\n' if pg_socket else "")
            c2 = write_config(work / "d2.conf", rundir=work / "run2", sim_dir=work / "sim",
                              peers=[1], services=services, default="bench",
                              ring_size=ring_size, window=window)
            # The daemons of a baseline import xsockd (and its C core) from its tree.  Safe
            # path: "python -m" would otherwise put the working directory (a run from a
            # source tree: that tree) ahead of PYTHONPATH, and the baseline would be this tree.
            saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "PYTHONSAFEPATH")}
            if tree is not None:
                os.environ["PYTHONPATH"] = str(tree)
                os.environ["PYTHONSAFEPATH"] = "1"
            try:
                for domid, conf in ((1, c1), (2, c2)):
                    d = DaemonProcess(domid, conf, work / f"d{domid}.log",
                                      dbus_address=(dbus or {}).get(domid))
                    self.daemons.append(d)
                    d.start()
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        except BaseException:
            self.close()
            raise

    def cpu(self) -> float:
        # The daemons' threads live as long as their links: schedstat counts them exactly.
        return sum(thread_cpu_seconds(d.proc.pid) for d in self.daemons if d.proc)

    def close(self) -> None:
        for d in self.daemons:
            d.stop()
        self.daemons = []
        self.host.__exit__(None, None, None)


def client(path: Path_, mode: str, *args: int, timeout: float = 600) -> object:
    """Runs one measuring client against ``path``; returns what it printed (JSON)."""
    r = subprocess.run([sys.executable, "-c", CLIENT, mode, path.connect, *map(str, args)],
                       capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{mode} through {path.name} failed: {r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout)


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


class Params:
    """How much each figure moves; ``quick`` is for a test, not for figures."""

    def __init__(self, quick: bool, repeat: int | None, streams: int | None,
                 opens: int | None = None) -> None:
        self.repeat = repeat or (1 if quick else 3)
        self.tput_bytes = 8 * MiB if quick else 256 * MiB
        self.sizes = [4 * KiB, 64 * KiB, MiB]
        self.rt_count = 200 if quick else 5000
        self.rt_sizes = [1, 4 * KiB]
        self.opens = opens or (100 if quick else 3000)
        self.streams = streams or (16 if quick else 256)
        self.stream_bytes = MiB if quick else 4 * MiB


def interleaved(paths: list[Path_], repeat: int,
                measure: Callable[[Path_], object]) -> dict[str, list[object]]:
    """Measures every path in turn, ``repeat`` rounds: A B C A B C ..."""
    out: dict[str, list[object]] = {p.name: [] for p in paths}
    for _ in range(repeat):
        for p in paths:
            out[p.name].append(measure(p))
    return out


def run_suite(paths: list[Path_], prm: Params, say: Callable[[str], None]) -> dict[str, object]:
    res: dict[str, object] = {}
    med = statistics.median

    tput: dict[str, dict[str, float]] = {}
    cpu: dict[str, list[float]] = {p.name: [] for p in paths}
    for size in prm.sizes:
        def one(p: Path_, size: int = size) -> float:
            before = p.cpu()
            dt = float(client(p, "tput", prm.tput_bytes, size))  # type: ignore[arg-type]
            after = p.cpu()
            if before is not None and after is not None and size == 64 * KiB:
                cpu[p.name].append((after - before) / (prm.tput_bytes / GiB))
            return prm.tput_bytes / dt / 1e6
        runs = interleaved(paths, prm.repeat, one)
        tput[str(size)] = {k: med(v) for k, v in runs.items()}  # type: ignore[type-var]
        say(f"one stream, writes of {size // KiB} KiB: " + fmt(tput[str(size)], "MB/s"))
    res["throughput_mb_s"] = tput
    res["cpu_s_per_gib"] = {k: (med(v) if v else None) for k, v in cpu.items()}
    say("relay CPU per GiB: " + ", ".join(f"{k} {v:.2f} s" for k, v in
                                           res["cpu_s_per_gib"].items() if v is not None))

    rt: dict[str, dict[str, dict[str, float | None]]] = {}
    samples: dict[str, dict[str, list[float]]] = {}
    for size in prm.rt_sizes:
        def round_trips(p: Path_, size: int = size) -> tuple[list[float], float | None]:
            before = p.cpu()
            lat = [x / 1e3 for x in client(p, "rt", size, prm.rt_count)]  # type: ignore[attr-defined]
            after = p.cpu()
            # Relay CPU per round trip (us): noise-proof where latency is not, on a shared
            # machine; it counts the warm-up tenth too.
            n = prm.rt_count + prm.rt_count // 10
            used = (after - before) / n * 1e6 if before is not None and after is not None \
                else None
            return lat, used
        runs = interleaved(paths, prm.repeat, round_trips)
        rt[str(size)] = {k: {"p50": med(pct(r[0], 50) for r in v),  # type: ignore[index]
                             "p99": med(pct(r[0], 99) for r in v),  # type: ignore[index]
                             "cpu_us": med(r[1] for r in v) if v[0][1] is not None  # type: ignore[index]
                             else None}
                         for k, v in runs.items()}
        samples[str(size)] = {k: [x for r in v for x in r[0]] for k, v in runs.items()}  # type: ignore[index]
        say(f"round trip {size} B: " + ", ".join(
            f"{k} p50 {v['p50']:.0f} p99 {v['p99']:.0f} us" for k, v in rt[str(size)].items()))
    res["round_trip_us"] = rt

    def opens(p: Path_) -> dict[str, float | None]:
        before = p.cpu()
        r = client(p, "open", prm.opens)
        after = p.cpu()
        lat = [x / 1e3 for x in r["lat"]]  # type: ignore[index]
        return {"p50": pct(lat, 50), "p99": pct(lat, 99),
                "per_s": prm.opens / r["wall"],  # type: ignore[index]
                "cpu_us": (after - before) / prm.opens * 1e6
                if before is not None and after is not None else None}
    runs = interleaved(paths, prm.repeat, opens)
    res["open"] = {k: {f: (med(r[f] for r in v) if v[0][f] is not None else None)  # type: ignore[index]
                       for f in ("p50", "p99", "per_s", "cpu_us")}
                   for k, v in runs.items()}
    say("open: " + ", ".join(f"{k} p50 {v['p50']:.0f} us, {v['per_s']:.0f}/s"
                             for k, v in res["open"].items()))  # type: ignore[union-attr]

    total = prm.streams * prm.stream_bytes
    runs = interleaved(paths, prm.repeat,
                       lambda p: total / float(client(p, "streams", prm.streams,  # type: ignore[arg-type]
                                                      prm.stream_bytes)) / 1e6)
    res["streams_mb_s"] = {k: med(v) for k, v in runs.items()}  # type: ignore[type-var]
    say(f"{prm.streams} streams: " + fmt(res["streams_mb_s"], "MB/s"))  # type: ignore[arg-type]
    return res | {"_samples": samples}


def fmt(d: dict[str, float], unit: str) -> str:
    return ", ".join(f"{k} {v:.0f} {unit}" for k, v in d.items())


def ratio(x: float | None, base: float | None) -> str:
    return f"{x / base:.2f}x" if x and base else "-"


def table(res: dict[str, object], prm: Params) -> str:
    """The Markdown table of the results, with xsockd's ratios to direct and to socat."""
    rows: list[tuple[str, dict[str, float | None], str]] = []
    for size, v in res["throughput_mb_s"].items():  # type: ignore[attr-defined]
        n = int(size)
        label = f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB"
        rows.append((f"one stream, {label} writes (MB/s)", v, "{:.0f}"))
    rows.append((f"{prm.streams} concurrent streams (MB/s)", res["streams_mb_s"], "{:.0f}"))  # type: ignore[arg-type]
    for size, v in res["round_trip_us"].items():  # type: ignore[attr-defined]
        label = "1 byte" if size == "1" else f"{int(size) // KiB} KiB"
        for q in ("p50", "p99"):
            rows.append((f"round trip, {label}, {q} (us)", {k: x[q] for k, x in v.items()},
                         "{:.0f}"))
        rows.append((f"relay CPU per round trip, {label} (us)",
                     {k: x["cpu_us"] for k, x in v.items()}, "{:.0f}"))
    op = res["open"]
    rows.append(("open: connect + 1-byte echo + close, p50 (us)",
                 {k: x["p50"] for k, x in op.items()}, "{:.0f}"))  # type: ignore[attr-defined]
    rows.append(("open p99 (us)", {k: x["p99"] for k, x in op.items()}, "{:.0f}"))  # type: ignore[attr-defined]
    rows.append(("opens per second (one client, in turn)",
                 {k: x["per_s"] for k, x in op.items()}, "{:.0f}"))  # type: ignore[attr-defined]
    rows.append(("relay CPU per open (us)",
                 {k: x["cpu_us"] for k, x in op.items()}, "{:.0f}"))  # type: ignore[attr-defined]
    rows.append(("relay CPU per GiB moved (s, 64 KiB writes)", res["cpu_s_per_gib"], "{:.2f}"))  # type: ignore[arg-type]
    if "pgbench_tps" in res:
        rows.append(("pgbench select-only, 8 clients (tps)", res["pgbench_tps"], "{:.0f}"))  # type: ignore[arg-type]
    names = [p for p in (*PATHS, BASELINE) if p in res["open"]]  # type: ignore[operator]
    ratios = [("xsockd", "direct"), ("xsockd", "socat")]
    if BASELINE in names:
        ratios.append(("xsockd", BASELINE))
    out = [f"| case | {' | '.join(names)} | {' | '.join(f'{a}/{b}' for a, b in ratios)} |",
           "|---|" + "---|" * (len(names) + len(ratios))]
    for label, v, f in rows:
        cells = [f.format(v[p]) if v.get(p) is not None else "-" for p in names]
        cells += [ratio(v.get(a), v.get(b)) for a, b in ratios]
        out.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(out)


def machine() -> dict[str, object]:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    return {"cpu": model, "cpus": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "commit": commit,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def start_server(work: Path) -> tuple[subprocess.Popen[str], str]:
    """Starts the echo/sink server (bench/workers.py) on ``work``/server.sock; returns it and
    its path once it listens."""
    path = str(work / "server.sock")
    server = subprocess.Popen([sys.executable, "-c", SERVER, path], stdout=subprocess.PIPE,
                              text=True)
    assert server.stdout is not None
    server.stdout.readline()
    return server, path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.suite", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small transfers and one round: checks the suite works, not figures")
    p.add_argument("--repeat", type=int, help="rounds per figure, the median kept (default 3)")
    p.add_argument("--streams", type=int, help="concurrent streams (default 256)")
    p.add_argument("--opens", type=int,
                   help="opens per round (default 3000; 100000 for a sustained rate)")
    p.add_argument("--pgbench", action="store_true",
                   help="also PostgreSQL pgbench select-only through each path (./run bench "
                        "installs PostgreSQL)")
    p.add_argument("--ring-size", default="1MiB", help="xsockd ring bytes per direction")
    p.add_argument("--window", default="1MiB", help="xsockd per-stream window")
    p.add_argument("--baseline", type=Path, metavar="TREE",
                   help="also measure the xsockd of another source tree (its C core built in "
                        "place), as 'xsockd-base', interleaved with the others: a before/after "
                        "in one run")
    p.add_argument("--socat-buffer", type=int, default=256 * KiB,
                   help="socat's -b (default 256 KiB; socat's own default is 8 KiB)")
    p.add_argument("--out", type=Path, default=Path("build/bench"),
                   help="where suite.json and the PNG plots go (default build/bench)")
    args = p.parse_args(argv)
    if not shutil.which("socat"):
        print("bench: socat is missing (./run setup installs it)", file=sys.stderr)
        return 2
    prm = Params(args.quick, args.repeat, args.streams, args.opens)
    args.out.mkdir(parents=True, exist_ok=True)

    def say(msg: str) -> None:
        print(f"  {msg}", file=sys.stderr, flush=True)

    work = Path(tempfile.mkdtemp(prefix="xsockd-suite-"))
    os.chmod(work, 0o755)
    server, server_path = start_server(work)
    paths: list[Path_] = []
    pg = pg_relay = None
    try:
        if args.pgbench:
            from bench import pgbench
            say("starting PostgreSQL for pgbench")
            pg = pgbench.Postgres(work)
            pg_relay = Socat(work, pg.socket, args.socat_buffer, "socat-pg.sock")
        pg_socket = pg.socket if pg else None
        paths = [Direct(server_path), Socat(work, server_path, args.socat_buffer),
                 Xsockd(work, server_path, args.ring_size, args.window, pg_socket=pg_socket)]
        if args.baseline:
            paths.append(Xsockd(work, server_path, args.ring_size, args.window,
                                args.baseline.resolve(), pg_socket=pg_socket))
        for p in paths[2:]:
            client(p, "open", 1)  # sets up the link: a first stream is not what is measured
        res = run_suite(paths, prm, say)
        if pg is not None:
            assert pg_relay is not None
            dirs = {"direct": str(pg.sock_dir),
                    "socat": pgbench.client_dir(work, "socat", pg_relay.connect)}
            for p in paths:
                if isinstance(p, Xsockd):
                    dirs[p.name] = pgbench.client_dir(work, p.name, p.pg_connect)
            res["pgbench_tps"] = pgbench.measure(dirs, prm.repeat, 2 if args.quick else 10,
                                                 say)
    finally:
        for path in reversed(paths):
            path.close()
        if pg_relay is not None:
            pg_relay.close()
        if pg is not None:
            pg.close()
        server.kill()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)
    samples = res.pop("_samples")
    doc = {"machine": machine(),
           "params": {"quick": args.quick, "repeat": prm.repeat, "throughput_bytes":
                      prm.tput_bytes, "round_trips": prm.rt_count, "opens": prm.opens,
                      "streams": prm.streams, "stream_bytes": prm.stream_bytes,
                      "ring_size": args.ring_size, "window": args.window,
                      "socat_buffer": args.socat_buffer,
                      "baseline": str(args.baseline) if args.baseline else None},
           "results": res}
    (args.out / "suite.json").write_text(json.dumps(doc, indent=1) + "\n")
    from bench.plots import plot_all
    plot_all(res, samples, doc["machine"], args.out)  # type: ignore[arg-type]
    m = doc["machine"]
    print(f"xsockd benchmark suite, {m['date']}, commit {m['commit']}: {m['cpu']}, "  # type: ignore[index]
          f"{m['cpus']} CPUs, Linux {m['kernel']}; median of {prm.repeat}, interleaved")  # type: ignore[index]
    print(table(res, prm))
    print(f"results: {args.out / 'suite.json'}, plots: {args.out}/throughput.png, "
          f"{args.out}/latency.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
