"""Hostile domains against the whole simulated host while real daemons stream (hypothesis).

Each example has three hostile domains (3, 4, 5) attack at once, each through both of its
sockets: its xenstored socket gets the random requests of ``test_xenstored_property`` (valid and
malformed, floods, readers that never read), its hypervisor socket random requests of this
module (valid grants, maps of refs other hostile domains granted it, ports and binds, hoarding
up to every limit, and malformed ones: not JSON, wrong types and ranges, unknown fields and
operations, messages past 64 KiB, descriptors attached, handles past the connection limit,
readers that never read).  Meanwhile a stream runs from domain 1 to domain 2's echo service
through two real xsockd daemons.  After each example the stream's bytes came back intact, the
host answers, no request raised inside it, every resource of the hostile domains is released
once their sockets close, and its memory (VmRSS) and descriptors stay within bounds.

Length of a run: ``XSOCK_ROBUST_EXAMPLES`` (default 10, about half a minute), e.g.::

    XSOCK_ROBUST_EXAMPLES=200 .venv/bin/python -m pytest tests/test_sim_robust.py -q
"""

from __future__ import annotations

import array
import json
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
from test_xenstored_property import domain_scripts as xs_scripts
from test_xenstored_property import host_status
from test_xenstored_property import play as play_xenstore

from xsockd.sim.host import control
from xsockd.sim.hypervisor import MAX_CONNECTIONS, recv_message

EXAMPLES = int(os.environ.get("XSOCK_ROBUST_EXAMPLES", "10"))
HOSTILE = (3, 4, 5)
STREAM_BYTES = 1 << 20
EXAMPLE_SECONDS = 1.0
RSS_SLACK_KB = 64 * 1024     # three domains at their XenStore quotas, and the allocator's moods
FD_SLACK = 32                # clients the host has not yet seen go

# ---- hypervisor strategies ----------------------------------------------------------------

peers = st.one_of(st.sampled_from(HOSTILE), st.sampled_from([0, 1, 2, 99, 0x7FEF]),
                  st.integers(-2, 2**40))
counts = st.one_of(st.sampled_from([1, 2, 16, 1024, 4096]), st.integers(-1, 5000))
small_ints = st.one_of(st.integers(0, 40), st.integers(-2**70, 2**70))
notifies = st.one_of(st.none(), st.sampled_from([[0, None], [5000, None], [None, 1], [1, 2]]),
                     st.lists(st.one_of(st.none(), small_ints), max_size=3))
junk = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True), st.text(max_size=8),
                 small_ints, st.lists(small_ints, max_size=4), st.dictionaries(
                     st.text(max_size=3), small_ints, max_size=2))
OPS = ["grant", "ungrant", "map", "unmap", "alloc_unbound", "bind", "close_port"]

valid = st.one_of(
    st.builds(lambda p, c, n: ("json", {"op": "grant", "peer": p, "count": c, "notify": n}),
              st.sampled_from(HOSTILE), st.sampled_from([1, 2, 16, 1024]), notifies),
    st.builds(lambda i: ("json", {"op": "ungrant", "id": i}), small_ints),
    st.builds(lambda k, n: ("map", k, n), st.integers(1, 4096), notifies),
    st.builds(lambda i: ("json", {"op": "unmap", "id": i}), small_ints),
    st.builds(lambda p: ("json", {"op": "alloc_unbound", "peer": p}), peers),
    st.just(("bind",)),
    st.builds(lambda p: ("json", {"op": "close_port", "port": p}), small_ints),
)
malformed = st.one_of(
    st.builds(lambda op, fields: ("json", {"op": op, **fields}),
              st.one_of(st.sampled_from(OPS), junk),
              st.dictionaries(st.sampled_from(["peer", "count", "refs", "id", "port", "notify",
                                               "fd", ""]), junk, max_size=4)),
    st.builds(lambda b: ("raw", b), st.binary(min_size=1, max_size=200)),
    st.sampled_from([("raw", b"[" * 70000), ("raw", b"{" + b'"a": 1, ' * 9000 + b"}"),
                     ("raw", b'{"op": "grant", "peer": 3, "count": 1' + b"1" * 5000 + b"}"),
                     ("raw", json.dumps({"op": "map", "peer": 3, "refs": [8] * 5000}).encode())]),
    st.builds(lambda obj, n: ("fds", obj, n),
              st.sampled_from([{"op": "grant", "peer": 3, "count": 1},
                               {"op": "alloc_unbound", "peer": 4}]),
              st.sampled_from([1, 2, 253])),
)
hoards = st.sampled_from([  # up to (and past) every per-domain limit
    ("hoard", {"op": "alloc_unbound", "peer": 4}, 1100),
    ("hoard", {"op": "grant", "peer": 5, "count": 1}, 1100),
    ("hoard", {"op": "grant", "peer": 3, "count": 1024}, 2),
    ("hoard_map", 1024, 17),
])
hv_actions = st.one_of(valid, valid, malformed, malformed, hoards)
hv_scripts = st.tuples(st.lists(hv_actions, min_size=1, max_size=25),
                       st.sampled_from(["read", "read", "never"]),
                       st.sampled_from([1, 2, MAX_CONNECTIONS + 2]))
domain_scripts = st.tuples(xs_scripts, hv_scripts)

# ---- playing a domain's hypervisor script -------------------------------------------------


class Pools:
    """What the hostile domains granted each other and the ports left for each other."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.refs: dict[int, list[tuple[int, list[int]]]] = {d: [] for d in HOSTILE}
        self.ports: dict[int, list[tuple[int, int]]] = {d: [] for d in HOSTILE}

    def record(self, domid: int, request: dict[str, Any], reply: dict[str, Any]) -> None:
        peer = request.get("peer")
        if not reply.get("ok") or peer not in HOSTILE:
            return
        with self.lock:
            if request.get("op") == "grant":
                self.refs[peer].append((domid, reply["refs"]))
            elif request.get("op") == "alloc_unbound":
                self.ports[peer].append((domid, reply["port"]))

    def map_request(self, domid: int, count: int, notify: Any) -> dict[str, Any] | None:
        with self.lock:
            if not self.refs[domid]:
                return None
            granter, refs = self.refs[domid][-1]
        return {"op": "map", "peer": granter, "refs": refs[:count], "notify": notify}

    def bind_request(self, domid: int) -> dict[str, Any] | None:
        with self.lock:
            if not self.ports[domid]:
                return None
            peer, port = self.ports[domid].pop()
        return {"op": "bind", "peer": peer, "port": port}


class HvPlayer:
    """One hostile domain's hypervisor handles."""

    def __init__(self, world: SimWorld, domid: int, pools: Pools, mode: str, nsocks: int,
                 stop: threading.Event) -> None:
        self.domid, self.pools, self.mode, self.stop = domid, pools, mode, stop
        self.path = str(world.host.dir / f"dom{domid}" / "hypervisor.sock")
        self.socks: list[socket.socket] = []
        self.answers = 0
        for _ in range(nsocks):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.connect(self.path)  # past the limit: accepted, then closed by the host
            s.settimeout(5)
            self.socks.append(s)
        self.turn = 0

    def close(self) -> None:
        for s in self.socks:
            s.close()

    def send(self, data: bytes, request: dict[str, Any] | None,
             fds: tuple[int, ...] = ()) -> None:
        if not self.socks:
            return
        s = self.socks[self.turn % len(self.socks)]
        self.turn += 1
        anc = ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
               if fds else [])
        try:
            if self.mode == "never":
                s.setblocking(False)
            s.sendmsg([data], anc)
            if self.mode == "never":
                return
            reply, got = recv_message(s)
        except (BlockingIOError, ValueError):
            return
        except TimeoutError:
            raise AssertionError(f"domain {self.domid}: no answer from the hypervisor in 5 s "
                                 f"to {data[:80]!r}") from None
        except OSError:  # hung up on (past the connection limit, or dropped): as it should
            self.socks.remove(s)
            s.close()
            return
        for fd in got:
            os.close(fd)
        if reply is None:
            self.socks.remove(s)
            s.close()
            return
        self.answers += 1
        if request is not None:
            self.pools.record(self.domid, request, reply)

    def act(self, action: tuple[Any, ...]) -> None:
        kind = action[0]
        if kind == "json":
            self.send(json.dumps(action[1]).encode(), action[1])
        elif kind == "raw":
            self.send(action[1], None)
        elif kind == "fds":
            r, w = os.pipe()
            try:
                self.send(json.dumps(action[1]).encode(), action[1], (r,) * action[2])
            finally:
                os.close(r)
                os.close(w)
        elif kind in ("map", "hoard_map"):
            for _ in range(1 if kind == "map" else action[2]):
                req = self.pools.map_request(self.domid, action[1],
                                             action[2] if kind == "map" else None)
                if req is None or self.stop.is_set():
                    return
                self.send(json.dumps(req).encode(), req)
        elif kind == "bind":
            req = self.pools.bind_request(self.domid)
            if req is not None:
                self.send(json.dumps(req).encode(), req)
        elif kind == "hoard":
            for _ in range(action[2]):
                if self.stop.is_set():
                    return
                self.send(json.dumps(action[1]).encode(), action[1])


def play_hypervisor(world: SimWorld, domid: int, script: tuple[list[Any], str, int],
                    pools: Pools, stop: threading.Event, errors: list[BaseException],
                    answers: list[int]) -> None:
    actions, mode, nsocks = script
    player = None
    try:
        player = HvPlayer(world, domid, pools, mode, nsocks, stop)
        deadline = time.monotonic() + 10
        while actions and not stop.is_set() and time.monotonic() < deadline:
            for action in actions:
                if stop.is_set():
                    break
                player.act(action)
            time.sleep(0.001)
    except BaseException as e:  # reported by the test
        errors.append(e)
    finally:
        if player is not None:
            answers.append(player.answers)
            player.close()


# ---- the world ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[SimWorld]:
    w = SimWorld(tmp_path_factory.mktemp("sim-robust"))
    try:
        w.start(1, 2)
        for d in HOSTILE[1:]:
            w.host.create_domain(d)
        yield w
    finally:
        w.close()


def hostile_held(world: SimWorld) -> dict[int, dict[str, int]]:
    acct = world.host.accounting()
    return {d: a for d, a in acct.items() if d in HOSTILE and any(a.values())}


BASELINE: dict[str, int] = {}
HV_ANSWERS = [0]


@pytest.fixture(scope="module", autouse=True)
def answered_hostile_domains() -> Iterator[None]:
    yield
    assert HV_ANSWERS[0] > 0, "no hostile hypervisor request was answered: nothing was tested"


@example(scripts=(  # every limit at once, by readers and by one that never reads
    (([], "read", 1), ([("hoard", {"op": "alloc_unbound", "peer": 4}, 1100),
                        ("hoard", {"op": "grant", "peer": 4, "count": 1024}, 2)], "read", 34)),
    (([], "read", 1), ([("hoard", {"op": "grant", "peer": 5, "count": 1}, 300),
                        ("hoard_map", 1, 300), ("raw", b"[" * 70000)], "never", 2)),
    (([], "read", 1), ([("hoard_map", 1024, 17), ("hoard", {"op": "alloc_unbound", "peer": 3},
                                                  1100)], "read", 1)),
))
@settings(max_examples=EXAMPLES, deadline=None, derandomize=False,
          phases=[Phase.explicit, Phase.reuse, Phase.generate],
          suppress_health_check=list(HealthCheck))
@given(scripts=st.tuples(domain_scripts, domain_scripts, domain_scripts))
def test_hostile_domains_cannot_stop_the_host_or_a_stream(world: SimWorld,
                                                          scripts: tuple[Any, ...]) -> None:
    errors: list[BaseException] = []
    answers: list[int] = []
    stop = threading.Event()
    pools = Pools()
    threads = []
    for d, (xs, hv) in zip(HOSTILE, scripts, strict=True):
        threads.append(threading.Thread(target=play_xenstore, args=(world, d, xs, stop, errors)))
        threads.append(threading.Thread(target=play_hypervisor,
                                        args=(world, d, hv, pools, stop, errors, answers)))
    for t in threads:
        t.start()
    streams = 0
    end = time.monotonic() + EXAMPLE_SECONDS
    try:
        while streams == 0 or time.monotonic() < end:  # streams for as long as the attack runs
            with world.connect(1, 2) as s:
                sent, got = stream_hashes(s, STREAM_BYTES, block=1 << 16)
            assert sent == got, "the stream's data was damaged"
            streams += 1
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors
    HV_ANSWERS[0] += sum(answers)
    # The host answers, raised nothing, and releases all the hostile domains held.
    t0 = time.monotonic()
    with world.host.xenstore(2) as xs:
        assert xs.read("domid") == b"2"
    assert time.monotonic() - t0 < 5
    assert control(world.sim_dir, {"op": "stats"})["internal_errors"] == 0
    world.wait_for("the hostile domains' handles to be released",
                   lambda: not hostile_held(world), timeout=10)
    rss, fds = host_status(world)
    if not BASELINE:
        BASELINE.update(rss=rss, fds=fds)
    assert rss - BASELINE["rss"] < RSS_SLACK_KB, f"host VmRSS grew by {rss - BASELINE['rss']} kB"
    assert fds - BASELINE["fds"] < FD_SLACK, f"host holds {fds - BASELINE['fds']} more fds"
