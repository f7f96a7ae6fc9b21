"""The simulated grant table and event channels, one SOCK_SEQPACKET socket per domain.

A connection is like an open /dev/xen device: what it granted, mapped or bound is released when
it closes or its process dies, and unmap notifications registered on it are performed then.
Messages are JSON objects; file descriptors (memfds, eventfds) travel with SCM_RIGHTS, only
from the hypervisor to its clients.  Semantics and limits: docs/SIM.md, "Hypervisor".

* grant: the hypervisor creates a memfd of ``count`` zeroed pages, sealed against shrinking and
  growing (a granted page cannot vanish under a mapping, as on Xen), and sends it to the
  granter, which maps it; grant refs only the named peer may map; at most ``grant_limit``
  pages per domain at once (ENOSPC past it, as Linux gntalloc's ``limit``).  A released grant
  that the peer still maps stays counted until the peer unmaps it, as on Xen.
* map: the peer receives the memfds and page offsets of refs granted to it, in order; any other
  ref fails with EINVAL and nothing is mapped; at most ``max_mapped`` pages per domain (ENOMEM).
* event channels: each end has its own eventfd, readable when the other end notifies; the data
  path never passes through this process.  A closed end's peer notifies into the void.  At
  most ``max_ports`` ports per domain (ENOSPC, as Xen's get_free_port).
* unmap notify: on release the byte at ``offset`` of the region is set to 0, then the region's
  local port is signalled (Linux IOCTL_GNTALLOC/GNTDEV_SET_UNMAP_NOTIFY).

No request of one domain, valid or malformed, stops the hypervisor for the others: every
field is checked, anything wrong (or the host out of descriptors or memory) is an error answer
to that request, and a connection that cannot be served is closed alone.
"""

from __future__ import annotations

import array
import errno
import fcntl
import json
import logging
import os
import selectors
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from xsockd.listeners import listen_unix
from xsockd.sim import SOCKET_MODE
from xsockd.sim.acceptpause import AcceptPause

__all__ = ["MAX_CONNECTIONS", "MAX_MAPPED", "Hypervisor", "recv_message", "send_message"]

log = logging.getLogger(__name__)

PAGE = 4096
MAX_MESSAGE = 65536          # a request or reply, in bytes (E2BIG past it)
MAX_FDS = 253                # descriptors in one SCM_RIGHTS message (Linux SCM_MAX_FD)
MAX_PAGES_PER_REQUEST = 4096
MAX_MAPPED = 16384           # pages one domain may map at once (ENOMEM past it)
MAX_CONNECTIONS = 32         # hypervisor handles one domain may hold open at once
DOMID_FIRST_RESERVED = 0x7FF0
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_INT_MAX = 2**31 - 1


def send_message(sock: socket.socket, obj: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(obj).encode()
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sock.sendmsg([data], anc)


def _recv(sock: socket.socket) -> tuple[bytes, list[int], int]:
    """Returns one message's bytes, the descriptors it carried and recvmsg's flags."""
    fds = array.array("i")
    data, anc, flags, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds), flags


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _decode(data: bytes) -> dict[str, Any]:
    """The JSON object in ``data``; ValueError for anything else (deep nesting included)."""
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"not JSON: {type(e).__name__}") from None
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    return obj


def recv_message(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """Returns (message, fds); (None, []) when the peer hung up.  Raises ValueError if bad."""
    data, fds, flags = _recv(sock)
    if not data:
        _close_all(fds)
        return None, []
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise ValueError("message or descriptors truncated")
        return _decode(data), fds
    except ValueError:
        _close_all(fds)
        raise


class HvError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


# op -> the fields it needs besides "op"; "notify" may also come with grant and map.
_REQUESTS: dict[str, tuple[str, ...]] = {
    "grant": ("peer", "count"),
    "ungrant": ("id",),
    "map": ("peer", "refs"),
    "unmap": ("id",),
    "alloc_unbound": ("peer",),
    "bind": ("peer", "port"),
    "close_port": ("port",),
}
_WITH_NOTIFY = ("grant", "map")


def _short(value: Any) -> str:
    """A hostile value, cut short enough to quote in an error answer."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    # bool is an int to Python, not to us; floats and strings are refused, not converted.
    if type(value) is not int or not lo <= value <= hi:
        raise HvError(errno.EINVAL, f"{what}: {_short(value)} is not an integer in {lo}..{hi}")
    return value


def _check_fields(msg: dict[str, Any]) -> str:
    """Returns the request's op once it has exactly the fields that op takes."""
    op = msg.get("op")
    if not isinstance(op, str):
        raise HvError(errno.EINVAL, f"op: {_short(op)} is not a string")
    need = _REQUESTS.get(op)
    if need is None:
        raise HvError(errno.ENOSYS, f"unknown operation {_short(op)}")
    allowed = {"op", *need, *(("notify",) if op in _WITH_NOTIFY else ())}
    missing = [k for k in need if k not in msg]
    extra = [k for k in msg if k not in allowed]
    if missing or extra:
        raise HvError(errno.EINVAL, f"{op}: missing {missing}, unknown {_short(extra)}")
    return op


def _notify_field(raw: Any) -> tuple[int | None, int | None] | None:
    """The (offset, port) of an unmap notification request, each possibly None."""
    if raw is None:
        return None
    if not isinstance(raw, list) or len(raw) != 2:
        raise HvError(errno.EINVAL, "notify: [offset or null, port or null]")
    offset, port = raw
    return (None if offset is None else _int(offset, "notify offset", 0, _INT_MAX),
            None if port is None else _int(port, "notify port", 1, _INT_MAX))


def _new_pages(count: int) -> int:
    """Returns a sealed memfd of ``count`` zeroed pages: nobody can shrink or grow it, so a
    mapping of it never faults (a granter's ftruncate fails with EPERM)."""
    fd = os.memfd_create("xsock-grant", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, count * PAGE)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass
class Grant:
    owner: int
    grantee: int
    fd: int           # the memfd the hypervisor made for the grant request
    page: int         # page index within it
    conn: Conn | None
    maps: int = 0     # live mappings by the grantee


@dataclass
class Notify:
    segments: list[tuple[int, int]]   # (memfd, page) of each page of the region
    offset: int | None
    port: int | None

    def region_byte(self) -> tuple[int, int] | None:
        if self.offset is None or not 0 <= self.offset < len(self.segments) * PAGE:
            return None
        fd, page = self.segments[self.offset // PAGE]
        return fd, page * PAGE + self.offset % PAGE


@dataclass
class Port:
    domid: int
    number: int
    remote: int
    rx: int            # our eventfd (readable when the peer notifies)
    peer_rx: int       # the peer's eventfd (we notify into it)
    conn: Conn
    bound: bool = False
    peer_port: int | None = None


@dataclass
class Conn:
    sock: socket.socket
    domid: int
    grants: dict[int, tuple[list[int], Notify | None]] = field(default_factory=dict)
    maps: dict[int, tuple[int, list[int], Notify | None]] = field(default_factory=dict)
    ports: set[int] = field(default_factory=set)
    next_map: int = 1


class Hypervisor:
    """Grant tables and event channels of every simulated domain."""

    def __init__(self, grant_limit: int = 1024, max_ports: int = 1023,
                 max_mapped: int = MAX_MAPPED, max_connections: int = MAX_CONNECTIONS,
                 max_grant_requests: int | None = None, dom0_max_ports: int | None = None
                 ) -> None:
        self.grant_limit = grant_limit
        self.max_ports = max_ports  # of a domU; dom0's is dom0_max_ports
        self.dom0_max_ports = max_ports if dom0_max_ports is None else dom0_max_ports
        # Grant requests (one memfd each) a domU may hold at once; dom0's are bounded by
        # grant_limit alone, as everyone's are by default.
        self.max_grant_requests = grant_limit if max_grant_requests is None \
            else max_grant_requests
        self.max_mapped = max_mapped
        self.max_connections = max_connections
        self.grants: dict[int, dict[int, Grant]] = {}       # domid -> ref -> Grant
        self.ports: dict[int, dict[int, Port]] = {}         # domid -> port -> Port
        self.mapped: dict[int, int] = {}                    # domid -> pages it maps
        self.next_ref: dict[int, int] = {}
        self.listeners: dict[int, socket.socket] = {}
        self.conns: list[Conn] = []
        self.sel: selectors.BaseSelector | None = None
        self.pause = AcceptPause()
        self.internal_errors = 0

    # ---- wiring -------------------------------------------------------------------------

    def register(self, sel: selectors.BaseSelector) -> None:
        self.sel = sel
        for domid, sock in self.listeners.items():
            sel.register(sock, selectors.EVENT_READ, self._acceptor(domid))

    def _acceptor(self, domid: int) -> Callable[[], None]:
        return lambda: self._accept(domid)

    def add_domain(self, domid: int, socket_path: str) -> None:
        sock = listen_unix(socket_path, SOCKET_MODE, socket.SOCK_SEQPACKET, backlog=64)
        self.listeners[domid] = sock
        self.grants.setdefault(domid, {})
        self.ports.setdefault(domid, {})
        self.mapped.setdefault(domid, 0)
        self.next_ref.setdefault(domid, 8)  # refs 0..7 are reserved, as in Linux
        if self.sel is not None:
            self.sel.register(sock, selectors.EVENT_READ, self._acceptor(domid))

    def remove_domain(self, domid: int) -> None:
        sock = self.listeners.pop(domid, None)
        if sock is not None:
            self.pause.unregister(self.sel, sock)
            sock.close()
        for conn in [c for c in self.conns if c.domid == domid]:
            self.drop(conn, destroyed=True)

    def close(self) -> None:
        for domid in list(self.listeners):
            self.remove_domain(domid)

    def accounting(self) -> dict[int, dict[str, int]]:
        """Returns, per domain: granted pages, mapped pages, event-channel ports, connections."""
        out = {}
        for domid in set(self.grants) | set(self.listeners):
            out[domid] = {
                "granted": len(self.grants.get(domid, {})),
                "mapped": self.mapped.get(domid, 0),
                "ports": len(self.ports.get(domid, {})),
                "connections": sum(1 for c in self.conns if c.domid == domid),
            }
        return out

    def _accept(self, domid: int) -> None:
        listener = self.listeners.get(domid)
        if listener is None:
            return
        client = self.pause.accept(self.sel, listener)
        if client is None:
            return
        if sum(1 for c in self.conns if c.domid == domid) >= self.max_connections:
            client.close()  # the client sees its handle hang up at once
            return
        client.setblocking(False)
        conn = Conn(client, domid)
        self.conns.append(conn)
        assert self.sel is not None
        self.sel.register(client, selectors.EVENT_READ, lambda: self._readable(conn))

    def _readable(self, conn: Conn) -> None:
        try:
            self._serve_one(conn)
        except Exception:  # a bug must cost this connection, not the host
            self.internal_errors += 1
            log.exception("internal error serving domain %d: connection closed", conn.domid)
            self.drop(conn)

    def _serve_one(self, conn: Conn) -> None:
        try:
            data, fds, flags = _recv(conn.sock)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.drop(conn)  # broken client
            return
        _close_all(fds)  # no request carries descriptors: they are refused below
        if not data and not fds:
            self.drop(conn)  # hung up (or sent an empty message, which no client does)
            return
        out_fds: list[int] = []
        try:
            if flags & socket.MSG_TRUNC:
                raise HvError(errno.E2BIG, f"request longer than {MAX_MESSAGE} bytes")
            if fds or flags & socket.MSG_CTRUNC:
                raise HvError(errno.EINVAL, "requests carry no descriptors")
            try:
                msg = _decode(data)
            except ValueError as e:
                raise HvError(errno.EINVAL, str(e)) from None
            reply, out_fds = self._handle(conn, msg)
            reply["ok"] = True
        except HvError as e:
            reply, out_fds = {"ok": False, "errno": e.code, "error": str(e)}, []
        except MemoryError:
            reply, out_fds = {"ok": False, "errno": errno.ENOMEM, "error": "out of memory"}, []
        except OSError as e:  # EMFILE, ENFILE, ENOMEM...: the host is short, not broken
            code = e.errno or errno.EIO
            reply, out_fds = {"ok": False, "errno": code, "error": os.strerror(code)}, []
        # The descriptors sent stay the hypervisor's (the kernel passes copies).
        try:
            send_message(conn.sock, reply, out_fds)
        except OSError:
            self.drop(conn)  # not reading its replies, or gone

    # ---- requests -----------------------------------------------------------------------

    def _handle(self, conn: Conn, msg: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        op = _check_fields(msg)
        if op == "grant":
            return self._grant(conn, _int(msg["peer"], "peer", 0, DOMID_FIRST_RESERVED - 1),
                               _int(msg["count"], "count", 1, MAX_PAGES_PER_REQUEST),
                               _notify_field(msg.get("notify")))
        if op == "ungrant":
            self._ungrant(conn, _int(msg["id"], "id", 0, _INT_MAX))
            return {}, []
        if op == "map":
            refs = msg["refs"]
            if not isinstance(refs, list) or not 0 < len(refs) <= MAX_PAGES_PER_REQUEST:
                raise HvError(errno.EINVAL, f"refs: a list of 1..{MAX_PAGES_PER_REQUEST} refs")
            return self._map(conn, _int(msg["peer"], "peer", 0, DOMID_FIRST_RESERVED - 1),
                             [_int(r, "ref", 0, _INT_MAX) for r in refs],
                             _notify_field(msg.get("notify")))
        if op == "unmap":
            self._unmap(conn, _int(msg["id"], "id", 0, _INT_MAX))
            return {}, []
        if op == "alloc_unbound":
            return self._alloc_unbound(
                conn, _int(msg["peer"], "peer", 0, DOMID_FIRST_RESERVED - 1))
        if op == "bind":
            return self._bind(conn, _int(msg["peer"], "peer", 0, DOMID_FIRST_RESERVED - 1),
                              _int(msg["port"], "port", 1, _INT_MAX))
        self._close_port(conn, _int(msg["port"], "port", 1, _INT_MAX))
        return {}, []

    def _check_notify(self, raw: tuple[int | None, int | None] | None, pages: int,
                      conn: Conn) -> None:
        """Refuses an unmap notification this handle may not register, before any change."""
        if raw is None:
            return
        offset, port = raw
        if port is not None and port not in conn.ports:
            raise HvError(errno.EINVAL, f"unmap notify port {port} is not this handle's")
        if offset is not None and offset >= pages * PAGE:
            raise HvError(errno.EINVAL, f"unmap notify offset {offset} outside the region")

    def _grant(self, conn: Conn, peer: int, count: int,
               notify: tuple[int | None, int | None] | None) -> tuple[dict[str, Any], list[int]]:
        self._check_notify(notify, count, conn)
        table = self.grants[conn.domid]
        if conn.domid != 0 and self.max_grant_requests < self.grant_limit and \
                len({g.fd for g in table.values()}) >= self.max_grant_requests:
            raise HvError(errno.ENOSPC, f"domain {conn.domid} holds {self.max_grant_requests} "
                                        "grant requests, its limit (--max-grant-requests)")
        if len(table) + count > self.grant_limit:
            raise HvError(errno.ENOSPC, f"domain {conn.domid} would grant "
                                        f"{len(table) + count} pages; the limit is "
                                        f"{self.grant_limit}")
        fd = _new_pages(count)
        refs = []
        for page in range(count):
            ref = self.next_ref[conn.domid]
            self.next_ref[conn.domid] += 1
            table[ref] = Grant(conn.domid, peer, fd, page, conn)
            refs.append(ref)
        note = None if notify is None else Notify([(fd, p) for p in range(count)], *notify)
        gid = refs[0]
        conn.grants[gid] = (refs, note)
        return {"refs": refs, "id": gid}, [fd]

    def _release_grants(self, domid: int, refs: list[int]) -> None:
        table = self.grants.get(domid, {})
        fds = set()
        for ref in refs:
            g = table.get(ref)
            if g is None:
                continue
            g.conn = None
            if g.maps == 0:
                del table[ref]
                fds.add(g.fd)
        for fd in fds:
            if not any(g.fd == fd for g in table.values()):
                os.close(fd)

    def _ungrant(self, conn: Conn, gid: int, notify: bool = True) -> None:
        if gid not in conn.grants:
            raise HvError(errno.EINVAL, f"no grant {gid} on this handle")
        refs, note = conn.grants.pop(gid)
        if notify:
            self._perform(conn, note)
        self._release_grants(conn.domid, refs)

    def _map(self, conn: Conn, peer: int, refs: list[int],
             notify: tuple[int | None, int | None] | None) -> tuple[dict[str, Any], list[int]]:
        table = self.grants.get(peer, {})
        grants = []
        for ref in refs:
            g = table.get(ref)
            if g is None or g.grantee != conn.domid or g.conn is None:
                raise HvError(errno.EINVAL, f"grant ref {ref} of domain {peer} is not granted "
                                            f"to domain {conn.domid}")
            grants.append(g)
        if self.mapped[conn.domid] + len(refs) > self.max_mapped:
            raise HvError(errno.ENOMEM, f"domain {conn.domid} would map "
                                        f"{self.mapped[conn.domid] + len(refs)} pages; the "
                                        f"limit is {self.max_mapped}")
        fds: list[int] = []
        index: dict[int, int] = {}
        segments = []
        for g in grants:
            if g.fd not in index:
                index[g.fd] = len(fds)
                fds.append(g.fd)
            segments.append((index[g.fd], g.page))
        if len(fds) > MAX_FDS:
            raise HvError(errno.E2BIG, f"refs of {len(fds)} grant requests; one map takes refs "
                                       f"of at most {MAX_FDS}")
        self._check_notify(notify, len(refs), conn)
        note = (None if notify is None
                else Notify([(g.fd, g.page) for g in grants], *notify))
        for g in grants:
            g.maps += 1
        self.mapped[conn.domid] += len(refs)
        mid = conn.next_map
        conn.next_map += 1
        conn.maps[mid] = (peer, refs, note)
        return {"id": mid, "segments": segments}, fds

    def _unmap(self, conn: Conn, mid: int, notify: bool = True) -> None:
        if mid not in conn.maps:
            raise HvError(errno.EINVAL, f"no mapping {mid} on this handle")
        peer, refs, note = conn.maps.pop(mid)
        if notify:
            self._perform(conn, note)
        self.mapped[conn.domid] -= len(refs)
        table = self.grants.get(peer, {})
        released = []
        for ref in refs:
            g = table.get(ref)
            if g is not None:
                g.maps -= 1
                if g.maps == 0 and g.conn is None:
                    released.append(ref)
        self._release_grants(peer, released)

    def _port_room(self, conn: Conn) -> None:
        limit = self.dom0_max_ports if conn.domid == 0 else self.max_ports
        if len(self.ports[conn.domid]) >= limit:
            raise HvError(errno.ENOSPC, f"domain {conn.domid} holds {limit} "
                                        "event-channel ports, its limit")

    def _alloc_unbound(self, conn: Conn, peer: int) -> tuple[dict[str, Any], list[int]]:
        # As Xen: a port may be allocated for any domain id; only binding to it needs the
        # domain to exist.
        self._port_room(conn)
        ours = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            theirs = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except BaseException:
            os.close(ours)
            raise
        port = self._new_port(conn, peer, ours, theirs)
        return {"port": port.number}, [ours, theirs]

    def _bind(self, conn: Conn, peer: int, remote: int) -> tuple[dict[str, Any], list[int]]:
        rp = self.ports.get(peer, {}).get(remote)
        if rp is None or rp.bound or rp.remote != conn.domid:
            raise HvError(errno.EINVAL, f"port {remote} of domain {peer} is not unbound for "
                                        f"domain {conn.domid}")
        self._port_room(conn)
        rx = os.dup(rp.peer_rx)
        try:
            peer_rx = os.dup(rp.rx)
        except BaseException:
            os.close(rx)
            raise
        port = self._new_port(conn, peer, rx, peer_rx)
        port.bound, port.peer_port = True, rp.number
        rp.bound, rp.peer_port = True, port.number
        return {"port": port.number}, [port.rx, port.peer_rx]

    def _new_port(self, conn: Conn, peer: int, rx: int, peer_rx: int) -> Port:
        table = self.ports[conn.domid]
        number = 1
        while number in table:
            number += 1
        port = Port(conn.domid, number, peer, rx, peer_rx, conn)
        table[number] = port
        conn.ports.add(number)
        return port

    def _close_port(self, conn: Conn, number: int) -> None:
        if number not in conn.ports:
            raise HvError(errno.EINVAL, f"port {number} is not this handle's")
        conn.ports.discard(number)
        port = self.ports[conn.domid].pop(number)
        if port.bound and port.peer_port is not None:
            other = self.ports.get(port.remote, {}).get(port.peer_port)
            if other is not None:
                other.bound, other.peer_port = False, None
        os.close(port.rx)
        os.close(port.peer_rx)

    def _perform(self, conn: Conn, note: Notify | None) -> None:
        """Performs an unmap notification: clear the byte, then signal the port."""
        if note is None:
            return
        where = note.region_byte()
        if where is not None:
            os.pwrite(where[0], b"\0", where[1])
        if note.port is not None:
            port = self.ports.get(conn.domid, {}).get(note.port)
            if port is not None:
                os.eventfd_write(port.peer_rx, 1)

    def drop(self, conn: Conn, destroyed: bool = False) -> None:
        """Releases everything a connection held, as the kernel does when a process dies.

        ``destroyed``: the whole domain is gone (xl destroy).  As on Xen, nothing of its kernel
        runs any more, so its unmap notifications are not performed: peers must learn of it
        from XenStore's @releaseDomain.
        """
        if conn not in self.conns:
            return
        self.conns.remove(conn)
        if self.sel is not None:
            self.sel.unregister(conn.sock)
        conn.sock.close()
        for mid in list(conn.maps):
            self._unmap(conn, mid, notify=not destroyed)
        for gid in list(conn.grants):
            self._ungrant(conn, gid, notify=not destroyed)
        for number in list(conn.ports):
            self._close_port(conn, number)
