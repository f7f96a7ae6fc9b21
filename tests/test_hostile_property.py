"""Random hostile sequences against a LIVE daemon (hypothesis), through tests/hostile.py.

Each example attaches the hostile domain 2 to a fresh link of domain 1's daemon, plays a
random list of actions (frames of every type with reused, unknown and wrong-parity ids, lying
lengths, windows and credits; raw indices; GOODBYE or death at any point; XenStore junk in
every tree it can reach) while a bystander stream 1 <-> 3 runs, then checks that the daemon
is alive, the bystander's bytes came back intact, the hostile link and every channel of domain
2 are gone, and memory, descriptors and log lines stay bounded.

The world (real daemons) is shared by the whole module; a daemon that died in one example is
restarted before the next, so that one failure does not hide the others.

Length of a run: ``XSOCK_HOSTILE_EXAMPLES`` (default 50, under a minute), or
``XSOCK_HOSTILE_SECONDS`` to keep generating new examples for that long, e.g.::

    XSOCK_HOSTILE_SECONDS=900 .venv/bin/python -m pytest tests/test_hostile_property.py -q

``XSOCK_HOSTILE_SHRINK=1`` lets hypothesis shrink a failing sequence (slow: every step
replays against the live daemon).
"""

from __future__ import annotations

import errno
import os
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from hostile import (
    ACCEPT,
    CREDIT,
    DATA,
    FIN,
    FRAME_TYPES,
    GOODBYE,
    INDEX_OFFSETS,
    LIVE_ACCEPTOR,
    LIVE_INITIATOR,
    MAX_WINDOW,
    OPEN,
    RESET,
    XS_ROOT,
    Arena,
    HostileDomain,
    LinkGone,
    channel_table,
    encode_frame,
    fd_count,
    log_size,
    proc_status,
    read_log,
    record_lines,
    warning_lines,
)
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from xsockd.backend_sim import SimBackend
from xsockd.errors import XenStoreError

EXAMPLES = int(os.environ.get("XSOCK_HOSTILE_EXAMPLES", "50"))
SECONDS = float(os.environ.get("XSOCK_HOSTILE_SECONDS", "0"))
SHRINK = os.environ.get("XSOCK_HOSTILE_SHRINK", "") not in ("", "0")

# Bounds checked after every example.  Generous on purpose (a Python daemon's RSS moves with
# its allocator); a leak per stream or per example still crosses them within a long run.
RSS_SLACK_KB = 64 * 1024
FD_SLACK = 16
WARNINGS_PER_EXAMPLE = 40
RECORDS_PER_EXAMPLE = 60  # plus 2 per OPEN the example sent (a stream may log its end)

Action = tuple[Any, ...]
# What the examples reached, printed at the end of the test (pytest -s): so that a run that
# only ever tests a link killed by its first frame is visible as such.
REACHED: Counter[str] = Counter()


def event(what: str) -> None:
    REACHED[what] += 1

# ---- strategies -----------------------------------------------------------------------------

# Our ids are even (we are the acceptor); 1 is the victim's own stream (the application that
# made it offer the link).  Reused ids come from a small pool so that they collide often.
REUSED_IDS = st.sampled_from([2, 4, 6, 8])
# Mostly valid values (weighted by repetition): a link killed by its first frame tests little.
ids = st.one_of(REUSED_IDS, REUSED_IDS, REUSED_IDS, REUSED_IDS, st.just(1),
                st.sampled_from([0, 3, 5, 0xFFFFFFFF]), st.integers(0, 2**32 - 1))
VALID_WINDOWS = st.sampled_from([4096, 65536, 256 * 1024])
windows = st.one_of(VALID_WINDOWS, VALID_WINDOWS, VALID_WINDOWS,
                    st.sampled_from([0, 1, 4095, MAX_WINDOW, MAX_WINDOW + 1, 2**32 - 1]))
VALID_NAMES = st.sampled_from([b"count", b"", b"not-offered", b"a" * 64])
names = st.one_of(VALID_NAMES, VALID_NAMES, VALID_NAMES,
                  st.sampled_from([b"a" * 65, b"bad name", b"\n", b"x\x00y", b"../count"]))
amounts = st.one_of(st.sampled_from([1, 16, 4096, 65536]),
                    st.integers(0, 2**32 - 1))
frame_types = st.one_of(st.sampled_from(FRAME_TYPES), st.integers(0, 0xFFFF))



def frame(ftype: int, stream: int, arg: int, payload: bytes) -> bytes:
    """A named builder, so that hypothesis prints a failing example as frame(1, 2, ...)."""
    return encode_frame(stream, ftype, arg, payload)


def wild(stream: int, ftype: int, arg: int, payload: bytes, flags: int,
         length: int | None) -> bytes:
    return encode_frame(stream, ftype, arg, payload, flags=flags, length=length)


# Frames that mean something (so that streams open and data flows), then wild ones.
good_frames = st.one_of(
    st.builds(frame, st.just(OPEN), ids, windows, names),
    st.builds(frame, st.just(ACCEPT), ids, windows, st.just(b"")),
    st.builds(frame, st.just(DATA), ids, st.just(0),
              st.sampled_from([1, 15, 100, 4096, 65536]).map(lambda n: b"d" * n)),
    st.builds(frame, st.just(CREDIT), ids, amounts, st.just(b"")),
    st.builds(frame, st.just(FIN), ids, st.just(0), st.just(b"")),
    st.builds(frame, st.just(RESET), ids, st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 99]),
              st.just(b"")),
    st.builds(frame, st.just(GOODBYE), st.sampled_from([0, 0, 2]), st.just(0), st.just(b"")),
)
wild_frames = st.builds(
    wild, ids, frame_types, amounts, st.binary(max_size=80), st.sampled_from([0, 0, 1, 0xFFFF]),
    st.one_of(st.none(), st.sampled_from([1, 15, 17, 64, 65, 4096, 2**31, 2**32 - 1])))
frames = st.one_of(
    st.tuples(st.just(OPEN), ids, windows, names),
    st.tuples(st.just(ACCEPT), ids, windows, st.just(b"")),
    st.tuples(st.just(DATA), ids, st.just(0),
              st.sampled_from([1, 15, 100, 4096, 65536]).map(lambda n: b"d" * n)),
    st.tuples(st.just(CREDIT), ids, amounts, st.just(b"")),
    st.tuples(st.just(FIN), ids, st.just(0), st.just(b"")),
    st.tuples(st.just(RESET), ids, st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 99]), st.just(b"")),
    st.tuples(st.just(GOODBYE), st.sampled_from([0, 0, 2]), st.just(0), st.just(b"")),
).map(lambda t: encode_frame(t[1], t[0], t[2], t[3]))
wild_frames = st.builds(
    lambda stream, ftype, arg, payload, flags, length: encode_frame(
        stream, ftype, arg, payload, flags=flags, length=length),
    ids, frame_types, amounts, st.binary(max_size=80), st.sampled_from([0, 0, 1, 0xFFFF]),
    st.one_of(st.none(), st.sampled_from([1, 15, 17, 64, 65, 4096, 2**31, 2**32 - 1])))
frames = st.one_of(good_frames, good_frames, good_frames, wild_frames)

index_values = st.one_of(
    st.tuples(st.just("rel"), st.sampled_from([-16, -1, 1, 8, 16, 4096, 1 << 18, (1 << 18) + 16])),
    st.tuples(st.just("abs"), st.sampled_from([0, 1, 16, 2**31, 2**32 - 16, 2**32 - 1])))

xs_names = st.one_of(
    st.sampled_from(["1", "2", "3", "garbage", "-", "_", "0", "007", "99999", "a" * 300,
                     "version", "ring-refs", "x/y/z", "@releaseDomain", "bad name", "\n"]),
    st.text(alphabet="abz019_-@/", min_size=1, max_size=12))
xs_values = st.one_of(
    st.sampled_from([b"", b"offer 1", b"offer 007", b"offer 18446744073709551616",
                     b"accepted 1", b"refused \nFORGED", b"\xff\xfe", b"x" * 2048,
                     b"x" * 2049, b"x" * 5000]),
    st.binary(max_size=64))
# Where the hostile domain writes: its own answer node and tree, the victim's request
# directory and offer, and the third domain's tree ({n}: a drawn name).
XS_TARGETS = ["{req}", "/local/domain/2/data/xsock/request/{n}", "/local/domain/2/{n}",
              "/local/domain/1/data/xsock/request/{n}", "/local/domain/1/data/xsock/request/2",
              "/local/domain/1/data/xsock/link/2/{n}", "/local/domain/1/data/xsock/{n}",
              "/local/domain/3/data/xsock/request/{n}", "/local/domain/3/data/xsock/link/1/{n}",
              "/local/domain/2/data/xsock/link/1/{n}", "/local/domain/0/{n}"]
XS_RM_TARGETS = [*XS_TARGETS, "/local/domain/1/data/xsock/request", "/local/domain/1/data/xsock"]

actions = st.one_of(
    st.tuples(st.just("frames"), st.lists(frames, min_size=1, max_size=8)),
    st.tuples(st.just("frames"), st.lists(frames, min_size=1, max_size=8)),
    # A burst whose end the victim has no time to look at: GOODBYE in the same burst, or
    # the peer's death right after it.
    st.tuples(st.just("frames_then"), st.lists(frames, min_size=1, max_size=8),
              st.sampled_from(["goodbye", "die"])),
    st.tuples(st.just("session"), REUSED_IDS, st.sampled_from([0, 1, 4096, 100_000])),
    st.tuples(st.just("index"), st.sampled_from(sorted(INDEX_OFFSETS)), index_values),
    st.tuples(st.just("live"), st.sampled_from([LIVE_INITIATOR, LIVE_ACCEPTOR]),
              st.sampled_from([0, 1, 2, 255])),
    st.tuples(st.just("notify")),
    st.tuples(st.just("drain")),
    st.tuples(st.just("app"), st.sampled_from([1, 1000, 100_000])),
    st.tuples(st.just("sleep"), st.sampled_from([0.0, 0.01, 0.1])),
    st.tuples(st.just("xs_write"), st.sampled_from(XS_TARGETS), xs_names, xs_values),
    st.tuples(st.just("xs_rm"), st.sampled_from(XS_RM_TARGETS), xs_names),
    st.tuples(st.just("goodbye")),
    st.tuples(st.just("die")),
)
sequences = st.tuples(st.lists(actions, max_size=25), st.sampled_from(["goodbye", "die"]))


# ---- the world --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def arena(tmp_path_factory) -> Iterator[Arena]:
    a = Arena(tmp_path_factory.mktemp("hostile-property"), max_streams=64)
    yield a
    a.close()


class Run:
    """One example against the arena: the hostile link, the bystander, the baseline."""

    def __init__(self, arena: Arena, baseline: dict[str, int]) -> None:
        self.arena = arena
        self.baseline = baseline
        self.h: HostileDomain | None = None
        self.stuck = False  # the victim stopped reading our ring: ring actions are pointless
        self.opens = 0
        self.written: list[str] = []

    def play(self, action: Action) -> None:
        h = self.h
        assert h is not None
        kind = action[0]
        ring_ok = not h.dead and not self.stuck
        try:
            if kind == "frames" and ring_ok:
                self.opens += sum(1 for f in action[1] if f[4:6] == OPEN.to_bytes(2, "little"))
                h.send(*action[1], wait=1.0)
            elif kind == "frames_then" and ring_ok:
                self.opens += sum(1 for f in action[1] if f[4:6] == OPEN.to_bytes(2, "little"))
                if action[2] == "goodbye":
                    h.send(*action[1], encode_frame(0, GOODBYE), wait=1.0)
                else:
                    h.send(*action[1], wait=1.0)
                    h.die()
            elif kind == "session" and ring_ok:
                self.session(action[1], action[2])
            elif kind == "index" and ring_ok:
                name, (how, value) = action[1], action[2]
                if how == "rel":
                    value += h.tx_prod if name.startswith("tx") else h.rx_cons
                h.set_index(name, value)
            elif kind == "live" and ring_ok:
                h.poke_byte(action[1], action[2])
                h.notify()
            elif kind == "notify":
                h.notify()
            elif kind == "drain" and ring_ok:
                h.recv()
            elif kind == "app":
                self.app_send(action[1])
            elif kind == "sleep":
                time.sleep(action[1])
            elif kind == "xs_write" and not h.dead:
                path = self.path(action[1], action[2])
                if h.xs_write(path, action[3]) == 0:
                    self.written.append(path)
            elif kind == "xs_rm" and not h.dead:
                h.xs_rm(self.path(action[1], action[2]))
            elif kind == "goodbye" and ring_ok:
                h.goodbye()
            elif kind == "die":
                h.die()
        except LinkGone:
            self.stuck = True
        except ValueError as e:  # a path the client itself refuses to send (not ASCII...)
            if "xenstore" not in str(e).lower() and "ascii" not in str(e).lower():
                raise

    def path(self, template: str, name: str) -> str:
        assert self.h is not None
        return template.format(req=self.h.request_node, n=name)

    def session(self, sid: int, size: int) -> None:
        """A well-behaved stream in the middle of the chaos: OPEN, wait for ACCEPT, DATA
        within the window, FIN."""
        h = self.h
        assert h is not None
        self.opens += 1
        h.send(encode_frame(sid, OPEN, 65536, b"count"), wait=1.0)
        got = h.recv_until(lambda f: f.stream == sid and f.type in (ACCEPT, RESET), 1.0)
        event(f"session: {'ACCEPT' if got and got[-1].type == ACCEPT else 'no ACCEPT'}")
        if got and got[-1].type == ACCEPT:
            left = min(size, got[-1].arg)
            while left > 0:
                n = min(left, 16384)
                h.send(encode_frame(sid, DATA, 0, b"s" * n), wait=1.0)
                left -= n
            h.send(encode_frame(sid, FIN), wait=1.0)

    def app_send(self, n: int) -> None:
        app = self.app
        try:
            app.setblocking(False)
            app.send(b"a" * n)
        except OSError:
            pass

    def start(self) -> None:
        a = self.arena
        if a.restart_if_dead() or not a.wait_link_gone(5):
            # A dead victim, or one still holding the last example's link: start afresh so
            # that this example tests something (the last one already failed for it).
            a.daemon.stop()
            a.daemon.start()
        self.log_start = log_size(a.log_path)
        self.bystander = a.bystander()
        try:
            self.h, self.app = a.attack_link()
        except BaseException:
            self.bystander.close()  # its threads end on the closed socket
            raise

    def finish(self, ending: str) -> None:
        """Ends the hostile link (if the actions did not), cleans the hostile's junk, then
        checks every invariant."""
        a = self.arena
        h = self.h
        assert h is not None
        # What the example reached (REACHED): did the victim drop the link before the end
        # (a violation it caught), or did it last?
        event("victim dropped the link itself" if not a.offer_nodes() else "link lasted")
        try:
            if not h.dead and not self.stuck and ending == "goodbye":
                try:
                    h.goodbye()
                except LinkGone:
                    pass
            self.cleanup_xenstore()
        finally:
            if ending == "die":
                h.die()
            else:
                h.close()
            self.app.close()
        problems: list[str] = []
        if not a.wait_link_gone(15):
            problems.append("the victim kept its link to domain 2 after the peer left")
        try:
            self.bystander.check()
        except AssertionError as e:
            problems.append(str(e))
        try:
            problems += self.observe()
        except (OSError, AssertionError):
            if a.alive():
                raise
        if not a.alive():  # also when it died while we looked (its /proc entry went)
            problems.insert(0, "the victim died")
        text = read_log(a.log_path, self.log_start)
        warnings, records = warning_lines(text), record_lines(text)
        if len(warnings) > WARNINGS_PER_EXAMPLE:
            problems.append(f"{len(warnings)} warning lines in one example, e.g. "
                            f"{warnings[:3]}")
        if len(records) > RECORDS_PER_EXAMPLE + 2 * self.opens:
            problems.append(f"{len(records)} log records for {self.opens} OPENs")
        assert not problems, "\n".join(problems) + f"\n--- victim log:\n{text[-4000:]}"

    def observe(self) -> list[str]:
        """Returns what is wrong with the (living) victim's table, memory and descriptors."""
        a = self.arena
        problems = []
        table = channel_table(a.pid, a.log_path)
        deadline = time.monotonic() + 5
        while table.python_streams != table.core_streams and time.monotonic() < deadline:
            time.sleep(0.1)  # a CLOSED may still be on its way: the tables agree once quiet
            table = channel_table(a.pid, a.log_path)
        if 2 in table.peers:
            problems.append(f"the victim still holds channels of domain 2 once the link is "
                            f"gone:\n{table.text[:1000]}")
        if table.python_streams != table.core_streams or table.core_streams < 0:
            problems.append(f"the channel table ({table.python_streams} channels and "
                            f"admissions) does not match the data plane's stream tables "
                            f"({table.core_streams}):\n{table.text[:1000]}")
        rss, fds = proc_status(a.pid, "VmRSS"), fd_count(a.pid)
        self.baseline.setdefault("rss", rss)
        self.baseline.setdefault("fds", fds)
        if rss > self.baseline["rss"] + RSS_SLACK_KB:
            problems.append(f"VmRSS {rss} kB, baseline {self.baseline['rss']} kB")
        if fds > self.baseline["fds"] + FD_SLACK:
            problems.append(f"{fds} open descriptors, baseline {self.baseline['fds']}")
        return problems

    def cleanup_xenstore(self) -> None:
        """Removes what the hostile wrote (as domain 2, with what rights it has), so that a
        long run does not fill domain 2's node quota; its own tree goes whole."""
        a = self.arena
        with SimBackend(2, a.world.sim_dir) as b, b.open_xenstore() as xs:
            for path in [*reversed(self.written), f"/local/domain/2/{XS_ROOT}"]:
                try:
                    xs.rm(path)
                except XenStoreError as e:
                    if e.errno not in (errno.ENOENT, errno.EACCES, errno.EINVAL):
                        raise


def run_examples(arena: Arena, max_examples: int, baseline: dict[str, int]) -> None:
    phases = [Phase.explicit, Phase.generate] + ([Phase.shrink] if SHRINK else [])

    @settings(max_examples=max_examples, deadline=None, database=None, phases=phases,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(sequences)
    def example(seq: tuple[list[Action], str]) -> None:
        steps, ending = seq
        run = Run(arena, baseline)
        run.start()
        try:
            for action in steps:
                run.play(action)
        finally:
            try:
                run.finish(ending)
            finally:
                run.bystander.close()

    example()


def test_random_hostile_sequences_leave_the_daemon_whole(arena):
    baseline: dict[str, int] = {}
    if SECONDS <= 0:
        run_examples(arena, EXAMPLES, baseline)
    else:
        deadline = time.monotonic() + SECONDS
        while time.monotonic() < deadline:  # batches, each with fresh random sequences
            run_examples(arena, 10, baseline)
    print("reached:", dict(REACHED), f"victim restarts: {arena.restarts}")
