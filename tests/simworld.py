"""A simulated host with real xsockd processes, for end-to-end tests.

Domains 1, 2 and 3 each get a configuration and (when started) an xsockd process; domain 2
exposes an echo service (its default) to 1 and 3.  Everything is real: processes, Unix sockets,
shared memory and the XenStore server; the test talks to the daemons only through their
sockets, their logs, the sim's accounting and XenStore.
"""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from xsockd.demo import DaemonProcess, write_config
from xsockd.sim.host import SimHost


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < min(hard, 65536):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))


class EchoService:
    """The demo's echo service in its own process; prints a sha256 line per connection."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.proc = subprocess.Popen([sys.executable, "-m", "xsockd.demo", "--serve-echo",
                                      str(path)], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "listening"

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        if self.path.exists():
            self.path.unlink()


class SimWorld:
    def __init__(self, work: Path, *, peers: dict[int, list[int]] | None = None,
                 ring_size: str = "256KiB", extra: dict[int, str] | None = None,
                 echo_on: tuple[int, ...] = (2,),
                 dbus: dict[int, str] | None = None) -> None:
        raise_fd_limit()
        self.work = work
        self.sim_dir = work / "sim"
        self.host = SimHost(self.sim_dir, domains=[0, 1, 2, 3])
        self.host.__enter__()
        self.echo_path = work / "echo.sock"
        self.echo: EchoService | None = None
        peers = peers or {1: [2], 2: [1], 3: [2]}
        self.daemons: dict[int, DaemonProcess] = {}
        for dom, dom_peers in peers.items():
            services = {"echo": self.echo_path} if dom in echo_on else None
            conf = write_config(work / f"dom{dom}.conf", rundir=self.rundir(dom),
                                sim_dir=self.sim_dir, peers=dom_peers, services=services,
                                default="echo" if services else None, ring_size=ring_size,
                                extra=(extra or {}).get(dom, ""))
            self.daemons[dom] = DaemonProcess(dom, conf, work / f"xsockd-{dom}.log", verbose=True,
                                              dbus_address=(dbus or {}).get(dom))

    def rundir(self, dom: int) -> Path:
        return self.work / f"run{dom}"

    def start(self, *doms: int, echo: bool = True) -> SimWorld:
        if echo and self.echo is None:
            self.echo = EchoService(self.echo_path)
        for dom in doms or tuple(self.daemons):
            self.daemons[dom].start()
        return self

    def connect(self, src: int, dst: int, timeout: float = 30.0) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(self.rundir(src) / f"{dst}.sock"))  # blocking: waits for the backlog
        except OSError:
            s.close()
            raise
        s.settimeout(timeout)
        return s

    def kill9(self, dom: int) -> None:
        d = self.daemons[dom]
        assert d.proc is not None
        d.proc.send_signal(signal.SIGKILL)
        d.stop()  # reaps it and closes its log pipe

    def restart(self, dom: int) -> None:
        self.daemons[dom].stop()
        self.daemons[dom].start()

    def accounting(self, dom: int) -> dict[str, int]:
        return self.host.accounting()[dom]

    def xs_tree(self, path: str) -> list[str]:
        """Returns every node below path (dom0's view), or [] if there is none."""
        xs = self.host.xenstore(0)
        try:
            out: list[str] = []

            def walk(p: str) -> None:
                out.append(p)
                for child in xs.directory(p):
                    walk(f"{p}/{child}")
            try:
                walk(path)
            except OSError:
                return []
            return out
        finally:
            xs.close()

    def wait_for(self, what: str, cond, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while True:
            value = cond()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; logs:\n{self.logs()}")
            time.sleep(0.05)

    def logs(self) -> str:
        return "\n".join(f"--- xsockd {d}:\n{p.log()[-3000:]}" for d, p in self.daemons.items())

    def close(self) -> None:
        for d in self.daemons.values():
            d.stop()
        if self.echo:
            self.echo.close()
        self.host.__exit__(None, None, None)


def echo_roundtrip(sock: socket.socket, data: bytes) -> bytes:
    """Sends data (then half-closes) while reading the echo to EOF; returns what came back."""
    def writer() -> None:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=writer)
    t.start()
    out = bytearray()
    while chunk := sock.recv(1 << 20):
        out += chunk
    t.join()
    return bytes(out)


def stream_hashes(sock: socket.socket, total: int, block: int = 1 << 20) -> tuple[str, str]:
    """Streams ``total`` pseudo-random bytes through an echo; returns (sent, received) sha256."""
    blocks = [os.urandom(block) for _ in range(4)]
    sent_h, got_h = hashlib.sha256(), hashlib.sha256()

    def writer() -> None:
        left, i = total, 0
        while left > 0:
            chunk = blocks[i % 4][:left]
            sock.sendall(chunk)
            sent_h.update(chunk)
            left -= len(chunk)
            i += 1
        sock.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=writer)
    t.start()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    while n := sock.recv_into(buf):
        got_h.update(view[:n])
    t.join()
    return sent_h.hexdigest(), got_h.hexdigest()


def assert_ended(sock: socket.socket, timeout: float = 5.0) -> None:
    """Asserts that the stream ends (EOF or a reset) within ``timeout``, then closes it."""
    sock.settimeout(timeout)
    try:
        assert sock.recv(100) == b"", "data instead of the end of the stream"
    except ConnectionResetError:
        pass
    finally:
        sock.close()
