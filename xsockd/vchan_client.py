"""xsockd as a libxenvchan client: one ``[vchan.NAME]`` with ``role = "client"``.

Every connection to ``<rundir>/<domain>/<name>.sock`` opens the vchan that the configured
domain's server published at the configured path: both nodes read in one transaction, each
required canonical decimal and owned by that domain, a page another client holds refused
(without disturbing it), the port bound, the shared page mapped
(our unmap notification clearing ``cli_live``), probed once, exactly the probed grants
mapped, the endpoint attached and the connection spliced in with a ``VchanPump``.  Any failure
undoes in reverse and closes the connection (the application sees EOF).  One vchan at a time
(libxenvchan servers serve one client): further connections wait in the backlog.  A server
not yet published is waited for (a watch on the path) up to ``WAIT``.

Lifecycle of a ``VchanClient``: created -> started (``start``: listening) -> closed.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from xsockd.backend import Backend, UnmapNotify, XenStore
from xsockd.config import VchanConfig
from xsockd.errors import ProtocolError
from xsockd.peerlog import PeerLog, escape
from xsockd.rendezvous import canonical_int
from xsockd.vchan import (
    Role,
    StreamTotals,
    VchanEndpoint,
    VchanHeld,
    VchanPump,
    client_probe,
    lib,
    split_rings,
)
from xsockd.xenstore_client import transact

if TYPE_CHECKING:  # the daemon's loop is GLib's; the manager runs on any (tests/fakeloop.py)
    from xsockd.loop import Loop, Timer

log = logging.getLogger("xsockd.vchan")

WAIT = 10.0  # seconds a connection waits for the server to publish
MAX_GRANT_REF = 0xFFFFFFFF
MAX_PORT = 0xFFFFFFFF


@dataclass(frozen=True)
class Published:
    """A server's two nodes, validated."""

    ring_ref: int
    port: int


def read_published(xs: XenStore, path: str, server: int) -> Published:
    """Returns the nodes ``server`` published at ``path``, read in one transaction.

    Raises FileNotFoundError if they are not there (yet), ProtocolError if they are not two
    canonical decimals in range (0 refused, as libxenvchan does) or not owned by ``server``.
    """
    def read(tx: int) -> tuple[dict[str, str], dict[str, int]]:
        values: dict[str, str] = {}
        owners: dict[str, int] = {}
        for name in ("ring-ref", "event-channel"):
            node = f"{path}/{name}"
            values[name] = xs.read(node, tx)[:32].decode("ascii", "replace")
            perms = xs.get_perms(node, tx)
            owners[name] = perms[0].domid if perms else -1
        return values, owners

    try:
        values, owners = transact(xs, read)
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise FileNotFoundError(errno.ENOENT, f"{path}: not published") from e
        raise ProtocolError(f"cannot read {path}: {e.strerror}") from e
    for name, owner in owners.items():
        if owner != server:
            raise ProtocolError(f"{path}/{name} is owned by domain {owner}, not the configured "
                                f"server, domain {server}: ignored")
    ref = canonical_int(values["ring-ref"], 1, MAX_GRANT_REF)
    port = canonical_int(values["event-channel"], 1, MAX_PORT)
    if ref is None or port is None:
        raise ProtocolError(f"{path}: ring-ref {escape(values['ring-ref'])!r} and event-channel "
                            f"{escape(values['event-channel'])!r} are not both decimal 1..2^32-1")
    return Published(ref, port)


def refuse_if_held(backend: Backend, server: int, ring_ref: int) -> None:
    """Raises OSError(EBUSY) if another client is connected to the page at ``ring_ref``.

    Looked at through a mapping of its own, without our unmap notification: the mapping we
    attach through clears ``cli_live`` when it goes, refused or not, and the server would
    take that for its client leaving.  The endpoint checks again at attach.
    """
    peek = backend.map(server, [ring_ref])
    try:
        held = peek.buffer[lib.XSK_VCHAN_OFF_CLI_LIVE] == lib.XSK_VCHAN_CONNECTED
    finally:
        peek.close()
    if held:
        raise OSError(errno.EBUSY, "another client is connected to it (busy)")


class _Opened(VchanHeld):
    """One vchan as a client: port, shared page, rings, endpoint; closed in reverse."""

    def __init__(self, backend: Backend, server: int, pub: Published) -> None:
        super().__init__()
        try:
            refuse_if_held(backend, server, pub.ring_ref)
            self.evtchn = backend.bind_interdomain(server, pub.port)
            self.shared = backend.map(server, [pub.ring_ref],
                                    UnmapNotify(lib.XSK_VCHAN_OFF_CLI_LIVE, self.evtchn.port))
            lay, grants = client_probe(self.shared.buffer)  # orders and grants read once
            left = right = None
            if grants:
                self.rings = backend.map(server, grants)
                left, right = split_rings(lay, self.rings.buffer)
            self.endpoint = VchanEndpoint(self.shared.buffer, Role.CLIENT, lay, left, right)
            if self.endpoint.take_notify():  # tell the server we are connected
                self.evtchn.notify()
        except BaseException:
            self.close()
            raise


class VchanClient:
    def __init__(self, cfg: VchanConfig, listener: socket.socket, backend: Backend,
                 loop: Loop, peerlog: PeerLog) -> None:
        self.cfg = cfg
        self.listener = listener
        self.backend = backend
        self.loop = loop
        self.peerlog = peerlog
        self.xs = backend.open_xenstore()
        self.token = f"vchan-client/{cfg.name}"
        self.vchan: _Opened | None = None
        self.waiting: socket.socket | None = None  # a connection waiting for the server
        self._wait_timer: Timer | None = None
        self.state = "idle"
        self.streams = 0
        self.last_result: object = None
        self.totals = StreamTotals()
        self._closed = False
        self._draining = False

    def __repr__(self) -> str:
        return f"<VchanClient {self.cfg.name} of domain {self.cfg.domain} {self.state}>"

    def start(self) -> None:
        self.loop.add_reader(self.xs.fileno(), self._guarded(self._on_xenstore))
        self.loop.add_reader(self.listener.fileno(), self._guarded(self._on_accept))

    def _guarded(self, fn: Callable[[], None]) -> Callable[[], None]:
        """A loop callback that cannot take the daemon down: a failure ends this vchan."""
        def run() -> None:
            try:
                fn()
            except Exception as e:
                log.error("vchan %s: internal error: %s: %s (traceback at debug level)",
                          self.cfg.name, type(e).__name__, e)
                log.debug("traceback", exc_info=e)
                self._finish()
        return run

    # ---- a connection -------------------------------------------------------------------

    def _on_accept(self) -> None:
        if self.state != "idle" or self._draining:
            return
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.peerlog.error(self.cfg.domain, "vchan %s: accepting: %s", self.cfg.name,
                               e.strerror)
            return
        # One vchan at a time: the next connections wait in the backlog.
        self.loop.remove_reader(self.listener.fileno())
        self.waiting = conn
        self.state = "waiting"
        self.xs.watch(self.cfg.path, self.token)  # fires once at once: the first try
        self._wait_timer = self.loop.call_later(WAIT, self._guarded(self._timed_out))

    def _on_xenstore(self) -> None:
        # One read per batch, however many events it holds: the server's domain fires our
        # watch with each of its writes under the path, and must not make us spend a
        # transaction (and a pass of the loop) on each one.
        events = self.xs.read_events()
        if self.state == "waiting" and any(ev.token == self.token for ev in events):
            self._try_open()

    def _timed_out(self) -> None:
        self._wait_timer = None
        if self.state == "waiting":
            self.peerlog.warning(self.cfg.domain, "vchan %s: domain %d published nothing at %s "
                                 "within %g s; the connection sees EOF", self.cfg.name,
                                 self.cfg.domain, self.cfg.path, WAIT)
            self._finish()

    def _try_open(self) -> None:
        try:
            pub = read_published(self.xs, self.cfg.path, self.cfg.domain)
        except FileNotFoundError:
            return  # not yet: the watch fires when it is
        except ProtocolError as e:
            self.peerlog.warning(self.cfg.domain, "vchan %s: %s", self.cfg.name, e)
            self._finish()
            return
        conn = self.waiting
        assert conn is not None
        self.waiting = None
        self._stop_waiting()
        try:
            self.vchan = _Opened(self.backend, self.cfg.domain, pub)
            assert self.vchan.endpoint is not None and self.vchan.evtchn is not None
            self.vchan.pump = VchanPump(self.vchan.endpoint, conn, self.vchan.evtchn,
                                        self.cfg.linger)
        except OSError as e:
            conn.close()
            self.peerlog.warning(self.cfg.domain, "vchan %s: opening domain %d's vchan at %s: "
                                 "%s; the connection sees EOF", self.cfg.name, self.cfg.domain,
                                 self.cfg.path, e)
            self._finish()
            return
        self.state = "connected"
        self.streams += 1
        # The server decides how long a stream lasts: one ending each at once, with an
        # application connecting in a loop, costs lines up to its domain's budget only.
        self.peerlog.info(self.cfg.domain, "vchan %s: connected to domain %d at %s",
                          self.cfg.name, self.cfg.domain, self.cfg.path)
        self.loop.add_reader(self.vchan.pump.fileno(), self._guarded(self._on_pump_end))

    def _stop_waiting(self) -> None:
        if self._wait_timer is not None:
            self._wait_timer.cancel()
            self._wait_timer = None
        try:
            self.xs.unwatch(self.cfg.path, self.token)
        except OSError as e:
            log.debug("vchan %s: unwatching %s: %s", self.cfg.name, self.cfg.path, e)

    def _on_pump_end(self) -> None:
        v = self.vchan
        if v is None or v.pump is None or (result := v.pump.result()) is None:
            return
        self.last_result = result
        self.peerlog.info(self.cfg.domain, "vchan %s: stream with domain %d ended (%s, %d "
                          "bytes in, %d out)", self.cfg.name, self.cfg.domain,
                          result.end.name.lower(), result.bytes_in, result.bytes_out)
        self._finish()

    def _finish(self) -> None:
        """Releases the vchan (or the waiting connection) and takes the next connection."""
        if self.vchan is not None:
            if self.vchan.pump is not None:
                self.loop.remove_reader(self.vchan.pump.fileno())
            self.totals.ended(self.vchan)
            self.vchan.close()
            self.vchan = None
        if self.waiting is not None:
            self.waiting.close()
            self.waiting = None
            self._stop_waiting()
        if self._closed:
            return
        self.state = "idle"
        if self._draining:
            return
        self.loop.add_reader(self.listener.fileno(), self._guarded(self._on_accept))
        self.loop.call_soon(self._guarded(self._on_accept))  # one may wait in the backlog

    def drain(self) -> None:
        """The daemon is stopping: no connection is taken any more (those queued see EOF at
        close), one still waiting for the server ends now; a connected stream goes on until
        ``close``."""
        self._draining = True
        self.loop.remove_reader(self.listener.fileno())
        if self.state == "waiting":
            self._finish()

    def peer_destroyed(self) -> None:
        """The server's domain is gone (``@releaseDomain``): it ran no unmap notification."""
        if self.state in ("waiting", "connected"):
            self.peerlog.warning(self.cfg.domain, "vchan %s: domain %d was destroyed",
                                 self.cfg.name, self.cfg.domain)
            self._finish()

    def close(self) -> None:
        """Ends any stream and releases everything; the caller removes the socket file."""
        if self._closed:
            return
        self._closed = True
        self.loop.remove_reader(self.listener.fileno())
        self._finish()
        self.loop.remove_reader(self.xs.fileno())
        self.xs.close()
        self.listener.close()
        self.state = "closed"

    def describe(self) -> dict[str, object]:
        bytes_in, bytes_out = self.totals.now(self.vchan)
        return {"kind": "vchan-client", "name": self.cfg.name, "path": self.cfg.path,
                "peer": self.cfg.domain, "state": self.state, "streams": self.streams,
                "bytes_in": bytes_in, "bytes_out": bytes_out}
