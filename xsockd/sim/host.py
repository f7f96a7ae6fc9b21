"""The simulated Xen host: XenStore and the hypervisor for several domains, in one process.

    python -m xsockd.sim.host --dir DIR --domains 0,1,2 [--grant-limit N]

creates, per domain N, ``DIR/domN/xenstored.sock`` (XenStore as domain N; point Xen's own tools
at it with XENSTORED_PATH) and ``DIR/domN/hypervisor.sock`` (grants and event channels as domain
N), plus ``DIR/control.sock`` for accounting and for creating or destroying domains.  It prints
``ready`` once every socket listens, and removes them on SIGTERM or SIGINT.

``SimHost`` runs it as a child process for tests and the demo.
"""

from __future__ import annotations

import argparse
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xsockd.service import ServiceNotifier
from xsockd.sim.hypervisor import Hypervisor, recv_message, send_message
from xsockd.sim.xenstored import XenStoreServer
from xsockd.xenstore_client import XenStoreClient

__all__ = ["SimHost", "main", "sim_accounting"]


class Host:
    def __init__(self, directory: str, domains: Sequence[int], grant_limit: int) -> None:
        self.dir = directory
        self.sel = selectors.DefaultSelector()
        self.xenstore = XenStoreServer()
        self.hypervisor = Hypervisor(grant_limit)
        self.xenstore.register(self.sel)
        self.hypervisor.register(self.sel)
        for d in domains:
            self.create_domain(d)
        self.control = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        path = os.path.join(directory, "control.sock")
        if os.path.exists(path):
            os.unlink(path)
        self.control.bind(path)
        self.control.listen(16)
        self.sel.register(self.control, selectors.EVENT_READ, self._accept_control)
        self.running = True

    def create_domain(self, domid: int) -> None:
        home = os.path.join(self.dir, f"dom{domid}")
        os.makedirs(home, exist_ok=True)
        self.xenstore.add_domain(domid, os.path.join(home, "xenstored.sock"))
        self.hypervisor.add_domain(domid, os.path.join(home, "hypervisor.sock"))

    def destroy_domain(self, domid: int) -> None:
        self.hypervisor.remove_domain(domid)
        self.xenstore.remove_domain(domid)

    def _accept_control(self) -> None:
        client, _ = self.control.accept()
        self.sel.register(client, selectors.EVENT_READ, lambda: self._control(client))

    def _control(self, client: socket.socket) -> None:
        try:
            msg, fds = recv_message(client)
        except (ValueError, OSError):
            msg, fds = None, []
        for fd in fds:
            os.close(fd)
        if msg is None:
            self.sel.unregister(client)
            client.close()
            return
        reply: dict[str, Any] = {"ok": True}
        op = msg.get("op")
        if op == "accounting":
            reply["domains"] = {str(d): a for d, a in self.hypervisor.accounting().items()}
        elif op == "domains":  # those that exist now (not destroyed)
            reply["domains"] = sorted(self.hypervisor.listeners)
        elif op == "destroy_domain":
            self.destroy_domain(int(msg["domid"]))
        elif op == "create_domain":
            self.create_domain(int(msg["domid"]))
        elif op == "shutdown":
            self.running = False
        else:
            reply = {"ok": False, "error": f"unknown operation {op!r}"}
        send_message(client, reply)

    def run(self) -> None:
        while self.running:
            for key, _ in self.sel.select(1.0):
                key.data()

    def close(self) -> None:
        self.hypervisor.close()
        self.xenstore.close()
        self.sel.unregister(self.control)
        self.control.close()
        os.unlink(os.path.join(self.dir, "control.sock"))


def control(directory: str | os.PathLike[str], request: dict[str, Any]) -> dict[str, Any]:
    """Returns the host's answer to one control request."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.connect(os.path.join(directory, "control.sock"))
        send_message(s, request)
        reply, _ = recv_message(s)
    if not reply or not reply.get("ok"):
        raise RuntimeError(f"sim host refused {request}: {reply}")
    return reply


def sim_accounting(directory: str | os.PathLike[str]) -> dict[int, dict[str, int]]:
    """Returns granted/mapped pages, ports and connections per simulated domain."""
    return {int(d): a for d, a in control(directory, {"op": "accounting"})["domains"].items()}


class SimHost:
    """A simulated host in a child process, for tests and the demo.  A context manager."""

    def __init__(self, directory: str | os.PathLike[str], domains: Sequence[int] = (0, 1, 2),
                 grant_limit: int = 1024) -> None:
        self.dir = Path(directory)
        self.domains = list(domains)
        self.grant_limit = grant_limit
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> SimHost:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "xsockd.sim.host", "--dir", str(self.dir), "--domains",
             ",".join(map(str, self.domains)), "--grant-limit", str(self.grant_limit)],
            stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            self.stop()
            raise RuntimeError("the simulated host did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def accounting(self) -> dict[int, dict[str, int]]:
        return sim_accounting(self.dir)

    def xenstore(self, domid: int) -> XenStoreClient:
        """Returns a XenStore connection acting as ``domid`` (0: privileged)."""
        return XenStoreClient(str(self.dir / f"dom{domid}" / "xenstored.sock"))

    def destroy_domain(self, domid: int) -> None:
        control(self.dir, {"op": "destroy_domain", "domid": domid})

    def create_domain(self, domid: int) -> None:
        control(self.dir, {"op": "create_domain", "domid": domid})

    def leftovers(self) -> dict[str, object]:
        """Returns what is still held: non-zero grants/maps/ports and xsock XenStore nodes."""
        left: dict[str, object] = {}
        for d, acct in self.accounting().items():
            busy = {k: v for k, v in acct.items() if k != "connections" and v}
            if busy:
                left[f"domain {d}"] = busy
        with self.xenstore(0) as xs:
            for d in self.domains:
                try:
                    nodes = xs.directory(f"/local/domain/{d}/data/xsock")
                except OSError:
                    continue
                if nodes:
                    left[f"/local/domain/{d}/data/xsock"] = nodes
        return left

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        self.proc = None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m xsockd.sim.host", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True, help="directory for the domains' sockets")
    p.add_argument("--domains", default="0,1,2", help="comma-separated domain ids (default 0,1,2)")
    p.add_argument("--grant-limit", type=int, default=1024,
                   help="pages one domain may grant at once (default 1024, as Linux gntalloc)")
    args = p.parse_args(argv)
    try:
        domains = [int(x) for x in args.domains.split(",")]
    except ValueError:
        p.error(f"--domains {args.domains!r}: a comma-separated list of integers")
    os.makedirs(args.dir, exist_ok=True)
    host = Host(args.dir, domains, args.grant_limit)

    def stop(*_: object) -> None:
        host.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print("ready", flush=True)
    ServiceNotifier().ready(f"domains {args.domains} in {args.dir}")  # under systemd
    try:
        host.run()
    finally:
        host.close()
        for d in domains:
            shutil.rmtree(os.path.join(args.dir, f"dom{d}"), ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
