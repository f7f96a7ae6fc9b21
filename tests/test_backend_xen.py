"""The xen backend's event channels without Xen: libxenevtchn replaced by a stand-in whose
handle's fd is a pipe and whose pending() reads it, as the real one reads /dev/xen/evtchn."""

from __future__ import annotations

import os
import struct
import threading

from xsockd.backend_xen import XenBackend


class FakeEvtchn:
    """The calls XenBackend makes of libxenevtchn, on a pipe per handle."""

    def __init__(self) -> None:
        self.pipes: list[tuple[int, int]] = []

    def xenevtchn_open(self, logger: object, flags: int) -> int:
        self.pipes.append(os.pipe())  # blocking, as the real device is opened
        return len(self.pipes) - 1

    def xenevtchn_fd(self, handle: int) -> int:
        return self.pipes[handle][0]

    def xenevtchn_bind_unbound_port(self, handle: int, peer: int) -> int:
        return 7

    def xenevtchn_pending(self, handle: int) -> int:
        try:
            return int(struct.unpack("<I", os.read(self.pipes[handle][0], 4))[0])
        except BlockingIOError:
            return -1

    def xenevtchn_unmask(self, handle: int, port: int) -> int:
        return 0

    def xenevtchn_unbind(self, handle: int, port: int) -> int:
        return 0

    def xenevtchn_close(self, handle: int) -> int:
        for fd in self.pipes[handle]:
            os.close(fd)
        return 0


def backend_with(evt: FakeEvtchn) -> XenBackend:
    backend = XenBackend.__new__(XenBackend)  # no /dev/xen here: only the channel code
    backend._evt = evt
    return backend


def test_clear_with_nothing_pending_returns_at_once() -> None:
    """Found on real Xen: the vchan server's once-a-second clear() blocked in read() on the
    channel's handle and stopped the daemon's whole loop."""
    evt = FakeEvtchn()
    channel = backend_with(evt).alloc_unbound(1)
    try:
        done = threading.Event()
        t = threading.Thread(target=lambda: (channel.clear(), done.set()), daemon=True)
        t.start()
        assert done.wait(5), "clear() blocked with no notification pending"
        # A pending notification is still consumed.
        os.write(evt.pipes[0][1], struct.pack("<I", 7))
        channel.clear()
        assert evt.xenevtchn_pending(0) == -1
    finally:
        if not done.is_set():  # unblock the stuck thread before closing its pipe
            os.write(evt.pipes[0][1], b"\0\0\0\0")
        channel.close()
