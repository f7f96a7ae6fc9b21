"""One link to one peer domain: its shared pages, event channel and ring pump, with undo.

``grant_link`` (we initiate: grant pages, allocate a port) and ``map_link`` (we accept: map
the peer's pages, bind its port) return a ``Link`` whose ``close()`` undoes everything, in
reverse order; a failure half-way undoes what was done.  The XenStore side of setting a link
up is ``rendezvous``'s; its clean-up joins the link's undo through ``Link.on_close``.

Lifecycle of a Link: attached -> up (peer seen live) -> closed.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import Callable

from xsockd.backend import Backend, EventChannel, UnmapNotify
from xsockd.ring import LIVE_OFFSET, RingLink, Role, link_pages

__all__ = ["Link", "grant_link", "map_link"]

log = logging.getLogger(__name__)


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
        self._undo: contextlib.ExitStack | None = undo

    def __repr__(self) -> str:
        state = "closed" if self._undo is None else ("up" if self.up else "attaching")
        return (f"<Link peer={self.peer} {self.role.name.lower()} gen={self.generation} "
                f"ring={self.ring.ring_size} {state}>")

    @property
    def closed(self) -> bool:
        return self._undo is None

    def on_close(self, callback: Callable[[], object]) -> None:
        """Runs ``callback`` when the link closes, before what was set up earlier is undone."""
        if self._undo is None:
            callback()
        else:
            self._undo.callback(_logged(callback))

    def close(self, goodbye: bool = False) -> None:
        """Stops the pump and releases XenStore nodes, pages and port, in reverse order."""
        if self._undo is None:
            return
        undo, self._undo = self._undo, None
        self.ring.stop(goodbye)
        undo.close()


def _logged(callback: Callable[[], object]) -> Callable[[], None]:
    """Wraps a clean-up step so that its failure is logged and the next steps still run."""
    def run() -> None:
        try:
            callback()
        except Exception as e:  # one failed clean-up must not skip the others
            log.warning("releasing a link: %s", e)
    return run


def _ring(control: object, rings: object, ring_size: int, role: Role, channel: EventChannel,
          window: int, max_streams: int) -> RingLink:
    return RingLink(control=control, rings=rings, ring_size=ring_size, role=role,
                    evtchn=channel, window=window, max_streams=max_streams)


def grant_link(backend: Backend, peer: int, *, ring_size: int, window: int,
               max_streams: int) -> Link:
    """Returns a new link that we initiate: port allocated, pages granted, pump not started.

    ``start()`` the ring once the offer is published.  Raises BackendError with everything
    undone.
    """
    generation = secrets.randbits(62) + 1
    undo = contextlib.ExitStack()
    with undo:
        channel = backend.alloc_unbound(peer)
        undo.callback(channel.close)
        control = backend.grant(peer, 1, UnmapNotify(LIVE_OFFSET + int(Role.INITIATOR),
                                                     channel.port))
        undo.callback(control.close)
        rings = backend.grant(peer, link_pages(ring_size) - 1)
        undo.callback(rings.close)
        ring = _ring(control.buffer, rings.buffer, ring_size, Role.INITIATOR, channel, window,
                     max_streams)
        undo.callback(ring.close)
        link = Link(peer, Role.INITIATOR, ring, generation, 1 + len(rings.refs), undo.pop_all(),
                    control.refs + rings.refs, channel.port)
    return link


def map_link(backend: Backend, peer: int, *, generation: int, ring_size: int, control_ref: int,
             ring_refs: tuple[int, ...], port: int, window: int, max_streams: int) -> Link:
    """Returns a link attached to ``peer``'s validated offer, pump not started.

    Raises BackendError if the refs are not granted to us or the port cannot be bound, with
    everything undone.
    """
    undo = contextlib.ExitStack()
    with undo:
        channel = backend.bind_interdomain(peer, port)
        undo.callback(channel.close)
        control = backend.map(peer, [control_ref],
                              UnmapNotify(LIVE_OFFSET + int(Role.ACCEPTOR), channel.port))
        undo.callback(control.close)
        rings = backend.map(peer, ring_refs)
        undo.callback(rings.close)
        ring = _ring(control.buffer, rings.buffer, ring_size, Role.ACCEPTOR, channel, window,
                     max_streams)
        undo.callback(ring.close)
        link = Link(peer, Role.ACCEPTOR, ring, generation, 0, undo.pop_all(),
                    (control_ref, *ring_refs), channel.port)
    return link
