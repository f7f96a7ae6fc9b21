"""XenStore for the simulated host: xenstored's wire protocol and semantics, one socket per domain.

A connection's domain is the socket it came in on (each domain has its own, as each real
domain has its own xenbus); domain 0 is privileged.  Semantics follow C xenstored: a new node
inherits its parent's permissions and is owned by the unprivileged domain that created it;
reads need r, changes need w (on the node, or on the nearest existing ancestor when creating);
the first permission entry names the owner and everyone else's access; watch events go only to
watchers that may read the changed node; per-domain limits on watches, transactions, nodes and
value sizes.  Transactions see their own writes and fail with EAGAIN at commit if a node they
touched was changed by someone else meanwhile.

Run alone: ``python -m xsockd.sim.xenstored --dir DIR --domains 0,1,2``.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import selectors
import signal
import socket
from dataclasses import dataclass, field, replace

from xsockd.backend import XenStorePerm
from xsockd.xenstore_wire import Message, Op, Parser, encode, error_name, split_strings

__all__ = ["XenStoreServer"]

MAX_WATCHES = 128        # per domain, as C xenstored's quota
MAX_TRANSACTIONS = 10    # per domain
MAX_NODES = 1000         # per domain
MAX_VALUE = 2048         # bytes, for unprivileged domains
MAX_PATH = 3072
_VALID = re.compile(r"[A-Za-z0-9/_@-]+")


class XsErr(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class _Sent(XsErr):
    """Raised by a handler that already sent its reply (WATCH: the reply, then an event)."""

    def __init__(self) -> None:
        super().__init__(0)


@dataclass(frozen=True)
class Node:
    value: bytes
    perms: tuple[XenStorePerm, ...]
    children: frozenset[str] = frozenset()
    gen: int = 0

    @property
    def owner(self) -> int:
        return self.perms[0].domid


Store = dict[str, Node]


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def _allowed(domid: int, node: Node, want: str) -> bool:
    if domid == 0 or domid == node.owner:
        return True
    perm = node.perms[0].perm
    for p in node.perms[1:]:
        if p.domid == domid:
            perm = p.perm
            break
    return perm == "b" or perm == want


@dataclass
class Transaction:
    store: Store
    base_gen: int
    touched: set[str] = field(default_factory=set)
    changed: set[str] = field(default_factory=set)
    targets: list[str] = field(default_factory=list)   # paths to fire watches for at commit


@dataclass
class Watch:
    path: str       # absolute
    token: str
    relative: bool


class Connection:
    def __init__(self, server: XenStoreServer, sock: socket.socket, domid: int) -> None:
        self.server, self.sock, self.domid = server, sock, domid
        self.parser = Parser()
        self.watches: list[Watch] = []
        self.transactions: dict[int, Transaction] = {}
        self.out = bytearray()

    def send(self, data: bytes) -> None:
        self.out += data
        try:
            n = self.sock.send(self.out)
            del self.out[:n]
        except BlockingIOError:
            pass
        except OSError:
            self.server.drop(self)
            return
        if len(self.out) > 4 << 20:  # a client that never reads its watch events
            self.server.drop(self)


class XenStoreServer:
    """The store and every domain's listener.  Register with a selector, then serve."""

    def __init__(self) -> None:
        self.store: Store = {"/": Node(b"", (XenStorePerm(0, "n"),))}
        self.gen = 1
        self.deleted: dict[str, int] = {}
        self.listeners: dict[int, socket.socket] = {}
        self.conns: list[Connection] = []
        self.sel: selectors.BaseSelector | None = None
        self._next_tx = 1
        for p in ("/local", "/local/domain", "/tool"):
            self._create(self.store, 0, p, b"")

    # ---- wiring -------------------------------------------------------------------------

    def register(self, sel: selectors.BaseSelector) -> None:
        self.sel = sel
        for domid, sock in self.listeners.items():
            sel.register(sock, selectors.EVENT_READ, lambda d=domid: self._accept(d))

    def add_domain(self, domid: int, socket_path: str) -> None:
        """Listens for ``domid`` at ``socket_path`` and creates its home, as the toolstack does."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if os.path.exists(socket_path):
            os.unlink(socket_path)
        sock.bind(socket_path)
        sock.listen(64)
        sock.setblocking(False)
        self.listeners[domid] = sock
        if self.sel is not None:
            self.sel.register(sock, selectors.EVENT_READ, lambda: self._accept(domid))
        home = f"/local/domain/{domid}"
        if home not in self.store:
            self._create(self.store, 0, home, b"")
            self._set(self.store, home, perms=(XenStorePerm(domid, "n"),))
            self._create(self.store, 0, f"{home}/domid", str(domid).encode())
            self._create(self.store, 0, f"{home}/data", b"")
            self._set(self.store, f"{home}/data", perms=(XenStorePerm(domid, "n"),))
            self._fire([home], special="@introduceDomain")

    def remove_domain(self, domid: int) -> None:
        """Closes the domain's connections and listener and removes its home (xl destroy)."""
        sock = self.listeners.pop(domid, None)
        if sock is not None:
            if self.sel is not None:
                self.sel.unregister(sock)
            sock.close()
        for conn in [c for c in self.conns if c.domid == domid]:
            self.drop(conn)
        home = f"/local/domain/{domid}"
        if home in self.store:
            removed = self._remove(self.store, home)
            self._fire(removed, special="@releaseDomain")

    def close(self) -> None:
        for domid in list(self.listeners):
            sock = self.listeners.pop(domid)
            if self.sel is not None:
                self.sel.unregister(sock)
            sock.close()
        for conn in list(self.conns):
            self.drop(conn)

    def nodes_owned_by(self, domid: int) -> list[str]:
        return sorted(p for p, n in self.store.items() if n.owner == domid)

    def _accept(self, domid: int) -> None:
        sock = self.listeners.get(domid)
        if sock is None:
            return
        try:
            client, _ = sock.accept()
        except BlockingIOError:
            return
        client.setblocking(False)
        conn = Connection(self, client, domid)
        self.conns.append(conn)
        assert self.sel is not None
        self.sel.register(client, selectors.EVENT_READ, lambda: self._readable(conn))

    def drop(self, conn: Connection) -> None:
        if conn in self.conns:
            self.conns.remove(conn)
            if self.sel is not None:
                self.sel.unregister(conn.sock)
            conn.sock.close()

    def _readable(self, conn: Connection) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.drop(conn)
            return
        try:
            messages = conn.parser.feed(data)
        except ValueError:
            self.drop(conn)  # garbage header: a hostile or broken client
            return
        for m in messages:
            if conn not in self.conns:
                return
            self._handle(conn, m)

    # ---- store primitives ---------------------------------------------------------------

    def _bump(self) -> int:
        self.gen += 1
        return self.gen

    def _set(self, store: Store, path: str, **changes: object) -> None:
        store[path] = replace(store[path], gen=self._bump(), **changes)  # type: ignore[arg-type]

    def _create(self, store: Store, domid: int, path: str, value: bytes) -> list[str]:
        """Creates path and missing parents; returns the created paths.  No checks."""
        created: list[str] = []
        missing = []
        p = path
        while p not in store:
            missing.append(p)
            p = _parent(p)
        for p in reversed(missing):
            parent = store[_parent(p)]
            perms = parent.perms
            if domid != 0:
                perms = (XenStorePerm(domid, perms[0].perm), *perms[1:])
            store[p] = Node(value if p == path else b"", perms, frozenset(), self._bump())
            store[_parent(p)] = replace(parent, children=parent.children | {p.rsplit("/", 1)[1]},
                                        gen=self._bump())
            created.append(p)
        return created

    def _remove(self, store: Store, path: str) -> list[str]:
        """Removes path and its subtree from store; returns the removed paths."""
        removed = []
        stack = [path]
        while stack:
            p = stack.pop()
            node = store.pop(p)
            removed.append(p)
            if store is self.store:  # a transaction's removals count when it commits
                self.deleted[p] = self._bump()
            stack.extend(f"{p}/{c}" if p != "/" else f"/{c}" for c in node.children)
        parent = store[_parent(path)]
        store[_parent(path)] = replace(parent, children=parent.children - {path.rsplit("/", 1)[1]},
                                       gen=self._bump())
        return removed

    # ---- requests -----------------------------------------------------------------------

    def _abs(self, conn: Connection, raw: bytes) -> str:
        try:
            path = raw.decode("ascii")
        except UnicodeDecodeError:
            raise XsErr(errno.EINVAL) from None
        if not path.startswith("/") and not path.startswith("@"):
            path = f"/local/domain/{conn.domid}/{path}"
        if (len(path) > MAX_PATH or not _VALID.fullmatch(path) or "//" in path
                or (path.endswith("/") and path != "/")):
            raise XsErr(errno.EINVAL)
        return path

    def _handle(self, conn: Connection, m: Message) -> None:
        try:
            reply = self._dispatch(conn, m)
            op = m.op
        except _Sent:
            return
        except XsErr as e:
            reply, op = error_name(e.code).encode() + b"\0", Op.ERROR
        conn.send(encode(op, m.req_id, m.tx_id, reply))

    def _view(self, conn: Connection, tx_id: int) -> tuple[Store, Transaction | None]:
        if tx_id == 0:
            return self.store, None
        tx = conn.transactions.get(tx_id)
        if tx is None:
            raise XsErr(errno.ENOENT)
        return tx.store, tx

    def _dispatch(self, conn: Connection, m: Message) -> bytes:
        args = split_strings(m.payload)
        store, tx = self._view(conn, m.tx_id)
        dom = conn.domid
        ok = b"OK\0"

        def node_for(path: str, want: str) -> Node:
            if tx:
                tx.touched.add(path)
            node = store.get(path)
            if node is None:
                raise XsErr(errno.ENOENT)
            if not _allowed(dom, node, want):
                raise XsErr(errno.EACCES)
            return node

        if m.op in (Op.READ, Op.DIRECTORY, Op.GET_PERMS, Op.DIRECTORY_PART):
            if not args:
                raise XsErr(errno.EINVAL)
            path = self._abs(conn, args[0])
            node = node_for(path, "r")
            if m.op == Op.READ:
                return node.value
            if m.op == Op.GET_PERMS:
                return b"".join(str(p).encode() + b"\0" for p in node.perms)
            names = sorted(node.children)
            if m.op == Op.DIRECTORY:
                return b"".join(n.encode() + b"\0" for n in names)
            offset = int(args[1]) if len(args) > 1 and args[1].isdigit() else 0
            body = b"".join(n.encode() + b"\0" for n in names)[offset:]
            return str(node.gen).encode() + b"\0" + body + b"\0"
        if m.op in (Op.WRITE, Op.MKDIR):
            if not m.payload or b"\0" not in m.payload:
                raise XsErr(errno.EINVAL)
            raw, value = m.payload.split(b"\0", 1)
            path = self._abs(conn, raw)
            if m.op == Op.MKDIR:
                value = b""
            if dom != 0 and len(value) > MAX_VALUE:
                raise XsErr(errno.E2BIG)
            if self._write(store, tx, dom, path, value, m.op == Op.MKDIR):
                self._fire_or_defer(tx, path)
            return ok
        if m.op == Op.RM:
            path = self._abs(conn, args[0] if args else b"")
            if path == "/":
                raise XsErr(errno.EINVAL)
            if tx:
                tx.touched.add(path)
            if path not in store:
                if _parent(path) in store:
                    return ok  # as xenstored: removing a missing child of an existing node
                raise XsErr(errno.ENOENT)
            root = node_for(path, "w")
            removed = self._remove(store, path)
            if tx:
                tx.changed.update(removed)
                tx.changed.add(_parent(path))
            self._fire_or_defer(tx, path, dict.fromkeys(removed, root))
            return ok
        if m.op == Op.SET_PERMS:
            if len(args) < 2:
                raise XsErr(errno.EINVAL)
            path = self._abs(conn, args[0])
            node = node_for(path, "w")
            if dom != 0 and dom != node.owner:
                raise XsErr(errno.EPERM)
            try:
                perms = tuple(XenStorePerm.parse(a.decode()) for a in args[1:])
            except (ValueError, UnicodeDecodeError):
                raise XsErr(errno.EINVAL) from None
            if dom != 0 and perms[0].domid != node.owner:
                raise XsErr(errno.EPERM)  # only dom0 gives a node away
            self._set(store, path, perms=perms)
            if tx:
                tx.changed.add(path)
            self._fire_or_defer(tx, path)
            return ok
        if m.op == Op.WATCH:
            if len(args) < 2:
                raise XsErr(errno.EINVAL)
            rel = not args[0].startswith(b"/") and not args[0].startswith(b"@")
            path = self._abs(conn, args[0])
            if sum(len(c.watches) for c in self.conns if c.domid == dom) >= MAX_WATCHES \
                    and dom != 0:
                raise XsErr(errno.E2BIG)
            w = Watch(path, args[1].decode(errors="replace"), rel)
            conn.watches.append(w)
            conn.send(encode(Op.WATCH, m.req_id, 0, ok))
            self._send_event(conn, w, path)  # fires once at once, after the reply
            raise _Sent()
        if m.op == Op.UNWATCH:
            if len(args) < 2:
                raise XsErr(errno.EINVAL)
            path = self._abs(conn, args[0])
            token = args[1].decode(errors="replace")
            for w in conn.watches:
                if w.path == path and w.token == token:
                    conn.watches.remove(w)
                    return ok
            raise XsErr(errno.ENOENT)
        if m.op == Op.RESET_WATCHES:
            conn.watches.clear()
            return ok
        if m.op == Op.TRANSACTION_START:
            if m.tx_id:
                raise XsErr(errno.EBUSY)
            if dom != 0 and sum(len(c.transactions) for c in self.conns
                                if c.domid == dom) >= MAX_TRANSACTIONS:
                raise XsErr(errno.ENOSPC)
            tx_id = self._next_tx
            self._next_tx += 1
            conn.transactions[tx_id] = Transaction(dict(self.store), self.gen)
            return str(tx_id).encode() + b"\0"
        if m.op == Op.TRANSACTION_END:
            if tx is None:
                raise XsErr(errno.ENOENT)
            del conn.transactions[m.tx_id]
            if args[:1] != [b"T"]:
                return ok
            self._commit(tx)
            return ok
        if m.op == Op.GET_DOMAIN_PATH:
            if not args or not args[0].isdigit():
                raise XsErr(errno.EINVAL)
            return f"/local/domain/{int(args[0])}".encode() + b"\0"
        if m.op == Op.IS_DOMAIN_INTRODUCED:
            if not args or not args[0].isdigit():
                raise XsErr(errno.EINVAL)
            return b"T\0" if int(args[0]) in self.listeners else b"F\0"
        if m.op in (Op.INTRODUCE, Op.RELEASE, Op.SET_TARGET, Op.RESUME):
            if dom != 0:
                raise XsErr(errno.EACCES)
            return ok
        raise XsErr(errno.ENOSYS)

    def _write(self, store: Store, tx: Transaction | None, dom: int, path: str, value: bytes,
               mkdir: bool) -> list[str]:
        if tx:
            tx.touched.add(path)
        node = store.get(path)
        if node is not None:
            if not _allowed(dom, node, "w"):
                raise XsErr(errno.EACCES)
            if mkdir:
                return []
            self._set(store, path, value=value)
            changed = [path]
        else:
            anc = path
            while anc not in store:
                anc = _parent(anc)
            if not _allowed(dom, store[anc], "w"):
                raise XsErr(errno.EACCES)
            if dom != 0 and sum(1 for n in store.values() if n.owner == dom) >= MAX_NODES:
                raise XsErr(errno.ENOSPC)
            changed = self._create(store, dom, path, value)
            changed.append(anc)
        if tx:
            tx.changed.update(changed)
        return changed

    def _fire_or_defer(self, tx: Transaction | None, path: str,
                       gone: dict[str, Node] | None = None) -> None:
        """Fires watches for a change to path now, or at the commit of its transaction."""
        if tx is None:
            self._fire([path], perms_of=gone)
        else:
            tx.targets.append(path)

    def _commit(self, tx: Transaction) -> None:
        for p in tx.touched | tx.changed:
            node = self.store.get(p)
            changed_since = node.gen if node is not None else self.deleted.get(p, 0)
            if changed_since > tx.base_gen:
                raise XsErr(errno.EAGAIN)
        gone: dict[str, Node | None] = {}
        for p in tx.changed:
            if p in tx.store:
                self.store[p] = replace(tx.store[p], gen=self._bump())
            elif p in self.store:
                gone[p] = self.store.pop(p)
                self.deleted[p] = self._bump()
        self._fire(list(dict.fromkeys(tx.targets)), perms_of=gone)

    # ---- watches ------------------------------------------------------------------------

    def _fire(self, paths: list[str], special: str | None = None,
              perms_of: dict[str, Node | None] | None = None) -> None:
        for conn in list(self.conns):
            for w in list(conn.watches):
                if special is not None and w.path == special:
                    self._send_event(conn, w, special)
                    continue
                for p in paths:
                    if p == w.path or p.startswith(w.path.rstrip("/") + "/") \
                            or w.path.startswith(p + "/"):
                        node = self.store.get(p) or (perms_of or {}).get(p)
                        if node is not None and not _allowed(conn.domid, node, "r"):
                            continue
                        self._send_event(conn, w, p if not w.path.startswith(p + "/")
                                         else w.path)

    def _send_event(self, conn: Connection, w: Watch, path: str) -> None:
        if w.relative:
            prefix = f"/local/domain/{conn.domid}/"
            path = path[len(prefix):] if path.startswith(prefix) else path
        conn.send(encode(Op.WATCH_EVENT, 0, 0, path.encode() + b"\0" + w.token.encode() + b"\0"))


def main() -> int:
    p = argparse.ArgumentParser(description="A XenStore server for simulated domains.")
    p.add_argument("--dir", required=True, help="creates DIR/dom<N>/xenstored.sock per domain")
    p.add_argument("--domains", default="0,1,2", help="comma-separated domain ids")
    args = p.parse_args()
    sel = selectors.DefaultSelector()
    server = XenStoreServer()
    server.register(sel)
    for d in (int(x) for x in args.domains.split(",")):
        os.makedirs(f"{args.dir}/dom{d}", exist_ok=True)
        server.add_domain(d, f"{args.dir}/dom{d}/xenstored.sock")
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    print("ready", flush=True)
    try:
        while True:
            for key, _ in sel.select():
                key.data()
    except KeyboardInterrupt:
        pass
    server.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
