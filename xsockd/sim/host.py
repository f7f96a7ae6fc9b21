"""The simulated Xen host: XenStore and the hypervisor for several domains, in one process.

    python -m xsockd.sim.host --dir DIR --domains 0,1,2 [--grant-limit N]
        [--max-event-channels N] [--max-domains N] [--max-grant-requests N]

creates, per domain N, ``DIR/domN/xenstored.sock`` (XenStore as domain N; point Xen's own tools
at it with XENSTORED_PATH) and ``DIR/domN/hypervisor.sock`` (grants and event channels as domain
N), plus ``DIR/control.sock`` for accounting and for creating or destroying domains.  It prints
``ready`` once every socket listens, and removes them on SIGTERM or SIGINT, after writing its
leak report to stderr: the grants, mappings, event-channel ports and XenStore nodes below the
domains' ``data`` directories still held when it stops (none, once every xsockd stopped).
Sockets are mode 0600 and directories 0755 whatever the umask.  Every domain is bounded
(docs/SIM.md): its event-channel ports by what the descriptor limit covers (the soft
RLIMIT_NOFILE is raised to the hard one at start), at most Xen's default of 1023.

``SimHost`` runs it as a child process for tests and the demo.
"""

from __future__ import annotations

import argparse
import errno
import logging
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

from xsockd.listeners import listen_unix, make_dir
from xsockd.service import ServiceNotifier
from xsockd.sim import SOCKET_MODE
from xsockd.sim.acceptpause import PAUSE, AcceptPause
from xsockd.sim.budget import (
    FDS_PER_PORT,
    XEN_MAX_EVENT_CHANNELS,
    event_channel_budget,
    raise_nofile,
)
from xsockd.sim.child import terminate
from xsockd.sim.hypervisor import (
    DOMID_FIRST_RESERVED,
    Hypervisor,
    recv_message,
    send_message,
)
from xsockd.sim.hypervisor import (
    MAX_CONNECTIONS as HV_CONNECTIONS,
)
from xsockd.sim.xenstored import MAX_CONNECTIONS as XS_CONNECTIONS
from xsockd.sim.xenstored import XenStoreServer
from xsockd.words import plain
from xsockd.xenstore_client import XenStoreClient

__all__ = ["SimHost", "leak_report", "main", "sim_accounting"]

log = logging.getLogger(__name__)

MAX_CONTROL_CLIENTS = 16
DEFAULT_MAX_DOMAINS = 8


def fixed_fds_per_domain(grant_limit: int) -> int:
    """Descriptors one domain may cost the host besides its ports: a memfd per grant request
    (at most one per page), its hypervisor and XenStore connections, and its two listeners."""
    return grant_limit + HV_CONNECTIONS + XS_CONNECTIONS + 2


class Host:
    def __init__(self, directory: str, domains: Sequence[int], grant_limit: int,
                 max_ports: int = XEN_MAX_EVENT_CHANNELS,
                 max_domains: int = DEFAULT_MAX_DOMAINS, *,
                 max_grant_requests: int | None = None, dom0_max_ports: int | None = None
                 ) -> None:
        self.dir = directory
        self.max_domains = max(max_domains, len(set(domains)))
        self.sel = selectors.DefaultSelector()
        self.xenstore = XenStoreServer()
        self.hypervisor = Hypervisor(grant_limit, max_ports,
                                     max_grant_requests=max_grant_requests,
                                     dom0_max_ports=dom0_max_ports)
        self.xenstore.register(self.sel)
        self.hypervisor.register(self.sel)
        self.pause = AcceptPause()
        self.clients: list[socket.socket] = []
        self.domains: set[int] = set()
        for d in domains:
            self.create_domain(d)
        self.control = listen_unix(os.path.join(directory, "control.sock"), SOCKET_MODE,
                                   socket.SOCK_SEQPACKET, backlog=MAX_CONTROL_CLIENTS)
        self.sel.register(self.control, selectors.EVENT_READ, self._accept_control)
        self.running = True

    def create_domain(self, domid: int) -> None:
        if domid in self.domains:  # its listeners would be replaced, the old ones leaked
            raise OSError(errno.EEXIST, f"domain {domid} exists")
        if len(self.domains) >= self.max_domains:
            raise OSError(errno.ENOSPC, f"the host's descriptor budget covers "
                                        f"{self.max_domains} domains (--max-domains)")
        home = os.path.join(self.dir, f"dom{domid}")
        make_dir(home)
        self.xenstore.add_domain(domid, os.path.join(home, "xenstored.sock"))
        self.hypervisor.add_domain(domid, os.path.join(home, "hypervisor.sock"))
        self.domains.add(domid)

    def destroy_domain(self, domid: int) -> None:
        self.hypervisor.remove_domain(domid)
        self.xenstore.remove_domain(domid)
        self.domains.discard(domid)

    def _accept_control(self) -> None:
        client = self.pause.accept(self.sel, self.control)
        if client is None:
            return
        if len(self.clients) >= MAX_CONTROL_CLIENTS:
            client.close()
            return
        client.setblocking(False)
        self.clients.append(client)
        self.sel.register(client, selectors.EVENT_READ, lambda: self._control(client))

    def _drop_control(self, client: socket.socket) -> None:
        self.sel.unregister(client)
        self.clients.remove(client)
        client.close()

    def _control(self, client: socket.socket) -> None:
        try:
            msg, fds = recv_message(client)
        except (BlockingIOError, InterruptedError):
            return
        except (ValueError, OSError):
            msg, fds = None, []
        for fd in fds:
            os.close(fd)
        if msg is None:
            self._drop_control(client)
            return
        try:
            reply = self._control_request(msg)
        except OSError as e:
            reply = {"ok": False, "errno": e.errno, "error": str(e)}
        except Exception as e:  # a bug must cost this request, not the host
            log.exception("internal error answering a control request")
            reply = {"ok": False, "errno": errno.EIO, "error": f"internal error: {e}"}
        try:
            send_message(client, reply)
        except OSError:
            self._drop_control(client)

    def _control_request(self, msg: dict[str, Any]) -> dict[str, Any]:
        op = msg.get("op")
        if op in ("destroy_domain", "create_domain"):
            domid = msg.get("domid")
            if type(domid) is not int or not 0 <= domid < DOMID_FIRST_RESERVED:
                raise OSError(errno.EINVAL, f"domid: an integer in 0..{DOMID_FIRST_RESERVED - 1}")
            if op == "create_domain":
                self.create_domain(domid)
            else:
                self.destroy_domain(domid)
        elif op == "domains":  # those that exist now (not destroyed)
            return {"ok": True, "domains": sorted(self.hypervisor.listeners)}
        elif op == "accounting":
            return {"ok": True, "domains": {str(d): a for d, a
                                            in self.hypervisor.accounting().items()}}
        elif op == "stats":
            return {"ok": True, "internal_errors": (self.hypervisor.internal_errors
                                                    + self.xenstore.internal_errors),
                    "max_event_channels": self.hypervisor.max_ports,
                    "max_grant_requests": self.hypervisor.max_grant_requests,
                    "max_domains": self.max_domains}
        elif op == "shutdown":
            self.running = False
        else:
            raise OSError(errno.ENOSYS, f"unknown operation {str(op)[:40]!r}")
        return {"ok": True}

    def run(self) -> None:
        while self.running:
            paused = self.pause.paused or self.hypervisor.pause.paused or self.xenstore.pause.paused
            for key, _ in self.sel.select(PAUSE if paused else 1.0):
                key.data()
            for owner in (self, self.hypervisor, self.xenstore):
                owner.pause.resume(self.sel)

    def close(self) -> None:
        self.hypervisor.close()
        self.xenstore.close()
        for client in list(self.clients):
            self._drop_control(client)
        self.pause.unregister(self.sel, self.control)
        self.control.close()
        os.unlink(os.path.join(self.dir, "control.sock"))


def leak_report(host: Host) -> str:
    """Returns one line: what the domains still hold (a daemon that stopped holds nothing)."""
    held = []
    for domid, acct in sorted(host.hypervisor.accounting().items()):
        what = [f"{acct[k]} {name}" for k, name in (("granted", "granted pages"),
                ("mapped", "mapped pages"), ("ports", "event-channel ports")) if acct.get(k)]
        if what:
            held.append(f"domain {domid}: {', '.join(what)}")
    # The toolstack makes /local/domain/N/data; what is below it a domain wrote.
    nodes = sorted(p for p in host.xenstore.store.nodes
                   if p.startswith("/local/domain/") and p.split("/")[4:5] == ["data"]
                   and len(p.split("/")) > 5)
    if nodes:
        shown = ", ".join(nodes[:5]) + (f" and {len(nodes) - 5} more" if len(nodes) > 5 else "")
        held.append(f"{len(nodes)} XenStore nodes ({shown})")
    if not held:
        return ("sim host: nothing left behind: no granted or mapped pages, event-channel "
                "ports or XenStore nodes below /local/domain/*/data")
    return "sim host: LEFT BEHIND: " + "; ".join(held)


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
                 grant_limit: int = 1024, max_event_channels: int | None = None,
                 max_domains: int | None = None, max_grant_requests: int | None = None
                 ) -> None:
        self.dir = Path(directory)
        self.domains = list(domains)
        self.grant_limit = grant_limit
        self.options = [] if max_event_channels is None else [
            "--max-event-channels", str(max_event_channels)]
        if max_domains is not None:
            self.options += ["--max-domains", str(max_domains)]
        if max_grant_requests is not None:
            self.options += ["--max-grant-requests", str(max_grant_requests)]
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> SimHost:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "xsockd.sim.host", "--dir", str(self.dir), "--domains",
             ",".join(map(str, self.domains)), "--grant-limit", str(self.grant_limit),
             *self.options],
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
        terminate(self.proc, 10)
        if self.proc.stdout:
            self.proc.stdout.close()
        self.proc = None


def main(argv: Sequence[str] | None = None) -> int:
    installed = os.path.basename(sys.argv[0]) == "xsockd-simhost"
    p = argparse.ArgumentParser(prog="xsockd-simhost" if installed else "python -m xsockd.sim.host",
                                description=plain(__doc__),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True, help="directory for the domains' sockets")
    p.add_argument("--domains", default="0,1,2", help="comma-separated domain ids (default 0,1,2)")
    p.add_argument("--grant-limit", type=int, default=1024,
                   help="pages one domain may grant at once (default 1024, as Linux gntalloc)")
    p.add_argument("--max-event-channels", type=int, default=None, metavar="N",
                   help="event-channel ports one domain may hold (default: Xen's 1023, or "
                        "fewer if the descriptor limit does not cover that many)")
    p.add_argument("--max-domains", type=int, default=None, metavar="N",
                   help="domains the host may run at once, counting those created later "
                        f"(default: {DEFAULT_MAX_DOMAINS} or as many as --domains)")
    p.add_argument("--max-grant-requests", type=int, default=None, metavar="N",
                   help="grant requests a domU may hold at once (each costs the host a "
                        "descriptor); with it, dom0 keeps Xen's full limits and the domUs share "
                        "the rest of the descriptor budget, so that many domains fit "
                        "(default: no bound besides --grant-limit, every domain an equal share)")
    args = p.parse_args(argv)
    try:
        domains = [int(x) for x in args.domains.split(",")]
    except ValueError:
        p.error(f"--domains {args.domains!r}: a comma-separated list of integers")
    if not all(0 <= d < DOMID_FIRST_RESERVED for d in domains):
        p.error(f"--domains: domain ids are 0..{DOMID_FIRST_RESERVED - 1}")
    if len(set(domains)) != len(domains):
        p.error(f"--domains {args.domains!r}: a domain is listed twice")
    if args.grant_limit < 1:
        p.error("--grant-limit: at least 1")
    max_domains = max(args.max_domains or DEFAULT_MAX_DOMAINS, len(set(domains)))
    requests = args.max_grant_requests
    if requests is not None and not 1 <= requests <= args.grant_limit:
        p.error("--max-grant-requests: 1 to --grant-limit")
    nofile = raise_nofile()
    if requests is None:
        budget = event_channel_budget(nofile, max_domains, fixed_fds_per_domain(args.grant_limit))
        dom0_ports = None
    else:  # dom0 (the trusted toolstack) reserved in full, the domUs share what is left
        dom0_ports = args.max_event_channels or XEN_MAX_EVENT_CHANNELS
        budget = event_channel_budget(
            nofile, max_domains - 1, fixed_fds_per_domain(requests),
            fixed_fds_per_domain(args.grant_limit) + FDS_PER_PORT * dom0_ports)
    max_ports = budget if args.max_event_channels is None else args.max_event_channels
    if max_ports < 1 or max_ports > budget:
        p.error(f"{nofile} descriptors (RLIMIT_NOFILE) cover {max(budget, 0)} event-channel "
                f"ports for each of {max_domains} domains with a grant limit of "
                f"{args.grant_limit}; asked for {max_ports}: raise the limit (ulimit -n) or "
                "lower --max-domains, --grant-limit or --max-event-channels, or set "
                "--max-grant-requests")
    make_dir(args.dir)
    host = Host(args.dir, domains, args.grant_limit, max_ports, max_domains,
                max_grant_requests=requests, dom0_max_ports=dom0_ports)

    def stop(*_: object) -> None:
        host.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print("ready", flush=True)
    ServiceNotifier().ready(f"domains {args.domains} in {args.dir}")  # under systemd
    try:
        host.run()
        print(leak_report(host), file=sys.stderr, flush=True)
    finally:
        host.close()
        for d in domains:
            shutil.rmtree(os.path.join(args.dir, f"dom{d}"), ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
