"""A XenStore connection over xenstored's Unix socket or the kernel's /dev/xen/xenbus.

Both speak the same wire protocol (``xenstore_wire``), so one client serves the sim and real
Xen.  Requests are synchronous; watch events that arrive meanwhile are queued for
``read_events``.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import stat
import warnings
from collections.abc import Callable, Sequence
from typing import TypeVar

from xsockd.backend import WatchEvent, XenStore, XenStorePerm
from xsockd.errors import XenStoreError
from xsockd.xenstore_wire import ERRORS, Message, Op, Parser, encode, split_strings

__all__ = ["XenStoreClient", "transact"]

T = TypeVar("T")
REPLY_TIMEOUT = 30.0
_HANGUPS = (errno.EPIPE, errno.ECONNRESET, errno.EBADF, errno.ENOTCONN)


class XenStoreClient(XenStore):
    """One connection.  ``path`` is a Unix socket or a character device (/dev/xen/xenbus).

    Lifecycle: open -> closed (``close()`` is idempotent).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = -1
        self._sock: socket.socket | None = None
        try:
            is_dev = stat.S_ISCHR(os.stat(path).st_mode)
        except OSError as e:
            raise XenStoreError(e.errno or errno.ENOENT,
                                f"no XenStore at {path}: {e.strerror}", path) from None
        try:
            if is_dev:
                self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            else:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._sock.connect(path)
                self._fd = self._sock.fileno()
        except OSError as e:
            if self._sock:
                self._sock.close()
            raise XenStoreError(e.errno or errno.EIO,
                                f"cannot connect to XenStore at {path}: {e.strerror}",
                                path) from None
        self._parser = Parser()
        self._events: list[WatchEvent] = []
        self._replies: list[Message] = []
        self._next_id = 1
        # fileno() must be readable while events wait in our queue, not only while the socket
        # has data: events that arrive during a request are read along with its reply.  An
        # epoll set of the connection and an eventfd ("queued") is readable in both cases.
        self._queued = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._poll = select.epoll()
        self._poll.register(self._fd, select.EPOLLIN)
        self._poll.register(self._queued, select.EPOLLIN)

    def __repr__(self) -> str:
        return f"<XenStoreClient {self.path} {'closed' if self._fd < 0 else 'open'}>"

    def __enter__(self) -> XenStoreClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)
            self.close()

    # ---- transport ----------------------------------------------------------------------

    def _hung_up(self, e: OSError) -> XenStoreError:
        return XenStoreError(errno.ECONNRESET, f"XenStore at {self.path} hung up ({e.strerror})",
                             self.path)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as e:
            if self._sock is None and e.errno not in _HANGUPS:
                # Linux's xenbus device answers some requests itself: a WATCH it cannot
                # register, a malformed message, fail the write() with the errno.
                raise XenStoreError(e.errno or errno.EIO, f"XenStore at {self.path} refused "
                                    f"the request: {e.strerror}", self.path) from None
            raise self._hung_up(e) from None

    def _pump(self, timeout: float | None) -> bool:
        """Reads what is available (waiting up to ``timeout``); returns False on timeout."""
        if self._fd < 0:
            raise XenStoreError(errno.EBADF, "XenStore connection is closed", self.path)
        ready, _, _ = select.select([self._fd], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self._fd, 65536)
        except OSError as e:
            raise self._hung_up(e) from None
        if not data:
            raise XenStoreError(errno.ECONNRESET, f"XenStore at {self.path} hung up", self.path)
        try:
            messages = self._parser.feed(data)
        except ValueError as e:
            raise XenStoreError(errno.EPROTO, str(e), self.path) from None
        for m in messages:
            if m.op == Op.WATCH_EVENT:
                parts = split_strings(m.payload)
                if len(parts) >= 2:
                    self._events.append(WatchEvent(parts[0].decode(errors="replace"),
                                                   parts[1].decode(errors="replace")))
                    os.eventfd_write(self._queued, 1)
            else:
                self._replies.append(m)
        return True

    def request(self, op: int, payload: bytes, tx: int = 0, path: str | None = None) -> bytes:
        """Sends one request and returns its reply's payload; raises XenStoreError with the
        errno of an ERROR reply (or of a request the xenbus device refused).  Any ``op``, for
        tests that speak the protocol raw."""
        try:
            name = Op(op).name
        except ValueError:
            name = f"op {op}"
        req_id = self._next_id
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF or 1
        try:
            self._write(encode(op, req_id, tx, payload))
        except ValueError as e:
            raise XenStoreError(errno.E2BIG, str(e), path) from None
        while True:
            for i, m in enumerate(self._replies):
                if m.req_id == req_id:
                    del self._replies[i]
                    if m.op == Op.ERROR:
                        err = m.payload.rstrip(b"\0").decode(errors="replace")
                        code = ERRORS.get(err, errno.EIO)
                        raise XenStoreError(code, f"XenStore {name} {path or ''}: {err}",
                                            path)
                    return m.payload
            if not self._pump(REPLY_TIMEOUT):
                raise XenStoreError(errno.ETIMEDOUT, f"XenStore did not answer {name}", path)

    # ---- XenStore -----------------------------------------------------------------------

    def read(self, path: str, tx: int = 0) -> bytes:
        return self.request(Op.READ, path.encode() + b"\0", tx, path)

    def write(self, path: str, value: bytes | str, tx: int = 0) -> None:
        data = value.encode() if isinstance(value, str) else value
        self.request(Op.WRITE, path.encode() + b"\0" + data, tx, path)

    def mkdir(self, path: str, tx: int = 0) -> None:
        self.request(Op.MKDIR, path.encode() + b"\0", tx, path)

    def rm(self, path: str, tx: int = 0) -> None:
        self.request(Op.RM, path.encode() + b"\0", tx, path)

    def directory(self, path: str, tx: int = 0) -> list[str]:
        try:
            reply = self.request(Op.DIRECTORY, path.encode() + b"\0", tx, path)
        except XenStoreError as e:
            if e.errno != errno.E2BIG:
                raise
            reply = self._directory_parts(path, tx)
        return [p.decode(errors="replace") for p in split_strings(reply)]

    def _directory_parts(self, path: str, tx: int) -> bytes:
        """The child list of a directory too long for one reply, read with DIRECTORY_PART
        as libxenstore does: restarted if the node's generation changes between parts."""
        for _ in range(16):
            names, gen = bytearray(), None
            while True:
                reply = self.request(Op.DIRECTORY_PART, path.encode() + b"\0%d\0" % len(names),
                                      tx, path)
                part_gen, _, part = reply.partition(b"\0")
                if gen is not None and part_gen != gen:
                    break  # changed meanwhile: start again
                gen = part_gen
                if part.endswith(b"\0\0") or part == b"\0":  # the empty string ends the list
                    return bytes(names) + part[:-1]
                names += part
        raise XenStoreError(errno.EAGAIN, f"XenStore directory {path} kept changing", path)

    def get_perms(self, path: str, tx: int = 0) -> list[XenStorePerm]:
        reply = self.request(Op.GET_PERMS, path.encode() + b"\0", tx, path)
        try:
            return [XenStorePerm.parse(p.decode()) for p in split_strings(reply)]
        except (ValueError, UnicodeDecodeError) as e:
            raise XenStoreError(errno.EPROTO, f"bad permissions of {path}: {e}", path) from None

    def set_perms(self, path: str, perms: Sequence[XenStorePerm], tx: int = 0) -> None:
        payload = path.encode() + b"\0" + b"".join(str(p).encode() + b"\0" for p in perms)
        self.request(Op.SET_PERMS, payload, tx, path)

    def transaction_start(self) -> int:
        reply = self.request(Op.TRANSACTION_START, b"\0")
        return int(reply.rstrip(b"\0"))

    def transaction_end(self, tx: int, commit: bool = True) -> bool:
        try:
            self.request(Op.TRANSACTION_END, b"T\0" if commit else b"F\0", tx)
        except XenStoreError as e:
            if e.errno == errno.EAGAIN:
                return False
            raise
        return True

    def get_domain_path(self, domid: int) -> str:
        return self.request(Op.GET_DOMAIN_PATH, b"%d\0" % domid).rstrip(b"\0").decode()

    def domain_exists(self, domid: int) -> bool:
        return self.request(Op.IS_DOMAIN_INTRODUCED, b"%d\0" % domid).rstrip(b"\0") == b"T"

    def watch(self, path: str, token: str) -> None:
        self.request(Op.WATCH, path.encode() + b"\0" + token.encode() + b"\0", 0, path)

    def unwatch(self, path: str, token: str) -> None:
        self.request(Op.UNWATCH, path.encode() + b"\0" + token.encode() + b"\0", 0, path)

    def fileno(self) -> int:
        return self._poll.fileno()

    def read_events(self) -> list[WatchEvent]:
        while self._pump(0):
            pass
        try:
            os.eventfd_read(self._queued)
        except BlockingIOError:
            pass
        events, self._events = self._events, []
        return events

    def close(self) -> None:
        if self._fd < 0:
            return
        self._poll.close()
        os.close(self._queued)
        if self._sock is not None:
            self._sock.close()
        else:
            os.close(self._fd)
        self._fd = -1


def transact(xs: XenStore, fn: Callable[[int], T], retries: int = 16) -> T:
    """Returns ``fn(tx)`` run inside a XenStore transaction, retried while commits lose races.

    The one way xsockd uses transactions.  An exception from ``fn`` aborts the transaction.
    """
    for _ in range(retries):
        tx = xs.transaction_start()
        try:
            result = fn(tx)
        except BaseException:
            try:
                xs.transaction_end(tx, commit=False)
            except XenStoreError:
                pass
            raise
        if xs.transaction_end(tx, commit=True):
            return result
    raise XenStoreError(errno.EAGAIN, f"XenStore transaction still conflicting after {retries} "
                                      "tries")
