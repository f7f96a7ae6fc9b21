"""xsockd as a libxenvchan server: one ``[vchan.NAME]`` with ``role = "server"``.

It publishes a vchan for the one configured domain at a XenStore path in our own tree (the
shared page and ring pages granted to that domain only, an unbound port only it may bind),
waits for a client to attach (``cli_live`` 2 -> 1, announced on the event channel), removes
the nodes so that no second client maps the page in use, splices the client into the local
service with a ``VchanPump``, and when that stream ends releases everything and publishes a
fresh vchan (docs/VCHAN.md: never reusing a page).  Nothing the client writes is read here
but the shared page, which the C core checks.

Lifecycle of a ``VchanServer``: created -> started (``start``: published) -> closed.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from xsockd.backend import Backend, UnmapNotify, XenStorePerm
from xsockd.config import VchanConfig
from xsockd.peerlog import PeerLog
from xsockd.vchan import (
    Live,
    Role,
    StreamTotals,
    VchanEndpoint,
    VchanHeld,
    VchanPump,
    layout,
    lib,
    server_init,
    split_rings,
)
from xsockd.xenstore_client import transact

if TYPE_CHECKING:  # the daemon's loop is GLib's; the manager runs on any (tests/fakeloop.py)
    from xsockd.loop import Loop, Timer

log = logging.getLogger("xsockd.vchan")

PAGE = 4096
# A client attaching and leaving in a loop costs a publication each time: a few at once, then
# one a second (docs/VCHAN.md, budgets).
REPUBLISH_BURST = 5
REPUBLISH_INTERVAL = 1.0
POLL = 1.0  # seconds: look at the page regardless of notifications, as links do
# A publication that fails (grants or ports exhausted, our XenStore path not writable) is
# retried after PUBLISH_RETRY seconds, doubling to PUBLISH_RETRY_MAX; each distinct error is
# logged once, a lasting failure again every PUBLISH_REMIND seconds: no flood, still
# findable.
PUBLISH_RETRY = 1.0
PUBLISH_RETRY_MAX = 60.0
PUBLISH_REMIND = 600.0
PUBLISH_ERRORS = 8  # distinct errors logged while failing (messages may carry numbers)
# The local service is connected to without blocking the loop, as the manager does for a
# link's stream: a full backlog (EAGAIN) is retried for CONNECT_PATIENCE seconds, a missing
# socket or one nobody listens on (ENOENT, ECONNREFUSED: a service restarting) for
# SERVICE_START_PATIENCE, with a delay doubling from CONNECT_RETRY to CONNECT_RETRY_MAX.
CONNECT_PATIENCE = 5.0
SERVICE_START_PATIENCE = 2.0
CONNECT_RETRY = 0.005
CONNECT_RETRY_MAX = 0.2


def vchan_perms(me: int, peer: int) -> list[XenStorePerm]:
    """Owner us, nobody else anything, the peer may read (libxenvchan's n<srv> r<cli>)."""
    return [XenStorePerm(me, "n"), XenStorePerm(peer, "r")]


class _Published(VchanHeld):
    """One vchan the server granted, released in reverse order of allocation."""

    def __init__(self, backend: Backend, peer: int, left_order: int, right_order: int) -> None:
        super().__init__()
        try:
            lay = layout(left_order, right_order)
            self.evtchn = backend.alloc_unbound(peer)
            # Our process dying clears srv_live and signals the client (its port is ours).
            # A grant with an unmap notification is one page (gntalloc's rule): the rings
            # are granted apart.
            self.shared = backend.grant(peer, 1,
                                       UnmapNotify(lib.XSK_VCHAN_OFF_SRV_LIVE, self.evtchn.port))
            left = right = None
            refs: list[int] = []
            if lay.grants:
                self.rings = backend.grant(peer, lay.grants)
                refs = list(self.rings.refs)
                left, right = split_rings(lay, self.rings.buffer)
            page = self.shared.buffer[:PAGE]
            server_init(page, left_order, right_order, refs)
            self.endpoint = VchanEndpoint(page, Role.SERVER, lay, left, right)
        except BaseException:
            self.close()
            raise

    @property
    def ring_ref(self) -> int:
        assert self.shared is not None
        return self.shared.refs[0]


@dataclass
class _Failing:
    """Publications failing since ``since`` (until one succeeds)."""

    since: float
    reminded: float  # when a failure was last logged as a warning
    delay: float  # before the next try
    tries: int = 0
    seen: set[str] = field(default_factory=set)  # the errors logged, at most PUBLISH_ERRORS


class VchanServer:
    def __init__(self, cfg: VchanConfig, service_socket: str, backend: Backend,
                 loop: Loop, header: bytes = b"", peerlog: PeerLog | None = None) -> None:
        self.cfg = cfg
        # What a client's coming and going logs goes through the per-peer rate limit: one
        # attaching and leaving in a loop costs lines up to its budget, not a line each time.
        self.peerlog = peerlog if peerlog is not None else PeerLog(log, loop.time)
        self.service_socket = service_socket
        self.header = header  # the service's caller header, if it asked for one
        self.backend = backend
        self.loop = loop
        self.me = backend.domid
        self.path = cfg.absolute_path(self.me)
        if not self.path.startswith(f"/local/domain/{self.me}/"):
            raise OSError(errno.EINVAL, f"vchan {cfg.name}: {self.path} is not in our own "
                                        f"tree /local/domain/{self.me}/")
        self.xs = backend.open_xenstore()
        self.vchan: _Published | None = None
        self.state = "idle"
        self.streams = 0
        self.last_result: object = None
        self.totals = StreamTotals()
        self._timer: Timer | None = None
        self._tokens = float(REPUBLISH_BURST)
        self._last = loop.time()
        self._closed = False
        self._made: list[str] = []
        self._failing: _Failing | None = None
        self._draining = False

    def __repr__(self) -> str:
        return f"<VchanServer {self.cfg.name} for domain {self.cfg.domain} {self.state}>"

    def _guarded(self, fn: Callable[[], None]) -> Callable[[], None]:
        """A loop callback that cannot take the daemon down: a failure ends this vchan."""
        def run() -> None:
            try:
                fn()
            except Exception as e:
                log.error("vchan %s: internal error: %s: %s (traceback at debug level)",
                          self.cfg.name, type(e).__name__, e)
                log.debug("traceback", exc_info=e)
                self._end(None)
        return run

    # ---- publishing ---------------------------------------------------------------------

    def start(self) -> None:
        self._made = self._missing_ancestors()
        self._publish()

    def _missing_ancestors(self) -> list[str]:
        """Returns the directories above our path that writing it will create, deepest first:
        ours to remove at close (if empty), so that nothing of ours is left behind."""
        missing = []
        parent = self.path.rsplit("/", 1)[0]
        while parent.count("/") > 3:  # never /local/domain/<me> itself
            try:
                self.xs.directory(parent)
                break
            except OSError:
                missing.append(parent)
                parent = parent.rsplit("/", 1)[0]
        return missing

    def _publish(self) -> None:
        self._timer = None
        if self._closed or self._draining:
            return
        try:
            self.vchan = _Published(self.backend, self.cfg.domain, self.cfg.left_order,
                                    self.cfg.right_order)
            self._write_nodes(self.vchan)
        except Exception as e:  # the boundary of this vchan: try again later
            self._release()
            self._later(self._publish_failed(str(e)), self._publish)
            return
        assert self.vchan.evtchn is not None
        self.loop.add_reader(self.vchan.evtchn.fd, self._guarded(self._on_signal))
        self.state = "published"
        failed, self._failing = self._failing, None
        if failed or not self.streams:  # a republication after each stream is routine
            log.info("vchan %s: published for domain %d at %s%s", self.cfg.name,
                     self.cfg.domain, self.path,
                     f" after {failed.tries} failed tries" if failed else "")
        else:
            log.debug("vchan %s: published again at %s", self.cfg.name, self.path)
        self._later(POLL, self._poll)

    def _publish_failed(self, why: str) -> float:
        """Logs a failed publication (each distinct error once, then a rare reminder) and
        returns the seconds until the next try."""
        now = self.loop.time()
        f = self._failing
        if f is None:
            f = self._failing = _Failing(now, now, PUBLISH_RETRY)
        if why not in f.seen and len(f.seen) < PUBLISH_ERRORS:
            f.seen.add(why)
            log.warning("vchan %s: cannot publish for domain %d at %s: %s (retrying, "
                        "from every %g s up to every %g s)", self.cfg.name, self.cfg.domain,
                        self.path, why, PUBLISH_RETRY, PUBLISH_RETRY_MAX)
        elif now - f.reminded >= PUBLISH_REMIND:
            f.reminded = now
            log.warning("vchan %s: still cannot publish for domain %d at %s after %d tries "
                        "in %d s: %s", self.cfg.name, self.cfg.domain, self.path, f.tries + 1,
                        now - f.since, why)
        else:
            log.debug("vchan %s: cannot publish: %s", self.cfg.name, why)
        f.tries += 1
        delay, f.delay = f.delay, min(f.delay * 2, PUBLISH_RETRY_MAX)
        return delay

    def _write_nodes(self, v: _Published) -> None:
        assert v.evtchn is not None
        perms = vchan_perms(self.me, self.cfg.domain)

        def publish(tx: int) -> None:
            self.xs.write(self.path, b"", tx)
            self.xs.set_perms(self.path, perms, tx)
            for name, value in (("ring-ref", v.ring_ref), ("event-channel", v.evtchn.port)):
                self.xs.write(f"{self.path}/{name}", str(value), tx)
                self.xs.set_perms(f"{self.path}/{name}", perms, tx)
        transact(self.xs, publish)

    def _remove_nodes(self) -> None:
        try:
            self.xs.rm(self.path)
        except OSError as e:
            if e.errno != errno.ENOENT:
                log.warning("vchan %s: removing %s: %s", self.cfg.name, self.path, e)

    def _later(self, delay: float, fn: Callable[[], None]) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(delay, self._guarded(fn))

    # ---- a client -----------------------------------------------------------------------

    def _poll(self) -> None:
        self._timer = None
        if self.state == "published":
            self._look()
            if self.state == "published":
                self._later(POLL, self._poll)

    def _on_signal(self) -> None:
        """The event channel is readable: consume its notification, then look at the page.
        Only here: on Xen, clearing a channel with nothing pending blocks until the peer
        signals (libxenevtchn's pending is a read of a blocking handle), so the poll must
        never clear."""
        v = self.vchan
        if v is None or v.evtchn is None or self.state != "published":
            return
        v.evtchn.clear()
        self._look()

    def _look(self) -> None:
        """Reads the client's live byte: attached (serve it), gone, or still to come."""
        v = self.vchan
        if v is None or v.evtchn is None or v.endpoint is None or self.state != "published":
            return
        try:
            live = v.endpoint.peer_live()
        except OSError as e:  # a live byte the protocol lacks: this vchan only
            self._end(f"the client broke the protocol: {e}")
            return
        if live == Live.WAITING:
            return
        if live == Live.GONE:  # attached and left (or its notification ran) before we looked
            self._end("the client left before it was served")
            return
        self.loop.remove_reader(v.evtchn.fd)
        self._remove_nodes()  # no second client may map the page in use
        # The client waits meanwhile: a pump that starts late finds it gone if it left.
        self.state = "connecting"
        now = self.loop.time()
        self._connect(now + CONNECT_PATIENCE, now + SERVICE_START_PATIENCE, CONNECT_RETRY)

    def _connect(self, deadline: float, absent_until: float, delay: float) -> None:
        """Connects the attached client to the local service without blocking the loop;
        retries while the service cannot take us yet, then gives that vchan up."""
        self._timer = None
        v = self.vchan
        if v is None or v.endpoint is None or v.evtchn is None or self.state != "connecting":
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setblocking(False)
            sock.connect(self.service_socket)
            # A line into a fresh socket's empty buffer: all of it goes, or the service is
            # not one we can serve.
            if self.header and sock.send(self.header) != len(self.header):
                raise OSError(errno.EMSGSIZE, "the caller header did not fit")
        except OSError as e:
            sock.close()
            until = deadline if e.errno == errno.EAGAIN else absent_until \
                if e.errno in (errno.ENOENT, errno.ECONNREFUSED) else 0.0
            if self.loop.time() < until:
                self._later(delay, lambda: self._connect(deadline, absent_until,
                                                         min(delay * 2, CONNECT_RETRY_MAX)))
                return
            self._end(f"the service {self.cfg.service!r} at {self.service_socket}: "
                      f"{e.strerror or e}")
            return
        try:
            v.pump = VchanPump(v.endpoint, sock, v.evtchn, self.cfg.linger)
        except OSError as e:
            self._end(f"starting the stream: {e}")
            return
        self.state = "serving"
        self.streams += 1
        self.peerlog.info(self.cfg.domain, "vchan %s: domain %d connected, spliced into "
                          "service %s", self.cfg.name, self.cfg.domain, self.cfg.service)
        self.loop.add_reader(v.pump.fileno(), self._guarded(self._on_pump_end))

    def _on_pump_end(self) -> None:
        v = self.vchan
        if v is None or v.pump is None:
            return
        result = v.pump.result()
        if result is None:
            return
        self.loop.remove_reader(v.pump.fileno())
        self.last_result = result
        self.peerlog.info(self.cfg.domain, "vchan %s: stream with domain %d ended (%s, %d "
                          "bytes in, %d out)", self.cfg.name, self.cfg.domain,
                          result.end.name.lower(), result.bytes_in, result.bytes_out)
        self._end(None)

    def _end(self, why: str | None) -> None:
        """Releases this vchan and publishes a fresh one, within the republishing budget."""
        if why is not None:
            self.peerlog.warning(self.cfg.domain, "vchan %s: domain %d: %s", self.cfg.name,
                                 self.cfg.domain, why)
        self._release()
        self.state = "idle"
        now = self.loop.time()
        self._tokens = min(REPUBLISH_BURST, self._tokens + (now - self._last) / REPUBLISH_INTERVAL)
        self._last = now
        if self._tokens >= 1:
            self._tokens -= 1
            self._later(0, self._publish)
        else:
            self._later(REPUBLISH_INTERVAL, self._publish)

    def drain(self) -> None:
        """The daemon is stopping: a vchan no client took is withdrawn, none is published
        again; a client being served keeps its stream until ``close``."""
        self._draining = True
        if self.state in ("idle", "published"):
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._release()
            self.state = "idle"

    def peer_destroyed(self) -> None:
        """The peer's domain is gone (``@releaseDomain``): it ran no unmap notification.
        A vchan still waiting stays published: only that domain id may ever map it."""
        if self.state in ("connecting", "serving"):
            self._end(f"domain {self.cfg.domain} was destroyed")

    def _release(self) -> None:
        """Endpoint, pages, port, then the nodes: the client sees us gone before the path."""
        v = self.vchan
        if v is not None:
            # Our fds are still open here: no one else can have registered these numbers.
            if v.pump is not None:
                self.loop.remove_reader(v.pump.fileno())
            if v.evtchn is not None:
                self.loop.remove_reader(v.evtchn.fd)
            self.totals.ended(v)
            v.close()
            self.vchan = None
        self._remove_nodes()

    def close(self) -> None:
        """Ends any stream, releases everything and removes our nodes.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._release()
        for parent in self._made:
            try:
                if self.xs.directory(parent):
                    break  # someone else's nodes: keep it and what is above
                self.xs.rm(parent)
            except OSError as e:
                log.debug("vchan %s: removing %s: %s", self.cfg.name, parent, e)
                break
        self.xs.close()
        self.state = "closed"

    def describe(self) -> dict[str, object]:
        bytes_in, bytes_out = self.totals.now(self.vchan)
        return {"kind": "vchan-server", "name": self.cfg.name, "path": self.path,
                "peer": self.cfg.domain, "state": self.state, "streams": self.streams,
                "bytes_in": bytes_in, "bytes_out": bytes_out}
