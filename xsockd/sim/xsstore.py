"""The node store of the simulated xenstored: paths, permissions, quotas and transactions.

Everything here follows Xen 4.17's C xenstored (tools/xenstore/xenstored_core.c,
xenstored_transaction.c, xenstored_domain.c); the functions it mirrors are named in the
docstrings.  The wire and the connections are in ``xenstored``.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from xsockd.backend import XenStorePerm

# xenstored's default quotas (xenstored_core.c) and protocol limits (xs_wire.h).
MAX_NODES = 1000              # quota_nb_entry_per_domain
MAX_WATCHES = 128             # quota_nb_watch_per_domain (checked with ">": 129 fit)
MAX_TRANSACTIONS = 10         # quota_max_transaction (checked with ">": 11 fit)
MAX_ENTRY_SIZE = 2048         # quota_max_entry_size: one node's record, for domUs
MAX_PERMS = 5                 # quota_nb_perms_per_node
MAX_TRANS_NODES = 1024        # quota_trans_nodes: nodes one transaction may touch
MAX_OUTSTANDING = 20          # quota_req_outstanding: unsent replies before input stalls
MEMORY_HARD = 2 * 1024 * 1024 + 512 * 1024   # quota_memory_per_domain_hard
REL_PATH_MAX = 2048           # XENSTORE_REL_PATH_MAX (quota_max_path_len)
DOMID_SELF = 0x7FF0

PERM_READ, PERM_WRITE, PERM_OWNER = 1, 2, 8
_LETTER_BITS = {"n": 0, "r": PERM_READ, "w": PERM_WRITE, "b": PERM_READ | PERM_WRITE}
_RECORD_HEADER = 24           # sizeof(struct xs_tdb_record_hdr)
_PERM_SIZE = 8                # sizeof(struct xs_permissions)
NO_GENERATION = -1
_VALID_CHARS = re.compile(rb"[A-Za-z0-9/_@-]*")
_LOCAL_PREFIX = re.compile(rb"/local/domain/(?:-\d{1,4}|\+\d{1,4}|\d{1,5})/")

Perms = tuple[XenStorePerm, ...]


class XsErr(Exception):
    """A request fails with this errno (sent as its xsd_errors name)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


@dataclass(frozen=True)
class Node:
    value: bytes
    perms: Perms
    children: tuple[str, ...] = ()   # in creation order, as xenstored lists them
    childlen: int = 0                # bytes of the NUL-terminated child list
    gen: int = 0

    @property
    def owner(self) -> int:
        return self.perms[0].domid

    def record_size(self) -> int:
        """The size of xenstored's TDB record for this node (write_node_raw's dsize)."""
        return _RECORD_HEADER + _PERM_SIZE * len(self.perms) + len(self.value) + self.childlen

    def with_child(self, name: str) -> Node:
        return replace(self, children=(*self.children, name),
                       childlen=self.childlen + len(name) + 1)

    def without_child(self, name: str) -> Node:
        return replace(self, children=tuple(c for c in self.children if c != name),
                       childlen=self.childlen - len(name) - 1)


def privileged(domid: int) -> bool:
    return domid == 0


def perm_for(domid: int, perms: Perms) -> int:
    """The access ``domid`` has to a node with ``perms`` (perm_for_conn)."""
    if privileged(domid) or perms[0].domid == domid:
        return PERM_READ | PERM_WRITE | PERM_OWNER
    for p in perms[1:]:
        if p.domid == domid:
            return _LETTER_BITS[p.perm]
    return _LETTER_BITS[perms[0].perm]


def parent_of(path: str) -> str:
    """The parent of an absolute path; "/" for "/" (get_parent).  Always shorter or "/"."""
    slash = path.rfind("/", 1)
    return path[:slash] if slash > 0 else "/"


def child_path(parent: str, name: str) -> str:
    return f"/{name}" if parent == "/" else f"{parent}/{name}"


def valid_nodename(raw: bytes) -> bool:
    """xenstored's is_valid_nodename: absolute, no "//", no trailing "/", length, charset."""
    if not raw.startswith(b"/") or (raw.endswith(b"/") and raw != b"/") or b"//" in raw:
        return False
    m = _LOCAL_PREFIX.match(raw)
    local_off = m.end() if m else 0
    return len(raw) <= local_off + REL_PATH_MAX and _VALID_CHARS.fullmatch(raw) is not None


def canonicalize(domid: int, raw: bytes) -> bytes:
    """A relative path is below the domain's home (canonicalize)."""
    if raw.startswith(b"/") or raw.startswith(b"@"):
        return raw
    return b"/local/domain/%d/" % domid + raw


def c_strtol(text: bytes, base0: bool = False) -> tuple[int, int]:
    """(value, bytes consumed) of C's strtol(text, &end, base0 ? 0 : 10); 0 consumed if none."""
    i, n = 0, len(text)
    while i < n and text[i] in b" \t\n\v\f\r":
        i += 1
    sign = 1
    if i < n and text[i] in b"+-":
        sign = -1 if text[i] == ord("-") else 1
        i += 1
    base, digits = 10, b"0123456789"
    if base0 and text[i:i + 2].lower() == b"0x" and i + 2 < n and \
            chr(text[i + 2]) in "0123456789abcdefABCDEF":
        base, digits, i = 16, b"0123456789abcdefABCDEF", i + 2
    elif base0 and text[i:i + 1] == b"0":
        base, digits = 8, b"01234567"
    start = i
    while i < n and text[i] in digits:
        i += 1
    if i == start:
        return 0, 0
    value = sign * int(text[start:i], base)
    return max(-(1 << 63), min(value, (1 << 63) - 1)), i


def c_atoi(text: bytes) -> int:
    """C's atoi, as a 32-bit unsigned (xenstored prints domids with %u)."""
    return c_strtol(text)[0] & 0xFFFFFFFF


def _int32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def parse_perms(strings: list[bytes]) -> Perms:
    """Permission strings ("r2", "n0x1f"...) as xs_strings_to_perms reads them; EINVAL if not."""
    perms = []
    for s in strings:
        if not s or chr(s[0]) not in _LETTER_BITS:
            raise XsErr(errno.EINVAL)
        value, used = c_strtol(s[1:], base0=True)
        if len(s) == 1 or used != len(s) - 1:
            raise XsErr(errno.EINVAL)
        perms.append(XenStorePerm(_int32(value), chr(s[0])))
    return tuple(perms)


def format_perms(perms: Perms) -> bytes:
    return b"".join(str(p).encode() + b"\0" for p in perms)


@dataclass
class DomainAccount:
    """What one domain holds in xenstored (struct domain's nbentry, nbwatch, memory...)."""

    nbentry: int = 0        # nodes it owns
    nbwatch: int = 0
    ntrans: int = 0         # open transactions, over all its connections
    memory: int = 0         # bytes: owned node records, watches, transaction copies, output
    outstanding: int = 0    # replies queued but not yet written
    queued: int = 0         # bytes of replies and events queued but not yet written

    def over_memory(self, domid: int, extra: int = 0) -> bool:
        return not privileged(domid) and self.memory + extra >= MEMORY_HARD


@dataclass
class Access:
    """One node a transaction touched (xenstored_transaction.c's accessed_node)."""

    node: Node | None             # the transaction's copy (None: missing or deleted)
    gen: int                      # global generation when first read (NO_GENERATION: missing)
    check_gen: bool               # first access was a read: a change meanwhile is a conflict
    perms: Perms | None           # the node's permissions when first accessed, for watches
    modified: bool = False
    fire_watch: bool = False
    watch_exact: bool = False
    charged: int = 0              # memory charged to the transaction's domain for the copy


@dataclass
class Transaction:
    id: int
    domid: int
    accessed: dict[str, Access] = field(default_factory=dict)   # in first-access order
    entry_delta: dict[int, int] = field(default_factory=dict)   # nodes gained per owner
    node_created: bool = False
    fail: bool = False


class Store:
    """The global node tree and per-domain accounts; ``view`` gives a request's view of it."""

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {"/": Node(b"", (XenStorePerm(0, "n"),))}
        self.gen = 0
        self.accounts: dict[int, DomainAccount] = {}

    def account(self, domid: int) -> DomainAccount:
        acct = self.accounts.get(domid)
        if acct is None:
            acct = self.accounts[domid] = DomainAccount()
        return acct

    def next_gen(self) -> int:
        self.gen += 1
        return self.gen

    def charge(self, domid: int, delta: int, check: bool) -> None:
        """Adds ``delta`` bytes to a domain's memory; ENOMEM past the hard quota if ``check``
        (domain_memory_add)."""
        acct = self.account(domid)
        if check and delta > 0 and acct.over_memory(domid, delta):
            raise XsErr(errno.ENOMEM)
        acct.memory += delta

    def put_global(self, path: str, node: Node, check: bool) -> Node:
        """Stores a node outside any transaction with a new generation; its record is charged
        to its owner (do_tdb_write: old record refunded, the new one checked)."""
        old = self.nodes.get(path)
        new_cost = node.record_size() + len(path)
        if old is not None:
            old_cost = old.record_size() + len(path)
            if old.owner == node.owner:
                self.charge(node.owner, new_cost - old_cost, check)
            else:
                self.charge(node.owner, new_cost, check)
                self.charge(old.owner, -old_cost, False)
        else:
            self.charge(node.owner, new_cost, check)
        node = replace(node, gen=self.next_gen())
        self.nodes[path] = node
        return node

    def delete_global(self, path: str) -> None:
        old = self.nodes.pop(path, None)
        if old is not None:
            self.charge(old.owner, -(old.record_size() + len(path)), False)

    def view(self, domid: int, tx: Transaction | None) -> View:
        return View(self, domid, tx)


    # ---- transactions (xenstored_transaction.c) -------------------------------------------

    def release(self, tx: Transaction) -> None:
        """Frees what an ended or abandoned transaction held."""
        for a in tx.accessed.values():
            self.charge(tx.domid, -a.charged, False)
            a.charged = 0
        acct = self.account(tx.domid)
        acct.ntrans = max(0, acct.ntrans - 1)

    def commit(self, tx: Transaction, check_quota: bool) -> list[tuple[str, Access]]:
        """Applies a transaction (do_transaction_end, transaction_fix_domains,
        finalize_transaction); returns the accessed nodes whose watches fire."""
        if tx.fail:
            raise XsErr(errno.ENOMEM)
        if check_quota:  # the node quota holds for the committed result, not per request
            for owner, delta in tx.entry_delta.items():
                if not privileged(owner) and \
                        max(0, self.account(owner).nbentry + delta) >= MAX_NODES:
                    raise XsErr(errno.ENOSPC)
        for path, a in tx.accessed.items():
            if a.check_gen:
                now = self.nodes.get(path)
                if (now.gen if now is not None else NO_GENERATION) != a.gen:
                    raise XsErr(errno.EAGAIN)
        for path, a in tx.accessed.items():
            if not a.modified:
                continue
            if a.node is not None:
                self.put_global(path, a.node, False)
            else:
                self.delete_global(path)
        for owner, delta in tx.entry_delta.items():
            acct = self.account(owner)
            acct.nbentry = max(0, acct.nbentry + delta)
        return [(p, a) for p, a in tx.accessed.items() if a.fire_watch]


class View:
    """The store as one request sees it: the global tree, or a transaction's overlay on it.

    Reads inside a transaction copy the node into the transaction (so later reads see the
    same node) and record its generation for the conflict check at commit; writes go to the
    copy only.  Nothing global is kept for a transaction: a node removed meanwhile is seen
    at commit as missing, as xenstored sees it (NO_GENERATION).
    """

    def __init__(self, store: Store, domid: int, tx: Transaction | None) -> None:
        self.store, self.domid, self.tx = store, domid, tx

    def _access(self, path: str, check_gen: bool) -> Access:
        """The transaction's entry for path, made on first access (access_node)."""
        assert self.tx is not None
        a = self.tx.accessed.get(path)
        if a is not None:
            return a
        if len(self.tx.accessed) >= MAX_TRANS_NODES and not privileged(self.domid):
            self.tx.fail = True
            raise XsErr(errno.ENOSPC)
        node = self.store.nodes.get(path)
        a = Access(node, node.gen if node else NO_GENERATION, check_gen,
                   node.perms if node else None)
        if node is not None:  # the transaction's copy costs its domain (no quota check)
            a.charged = node.record_size() + len(path) + 21
            self.store.charge(self.domid, a.charged, False)
        self.tx.accessed[path] = a
        return a

    def get(self, path: str) -> Node | None:
        if self.tx is None:
            return self.store.nodes.get(path)
        return self._access(path, True).node

    def put(self, path: str, node: Node, check: bool) -> Node:
        """Writes a node; ``check``: the writer's quotas apply (the write of a removal's
        parent does not check, as remove_child_entry)."""
        if check and not privileged(self.domid) and node.record_size() >= MAX_ENTRY_SIZE:
            raise XsErr(errno.ENOSPC)
        if self.tx is None:
            return self.store.put_global(path, node, check)
        a = self._access(path, False)
        cost = node.record_size() + len(path) + 21
        self.store.charge(self.domid, cost - a.charged, check)
        a.charged = cost
        a.node = replace(node, gen=self.store.next_gen())
        a.modified = True
        return a.node

    def delete(self, path: str) -> None:
        if self.tx is None:
            self.store.delete_global(path)
            return
        a = self._access(path, False)
        self.store.charge(self.domid, -a.charged, False)
        a.charged = 0
        a.node = None
        a.modified = True

    def count_entry(self, owner: int, delta: int) -> None:
        """A node owned by ``owner`` appeared (+1) or went (-1) (domain_entry_inc/dec)."""
        if self.tx is None:
            self.store.account(owner).nbentry += delta
        else:
            self.tx.entry_delta[owner] = self.tx.entry_delta.get(owner, 0) + delta

    def walk_post_order(self, root: str) -> Iterator[tuple[str, Node]]:
        """Every node of the subtree at root, children before parents (walk_node_tree)."""
        node = self.get(root)
        if node is None:
            return
        stack: list[tuple[str, Node, int]] = [(root, node, 0)]
        while stack:
            path, node, i = stack.pop()
            if i < len(node.children):
                stack.append((path, node, i + 1))
                child = child_path(path, node.children[i])
                sub = self.get(child)
                if sub is not None:
                    stack.append((child, sub, 0))
            else:
                yield path, node
