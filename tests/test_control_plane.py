"""The Manager in-process, on the simulated host, driven by a fake loop (no GLib, no sleeps).

Domains 1, 2 and 3 each get a Manager on one FakeLoop; 2 and 3 offer an echo service to 1.
The failure boundary, rendezvous v2 against a third domain, and the version refusal are
checked here, where a handler can be made to fail on purpose.
"""

from __future__ import annotations

import errno
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakeloop import FakeLoop
from simworld import EchoService

from xsockd.backend import XenStorePerm
from xsockd.backend_sim import SimBackend
from xsockd.config import parse_config
from xsockd.errors import XenStoreError, XsockError
from xsockd.manager import LINK_SETUP_TIMEOUT, Manager
from xsockd.rendezvous import offer_path, request_dir, request_path
from xsockd.sim.host import SimHost


class Plane:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.host = SimHost(work / "sim", domains=[0, 1, 2, 3]).__enter__()
        self.echo = EchoService(work / "echo.sock")
        self.loop = FakeLoop()
        self.managers: dict[int, Manager] = {}
        self._nudged_for = 0.0
        peers = {1: [2, 3], 2: [1], 3: [1]}
        for dom, dom_peers in peers.items():
            text = (f'[daemon]\nrundir = "{work}/run{dom}"\npeers = {dom_peers}\n'
                    f'sim_dir = "{work}/sim"\nbackend = "sim"\n')
            if dom != 1:
                text += f'default_service = "echo"\n[services.echo]\nsocket = "{work}/echo.sock"\n'
            m = Manager(parse_config(text), SimBackend(dom, work / "sim"), self.loop)
            m.start()
            self.managers[dom] = m

    def connect(self, src: int, dst: int) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(self.work / f"run{src}" / f"{dst}.sock"))
        s.settimeout(10)
        return s

    def echo_ok(self, src: int, dst: int, data: bytes = b"ping" * 1000) -> bool:
        """Opens a stream, echoes ``data`` through it; True if it came back intact."""
        s = self.connect(src, dst)
        got = bytearray()
        done = threading.Event()

        def io() -> None:
            try:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                while chunk := s.recv(65536):
                    got.extend(chunk)
            except OSError:
                pass
            done.set()

        t = threading.Thread(target=io)
        t.start()
        started = time.monotonic()
        while not done.is_set():
            self.loop.run_once()
            if time.monotonic() - started > 1.5 and not self.nudged(started):
                # Nothing moves: let the fake clock run out the link set-up timeout.
                self.loop.advance(LINK_SETUP_TIMEOUT + 1)
            if time.monotonic() - started > 20:
                raise AssertionError(f"a stream {src} -> {dst} did not end")
        t.join()
        s.close()
        # The pumps may carry a stream without the loop (admission table): let the managers
        # catch up with what happened meanwhile, as running daemons would.
        while self.loop.run_once(wait=0.05):
            pass
        return bytes(got) == data

    def retire(self, dom: int) -> None:
        m = self.managers.pop(dom)
        m.stop()
        m.backend.close()

    def nudged(self, started: float) -> bool:
        if self._nudged_for == started:
            return True
        self._nudged_for = started
        return False

    def close(self) -> None:
        for m in self.managers.values():
            m.stop()
            m.backend.close()
        self.echo.close()
        self.host.__exit__(None, None, None)


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[Plane]:
    p = Plane(tmp_path)
    yield p
    p.close()


def test_the_manager_imports_without_glib():
    code = "import sys, xsockd.manager; sys.exit('gi' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_streams_flow_in_process(plane: Plane):
    assert plane.echo_ok(1, 2)
    assert plane.echo_ok(1, 3)
    stats = plane.managers[1].statistics()
    assert stats["links_up"] == 2 and stats["handler_failures"] == 0


# (domain whose handler fails, method name): every entry point a peer can drive.
HANDLERS = [(2, "_on_request"), (2, "_admit"), (2, "_connect_service"), (2, "_on_link_event"),
            (1, "_on_peer_node"), (1, "_on_link_event"), (1, "_on_closed"),
            (2, "_on_peer_node"), (2, "_on_accepted")]
# Reached only for a stream the pump leaves to the loop: with no admission table.
NOT_FAST = {"_admit", "_connect_service"}


@pytest.mark.parametrize(("dom", "name"), HANDLERS)
def test_a_failing_handler_costs_only_its_link(plane: Plane, caplog, monkeypatch, dom, name):
    """An exception injected into a handler ends that link, logged once; a bystander link to
    a third domain is untouched and the failed link comes back once the handler works."""
    caplog.set_level(logging.DEBUG, logger="xsockd")
    assert plane.echo_ok(1, 3)  # the bystander link, up before the failure
    m = plane.managers[dom]
    original = getattr(m, name)
    calls = []

    def broken(*args: object, **kw: object) -> None:
        calls.append(args)
        raise RuntimeError(f"injected into {name}")

    monkeypatch.setattr(m, name, broken)
    if name in NOT_FAST:
        monkeypatch.setattr(m, "_set_admission", lambda link: link.ring.set_admission([], None))
    plane.echo_ok(1, 2)  # fails one way or another; must not raise out of the loop
    if not calls:  # _on_peer_node runs only when the peer's node changes: change it
        with plane.host.xenstore(0) as xs0:
            xs0.write(request_path(2, 1), b"refused injected")
        plane.loop.run_until(lambda: calls, what=f"{name} to run")
    plane.loop.run_until(lambda: m.counters["handler_failures"] > 0, what="the failure")
    assert f"injected into {name}" in caplog.text
    assert "internal error while" in caplog.text
    assert "Traceback" in caplog.text  # at debug level
    monkeypatch.setattr(m, name, original)
    monkeypatch.undo()  # the admission table too, for the links made from now on
    assert plane.echo_ok(1, 3)
    assert plane.echo_ok(1, 2)
    assert all(x.counters["handler_failures"] <= 2 for x in plane.managers.values()), \
        [(d, x.counters) for d, x in plane.managers.items()]


def test_a_third_domain_can_neither_squat_remove_read_nor_flood_requests(plane: Plane):
    """Regression (v1): any domain could create request/<victim> first and make it private,
    or remove the request directory; v2's nodes are made by the acceptor for its peers."""
    assert plane.echo_ok(1, 2)
    with plane.host.xenstore(3) as xs3:
        attempts = [lambda: xs3.write(request_path(2, 1), b"offer 5"),
                    lambda: xs3.write(request_path(2, 3), b"offer 5"),
                    lambda: xs3.write(f"{request_dir(2)}/junk", b"x"),
                    lambda: xs3.rm(request_path(2, 1)),
                    lambda: xs3.rm(request_dir(2)),
                    lambda: xs3.directory(request_dir(2)),
                    lambda: xs3.read(request_path(2, 1)),
                    lambda: xs3.set_perms(request_path(2, 1), [XenStorePerm(3, "b")])]
        for attempt in attempts:
            with pytest.raises(XenStoreError) as e:
                attempt()
            assert e.value.errno in (errno.EACCES, errno.ENOENT)
    with plane.host.xenstore(0) as xs0:
        assert sorted(xs0.directory(request_dir(2))) == ["1"]
        assert [str(p) for p in xs0.get_perms(request_path(2, 1))] == ["n2", "b1"]
    assert plane.echo_ok(1, 2)


def test_a_removed_request_node_is_recreated(plane: Plane, caplog):
    with plane.host.xenstore(1) as xs1:  # the peer itself may remove its node
        xs1.rm(request_path(2, 1))
    with plane.host.xenstore(0) as xs0:
        plane.loop.run_until(lambda: "1" in _names(xs0, request_dir(2)),
                             what="the node to come back")
    assert "was removed (only it or dom0 may): recreated" in caplog.text
    assert plane.echo_ok(1, 2)


def _names(xs, path: str) -> list[str]:
    try:
        return xs.directory(path)
    except XenStoreError:
        return []


def _write_offer(xs, owner: int, peer: int, values: dict[str, str]) -> None:
    base = offer_path(owner, peer)
    xs.write(base, b"")
    xs.set_perms(base, [XenStorePerm(owner, "n"), XenStorePerm(peer, "r")])
    for name, value in values.items():
        xs.write(f"{base}/{name}", value)


def test_a_version_1_offer_gets_a_refusal_naming_both_versions(plane: Plane, caplog):
    plane.retire(1)  # the test speaks for domain 1
    with plane.host.xenstore(1) as xs1:
        _write_offer(xs1, 1, 2, {"version": "1", "generation": "7", "ring-size": "4096",
                                 "control-ref": "9", "event-channel": "3",
                                 "ring-refs/0": "10 11"})
        xs1.write(request_path(2, 1), b"offer 7")
        plane.loop.run_until(lambda: xs1.read(request_path(2, 1)).startswith(b"refused"),
                             what="the answer")
        assert xs1.read(request_path(2, 1)) == b"refused 7 version 1; we speak 2"
    assert "it speaks link protocol version 1, we speak 2" in caplog.text


@pytest.mark.parametrize(("refs", "why"), [
    ({"ring-refs/00": "10 11"}, "ring-refs has chunks [00]"),        # passed int(), then KeyError
    ({"ring-refs/0": "010 11"}, "ring-refs/0 is '010'"),
    ({"ring-refs/0": "10  11"}, "ring-refs/0 is ''"),
    ({"ring-refs/0": "10 11", "ring-refs/1": "12"}, "want 0..0"),
])
def test_a_malformed_offer_is_refused_naming_the_node(plane: Plane, caplog, refs, why):
    """Regression: a chunk named 00 passed int() but the lookup used ring-refs/0 (KeyError)."""
    plane.retire(1)
    with plane.host.xenstore(1) as xs1:
        _write_offer(xs1, 1, 2, {"version": "2", "generation": "7", "ring-size": "4096",
                                 "control-ref": "9", "event-channel": "3", **refs})
        xs1.write(request_path(2, 1), b"offer 7")
        plane.loop.run_until(lambda: xs1.read(request_path(2, 1)).startswith(b"refused"),
                             what="the answer")
        assert xs1.read(request_path(2, 1)) == b"refused 7 malformed-offer"
    assert why in caplog.text
    assert f"{offer_path(1, 2)}/" in caplog.text
    assert plane.managers[2].counters["handler_failures"] == 0
    assert plane.managers[2].statistics()["links"] == 0


def test_a_flood_of_request_writes_costs_a_bounded_amount_of_work(plane: Plane, caplog):
    """Regression: each write to request/ rescanned every node, with a warning per node."""
    caplog.set_level(logging.WARNING, logger="xsockd")
    with plane.host.xenstore(1) as xs1:
        for i in range(300):
            xs1.write(request_path(2, 1), f"junk {i}\nforged line".encode())
        for _ in range(50):
            plane.loop.run_once(0.01)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) <= 12, [r.getMessage() for r in warnings]
    assert all("\n" not in r.getMessage() for r in caplog.records)
    assert plane.echo_ok(1, 2)


def test_a_peer_writing_its_node_in_a_loop_cannot_stop_a_start_or_a_reload(plane: Plane):
    """Regression (review): the request nodes were made in one transaction, which a peer
    writing its own node in a loop made fail every time: the daemon could not start."""
    stop = threading.Event()

    def hammer() -> None:
        with plane.host.xenstore(1) as xs1:
            while not stop.is_set():
                xs1.write(request_path(2, 1), b"junk")

    t = threading.Thread(target=hammer)
    t.start()
    try:
        m2 = plane.managers[2]
        for _ in range(20):
            m2.reload(m2.config)
        plane.retire(3)
        text = (f'[daemon]\nrundir = "{plane.work}/run3"\npeers = [1]\n'
                f'sim_dir = "{plane.work}/sim"\nbackend = "sim"\n')
        m3 = Manager(parse_config(text), SimBackend(3, plane.work / "sim"), plane.loop)
        m3.start()
        plane.managers[3] = m3
    finally:
        stop.set()
        t.join()


def test_nodes_an_older_version_let_others_make_are_cleared(plane: Plane):
    with plane.host.xenstore(0) as xs0:  # a v1 squat: a node owned by domain 3, private
        xs0.write(f"{request_dir(2)}/1/x", b"offer 1")
        xs0.write(f"{request_dir(2)}/9", b"offer 1")
        # (owned by an existing domain: xenstored refuses an owner that does not exist)
        xs0.set_perms(f"{request_dir(2)}/9", [XenStorePerm(3, "n")])
        m2 = plane.managers[2]
        m2.reload(m2.config)
        assert xs0.directory(request_dir(2)) == ["1"]
        assert [str(p) for p in xs0.get_perms(request_path(2, 1))] == ["n2", "b1"]
    assert plane.echo_ok(1, 2)


def test_a_reload_that_cannot_listen_keeps_the_old_configuration(plane: Plane):
    """Regression (review): an OSError from a new listener escaped the reload and ended the
    daemon, after the configuration had already been switched."""
    m1 = plane.managers[1]
    old = m1.config
    blocker = plane.work / "run1" / "4.sock"
    blocker.write_text("not a socket")
    new = parse_config(f'[daemon]\nrundir = "{plane.work}/run1"\npeers = [2, 3, 4]\n'
                       f'sim_dir = "{plane.work}/sim"\nbackend = "sim"\n')
    with pytest.raises(XsockError, match=r"cannot listen on .*4\.sock"):
        m1.reload(new)
    assert m1.config is old
    blocker.unlink()
    assert "peer 4 added" in m1.reload(new)
    assert (plane.work / "run1" / "4.sock").exists()
    assert plane.echo_ok(1, 2)


def test_link_offers_past_their_budget_are_refused_busy(plane: Plane, caplog):
    plane.retire(1)
    with plane.host.xenstore(1) as xs1:
        answers = []
        for gen in range(1, 11):
            xs1.write(request_path(2, 1), f"offer {gen}".encode())
            plane.loop.run_until(lambda g=gen: xs1.read(request_path(2, 1)).startswith(
                f"refused {g} ".encode()), what=f"the answer to offer {gen}")
            answers.append(xs1.read(request_path(2, 1)).decode())
    assert answers[:5] == [f"refused {g} malformed-offer" for g in range(1, 6)]
    assert answers[5:] == [f"refused {g} busy" for g in range(6, 11)]
    assert "more than 5 link offers" in caplog.text


@pytest.mark.parametrize(("argv", "daemon"), [
    (["bash", "-c", "exec -a xsockd sleep 30"], True),
    (["bash", "-c", "exec -a journalctl sleep 30 -u xsockd", "x"], False),
    ([sys.executable, "-c", "import time; time.sleep(30)", "xsockd"], False),
])
def test_a_stale_daemon_record_counts_only_for_an_xsockd_process(argv, daemon):
    from xsockd.rendezvous import _runs_xsockd
    p = subprocess.Popen(argv)
    try:
        time.sleep(0.3)  # let bash exec
        assert _runs_xsockd(p.pid) is daemon
    finally:
        p.kill()
        p.wait()
