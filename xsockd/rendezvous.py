"""The XenStore side of the link protocol (version 2), for both roles.

For a link that domain A initiates to domain B (see docs/PROTOCOL.md):

  /local/domain/A/data/xsock/link/B/        owner A, B may read: the offer
      version, generation, ring-size, control-ref, event-channel, ring-refs/<k>
  /local/domain/B/data/xsock/request        owner B, nobody else may do anything with it
  /local/domain/B/data/xsock/request/A      created by B for each configured peer A, only A
      and B may access: "" (idle), "offer <generation>" (A), then "accepted <generation>" or
      "refused <generation> <why>" (B)

Because B creates the request nodes itself, no third domain can squat, remove or flood them,
and B's work per watch event is bounded by its peer count.  Everything read from XenStore
about a peer goes through ``parse_offer`` or ``parse_request``: read once, checked, bounded.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from xsockd.backend import XenStore, XenStorePerm
from xsockd.constants import PROTOCOL_VERSION, XS_ROOT
from xsockd.errors import ProtocolError, RefusedError, XenStoreError, XsockError
from xsockd.ring import MAX_RING_SIZE, MIN_RING_SIZE, link_pages
from xsockd.xenstore_client import transact

__all__ = [
    "Offer",
    "Offering",
    "PeerNode",
    "RequestBoard",
    "ask",
    "claim_domain",
    "domain_path",
    "how_to_stop",
    "offer_path",
    "parse_offer",
    "parse_request",
    "publish_offer",
    "read_answer",
    "read_offer",
    "request_dir",
    "request_path",
    "systemd_unit",
]

REFS_PER_NODE = 128  # ring refs per XenStore node: keeps values far below the 4 KiB limit
MAX_INT_DIGITS = 20


def domain_path(domid: int) -> str:
    return f"/local/domain/{domid}"


def offer_path(owner: int, peer: int) -> str:
    """Returns where ``owner`` publishes its offer of a link to ``peer``."""
    return f"{domain_path(owner)}/{XS_ROOT}/link/{peer}"


def request_dir(owner: int) -> str:
    return f"{domain_path(owner)}/{XS_ROOT}/request"


def request_path(acceptor: int, initiator: int) -> str:
    """Returns the node by which ``initiator`` asks ``acceptor`` to attach its offer."""
    return f"{request_dir(acceptor)}/{initiator}"


def canonical_int(text: str, lo: int, hi: int) -> int | None:
    """Returns ``text`` as an integer if it is canonical decimal within lo..hi, else None.

    Canonical: digits only, no sign, no leading zero (but "0" itself), so that one value has
    one spelling and a lookup by the spelling we print finds what we parsed.
    """
    if not text.isascii() or not text.isdigit() or len(text) > MAX_INT_DIGITS:
        return None
    if len(text) > 1 and text[0] == "0":
        return None
    value = int(text)
    return value if lo <= value <= hi else None


def _int(value: bytes, node: str, lo: int, hi: int) -> int:
    text = value.decode("ascii", "replace")
    n = canonical_int(text, lo, hi)
    if n is None:
        raise ProtocolError(f"{node} is {text[:32]!r}, not a decimal integer in {lo}..{hi}")
    return n


@dataclass(frozen=True)
class Offer:
    """A peer's link offer, validated."""

    generation: int
    ring_size: int
    control_ref: int
    ring_refs: tuple[int, ...]
    port: int


class VersionMismatch(ProtocolError):
    """The offer speaks another protocol version; ``version`` is the one it named."""

    def __init__(self, version: int) -> None:
        super().__init__(f"offer has protocol version {version}, we speak {PROTOCOL_VERSION}")
        self.version = version


def parse_offer(nodes: dict[str, bytes], where: str = "offer") -> Offer:
    """Returns the Offer described by ``nodes`` (name -> value, as read from XenStore).

    ``ring-refs/<k>`` chunks must be named exactly 0..n-1.  Raises ProtocolError naming the
    first bad node (``where``/name); nothing in ``nodes`` is trusted.
    """
    def get(name: str) -> bytes:
        if name not in nodes:
            raise ProtocolError(f"{where}/{name} is missing")
        return nodes[name]

    version = _int(get("version"), f"{where}/version", 0, 2**16)
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(version)
    generation = _int(get("generation"), f"{where}/generation", 1, 2**63)
    ring_size = _int(get("ring-size"), f"{where}/ring-size", MIN_RING_SIZE, MAX_RING_SIZE)
    if ring_size & (ring_size - 1):
        raise ProtocolError(f"{where}/ring-size {ring_size} is not a power of two")
    control_ref = _int(get("control-ref"), f"{where}/control-ref", 1, 2**32 - 1)
    port = _int(get("event-channel"), f"{where}/event-channel", 1, 2**31 - 1)
    want = link_pages(ring_size) - 1
    chunks = -(-want // REFS_PER_NODE)
    names = sorted(k for k in nodes if k.startswith("ring-refs/"))
    expected = sorted(f"ring-refs/{k}" for k in range(chunks))
    if names != expected:
        shown = ", ".join(n.removeprefix("ring-refs/")[:12] for n in names[:8])
        raise ProtocolError(f"{where}/ring-refs has chunks [{shown}], want 0..{chunks - 1}")
    refs: list[int] = []
    for k in range(chunks):
        node = f"ring-refs/{k}"
        words = nodes[node].split(b" ")
        if len(words) > REFS_PER_NODE:
            raise ProtocolError(f"{where}/{node} has {len(words)} refs, at most {REFS_PER_NODE}")
        refs.extend(_int(w, f"{where}/{node}", 1, 2**32 - 1) for w in words)
    if len(refs) != want:
        raise ProtocolError(f"{where}/ring-refs has {len(refs)} refs, ring-size {ring_size} "
                            f"needs {want}")
    return Offer(generation, ring_size, control_ref, tuple(refs), port)


def read_offer(xs: XenStore, owner: int, peer: int) -> Offer:
    """Returns ``owner``'s offer to ``peer``, read in one transaction and validated."""
    base = offer_path(owner, peer)
    max_chunks = -(-(link_pages(MAX_RING_SIZE) - 1) // REFS_PER_NODE)

    def read_all(tx: int) -> dict[str, bytes]:
        nodes: dict[str, bytes] = {}
        for name in xs.directory(base, tx)[:16]:
            if name == "ring-refs":
                for k in xs.directory(f"{base}/ring-refs", tx)[:max_chunks + 1]:
                    nodes[f"ring-refs/{k}"] = xs.read(f"{base}/ring-refs/{k}", tx)
            else:
                nodes[name] = xs.read(f"{base}/{name}", tx)
        return nodes

    try:
        nodes = transact(xs, read_all)
    except XenStoreError as e:
        raise ProtocolError(f"cannot read {e.path or base}: {e.strerror}") from e
    return parse_offer(nodes, base)


def publish_offer(xs: XenStore, me: int, peer: int, *, generation: int, ring_size: int,
                  control_ref: int, port: int, refs: tuple[int, ...]) -> Callable[[], None]:
    """Publishes our offer to ``peer`` in one transaction; returns what removes it."""
    base = offer_path(me, peer)

    def publish(tx: int) -> None:
        xs.write(base, b"", tx)
        xs.set_perms(base, [XenStorePerm(me, "n"), XenStorePerm(peer, "r")], tx)
        for name, value in (("version", PROTOCOL_VERSION), ("generation", generation),
                            ("ring-size", ring_size), ("control-ref", control_ref),
                            ("event-channel", port)):
            xs.write(f"{base}/{name}", str(value), tx)
        for k in range(0, len(refs), REFS_PER_NODE):
            xs.write(f"{base}/ring-refs/{k // REFS_PER_NODE}",
                     " ".join(map(str, refs[k:k + REFS_PER_NODE])), tx)

    remove = quiet_rm(xs, base)
    try:
        transact(xs, publish)
    except BaseException:
        remove()
        raise
    return remove


def ask(xs: XenStore, me: int, peer: int, generation: int) -> None:
    """Asks ``peer`` to attach our offer ``generation``: writes our request node there.

    The node must exist: the acceptor creates one for each domain it accepts links from.
    Raises RefusedError saying why when it does not.
    """
    node = request_path(peer, me)

    def write(tx: int) -> None:
        xs.read(node, tx)  # ENOENT or EACCES: there is no node for us; we may not create one
        xs.write(node, f"offer {generation}", tx)

    try:
        transact(xs, write)
    except XenStoreError as e:
        if e.errno in (errno.EACCES, errno.ENOENT, errno.EPERM):
            # Both causes look the same from here: the peer's request directory is private.
            raise RefusedError(
                f"domain {peer} has no link request node for us ({node}): start xsockd in "
                f"domain {peer} (link protocol version {PROTOCOL_VERSION} or later), or add "
                f"{me} to [daemon] peers in its configuration") from e
        raise


def parse_request(value: bytes) -> int | None:
    """Returns the generation of an "offer <generation>" request value, else None.

    Anything else (idle "", our own answer, junk the requester wrote) asks nothing of us.
    """
    words = value.split(b" ")
    if len(words) != 2 or words[0] != b"offer":
        return None
    return canonical_int(words[1].decode("ascii", "replace"), 1, 2**63)


def read_answer(xs: XenStore, acceptor: int, me: int, generation: int) -> str | None:
    """Returns the reason ``acceptor`` refused our offer ``generation``, or None.

    None also while it has not answered, once it accepted, and for an answer to another
    generation.  The reason is the acceptor's text: escape it before logging.
    """
    try:
        value = xs.read(request_path(acceptor, me))
    except XenStoreError:
        return None
    word, _, rest = value[:512].decode("ascii", "replace").partition(" ")
    gen, _, why = rest.partition(" ")
    if word != "refused" or canonical_int(gen, 1, 2**63) != generation:
        return None
    return why or "no reason given"


class PeerNode:
    """A watch on the node of a link's peer that we may read: its answer node for a link we
    offered (``kind`` "answer"), its offer for one we accepted ("offer").

    xl destroy removes a domain's whole XenStore tree, and xenstored tells each domain that
    could read a removed node: a domU, which may not ask whether a domain still exists, learns
    so that its peer's domain was destroyed.  ``close()`` ends the watch.
    """

    def __init__(self, xs: XenStore, kind: str, path: str, peer: int, generation: int) -> None:
        self.xs, self.path = xs, path
        self.token = f"{kind}:{peer}:{generation}"
        xs.watch(path, self.token)
        self._watching = True

    @staticmethod
    def parse_token(token: str) -> tuple[str, int, int] | None:
        """Returns (kind, peer, generation) of one of our tokens, None for another watch."""
        words = token.split(":")
        if len(words) != 3 or words[0] not in ("answer", "offer"):
            return None
        return words[0], int(words[1]), int(words[2])

    def gone(self) -> bool:
        """Returns True once the node is no longer there for us."""
        try:
            self.xs.read(self.path)
        except XenStoreError as e:
            if e.errno in (errno.ENOENT, errno.EACCES):
                return True
            raise
        return False

    def close(self) -> None:
        if self._watching:
            self._watching = False
            try:
                self.xs.unwatch(self.path, self.token)
            except XenStoreError:
                pass  # the connection's watches end with it anyway


class Offering(PeerNode):
    """Our offer of a link to ``peer``, our request at ``peer`` and the watch on that request
    node (for the answer, then for the peer's domain going away).

    Made in that order (publish, watch, ask), so that no answer is missed; ``close()``
    withdraws the watch and the offer.  Raises RefusedError (no request node for us) or
    XenStoreError with nothing left behind.
    """

    def __init__(self, xs: XenStore, me: int, peer: int, *, generation: int, ring_size: int,
                 control_ref: int, port: int, refs: tuple[int, ...]) -> None:
        self.me, self.peer, self.generation = me, peer, generation
        self._remove: Callable[[], None] | None = publish_offer(
            xs, me, peer, generation=generation, ring_size=ring_size, control_ref=control_ref,
            port=port, refs=refs)
        try:
            super().__init__(xs, "answer", request_path(peer, me), peer, generation)
            ask(xs, me, peer, generation)
        except BaseException:
            self.close()
            raise

    def refusal(self) -> str | None:
        """Returns why the peer refused this offer, None while it has not (or accepted)."""
        return read_answer(self.xs, self.peer, self.me, self.generation)

    def close(self) -> None:
        if hasattr(self, "_watching"):
            super().close()
        if self._remove is not None:
            remove, self._remove = self._remove, None
            remove()


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def _runs_xsockd(pid: int) -> bool:
    """Returns True if process ``pid`` is an xsockd daemon (not, say, journalctl -u xsockd)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    # /usr/bin/xsockd, "python3 /usr/bin/xsockd ...", or "python -m xsockd.daemon ...".
    names = [os.path.basename(a) for a in argv[:2]]
    return b"xsockd" in names or b"xsockd.daemon" in argv[1:3]


def _cgroup_path(text: str) -> str:
    """Returns the systemd cgroup of a /proc/PID/cgroup text (v2, or v1's name=systemd)."""
    paths = {}
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2) if line.count(":") >= 2 else ("", "-", "")
        paths[controllers] = path
    return paths.get("name=systemd") or paths.get("", "")


def systemd_unit(pid: int, proc: str = "/proc") -> str | None:
    """Returns the service unit that runs ``pid`` as its main process, None if none does.

    A process is a unit's when it sits directly in a ``*.service`` cgroup and a systemd
    (system or user manager) is its parent: one started by hand from a shell inside some
    service is that shell's child, and one from a login session sits in a ``.scope``.
    """
    try:
        with open(f"{proc}/{pid}/cgroup", encoding="ascii", errors="replace") as f:
            unit = _cgroup_path(f.read()).rstrip("/").rpartition("/")[2]
        with open(f"{proc}/{pid}/status", encoding="ascii", errors="replace") as f:
            ppid = next((int(ln.split()[1]) for ln in f if ln.startswith("PPid:")), 0)
        with open(f"{proc}/{ppid}/comm", encoding="ascii", errors="replace") as f:
            parent = f.read().strip()
    except (OSError, ValueError, IndexError):
        return None
    return unit if unit.endswith(".service") and parent == "systemd" else None


def how_to_stop(pid: int, proc: str = "/proc") -> tuple[str, str]:
    """Returns who runs xsockd ``pid`` ("pid 7, systemd unit x.service") and how to stop it."""
    unit = systemd_unit(pid, proc)
    if unit is not None:
        return f"pid {pid}, systemd unit {unit}", f"`systemctl stop {unit}`"
    if not os.access(f"{proc}/{pid}/status", os.R_OK):  # hidden from us (hidepid=): say less
        return f"pid {pid}", f"`systemctl stop` of its unit, or `kill {pid}`"
    return (f"pid {pid}, started by hand, not by systemd",
            f"`kill {pid}` (it lets its streams drain, then exits)")


def claim_domain(xs: XenStore, domid: int) -> None:
    """Refuses to start beside a running xsockd of the same domain, then records us.

    A second daemon would take over the request nodes and the sockets of the first and leave
    both broken.  The record (pid and boot id, in our private tree) survives a kill -9: it
    counts only while that process still runs an xsockd.  Then our offers of an earlier run
    go; request nodes stay (a peer may have asked while we were away).
    """
    root = f"{domain_path(domid)}/{XS_ROOT}"
    node = f"{root}/daemon"
    try:
        words = xs.read(node).decode("ascii", "replace").split()
    except XenStoreError as e:
        if e.errno != errno.ENOENT:
            raise
        words = []
    boot = _boot_id()
    if len(words) == 2 and words[0].isdigit() and words[1] == boot \
            and int(words[0]) != os.getpid() and _runs_xsockd(int(words[0])):
        who, how = how_to_stop(int(words[0]))
        raise XsockError(f"another xsockd already serves domain {domid} ({who}): stop it "
                         f"first with {how}")
    xs.write(node, f"{os.getpid()} {boot}")
    for name in xs.directory(root):
        if name not in ("request", "daemon"):
            xs.rm(f"{root}/{name}")
    xs.set_perms(root, [XenStorePerm(domid, "n")])


def quiet_rm(xs: XenStore, path: str) -> Callable[[], None]:
    """Returns a callable that removes ``path``, ignoring that it is gone or not ours."""
    def rm() -> None:
        try:
            xs.rm(path)
        except XenStoreError as e:
            if e.errno not in (errno.ENOENT, errno.EACCES):
                raise
    return rm


class RequestBoard:
    """The acceptor's request directory: one node per configured peer, made by us.

    ``sync(peers)`` makes the set of nodes match ``peers`` (at start and on reload);
    ``restore(peer)`` recreates one that was removed (only its peer or dom0 can).  A node's
    value survives our restart: a peer may have asked while we were away.
    """

    def __init__(self, xs: XenStore, domid: int) -> None:
        self.xs = xs
        self.domid = domid
        self.path = request_dir(domid)
        self._peers: frozenset[int] = frozenset()
        self._answered: dict[int, int] = {}  # peer -> the last generation we took up

    def new_offer(self, peer: int, value: bytes) -> int | None:
        """Returns the generation of an offer in ``peer``'s node ``value`` not yet taken up.

        None for an idle node, our own answer, junk, or an offer seen before.
        """
        generation = parse_request(value)
        if generation is None or self._answered.get(peer) == generation:
            return None
        self._answered[peer] = generation
        return generation

    def sync(self, peers: Iterable[int]) -> dict[int, XenStoreError]:
        """Makes the nodes match ``peers``; returns the peers whose node could not be made.

        Node by node, without a transaction: a peer may write its node whenever it likes, and
        a transaction over it would lose every race to a peer writing in a loop.  Called again
        it re-applies every node's permissions (xenstored forgets a permission naming a
        domain that did not exist when it was set: call it when a domain is introduced).
        """
        self._peers = frozenset(peers)
        for gone in set(self._answered) - self._peers:
            del self._answered[gone]
        me = self.domid
        self.xs.write(self.path, b"")
        self.xs.set_perms(self.path, [XenStorePerm(me, "n")])
        have = set(self.xs.directory(self.path))
        wanted = {str(p) for p in self._peers}
        if any(self._owner(f"{self.path}/{name}") != me for name in have):
            # An older version's directory let others create nodes in it, which we may not
            # remove one by one; removing the directory removes them all.
            self.xs.rm(self.path)
            return self.sync(self._peers)
        for name in have - wanted:
            quiet_rm(self.xs, f"{self.path}/{name}")()  # a peer no longer configured
        failed: dict[int, XenStoreError] = {}
        for peer in sorted(self._peers):
            try:
                self._make_node(peer, exists=str(peer) in have)
            except XenStoreError as e:
                failed[peer] = e
        return failed

    def _owner(self, node: str) -> int | None:
        try:
            return self.xs.get_perms(node)[0].domid
        except XenStoreError:
            return None

    def _make_node(self, peer: int, exists: bool) -> None:
        # A new node gets the directory's permissions (ours alone) until the second call
        # opens it to its peer: at no moment may anybody else touch it.
        node = request_path(self.domid, peer)
        if not exists:
            self.xs.write(node, b"")
        self.xs.set_perms(node, [XenStorePerm(self.domid, "n"), XenStorePerm(peer, "b")])

    def restore(self, peer: int) -> bool:
        """Recreates ``peer``'s node if it is configured and missing; returns True if it did."""
        if peer not in self._peers or self.read(peer) is not None:
            return False
        self._make_node(peer, exists=False)
        return True

    @property
    def peers(self) -> frozenset[int]:
        return self._peers

    def peer_of(self, path: str) -> int | None:
        """Returns the configured peer whose node ``path`` is, None for anything else."""
        name = path.removeprefix(self.path + "/")
        if name == path or "/" in name:
            return None
        peer = canonical_int(name, 0, 2**16)
        return peer if peer in self._peers else None

    def read(self, peer: int) -> bytes | None:
        """Returns ``peer``'s node value, None if it is missing."""
        try:
            return self.xs.read(request_path(self.domid, peer))[:512]
        except XenStoreError as e:
            if e.errno == errno.ENOENT:
                return None
            raise

    def answer(self, peer: int, generation: int, text: str) -> bool:
        """Writes our answer to ``peer``'s offer ``generation`` if its node still holds it.

        A newer offer the peer wrote meanwhile is left for us to read; returns False then.
        """
        node = request_path(self.domid, peer)

        def answer(tx: int) -> bool:
            if self.xs.read(node, tx) != f"offer {generation}".encode():
                return False
            self.xs.write(node, text, tx)
            return True

        return transact(self.xs, answer)

    def reset(self, peer: int, generation: int) -> None:
        """Makes ``peer``'s node idle again if it still holds that generation's exchange.

        A newer offer the peer wrote meanwhile stays for us to read.
        """
        node = request_path(self.domid, peer)
        ours = {f"offer {generation}".encode(), f"accepted {generation}".encode()}

        def reset(tx: int) -> None:
            if self.xs.read(node, tx) in ours:
                self.xs.write(node, b"", tx)

        try:
            transact(self.xs, reset)
        except XenStoreError as e:
            if e.errno != errno.ENOENT:
                raise
