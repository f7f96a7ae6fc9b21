"""The sim's xenstored against hostile domains, one regression test per hole of issue 10.

Each test speaks the wire protocol through raw sockets (``Raw``) where the client would refuse
to send what a hostile domain sends, and checks the answer Xen 4.17's C xenstored gives (the
function it comes from is named in each test), then that the server still answers others.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
from collections.abc import Iterator

import pytest

from xsockd.backend import XenStorePerm
from xsockd.errors import XenStoreError
from xsockd.sim.host import SimHost
from xsockd.sim.xsstore import parent_of
from xsockd.xenstore_wire import HEADER, Op

HOST_DOMAINS = [0, 1, 2, 3]


@pytest.fixture
def host(tmp_path) -> Iterator[SimHost]:
    with SimHost(tmp_path / "sim", domains=HOST_DOMAINS) as h:
        yield h


class Raw:
    """A raw connection to the sim's xenstored as one domain."""

    def __init__(self, host: SimHost, domid: int) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(host.dir / f"dom{domid}" / "xenstored.sock"))
        self.sock.settimeout(10)
        self.buf = b""
        self.events: list[list[bytes]] = []
        self.req_id = 0

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, op: int, payload: bytes, tx: int = 0, length: int | None = None) -> int:
        self.req_id += 1
        n = len(payload) if length is None else length
        self.sock.sendall(HEADER.pack(op, self.req_id, tx, n) + payload)
        return self.req_id

    def message(self) -> tuple[int, int, int, bytes]:
        """The next message (type, req_id, tx_id, payload); raises EOFError on hang-up."""
        while True:
            if len(self.buf) >= HEADER.size:
                op, req, tx, n = HEADER.unpack_from(self.buf)
                if len(self.buf) >= HEADER.size + n:
                    payload = self.buf[HEADER.size:HEADER.size + n]
                    self.buf = self.buf[HEADER.size + n:]
                    return op, req, tx, payload
            data = self.sock.recv(65536)
            if not data:
                raise EOFError
            self.buf += data

    def reply(self) -> tuple[int, bytes]:
        """The next reply, keeping the watch events that come before it."""
        while True:
            op, _, _, payload = self.message()
            if op == Op.WATCH_EVENT:
                self.events.append(payload.split(b"\0")[:2])
            else:
                return op, payload

    def ask(self, op: int, payload: bytes, tx: int = 0) -> bytes:
        """The reply's payload, or its error name as "!ENAME"."""
        self.send(op, payload, tx)
        rop, body = self.reply()
        return b"!" + body.rstrip(b"\0") if rop == Op.ERROR else body


def alive(host: SimHost, domid: int = 2) -> None:
    """The server answers another domain at once."""
    with host.xenstore(domid) as xs:
        assert xs.read("domid") == str(domid).encode()


def status_kb(pid: int, key: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


# ---- 1. special and malformed paths -------------------------------------------------------


BAD_PATHS = [b"@x", b"@", b"@x/y", b"@releaseDomain", b"/a//b", b"/a/", b"/a b", b"/\xff\xfe",
             b"/a/../b", b"/" + b"x" * 2049, b"/local/domain/1/" + b"y" * 2049]


@pytest.mark.parametrize("path", ["@x", "@", "", "x", "//", "/a//", "a/b", "/a/b/c", "/"])
def test_every_walk_to_the_root_ends(path):
    """get_parent shortens every path, whatever it is, so walks over parents end."""
    for _ in range(len(path) + 1):
        if path == "/":
            return
        shorter = parent_of(path)
        assert len(shorter) < len(path) or shorter == "/"
        path = shorter
    assert path == "/"


@pytest.mark.parametrize("op", [Op.WRITE, Op.MKDIR, Op.RM, Op.READ, Op.DIRECTORY,
                                Op.GET_PERMS])
def test_special_and_malformed_paths_are_einval(host, op):
    """get_node/is_valid_nodename: a node name starts with "/"; "@x" used to loop forever."""
    with Raw(host, 1) as r:
        for path in BAD_PATHS:
            payload = path + b"\0" + (b"v" if op == Op.WRITE else b"")
            assert r.ask(op, payload) == b"!EINVAL", path
    alive(host)


def test_set_perms_on_special_and_malformed_paths(host):
    with Raw(host, 1) as r, Raw(host, 0) as r0:
        assert r.ask(Op.SET_PERMS, b"@x\0n1\0") == b"!EINVAL"     # set_perms_special
        assert r.ask(Op.SET_PERMS, b"@releaseDomain\0n0\0r1\0") == b"!EACCES"
        assert r.ask(Op.SET_PERMS, b"/a//b\0n1\0") == b"!EINVAL"
        # dom0 may let a domain see @releaseDomain (as xenstore-chmod does on Xen).
        assert r0.ask(Op.SET_PERMS, b"@releaseDomain\0n0\0r1\0") == b"OK\0"
    alive(host)


# ---- 2. replies and events past 4096 bytes -------------------------------------------------


def make_big_directory(host: SimHost, n: int = 60) -> list[str]:
    names = [f"{i:03d}-" + "n" * 100 for i in range(n)]
    with host.xenstore(0) as xs:
        for name in names:
            xs.write(f"/big/{name}", b"")
        xs.set_perms("/big", [XenStorePerm(0, "r")])
    return names


def test_large_directory_is_e2big_and_read_by_parts(host):
    """send_reply answers E2BIG past XENSTORE_PAYLOAD_MAX; send_directory_part serves it."""
    names = make_big_directory(host)
    with Raw(host, 1) as r:
        assert r.ask(Op.DIRECTORY, b"/big\0") == b"!E2BIG"
        got, off, gens = b"", 0, set()
        while True:
            body = r.ask(Op.DIRECTORY_PART, b"/big\0%d\0" % off)
            gen, _, part = body.partition(b"\0")
            gens.add(gen)
            assert len(body) <= 4096
            if part.endswith(b"\0\0") or part == b"\0":
                got += part[:-1]
                break
            got, off = got + part, off + len(part)
        assert got.split(b"\0")[:-1] == [n.encode() for n in names]  # creation order
        assert len(gens) == 1
        assert r.ask(Op.DIRECTORY_PART, b"/big\0999999\0") == gen + b"\0\0"
        assert r.ask(Op.DIRECTORY_PART, b"/big\0") == b"!EINVAL"  # two strings exactly
    with host.xenstore(2) as xs:  # our client falls back to DIRECTORY_PART, as libxenstore
        assert xs.directory("/big") == names
    alive(host)


def test_watch_event_past_the_limit_is_dropped(host):
    """send_event drops an event whose path and token exceed the payload limit."""
    token = b"t" * 4000
    with Raw(host, 1) as r:
        assert r.ask(Op.WATCH, b"data\0" + token + b"\0") == b"OK\0"
        op, _, _, first = r.message()  # the event at registration fits: the request did
        assert (op, first) == (Op.WATCH_EVENT, b"data\0" + token + b"\0")
        long_path = b"data/" + b"/".join([b"p" * 40] * 3)
        assert r.ask(Op.WRITE, long_path + b"\0v") == b"OK\0"           # event of 4131 bytes
        assert r.ask(Op.WATCH, b"data\0short\0") == b"OK\0"
        assert r.ask(Op.WRITE, b"data/s\0v") == b"OK\0"
        r.sock.settimeout(2)
        events = list(r.events)
        while len(events) < 3:
            op, _, _, payload = r.message()
            events.append(payload.split(b"\0")[:2])
        assert [e[0] for e in events] == [b"data", b"data/s", b"data/s"]
        assert {e[1][:5] for e in events[1:]} == {b"ttttt", b"short"}
    alive(host)


# ---- 3. the node quota --------------------------------------------------------------------


def test_node_quota_is_exact_per_request(host):
    """create_node: a domain owns at most quota_nb_entry_per_domain (1000) nodes."""
    with host.xenstore(1) as xs, host.xenstore(0) as xs0:
        with pytest.raises(XenStoreError) as e:
            for i in range(1100):  # 200 to a directory: a record stays under 2048 bytes
                xs.write(f"data/q{i // 200}/{i}", b"")
        assert e.value.errno == errno.ENOSPC
        made = sum(1 + len(xs0.directory(f"/local/domain/1/data/{d}"))
                   for d in xs0.directory("/local/domain/1/data"))
        assert made + 1 == 1000  # with its data node (its home and domid are dom0's)
        last = xs0.directory("/local/domain/1/data")[-1]
        xs.rm(f"data/{last}/{xs0.directory(f'/local/domain/1/data/{last}')[0]}")
        xs.write(f"data/{last}/again", b"")  # one freed, one fits
    alive(host)


def test_node_quota_holds_for_parallel_transactions(host):
    """transaction_fix_domains: the quota is checked for the committed result, so eleven
    transactions of 150 nodes each cannot commit more than the quota."""
    with host.xenstore(1) as setup:
        for k in range(11):
            setup.write(f"data/p{k}", b"")
    clients = [host.xenstore(1) for _ in range(11)]
    try:
        txs = [c.transaction_start() for c in clients]
        for k, (c, tx) in enumerate(zip(clients, txs, strict=True)):
            for i in range(150):
                c.write(f"data/p{k}/{i}", b"", tx)
        results = []
        for c, tx in zip(clients, txs, strict=True):
            try:
                results.append(c.transaction_end(tx))
            except XenStoreError as e:
                results.append(e.errno)
        # 3 + 11 nodes before; each commit adds 150 and must leave fewer than 1000.
        assert results.count(True) == 6 and results.count(errno.ENOSPC) == 5
    finally:
        for c in clients:
            c.close()
    with host.xenstore(0) as xs0:
        owned = sum(len(xs0.directory(f"/local/domain/1/data/p{k}")) for k in range(11))
        assert 3 + 11 + owned < 1000


def test_node_creation_does_not_slow_with_the_store(host):
    """The quota check is a count per domain, not a walk over every node."""
    with host.xenstore(0) as xs0:
        for i in range(4000):
            xs0.write(f"/bulk/{i // 100}/{i}", b"")
    with host.xenstore(2) as xs:
        t = time.monotonic()
        for i in range(300):
            xs.write(f"data/n{i}", b"")
        per_write = (time.monotonic() - t) / 300
    assert per_write < 0.003, f"{per_write * 1000:.2f} ms per write"


# ---- 4. no record of removed paths -----------------------------------------------------------


def test_create_and_remove_pairs_leave_no_memory_behind(host):
    """Conflicts are found from the generations a transaction saw (finalize_transaction):
    nothing is remembered per removed path."""
    assert host.proc is not None
    with host.xenstore(0) as xs, host.xenstore(0) as other:
        tx = other.transaction_start()  # an open transaction must not make removals stick
        other.read("/local", tx)
        for i in range(200):  # warm up the allocator
            xs.write(f"/churn/{i}-" + "x" * 1000, b"v")
            xs.rm(f"/churn/{i}-" + "x" * 1000)
        before = status_kb(host.proc.pid)
        for i in range(200, 6200):
            xs.write(f"/churn/{i}-" + "x" * 1000, b"v")
            xs.rm(f"/churn/{i}-" + "x" * 1000)
        grown = status_kb(host.proc.pid) - before
        assert other.transaction_end(tx)
    assert grown < 3 * 1024, f"{grown} kB for 6000 distinct removed paths"


def test_a_removal_meanwhile_still_conflicts(host):
    with host.xenstore(0) as a, host.xenstore(0) as b:
        a.write("/c/x", b"1")
        tx = a.transaction_start()
        assert a.read("/c/x", tx) == b"1"
        b.rm("/c/x")
        a.write("/c/y", b"2", tx)
        assert a.transaction_end(tx) is False  # EAGAIN
        tx = a.transaction_start()
        with pytest.raises(XenStoreError):
            a.read("/c/x", tx)
        b.write("/c/x", b"back")  # made meanwhile: the transaction saw it missing
        a.write("/c/y", b"2", tx)
        assert a.transaction_end(tx) is False


# ---- 5. watch events of transactions --------------------------------------------------------


def test_node_made_and_removed_in_a_transaction_fires_no_event(host):
    """finalize_transaction fires with the permissions the node had when first touched;
    a node that did not exist before and does not after is seen by nobody
    (watch_permitted)."""
    with host.xenstore(0) as xs0:
        xs0.write("/w/marker", b"")
        xs0.set_perms("/w", [XenStorePerm(0, "n"), XenStorePerm(2, "r")])
        xs0.set_perms("/w/marker", [XenStorePerm(0, "r")])
    with Raw(host, 2) as spy, host.xenstore(0) as xs0:
        assert spy.ask(Op.WATCH, b"/\0spy\0") == b"OK\0"
        tx = xs0.transaction_start()
        xs0.write("/secret-name", b"s", tx)
        xs0.rm("/secret-name", tx)
        assert xs0.transaction_end(tx)
        xs0.write("/w/marker", b"now")  # readable: its event marks the end
        spy.sock.settimeout(5)
        seen = [e[0] for e in spy.events]
        while b"/w/marker" not in seen:
            _, _, _, payload = spy.message()
            seen.append(payload.split(b"\0")[0])
        assert b"/secret-name" not in seen


def test_removed_node_events_follow_its_permissions(host):
    with host.xenstore(0) as xs0:
        xs0.write("/v/hidden", b"")
        xs0.write("/v/shown", b"")
        xs0.set_perms("/v/shown", [XenStorePerm(0, "r")])
    with Raw(host, 2) as spy, host.xenstore(0) as xs0:
        assert spy.ask(Op.WATCH, b"/v\0spy\0") == b"OK\0"
        tx = xs0.transaction_start()
        xs0.rm("/v/hidden", tx)
        xs0.rm("/v/shown", tx)
        assert xs0.transaction_end(tx)
        spy.sock.settimeout(5)
        assert spy.message()[3] == b"/v\0spy\0"  # the event at registration
        _, _, _, payload = spy.message()
        assert payload.split(b"\0")[0] == b"/v/shown"
        spy.sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            spy.message()


# ---- 6. privileged operations ------------------------------------------------------------


def test_is_domain_introduced_is_for_privileged_domains(host):
    """XS_IS_DOMAIN_INTRODUCED carries XS_FLAG_PRIV: EACCES for a domU."""
    with Raw(host, 1) as r1, Raw(host, 0) as r0:
        assert r1.ask(Op.IS_DOMAIN_INTRODUCED, b"2\0") == b"!EACCES"
        for op in (Op.INTRODUCE, Op.RELEASE, Op.RESUME, Op.SET_TARGET, Op.CONTROL):
            assert r1.ask(op, b"2\0") == b"!EACCES"
        assert r0.ask(Op.IS_DOMAIN_INTRODUCED, b"2\0") == b"T\0"
        assert r0.ask(Op.IS_DOMAIN_INTRODUCED, b"77\0") == b"F\0"
        assert r0.ask(Op.IS_DOMAIN_INTRODUCED, b"32752\0") == b"T\0"  # DOMID_SELF
        assert r0.ask(Op.IS_DOMAIN_INTRODUCED, b"2") == b"!EINVAL"


# ---- 7. malformed requests and limits ---------------------------------------------------------


MALFORMED = [
    (Op.READ, b"domid", b"!EINVAL"),                 # no NUL: onearg
    (Op.READ, b"domid\0\0", b"!EINVAL"),             # two strings
    (Op.READ, b"", b"!EINVAL"),
    (Op.WRITE, b"no-nul-at-all", b"!EINVAL"),
    (Op.MKDIR, b"", b"!EINVAL"),
    (Op.RM, b"\0", b"!EINVAL"),
    (Op.WATCH, b"data\0", b"!EINVAL"),               # two strings exactly
    (Op.WATCH, b"data\0t\0extra\0", b"!EINVAL"),
    (Op.UNWATCH, b"data\0nope\0", b"!ENOENT"),
    (Op.SET_PERMS, b"data\0", b"!EINVAL"),
    (Op.SET_PERMS, b"data\0x1\0", b"!EINVAL"),
    (Op.SET_PERMS, b"data\0r\0", b"!EINVAL"),
    (Op.SET_PERMS, b"data\0r1z\0", b"!EINVAL"),
    (Op.SET_PERMS, b"data\0" + b"r1\0" * 6, b"!ENOSPC"),   # quota_nb_perms_per_node
    (Op.SET_PERMS, b"data\0" + b"r1\0" * 1300, b"!ENOSPC"),
    (Op.SET_PERMS, b"data\0n77\0", b"!ENOENT"),       # an owner that does not exist
    (Op.SET_PERMS, b"data\0n2\0", b"!EPERM"),         # a domU cannot give a node away
    (Op.SET_PERMS, b"/local\0n0\0", b"!EACCES"),
    (Op.TRANSACTION_END, b"X\0", b"!EINVAL"),
    (Op.TRANSACTION_END, b"T\0", b"!ENOENT"),
    (Op.GET_DOMAIN_PATH, b"abc\0", b"/local/domain/0\0"),   # atoi
    (Op.GET_DOMAIN_PATH, b"7", b"!EINVAL"),
    (Op.DIRECTORY_PART, b"data\0x\0y\0", b"!EINVAL"),
    (Op.WATCH_EVENT, b"x\0y\0", b"!ENOSYS"),
    (Op.ERROR, b"EINVAL\0", b"!ENOSYS"),
    (20, b"", b"!ENOSYS"),                            # XS_RESTRICT, removed
    (23, b"", b"!ENOSYS"),
    (0xFFFF, b"", b"!ENOSYS"),
    (Op.WRITE, b"data/v\0" + b"v" * 2020, b"!ENOSPC"),    # quota_max_entry_size
    (Op.READ, b"/local/domain/2/data/nothing\0", b"!EACCES"),   # errno_from_parents
    (Op.READ, b"data/nothing\0", b"!ENOENT"),
]


def test_malformed_requests_get_the_errors_xenstored_gives(host):
    with Raw(host, 1) as r:
        for op, payload, want in MALFORMED:
            assert r.ask(op, payload) == want, (op, payload[:40])
        assert r.ask(Op.READ, b"domid\0", tx=12345) == b"!ENOENT"   # unknown transaction
        assert r.ask(Op.WRITE, b"data/v\0" + b"v" * 2000) == b"OK\0"
    alive(host)


@pytest.mark.parametrize("junk", [
    struct.pack("=IIII", Op.READ, 1, 0, 4097) + b"x" * 200,          # over the limit
    struct.pack("=IIII", Op.READ, 1, 0, 0xFFFFFFFF),
])
def test_a_stream_that_cannot_be_resynchronised_is_closed(host, junk):
    with Raw(host, 1) as r:
        r.sock.sendall(junk)
        with pytest.raises((EOFError, ConnectionResetError)):
            r.message()
    alive(host, 1)


def test_a_request_split_byte_by_byte_is_answered(host):
    with Raw(host, 1) as r:
        data = HEADER.pack(Op.READ, 9, 0, 6) + b"domid\0"
        for i in range(len(data)):
            r.sock.send(data[i:i + 1])
            time.sleep(0.001)
        assert r.message() == (Op.READ, 9, 0, b"1")


def test_watch_and_transaction_quotas_and_their_release(host):
    with Raw(host, 1) as r, Raw(host, 1) as r2:
        for i in range(129):
            assert r.ask(Op.WATCH, b"/w%d\0t\0" % i) == b"OK\0"
        assert r2.ask(Op.WATCH, b"/x\0t\0") == b"!E2BIG"   # the quota is the domain's
        assert r.ask(Op.WATCH, b"/w0\0t\0") == b"!EEXIST"
        for _ in range(11):
            assert r.ask(Op.TRANSACTION_START, b"\0").rstrip(b"\0").isdigit()
        assert r2.ask(Op.TRANSACTION_START, b"\0") == b"!ENOSPC"
        assert r.ask(Op.RESET_WATCHES, b"") == b"OK\0"   # do_reset_watches: both go
        assert r2.ask(Op.WATCH, b"/x\0t\0") == b"OK\0"
        assert r2.ask(Op.TRANSACTION_START, b"\0").rstrip(b"\0").isdigit()
    with Raw(host, 1) as r:  # closing a connection frees what it held
        for i in range(128):
            assert r.ask(Op.WATCH, b"/w%d\0t\0" % i) == b"OK\0"


def test_transaction_start_inside_a_transaction_is_ebusy(host):
    with Raw(host, 1) as r:
        tx = int(r.ask(Op.TRANSACTION_START, b"\0").rstrip(b"\0"))
        assert r.ask(Op.TRANSACTION_START, b"\0", tx=tx) == b"!EBUSY"
        assert r.ask(Op.WATCH, b"data\0t\0", tx=tx) == b"OK\0"   # XS_FLAG_NOTID
        assert r.ask(Op.TRANSACTION_END, b"F\0", tx=tx) == b"OK\0"


def test_a_domain_that_never_reads_is_stalled_and_the_host_is_not(host):
    """domain_can_read: too many unsent replies stall that domain's input; its watch events
    are bounded by its memory quota.  Others are answered meanwhile."""
    assert host.proc is not None
    rss = status_kb(host.proc.pid)
    with Raw(host, 1) as r:
        r.ask(Op.WATCH, b"data\0" + b"t" * 3000 + b"\0")
        r.sock.setblocking(False)
        request = HEADER.pack(Op.WRITE, 1, 0, 9) + b"data/x\0vv"
        sent = 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and sent < 64 << 20:
            try:
                sent += r.sock.send(request * 64)
            except BlockingIOError:
                break  # the server stopped reading us
        assert sent < 64 << 20
        t = time.monotonic()
        alive(host, 2)
        assert time.monotonic() - t < 1
        assert status_kb(host.proc.pid) - rss < 16 * 1024
    alive(host, 1)


def test_connections_per_domain_are_bounded(host):
    socks = []
    try:
        for _ in range(80):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(host.dir / "dom1" / "xenstored.sock"))
            socks.append(s)
        time.sleep(0.3)
        assert host.proc is not None
        fds = len(os.listdir(f"/proc/{host.proc.pid}/fd"))
        assert fds < 80 + 40
        alive(host, 2)
    finally:
        for s in socks:
            s.close()
    alive(host, 1)
