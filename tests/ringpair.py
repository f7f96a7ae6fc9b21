"""Two RingLinks attached to the same anonymous shared memory in one process.

The rings, pumps and framing are exactly those of a real link; only the memory and the event
channel (a pair of eventfds) come from here instead of a backend.  Used by ring and hostile-peer
tests, which also poke the shared memory directly through ``control`` and ``rings``.
"""

from __future__ import annotations

import mmap
import os
import select
import socket
import time
from dataclasses import dataclass

from xsockd.ring import PAGE_SIZE, EventType, RingEvent, RingLink, Role


@dataclass
class FakeChannel:
    fd: int
    notify_fd: int
    port: int = 1
    kind: str = "eventfd"


class RingPair:
    def __init__(self, ring_size: int = 4096, window: int = 65536, max_streams: int = 64) -> None:
        self.ring_size = ring_size
        self.control = mmap.mmap(-1, PAGE_SIZE)
        self.rings = mmap.mmap(-1, 2 * ring_size)
        self._efds = [os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)]
        self.a = RingLink(control=self.control, rings=self.rings, ring_size=ring_size,
                          role=Role.INITIATOR, evtchn=FakeChannel(self._efds[0], self._efds[1]),
                          window=window, max_streams=max_streams)
        self.b = RingLink(control=self.control, rings=self.rings, ring_size=ring_size,
                          role=Role.ACCEPTOR, evtchn=FakeChannel(self._efds[1], self._efds[0]),
                          window=window, max_streams=max_streams)
        self.a.start()
        self.b.start()
        self.pending: dict[RingLink, list[RingEvent]] = {self.a: [], self.b: []}

    def wait_event(self, link: RingLink, etype: EventType, timeout: float = 5.0) -> RingEvent:
        """Returns the first event of ``etype`` on ``link``, keeping the others for later."""
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.pending[link]):
                if ev.type == etype:
                    return self.pending[link].pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {etype.name} event within {timeout}s: "
                                   f"{self.pending[link]}")
            select.select([link.fileno()], [], [], left)
            self.pending[link].extend(link.events())

    def open(self, service: str = "svc") -> tuple[socket.socket, socket.socket, int]:
        """Returns (app socket on A's side, service socket on B's side, stream id)."""
        app, a_end = socket.socketpair()
        svc, b_end = socket.socketpair()
        sid = self.a.open_stream(a_end, service)
        req = self.wait_event(self.b, EventType.OPEN_REQUEST)
        assert req.stream == sid and req.name == service
        self.b.accept_stream(sid, b_end)
        self.wait_event(self.a, EventType.OPENED)
        return app, svc, sid

    def close(self) -> None:
        self.a.close()
        self.b.close()
        for fd in self._efds:
            os.close(fd)
        self.control.close()
        self.rings.close()
