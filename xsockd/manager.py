"""The control plane: links to peers, listening sockets, stream admission, bookkeeping.

It knows nothing of D-Bus, systemd or which backend runs; the daemon wires those around it.
Everything here runs on the one loop; bytes never pass through it.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import logging
import os
import socket
import stat
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from xsockd.backend import Backend, XenStorePerm
from xsockd.config import Config, ServiceConfig
from xsockd.constants import XS_ROOT
from xsockd.errors import (
    BackendError,
    ConfigError,
    NoSuchChannel,
    ProtocolError,
    RefusedError,
    XenStoreError,
    XsockError,
)
from xsockd.link import (
    Link,
    accept_link,
    domain_path,
    offer_link,
    offer_path,
    read_offer,
    request_dir,
    request_path,
)
from xsockd.loop import Loop, Timer
from xsockd.ring import EventType, Reason, RingEvent, Role, link_pages

__all__ = ["Channel", "ChannelObserver", "Manager", "caller_header"]

log = logging.getLogger(__name__)

LINK_SETUP_TIMEOUT = 10.0  # seconds for a peer to attach to our offer
SOCKET_MODE = 0o660
CONNECT_PATIENCE = 5.0  # seconds to wait for a service whose listen backlog is full
# Seconds to wait for a service whose socket is missing or has no listener (ENOENT,
# ECONNREFUSED): one being restarted, or started after us; a socket unit never needs it.
SERVICE_START_PATIENCE = 2.0
DIR_MODE = 0o755
DRAIN_POLL = 0.05  # seconds between looks at the bytes a stopping daemon still holds


def caller_header(domid: int, service: str) -> bytes:
    """Returns the line a service with ``caller_header`` receives before the caller's bytes."""
    return f"XSOCK/1 domid={domid} service={service or '-'}\n".encode()


@dataclass
class Channel:
    """One stream, as the control plane sees it."""

    id: int
    peer: int
    stream: int
    service: str
    direction: str            # "out": opened by a local application; "in": by the peer
    link: Link
    created: float = field(default_factory=time.time)
    state: str = "opening"


class ChannelObserver:
    """What a face (D-Bus) hears of the channel table; ``Manager.add_observer`` adds one.

    Both run on the loop, after the table changed; they must not block.
    """

    def channel_opened(self, channel: Channel) -> None:
        """A channel entered the table (an "out" one still "opening" until the peer accepts)."""

    def channel_closed(self, channel: Channel, reason: str) -> None:
        """A channel left the table; ``reason`` is a short word ("done", "link-down"...)."""


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def _runs_xsockd(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"xsockd" in f.read()
    except OSError:
        return False


class Manager:
    """Owns every link, listener and channel of one daemon.

    Lifecycle: created -> started (``start``) -> stopped (``stop``).
    """

    def __init__(self, config: Config, backend: Backend, loop: Loop) -> None:
        self.config = config
        self.backend = backend
        self.loop = loop
        self.domid = backend.domid
        self.xs = backend.open_xenstore()
        self.links: dict[tuple[int, Role], Link] = {}
        self.channels: dict[int, Channel] = {}
        self._by_stream: dict[tuple[int, int], Channel] = {}
        # (peer, service) -> listener of <rundir>/<peer>.sock ("") or <rundir>/<peer>/<service>.sock
        self._listeners: dict[tuple[int, str], socket.socket] = {}
        self._draining = False
        self._drain_timer: Timer | None = None
        self._timers: dict[int, Timer] = {}
        self._answered: dict[int, int] = {}
        self._ids = itertools.count(1)
        self.counters = {"links_refused": 0, "streams_refused": 0, "peer_faults": 0,
                         "links_opened": 0, "streams_opened": 0}
        self._started = False
        self.started_at = time.time()
        self._observers: list[ChannelObserver] = []

    # ---- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Publishes our request directory, watches it and opens the peers' sockets."""
        home = domain_path(self.domid)
        root = f"{home}/{XS_ROOT}"
        self._check_peers(self.config)
        self._claim_domain(f"{root}/daemon")
        try:
            names = self.xs.directory(root)
        except XenStoreError as e:
            if e.errno != errno.ENOENT:
                raise
            names = []
        # Our offers of an earlier run go.  Requests stay: a peer may have asked while we
        # were restarting, and the watch's first event makes us look at them.  "daemon" is
        # the record _claim_domain just wrote.
        for name in names:
            if name not in ("request", "daemon"):
                self.xs.rm(f"{root}/{name}")
        self._publish_request_dir()
        self.xs.set_perms(root, [XenStorePerm(self.domid, "n")])
        self.xs.watch(request_dir(self.domid), "requests")
        # A destroyed domain runs no unmap notification: @releaseDomain is how we learn of it.
        self.xs.watch("@releaseDomain", "released")
        self.loop.add_reader(self.xs.fileno(), self._on_xenstore)
        os.makedirs(self.config.daemon.rundir, mode=0o755, exist_ok=True)
        for peer, service in self.config.local_sockets():
            self._listen(peer, service)
        self._started = True
        log.info("xsockd domain %d ready: %d peers, rundir %s", self.domid,
                 len(self.config.daemon.peers), self.config.daemon.rundir)

    def stop(self) -> None:
        """Closes listeners and links (telling peers goodbye) and removes our nodes."""
        for key in list(self._listeners):
            self._unlisten(*key)
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        for link in list(self.links.values()):
            self._drop_link(link, goodbye=True)
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        if self._started:
            self.loop.remove_reader(self.xs.fileno())
            try:
                self.xs.rm(f"{domain_path(self.domid)}/{XS_ROOT}")
            except XenStoreError as e:
                log.debug("removing our XenStore nodes: %s", e)
        self.xs.close()
        self._started = False

    def drain(self, timeout: float, done: Callable[[], object]) -> None:
        """Begins a graceful stop: no new streams, then ``done()`` once in-flight bytes drained.

        Takes the connections already queued on our sockets, closes every listener, and from
        now on refuses the streams and links peers open.  ``done`` runs on the loop as soon as
        no link holds a byte on its way (``held``) or after ``timeout`` seconds; ``stop`` then
        closes what is left.  Called again while draining, it calls ``done`` at once.
        """
        if self._draining:
            done()
            return
        self._draining = True
        for peer, service in list(self._listeners):
            self._on_connect(peer, service)  # clients whose connect() already succeeded
            self._unlisten(peer, service)
        deadline = time.monotonic() + timeout
        log.info("stopping: no new streams; %d channels may drain for up to %g s",
                 len(self.channels), timeout)

        def check() -> None:
            self._drain_timer = None
            held = self.held()
            pending = sum(v for k, v in held.items() if k != "streams")
            if pending and time.monotonic() < deadline:
                self._drain_timer = self.loop.call_later(DRAIN_POLL, check)
                return
            if pending:
                log.warning("stop_timeout of %g s reached: closing %d streams with %d bytes "
                            "still on their way (%s)", timeout, held["streams"], pending,
                            ", ".join(f"{k} {v}" for k, v in held.items() if v and
                                      k != "streams"))
            else:
                log.info("drained: closing %d idle streams", held["streams"])
            done()

        check()

    def held(self) -> Counter[str]:
        """Returns the bytes all links still hold on their way, by kind (see RingLink.held)."""
        total: Counter[str] = Counter()
        for link in self.links.values():
            if not link.closed:
                total.update(link.ring.held())
        return total

    def reload(self, config: Config) -> list[str]:
        """Switches to ``config``: new peers and named services get sockets, removed ones' go.

        Open links and channels survive; a removed peer may open no new streams or links.
        Returns what changed, one phrase each.  rundir changes need a restart.
        """
        self._check_peers(config)
        changes = []
        if config.daemon.rundir != self.config.daemon.rundir:
            config = dataclasses.replace(
                config, daemon=dataclasses.replace(config.daemon, rundir=self.config.daemon.rundir))
            changes.append("rundir kept (a new one takes effect at restart)")
        old, new = set(self.config.local_sockets()), set(config.local_sockets())
        self.config = config
        if self._draining:
            return changes  # stopping: no listener comes back
        for peer, service in sorted(old - new):
            self._unlisten(peer, service)
            changes.append(f"service {service} of domain {peer} removed" if service
                           else f"peer {peer} removed")
        for peer, service in sorted(new - old):
            self._listen(peer, service)
            changes.append(f"service {service} of domain {peer} added" if service
                           else f"peer {peer} added")
        return changes

    # ---- local sockets ------------------------------------------------------------------

    def socket_path(self, peer: int, service: str = "") -> str:
        """Returns <rundir>/<peer>.sock (the default service) or <rundir>/<peer>/<service>.sock."""
        if service:
            return os.path.join(self.config.daemon.rundir, str(peer), f"{service}.sock")
        return os.path.join(self.config.daemon.rundir, f"{peer}.sock")

    def _listen(self, peer: int, service: str = "") -> None:
        path = self.socket_path(peer, service)
        if service:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.chmod(os.path.dirname(path), DIR_MODE)  # whatever the umask
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)  # left by an earlier run
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.bind(path)
        os.chmod(path, SOCKET_MODE)
        sock.listen(socket.SOMAXCONN)
        self._listeners[(peer, service)] = sock
        self.loop.add_reader(sock.fileno(), lambda: self._on_connect(peer, service))

    def _unlisten(self, peer: int, service: str = "") -> None:
        sock = self._listeners.pop((peer, service))
        self.loop.remove_reader(sock.fileno())
        sock.close()
        path = self.socket_path(peer, service)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        if service:
            try:
                os.rmdir(os.path.dirname(path))  # once its last service is gone
            except OSError:
                pass

    def _on_connect(self, peer: int, service: str = "") -> None:
        listener = self._listeners.get((peer, service))
        while listener is not None:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                return
            try:
                link = self._link_for(peer)
                sid = link.ring.open_stream(conn, service)
            except (XsockError, OSError) as e:
                log.error("connection to domain %d failed: %s", peer, e,
                          extra={"XSOCK_PEER": peer})
                conn.close()
                continue
            self._add_channel(link, sid, service, "out")

    # ---- links --------------------------------------------------------------------------

    def granted_pages(self) -> int:
        return sum(link.pages for link in self.links.values())

    def _link_for(self, peer: int) -> Link:
        """Returns a link to ``peer`` for a new stream, offering one if there is none."""
        links = [lk for (p, _), lk in self.links.items() if p == peer]
        if links:
            return min(links, key=lambda lk: not lk.up)  # an up link if there is one
        if not self._domain_exists(peer):
            raise RefusedError(f"domain {peer} does not exist (xenstored does not know it)")
        cfg = self.config.link
        need = link_pages(cfg.ring_size)
        if self.granted_pages() + need > cfg.grant_pages:
            raise RefusedError(
                f"grant budget exhausted: {self.granted_pages()} of {cfg.grant_pages} pages in "
                f"use, a link needs {need}; raise [link] grant_pages or lower ring_size")
        try:
            link = offer_link(self.backend, self.xs, peer, ring_size=cfg.ring_size,
                              window=cfg.stream_window, max_streams=cfg.max_streams)
        except XenStoreError as e:
            if e.errno in (errno.EACCES, errno.ENOENT):  # ENOENT: no request directory
                raise RefusedError(
                    f"domain {peer} does not take link requests from us ({e}); is xsockd "
                    f"running there?") from e
            raise
        self._add_link(link)
        self.counters["links_opened"] += 1
        log.info("offered link to domain %d (%d pages, event channel %d)", peer, link.pages,
                 link.port, extra={"XSOCK_PEER": peer})
        token = f"answer:{peer}:{link.generation}"
        self.xs.watch(request_path(peer, self.domid), token)
        self._timers[id(link)] = self.loop.call_later(
            LINK_SETUP_TIMEOUT, lambda: self._setup_timeout(link))
        return link

    def _add_link(self, link: Link) -> None:
        self.links[(link.peer, link.role)] = link
        self.loop.add_reader(link.ring.fileno(), lambda: self._on_link_events(link))

    def _setup_timeout(self, link: Link) -> None:
        self._timers.pop(id(link), None)
        if not link.up and not link.closed:
            log.error("domain %d did not attach to our link within %.0f s; is xsockd running "
                      "there?", link.peer, LINK_SETUP_TIMEOUT, extra={"XSOCK_PEER": link.peer})
            self._drop_link(link)

    def _stop_waiting(self, link: Link) -> None:
        timer = self._timers.pop(id(link), None)
        if timer is not None:
            timer.cancel()
        if link.role == Role.INITIATOR:
            try:
                self.xs.unwatch(request_path(link.peer, self.domid),
                                f"answer:{link.peer}:{link.generation}")
            except XenStoreError as e:
                log.debug("unwatch: %s", e)

    def _drop_link(self, link: Link, goodbye: bool = False) -> None:
        if self.links.get((link.peer, link.role)) is link:
            del self.links[(link.peer, link.role)]
        if link.closed:
            return
        self._stop_waiting(link)
        self.loop.remove_reader(link.ring.fileno())
        link.close(goodbye)
        for ch in [c for c in self.channels.values() if c.link is link]:
            self._remove_channel(ch, "link-down")

    # ---- XenStore -----------------------------------------------------------------------

    def _on_xenstore(self) -> None:
        for ev in self.xs.read_events():
            if ev.token == "requests":
                self._scan_requests()
            elif ev.token == "released":
                self._drop_destroyed_peers()
            elif ev.token.startswith("answer:"):
                _, peer, gen = ev.token.split(":")
                self._check_answer(int(peer), int(gen))

    def _domain_exists(self, domid: int) -> bool:
        """Asks xenstored; True where we may not ask (a domU), and the link set-up will tell."""
        try:
            return self.xs.domain_exists(domid)
        except XenStoreError as e:
            log.debug("cannot ask whether domain %d exists: %s", domid, e)
            return True

    def _drop_destroyed_peers(self) -> None:
        """Drops the links of peers that xenstored no longer knows (xl destroy, a crash)."""
        # A domU may not ask (and gets no @releaseDomain events): its peer is dom0 or a
        # driver domain, whose death reaches it through the unmap notification.
        gone = {peer for peer, _ in self.links if not self._domain_exists(peer)}
        for link in [lk for (peer, _), lk in self.links.items() if peer in gone]:
            log.warning("link with domain %d down: the domain was destroyed", link.peer,
                        extra={"XSOCK_PEER": link.peer})
            self._drop_link(link)

    def _check_answer(self, peer: int, generation: int) -> None:
        link = self.links.get((peer, Role.INITIATOR))
        if link is None or link.generation != generation or link.up:
            return
        try:
            answer = self.xs.read(request_path(peer, self.domid)).decode("ascii", "replace")
        except XenStoreError:
            return
        if answer.startswith("refused"):
            self.counters["links_refused"] += 1
            log.error("domain %d refused our link: %s", peer, answer[8:80] or "no reason",
                      extra={"XSOCK_PEER": peer})
            self._drop_link(link)

    def _check_peers(self, config: Config) -> None:
        """Refuses a configuration naming our own domain; warns of peers that do not exist."""
        if self.domid in config.daemon.peers:
            raise ConfigError(f"lists domain {self.domid}, which is this domain itself",
                              table="daemon", key="peers")
        for peer in config.daemon.peers:
            if not self._domain_exists(peer):
                log.warning("domain %d (in [daemon] peers) does not exist now: streams to it "
                            "are refused until it does", peer, extra={"XSOCK_PEER": peer})

    def _claim_domain(self, node: str) -> None:
        """Refuses to start beside a running xsockd of the same domain, then records us.

        A second daemon would take over the request directory and the sockets of the first
        and leave both broken.  The record (pid and boot id) survives a kill -9: it counts only
        while that process still runs an xsockd.
        """
        try:
            words = self.xs.read(node).decode("ascii", "replace").split()
        except XenStoreError as e:
            if e.errno != errno.ENOENT:
                raise
            words = []
        boot = _boot_id()
        if len(words) == 2 and words[0].isdigit() and words[1] == boot \
                and int(words[0]) != os.getpid() and _runs_xsockd(int(words[0])):
            raise XsockError(f"another xsockd already serves domain {self.domid} (pid "
                             f"{words[0]}); stop it first (systemctl stop xsockd)")
        self.xs.write(node, f"{os.getpid()} {boot}")

    def _publish_request_dir(self) -> None:
        self.xs.write(request_dir(self.domid), b"")
        # Any domain may create request/<its domid>; we decide, and say why, when it does.
        self.xs.set_perms(request_dir(self.domid), [XenStorePerm(self.domid, "w")])

    def _scan_requests(self) -> None:
        try:
            names = self.xs.directory(request_dir(self.domid))
        except XenStoreError as e:
            if e.errno != errno.ENOENT:
                log.error("cannot list %s: %s", request_dir(self.domid), e)
                return
            # The write permission that lets any domain ask also lets it remove the directory
            # (xenstored cannot tell the two apart); nobody else may recreate it under our
            # tree, so we do, and links can be asked for again at once.
            self.counters["peer_faults"] += 1
            log.warning("%s was removed by another domain: recreated", request_dir(self.domid))
            try:
                self._publish_request_dir()
            except XenStoreError as e2:
                log.error("cannot recreate %s: %s", request_dir(self.domid), e2)
            return
        for name in names[:1024]:
            path = f"{request_dir(self.domid)}/{name}"
            if not name.isdigit() or len(name) > 5:
                log.warning("removing malformed link request %r", name[:40])
                self._quiet_rm(path)
                continue
            self._on_request(int(name), path)

    def _quiet_rm(self, path: str) -> None:
        try:
            self.xs.rm(path)
        except XenStoreError as e:
            log.debug("rm %s: %s", path, e)

    def _answer(self, path: str, text: str) -> None:
        try:
            self.xs.write(path, text)
        except XenStoreError as e:
            log.debug("answer %s: %s", path, e)

    def _on_request(self, peer: int, path: str) -> None:
        try:
            value = self.xs.read(path)
            owner = self.xs.get_perms(path)[0].domid
        except XenStoreError as e:
            if e.errno != errno.ENOENT:
                # A real requester lets us read its request in the transaction that creates
                # it; this one was made by someone else (another domain forging it, or junk).
                log.warning("removing unreadable link request %s (%s): not made by an xsockd "
                            "of domain %d", path, os.strerror(e.errno or errno.EIO), peer)
                self._quiet_rm(path)
            return
        words = value.decode("ascii", "replace").split()
        if len(words) != 2 or words[0] != "offer" or not words[1].isdigit():
            return  # our own answer, or garbage the requester wrote into its own node
        generation = int(words[1])
        if self._answered.get(peer) == generation:
            return
        self._answered[peer] = generation
        if owner != peer:
            log.warning("link request %s was created by domain %d, not %d: ignored", path,
                        owner, peer)
            self._quiet_rm(path)
            return
        if self._draining:
            self.counters["links_refused"] += 1
            log.warning("refused link from domain %d: we are stopping", peer,
                        extra={"XSOCK_PEER": peer})
            self._answer(path, "refused stopping")
            return
        if peer not in self.config.daemon.peers or peer == self.domid:
            self.counters["links_refused"] += 1
            log.warning("refused link from domain %d: not in [daemon] peers", peer,
                        extra={"XSOCK_PEER": peer})
            self._answer(path, "refused not-allowed")
            return
        old = self.links.get((peer, Role.ACCEPTOR))
        if old is not None:
            log.info("domain %d offers a new link: dropping the old one", peer)
            self._drop_link(old)
        try:
            offer = read_offer(self.xs, peer, self.domid)
            if offer.generation != generation:
                raise ProtocolError(f"offer generation {offer.generation} does not match "
                                    f"request {generation}")
            link = accept_link(self.backend, self.xs, peer, offer,
                               window=self.config.link.stream_window,
                               max_streams=self.config.link.max_streams)
        except (ProtocolError, BackendError, OSError) as e:
            self.counters["peer_faults"] += 1
            log.warning("cannot attach link offered by domain %d at %s: %s", peer,
                        offer_path(peer, self.domid), e, extra={"XSOCK_PEER": peer})
            self._answer(path, "refused malformed-offer" if isinstance(e, ProtocolError)
                         else f"refused attach-failed-{e.errno}")
            return
        self._add_link(link)
        self._answer(path, f"accepted {generation}")
        log.info("attached link from domain %d (ring %d bytes, event channel %d)", peer,
                 offer.ring_size, link.port, extra={"XSOCK_PEER": peer})

    # ---- link events --------------------------------------------------------------------

    def _on_link_events(self, link: Link) -> None:
        for ev in link.ring.events():
            if link.closed:
                return
            self._on_link_event(link, ev)

    def _on_link_event(self, link: Link, ev: RingEvent) -> None:
        peer = link.peer
        if ev.type == EventType.PEER_UP:
            link.up = True
            self._stop_waiting(link)
            log.info("link with domain %d up", peer, extra={"XSOCK_PEER": peer})
        elif ev.type == EventType.OPEN_REQUEST:
            self._admit(link, ev.stream, ev.name)
        elif ev.type == EventType.OPENED:
            ch = self._by_stream.get((id(link), ev.stream))
            if ch:
                ch.state = "open"
        elif ev.type == EventType.CLOSED:
            ch = self._by_stream.get((id(link), ev.stream))
            reason = Reason(ev.arg) if ev.arg in Reason._value2member_map_ else ev.arg
            if ch is not None:
                why = (reason.name.lower().replace("_", "-") if isinstance(reason, Reason)
                       else f"reason-{reason}")
                if reason in (Reason.REFUSED, Reason.NO_SERVICE, Reason.TOO_MANY) \
                        and ch.direction == "out":
                    log.warning("domain %d refused stream %d to service %r: %s", peer, ch.id,
                                ch.service or "(default)", why.replace("-", " "),
                                extra={"XSOCK_PEER": peer, "XSOCK_CHANNEL": ch.id,
                                       "XSOCK_SERVICE": ch.service})
                # One record per stream, as a server logs a connection: what an operator
                # searches the journal for (XSOCK_CHANNEL, XSOCK_PEER, XSOCK_SERVICE, bytes).
                log.info("channel %d (%s, domain %d, service %s) closed (%s): %d bytes in, "
                         "%d out", ch.id, ch.direction, peer, ch.service or "(default)", why,
                         ev.bytes_in, ev.bytes_out,
                         extra={"XSOCK_PEER": peer, "XSOCK_CHANNEL": ch.id,
                                "XSOCK_SERVICE": ch.service or "(default)",
                                "XSOCK_BYTES_IN": ev.bytes_in, "XSOCK_BYTES_OUT": ev.bytes_out,
                                "XSOCK_BYTES": ev.bytes_in + ev.bytes_out})
                self._remove_channel(ch, why)
        elif ev.type == EventType.LINK_DOWN:
            why = {-errno.EPROTO: "the peer broke the ring protocol",
                   -errno.ECONNRESET: "the peer went away",
                   -errno.ESHUTDOWN: "the peer closed the link",
                   -errno.ENOBUFS: "events were not collected"}.get(ev.arg, os.strerror(-ev.arg))
            if ev.arg == -errno.EPROTO:
                self.counters["peer_faults"] += 1
            log.warning("link with domain %d down: %s", peer, why, extra={"XSOCK_PEER": peer})
            self._drop_link(link)

    def _admit(self, link: Link, stream: int, name: str) -> None:
        """Connects the peer's new stream to the service it asked for, or refuses it."""
        peer = link.peer
        service = self.config.service_for(peer, name or None)
        if service is None or self._draining:
            self.counters["streams_refused"] += 1
            log.warning("domain %d asked for service %r: %s", peer, name or "(default)",
                        "we are stopping" if service else "not offered to it",
                        extra={"XSOCK_PEER": peer, "XSOCK_SERVICE": name})
            link.ring.reject_stream(stream, Reason.REFUSED)
            return
        now = time.monotonic()
        self._connect_service(link, stream, name, service, now + CONNECT_PATIENCE,
                              now + SERVICE_START_PATIENCE)

    def _connect_service(self, link: Link, stream: int, name: str, service: ServiceConfig,
                         deadline: float, absent_until: float, delay: float = 0.005) -> None:
        """Connects to the service, retrying with backoff while it cannot take us yet.

        A full backlog (EAGAIN: a burst, or a service slow to accept) is retried until
        ``deadline``; a missing socket (ENOENT) or one nobody listens on (ECONNREFUSED: a
        service being restarted or not started yet) until ``absent_until``, a shorter time.
        A socket unit's listener exists before its service runs, so it needs neither.
        """
        if link.closed:
            return
        peer = link.peer
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(service.socket)
            if service.caller_header:
                sock.send(caller_header(peer, name))
        except OSError as e:
            sock.close()
            if e.errno == errno.EAGAIN:
                until, why = deadline, "its backlog stayed full"
            elif e.errno in (errno.ENOENT, errno.ECONNREFUSED):
                until, why = absent_until, e.strerror or str(e)
            else:
                until, why = 0.0, e.strerror or str(e)
            if self._draining:
                why = f"{why}, and we are stopping"
            elif time.monotonic() < until:
                self.loop.call_later(delay, lambda: self._connect_service(
                    link, stream, name, service, deadline, absent_until, min(delay * 2, 0.2)))
                return
            self._refuse_unreachable(link, stream, name, service, why)
            return
        link.ring.accept_stream(stream, sock)
        ch = self._add_channel(link, stream, name, "in")
        ch.state = "open"

    def _refuse_unreachable(self, link: Link, stream: int, name: str, service: ServiceConfig,
                            why: str) -> None:
        self.counters["streams_refused"] += 1
        log.warning("service %r at %s unreachable for domain %d: %s", name or "(default)",
                    service.socket, link.peer, why,
                    extra={"XSOCK_PEER": link.peer, "XSOCK_SERVICE": name})
        link.ring.reject_stream(stream, Reason.NO_SERVICE)

    def _add_channel(self, link: Link, stream: int, service: str, direction: str) -> Channel:
        ch = Channel(next(self._ids), link.peer, stream, service, direction, link)
        self.channels[ch.id] = ch
        self._by_stream[(id(link), stream)] = ch
        self.counters["streams_opened"] += 1
        for obs in self._observers:
            obs.channel_opened(ch)
        return ch

    def _remove_channel(self, ch: Channel, reason: str = "closed") -> None:
        if self.channels.pop(ch.id, None) is None:
            return
        self._by_stream.pop((id(ch.link), ch.stream), None)
        for obs in self._observers:
            obs.channel_closed(ch, reason)

    # ---- queries and actions for the faces ----------------------------------------------

    def add_observer(self, observer: ChannelObserver) -> None:
        """Tells ``observer`` of every channel opened or closed from now on."""
        self._observers.append(observer)

    def close_channel(self, channel_id: int) -> None:
        """Aborts channel ``channel_id``: both applications see the stream end.

        It leaves the table when the pump reports it closed.  Raises NoSuchChannel.
        """
        ch = self.channels.get(channel_id)
        if ch is None:
            raise NoSuchChannel(channel_id)
        ch.link.ring.close_stream(ch.stream)
        ch.state = "closing"

    def list_channels(self) -> list[dict[str, object]]:
        """Returns every channel as ``channel_info`` describes it, by id."""
        byte_counts: dict[tuple[int, int], tuple[int, int]] = {}
        for link in {id(ch.link): ch.link for ch in self.channels.values()}.values():
            if not link.closed:
                for s in link.ring.streams():
                    byte_counts[(id(link), s.id)] = (s.bytes_in, s.bytes_out)
        return [self._describe(ch, byte_counts.get((id(ch.link), ch.stream), (0, 0)))
                for ch in sorted(self.channels.values(), key=lambda c: c.id)]

    def channel_info(self, channel_id: int) -> dict[str, object]:
        """Returns one channel: id, peer, service, direction, state, ring sizes, bytes each
        way, created (unix time), the link's grant refs, event channel and role.

        Raises NoSuchChannel.
        """
        ch = self.channels.get(channel_id)
        if ch is None:
            raise NoSuchChannel(channel_id)
        counts = (0, 0)
        if not ch.link.closed:
            counts = next(((s.bytes_in, s.bytes_out) for s in ch.link.ring.streams()
                           if s.id == ch.stream), counts)
        return self._describe(ch, counts)

    @staticmethod
    def _describe(ch: Channel, counts: tuple[int, int]) -> dict[str, object]:
        link = ch.link
        return {"id": ch.id, "peer": ch.peer, "service": ch.service, "direction": ch.direction,
                "state": ch.state, "stream": ch.stream, "ring_size_rx": link.ring.ring_size,
                "ring_size_tx": link.ring.ring_size, "bytes_in": counts[0],
                "bytes_out": counts[1], "created": ch.created,
                "grant_refs": list(link.grant_refs), "event_channel": link.port,
                "link_role": link.role.name.lower()}

    def statistics(self) -> dict[str, object]:
        """Returns the daemon's counters: channels, links, grants, bytes and refusals."""
        totals = dict.fromkeys(("bytes_in", "bytes_out", "frames_in", "frames_out",
                                "notify_sent", "wakeups"), 0)
        for link in self.links.values():
            if not link.closed:
                st = link.ring.stats()
                for k in totals:
                    totals[k] += st[k]
        return {"domid": self.domid, "channels": len(self.channels),
                "links": len(self.links),
                "links_up": sum(1 for lk in self.links.values() if lk.up),
                "peers": len(self.config.daemon.peers), "granted_pages": self.granted_pages(),
                "grant_limit": self.config.link.grant_pages, "started": self.started_at,
                "uptime": time.time() - self.started_at, **totals, **self.counters}

    def status(self) -> str:
        up = sum(1 for lk in self.links.values() if lk.up)
        return (f"{len(self.channels)} channels, {up} of {len(self.links)} links up, "
                f"{len(self.config.daemon.peers)} peers configured")
