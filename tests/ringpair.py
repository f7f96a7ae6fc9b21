"""Links on anonymous shared memory in one process, for ring and hostile-peer tests.

``RingPair``: two RingLinks attached to the same memory.  The rings, pumps and framing are
exactly those of a real link; only the memory and the event channel (a pair of eventfds) come
from here instead of a backend.  Tests also poke the shared memory through ``control`` and
``rings``.

``FakePeer``: one RingLink, and the test itself as its peer, writing frames and indices into
the shared memory by hand (a hostile or a scripted peer).

A sanitizer build of the core (tests/test_ring_sanitizers.py) starts indices at
``INDEX_BASE``, just below 2^32, so that every test crosses the 32-bit wrap; both helpers
start the shared indices there.
"""

from __future__ import annotations

import mmap
import os
import select
import socket
import struct
import time
from dataclasses import dataclass

from xsockd import ring
from xsockd.ring import PAGE_SIZE, EventType, RingEvent, RingLink, Role

INDEX_BASE = getattr(ring.lib, "XSK_TEST_INDEX_BASE", 0)
RING_OFF = (64, 192)  # control-page offset of ring 0's and ring 1's indices
EARLY_OFF = 8  # control-page offset of early[0] (the initiator's), early[1] follows
PROD, PROD_WANTS, CONS, CONS_WANTS = 0, 4, 64, 68
FRAME = struct.Struct("<IHHII")  # stream, type, flags, len, arg


@dataclass
class FakeChannel:
    fd: int
    notify_fd: int
    port: int = 1
    kind: str = "eventfd"


@dataclass
class Stream:
    app: socket.socket  # the application on A's side
    svc: socket.socket  # the service on B's side
    id: int
    a_serial: int
    b_serial: int


def _shared(ring_size: int) -> tuple[mmap.mmap, mmap.mmap]:
    control = mmap.mmap(-1, PAGE_SIZE)
    for base in RING_OFF:
        struct.pack_into("<I", control, base + PROD, INDEX_BASE)
        struct.pack_into("<I", control, base + CONS, INDEX_BASE)
    return control, mmap.mmap(-1, 2 * ring_size)


class _Events:
    def __init__(self) -> None:
        self.pending: dict[RingLink, list[RingEvent]] = {}

    def wait_event(self, link: RingLink, etype: EventType, timeout: float = 5.0) -> RingEvent:
        """Returns the first event of ``etype`` on ``link``, keeping the others for later."""
        pending = self.pending.setdefault(link, [])
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(pending):
                if ev.type == etype:
                    return pending.pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {etype.name} event within {timeout}s: {pending}")
            select.select([link.fileno()], [], [], left)
            pending.extend(link.events())

    def drain(self, link: RingLink) -> list[RingEvent]:
        """Returns every event kept or queued on ``link``, without waiting."""
        out = self.pending.setdefault(link, []) + link.events()
        self.pending[link] = []
        return out


class RingPair(_Events):
    def __init__(self, ring_size: int = 4096, window: int = 65536, max_streams: int = 64) -> None:
        super().__init__()
        self.ring_size = ring_size
        self.control, self.rings = _shared(ring_size)
        self._efds = [os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)]
        self.a = RingLink(control=self.control, rings=self.rings, ring_size=ring_size,
                          role=Role.INITIATOR, evtchn=FakeChannel(self._efds[0], self._efds[1]),
                          window=window, max_streams=max_streams)
        self.b = RingLink(control=self.control, rings=self.rings, ring_size=ring_size,
                          role=Role.ACCEPTOR, evtchn=FakeChannel(self._efds[1], self._efds[0]),
                          window=window, max_streams=max_streams)
        self.a.start()
        self.b.start()

    def open_stream(self, service: str = "svc") -> Stream:
        """Opens a stream from A, accepted by B."""
        app, a_end = socket.socketpair()
        svc, b_end = socket.socketpair()
        sid, a_serial = self.a.open_stream(a_end, service)
        req = self.wait_event(self.b, EventType.OPEN_REQUEST)
        assert req.stream == sid and req.name == service
        assert self.b.accept_stream(sid, req.serial, b_end)
        opened = self.wait_event(self.a, EventType.OPENED)
        assert (opened.stream, opened.serial) == (sid, a_serial)
        return Stream(app, svc, sid, a_serial, req.serial)

    def open(self, service: str = "svc") -> tuple[socket.socket, socket.socket, int]:
        """Returns (app socket on A's side, service socket on B's side, stream id)."""
        s = self.open_stream(service)
        return s.app, s.svc, s.id

    def close(self) -> None:
        self.a.close()
        self.b.close()
        for fd in self._efds:
            os.close(fd)
        self.control.close()
        self.rings.close()


class FakePeer(_Events):
    """A real RingLink (``link``, in ``role``) whose peer is the test, writing raw memory.

    The test's tx ring is the link's rx ring and the other way round.  ``put`` writes frames
    at the test's private prod without publishing; ``publish`` stores prod and notifies.
    """

    def __init__(self, ring_size: int = 4096, window: int = 65536, max_streams: int = 64,
                 role: Role = Role.ACCEPTOR, early: int = 0) -> None:
        """``early``: the early credit the test advertises (DATA it takes before its ACCEPT)."""
        super().__init__()
        self.ring_size = ring_size
        self.mask = ring_size - 1
        self.control, self.rings = _shared(ring_size)
        self._efds = [os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)]
        self.role = role
        peer_role = Role(1 - role)
        # Ring 0 carries initiator -> acceptor: the test writes ring 0 if it is the initiator.
        self.tx_ring = 0 if peer_role == Role.INITIATOR else 1
        self.tx_idx = RING_OFF[self.tx_ring]
        self.rx_idx = RING_OFF[1 - self.tx_ring]
        self.tx_data = self.tx_ring * ring_size
        self.rx_data = (1 - self.tx_ring) * ring_size
        self.prod = self.cons = INDEX_BASE
        struct.pack_into("<I", self.control, EARLY_OFF + 4 * int(peer_role), early)
        self.control[int(peer_role)] = 1  # the test is attached (its early credit first)
        self.link = RingLink(control=self.control, rings=self.rings, ring_size=ring_size,
                             role=role, evtchn=FakeChannel(self._efds[0], self._efds[1]),
                             window=window, max_streams=max_streams)
        self.link.start()

    def u32(self, off: int) -> int:
        return struct.unpack_from("<I", self.control, off)[0]

    def set_u32(self, off: int, value: int) -> None:
        struct.pack_into("<I", self.control, off, value & 0xFFFFFFFF)

    def free(self) -> int:
        """Bytes the test may still write into its tx ring."""
        return self.ring_size - ((self.prod - self.u32(self.tx_idx + CONS)) & 0xFFFFFFFF)

    def put(self, stream: int, ftype: int, arg: int = 0, payload: bytes = b"",
            length: int | None = None, flags: int = 0) -> None:
        """Writes one frame (header ``length`` defaults to the payload's) at prod, wrapping the
        payload at the ring's end, and advances prod past its padding.  Not published."""
        n = len(payload) if length is None else length
        hdr = FRAME.pack(stream & 0xFFFFFFFF, ftype & 0xFFFF, flags & 0xFFFF, n & 0xFFFFFFFF,
                         arg & 0xFFFFFFFF)
        self.write_at(self.prod, hdr + payload)
        self.prod = (self.prod + 16 + ((len(payload) + 15) & ~15)) & 0xFFFFFFFF

    def write_at(self, index: int, data: bytes) -> None:
        off = index & self.mask
        first = min(len(data), self.ring_size - off)
        self.rings[self.tx_data + off:self.tx_data + off + first] = data[:first]
        rest = data[first:first + self.ring_size]
        self.rings[self.tx_data:self.tx_data + len(rest)] = rest

    def publish(self, prod: int | None = None) -> None:
        """Stores prod (ours, or a forged one) and notifies the link."""
        self.set_u32(self.tx_idx + PROD, self.prod if prod is None else prod)
        self.notify()

    def notify(self) -> None:
        os.eventfd_write(self._efds[0], 1)

    def signals(self) -> int:
        """How many times the link signalled the test since the last call (0 if not)."""
        try:
            return os.eventfd_read(self._efds[1])
        except BlockingIOError:
            return 0

    def frames(self, consume: bool = True) -> list[tuple[int, int, int, int, bytes]]:
        """Returns the frames the link published since our last call: (stream, type, len,
        arg, payload), and marks them consumed (unless ``consume`` is False)."""
        return [(st, ft, n, arg, data) for st, ft, _, n, arg, data in self.flagged_frames(consume)]

    def flagged_frames(self, consume: bool = True) -> list[tuple[int, int, int, int, int, bytes]]:
        """As ``frames``, with each header's flags: (stream, type, flags, len, arg, payload)."""
        out = []
        prod = self.u32(self.rx_idx + PROD)
        idx = self.cons
        while idx != prod:
            off = idx & self.mask
            stream, ftype, flags, n, arg = FRAME.unpack_from(self.rings, self.rx_data + off)
            data = bytearray()
            p = (off + 16) & self.mask
            while len(data) < n:
                take = min(n - len(data), self.ring_size - p)
                data += self.rings[self.rx_data + p:self.rx_data + p + take]
                p = (p + take) & self.mask
            out.append((stream, ftype, flags, n, arg, bytes(data)))
            idx = (idx + 16 + ((n + 15) & ~15)) & 0xFFFFFFFF
        if consume:
            self.cons = idx
            self.set_u32(self.rx_idx + CONS, idx)
            self.notify()
        return out

    def close(self) -> None:
        self.link.close()
        for fd in self._efds:
            os.close(fd)
        self.control.close()
        self.rings.close()
