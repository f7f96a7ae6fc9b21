"""The simulated grant table and event channels, one SOCK_SEQPACKET socket per domain.

A connection is like an open /dev/xen device: what it granted, mapped or bound is released when
it closes or its process dies, and unmap notifications registered on it are performed then.
Messages are JSON; file descriptors (memfds, eventfds) travel with SCM_RIGHTS.

* grant: the client sends a memfd of ``count`` zeroed pages; the hypervisor assigns grant refs
  that only the named peer may map, at most ``grant_limit`` pages per domain at once (ENOSPC
  past it, as Linux gntalloc's ``limit``).  A released grant that the peer still maps stays
  counted until the peer unmaps it, as on Xen.
* map: the peer receives the memfds and page offsets of refs granted to it, in order; any other
  ref fails with EINVAL and nothing is mapped.
* event channels: each end has its own eventfd, readable when the other end notifies; the data
  path never passes through this process.  A closed end's peer notifies into the void.
* unmap notify: on release the byte at ``offset`` of the region is set to 0, then the region's
  local port is signalled (Linux IOCTL_GNTALLOC/GNTDEV_SET_UNMAP_NOTIFY).
"""

from __future__ import annotations

import array
import errno
import json
import os
import selectors
import socket
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Hypervisor", "recv_message", "send_message"]

PAGE = 4096
MAX_MESSAGE = 65536
MAX_FDS = 512
MAX_PAGES_PER_REQUEST = 4096


def send_message(sock: socket.socket, obj: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(obj).encode()
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sock.sendmsg([data], anc)


def recv_message(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """Returns (message, fds); (None, []) when the peer hung up.  Raises ValueError if bad."""
    fds = array.array("i")
    data, anc, flags, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_LEN(MAX_FDS * fds.itemsize))
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        raise ValueError("message or descriptors truncated")
    try:
        obj = json.loads(data)
    except ValueError:
        for fd in fds:
            os.close(fd)
        raise
    if not isinstance(obj, dict):
        for fd in fds:
            os.close(fd)
        raise ValueError("not a JSON object")
    return obj, list(fds)


class HvError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Grant:
    owner: int
    grantee: int
    fd: int           # the owner's memfd (our duplicate)
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

    def __init__(self, grant_limit: int = 1024) -> None:
        self.grant_limit = grant_limit
        self.grants: dict[int, dict[int, Grant]] = {}       # domid -> ref -> Grant
        self.ports: dict[int, dict[int, Port]] = {}         # domid -> port -> Port
        self.next_ref: dict[int, int] = {}
        self.listeners: dict[int, socket.socket] = {}
        self.conns: list[Conn] = []
        self.sel: selectors.BaseSelector | None = None

    # ---- wiring -------------------------------------------------------------------------

    def register(self, sel: selectors.BaseSelector) -> None:
        self.sel = sel
        for domid, sock in self.listeners.items():
            sel.register(sock, selectors.EVENT_READ, lambda d=domid: self._accept(d))

    def add_domain(self, domid: int, socket_path: str) -> None:
        if os.path.exists(socket_path):
            os.unlink(socket_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.bind(socket_path)
        sock.listen(64)
        sock.setblocking(False)
        self.listeners[domid] = sock
        self.grants.setdefault(domid, {})
        self.ports.setdefault(domid, {})
        self.next_ref.setdefault(domid, 8)  # refs 0..7 are reserved, as in Linux
        if self.sel is not None:
            self.sel.register(sock, selectors.EVENT_READ, lambda: self._accept(domid))

    def remove_domain(self, domid: int) -> None:
        sock = self.listeners.pop(domid, None)
        if sock is not None:
            if self.sel is not None:
                self.sel.unregister(sock)
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
                "mapped": sum(len(refs) for c in self.conns if c.domid == domid
                              for _, refs, _ in c.maps.values()),
                "ports": len(self.ports.get(domid, {})),
                "connections": sum(1 for c in self.conns if c.domid == domid),
            }
        return out

    def _accept(self, domid: int) -> None:
        try:
            client, _ = self.listeners[domid].accept()
        except (BlockingIOError, KeyError):
            return
        client.setblocking(False)
        conn = Conn(client, domid)
        self.conns.append(conn)
        assert self.sel is not None
        self.sel.register(client, selectors.EVENT_READ, lambda: self._readable(conn))

    def _readable(self, conn: Conn) -> None:
        try:
            msg, fds = recv_message(conn.sock)
        except BlockingIOError:
            return
        except (ValueError, OSError):
            self.drop(conn)  # hostile or broken client
            return
        if msg is None:
            self.drop(conn)
            return
        try:
            reply, out_fds = self._handle(conn, msg, fds)
            reply["ok"] = True
        except HvError as e:
            reply, out_fds = {"ok": False, "errno": e.code, "error": str(e)}, []
        except (KeyError, TypeError, ValueError) as e:
            reply, out_fds = {"ok": False, "errno": errno.EINVAL, "error": f"bad request: {e}"}, []
        finally:
            for fd in fds:
                os.close(fd)
        try:
            send_message(conn.sock, reply, out_fds)
        except OSError:
            self.drop(conn)

    # ---- requests -----------------------------------------------------------------------

    def _handle(self, conn: Conn, msg: dict[str, Any], fds: list[int]
                ) -> tuple[dict[str, Any], list[int]]:
        op = msg["op"]
        if op == "grant":
            return self._grant(conn, int(msg["peer"]), int(msg["count"]), fds,
                               msg.get("notify")), []
        if op == "ungrant":
            self._ungrant(conn, int(msg["id"]))
            return {}, []
        if op == "map":
            return self._map(conn, int(msg["peer"]), [int(r) for r in msg["refs"]],
                             msg.get("notify"))
        if op == "unmap":
            self._unmap(conn, int(msg["id"]))
            return {}, []
        if op == "alloc_unbound":
            return self._alloc_unbound(conn, int(msg["peer"]))
        if op == "bind":
            return self._bind(conn, int(msg["peer"]), int(msg["port"]))
        if op == "close_port":
            self._close_port(conn, int(msg["port"]))
            return {}, []
        raise HvError(errno.ENOSYS, f"unknown operation {op!r}")

    def _notify_of(self, raw: Any, segments: list[tuple[int, int]], conn: Conn) -> Notify | None:
        if raw is None:
            return None
        offset, port = raw
        if port is not None and port not in conn.ports:
            raise HvError(errno.EINVAL, f"unmap notify port {port} is not this handle's")
        if offset is not None and not 0 <= int(offset) < len(segments) * PAGE:
            raise HvError(errno.EINVAL, f"unmap notify offset {offset} outside the region")
        return Notify(segments, None if offset is None else int(offset),
                      None if port is None else int(port))

    def _grant(self, conn: Conn, peer: int, count: int, fds: list[int], notify: Any
               ) -> dict[str, Any]:
        if len(fds) != 1 or not 0 < count <= MAX_PAGES_PER_REQUEST:
            raise HvError(errno.EINVAL, "grant needs one memfd and 1..4096 pages")
        if os.fstat(fds[0]).st_size < count * PAGE:
            raise HvError(errno.EINVAL, "memfd smaller than the pages granted")
        table = self.grants[conn.domid]
        if len(table) + count > self.grant_limit:
            raise HvError(errno.ENOSPC, f"domain {conn.domid} would grant "
                                        f"{len(table) + count} pages; the limit is "
                                        f"{self.grant_limit}")
        fd = os.dup(fds[0])
        refs = []
        for page in range(count):
            ref = self.next_ref[conn.domid]
            self.next_ref[conn.domid] += 1
            table[ref] = Grant(conn.domid, peer, fd, page, conn)
            refs.append(ref)
        note = self._notify_of(notify, [(fd, p) for p in range(count)], conn)
        gid = refs[0]
        conn.grants[gid] = (refs, note)
        return {"refs": refs, "id": gid}

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
        refs, note = conn.grants.pop(gid)
        if notify:
            self._perform(conn, note)
        self._release_grants(conn.domid, refs)

    def _map(self, conn: Conn, peer: int, refs: list[int], notify: Any
             ) -> tuple[dict[str, Any], list[int]]:
        table = self.grants.get(peer, {})
        if not 0 < len(refs) <= MAX_PAGES_PER_REQUEST:
            raise HvError(errno.EINVAL, "map needs 1..4096 refs")
        grants = []
        for ref in refs:
            g = table.get(ref)
            if g is None or g.grantee != conn.domid or g.conn is None:
                raise HvError(errno.EINVAL, f"grant ref {ref} of domain {peer} is not granted "
                                            f"to domain {conn.domid}")
            grants.append(g)
        fds: list[int] = []
        segments = []
        for g in grants:
            if g.fd not in fds:
                fds.append(g.fd)
            segments.append((fds.index(g.fd), g.page))
        note = self._notify_of(notify, [(g.fd, g.page) for g in grants], conn)
        for g in grants:
            g.maps += 1
        mid = conn.next_map
        conn.next_map += 1
        conn.maps[mid] = (peer, refs, note)
        return {"id": mid, "segments": segments}, fds

    def _unmap(self, conn: Conn, mid: int, notify: bool = True) -> None:
        peer, refs, note = conn.maps.pop(mid)
        if notify:
            self._perform(conn, note)
        table = self.grants.get(peer, {})
        released = []
        for ref in refs:
            g = table.get(ref)
            if g is not None:
                g.maps -= 1
                if g.maps == 0 and g.conn is None:
                    released.append(ref)
        self._release_grants(peer, released)

    def _alloc_unbound(self, conn: Conn, peer: int) -> tuple[dict[str, Any], list[int]]:
        # As Xen: a port may be allocated for any domain id; only binding to it needs the
        # domain to exist.
        ours = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        theirs = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        port = self._new_port(conn, peer, ours, theirs)
        return {"port": port.number}, [ours, theirs]

    def _bind(self, conn: Conn, peer: int, remote: int) -> tuple[dict[str, Any], list[int]]:
        rp = self.ports.get(peer, {}).get(remote)
        if rp is None or rp.bound or rp.remote != conn.domid:
            raise HvError(errno.EINVAL, f"port {remote} of domain {peer} is not unbound for "
                                        f"domain {conn.domid}")
        port = self._new_port(conn, peer, os.dup(rp.peer_rx), os.dup(rp.rx))
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
