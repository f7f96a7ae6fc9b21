"""Many simulated peer domains in one process: a hub daemon's peers, for tests and benchmarks.

An xsockd process per peer would cost a hundred interpreters (memory, and minutes of start-up
on two cores); here one process runs one ``Manager`` per peer domain on one loop, each with
its own hypervisor and XenStore connections, configuration and rundir, as its own daemon
would.  The hub (the daemon under test) is a real ``xsockd`` process (``DaemonProcess``).

Run as a script by ``PeerFarm``:

    python tests/peerfarm.py --sim-dir D --work W --hub 0 --domains 1,2,... --echo PATH

prints ``ready`` once every peer's manager started; SIGTERM stops them all (goodbyes sent,
nodes removed).  Peer N's application socket to the hub is ``W/runN/<hub>.sock``; every peer
serves ``echo`` (its default service) at PATH.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from xsockd.sim.child import terminate

__all__ = ["HubWorld", "PeerFarm", "QuietEcho", "echo_time", "fd_count", "rss_kib"]


class QuietEcho:
    """The demo's echo service, its per-connection lines read and dropped (a pipe nobody reads
    would block it after a few hundred connections)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.proc = subprocess.Popen([sys.executable, "-m", "xsockd.demo", "--serve-echo",
                                      str(path)], stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != b"listening":
            raise RuntimeError("the echo service did not start")
        stdout = self.proc.stdout

        def drain() -> None:
            with stdout:
                for _ in stdout:
                    pass

        self._drain = threading.Thread(target=drain, daemon=True)
        self._drain.start()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._drain.join(5)
        self.path.unlink(missing_ok=True)


class PeerFarm:
    """The farm process: ``domains`` peers of ``hub``, each with ``extra`` in its config."""

    def __init__(self, sim_dir: Path, work: Path, hub: int, domains: Sequence[int],
                 echo: Path, ring_size: str = "256KiB", extra: str = "") -> None:
        self.work, self.hub, self.domains = work, hub, list(domains)
        self.log_path = work / "peerfarm.log"
        self.cmd = [sys.executable, __file__, "--sim-dir", str(sim_dir), "--work", str(work),
                    "--hub", str(hub), "--domains", ",".join(map(str, domains)), "--echo",
                    str(echo), "--ring-size", ring_size, "--extra", extra]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120.0) -> PeerFarm:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=log)
        log.close()
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != b"ready":
            self.stop()
            raise RuntimeError(f"the peer farm did not start ({line!r}):\n{self.log()[-4000:]}")
        return self

    def socket(self, peer: int) -> Path:
        """Returns peer's application socket to the hub."""
        return self.work / f"run{peer}" / f"{self.hub}.sock"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """Kills the farm with SIGKILL: its peers' links end without a goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        self.stop()

    def stop(self) -> None:
        if self.proc is None:
            return
        terminate(self.proc, 30)  # a hundred peers say goodbye: more than SimHost's 10 s
        if self.proc.stdout:
            self.proc.stdout.close()
        self.proc = None


def echo_time(path: Path, timeout: float = 30.0) -> float:
    """Returns the seconds a stream open takes: connect, one byte there and back, close."""
    import socket
    import time

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        t0 = time.perf_counter()
        s.connect(str(path))
        s.sendall(b"x")
        if s.recv(1) != b"x":
            raise RuntimeError(f"no echo through {path}")
        return time.perf_counter() - t0


class HubWorld:
    """A sim host, the hub's xsockd (domain 0, a real process) and a farm of its peers.

    ``hub_extra`` and ``farm_extra`` are appended to the configurations (TOML lines);
    ``dbus`` is a bus address the hub serves.  ``start()`` starts the hub, then the farm.
    """

    def __init__(self, work: Path, peers: Sequence[int], *, hub_extra: str = "",
                 farm_extra: str = "", dbus: str | None = None) -> None:
        from xsockd.demo import DaemonProcess, write_config
        from xsockd.sim.host import SimHost

        self.work, self.domains = work, list(peers)
        # A domU holds 2 grant requests a link: bounding them lets the host's descriptor
        # limit (often 20000, not raisable in a container) cover a hundred domains.
        self.host = SimHost(work / "sim", domains=[0, *self.domains], max_grant_requests=8)
        self.host.__enter__()
        try:
            self.echo = QuietEcho(work / "echo.sock")
        except BaseException:
            self.host.__exit__(None, None, None)
            raise
        conf = write_config(work / "dom0.conf", rundir=work / "run0", sim_dir=work / "sim",
                            peers=self.domains, services={"echo": work / "echo.sock"},
                            default="echo", extra=hub_extra)
        self.daemon = DaemonProcess(0, conf, work / "xsockd-0.log", verbose=True,
                                    dbus_address=dbus)
        self.farm = PeerFarm(work / "sim", work, 0, self.domains, work / "echo.sock",
                             extra=farm_extra)

    def start(self) -> HubWorld:
        self.daemon.start()
        self.farm.start()
        return self

    def hub_socket(self, peer: int) -> Path:
        """Returns the hub's application socket to ``peer``."""
        return self.work / "run0" / f"{peer}.sock"

    def close(self) -> None:
        self.daemon.stop()
        self.farm.stop()
        self.echo.close()
        self.host.__exit__(None, None, None)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int, kind: str = "RssAnon") -> int:
    """Returns ``pid``'s resident memory of ``kind`` in KiB: RssAnon (its heap and stacks, not
    the ring pages it maps, which become resident as bytes first pass through them), VmRSS."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(f"{kind}:"))


def _run(args: argparse.Namespace) -> int:
    import logging

    from xsockd.backend_sim import SimBackend
    from xsockd.config import load_config
    from xsockd.demo import write_config
    from xsockd.loop import Loop
    from xsockd.manager import Manager

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(message)s")
    work = Path(args.work)
    loop = Loop()
    managers: list[Manager] = []
    for dom in (int(d) for d in args.domains.split(",")):
        conf = write_config(work / f"dom{dom}.conf", rundir=work / f"run{dom}",
                            sim_dir=Path(args.sim_dir), peers=[args.hub],
                            services={"echo": Path(args.echo)}, default="echo",
                            ring_size=args.ring_size, extra=args.extra.replace("\\n", "\n"))
        manager = Manager(load_config(str(conf)), SimBackend(dom, args.sim_dir), loop)
        manager.start()
        managers.append(manager)

    def stop() -> None:
        for m in managers:
            m.stop()
            m.backend.close()
        loop.stop()

    loop.add_signal(signal.SIGTERM, stop)
    print("ready", flush=True)
    loop.run()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sim-dir", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--hub", type=int, required=True)
    p.add_argument("--domains", required=True)
    p.add_argument("--echo", required=True)
    p.add_argument("--ring-size", default="256KiB")
    p.add_argument("--extra", default="")
    return _run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
