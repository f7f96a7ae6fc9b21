"""One link to one peer domain: its shared pages, event channel, XenStore nodes and ring pump.

XenStore layout (see docs/PROTOCOL.md), for a link offered by domain A to domain B:

  /local/domain/A/data/xsock/link/B/        owner A, B may read: the offer
      version, generation, ring-size, control-ref, event-channel, ring-refs/<k>
  /local/domain/B/data/xsock/request        owner B, others may only write (create a child)
  /local/domain/B/data/xsock/request/A      created by A, only A and B may access:
      "offer <generation>" (A), then "accepted <generation>" or "refused <why>" (B)

Everything read from XenStore about a peer goes through ``parse_offer``: read once, checked,
bounded.  Lifecycle of a Link: attached -> up (peer seen live) -> closed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from xsockd.backend import Backend, UnmapNotify, XenStore, XenStorePerm
from xsockd.constants import MAX_RING_SIZE, MIN_RING_SIZE, PAGE_SIZE, PROTOCOL_VERSION, XS_ROOT
from xsockd.errors import ProtocolError, XenStoreError
from xsockd.ring import LIVE_OFFSET, RingLink, Role
from xsockd.xenstore_client import transact

__all__ = [
    "Link",
    "Offer",
    "accept_link",
    "domain_path",
    "offer_link",
    "offer_path",
    "parse_offer",
    "read_offer",
    "request_path",
]

log = logging.getLogger(__name__)

REFS_PER_NODE = 128  # ring refs per XenStore node: keeps values far below the 4 KiB limit


def domain_path(domid: int) -> str:
    return f"/local/domain/{domid}"


def offer_path(owner: int, peer: int) -> str:
    """Returns where ``owner`` publishes its offer of a link to ``peer``."""
    return f"{domain_path(owner)}/{XS_ROOT}/link/{peer}"


def request_dir(owner: int) -> str:
    return f"{domain_path(owner)}/{XS_ROOT}/request"


def request_path(acceptor: int, initiator: int) -> str:
    """Returns the node by which ``initiator`` asks ``acceptor`` to attach its offer."""
    return f"{request_dir(acceptor)}/{initiator}"


@dataclass(frozen=True)
class Offer:
    """A peer's link offer, validated."""

    generation: int
    ring_size: int
    control_ref: int
    ring_refs: tuple[int, ...]
    port: int


def _int(value: bytes, what: str, lo: int, hi: int) -> int:
    text = value.decode("ascii", "replace")
    if not text.isdigit() or len(text) > 20 or not lo <= int(text) <= hi:
        raise ProtocolError(f"{what} is {text[:32]!r}, not an integer in {lo}..{hi}")
    return int(text)


def parse_offer(nodes: dict[str, bytes]) -> Offer:
    """Returns the Offer described by ``nodes`` (name -> value, as read from XenStore).

    ``ring-refs/<k>`` entries are named by index.  Raises ProtocolError naming the first bad
    entry; nothing in ``nodes`` is trusted.
    """
    def get(name: str) -> bytes:
        if name not in nodes:
            raise ProtocolError(f"offer has no {name}")
        return nodes[name]

    version = _int(get("version"), "version", 0, 2**16)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"offer has protocol version {version}, we speak {PROTOCOL_VERSION}")
    generation = _int(get("generation"), "generation", 1, 2**63)
    ring_size = _int(get("ring-size"), "ring-size", MIN_RING_SIZE, MAX_RING_SIZE)
    if ring_size & (ring_size - 1):
        raise ProtocolError(f"ring-size {ring_size} is not a power of two")
    control_ref = _int(get("control-ref"), "control-ref", 1, 2**32 - 1)
    port = _int(get("event-channel"), "event-channel", 1, 2**31 - 1)
    want = 2 * ring_size // PAGE_SIZE
    chunks = sorted(int(k.split("/")[1]) for k in nodes if k.startswith("ring-refs/")
                    and k.split("/")[1].isdigit())
    if chunks != list(range(len(chunks))) or len(chunks) != -(-want // REFS_PER_NODE):
        raise ProtocolError(f"ring-refs has chunks {chunks[:8]}, want {-(-want // REFS_PER_NODE)}")
    refs: list[int] = []
    for k in chunks:
        words = nodes[f"ring-refs/{k}"].split()
        if len(words) > REFS_PER_NODE:
            raise ProtocolError(f"ring-refs/{k} has {len(words)} refs")
        refs.extend(_int(w, f"ring-refs/{k}", 1, 2**32 - 1) for w in words)
    if len(refs) != want:
        raise ProtocolError(f"offer has {len(refs)} ring refs, ring-size {ring_size} needs {want}")
    return Offer(generation, ring_size, control_ref, tuple(refs), port)


def read_offer(xs: XenStore, owner: int, peer: int) -> Offer:
    """Returns ``owner``'s offer to ``peer``, read in one transaction and validated."""
    base = offer_path(owner, peer)

    def read_all(tx: int) -> dict[str, bytes]:
        nodes: dict[str, bytes] = {}
        for name in xs.directory(base, tx)[:16]:
            if name == "ring-refs":
                for k in xs.directory(f"{base}/ring-refs", tx)[:64]:
                    nodes[f"ring-refs/{k}"] = xs.read(f"{base}/ring-refs/{k}", tx)
            else:
                nodes[name] = xs.read(f"{base}/{name}", tx)
        return nodes

    return parse_offer(transact(xs, read_all))


class Link:
    """An attached link to ``peer``.  ``ring`` is its pump; ``close()`` releases everything.

    ``pages`` is how many pages this link has granted (0 for an acceptor, which maps).
    """

    def __init__(self, peer: int, role: Role, ring: RingLink, generation: int, pages: int,
                 undo: contextlib.ExitStack, grant_refs: tuple[int, ...], port: int) -> None:
        self.peer = peer
        self.role = role
        self.ring = ring
        self.generation = generation
        self.pages = pages
        self.grant_refs = grant_refs
        self.port = port
        self.created = time.time()
        self.up = False
        self._undo = undo

    def __repr__(self) -> str:
        state = "closed" if self._undo is None else ("up" if self.up else "attaching")
        return (f"<Link peer={self.peer} {self.role.name.lower()} gen={self.generation} "
                f"ring={self.ring.ring_size} {state}>")

    @property
    def closed(self) -> bool:
        return self._undo is None

    def close(self, goodbye: bool = False) -> None:
        """Stops the pump and releases pages, port and XenStore nodes, in reverse order."""
        if self._undo is None:
            return
        undo, self._undo = self._undo, None
        self.ring.stop(goodbye)
        undo.close()


def _quiet_rm(xs: XenStore, path: str) -> Callable[[], None]:
    def rm() -> None:
        try:
            xs.rm(path)
        except XenStoreError as e:
            if e.errno not in (errno.ENOENT, errno.EACCES):
                log.warning("could not remove %s: %s", path, e)
    return rm


def offer_link(backend: Backend, xs: XenStore, peer: int, *, ring_size: int, window: int,
               max_streams: int) -> Link:
    """Returns a new link that we initiate: pages granted, offer published, request made.

    The peer attaches asynchronously; ``Link.up`` turns true on its PEER_UP event.  Raises
    BackendError (grants, ports), XenStoreError (EACCES on the request: the peer does not
    accept us) with everything undone.
    """
    me = backend.domid
    generation = secrets.randbits(62) + 1
    undo = contextlib.ExitStack()
    with undo:
        channel = backend.alloc_unbound(peer)
        undo.callback(channel.close)
        control = backend.grant(peer, 1, UnmapNotify(LIVE_OFFSET + int(Role.INITIATOR),
                                                     channel.port))
        undo.callback(control.close)
        rings = backend.grant(peer, 2 * ring_size // PAGE_SIZE)
        undo.callback(rings.close)
        ring = RingLink(control=control.buffer, rings=rings.buffer, ring_size=ring_size,
                        role=Role.INITIATOR, evtchn=channel, window=window,
                        max_streams=max_streams)
        undo.callback(ring.close)

        base = offer_path(me, peer)
        refs = rings.refs

        def publish(tx: int) -> None:
            xs.write(base, b"", tx)
            xs.set_perms(base, [XenStorePerm(me, "n"), XenStorePerm(peer, "r")], tx)
            for name, value in (("version", PROTOCOL_VERSION), ("generation", generation),
                                ("ring-size", ring_size), ("control-ref", control.refs[0]),
                                ("event-channel", channel.port)):
                xs.write(f"{base}/{name}", str(value), tx)
            for k in range(0, len(refs), REFS_PER_NODE):
                xs.write(f"{base}/ring-refs/{k // REFS_PER_NODE}",
                         " ".join(map(str, refs[k:k + REFS_PER_NODE])), tx)

        undo.callback(_quiet_rm(xs, base))
        transact(xs, publish)

        req = request_path(peer, me)

        def ask(tx: int) -> None:
            # Any domain may create children of the request directory, so a hostile one may
            # squat on ours; it left them writable by others, so we replace it atomically.
            xs.rm(req, tx)
            xs.write(req, f"offer {generation}", tx)
            xs.set_perms(req, [XenStorePerm(me, "n"), XenStorePerm(peer, "b")], tx)

        undo.callback(_quiet_rm(xs, req))
        transact(xs, ask)
        ring.start()
        link = Link(peer, Role.INITIATOR, ring, generation, 1 + len(refs), undo.pop_all(),
                    control.refs + refs, channel.port)
    return link


def accept_link(backend: Backend, xs: XenStore, peer: int, offer: Offer, *, window: int,
                max_streams: int) -> Link:
    """Returns a link attached to ``peer``'s validated ``offer``, its pump running.

    Raises BackendError if the refs are not granted to us or the port cannot be bound, with
    everything undone.
    """
    undo = contextlib.ExitStack()
    with undo:
        channel = backend.bind_interdomain(peer, offer.port)
        undo.callback(channel.close)
        control = backend.map(peer, [offer.control_ref],
                              UnmapNotify(LIVE_OFFSET + int(Role.ACCEPTOR), channel.port))
        undo.callback(control.close)
        rings = backend.map(peer, offer.ring_refs)
        undo.callback(rings.close)
        ring = RingLink(control=control.buffer, rings=rings.buffer, ring_size=offer.ring_size,
                        role=Role.ACCEPTOR, evtchn=channel, window=window,
                        max_streams=max_streams)
        undo.callback(ring.close)
        undo.callback(_quiet_rm(xs, request_path(backend.domid, peer)))
        ring.start()
        link = Link(peer, Role.ACCEPTOR, ring, offer.generation, 0, undo.pop_all(),
                    (offer.control_ref, *offer.ring_refs), channel.port)
    return link
