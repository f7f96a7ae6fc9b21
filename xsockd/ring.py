"""Python face of the C ring core (``_ring_core``): one link's pump, commands and events.

This and ``vchan.py`` (the libxenvchan endpoint) are the only modules that import
``_ring_core``.  Calls are few and coarse: attach a link, hand it sockets, collect events, read
statistics.  Every ``-errno`` from C becomes an OSError here, in one place (``_check``).

Lifecycle of a ``RingLink``: created -> running (``start``) -> stopped (``stop``/``close``).

Streams are named by (id, serial): the peer reuses ids, the link never reuses a serial.  Every
stream Python opened or was told of (OPEN_REQUEST) ends with exactly one CLOSED event carrying
its serial; a command for a stream that is gone, or to a stopped link, returns False.

The link's limits are defined once, in ring_core.h, and exported here.
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
    "FRAME_HEADER",
    "LISTEN_RETRY",
    "LIVE_OFFSET",
    "MAX_RING_SIZE",
    "MAX_STREAMS",
    "MAX_WINDOW",
    "MIN_RING_SIZE",
    "MIN_WINDOW",
    "NAME_MAX",
    "PAGE_SIZE",
    "AdmitEntry",
    "EventType",
    "OpenGate",
    "Reason",
    "RingEvent",
    "RingLink",
    "Role",
    "StreamInfo",
    "StreamState",
    "link_pages",
    "valid_service_name",
]

FRAME_HEADER = lib.XSK_FRAME_HDR
LIVE_OFFSET = lib.XSK_OFF_LIVE
NAME_MAX = lib.XSK_NAME_MAX
PAGE_SIZE = lib.XSK_PAGE_SIZE
MIN_RING_SIZE = lib.XSK_MIN_RING_SIZE
MAX_RING_SIZE = lib.XSK_MAX_RING_SIZE
MIN_WINDOW = lib.XSK_MIN_WINDOW
MAX_WINDOW = lib.XSK_MAX_WINDOW
MAX_STREAMS = lib.XSK_MAX_STREAMS
LISTEN_RETRY = lib.XSK_LISTEN_RETRY_MS / 1000  # seconds a pump waits after a failed accept

# Errors that mean "the stream or the link is gone": a command then simply has no effect.
_GONE = (errno.ENOENT, errno.ESHUTDOWN)


class Role(enum.IntEnum):
    INITIATOR = lib.XSK_ROLE_INITIATOR
    ACCEPTOR = lib.XSK_ROLE_ACCEPTOR


class EventType(enum.IntEnum):
    PEER_UP = lib.XSK_EV_PEER_UP
    OPEN_REQUEST = lib.XSK_EV_OPEN_REQUEST
    OPENED = lib.XSK_EV_OPENED
    CLOSED = lib.XSK_EV_CLOSED
    LINK_DOWN = lib.XSK_EV_LINK_DOWN
    ACCEPTED = lib.XSK_EV_ACCEPTED
    LOCAL_OPEN = lib.XSK_EV_LOCAL_OPEN
    LISTEN_FAILED = lib.XSK_EV_LISTEN_FAILED


class StreamState(enum.IntEnum):
    """A stream's state in the data plane (``StreamInfo.state``)."""

    OPENING = lib.XSK_ST_OPENING
    ACCEPTING = lib.XSK_ST_ACCEPTING
    OPEN = lib.XSK_ST_OPEN
    HALF = lib.XSK_ST_HALF
    ZOMBIE = lib.XSK_ST_ZOMBIE


class Reason(enum.IntEnum):
    """Why a stream ended (RESET reasons on the wire, CLOSED event arguments)."""

    DONE = lib.XSK_R_DONE
    REFUSED = lib.XSK_R_REFUSED
    NO_SERVICE = lib.XSK_R_NO_SERVICE
    TOO_MANY = lib.XSK_R_TOO_MANY
    ABORTED = lib.XSK_R_ABORTED
    CLOSED = lib.XSK_R_CLOSED
    LINK_DOWN = lib.XSK_R_LINK_DOWN


@dataclass(frozen=True)
class RingEvent:
    type: EventType
    stream: int
    serial: int
    arg: int
    bytes_in: int
    bytes_out: int
    name: str


@dataclass(frozen=True)
class StreamInfo:
    id: int
    serial: int
    state: StreamState
    bytes_in: int
    bytes_out: int
    tx_credit: int
    rx_buffered: int


@dataclass(frozen=True)
class AdmitEntry:
    """One service a peer's OPEN may reach without Python: the pump connects ``path`` and
    writes ``header`` (the caller header, or b"") itself.  ``name`` "" is the default."""

    name: str
    path: str
    header: bytes = b""

    def fits(self) -> bool:
        """True if the C table can hold it (a path too long for sun_path is left to Python,
        which reports it)."""
        return (len(os.fsencode(self.path)) < lib.XSK_ADMIT_PATH and
                len(self.header) <= lib.XSK_ADMIT_HEADER and
                (self.name == "" or valid_service_name(self.name)))


class OpenGate:
    """The C core's per-peer budget of stream opens (a token bucket shared by its links).

    The pumps take a token for each open they admit; Python ``charge``s it for each open it
    admits itself, so that both paths together keep to ``rate``.
    """

    def __init__(self, rate: float, burst: float) -> None:
        out = ffi.new("struct xsk_budget **")
        _check(lib.xsk_budget_new(float(rate), float(burst), out), "making an open budget")
        self._ptr = out[0]

    def retune(self, rate: float, burst: float) -> None:
        lib.xsk_budget_set(self._ptr, float(rate), float(burst))

    def charge(self) -> None:
        lib.xsk_budget_charge(self._ptr)

    def tokens(self) -> float:
        return float(lib.xsk_budget_tokens(self._ptr))

    def __del__(self) -> None:
        if getattr(self, "_ptr", ffi.NULL) != ffi.NULL:
            lib.xsk_budget_unref(self._ptr)  # links holding it keep their own reference
            self._ptr = ffi.NULL


def _check(rc: int, what: str) -> int:
    """Returns rc if it is not a -errno; raises the matching OSError otherwise."""
    if rc < 0:
        raise OSError(-rc, f"{what}: {os.strerror(-rc)}")
    return rc


def link_pages(ring_size: int) -> int:
    """Returns how many pages a link with ``ring_size`` bytes per direction shares."""
    if not 0 <= ring_size <= 0xFFFFFFFF:
        raise OSError(errno.EINVAL, f"ring size {ring_size}: {os.strerror(errno.EINVAL)}")
    return _check(lib.xsk_link_pages(ring_size), f"ring size {ring_size}")


def valid_service_name(name: str) -> bool:
    """True if ``name`` is a service name: 1 to NAME_MAX characters of ``[A-Za-z0-9_.-]``."""
    try:
        raw = name.encode("ascii")
    except UnicodeEncodeError:
        return False
    return len(raw) <= NAME_MAX and bool(lib.xsk_valid_service_name(raw, len(raw)))


class RingLink:
    """One attached link: the shared control page, two rings and a pump thread.

    ``control`` is the control page, ``rings`` the 2 * ring_size bytes of ring 0 then ring 1.
    ``evtchn`` is a ``backend.EventChannel``.  The buffers must outlive this object; it keeps
    references to them.
    """

    def __init__(self, *, control: Any, rings: Any, ring_size: int, role: Role, evtchn: Any,
                 window: int, max_streams: int) -> None:
        self._ptr = ffi.NULL
        self._control = ffi.from_buffer(control, require_writable=True)
        self._rings = ffi.from_buffer(rings, require_writable=True)
        if len(self._control) < PAGE_SIZE or len(self._rings) < 2 * ring_size:
            raise ValueError("shared buffers are smaller than the link geometry")
        params = ffi.new("struct xsk_link_params *")
        params.control = self._control
        params.ring0 = self._rings
        params.ring1 = self._rings + ring_size
        params.ring_size = ring_size
        params.role = int(role)
        if evtchn.kind == "eventfd":
            params.evtchn_kind = lib.XSK_EVTCHN_EVENTFD
            params.evtchn_notify_fd = evtchn.notify_fd
        else:
            params.evtchn_kind = lib.XSK_EVTCHN_XEN
            params.evtchn_notify_fd = -1
        params.evtchn_fd = evtchn.fd
        params.evtchn_port = evtchn.port
        params.stream_window = window
        params.max_streams = max_streams
        out = ffi.new("struct xsk_link **")
        _check(lib.xsk_link_new(params, out), "attaching the link")
        self._ptr = out[0]
        self.role = role
        self.ring_size = ring_size
        self._events = ffi.new("struct xsk_event[]", 256)
        self._running = False

    def __repr__(self) -> str:
        state = "closed" if self._ptr == ffi.NULL else ("running" if self._running else "idle")
        return f"<RingLink {self.role.name.lower()} ring={self.ring_size} {state}>"

    def _live(self) -> Any:
        if self._ptr == ffi.NULL:
            raise OSError(errno.EBADF, "the link is closed")
        return self._ptr

    def start(self) -> None:
        """Starts the pump thread; it marks us live and notifies the peer."""
        _check(lib.xsk_link_start(self._live()), "starting the pump")
        self._running = True

    def fileno(self) -> int:
        """Returns the eventfd that is readable when ``events()`` has something."""
        return int(lib.xsk_link_event_fd(self._live()))

    def open_stream(self, sock: socket.socket, service: str) -> tuple[int, int]:
        """Returns (id, serial) of a new stream carrying ``sock``; the link now owns ``sock``.

        A CLOSED event with that serial ends the stream, whatever happens to it.  Raises
        OSError (and closes ``sock``): EINVAL for a bad service name ("" is the default
        service), ESHUTDOWN if the pump has ended, EBADF if the link is closed.
        """
        if self._ptr == ffi.NULL:
            sock.close()
            raise OSError(errno.EBADF, "opening a stream: the link is closed")
        if service and not valid_service_name(service):
            sock.close()
            raise OSError(errno.EINVAL, f"opening a stream: bad service name {service!r}")
        ident = ffi.new("uint32_t *")
        serial = ffi.new("uint64_t *")
        fd = sock.detach()
        _check(lib.xsk_link_open_stream(self._ptr, fd, service.encode(), ident, serial),
               "opening a stream")
        return int(ident[0]), int(serial[0])

    def _command(self, rc: int, what: str) -> bool:
        if -rc in _GONE:
            return False
        _check(rc, what)
        return True

    def accept_stream(self, stream: int, serial: int, sock: socket.socket) -> bool:
        """Accepts the peer's stream (``stream``, ``serial``) onto ``sock``, which the link now
        owns.  Returns False, with ``sock`` closed, if the stream is gone (its CLOSED event is
        queued), the pump has ended or the link is closed; no further event comes of it."""
        if self._ptr == ffi.NULL:
            sock.close()
            return False
        return self._command(lib.xsk_link_accept_stream(self._ptr, stream, serial,
                                                        sock.detach()), "accepting a stream")

    def reject_stream(self, stream: int, serial: int, reason: Reason) -> bool:
        """Answers the peer's stream request with RESET(reason); a CLOSED event follows.
        Returns False (and does nothing) if the stream or the link is gone."""
        if self._ptr == ffi.NULL:
            return False
        return self._command(lib.xsk_link_reject_stream(self._ptr, stream, serial, int(reason)),
                             "rejecting a stream")

    def close_stream(self, stream: int, serial: int) -> bool:
        """Aborts the stream on both sides; a CLOSED event (reason CLOSED) follows.
        Returns False (and does nothing) if the stream or the link is gone."""
        if self._ptr == ffi.NULL:
            return False
        return self._command(lib.xsk_link_close_stream(self._ptr, stream, serial),
                             "closing a stream")

    def events(self) -> list[RingEvent]:
        """Returns the events that have arrived, without blocking ([] once closed)."""
        out: list[RingEvent] = []
        if self._ptr == ffi.NULL:
            return out
        while True:
            n = lib.xsk_link_events(self._ptr, self._events, len(self._events))
            for i in range(n):
                e = self._events[i]
                out.append(RingEvent(EventType(e.type), e.stream, e.serial, e.arg, e.bytes_in,
                                     e.bytes_out, ffi.string(e.name).decode()))
            if n < len(self._events):
                return out

    def stats(self) -> dict[str, int]:
        """Returns the link's counters (bytes, frames, notifications, wakeups, streams)."""
        st = ffi.new("struct xsk_link_stats *")
        lib.xsk_link_stats(self._live(), st)
        return {k: int(getattr(st, k)) for k in (
            "bytes_in", "bytes_out", "frames_in", "frames_out", "notify_sent", "wakeups",
            "streams", "peer_live")}

    def streams(self) -> list[StreamInfo]:
        """Returns a snapshot of the link's open streams."""
        cap = 1024
        while True:
            buf = ffi.new("struct xsk_stream_info[]", cap)
            n = lib.xsk_link_streams(self._live(), buf, cap)
            if n < cap:
                return [StreamInfo(b.id, b.serial, StreamState(b.state), b.bytes_in, b.bytes_out,
                                   b.tx_credit, b.rx_buffered) for b in buf[0:n]]
            cap *= 4

    def held(self) -> dict[str, int]:
        """Returns the bytes this link still holds on their way, without stopping the pump.

        ``app_unread``: written by local applications, not yet read; ``unacked``: sent, not
        yet credited back by the peer; ``undelivered``: received, not yet written to the
        application; ``tx_ring``/``rx_ring``: in the rings, not yet consumed; ``streams``.
        """
        h = ffi.new("struct xsk_link_held *")
        _check(lib.xsk_link_held(self._live(), h), "reading held bytes")
        return {k: int(getattr(h, k)) for k in (
            "app_unread", "unacked", "undelivered", "tx_ring", "rx_ring", "streams")}

    def listen(self, sock: socket.socket, service: str) -> bool:
        """Hands the pump a duplicate of the listening ``sock``: it accepts the connections for
        ``service`` ("" the default) and opens their streams itself, each told by a
        LOCAL_OPEN event.  ``sock`` stays ours (and may be read again once ``unlisten``ed or
        the pump ends).  Returns False if the pump has ended or the link is closed."""
        if self._ptr == ffi.NULL:
            return False
        return self._command(lib.xsk_link_listen(self._ptr, os.dup(sock.fileno()),
                                                 service.encode()), "handing over a listener")

    def unlisten(self, service: str) -> bool:
        """Has the pump close its listener for ``service``; False if the pump has ended (it
        closed its listeners then) or the link is closed."""
        if self._ptr == ffi.NULL:
            return False
        return self._command(lib.xsk_link_unlisten(self._ptr, service.encode()),
                             "taking a listener back")

    def set_admission(self, entries: list[AdmitEntry], gate: OpenGate | None) -> None:
        """Lets the pump accept the peer's OPENs for ``entries`` by itself (an ACCEPTED event
        tells of each), within ``gate``'s budget; [] or None: every OPEN is reported as
        OPEN_REQUEST.  Entries that do not ``fit`` are left out (Python decides those)."""
        entries = sorted((e for e in entries if e.fits()), key=lambda e: e.name.encode())
        table = ffi.new("struct xsk_admit_entry[]", max(1, len(entries)))
        for i, e in enumerate(entries):
            slot = table[i]
            slot.name = e.name.encode()
            slot.path = os.fsencode(e.path)
            slot.header = e.header
            slot.header_len = len(e.header)
        _check(lib.xsk_link_set_admission(self._live(), table, len(entries) if gate else 0,
                                          gate._ptr if gate else ffi.NULL),
               "setting the admission table")

    def stop(self, goodbye: bool = False) -> None:
        """Stops the pump (blocking, without the GIL) and closes every stream's socket."""
        if self._ptr != ffi.NULL:
            lib.xsk_link_stop(self._ptr, int(goodbye))
            self._running = False

    def close(self) -> None:
        """Stops the pump and frees the link.  Idempotent."""
        if self._ptr != ffi.NULL:
            lib.xsk_link_free(self._ptr)
            self._ptr = ffi.NULL
            self._running = False
        self._control = self._rings = None

    def __del__(self) -> None:
        if getattr(self, "_ptr", ffi.NULL) != ffi.NULL:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)
            self.close()
