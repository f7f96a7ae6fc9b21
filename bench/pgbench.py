"""PostgreSQL pgbench (select-only, 8 clients) through each of the suite's paths.

A throw-away PostgreSQL cluster (Debian's, run as the ``postgres`` user when we are root)
listens only on a Unix socket.  Each path reaches it its own way: direct at its socket, socat
through a second relay, xsockd through domain 1's ``<rundir>/2/pg.sock`` to the service ``pg``
of domain 2.  pgbench finds a server by directory (``-h DIR`` means ``DIR/.s.PGSQL.5432``), so
each path gets a directory whose ``.s.PGSQL.5432`` is a symlink to its socket.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

PG_SOCKET = ".s.PGSQL.5432"


def pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise RuntimeError(f"{name} is missing: ./run bench --pgbench installs Debian's "
                           "postgresql")
    return found[-1]


class Postgres:
    """A cluster in ``work/pg``, listening on ``work/pg/sock/.s.PGSQL.5432`` only."""

    def __init__(self, work: Path) -> None:
        self.dir = work / "pg"
        self.sock_dir = self.dir / "sock"
        self.sock_dir.mkdir(parents=True)
        # Never as root: PostgreSQL refuses it; Debian's package made the postgres user.
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            self.as_user = ["runuser", "-u", "postgres", "--"]
            for p in (self.dir, self.sock_dir):
                shutil.chown(p, "postgres", "postgres")
        data = self.dir / "data"
        subprocess.run([*self.as_user, pg_bin("initdb"), "-D", str(data), "-A", "trust",
                        "-U", "postgres", "--no-sync"], check=True, capture_output=True)
        self.log = open(self.dir / "server.log", "w")  # closed by close()
        self.proc = subprocess.Popen(
            [*self.as_user, pg_bin("postgres"), "-D", str(data), "-k", str(self.sock_dir),
             "-c", "listen_addresses=", "-c", "fsync=off", "-c", "max_connections=50"],
            stdout=subprocess.DEVNULL, stderr=self.log)
        self.socket = str(self.sock_dir / PG_SOCKET)
        try:
            self._ready()
        except BaseException:
            self.close()
            raise

    def _ready(self) -> None:
        deadline = time.monotonic() + 30
        while subprocess.run([pg_bin("pg_isready"), "-q", "-h", str(self.sock_dir)],
                             check=False).returncode != 0:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"PostgreSQL did not start; see {self.dir / 'server.log'}")
            time.sleep(0.2)
        subprocess.run([pg_bin("pgbench"), "-i", "-q", "-s", "1", "-h", str(self.sock_dir),
                        "-U", "postgres", "postgres"], check=True, capture_output=True)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def client_dir(work: Path, name: str, target: str) -> str:
    """Returns a directory whose .s.PGSQL.5432 is ``target`` (pgbench's -h)."""
    d = work / f"pg-{name}"
    d.mkdir(exist_ok=True)
    link = d / PG_SOCKET
    if not link.is_symlink():
        link.symlink_to(target)
    return str(d)


def pgbench_tps(host_dir: str, seconds: int) -> float:
    """Runs pgbench select-only with 8 clients against host_dir; returns its tps."""
    r = subprocess.run([pg_bin("pgbench"), "-n", "-S", "-c", "8", "-j", "2", "-T",
                        str(seconds), "-h", host_dir, "-U", "postgres", "postgres"],
                       capture_output=True, text=True, timeout=seconds + 120, check=False)
    m = re.search(r"tps = ([0-9.]+)", r.stdout)
    if r.returncode != 0 or not m:
        raise RuntimeError(f"pgbench through {host_dir} failed: {r.stderr.strip()[-1000:]}")
    return float(m.group(1))


def measure(dirs: dict[str, str], repeat: int, seconds: int,
            say: Callable[[str], None]) -> dict[str, float]:
    """pgbench tps by path, the paths in turn, ``repeat`` rounds; medians."""
    runs: dict[str, list[float]] = {k: [] for k in dirs}
    for _ in range(repeat):
        for name, d in dirs.items():
            runs[name].append(pgbench_tps(d, seconds))
    out = {k: statistics.median(v) for k, v in runs.items()}
    say("pgbench select-only, 8 clients: " + ", ".join(f"{k} {v:.0f} tps"
                                                       for k, v in out.items()))
    return out
