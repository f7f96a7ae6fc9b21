"""XenStore for the simulated host: xenstored's wire protocol and semantics, one socket per domain.

A connection's domain is the socket it came in on (each domain has its own, as each real
domain has its own xenbus); domain 0 is privileged.  Semantics follow Xen 4.17's C xenstored
(tools/xenstore); the store, permissions, quotas and transactions are in ``xsstore``, with the
C function each part mirrors named there and here.  In short: a new node inherits its parent's
permissions and is owned by the unprivileged domain that created it; reads need r, changes w;
watch events go only to watchers that may read the node or its parent; replies longer than
4096 bytes are E2BIG (large directories are read with DIRECTORY_PART); per-domain quotas on
nodes (checked per request and, for transactions, at commit), watches, transactions, entry
sizes and memory.

No input from one domain stops the server for the others: a bad request gets an error, a
broken stream closes that connection, and a domain that does not read its replies stops being
read (as xenstored stalls it) while its queued watch events are bounded by its memory quota.

Known differences from xenstored, and why:

- A domain may open several sockets (a real domain has one ring, which its kernel shares
  among its processes): the watch and transaction quotas count over all of a domain's sockets,
  as they count over its one ring on Xen; sockets per domU are limited (MAX_CONNECTIONS).
- A domain over its memory quota stops being read only while output to it is queued, so
  that one holding many transaction copies can still end them and its closed sockets are
  noticed (xenstored stalls it until its memory drops).
- Permission entries naming a domain that does not exist are kept as given, not marked
  ignored (domain_adjust_node_perms); only an owner that does not exist is refused (ENOENT).
- INTRODUCE, RELEASE, RESUME and SET_TARGET from dom0 are acknowledged and do nothing (the
  sim's toolstack is its control socket); CONTROL is ENOSYS; no write rate limiting, no
  watch-event timeout; memory accounting follows xenstored's record sizes, not its bytes.

Run alone: ``python -m xsockd.sim.xenstored --dir DIR --domains 0,1,2``.
"""

from __future__ import annotations

import argparse
import errno
import logging
import selectors
import signal
import socket
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from xsockd.backend import XenStorePerm
from xsockd.listeners import listen_unix, make_dir
from xsockd.sim import SOCKET_MODE
from xsockd.sim.acceptpause import PAUSE, AcceptPause
from xsockd.sim.xsstore import (
    DOMID_SELF,
    MAX_ENTRY_SIZE,
    MAX_NODES,
    MAX_OUTSTANDING,
    MAX_PERMS,
    MAX_TRANSACTIONS,
    MAX_WATCHES,
    PERM_OWNER,
    PERM_READ,
    PERM_WRITE,
    REL_PATH_MAX,
    Node,
    Perms,
    Store,
    Transaction,
    View,
    XsErr,
    c_atoi,
    canonicalize,
    child_path,
    format_perms,
    parent_of,
    parse_perms,
    perm_for,
    privileged,
    valid_nodename,
)
from xsockd.xenstore_wire import HEADER, PAYLOAD_MAX, Message, Op, Parser, encode, error_name

__all__ = ["MAX_CONNECTIONS", "XenStoreServer", "XsErr"]

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 64     # sockets one unprivileged domain may hold open (descriptors)
RECV_CHUNK = 8192        # read no more than this ahead of what a stalled domain may send
_OK = b"OK\0"
_NOTID, _PRIV = 1, 2     # wire_funcs flags: XS_FLAG_NOTID, XS_FLAG_PRIV
_SPECIALS = ("@releaseDomain", "@introduceDomain")


@dataclass
class Watch:
    path: str          # absolute, or a special "@..." name
    token: bytes
    relative: bool
    seq: int           # registration order on its connection, for event order


@dataclass
class Outgoing:
    data: bytes
    reply: bool        # a reply (counts as outstanding) or a watch event
    payload: bytes     # an event's payload, for the duplicate check


@dataclass
class Connection:
    sock: socket.socket
    domid: int
    serial: int
    parser: Parser = field(default_factory=Parser)
    inq: deque[Message] = field(default_factory=deque)
    out: deque[Outgoing] = field(default_factory=deque)
    out_off: int = 0
    pending_events: Counter[bytes] = field(default_factory=Counter)
    watches: list[Watch] = field(default_factory=list)
    transactions: dict[int, Transaction] = field(default_factory=dict)
    next_tx: int = 1
    next_watch: int = 0
    mask: int = 0      # events registered with the selector
    open: bool = True


@dataclass
class Request:
    """One request being handled: who asks, in which transaction, through which view."""

    conn: Connection | None    # None for the toolstack's own changes (domain creation)
    msg: Message
    domid: int
    tx: Transaction | None
    view: View


def _onearg(payload: bytes) -> bytes | None:
    """The payload's one NUL-terminated string, or None (onearg)."""
    if not payload or payload.find(b"\0") != len(payload) - 1:
        return None
    return payload[:-1]


def _basename(path: str) -> str:
    return path.rsplit("/", 1)[1]


class XenStoreServer:
    """The store and every domain's listener.  Register with a selector, then serve."""

    def __init__(self) -> None:
        self.store = Store()
        self.domains: set[int] = {0}
        self.listeners: dict[int, socket.socket] = {}
        self.conns: list[Connection] = []
        self.sel: selectors.BaseSelector | None = None
        self.special_perms: dict[str, Perms] = {s: (XenStorePerm(0, "n"),) for s in _SPECIALS}
        self.watch_index: dict[str, list[tuple[Connection, Watch]]] = {}
        self.internal_errors = 0
        self.pause = AcceptPause()
        self._serial = 0
        self._handlers: dict[int, tuple[Callable[[Request], bytes | None], int]] = {
            Op.CONTROL: (self._do_not_supported, _PRIV),
            Op.DIRECTORY: (self._do_directory, 0),
            Op.READ: (self._do_read, 0),
            Op.GET_PERMS: (self._do_get_perms, 0),
            Op.WATCH: (self._do_watch, _NOTID),
            Op.UNWATCH: (self._do_unwatch, _NOTID),
            Op.TRANSACTION_START: (self._do_transaction_start, 0),
            Op.TRANSACTION_END: (self._do_transaction_end, 0),
            Op.INTRODUCE: (self._do_toolstack, _PRIV),
            Op.RELEASE: (self._do_toolstack, _PRIV),
            Op.GET_DOMAIN_PATH: (self._do_get_domain_path, 0),
            Op.WRITE: (self._do_write, 0),
            Op.MKDIR: (self._do_mkdir, 0),
            Op.RM: (self._do_rm, 0),
            Op.SET_PERMS: (self._do_set_perms, 0),
            Op.IS_DOMAIN_INTRODUCED: (self._do_is_domain_introduced, _PRIV),
            Op.RESUME: (self._do_toolstack, _PRIV),
            Op.SET_TARGET: (self._do_toolstack, _PRIV),
            Op.RESET_WATCHES: (self._do_reset_watches, 0),
            Op.DIRECTORY_PART: (self._do_directory_part, 0),
        }
        for p in ("/local", "/local/domain", "/tool"):
            self._toolstack_write(p, b"")

    # ---- wiring -------------------------------------------------------------------------

    def register(self, sel: selectors.BaseSelector) -> None:
        self.sel = sel
        for domid, sock in self.listeners.items():
            sel.register(sock, selectors.EVENT_READ, lambda d=domid: self._accept(d))

    def resume_accepting(self) -> None:
        """Watches again the listeners paused for lack of descriptors (acceptpause)."""
        self.pause.resume(self.sel)

    def add_domain(self, domid: int, socket_path: str) -> None:
        """Listens for ``domid`` at ``socket_path`` and creates its home, as the toolstack does."""
        sock = listen_unix(socket_path, SOCKET_MODE, backlog=64)
        self.listeners[domid] = sock
        if self.sel is not None:
            self.sel.register(sock, selectors.EVENT_READ, lambda: self._accept(domid))
        introduced = domid not in self.domains
        self.domains.add(domid)
        home = f"/local/domain/{domid}"
        if home not in self.store.nodes:
            # As libxl makes them: the home and its domid node belong to dom0 and the domain
            # may read them; its data directory is its own (tests/test_xscorpus.py compares).
            readable = (XenStorePerm(0, "n"), XenStorePerm(domid, "r"))
            self._toolstack_write(home, b"", readable if domid else None)
            self._toolstack_write(f"{home}/domid", str(domid).encode(),
                                  readable if domid else None)
            self._toolstack_write(f"{home}/data", b"", (XenStorePerm(domid, "n"),))
        if introduced and domid != 0:
            self._deliver("@introduceDomain", None, True, None)
        self._settle()

    def remove_domain(self, domid: int) -> None:
        """Closes the domain's connections and listener and removes its home and every other
        node it owns (xl destroy; xenstored's destroy_domain and domain_tree_remove)."""
        sock = self.listeners.pop(domid, None)
        if sock is not None:
            self.pause.unregister(self.sel, sock)
            sock.close()
        for conn in [c for c in self.conns if c.domid == domid]:
            self.drop(conn)
        self._toolstack_rm(f"/local/domain/{domid}")
        self._remove_orphans(domid)
        if domid in self.domains and domid != 0:
            self.domains.discard(domid)
            self._deliver("@releaseDomain", None, True, None)
            for name, perms in self.special_perms.items():
                self.special_perms[name] = self._without_domain(perms, domid)
            self.store.accounts.pop(domid, None)
        self._settle()

    def close(self) -> None:
        for domid in list(self.listeners):
            sock = self.listeners.pop(domid)
            self.pause.unregister(self.sel, sock)
            sock.close()
        for conn in list(self.conns):
            self.drop(conn)

    def nodes_owned_by(self, domid: int) -> list[str]:
        return sorted(p for p, n in self.store.nodes.items() if n.owner == domid)

    # ---- connections and I/O --------------------------------------------------------------

    def _accept(self, domid: int) -> None:
        sock = self.listeners.get(domid)
        if sock is None:
            return
        # Out of descriptors, the listener is left alone a moment rather than spun on; the
        # client waits in the backlog.
        client = self.pause.accept(self.sel, sock)
        if client is None:
            return
        held = sum(1 for c in self.conns if c.domid == domid)
        if not privileged(domid) and held >= MAX_CONNECTIONS:
            client.close()  # its descriptors are bounded like its other resources
            return
        client.setblocking(False)
        self._serial += 1
        conn = Connection(client, domid, self._serial)
        self.conns.append(conn)
        self._set_mask(conn, selectors.EVENT_READ)

    def drop(self, conn: Connection) -> None:
        """Closes a connection and frees everything it held (destroy_conn, ignore_connection)."""
        if not conn.open:
            return
        conn.open = False
        self.conns.remove(conn)
        self._set_mask(conn, 0)
        conn.sock.close()
        self._delete_watches(conn)
        self._delete_transactions(conn)
        acct = self.store.account(conn.domid)
        for o in conn.out:
            acct.memory -= len(o.data)
            acct.queued -= len(o.data)
            if o.reply:
                acct.outstanding -= 1
        conn.out.clear()
        conn.inq.clear()

    def _set_mask(self, conn: Connection, mask: int) -> None:
        if mask == conn.mask or self.sel is None:
            return
        if conn.mask == 0:
            self.sel.register(conn.sock, mask, lambda: self._serve(conn))
        elif mask == 0:
            self.sel.unregister(conn.sock)
        else:
            self.sel.modify(conn.sock, mask, lambda: self._serve(conn))
        conn.mask = mask

    def _stalled(self, domid: int) -> bool:
        """xenstored stops reading a domain with too many unsent replies or too much memory
        (domain_can_read).  Unlike xenstored, memory stalls only while output is queued: a
        domain over its quota through what it holds (transaction copies are charged
        unchecked) can still end its transactions, and its closed sockets are still seen."""
        acct = self.store.account(domid)
        return not privileged(domid) and (acct.outstanding >= MAX_OUTSTANDING
                                          or (acct.queued > 0 and acct.over_memory(domid)))

    def _serve(self, conn: Connection) -> None:
        """The selector's callback for a connection: never raises, whatever the peer sent."""
        try:
            self._flush(conn)
            if conn.open and not conn.inq and not self._stalled(conn.domid):
                self._receive(conn)
            self._settle()
        except Exception:  # a bug must cost this connection, not the host
            self.internal_errors += 1
            log.exception("internal error serving domain %d: connection closed", conn.domid)
            self.drop(conn)

    def _receive(self, conn: Connection) -> None:
        try:
            data = conn.sock.recv(RECV_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.drop(conn)
            return
        try:
            conn.inq.extend(conn.parser.feed(data))
        except ValueError:  # a length over XENSTORE_PAYLOAD_MAX: the stream is lost
            self.drop(conn)

    def _settle(self) -> None:
        """Handles queued requests of domains that may be read, then sets every connection's
        selector interest: read unless its domain is stalled, write while output waits."""
        for conn in list(self.conns):
            while conn.open and conn.inq and not self._stalled(conn.domid):
                self._handle(conn, conn.inq.popleft())
        for conn in self.conns:
            mask = 0 if self._stalled(conn.domid) else selectors.EVENT_READ
            if conn.out:
                mask |= selectors.EVENT_WRITE
            self._set_mask(conn, mask)

    def _queue(self, conn: Connection, out: Outgoing) -> None:
        if not conn.open:
            return
        acct = self.store.account(conn.domid)
        acct.memory += len(out.data)
        acct.queued += len(out.data)
        if out.reply:
            acct.outstanding += 1
        else:
            conn.pending_events[out.payload] += 1
        conn.out.append(out)
        self._flush(conn)

    def _flush(self, conn: Connection) -> None:
        acct = self.store.account(conn.domid)
        while conn.open and conn.out:
            head = conn.out[0]
            try:
                n = conn.sock.send(memoryview(head.data)[conn.out_off:])
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.drop(conn)
                return
            conn.out_off += n
            if conn.out_off < len(head.data):
                return
            conn.out.popleft()
            conn.out_off = 0
            acct.memory -= len(head.data)
            acct.queued -= len(head.data)
            if head.reply:
                acct.outstanding -= 1
            else:
                conn.pending_events[head.payload] -= 1
                if not conn.pending_events[head.payload]:
                    del conn.pending_events[head.payload]

    # ---- replies and events -----------------------------------------------------------------

    def _reply(self, conn: Connection, m: Message, op: int, payload: bytes) -> None:
        """Queues a reply (send_reply): E2BIG past the payload limit, ENOMEM past the memory
        quota for anything longer than an error name."""
        if len(payload) > PAYLOAD_MAX:
            op, payload = Op.ERROR, b"E2BIG\0"
        elif len(payload) > 16 and self.store.account(conn.domid).over_memory(
                conn.domid, len(payload) + HEADER.size):
            op, payload = Op.ERROR, b"ENOMEM\0"
        self._queue(conn, Outgoing(encode(op, m.req_id, m.tx_id, payload), True, b""))

    def _event(self, conn: Connection, path: bytes, token: bytes) -> None:
        """Queues a watch event (send_event): dropped if too long, already pending, or past
        the watcher's memory quota."""
        payload = path + b"\0" + token + b"\0"
        if len(payload) > PAYLOAD_MAX:
            return
        if not path.startswith(b"@") and conn.pending_events[payload]:
            return
        if self.store.account(conn.domid).over_memory(conn.domid, len(payload) + HEADER.size):
            return
        self._queue(conn, Outgoing(encode(Op.WATCH_EVENT, 0, 0, payload), False, payload))

    # ---- requests -----------------------------------------------------------------------

    def _handle(self, conn: Connection, m: Message) -> None:
        """Answers one request (process_message)."""
        entry = self._handlers.get(m.op)
        try:
            if entry is None:
                raise XsErr(errno.ENOSYS)
            handler, flags = entry
            if flags & _PRIV and not privileged(conn.domid):
                raise XsErr(errno.EACCES)
            tx = None
            if not flags & _NOTID and m.tx_id:
                tx = conn.transactions.get(m.tx_id)
                if tx is None:
                    raise XsErr(errno.ENOENT)
            req = Request(conn, m, conn.domid, tx, self.store.view(conn.domid, tx))
            reply = handler(req)
        except XsErr as e:
            self._reply(conn, m, Op.ERROR, error_name(e.code).encode() + b"\0")
            return
        if reply is not None and conn.open:
            self._reply(conn, m, m.op, reply)

    def _get_node(self, req: Request, raw: bytes | None, want: int,
                  missing_ok: bool = False) -> tuple[str, Node | None]:
        """The node named by raw if req may access it for ``want`` (get_node): EINVAL for a
        malformed or special name; for a missing or forbidden node ENOENT or EACCES as the
        nearest existing ancestor allows (errno_from_parents).  With ``missing_ok`` a missing
        node the ancestor lets us at is returned as None."""
        if raw is None:
            raise XsErr(errno.EINVAL)
        name_b = canonicalize(req.domid, raw)
        if not valid_nodename(name_b):
            raise XsErr(errno.EINVAL)
        name = name_b.decode("ascii")
        node = req.view.get(name)
        if node is not None and perm_for(req.domid, node.perms) & want == want:
            return name, node
        err = errno.ENOENT if node is None else errno.EACCES
        if not self._ancestor_allows(req, name, want):
            err = errno.EACCES
        if err == errno.ENOENT and missing_ok:
            return name, None
        raise XsErr(err)

    def _ancestor_allows(self, req: Request, name: str, want: int) -> bool:
        """Whether the nearest existing ancestor grants any of ``want`` (ask_parents)."""
        path = name
        while path != "/":  # parent_of shortens every path, so this ends at the root
            path = parent_of(path)
            node = req.view.get(path)
            if node is not None:
                return bool(perm_for(req.domid, node.perms) & want)
        return False

    def _do_read(self, req: Request) -> bytes:
        _, node = self._get_node(req, _onearg(req.msg.payload), PERM_READ)
        assert node is not None
        return node.value

    def _do_directory(self, req: Request) -> bytes:
        _, node = self._get_node(req, _onearg(req.msg.payload), PERM_READ)
        assert node is not None
        return b"".join(c.encode() + b"\0" for c in node.children)

    def _do_directory_part(self, req: Request) -> bytes:
        """One part of a child list that may exceed a reply (send_directory_part): the
        node's generation, then as many whole names from byte offset ``off`` as fit, then an
        empty string once the list is complete."""
        payload = req.msg.payload
        if payload.count(b"\0") != 2:
            raise XsErr(errno.EINVAL)
        raw, off_raw, _ = payload.split(b"\0")
        _, node = self._get_node(req, raw, PERM_READ)
        assert node is not None
        off = c_atoi(off_raw)
        gen = str(node.gen).encode() + b"\0"
        if off >= node.childlen:
            return gen + b"\0"
        children = b"".join(c.encode() + b"\0" for c in node.children)
        maxlen = PAYLOAD_MAX - len(gen) - 1
        length = 0
        while True:
            name_len = children.index(b"\0", off + length) - (off + length)
            if length + name_len >= maxlen:
                break
            length += name_len + 1
            if off + length == node.childlen:
                break
        end = b"\0" if off + length == node.childlen else b""
        return gen + children[off:off + length] + end

    def _do_get_perms(self, req: Request) -> bytes:
        _, node = self._get_node(req, _onearg(req.msg.payload), PERM_READ)
        assert node is not None
        return format_perms(node.perms)

    def _do_write(self, req: Request) -> bytes:
        payload = req.msg.payload
        if b"\0" not in payload:
            raise XsErr(errno.EINVAL)
        raw, value = payload.split(b"\0", 1)
        name, node = self._get_node(req, raw, PERM_WRITE, missing_ok=True)
        if node is None:
            node = self._create_node(req, name, value)
        else:
            node = req.view.put(name, replace(node, value=value), check=True)
        self._fire(req, name, node, False, None)
        return _OK

    def _do_mkdir(self, req: Request) -> bytes:
        name, node = self._get_node(req, _onearg(req.msg.payload), PERM_WRITE, missing_ok=True)
        if node is None:
            node = self._create_node(req, name, b"")
            self._fire(req, name, node, False, None)
        return _OK

    def _create_node(self, req: Request, name: str, value: bytes) -> Node:
        """Creates name and its missing ancestors (construct_node, create_node): each
        inherits its parent's permissions and belongs to the unprivileged domain creating
        it.  All or nothing: quotas are checked before anything is written."""
        missing = [name]
        parent_path = parent_of(name)
        parent = req.view.get(parent_path)
        while parent is None:  # ends: parent_of shortens the path and "/" always exists
            if parent_path == "/":
                raise XsErr(errno.EIO)  # no root: never, but no loop either
            missing.append(parent_path)
            parent_path = parent_of(parent_path)
            parent = req.view.get(parent_path)
        self._check_node_quota(req, len(missing))
        writes = [(parent_path, parent.with_child(_basename(missing[-1])))]
        perms = parent.perms
        if not privileged(req.domid):
            perms = (XenStorePerm(req.domid, perms[0].perm), *perms[1:])
        for i, path in enumerate(reversed(missing)):
            node = Node(value if path == name else b"", perms)
            if path != name:
                node = node.with_child(_basename(missing[-2 - i]))
            writes.append((path, node))
        self._check_writes(req, writes)
        for path, node in writes:
            written = req.view.put(path, node, check=False)
        for _ in missing:
            req.view.count_entry(perms[0].domid, +1)
        if req.tx is not None:
            req.tx.node_created = True
        return written

    def _check_node_quota(self, req: Request, new: int) -> None:
        """ENOSPC past the node quota: each new node is checked against the domain's
        committed count; a transaction's own nodes count only at its commit (create_node)."""
        if privileged(req.domid):
            return
        have = self.store.account(req.domid).nbentry
        if (have + new > MAX_NODES) if req.tx is None else (have >= MAX_NODES):
            raise XsErr(errno.ENOSPC)

    def _check_writes(self, req: Request, writes: list[tuple[str, Node]]) -> None:
        """ENOSPC for an over-long record, ENOMEM past the memory quota (write_node_raw,
        domain_memory_add), for a domU's writes."""
        if privileged(req.domid):
            return
        if any(node.record_size() >= MAX_ENTRY_SIZE for _, node in writes):
            raise XsErr(errno.ENOSPC)
        cost = sum(node.record_size() + len(path) for path, node in writes)
        if self.store.account(req.domid).over_memory(req.domid, cost):
            raise XsErr(errno.ENOMEM)

    def _do_rm(self, req: Request) -> bytes:
        name, node = self._get_node(req, _onearg(req.msg.payload), PERM_WRITE, missing_ok=True)
        if node is None:  # removing a missing node is fine if its parent exists (do_rm)
            if req.view.get(parent_of(name)) is None:
                raise XsErr(errno.ENOENT)
            return _OK
        if name == "/":
            raise XsErr(errno.EINVAL)
        self._rm_node(req, name)
        return _OK

    def _rm_node(self, req: Request, name: str) -> None:
        """Removes a subtree (rm_node, delnode_sub): each node's watches fire while its
        permissions are known, the subtree's root for watches above it too."""
        parent_path = parent_of(name)
        if req.view.get(parent_path) is None:
            raise XsErr(errno.EINVAL)
        for path, node in list(req.view.walk_post_order(name)):
            req.view.delete(path)
            self._fire(req, path, node, path != name, None)
            req.view.count_entry(node.owner, -1)
        parent = req.view.get(parent_path)
        assert parent is not None
        req.view.put(parent_path, parent.without_child(_basename(name)), check=False)

    def _do_set_perms(self, req: Request) -> bytes:
        """do_set_perms: only the owner (or dom0) changes permissions, only dom0 the owner."""
        payload = req.msg.payload
        count = payload.count(b"\0")
        if count < 2:
            raise XsErr(errno.EINVAL)
        if not privileged(req.domid) and count - 1 > MAX_PERMS:
            raise XsErr(errno.ENOSPC)
        parts = payload.split(b"\0")
        perms = parse_perms(parts[1:count])
        if perms[0].domid not in self.domains:
            raise XsErr(errno.ENOENT)  # an owner that does not exist (domain_alloc_permrefs)
        if parts[0].startswith(b"@"):
            self._set_perms_special(req, parts[0], perms)
            return _OK
        name, node = self._get_node(req, parts[0], PERM_WRITE | PERM_OWNER)
        assert node is not None
        if not privileged(req.domid) and perms[0].domid != node.owner:
            raise XsErr(errno.EPERM)
        new = req.view.put(name, replace(node, perms=perms), check=True)
        if node.owner != new.owner:
            req.view.count_entry(node.owner, -1)
            req.view.count_entry(new.owner, +1)
        self._fire(req, name, new, False, node.perms)
        return _OK

    def _set_perms_special(self, req: Request, raw: bytes, perms: Perms) -> None:
        name = raw.decode("latin-1")
        if name not in self.special_perms:
            raise XsErr(errno.EINVAL)
        want = PERM_WRITE | PERM_OWNER
        if perm_for(req.domid, self.special_perms[name]) & want != want:
            raise XsErr(errno.EACCES)
        self.special_perms[name] = perms

    def _do_watch(self, req: Request) -> None:
        """do_watch: a valid path or any "@" name, no duplicate, the watch quota; the reply,
        then one event at once."""
        conn = req.conn
        assert conn is not None
        raw, token = _path_and_token(req.msg.payload)
        if raw.startswith(b"@"):
            relative = False
            if len(raw) > REL_PATH_MAX:
                raise XsErr(errno.EINVAL)
            path = raw.decode("latin-1")
        else:
            relative = not raw.startswith(b"/")
            full = canonicalize(conn.domid, raw)
            if not valid_nodename(full):
                raise XsErr(errno.EINVAL)
            path = full.decode("ascii")
        if any(w.path == path and w.token == token for w in conn.watches):
            raise XsErr(errno.EEXIST)
        acct = self.store.account(conn.domid)
        if not privileged(conn.domid) and acct.nbwatch > MAX_WATCHES:
            raise XsErr(errno.E2BIG)
        self.store.charge(conn.domid, len(path) + len(token), check=True)
        conn.next_watch += 1
        watch = Watch(path, token, relative, conn.next_watch)
        conn.watches.append(watch)
        acct.nbwatch += 1
        self.watch_index.setdefault(path, []).append((conn, watch))
        self._reply(conn, req.msg, Op.WATCH, _OK)
        self._event(conn, self._event_path(conn, watch, path), token)
        return None

    def _do_unwatch(self, req: Request) -> bytes:
        conn = req.conn
        assert conn is not None
        raw, token = _path_and_token(req.msg.payload)
        path = canonicalize(conn.domid, raw).decode("latin-1")
        for w in conn.watches:
            if w.path == path and w.token == token:
                self._delete_watch(conn, w)
                return _OK
        raise XsErr(errno.ENOENT)

    def _do_reset_watches(self, req: Request) -> bytes:
        """do_reset_watches: every watch and transaction of the connection goes."""
        assert req.conn is not None
        self._delete_watches(req.conn)
        self._delete_transactions(req.conn)
        return _OK

    def _delete_watch(self, conn: Connection, w: Watch) -> None:
        conn.watches.remove(w)
        self.store.charge(conn.domid, -(len(w.path) + len(w.token)), False)
        acct = self.store.account(conn.domid)
        acct.nbwatch = max(0, acct.nbwatch - 1)
        watchers = self.watch_index.get(w.path, [])
        watchers[:] = [(c, x) for c, x in watchers if x is not w]
        if not watchers:
            self.watch_index.pop(w.path, None)

    def _delete_watches(self, conn: Connection) -> None:
        for w in list(conn.watches):
            self._delete_watch(conn, w)

    def _delete_transactions(self, conn: Connection) -> None:
        for tx in conn.transactions.values():
            self.store.release(tx)
        conn.transactions.clear()

    def _do_transaction_start(self, req: Request) -> bytes:
        conn = req.conn
        assert conn is not None
        if req.tx is not None:
            raise XsErr(errno.EBUSY)  # no nesting
        acct = self.store.account(conn.domid)
        if not privileged(conn.domid) and acct.ntrans > MAX_TRANSACTIONS:
            raise XsErr(errno.ENOSPC)
        while conn.next_tx == 0 or conn.next_tx in conn.transactions:
            conn.next_tx = (conn.next_tx + 1) & 0xFFFFFFFF
        tx_id = conn.next_tx
        conn.next_tx = (conn.next_tx + 1) & 0xFFFFFFFF
        conn.transactions[tx_id] = Transaction(tx_id, conn.domid)
        acct.ntrans += 1
        return str(tx_id).encode() + b"\0"

    def _do_transaction_end(self, req: Request) -> bytes:
        """do_transaction_end: the node quota is checked for the committed result; a node
        read meanwhile changed by someone else makes the commit fail with EAGAIN."""
        arg = _onearg(req.msg.payload)
        if arg not in (b"T", b"F"):
            raise XsErr(errno.EINVAL)
        tx, conn = req.tx, req.conn
        if tx is None or conn is None:
            raise XsErr(errno.ENOENT)
        del conn.transactions[tx.id]
        try:
            if arg != b"T":
                return _OK
            fired = self.store.commit(tx, tx.node_created and not privileged(conn.domid))
        finally:
            self.store.release(tx)
        for path, a in fired:  # with the permissions the node had when first touched
            self._deliver(path, None, a.watch_exact, a.perms)
        return _OK

    def _do_get_domain_path(self, req: Request) -> bytes:
        arg = _onearg(req.msg.payload)
        if arg is None:
            raise XsErr(errno.EINVAL)
        return b"/local/domain/%d\0" % c_atoi(arg)

    def _do_is_domain_introduced(self, req: Request) -> bytes:
        """Privileged domains only (XS_FLAG_PRIV; EACCES otherwise)."""
        arg = _onearg(req.msg.payload)
        if arg is None:
            raise XsErr(errno.EINVAL)
        domid = c_atoi(arg)
        return b"T\0" if domid == DOMID_SELF or domid in self.domains else b"F\0"

    def _do_toolstack(self, req: Request) -> bytes:
        return _OK  # the sim's toolstack acts through its control socket, not these

    def _do_not_supported(self, req: Request) -> bytes:
        raise XsErr(errno.ENOSYS)

    # ---- watches ------------------------------------------------------------------------

    def _fire(self, req: Request, name: str, node: Node | None, exact: bool,
              perms: Perms | None) -> None:
        """Fires watches now, or marks them for the transaction's commit (fire_watches,
        queue_watches: a non-exact event replaces an exact one)."""
        if req.tx is None:
            self._deliver(name, node, exact, perms)
            return
        a = req.tx.accessed.get(name)
        if a is None:
            req.tx.fail = True
            return
        a.watch_exact = exact if not a.fire_watch else a.watch_exact and exact
        a.fire_watch = True

    def _deliver(self, name: str, node: Node | None, exact: bool,
                 perms: Perms | None) -> None:
        """Sends the events for a change of name to every watcher allowed to see it."""
        if exact or name.startswith("@"):
            candidates = list(self.watch_index.get(name, ()))
        else:  # the watches on name and on each of its ancestors
            candidates = []
            path = name
            while True:
                candidates += self.watch_index.get(path, ())
                if path == "/":
                    break
                path = parent_of(path)
        candidates.sort(key=lambda cw: (cw[0].serial, cw[1].seq))
        allowed: dict[int, bool] = {}
        for conn, w in candidates:
            if conn.domid not in allowed:
                allowed[conn.domid] = self._watch_permitted(conn.domid, name, node, perms)
            if allowed[conn.domid] and conn.open:
                self._event(conn, self._event_path(conn, w, name), w.token)

    def _watch_permitted(self, domid: int, name: str, node: Node | None,
                         perms: Perms | None) -> bool:
        """watch_permitted / check_perms_special: the node's old or current permissions, or
        its parent's, let the watcher read; a node that is gone and had no recorded
        permissions (created and removed in one transaction) is seen by nobody."""
        if name.startswith("@"):
            special = self.special_perms.get(name)
            return special is not None and bool(perm_for(domid, special) & PERM_READ)
        if perms is not None and perm_for(domid, perms) & PERM_READ:
            return True
        if node is None:
            node = self.store.nodes.get(name)
            if node is None:
                return False
        if perm_for(domid, node.perms) & PERM_READ:
            return True
        parent = self.store.nodes.get(parent_of(name))
        return parent is not None and bool(perm_for(domid, parent.perms) & PERM_READ)

    @staticmethod
    def _event_path(conn: Connection, w: Watch, name: str) -> bytes:
        """The path an event names: relative to the home for a relative watch."""
        if w.relative:
            prefix = f"/local/domain/{conn.domid}"
            if name.startswith(prefix):
                name = name[len(prefix):]
                name = name[1:] if name.startswith("/") else name
        return name.encode("latin-1")

    # ---- the toolstack's own changes ----------------------------------------------------

    def _toolstack_request(self) -> Request:
        return Request(None, Message(0, 0, 0, b""), 0, None, self.store.view(0, None))

    def _toolstack_write(self, path: str, value: bytes, perms: Perms | None = None) -> None:
        req = self._toolstack_request()
        node = req.view.get(path)
        if node is None:
            node = self._create_node(req, path, value)
        self._fire(req, path, node, False, None)
        if perms is not None:
            new = req.view.put(path, replace(node, perms=perms), check=False)
            req.view.count_entry(node.owner, -1)
            req.view.count_entry(new.owner, +1)

    def _toolstack_rm(self, path: str) -> None:
        req = self._toolstack_request()
        if path in self.store.nodes:
            self._rm_node(req, path)

    def _remove_orphans(self, domid: int) -> None:
        """Removes every node the domain still owns (domain_tree_remove, no keep_orphans)."""
        if domid == 0:
            return
        req = self._toolstack_request()
        todo = ["/"]
        while todo:
            path = todo.pop()
            node = self.store.nodes.get(path)
            if node is None:
                continue
            if path != "/" and node.owner == domid:
                self._rm_node(req, path)
                continue
            todo.extend(child_path(path, c) for c in reversed(node.children))

    @staticmethod
    def _without_domain(perms: Perms, domid: int) -> Perms:
        """remove_domid_from_perm: a gone owner becomes dom0, its other entries go."""
        owner = perms[0]
        if owner.domid == domid:
            owner = XenStorePerm(0, owner.perm)
        return (owner, *(p for p in perms[1:] if p.domid != domid))


def main() -> int:
    p = argparse.ArgumentParser(description="A XenStore server for simulated domains.")
    p.add_argument("--dir", required=True, help="creates DIR/dom<N>/xenstored.sock per domain")
    p.add_argument("--domains", default="0,1,2", help="comma-separated domain ids")
    args = p.parse_args()
    sel = selectors.DefaultSelector()
    server = XenStoreServer()
    server.register(sel)
    for d in (int(x) for x in args.domains.split(",")):
        make_dir(f"{args.dir}/dom{d}")
        server.add_domain(d, f"{args.dir}/dom{d}/xenstored.sock")
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    print("ready", flush=True)
    try:
        while True:
            for key, _ in sel.select(PAUSE if server.pause.paused else None):
                key.data()
            server.resume_accepting()
    except KeyboardInterrupt:
        pass
    server.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def _path_and_token(payload: bytes) -> tuple[bytes, bytes]:
    """Returns the path and token of a WATCH or UNWATCH payload ("path\\0token\\0")."""
    if payload.count(b"\0") != 2:
        raise XsErr(errno.EINVAL)
    raw, token, _ = payload.split(b"\0")
    return raw, token
