"""Hostile domains against the sim's xenstored while real daemons stream (hypothesis).

Each example has three hostile domains (3, 4, 5) send random requests at once, valid and
malformed (lying lengths, unknown types, missing NULs, non-UTF-8 bytes, huge counts, floods of
nodes, watches and transactions, readers that never read), through raw sockets to their own
xenstored sockets, while a stream runs from domain 1 to domain 2's echo service through two
real xsockd daemons.  After each example the stream's bytes came back intact, the host still
answers, and its memory (VmRSS) and descriptors stay within bounds.

Length of a run: ``XSOCK_XS_EXAMPLES`` (default 20, well under a minute).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from simworld import SimWorld, stream_hashes

from xsockd.xenstore_wire import HEADER, Op

EXAMPLES = int(os.environ.get("XSOCK_XS_EXAMPLES", "20"))
HOSTILE = (3, 4, 5)
STREAM_BYTES = 1 << 20
EXAMPLE_SECONDS = 1.0
RSS_SLACK_KB = 48 * 1024     # three domains at their quotas, and the allocator's moods
FD_SLACK = 3 * 64 + 16       # every hostile domain at its connection limit

# ---- strategies -------------------------------------------------------------------------------

paths = st.one_of(
    st.sampled_from([b"data", b"data/x", b"data/x/y/z", b"/", b"/local/domain/1/data",
                     b"/local/domain/2/data/xsock", b"/local/domain/0", b"@x", b"@",
                     b"@releaseDomain", b"@introduceDomain", b"/a//b", b"/a/", b"\xff\xfe",
                     b"data/" + b"l" * 2100, b"/tool", b"", b"domid"]),
    st.binary(max_size=40).filter(lambda b: b"\0" not in b),
    st.text(alphabet="abz019_-@/", min_size=1, max_size=30).map(str.encode))
values = st.one_of(st.binary(max_size=64),
                   st.sampled_from([b"", b"x" * 2000, b"x" * 2100, b"\xff" * 100]))
tokens = st.one_of(st.sampled_from([b"t", b"", b"t" * 4000, b"\xff\xfe"]),
                   st.binary(max_size=16).filter(lambda b: b"\0" not in b))
perms = st.lists(st.one_of(st.sampled_from([b"n0", b"r1", b"b2", b"w3", b"n4", b"r5", b"x1",
                                            b"r", b"r0x10", b"r-1", b"n99"]),
                           st.binary(max_size=6)), min_size=0, max_size=8)
ops = st.one_of(st.sampled_from(list(Op)), st.sampled_from([20, 23, 0xFFFF, 2**32 - 1]),
                st.integers(0, 2**32 - 1))
tx_ids = st.one_of(st.just(0), st.just(0), st.integers(1, 12), st.integers(0, 2**32 - 1))


def request(op: int, payload: bytes, tx: int = 0, length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    return HEADER.pack(op & 0xFFFFFFFF, 7, tx, n) + payload


well_formed = st.one_of(
    st.builds(lambda p, v, tx: request(Op.WRITE, p + b"\0" + v, tx), paths, values, tx_ids),
    st.builds(lambda p, tx: request(Op.MKDIR, p + b"\0", tx), paths, tx_ids),
    st.builds(lambda p, tx: request(Op.RM, p + b"\0", tx), paths, tx_ids),
    st.builds(lambda p, tx: request(Op.READ, p + b"\0", tx), paths, tx_ids),
    st.builds(lambda p, tx: request(Op.DIRECTORY, p + b"\0", tx), paths, tx_ids),
    st.builds(lambda p, off: request(Op.DIRECTORY_PART, p + b"\0%d\0" % off), paths,
              st.integers(-5, 5000)),
    st.builds(lambda p, ps: request(Op.SET_PERMS, p + b"\0" + b"".join(x + b"\0" for x in ps)),
              paths, perms),
    st.builds(lambda p, t: request(Op.WATCH, p + b"\0" + t + b"\0"), paths, tokens),
    st.builds(lambda p, t: request(Op.UNWATCH, p + b"\0" + t + b"\0"), paths, tokens),
    st.builds(lambda tx: request(Op.TRANSACTION_START, b"\0", tx), tx_ids),
    st.builds(lambda tx, c: request(Op.TRANSACTION_END, c, tx), tx_ids,
              st.sampled_from([b"T\0", b"F\0", b"X\0", b"T"])),
    st.builds(lambda d: request(Op.IS_DOMAIN_INTRODUCED, d + b"\0"),
              st.sampled_from([b"1", b"2", b"99", b"x"])),
    st.builds(lambda d: request(Op.GET_DOMAIN_PATH, d + b"\0"),
              st.sampled_from([b"1", b"-1", b"abc", b"99999999999"])),
    st.just(request(Op.RESET_WATCHES, b"")),
)
malformed = st.one_of(
    st.builds(request, ops, st.binary(max_size=300), tx_ids),
    # A length that lies: shorter eats the next request's header, longer waits for bytes.
    st.builds(lambda op, p, n: request(op, p, 0, n), ops, st.binary(max_size=64),
              st.sampled_from([0, 1, 15, 100, 4096, 4097, 2**31, 2**32 - 1])),
    st.binary(min_size=1, max_size=40),
)
floods = st.one_of(
    st.builds(lambda n: b"".join(request(Op.WRITE, b"data/f%d/%d\0v" % (i // 150, i))
                                 for i in range(n)), st.sampled_from([200, 1100])),
    st.builds(lambda n: b"".join(request(Op.WATCH, b"/w%d\0t\0" % i) for i in range(n)),
              st.just(140)),
    st.just(request(Op.TRANSACTION_START, b"\0") * 14),
    st.just(request(Op.DIRECTORY, b"/local/domain\0") * 100),
)
# What stopped or killed the host before issue 10: a parent loop on "@" paths, replies and
# events over 4096 bytes.
LONG_NAMES = [b"data/big/%03d" % i + b"n" * 100 for i in range(60)]
killers = st.sampled_from([
    request(Op.WRITE, b"@x\0v"),
    request(Op.MKDIR, b"@releaseDomain\0"),
    request(Op.RM, b"@\0"),
    b"".join(request(Op.WRITE, n + b"\0") for n in LONG_NAMES)
    + request(Op.DIRECTORY, b"data/big\0"),
    request(Op.WATCH, b"data\0" + b"t" * 4000 + b"\0")
    + request(Op.WRITE, b"data/" + b"/".join([b"p" * 40] * 3) + b"\0v"),
])
actions = st.one_of(well_formed, well_formed, well_formed, malformed, floods, killers)
domain_scripts = st.tuples(st.lists(actions, max_size=30), st.sampled_from(["read", "never"]),
                           st.integers(1, 3))

# ---- the world ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[SimWorld]:
    w = SimWorld(tmp_path_factory.mktemp("xs-property"))
    try:
        w.start(1, 2)
        for d in HOSTILE[1:]:
            w.host.create_domain(d)
        yield w
    finally:
        w.close()


def host_status(world: SimWorld) -> tuple[int, int]:
    proc = world.host.proc
    assert proc is not None and proc.poll() is None, "the host died"
    with open(f"/proc/{proc.pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{proc.pid}/fd"))


def play(world: SimWorld, domid: int, script: tuple[list[bytes], str, int],
         stop: threading.Event, errors: list[BaseException]) -> None:
    """Sends one domain's requests over its sockets, again and again until ``stop``, reading
    replies or never reading."""
    actions, mode, nsocks = script
    socks: list[socket.socket] = []
    try:
        for _ in range(nsocks):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(world.host.dir / f"dom{domid}" / "xenstored.sock"))
            s.setblocking(False)
            socks.append(s)
        deadline = time.monotonic() + 10
        while actions and not stop.is_set() and time.monotonic() < deadline:
            for i, data in enumerate(actions):
                send(socks[i % nsocks], data, mode, stop, deadline)
            time.sleep(0.001)
    except BaseException as e:  # reported by the test
        errors.append(e)
    finally:
        for s in socks:
            s.close()


def send(s: socket.socket, data: bytes, mode: str, stop: threading.Event,
         deadline: float) -> None:
    view = memoryview(data)
    while view and not stop.is_set() and time.monotonic() < deadline:
        try:
            view = view[s.send(view):]
        except BlockingIOError:  # stalled by the server (or its buffer is full)
            drain(s, mode)
            time.sleep(0.005)
        except OSError:
            return  # hung up on, as a broken stream should be
    drain(s, mode)


def drain(s: socket.socket, mode: str) -> None:
    if mode != "read":
        return
    try:
        while data := s.recv(65536):
            REPLY_BYTES[0] += len(data)
    except OSError:
        pass


def assert_answers(world: SimWorld) -> None:
    t = time.monotonic()
    with world.host.xenstore(0) as xs:
        assert xs.read("/local/domain/1/domid") == b"1"
    with world.host.xenstore(2) as xs:
        assert xs.read("domid") == b"2"
    assert time.monotonic() - t < 5


BASELINE: dict[str, int] = {}
REPLY_BYTES = [0]   # what hostile readers got back: the server did answer them


@pytest.fixture(scope="module", autouse=True)
def answered_hostile_domains() -> Iterator[None]:
    yield
    assert REPLY_BYTES[0] > 0, "no hostile request was ever answered: the test tested nothing"


@example(scripts=tuple(([k], "read", 1) for k in (  # each killer at least once
    request(Op.WRITE, b"@x\0v"),
    b"".join(request(Op.WRITE, n + b"\0") for n in LONG_NAMES)
    + request(Op.DIRECTORY, b"data/big\0"),
    request(Op.WATCH, b"data\0" + b"t" * 4000 + b"\0")
    + request(Op.WRITE, b"data/" + b"/".join([b"p" * 40] * 3) + b"\0v"))))
@settings(max_examples=EXAMPLES, deadline=None, derandomize=False,
          phases=[Phase.explicit, Phase.reuse, Phase.generate],
          suppress_health_check=list(HealthCheck))
@given(scripts=st.tuples(domain_scripts, domain_scripts, domain_scripts))
def test_hostile_domains_cannot_stop_xenstore_or_a_stream(world: SimWorld,
                                                          scripts: tuple[Any, ...]) -> None:
    errors: list[BaseException] = []
    stop = threading.Event()
    threads = [threading.Thread(target=play, args=(world, d, sc, stop, errors))
               for d, sc in zip(HOSTILE, scripts, strict=True)]
    for t in threads:
        t.start()
    streams = 0
    end = time.monotonic() + EXAMPLE_SECONDS
    while streams == 0 or time.monotonic() < end:  # streams for as long as the attack runs
        with world.connect(1, 2) as s:
            sent, got = stream_hashes(s, STREAM_BYTES, block=1 << 16)
        assert sent == got, "the stream's data was damaged"
        streams += 1
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert_answers(world)
    rss, fds = host_status(world)
    if not BASELINE:
        BASELINE.update(rss=rss, fds=fds)
    assert rss - BASELINE["rss"] < RSS_SLACK_KB, f"host VmRSS grew by {rss - BASELINE['rss']} kB"
    assert fds - BASELINE["fds"] < FD_SLACK, f"host holds {fds - BASELINE['fds']} more fds"
