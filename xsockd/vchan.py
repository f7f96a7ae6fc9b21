"""Python face of the libxenvchan endpoint in the C core (``vchan_core.c``).

A vchan is one byte stream each way between a server, which owns and grants the shared page
(and, for rings of order 12 or more, the ring pages), and a client, which maps them; the
layout is Xen's libxenvchan, so the peer may be any libxenvchan program (docs/VCHAN.md).
This module gives the page layout rules and one endpoint on memory the caller mapped; it
knows nothing of grants, event channels or XenStore (the backend's and control plane's).

Lifecycle of a ``VchanEndpoint``: attached -> closed (``close``: our live byte cleared).
Every ``-errno`` from C becomes an OSError in ``_check``: ``BrokenPipeError`` once the peer
is gone (for a read: after every byte it wrote was read, i.e. end of stream), ``OSError``
with ``errno.EPROTO`` once the peer broke the protocol (the endpoint stays broken).
A call that moved bytes may owe the peer a notification: ``take_notify`` says so once.

The limits are defined once, in vchan_core.h, and exported here.
"""

from __future__ import annotations

import enum
import errno
import os
import socket
import warnings
from dataclasses import dataclass
from typing import Any

from xsockd._ring_core import ffi, lib  # type: ignore[import-not-found]

__all__ = [
    "MAX_ORDER",
    "MIN_ORDER",
    "PAGE_ORDER",
    "End",
    "Layout",
    "Live",
    "PumpResult",
    "Role",
    "StreamTotals",
    "VchanEndpoint",
    "VchanHeld",
    "VchanPump",
    "client_probe",
    "layout",
    "server_init",
    "split_rings",
]

MIN_ORDER = lib.XSK_VCHAN_MIN_ORDER
MAX_ORDER = lib.XSK_VCHAN_MAX_ORDER
PAGE_ORDER = lib.XSK_VCHAN_PAGE_ORDER
_PAGE = 1 << PAGE_ORDER
# A grant list cannot be longer than the page holds (it is shorter still: see layout()).
_MAX_GRANTS = (_PAGE - lib.XSK_VCHAN_OFF_GRANTS) // 4


class Role(enum.IntEnum):
    CLIENT = lib.XSK_VCHAN_CLIENT
    SERVER = lib.XSK_VCHAN_SERVER


class Live(enum.IntEnum):
    """A live byte: the peer's state as it (or its unmap notification) last wrote it."""

    GONE = lib.XSK_VCHAN_GONE
    CONNECTED = lib.XSK_VCHAN_CONNECTED
    WAITING = lib.XSK_VCHAN_WAITING


class End(enum.IntEnum):
    """Why a pump ended (docs/VCHAN.md: vchan has no half-close)."""

    PEER = lib.XSK_VCHAN_END_PEER  # the peer left; all it wrote reached the socket
    LOCAL = lib.XSK_VCHAN_END_LOCAL  # the socket's EOF; the peer consumed all we wrote
    LINGER = lib.XSK_VCHAN_END_LINGER  # the socket's EOF; the peer did not consume in time
    PROTO = lib.XSK_VCHAN_END_PROTO  # the peer broke the protocol
    SOCKET = lib.XSK_VCHAN_END_SOCKET  # the socket failed (err: its errno)
    STOPPED = lib.XSK_VCHAN_END_STOPPED  # stop() or close()
    UNDELIVERED = lib.XSK_VCHAN_END_UNDELIVERED  # the peer left; the socket took nothing
    # of what it wrote for linger seconds (its reader waits to write): the rest dropped


@dataclass(frozen=True)
class PumpResult:
    end: End
    err: int  # errno for PROTO and SOCKET, else 0
    bytes_in: int  # from the peer, written to the socket
    bytes_out: int  # from the socket, written into the ring


@dataclass(frozen=True)
class Layout:
    """Where a pair of ring orders puts the rings (left: client to server)."""

    left_order: int
    right_order: int
    left_offset: int  # an in-page ring's offset in the shared page; 0 if it has pages
    right_offset: int
    left_pages: int  # pages (grants) of a ring; 0 if it is in the shared page
    right_pages: int
    grants_end: int  # where the grant list ends in the shared page

    @property
    def grants(self) -> int:
        """Grant references in the shared page: the left ring's, then the right's."""
        return self.left_pages + self.right_pages


def _check(rc: int, what: str) -> int:
    """Returns rc if it is not a -errno; raises the matching OSError otherwise."""
    if rc < 0:
        raise OSError(-rc, f"{what}: {os.strerror(-rc)}")
    return rc


def _layout(c: Any) -> Layout:
    return Layout(c.left_order, c.right_order, c.left_offset, c.right_offset, c.left_pages,
                  c.right_pages, c.grants_end)


def _order(value: int) -> int:
    """Returns value if it fits the C argument; out-of-range orders fail in C as EINVAL."""
    return value if 0 <= value <= 0xFFFFFFFF else 0


def layout(left_order: int, right_order: int) -> Layout:
    """Returns the layout of these ring orders; raises OSError(EINVAL) if libxenvchan forbids
    them (each 10..20, not both in one in-page slot, the grant list fitting its page)."""
    out = ffi.new("struct xsk_vchan_layout *")
    _check(lib.xsk_vchan_layout(_order(left_order), _order(right_order), out),
           f"vchan orders {left_order}/{right_order}")
    return _layout(out)


def server_init(page: Any, left_order: int, right_order: int, grants: list[int]) -> Layout:
    """Writes a fresh server's shared page into ``page`` (a writable page-sized buffer) and
    returns its layout; ``grants`` are the ring pages' references, left ring's first."""
    lay = layout(left_order, right_order)
    if len(grants) != lay.grants or not all(0 <= g <= 0xFFFFFFFF for g in grants):
        raise OSError(errno.EINVAL, f"{len(grants)} grant references for {lay.grants} pages")
    refs = ffi.new("uint32_t[]", grants or [0])
    # with: the buffer export ends here, even on an error (the caller may close its mmap).
    with ffi.from_buffer("uint8_t[]", page, require_writable=True) as buf:
        if len(buf) < _PAGE:
            raise OSError(errno.EINVAL, f"a shared page of {len(buf)} bytes")
        _check(lib.xsk_vchan_server_init(buf, left_order, right_order, refs, len(grants)),
               "vchan server page")
    return lay


def _status(v: Any) -> dict[str, int]:
    """Returns a C endpoint's status (``VchanEndpoint.status``).  Safe beside its pump's
    thread: the core keeps the counters as atomics, the rest is a snapshot."""
    out = ffi.new("struct xsk_vchan_status *")
    lib.xsk_vchan_status(v, out)
    return {k: getattr(out, k) for k in ("bytes_in", "bytes_out", "rx_ready", "tx_space",
                                         "tx_size", "rx_size", "peer_live", "broken")}


def split_rings(lay: Layout, ring_pages: Any) -> tuple[Any, Any]:
    """Returns the left and right rings' memory in ``ring_pages`` (the granted ring pages, the
    left ring's first); None for a ring that lives in the shared page."""
    cut = _PAGE * lay.left_pages
    left = ring_pages[:cut] if lay.left_pages else None
    right = ring_pages[cut:cut + _PAGE * lay.right_pages] if lay.right_pages else None
    return left, right


def client_probe(page: Any) -> tuple[Layout, list[int]]:
    """Returns the layout and grant references a server published in ``page``, each read
    once; raises OSError(EPROTO) if its orders are ones libxenvchan forbids."""
    out = ffi.new("struct xsk_vchan_layout *")
    refs = ffi.new("uint32_t[]", _MAX_GRANTS)
    with ffi.from_buffer("uint8_t[]", page) as buf:
        if len(buf) < _PAGE:
            raise OSError(errno.EINVAL, f"a shared page of {len(buf)} bytes")
        n = _check(lib.xsk_vchan_client_probe(buf, out, refs, _MAX_GRANTS), "vchan server page")
    return _layout(out), [refs[i] for i in range(n)]


class VchanEndpoint:
    """One end (``role``) of a vchan on mapped memory: ``page`` the shared page, ``left`` and
    ``right`` the rings' pages when they have any (else None).  Attaching as the client marks
    it connected: notify the server afterwards (``take_notify`` is then True)."""

    def __init__(self, page: Any, role: Role, lay: Layout, left: Any = None,
                 right: Any = None) -> None:
        # The buffers stay exported until close: C holds pointers into them.
        self._bufs = [ffi.from_buffer("uint8_t[]", page, require_writable=True)]
        self._closed = True  # until attached
        try:
            self._attach(role, lay, left, right)
        except BaseException:
            self._release()
            raise
        self.role = role
        self.layout = lay
        self._notify = role == Role.CLIENT
        self._pump: VchanPump | None = None
        self._closed = False
        self._rbuf: Any = None  # read()'s buffer, made at its first call: a pumped endpoint
        # never reads through Python, and a ring may be 1 MiB

    def _attach(self, role: Role, lay: Layout, left: Any, right: Any) -> None:
        params = ffi.new("struct xsk_vchan_params *")
        params.page = self._bufs[0]
        for name, mem, pages in (("left", left, lay.left_pages), ("right", right, lay.right_pages)):
            if (mem is None) != (pages == 0):
                raise OSError(errno.EINVAL, f"the {name} ring's pages are given exactly when "
                                            "it has pages")
            if mem is not None:
                self._bufs.append(ffi.from_buffer("uint8_t[]", mem, require_writable=True))
                if len(self._bufs[-1]) < pages * _PAGE:
                    raise OSError(errno.EINVAL, f"the {name} ring's memory: "
                                                f"{len(self._bufs[-1])} bytes")
                setattr(params, name, self._bufs[-1])
        if len(self._bufs[0]) < _PAGE:
            raise OSError(errno.EINVAL, f"a shared page of {len(self._bufs[0])} bytes")
        params.role = role
        params.left_order = lay.left_order
        params.right_order = lay.right_order
        out = ffi.new("struct xsk_vchan **")
        _check(lib.xsk_vchan_attach(params, out), f"vchan {role.name.lower()}")
        self._v: Any = ffi.gc(out[0], lib.xsk_vchan_free)

    def _release(self) -> None:
        """Ends the buffer exports, so that the caller may unmap its memory."""
        for buf in self._bufs:
            ffi.release(buf)
        self._bufs.clear()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "attached"
        return (f"<VchanEndpoint {self.role.name.lower()} {state} "
                f"orders {self.layout.left_order}/{self.layout.right_order}>")

    def _handle(self) -> Any:
        """Returns the C endpoint; OSError(ESHUTDOWN) once closed (it is freed then), EBUSY
        while a pump drives it."""
        if self._closed:
            raise OSError(errno.ESHUTDOWN, f"{self!r}: {os.strerror(errno.ESHUTDOWN)}")
        if self._pump is not None and self._pump.result() is None:
            raise OSError(errno.EBUSY, f"{self!r}: a pump drives it")
        return self._v

    def take_notify(self) -> bool:
        """Returns True once if a call since the last one owes the peer a notification."""
        due, self._notify = self._notify, False
        return due

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Returns how many bytes of ``data`` went into the ring (0: it is full)."""
        flag = ffi.new("int *")
        with ffi.from_buffer(data) as src:
            n = _check(lib.xsk_vchan_write(self._handle(), src, min(len(src), 0x7FFFFFFF), flag),
                       "vchan write")
        self._notify |= bool(flag[0])
        return n

    def read(self, limit: int) -> bytes:
        """Returns up to ``limit`` bytes from the ring (b"": none yet); BrokenPipeError at the
        end of the stream (the peer gone and everything it wrote read)."""
        flag = ffi.new("int *")
        if self._rbuf is None:
            self._rbuf = ffi.new("uint8_t[]", 1 << max(self.layout.left_order,
                                                        self.layout.right_order))
        want = max(0, min(limit, len(self._rbuf)))
        n = _check(lib.xsk_vchan_read(self._handle(), self._rbuf, want, flag), "vchan read")
        self._notify |= bool(flag[0])
        return bytes(ffi.buffer(self._rbuf, n))

    def arm(self, *, for_data: bool = False, for_space: bool = False) -> bool:
        """Returns True if there is something to do now (data, space, or the peer gone);
        False after asking the peer to notify us when there is."""
        return bool(_check(lib.xsk_vchan_arm(self._handle(), int(for_data), int(for_space)),
                           "vchan arm"))

    def peer_live(self) -> Live:
        """Returns the peer's state; OSError(EPROTO) for a value the protocol lacks."""
        return Live(_check(lib.xsk_vchan_peer_live(self._handle()), "vchan peer"))

    def status(self) -> dict[str, int]:
        """Returns counters and ring fill: bytes_in/out, rx_ready, tx_space, sizes, peer_live
        (a -errno if invalid), broken (0 or the -errno that ended the endpoint)."""
        return _status(self._handle())

    def close(self) -> bool:
        """Marks us gone in the shared page; returns True if the peer must be notified (the
        first time).  The shared memory may be unmapped afterwards."""
        if self._closed:
            return False
        if self._pump is not None:
            self._pump.close()  # it must not outlive the endpoint it drives
        self._closed = True
        due = bool(lib.xsk_vchan_close(self._v))
        ffi.release(self._v)
        self._release()
        return due


class VchanPump:
    """Splices ``sock`` (a local stream socket; the pump owns it from now on) into
    ``endpoint`` with a C thread, the GIL released, until either side ends (``End``).

    ``evtchn`` is a ``backend.EventChannel`` bound to the vchan's peer.  ``linger``: seconds
    the peer may take, after the socket's EOF, to consume what we wrote before we leave; and,
    once the peer left, seconds the socket may take nothing of what it wrote.
    While the pump runs, the endpoint refuses calls (EBUSY); once it ended, the endpoint is
    closed (our live byte cleared, the peer notified) and the socket closed.

    Lifecycle: running -> ended (``fileno`` readable, ``result`` set) -> closed (``close``).
    """

    def __init__(self, endpoint: VchanEndpoint, sock: socket.socket, evtchn: Any,
                 linger: float = 5.0) -> None:
        self._p: Any = ffi.NULL
        if not 0 <= linger <= 3600:
            sock.close()
            raise OSError(errno.EINVAL, f"linger {linger}: 0 .. 3600 seconds")
        try:
            if endpoint._pump is not None:
                raise OSError(errno.EBUSY, f"{endpoint!r}: it had a pump already")
            handle = endpoint._handle()
        except OSError:
            sock.close()
            raise
        params = ffi.new("struct xsk_vchan_pump_params *")
        params.vchan = handle
        if evtchn.kind == "eventfd":
            params.evtchn_kind = lib.XSK_EVTCHN_EVENTFD
            params.evtchn_notify_fd = evtchn.notify_fd
        else:
            params.evtchn_kind = lib.XSK_EVTCHN_XEN
            params.evtchn_notify_fd = -1
        params.evtchn_fd = evtchn.fd
        params.evtchn_port = evtchn.port
        params.linger_ms = round(linger * 1000)
        params.fd = sock.detach()
        out = ffi.new("struct xsk_vchan_pump **")
        _check(lib.xsk_vchan_pump_start(params, out), "starting the vchan pump")
        self._p = out[0]
        self._endpoint = endpoint
        self._result: PumpResult | None = None
        endpoint._pump = self

    def __repr__(self) -> str:
        state = "closed" if self._p == ffi.NULL else "ended" if self.result() else "running"
        return f"<VchanPump {self._endpoint.role.name.lower()} {state}>"

    def fileno(self) -> int:
        """Returns the eventfd that becomes readable once the pump has ended."""
        if self._p == ffi.NULL:
            raise OSError(errno.EBADF, "the vchan pump is closed")
        return int(lib.xsk_vchan_pump_event_fd(self._p))

    def result(self) -> PumpResult | None:
        """Returns how the pump ended, or None while it runs."""
        if self._result is None and self._p != ffi.NULL:
            out = ffi.new("struct xsk_vchan_pump_result *")
            if lib.xsk_vchan_pump_result(self._p, out) == 0:
                self._result = PumpResult(End(out.reason), out.err, out.bytes_in,
                                          out.bytes_out)
        return self._result

    def status(self) -> dict[str, int]:
        """Returns the endpoint's status (``VchanEndpoint.status``) while the pump drives it,
        without stopping it: byte counts for the faces, ring fill for a drain."""
        if self._p == ffi.NULL:
            raise OSError(errno.EBADF, "the vchan pump is closed")
        return _status(self._endpoint._v)

    def stop(self) -> PumpResult:
        """Returns how the pump ended, ending it (STOPPED) if it still runs; blocks until its
        thread is gone."""
        if self._p == ffi.NULL:
            raise OSError(errno.EBADF, "the vchan pump is closed")
        lib.xsk_vchan_pump_stop(self._p)
        result = self.result()
        assert result is not None  # the thread is joined: the result is written
        return result

    def close(self) -> None:
        """Stops the pump and frees it.  Idempotent."""
        if self._p != ffi.NULL:
            self.stop()
            lib.xsk_vchan_pump_free(self._p)
            self._p = ffi.NULL

    def __del__(self) -> None:
        if getattr(self, "_p", ffi.NULL) != ffi.NULL:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)
            self.close()


class VchanHeld:
    """One vchan's resources, either role: the port, the shared page, the ring pages, the
    endpoint and its pump, set by the role as it acquires them and closed in reverse."""

    def __init__(self) -> None:
        self.evtchn: Any = None  # the backend's EventChannel
        self.shared: Any = None  # the shared page: the backend's granted or mapped pages
        self.rings: Any = None  # the ring pages, the left ring's first (None: all in-page)
        self.endpoint: VchanEndpoint | None = None
        self.pump: VchanPump | None = None

    def counts(self) -> tuple[int, int]:
        """Returns the bytes (in, out) of this vchan's stream so far; (0, 0) before one."""
        if self.pump is None:
            return 0, 0
        result = self.pump.result()
        if result is not None:
            return result.bytes_in, result.bytes_out
        st = self.pump.status()
        return st["bytes_in"], st["bytes_out"]

    def in_flight(self) -> int:
        """Returns the bytes of a running stream still on their way: written into our ring
        and not yet consumed by the peer, or in the peer's ring and not yet given to our
        socket (what a drain waits for); 0 with no stream running."""
        if self.pump is None or self.pump.result() is not None:
            return 0
        st = self.pump.status()
        if st["broken"]:
            return 0
        return st["rx_ready"] + st["tx_size"] - st["tx_space"]

    def close(self) -> None:
        if self.pump is not None:
            self.pump.close()
        # The endpoint's last word (our live byte cleared) reaches the peer before the port goes.
        if self.endpoint is not None and self.endpoint.close() and self.evtchn is not None:
            self.evtchn.notify()
        for res in (self.rings, self.shared, self.evtchn):
            if res is not None:
                res.close()
        self.pump = self.endpoint = self.rings = self.shared = self.evtchn = None


class StreamTotals:
    """The bytes of a vchan's streams since the daemon started: the ended ones' plus the
    running one's (for the faces' listing)."""

    def __init__(self) -> None:
        self.bytes_in = 0
        self.bytes_out = 0

    def ended(self, held: VchanHeld) -> None:
        """Adds the stream of ``held``, about to be closed."""
        i, o = held.counts()
        self.bytes_in += i
        self.bytes_out += o

    def now(self, held: VchanHeld | None) -> tuple[int, int]:
        """Returns the totals with the running stream of ``held`` (if any) included."""
        i, o = held.counts() if held is not None else (0, 0)
        return self.bytes_in + i, self.bytes_out + o
