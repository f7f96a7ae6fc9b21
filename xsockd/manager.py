"""The control plane: tables of links and channels, dispatch of their events, drain and reload.

It knows nothing of D-Bus, systemd or which backend runs; the daemon wires those around it.
Decisions live in ``admission``, the XenStore side of the link protocol in ``rendezvous``,
pages and ports in ``link``, sockets in ``listeners``.  Everything here runs on the one loop;
bytes never pass through it.

The rule that keeps one peer from taking the daemon down: everything a peer can cause (its
link's events, its link request, its answer to ours, a timer of its link) runs inside
``_guard``, which turns any failure, expected or a bug, into "this link is down", logged once,
and never lets it out to the loop.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from xsockd.admission import (
    OpenBudget,
    RateBucket,
    Refusal,
    admit_link,
    admit_stream,
    caller_header,
    grant_budget,
    grant_plan,
    reachable_services,
)
from xsockd.advice import link_refused, no_such_domain, stream_refused
from xsockd.backend import Backend
from xsockd.confdiff import describe_changes
from xsockd.config import Config, ServiceConfig, check_own_domain
from xsockd.constants import PROTOCOL_VERSION, XS_ROOT
from xsockd.errors import (
    BackendError,
    NoSuchChannel,
    ProtocolError,
    RefusedError,
    XenStoreError,
    XsockError,
)
from xsockd.link import Link, grant_link, map_link
from xsockd.listeners import Rundir, socket_path
from xsockd.peerlog import PeerLog, escape
from xsockd.rendezvous import (
    Offering,
    PeerNode,
    RequestBoard,
    VersionMismatch,
    claim_domain,
    domain_path,
    offer_path,
    read_offer,
    request_dir,
)
from xsockd.ring import (
    LISTEN_RETRY,
    AdmitEntry,
    EventType,
    OpenGate,
    Reason,
    RingEvent,
    Role,
    StreamInfo,
    StreamState,
)
from xsockd.vchans import Vchans
from xsockd.words import count

if TYPE_CHECKING:
    from xsockd.loop import Loop, Timer

__all__ = ["Channel", "ChannelObserver", "Manager"]

log = logging.getLogger(__name__)

LINK_SETUP_TIMEOUT = 10.0  # seconds for a peer to attach to our offer
CONNECT_PATIENCE = 5.0  # seconds to wait for a service whose listen backlog is full
# Seconds to wait for a service whose socket is missing or has no listener (ENOENT,
# ECONNREFUSED): one being restarted, or started after us; a socket unit never needs it.
SERVICE_START_PATIENCE = 2.0
# Seconds between tries to set up an eager link (doubling, reset once a link is up): a peer
# restarting is back within a few seconds, one that is gone costs a try every EAGER_RETRY_MAX.
EAGER_RETRY_MIN, EAGER_RETRY_MAX = 0.2, 10.0
DRAIN_POLL = 0.05  # seconds between looks at the bytes a stopping daemon still holds
# Seconds before accepting again after running out of descriptors (a pump waits as long).
ACCEPT_BACKOFF = LISTEN_RETRY
# Link offers a peer may make: each costs a XenStore transaction, mappings and a pump thread.
OFFER_RATE, OFFER_BURST = 1.0, 5
LINK_DOWN_WHY = {-errno.EPROTO: "the peer broke the ring protocol",
                 -errno.ECONNRESET: "the peer went away",
                 -errno.ESHUTDOWN: "the peer closed the link",
                 -errno.ENOBUFS: "events were not collected"}


@dataclass
class Channel:
    """One stream, as the control plane sees it."""

    id: int
    peer: int
    stream: int
    serial: int               # the C core's incarnation of ``stream``: ids are reused
    service: str
    direction: str            # "out": opened by a local application; "in": by the peer
    link: Link
    created: float = field(default_factory=time.time)
    state: str = "opening"


@dataclass
class _Admission:
    """A peer's stream we are connecting to a local service (it may take retries)."""

    link: Link
    stream: int
    serial: int
    name: str
    service: ServiceConfig
    deadline: float
    absent_until: float
    done: bool = False


class ChannelObserver:
    """What a face (D-Bus) hears of the channel table; ``Manager.add_observer`` adds one.

    Both run on the loop, after the table changed; they must not block.
    """

    def channel_opened(self, channel: Channel) -> None:
        """A channel entered the table (an "out" one still "opening" until the peer accepts)."""

    def channel_closed(self, channel: Channel, reason: str) -> None:
        """A channel left the table; ``reason`` is a short word ("done", "link-down"...)."""


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
        self.board = RequestBoard(self.xs, self.domid)
        self.links: dict[tuple[int, Role], Link] = {}
        self.channels: dict[int, Channel] = {}
        self._by_serial: dict[tuple[int, int], Channel] = {}   # (id(link), serial)
        self._admitting: dict[tuple[int, int], _Admission] = {}
        self._budgets: dict[int, OpenBudget] = {}               # peer
        self._gates: dict[int, OpenGate] = {}                    # peer: the pumps' budget
        self._waiting: dict[int, Timer] = {}                     # id(link): set-up timer
        self._peer_nodes: dict[int, PeerNode] = {}               # id(link): the peer's node
        self._listeners: dict[tuple[int, str], socket.socket] = {}
        # Listeners an up link's pump accepts on (_hand_listeners): the loop does not read them.
        self._handed: dict[tuple[int, str], Link] = {}
        self._rundir: Rundir | None = None
        self._draining = False
        self._drain_timer: Timer | None = None
        self._ids = itertools.count(1)
        # *_refused: refused by a decision (ours of a peer's, or a peer's of ours); *_failed:
        # could not be made (no such domain, no xsockd there, set-up timed out, link lost
        # before the peer accepted, local service unreachable).
        self.counters = {"links_refused": 0, "streams_refused": 0, "links_failed": 0,
                         "streams_failed": 0, "peer_faults": 0, "links_opened": 0,
                         "streams_opened": 0, "handler_failures": 0,
                         # of streams_opened, those a pump opened or admitted by itself
                         # (_on_local_open, _on_accepted)
                         "streams_fast": 0}
        self.peerlog = PeerLog(log, loop.time)
        # One record per closed channel is what operators search for; a peer opening and
        # resetting streams in a loop must not turn it into a flood.
        self._records = PeerLog(log, loop.time, burst=200, interval=1.0)
        self._started = False
        self._flush_timer: Timer | None = None
        # Per peer, bounded by the configured peers: what its links may ask of us.
        self._offers: dict[int, RateBucket] = {}
        self.started_at = time.time()
        self._observers: list[ChannelObserver] = []
        self._eager_timers: dict[int, Timer] = {}                # peer: next try
        self._eager_delay: dict[int, float] = {}                 # peer: backoff after a failure
        self._eager_off = False                                  # stopping: no more tries
        self.vchans = Vchans(backend, loop, self.peerlog)         # [vchan.NAME]

    # ---- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Publishes our request nodes, watches them and opens the peers' sockets."""
        self._check_peers(self.config)
        self._rundir = Rundir(self.config.daemon.rundir)
        claim_domain(self.xs, self.domid)
        self._sync_requests()
        self.xs.watch(request_dir(self.domid), "requests")
        # A destroyed domain runs no unmap notification: @releaseDomain is how we learn of it.
        self.xs.watch("@releaseDomain", "released")
        try:
            # xenstored forgets a permission naming a domain that does not exist yet: a peer
            # that boots after us gets its request node opened to it again when it appears.
            self.xs.watch("@introduceDomain", "introduced")
        except XenStoreError as e:  # a domU may not watch it: its peers (dom0) exist already
            log.debug("watching @introduceDomain: %s", e)
        self._flush_timer = self.loop.call_later(self.peerlog.interval, self._flush_logs)
        self.loop.add_reader(self.xs.fileno(), self._on_xenstore)
        for peer, service in self.config.local_sockets():
            self._listen(peer, service)
        self.vchans.start(self.config, self._rundir)
        self._started = True
        for peer in sorted(self.config.eager_peers()):
            self._keep_eager(peer, 0.0)
        log.info("xsockd domain %d ready: %s, rundir %s", self.domid,
                 count(len(self.config.daemon.peers), "peer"), self.config.daemon.rundir)
        log.info("%s", grant_plan(self.config).describe())

    def stop(self) -> None:
        """Closes listeners and links (telling peers goodbye) and removes our nodes."""
        self._stop_eager()
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        for key in list(self._listeners):
            self._unlisten(*key)
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        for link in list(self.links.values()):
            self._drop_link(link, goodbye=True)
        self.vchans.stop()
        if self._started:
            self.loop.remove_reader(self.xs.fileno())
            try:
                self.xs.rm(f"{domain_path(self.domid)}/{XS_ROOT}")
            except XenStoreError as e:
                log.debug("removing our XenStore nodes: %s", e)
        self.xs.close()
        if self._rundir is not None:
            self._rundir.close()
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
        self._stop_eager()
        for link in list(self.links.values()):
            self._set_admission(link)  # empty: every OPEN now comes to us, to be refused
        for peer, service in list(self._listeners):
            self._on_connect(peer, service)  # clients whose connect() already succeeded
            self._unlisten(peer, service)
        self.vchans.drain()
        deadline = self.loop.time() + timeout
        log.info("stopping: no new streams; %s may drain for up to %g s",
                 count(len(self.channels), "channel"), timeout)

        def check() -> None:
            self._drain_timer = None
            held = self.held()
            pending = sum(v for k, v in held.items() if k != "streams")
            if pending and self.loop.time() < deadline:
                self._drain_timer = self.loop.call_later(DRAIN_POLL, check)
                return
            if pending:
                log.warning("stop_timeout of %g s reached: closing %s with %s "
                            "still on their way (%s)", timeout, count(held["streams"], "stream"),
                            count(pending, "byte"),
                            ", ".join(f"{k} {v}" for k, v in held.items() if v and
                                      k != "streams"))
            else:
                log.info("drained: closing %s", count(held["streams"], "idle stream"))
            done()

        check()

    def held(self) -> Counter[str]:
        """Returns the bytes all links still hold on their way, by kind (see RingLink.held),
        and the vchans' (``vchan``: in their rings, either way; their streams count too)."""
        total: Counter[str] = Counter()
        for link in self.links.values():
            if not link.closed:
                total.update(link.ring.held())
        total.update(self.vchans.held())
        return total

    def reload(self, config: Config) -> list[str]:
        """Switches to ``config``: new peers and named services get sockets, removed ones' go.

        Open links and channels survive; a removed peer may open no new streams or links.
        New [link] budgets (open_rate, max_connecting) apply to every peer at once, the other
        [link] settings to links made from now on; [vchan.NAME] tables added start, removed
        ones stop, changed ones restart (``_reload_vchans``).  Returns what changed, one phrase
        each (``confdiff``); [] for nothing.  rundir changes need a restart.
        """
        self._check_peers(config)
        changes: list[str] = []
        if config.daemon.rundir != self.config.daemon.rundir:
            config = dataclasses.replace(
                config, daemon=dataclasses.replace(config.daemon, rundir=self.config.daemon.rundir))
            changes.append("rundir kept (a new one takes effect at restart)")
        old, new = set(self.config.local_sockets()), set(config.local_sockets())
        if not self._draining:  # stopping: no listener comes back
            added: list[tuple[int, str]] = []
            try:
                for peer, service in sorted(new - old):
                    self._listen(peer, service)
                    added.append((peer, service))
            except OSError as e:
                for key in added:
                    self._unlisten(*key)
                raise XsockError(f"cannot listen on {self.socket_path(peer, service)}: "
                                 f"{e.strerror or e}") from e
            for peer, service in sorted(old - new):
                self._unlisten(peer, service)
        changes += describe_changes(self.config, config)
        if self._started:
            changes += self.vchans.reload(self.config, config, set(self._listeners),
                                          starting=not self._draining)
        old_config = self.config
        now = self.loop.time()
        for budget in self._budgets.values():
            budget.retune(config.link.open_rate, config.link.max_connecting, now)
        for gate in self._gates.values():
            gate.retune(config.link.open_rate, config.link.open_rate)
        for peer in set(self.config.daemon.peers) - set(config.daemon.peers):
            self._offers.pop(peer, None)
            self._budgets.pop(peer, None)
            self._gates.pop(peer, None)
            self.peerlog.forget(peer)
        plan, self.config = grant_plan(config), config
        for link in list(self.links.values()):
            self._set_admission(link)
        if self._started:
            self._sync_requests()
            for peer in sorted(config.eager_peers() - old_config.eager_peers()):
                self._keep_eager(peer, 0.0)
            if plan != grant_plan(old_config):
                log.info("%s", plan.describe())
        return changes

    def _sync_requests(self) -> None:
        """Makes our request nodes match the configured peers; says which it could not make.

        Our own tree: a failure here is not a peer's, but one peer's node failing must not
        cost the others theirs.
        """
        for peer, e in self.board.sync(self.config.daemon.peers).items():
            log.error("cannot make the link request node of domain %d: %s; it cannot ask us "
                      "for a link until the next reload", peer, e, extra={"XSOCK_PEER": peer})

    def _flush_logs(self) -> None:
        self.peerlog.flush()
        self._records.flush()
        self._flush_timer = self.loop.call_later(self.peerlog.interval, self._flush_logs)

    # ---- the failure boundary -----------------------------------------------------------

    def _guard(self, peer: int, role: Role | None, what: str, fn: Callable[..., object],
               *args: object) -> None:
        """Runs ``fn(*args)`` for ``peer``; any failure ends that peer's link in ``role``.

        Expected failures (a peer's protocol error, XenStore or the backend refusing) are
        logged as warnings, anything else as an error with the traceback at debug level:
        either way the link goes down and the daemon and every other link go on.
        """
        try:
            fn(*args)
        except Exception as e:  # this is the boundary: nothing passes it
            self._failed(peer, role, what, e)

    def _failed(self, peer: int, role: Role | None, what: str, e: Exception) -> None:
        if isinstance(e, (XsockError, OSError)):
            if isinstance(e, ProtocolError):
                self.counters["peer_faults"] += 1
            self.peerlog.warning(peer, "link with domain %d down: %s: %s", peer, what,
                                 escape(str(e)))
        else:
            self.counters["handler_failures"] += 1
            self.peerlog.error(peer, "link with domain %d down: internal error while %s: %s: "
                               "%s (traceback at debug level)", peer, what, type(e).__name__,
                               escape(str(e)))
            log.debug("traceback of the failure while %s", what, exc_info=e)
        for key in ([(peer, role)] if role is not None else [(peer, r) for r in Role]):
            link = self.links.get(key)
            if link is not None:
                try:
                    self._drop_link(link)
                except Exception as e2:  # already failing: release what we can
                    log.debug("dropping the link of domain %d: %s", peer, e2, exc_info=e2)
                    self.links.pop(key, None)

    def list_vchans(self) -> list[dict[str, object]]:
        """Returns each vchan endpoint's kind, name, XenStore path, peer, state, streams and
        bytes each way (``ListVchans`` in org.xsockd.Xsockd1.xml)."""
        return self.vchans.describe()

    # ---- local sockets ------------------------------------------------------------------

    def socket_path(self, peer: int, service: str = "") -> str:
        """Returns <rundir>/<peer>.sock (the default service) or <rundir>/<peer>/<service>.sock."""
        return socket_path(self.config.daemon.rundir, peer, service)

    def _listen(self, peer: int, service: str = "") -> None:
        assert self._rundir is not None
        sock = self._rundir.listen(peer, service)
        self._listeners[(peer, service)] = sock
        self.loop.add_reader(sock.fileno(), lambda: self._on_connect(peer, service))
        link = self._up_link(peer)
        if link is not None:
            self._hand_listeners(link)

    def _unlisten(self, peer: int, service: str = "") -> None:
        sock = self._listeners.pop((peer, service), None)
        if sock is None:
            return
        link = self._handed.pop((peer, service), None)
        if link is not None and not link.closed:
            link.ring.unlisten(service)
        self.loop.remove_reader(sock.fileno())
        sock.close()
        if self._rundir is not None:
            self._rundir.unlink(peer, service)

    def _on_connect(self, peer: int, service: str = "") -> None:
        listener = self._listeners.get((peer, service))
        while listener is not None:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                return
            except OSError as e:
                # EMFILE and the like: the listener stays readable, so a reader would spin;
                # look again in a while.
                self.peerlog.error(peer, "accepting a connection for domain %d: %s; trying "
                                   "again in %g s", peer, e.strerror, ACCEPT_BACKOFF)
                self.loop.remove_reader(listener.fileno())
                self.loop.call_later(ACCEPT_BACKOFF, lambda: self._resume(peer, service))
                return
            try:
                link = self._link_for(peer)
                sid, serial = link.ring.open_stream(conn, service)
            except (XsockError, OSError) as e:
                self.counters["streams_failed"] += 1
                # A local application can retry in a loop: bounded like a peer's lines.
                self.peerlog.error(peer, "stream to %s of domain %d failed, the application "
                                   "sees EOF: %s", f"service {service!r}" if service else
                                   "the default service", peer, e, XSOCK_SERVICE=service)
                conn.close()
                continue
            except Exception as e:  # a bug costs this connection, not the daemon
                conn.close()
                self._failed(peer, Role.INITIATOR, "opening a stream for a local application", e)
                continue
            self._add_channel(link, sid, serial, service, "out")

    def _resume(self, peer: int, service: str) -> None:
        listener = self._listeners.get((peer, service))
        if listener is not None and (peer, service) not in self._handed:
            self.loop.add_reader(listener.fileno(), lambda: self._on_connect(peer, service))
            self._on_connect(peer, service)

    def _hand_listeners(self, link: Link) -> None:
        """Has ``link``'s pump accept on its peer's sockets (those no other pump has) and open
        their streams itself, telling us after the fact (``_on_local_open``).  Only once the
        link is up: the first stream, which sets the link up, comes through ``_on_connect``."""
        if link.closed or not link.up or self._draining:
            return
        for key, sock in list(self._listeners.items()):
            if key[0] == link.peer and key not in self._handed and \
                    link.ring.listen(sock, key[1]):
                self.loop.remove_reader(sock.fileno())
                self._handed[key] = link

    def _take_back_listeners(self, link: Link) -> None:
        """The loop reads again the sockets ``link``'s pump accepted on (it is going): what
        is queued there is ours to take; another up link of the peer gets them if there is
        one."""
        for key in [k for k, lk in self._handed.items() if lk is link]:
            del self._handed[key]
            if not link.closed:
                link.ring.unlisten(key[1])
            sock = self._listeners.get(key)
            if sock is not None:  # level-triggered: what is queued wakes the loop at once
                self.loop.add_reader(sock.fileno(), lambda k=key: self._on_connect(*k))
        other = self._up_link(link.peer, besides=link)
        if other is not None:
            self._hand_listeners(other)

    # ---- links --------------------------------------------------------------------------

    def granted_pages(self) -> int:
        return sum(link.pages for link in self.links.values())

    def _up_link(self, peer: int, besides: Link | None = None) -> Link | None:
        """Returns an up link with ``peer`` (other than ``besides``), or None.  A peer may have
        two links for a while, one in each direction, when both sides asked at once."""
        return next((lk for (p, _), lk in self.links.items()
                     if p == peer and lk.up and lk is not besides), None)

    def _link_for(self, peer: int) -> Link:
        """Returns a link to ``peer`` for a new stream, offering one if there is none."""
        link = self._up_link(peer) or next(
            (lk for (p, _), lk in self.links.items() if p == peer), None)
        if link is not None:
            return link
        if not self._domain_exists(peer):
            self.counters["links_failed"] += 1
            raise RefusedError(no_such_domain(peer))
        why = grant_budget(self.config, self.granted_pages())
        if why:
            self.counters["links_failed"] += 1
            raise RefusedError(why)
        cfg = self.config.link
        ring_size = grant_plan(self.config).ring_size
        link = grant_link(self.backend, peer, ring_size=ring_size, window=cfg.stream_window,
                          max_streams=cfg.max_streams)
        self._add_link(link)
        try:
            link.ring.start()
            offering = Offering(self.xs, self.domid, peer, generation=link.generation,
                                ring_size=ring_size, control_ref=link.grant_refs[0],
                                port=link.port, refs=link.grant_refs[1:])
            self._watch_peer(link, offering)
            self._waiting[id(link)] = self.loop.call_later(LINK_SETUP_TIMEOUT, lambda: self._guard(
                peer, Role.INITIATOR, "waiting for it to attach", self._setup_timeout, link))
        except BaseException:
            self.counters["links_failed"] += 1
            self._drop_link(link)
            raise
        self.counters["links_opened"] += 1
        log.info("offered link to domain %d (%d pages, event channel %d)", peer, link.pages,
                 link.port, extra={"XSOCK_PEER": peer})
        return link

    def _add_link(self, link: Link) -> None:
        self.links[(link.peer, link.role)] = link
        cfg = self.config.link
        if link.peer not in self._budgets:  # per peer: a new link does not refill it
            self._budgets[link.peer] = OpenBudget(cfg.open_rate, cfg.max_connecting,
                                                  self.loop.time())
            self._gates[link.peer] = OpenGate(cfg.open_rate, cfg.open_rate)
        self._set_admission(link)
        self.loop.add_reader(link.ring.fileno(), lambda: self._guard(
            link.peer, link.role, "handling its link events", self._on_link_events, link))

    def _set_admission(self, link: Link) -> None:
        """Gives ``link``'s pump the services its peer may reach now, so that it accepts
        those streams without us (``_on_accepted`` hears of them); anything else, or
        anything the pump cannot connect at once, still comes to ``_admit``."""
        if link.closed:
            return
        entries = [AdmitEntry(name, svc.socket,
                              caller_header(link.peer, name) if svc.caller_header else b"")
                   for name, svc in reachable_services(self.config, link.peer,
                                                       self._draining).items()]
        link.ring.set_admission(entries, self._gates.get(link.peer))

    def _setup_timeout(self, link: Link) -> None:
        self._waiting.pop(id(link), None)
        if not link.up and not link.closed:
            self.counters["links_failed"] += 1
            self.peerlog.error(link.peer, "domain %d did not attach to our link within %.0f s: "
                               "its xsockd stopped or is stuck (see its log); streams "
                               "waiting for the link end", link.peer, LINK_SETUP_TIMEOUT)
            self._drop_link(link)

    def _stop_waiting(self, link: Link) -> None:
        timer = self._waiting.pop(id(link), None)
        if timer is not None:
            timer.cancel()

    def _watch_peer(self, link: Link, node: PeerNode) -> None:
        self._peer_nodes[id(link)] = node

        def forget() -> None:
            self._peer_nodes.pop(id(link), None)
            node.close()
        link.on_close(forget)

    def _drop_link(self, link: Link, goodbye: bool = False,
                   unopened: str = "streams_failed") -> None:
        """Closes ``link`` and forgets it; its streams the peer had not accepted yet count
        under the counter ``unopened``."""
        if self.links.get((link.peer, link.role)) is link:
            del self.links[(link.peer, link.role)]
        if link.closed:
            return
        try:
            self._stop_waiting(link)
            self.loop.remove_reader(link.ring.fileno())
            link.close(goodbye)
        finally:  # whatever failed above, the tables forget the link
            self._take_back_listeners(link)
            for key in [k for k, a in self._admitting.items() if a.link is link]:
                self._finish(self._admitting[key])
            for ch in [c for c in self.channels.values() if c.link is link]:
                if ch.state == "opening":
                    self.counters[unopened] += 1
                self._remove_channel(ch, "link-down")
            if link.peer in self.config.eager_peers():
                # One that was up is set up again at once; one that never came up backs off.
                self._keep_eager(link.peer, self._eager_backoff(link.peer, failed=not link.up))

    # ---- eager links --------------------------------------------------------------------

    def _keep_eager(self, peer: int, delay: float) -> None:
        """Makes sure an eager ``peer``'s link is looked at in ``delay`` seconds."""
        if self._eager_off or self._draining or peer in self._eager_timers \
                or peer not in self.config.eager_peers():
            return
        self._eager_timers[peer] = self.loop.call_later(delay, lambda: self._guard(
            peer, Role.INITIATOR, "setting up its eager link", self._eager_check, peer))

    def _eager_check(self, peer: int) -> None:
        """Offers a link to an eager peer that has none (either role counts).

        A link that exists is looked after by its own end: dropping it calls us again.
        """
        self._eager_timers.pop(peer, None)
        if self._eager_off or self._draining or peer not in self.config.eager_peers() \
                or any(p == peer for p, _ in self.links):
            return
        try:
            self._link_for(peer)
        except (XsockError, OSError) as e:
            delay = self._eager_backoff(peer, failed=True)
            self.peerlog.warning(peer, "eager link with domain %d not set up: %s; trying "
                                 "again in %g s", peer, e, delay)
            self._keep_eager(peer, delay)

    def _eager_backoff(self, peer: int, failed: bool) -> float:
        """Returns the delay before the next try: doubling while tries fail, else the least."""
        if not failed:
            self._eager_delay.pop(peer, None)
            return EAGER_RETRY_MIN
        delay = min(EAGER_RETRY_MAX, 2 * self._eager_delay.get(peer, EAGER_RETRY_MIN / 2))
        self._eager_delay[peer] = delay
        return delay

    def _stop_eager(self) -> None:
        self._eager_off = True
        for timer in self._eager_timers.values():
            timer.cancel()
        self._eager_timers.clear()

    # ---- XenStore -----------------------------------------------------------------------

    def _on_xenstore(self) -> None:
        # A failure to read events is our XenStore connection's, not a peer's: it propagates.
        for ev in self.xs.read_events():
            if ev.token == "requests":
                self._on_request_event(ev.path)
            elif ev.token == "released":
                self._drop_destroyed_peers()
            elif ev.token == "introduced":
                self._sync_requests()
            elif (ours := PeerNode.parse_token(ev.token)) is not None:
                kind, peer, generation = ours
                role = Role.INITIATOR if kind == "answer" else Role.ACCEPTOR
                self._guard(peer, role, "reading its XenStore node", self._on_peer_node, role,
                            peer, generation)

    def _on_request_event(self, path: str) -> None:
        """Looks at the request node the event names, or at every peer's for the directory.

        Only we create nodes in our request directory, one per configured peer, so the work
        is bounded by our peer count whatever anyone writes.
        """
        peer = self.board.peer_of(path)
        peers = [peer] if peer is not None else (
            sorted(self.board.peers) if path == self.board.path else [])
        for p in peers:
            self._guard(p, Role.ACCEPTOR, "answering its link request", self._on_request, p)

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
        self.vchans.peers_destroyed(self._domain_exists)
        for link in [lk for (peer, _), lk in self.links.items() if peer in gone]:
            log.warning("link with domain %d down: the domain was destroyed", link.peer,
                        extra={"XSOCK_PEER": link.peer})
            self._guard(link.peer, link.role, "dropping it", self._drop_link, link)

    def _on_peer_node(self, role: Role, peer: int, generation: int) -> None:
        """Reads the peer's node we watch: its answer to our offer, or that it is gone."""
        link = self.links.get((peer, role))
        node = self._peer_nodes.get(id(link)) if link is not None else None
        if link is None or node is None or link.generation != generation:
            return
        if isinstance(node, Offering) and not link.up:
            why = node.refusal()
            if why is not None:
                self.counters["links_refused"] += 1
                self.peerlog.error(peer, "%s; streams waiting for the link end",
                                   link_refused(peer, self.domid, escape(why)))
                self._drop_link(link, unopened="streams_refused")
                return
        if node.gone():
            self.peerlog.warning(peer, "link with domain %d down: %s is gone (the domain was "
                                 "destroyed, or its xsockd stopped)", peer, node.path)
            self._drop_link(link)

    def _check_peers(self, config: Config) -> None:
        """Refuses a configuration naming our own domain; warns of peers that do not exist."""
        check_own_domain(config, self.domid)
        for peer in config.daemon.peers:
            if not self._domain_exists(peer):
                log.warning("domain %d (in [daemon] peers) does not exist now: streams to it "
                            "are refused until it does", peer, extra={"XSOCK_PEER": peer})

    def _on_request(self, peer: int) -> None:
        """Answers what ``peer`` wrote in its request node (only it and we may write there)."""
        value = self.board.read(peer)
        if value is None:
            if self.board.restore(peer):
                self.peerlog.warning(peer, "the link request node of domain %d was removed "
                                     "(only it or dom0 may): recreated", peer)
            return
        generation = self.board.new_offer(peer, value)
        if generation is None:
            return  # idle, our own answer, junk the peer wrote, or an offer answered already
        refusal = admit_link(self.config, self.domid, peer, self._draining)
        if refusal is None:
            bucket = self._offers.setdefault(peer, RateBucket(OFFER_RATE, OFFER_BURST,
                                                              self.loop.time()))
            if not bucket.take(self.loop.time()):
                refusal = Refusal(Reason.TOO_MANY, f"more than {OFFER_BURST} link offers in "
                                                   f"{OFFER_BURST / OFFER_RATE:g} s")
        if refusal is not None:
            self.counters["links_refused"] += 1
            self.peerlog.warning(peer, "refused link from domain %d: %s", peer, refusal.why)
            word = ("stopping" if self._draining else "not-allowed"
                    if refusal.reason == Reason.REFUSED else "busy")
            self.board.answer(peer, generation, f"refused {generation} {word}")
            return
        old = self.links.get((peer, Role.ACCEPTOR))
        if old is not None:
            self.peerlog.info(peer, "domain %d offers a new link: dropping the old one", peer)
            self._drop_link(old)
        try:
            offer = read_offer(self.xs, peer, self.domid)
        except VersionMismatch as e:
            self.counters["links_refused"] += 1
            self.peerlog.warning(peer, "refused link from domain %d: it speaks link protocol "
                                 "version %d, we speak %d; run the same xsockd version on both",
                                 peer, e.version, PROTOCOL_VERSION)
            self.board.answer(peer, generation, f"refused {generation} version {e.version}; "
                              f"we speak {PROTOCOL_VERSION}")
            return
        except ProtocolError as e:
            self._refuse_offer(peer, generation, str(e), "malformed-offer")
            return
        if offer.generation != generation:
            self._refuse_offer(peer, generation, f"offer generation {offer.generation} does "
                               f"not match request {generation}", "malformed-offer")
            return
        cfg = self.config.link
        try:
            link = map_link(self.backend, peer, generation=offer.generation,
                            ring_size=offer.ring_size, control_ref=offer.control_ref,
                            ring_refs=offer.ring_refs, port=offer.port,
                            window=cfg.stream_window, max_streams=cfg.max_streams)
        except (BackendError, OSError) as e:
            self._refuse_offer(peer, generation, str(e), f"attach-failed-{e.errno}")
            return
        self._add_link(link)
        link.on_close(lambda: self.board.reset(peer, generation))
        self._watch_peer(link, PeerNode(self.xs, "offer", offer_path(peer, self.domid), peer,
                                        generation))
        link.ring.start()
        if not self.board.answer(peer, generation, f"accepted {generation}"):
            # The peer wrote a newer offer meanwhile: this link will never be used.
            self._drop_link(link)
            self._on_request(peer)
            return
        self.peerlog.info(peer, "attached link from domain %d (ring %d bytes, event channel "
                          "%d)", peer, offer.ring_size, link.port)

    def _refuse_offer(self, peer: int, generation: int, why: str, answer: str) -> None:
        self.counters["peer_faults"] += 1
        self.peerlog.warning(peer, "cannot attach link offered by domain %d: %s", peer,
                             escape(why))
        self.board.answer(peer, generation, f"refused {generation} {answer}")

    # ---- link events --------------------------------------------------------------------

    def _on_link_events(self, link: Link) -> None:
        events = link.ring.events()
        # A stream opened and reset within one batch gets no connect at all.
        closed = {ev.serial for ev in events if ev.type == EventType.CLOSED}
        for ev in events:
            if link.closed:
                return
            if ev.type == EventType.OPEN_REQUEST and ev.serial in closed:
                continue
            self._on_link_event(link, ev)

    def _on_link_event(self, link: Link, ev: RingEvent) -> None:
        peer = link.peer
        if ev.type == EventType.PEER_UP:
            link.up = True
            self._stop_waiting(link)
            log.info("link with domain %d up", peer, extra={"XSOCK_PEER": peer})
            self._hand_listeners(link)
        elif ev.type == EventType.LOCAL_OPEN:
            self.counters["streams_fast"] += 1
            self._add_channel(link, ev.stream, ev.serial, ev.name, "out")
        elif ev.type == EventType.LISTEN_FAILED:
            self.peerlog.error(peer, "accepting a connection for domain %d: %s; trying again "
                               "in %g s", peer, os.strerror(-ev.arg), ACCEPT_BACKOFF)
        elif ev.type == EventType.OPEN_REQUEST:
            self._admit(link, ev)
        elif ev.type == EventType.ACCEPTED:
            self._on_accepted(link, ev)
        elif ev.type == EventType.OPENED:
            ch = self._by_serial.get((id(link), ev.serial))
            if ch:
                ch.state = "open"
        elif ev.type == EventType.CLOSED:
            self._on_closed(link, ev)
        elif ev.type == EventType.LINK_DOWN:
            if ev.arg == -errno.EPROTO:
                self.counters["peer_faults"] += 1
            why = LINK_DOWN_WHY.get(ev.arg) or os.strerror(-ev.arg)
            self.peerlog.warning(peer, "link with domain %d down: %s", peer, why)
            self._drop_link(link)

    def _on_closed(self, link: Link, ev: RingEvent) -> None:
        admission = self._admitting.pop((id(link), ev.serial), None)
        if admission is not None:
            self._finish(admission)  # reset by the peer while we connected its service
        ch = self._by_serial.get((id(link), ev.serial))
        if ch is None:
            return
        peer = link.peer
        reason = Reason(ev.arg) if ev.arg in Reason._value2member_map_ else None
        why = reason.name.lower().replace("_", "-") if reason is not None else f"reason-{ev.arg}"
        if reason in (Reason.REFUSED, Reason.NO_SERVICE, Reason.TOO_MANY) \
                and ch.direction == "out":
            # No service there is a failure, not a decision: counted as the peer counts it.
            self.counters["streams_failed" if reason == Reason.NO_SERVICE
                          else "streams_refused"] += 1
            self.peerlog.warning(peer, "stream %d not opened, the application sees EOF: %s",
                                 ch.id, stream_refused(peer, self.domid, ch.service, reason),
                                 XSOCK_CHANNEL=ch.id, XSOCK_SERVICE=ch.service)
        # One record per stream, as a server logs a connection: what an operator searches
        # the journal for (XSOCK_CHANNEL, XSOCK_PEER, XSOCK_SERVICE, bytes).
        self._records.info(
            peer, "channel %d (%s, domain %d, service %s) closed (%s): %d bytes in, %d out",
            ch.id, ch.direction, peer, ch.service or "(default)", why, ev.bytes_in,
            ev.bytes_out, XSOCK_CHANNEL=ch.id, XSOCK_SERVICE=ch.service or "(default)",
            XSOCK_BYTES_IN=ev.bytes_in, XSOCK_BYTES_OUT=ev.bytes_out,
            XSOCK_BYTES=ev.bytes_in + ev.bytes_out)
        self._remove_channel(ch, why)

    def _on_accepted(self, link: Link, ev: RingEvent) -> None:
        """The pump admitted, connected and accepted the peer's stream itself: record it."""
        budget = self._budgets.get(link.peer)
        if budget is not None:
            budget.charge(self.loop.time())
        self.counters["streams_fast"] += 1
        ch = self._add_channel(link, ev.stream, ev.serial, ev.name, "in")
        ch.state = "open"

    def _admit(self, link: Link, ev: RingEvent) -> None:
        """Connects the peer's new stream to the service it asked for, or refuses it."""
        peer, name = link.peer, ev.name
        verdict = admit_stream(self.config, peer, name, self._draining)
        if not isinstance(verdict, Refusal):
            budget = self._budgets[link.peer]
            refusal = budget.take(self.loop.time())
            if refusal is None:
                now = self.loop.time()
                admission = _Admission(link, ev.stream, ev.serial, name, verdict,
                                       now + CONNECT_PATIENCE, now + SERVICE_START_PATIENCE)
                self._admitting[(id(link), ev.serial)] = admission
                budget.connecting += 1
                self._gates[link.peer].charge()  # the pumps' share of the rate shrinks too
                self._connect_service(admission)
                return
            verdict = refusal
        self.counters["streams_refused"] += 1
        self.peerlog.warning(peer, "refused stream from domain %d to service %r: %s", peer,
                             escape(name) or "(default)", verdict.why, XSOCK_SERVICE=name)
        link.ring.reject_stream(ev.stream, ev.serial, verdict.reason)

    def _finish(self, admission: _Admission) -> None:
        if not admission.done:
            admission.done = True
            self._admitting.pop((id(admission.link), admission.serial), None)
            budget = self._budgets.get(admission.link.peer)
            if budget is not None:
                budget.connecting -= 1

    def _connect_service(self, adm: _Admission, delay: float = 0.005) -> None:
        """Connects to the service, retrying with backoff while it cannot take us yet.

        A full backlog (EAGAIN: a burst, or a service slow to accept) is retried until
        ``deadline``; a missing socket (ENOENT) or one nobody listens on (ECONNREFUSED: a
        service being restarted or not started yet) until ``absent_until``, a shorter time.
        A socket unit's listener exists before its service runs, so it needs neither.
        """
        if adm.done or adm.link.closed:
            self._finish(adm)
            return
        link, service = adm.link, adm.service
        sock: socket.socket | None = None
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.setblocking(False)
            sock.connect(service.socket)
            if service.caller_header:
                sock.send(caller_header(link.peer, adm.name))
        except OSError as e:
            if sock is not None:
                sock.close()
            if e.errno == errno.EAGAIN:
                until, why = adm.deadline, "its backlog stayed full"
            elif e.errno in (errno.ENOENT, errno.ECONNREFUSED):
                until, why = adm.absent_until, e.strerror or str(e)
            else:
                until, why = 0.0, e.strerror or str(e)
            if self._draining:
                why = f"{why}, and we are stopping"
            elif self.loop.time() < until:
                self.loop.call_later(delay, lambda: self._guard(
                    link.peer, link.role, "connecting its stream to a local service",
                    self._connect_service, adm, min(delay * 2, 0.2)))
                return
            self._finish(adm)
            self.counters["streams_failed"] += 1
            self.peerlog.warning(link.peer, "service %r at %s unreachable for domain %d: %s; "
                                 "start the service (or fix [services.%s] socket)",
                                 adm.name or "(default)", service.socket, link.peer, why,
                                 adm.name or self.config.daemon.default_service,
                                 XSOCK_SERVICE=adm.name)
            link.ring.reject_stream(adm.stream, adm.serial, Reason.NO_SERVICE)
            return
        self._finish(adm)
        assert sock is not None
        if link.ring.accept_stream(adm.stream, adm.serial, sock):
            ch = self._add_channel(link, adm.stream, adm.serial, adm.name, "in")
            ch.state = "open"

    def _add_channel(self, link: Link, stream: int, serial: int, service: str,
                     direction: str) -> Channel:
        ch = Channel(next(self._ids), link.peer, stream, serial, service, direction, link)
        self.channels[ch.id] = ch
        self._by_serial[(id(link), serial)] = ch
        self.counters["streams_opened"] += 1
        for obs in self._observers:
            obs.channel_opened(ch)
        return ch

    def _remove_channel(self, ch: Channel, reason: str = "closed") -> None:
        if self.channels.pop(ch.id, None) is None:
            return
        self._by_serial.pop((id(ch.link), ch.serial), None)
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
        if ch.link.ring.close_stream(ch.stream, ch.serial):
            ch.state = "closing"

    def _core_streams(self, links: list[Link]) -> dict[tuple[int, int], StreamInfo]:
        """The data plane's snapshot of the links' streams, by (id(link), serial)."""
        return {(id(link), s.serial): s for link in links if not link.closed
                for s in link.ring.streams()}

    def list_channels(self) -> list[dict[str, object]]:
        """Returns every channel as ``channel_info`` describes it, by id."""
        links = list({id(ch.link): ch.link for ch in self.channels.values()}.values())
        core = self._core_streams(links)
        return [self._describe(ch, core.get((id(ch.link), ch.serial)))
                for ch in sorted(self.channels.values(), key=lambda c: c.id)]

    def channel_info(self, channel_id: int) -> dict[str, object]:
        """Returns one channel: id, peer, service, direction, state, ring sizes, bytes each
        way, created (unix time), the link's grant refs, event channel and role.

        Raises NoSuchChannel.
        """
        ch = self.channels.get(channel_id)
        if ch is None:
            raise NoSuchChannel(channel_id)
        core = self._core_streams([ch.link])
        return self._describe(ch, core.get((id(ch.link), ch.serial)))

    @staticmethod
    def _describe(ch: Channel, core: StreamInfo | None) -> dict[str, object]:
        link = ch.link
        state = ch.state
        # The OPENED event of an early open may still be batched when its reply has arrived
        # (the ACCEPT is read with it): the data plane, whose byte counts are shown, knows.
        if state == "opening" and core is not None and core.state in (StreamState.OPEN,
                                                                       StreamState.HALF):
            state = "open"
        return {"id": ch.id, "peer": ch.peer, "service": ch.service, "direction": ch.direction,
                "state": state, "stream": ch.stream, "ring_size_rx": link.ring.ring_size,
                "ring_size_tx": link.ring.ring_size,
                "bytes_in": core.bytes_in if core is not None else 0,
                "bytes_out": core.bytes_out if core is not None else 0, "created": ch.created,
                "grant_refs": list(link.grant_refs), "event_channel": link.port,
                "link_role": link.role.name.lower()}

    def statistics(self) -> dict[str, object]:
        """Returns the daemon's counters: channels, links, grants, bytes and refusals.

        ``core_streams`` counts the streams in the C tables of every link and ``admitting``
        the peers' streams being connected to a local service: once the links are quiet,
        channels + admitting == core_streams, whatever the peers did.
        """
        totals = dict.fromkeys(("bytes_in", "bytes_out", "frames_in", "frames_out",
                                "notify_sent", "wakeups", "streams"), 0)
        for link in self.links.values():
            if not link.closed:
                st = link.ring.stats()
                for k in totals:
                    totals[k] += st[k]
        core_streams = totals.pop("streams")
        plan = grant_plan(self.config)
        return {"domid": self.domid, "channels": len(self.channels),
                "links": len(self.links),
                "links_up": sum(1 for lk in self.links.values() if lk.up),
                "peers": len(self.config.daemon.peers), "granted_pages": self.granted_pages(),
                "grant_limit": self.config.link.grant_pages,
                "grant_share": plan.share, "link_ring_size": plan.ring_size,
                "link_pages": plan.link_pages, "started": self.started_at,
                "uptime": time.time() - self.started_at, "core_streams": core_streams,
                "admitting": len(self._admitting), **totals, **self.counters}

    def status(self) -> str:
        up = sum(1 for lk in self.links.values() if lk.up)
        return (f"{count(len(self.channels), 'channel')}, {up} of "
                f"{count(len(self.links), 'link')} up, "
                f"{count(len(self.config.daemon.peers), 'peer')} configured")
