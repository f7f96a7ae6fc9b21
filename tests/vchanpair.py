"""Vchans on anonymous memory in one process, for the vchan endpoint's tests.

``VchanPair``: a server and a client ``VchanEndpoint`` on the same memory: the shared page and
whatever ring pages the orders need, as a libxenvchan server would grant them.  Only the
memory (no grants, event channels or XenStore) comes from here; tests poke the shared page
through ``u32``/``set_u32``/``u8``/``set_u8`` at the offsets of vchan_core.h.

A sanitizer build of the core (tests/test_ring_sanitizers.py) starts a server's indices at
``INDEX_BASE``, just below 2^32, so that every test crosses the 32-bit wrap.
"""

from __future__ import annotations

import mmap
import struct

from xsockd import vchan
from xsockd.vchan import Layout, Role, VchanEndpoint

lib = vchan.lib
INDEX_BASE = getattr(lib, "XSK_TEST_INDEX_BASE", 0)
PAGE = 4096
LEFT_CONS, LEFT_PROD = lib.XSK_VCHAN_OFF_LEFT_CONS, lib.XSK_VCHAN_OFF_LEFT_PROD
RIGHT_CONS, RIGHT_PROD = lib.XSK_VCHAN_OFF_RIGHT_CONS, lib.XSK_VCHAN_OFF_RIGHT_PROD
LEFT_ORDER, RIGHT_ORDER = lib.XSK_VCHAN_OFF_LEFT_ORDER, lib.XSK_VCHAN_OFF_RIGHT_ORDER
CLI_LIVE, SRV_LIVE = lib.XSK_VCHAN_OFF_CLI_LIVE, lib.XSK_VCHAN_OFF_SRV_LIVE
CLI_NOTIFY, SRV_NOTIFY = lib.XSK_VCHAN_OFF_CLI_NOTIFY, lib.XSK_VCHAN_OFF_SRV_NOTIFY
GRANTS = lib.XSK_VCHAN_OFF_GRANTS


def fake_grants(lay: Layout) -> list[int]:
    """Grant references a server might hand out: distinct, recognisable numbers."""
    return [0x1000 + i for i in range(lay.grants)]


class VchanPair:
    def __init__(self, left_order: int = 10, right_order: int = 11, *,
                 attach_client: bool = True) -> None:
        self.page = mmap.mmap(-1, PAGE)
        lay = vchan.layout(left_order, right_order)
        # Ring pages exist only for orders of a page or more, as the server grants them.
        self.left = mmap.mmap(-1, lay.left_pages * PAGE) if lay.left_pages else None
        self.right = mmap.mmap(-1, lay.right_pages * PAGE) if lay.right_pages else None
        self.layout = vchan.server_init(self.page, left_order, right_order, fake_grants(lay))
        self.server = VchanEndpoint(self.page, Role.SERVER, self.layout, self.left, self.right)
        self.client: VchanEndpoint | None = None
        if attach_client:
            self.attach_client()

    def attach_client(self) -> VchanEndpoint:
        """Attaches a client the way a libxenvchan client does: probe the page, map, attach."""
        lay, grants = vchan.client_probe(self.page)
        assert grants == fake_grants(lay)
        self.client = VchanEndpoint(self.page, Role.CLIENT, lay, self.left, self.right)
        return self.client

    def u32(self, off: int) -> int:
        return struct.unpack_from("<I", self.page, off)[0]

    def set_u32(self, off: int, value: int) -> None:
        struct.pack_into("<I", self.page, off, value & 0xFFFFFFFF)

    def u8(self, off: int) -> int:
        return self.page[off]

    def set_u8(self, off: int, value: int) -> None:
        self.page[off] = value & 0xFF

    def close(self) -> None:
        for end in (self.client, self.server):
            if end is not None:
                end.close()
        for mem in (self.page, self.left, self.right):
            if mem is not None:
                mem.close()


def pump(src: VchanEndpoint, dst: VchanEndpoint, data: bytes, chunks: list[int]) -> bytes:
    """Moves ``data`` from src to dst in writes and reads of the sizes ``chunks`` cycles
    through; returns what dst read."""
    got = bytearray()
    sent = i = 0
    while len(got) < len(data):
        step = chunks[i % len(chunks)]
        i += 1
        if sent < len(data):
            sent += src.write(data[sent:sent + step])
        got += dst.read(step)
    return bytes(got)
