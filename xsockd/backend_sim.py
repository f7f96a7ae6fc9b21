"""The ``sim`` backend: one simulated domain's access to the simulated host (``xsockd.sim``).

Granted pages are memfds shared with the mapping process for real; event channels are eventfd
pairs; XenStore is the sim's xenstored.  The host enforces who may map what, the grant limit
and unmap notifications, so code above behaves as it will on Xen.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import socket
import warnings
from collections.abc import Sequence
from typing import Any

from xsockd.backend import Backend, EventChannel, GrantedPages, MappedPages, UnmapNotify
from xsockd.errors import BackendError, GrantLimitError
from xsockd.sim.hypervisor import recv_message, send_message
from xsockd.xenstore_client import XenStoreClient

__all__ = ["SimBackend"]

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
MAP_FAILED = ctypes.c_void_p(-1).value


class _Region:
    """Pages mapped at a fixed address with ctypes, exposed as one writable memoryview."""

    def __init__(self, count: int, pieces: list[tuple[int, int]]) -> None:
        """pieces: (fd, page) for each page, in order."""
        self.size = count * PAGE
        addr = _libc.mmap(None, self.size, 0,  # PROT_NONE: reserve only
                          mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        if addr in (None, MAP_FAILED):
            raise BackendError(ctypes.get_errno(), "cannot reserve address space")
        self.addr = addr
        for i, (fd, page) in enumerate(pieces):
            got = _libc.mmap(addr + i * PAGE, PAGE, mmap.PROT_READ | mmap.PROT_WRITE,
                             mmap.MAP_SHARED | 0x10, fd, page * PAGE)  # 0x10: MAP_FIXED
            if got != addr + i * PAGE:
                err = ctypes.get_errno()
                _libc.munmap(addr, self.size)
                raise BackendError(err, f"cannot map shared page: {os.strerror(err)}")
        self.view: memoryview | None = memoryview(
            (ctypes.c_char * self.size).from_address(addr)).cast("B")

    def close(self) -> None:
        if self.view is not None:
            self.view.release()
            self.view = None
            _libc.munmap(self.addr, self.size)


class _Handle:
    """One connection to the hypervisor: requests in order, replies with their fds."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.sock.connect(path)
        except OSError as e:
            self.sock.close()
            raise BackendError(e.errno or errno.ENOENT,
                               f"no simulated host at {path} ({e.strerror}); start one with "
                               f"`python -m xsockd.sim.host --dir DIR` or use --sim-dir") from None

    def call(self, request: dict[str, Any], grant: bool = False
             ) -> tuple[dict[str, Any], list[int]]:
        """Returns the reply and its fds; ``grant``: ENOSPC is the grant limit."""
        try:
            send_message(self.sock, request)
            reply, got = recv_message(self.sock)
        except (OSError, ValueError) as e:
            raise BackendError(errno.EIO, f"simulated host: {e}") from None
        if reply is None:
            raise BackendError(errno.ECONNRESET, "the simulated host went away")
        if not reply.get("ok"):
            for fd in got:
                os.close(fd)
            code = int(reply.get("errno", errno.EIO))
            cls = GrantLimitError if grant and code == errno.ENOSPC else BackendError
            raise cls(code, str(reply.get("error", "refused")))
        return reply, got

    def close(self) -> None:
        self.sock.close()


def _notify(n: UnmapNotify | None) -> list[int | None] | None:
    return None if n is None else [n.offset, n.port]


class _SimPages:
    """Shared by granted and mapped pages: a region, a release request, close-once."""

    kind = ""

    def __init__(self, handle: _Handle, peer: int, refs: Sequence[int], region: _Region,
                 release: dict[str, Any]) -> None:
        self._handle = handle
        self.peer = peer
        self.refs = tuple(refs)
        self.count = len(refs)
        self._region: _Region | None = region
        self._release = release

    @property
    def buffer(self) -> memoryview:
        if self._region is None or self._region.view is None:
            raise ValueError("pages are closed")
        return self._region.view

    def close(self) -> None:
        if self._region is None:
            return
        region, self._region = self._region, None
        try:
            self._handle.call(self._release)
        except BackendError:
            pass  # the host is gone: it released everything already
        region.close()

    def __repr__(self) -> str:
        state = "closed" if self._region is None else "open"
        return f"<{type(self).__name__} peer={self.peer} refs={self.refs[:4]}... {state}>"

    def __del__(self) -> None:
        if getattr(self, "_region", None) is not None:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)
            self.close()


class SimGrantedPages(_SimPages, GrantedPages):
    pass


class SimMappedPages(_SimPages, MappedPages):
    pass


class SimEventChannel(EventChannel):
    kind = "eventfd"

    def __init__(self, handle: _Handle, peer: int, port: int, fd: int, notify_fd: int) -> None:
        self._handle = handle
        self.peer = peer
        self.port = port
        self.fd = fd
        self.notify_fd = notify_fd

    def notify(self) -> None:
        os.eventfd_write(self.notify_fd, 1)

    def clear(self) -> None:
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass

    def close(self) -> None:
        if self.fd < 0:
            return
        try:
            self._handle.call({"op": "close_port", "port": self.port})
        except BackendError:
            pass
        os.close(self.fd)
        os.close(self.notify_fd)
        self.fd = self.notify_fd = -1

    def __repr__(self) -> str:
        return f"<SimEventChannel port={self.port} peer={self.peer}>"

    def __del__(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)
            self.close()


def _host_domains(simdir: str) -> list[int] | None:
    """Returns the domains the simulated host in ``simdir`` has now; None if it does not say."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.settimeout(5)
            s.connect(os.path.join(simdir, "control.sock"))
            send_message(s, {"op": "domains"})
            reply, fds = recv_message(s)
    except (OSError, ValueError):
        return None
    for fd in fds:
        os.close(fd)
    domains = reply.get("domains") if isinstance(reply, dict) else None
    if not isinstance(domains, list) or not all(type(d) is int for d in domains):
        return None
    return domains


class SimBackend(Backend):
    """Domain ``domid`` of the simulated host in ``simdir``."""

    name = "sim"

    def __init__(self, domid: int, simdir: str | os.PathLike[str]) -> None:
        self.domid = domid
        self.simdir = os.fspath(simdir)
        try:
            self._handle = _Handle(os.path.join(self.simdir, f"dom{domid}", "hypervisor.sock"))
        except BackendError as e:
            if not os.path.exists(os.path.join(self.simdir, "control.sock")):
                raise
            # The host runs, only this domain is not one of its.
            domains = _host_domains(self.simdir)
            which = f"it has {', '.join(map(str, domains))}" if domains is not None else \
                "its domains are --domains of xsockd-simhost"
            raise BackendError(e.errno, f"the simulated host at {self.simdir} has no domain "
                                        f"{domid} ({which}): check --domid") from None

    def __repr__(self) -> str:
        return f"<SimBackend domain {self.domid} at {self.simdir}>"

    def grant(self, peer: int, count: int, notify: UnmapNotify | None = None) -> GrantedPages:
        # The hypervisor makes the pages (a sealed memfd, so that we cannot shrink them under
        # the peer's mapping any more than a domain can on Xen); we map what it sends.
        reply, fds = self._handle.call({"op": "grant", "peer": peer, "count": count,
                                        "notify": _notify(notify)}, grant=True)
        try:
            if len(fds) != 1:
                raise BackendError(errno.EIO, f"simulated host: grant reply with {len(fds)} fds")
            region = _Region(count, [(fds[0], p) for p in range(count)])
        except BaseException:
            self._handle.call({"op": "ungrant", "id": reply["id"]})
            raise
        finally:
            for fd in fds:
                os.close(fd)
        return SimGrantedPages(self._handle, peer, reply["refs"], region,
                               {"op": "ungrant", "id": reply["id"]})

    def map(self, peer: int, refs: Sequence[int], notify: UnmapNotify | None = None
            ) -> MappedPages:
        reply, fds = self._handle.call({"op": "map", "peer": peer, "refs": list(refs),
                                        "notify": _notify(notify)})
        try:
            region = _Region(len(refs), [(fds[i], page) for i, page in reply["segments"]])
        except BaseException:
            self._handle.call({"op": "unmap", "id": reply["id"]})
            raise
        finally:
            for fd in fds:
                os.close(fd)
        return SimMappedPages(self._handle, peer, refs, region, {"op": "unmap", "id": reply["id"]})

    def alloc_unbound(self, peer: int) -> EventChannel:
        reply, fds = self._handle.call({"op": "alloc_unbound", "peer": peer})
        return SimEventChannel(self._handle, peer, reply["port"], fds[0], fds[1])

    def bind_interdomain(self, peer: int, remote_port: int) -> EventChannel:
        reply, fds = self._handle.call({"op": "bind", "peer": peer, "port": remote_port})
        return SimEventChannel(self._handle, peer, reply["port"], fds[0], fds[1])

    def open_xenstore(self) -> XenStoreClient:
        return XenStoreClient(os.path.join(self.simdir, f"dom{self.domid}", "xenstored.sock"))

    def close(self) -> None:
        self._handle.close()
