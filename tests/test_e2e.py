"""End to end between real xsockd processes on the simulated host."""

from __future__ import annotations

import errno
import hashlib
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from simworld import SimWorld, assert_ended, echo_roundtrip, stream_hashes

from xsockd.backend import XenStorePerm
from xsockd.errors import XenStoreError
from xsockd.rendezvous import how_to_stop, offer_path, request_dir, systemd_unit
from xsockd.ring import link_pages

GiB = 1 << 30


@pytest.fixture
def world(tmp_path):
    w = SimWorld(tmp_path)
    yield w
    w.close()


def link_nodes(world: SimWorld, a: int, b: int) -> list[str]:
    return world.xs_tree(offer_path(a, b)) + world.xs_tree(f"{request_dir(b)}/{a}")


def test_one_gib_each_way_arrives_intact(world):
    world.start(1, 2)
    with world.connect(1, 2, timeout=120) as s:
        sent, got = stream_hashes(s, GiB)
    assert sent == got
    line = world.echo.proc.stdout.readline().split()
    assert line == ["sha256", sent, str(GiB)]  # what the service received, hashed there


def test_thousand_concurrent_streams_within_the_grant_budget(world):
    world.start(1, 2)
    n = 1000
    socks = [world.connect(1, 2) for _ in range(n)]
    payloads = [os.urandom(2048) + struct.pack("<I", i) for i in range(n)]
    for s, data in zip(socks, payloads, strict=True):
        s.sendall(data)
    # All 1000 are open at once on one link: granted pages stay within Linux's default limit.
    acct = world.wait_for("1000 channels", lambda: world.accounting(1))
    assert 0 < acct["granted"] <= 1024
    assert acct["granted"] == link_pages(256 * 1024)
    for s in socks:
        s.shutdown(socket.SHUT_WR)
    for s, data in zip(socks, payloads, strict=True):
        got = bytearray()
        while chunk := s.recv(65536):
            got += chunk
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
        s.close()


def test_stalled_reader_does_not_slow_other_streams(world):
    world.start(1, 2)
    stalled = world.connect(1, 2)
    stalled.setblocking(False)
    pushed = 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # fill every buffer on the way until the writer blocks
        try:
            pushed += stalled.send(b"z" * 65536)
        except BlockingIOError:
            if not select.select([], [stalled], [], 0.5)[1]:
                break
    assert pushed > 0
    with world.connect(1, 2, timeout=60) as s:
        start = time.monotonic()
        sent, got = stream_hashes(s, 256 << 20)
        took = time.monotonic() - start
    assert sent == got
    assert took < 30, f"256 MiB beside a stalled stream took {took:.1f} s"
    stalled.close()


def test_half_close_and_either_side_closing(world):
    world.start(1, 2)
    with world.connect(1, 2) as s:
        s.sendall(b"ping")
        s.shutdown(socket.SHUT_WR)  # EOF reaches the echo; its reply still flows back
        assert s.recv(10) == b"ping"
        assert s.recv(10) == b""
    # The application closes without reading: the stream ends on both sides, nothing leaks.
    s = world.connect(1, 2)
    s.sendall(os.urandom(100_000))
    s.close()
    world.wait_for("channels to close", lambda: "closed" in world.daemons[1].log())
    with world.connect(1, 2) as s:
        assert echo_roundtrip(s, b"x" * 1000) == b"x" * 1000


@pytest.mark.parametrize("victim", [1, 2])
def test_kill9_of_either_daemon_ends_streams_and_releases_everything(world, victim):
    world.start(1, 2)
    survivor = 3 - victim
    s = world.connect(1, 2)
    s.sendall(b"a" * 10000)
    assert s.recv(10000)
    stop = threading.Event()

    def keep_writing() -> None:
        try:
            while not stop.is_set():
                s.send(b"b" * 65536)
        except OSError:
            pass
    t = threading.Thread(target=keep_writing)
    t.start()
    time.sleep(0.3)
    world.kill9(victim)
    # The application on domain 1 (or the echo service's connection) sees EOF or a reset,
    # quickly, not a hang.
    start = time.monotonic()
    with pytest.raises((ConnectionResetError, BrokenPipeError, EOFError, TimeoutError)):
        s.settimeout(5)
        while True:
            if not s.recv(1 << 20):
                raise EOFError
    stop.set()
    t.join()
    s.close()
    assert time.monotonic() - start < 5
    # The application on the other side (the echo service's connection) ended too.
    assert select.select([world.echo.proc.stdout], [], [], 5)[0], "the echo service never saw EOF"
    assert world.echo.proc.stdout.readline().split()[0] in ("sha256", "error")
    # The survivor released every grant, mapping, port and XenStore node of the link.
    world.wait_for("the survivor to release the link", lambda: (
        world.accounting(survivor)["granted"] == 0 and world.accounting(survivor)["mapped"] == 0
        and world.accounting(survivor)["ports"] == 0))
    # Its offer is gone; the request node at the victim is the victim's own (protocol v2: the
    # acceptor makes one per peer), kept so that a peer may ask while it restarts.
    assert world.xs_tree(offer_path(survivor, victim)) == []
    assert world.xs_tree(f"{request_dir(survivor)}/{victim}") == [
        f"{request_dir(survivor)}/{victim}"]
    assert "link with domain" in world.daemons[survivor].log()
    # The killed daemon comes back; a new connection works.
    world.daemons[victim].start()
    with world.connect(1, 2) as s2:
        assert echo_roundtrip(s2, b"again" * 1000) == b"again" * 1000


def test_refused_domain_and_missing_service(world):
    world.start(1, 2, 3, echo=False)
    # Domain 3 is not among domain 2's peers: domain 2 made no request node for it, so
    # domain 3 cannot even ask, and says why.
    world2_conf = world.daemons[2].config.read_text()
    assert "peers = [1]" in world2_conf
    with world.connect(3, 2) as s:
        assert s.recv(10) == b""  # refused: EOF, not a hang
    world.wait_for("domain 3 to log the refusal",
                   lambda: "has no link request node for us" in world.daemons[3].log()
                   and "or add 3 to [daemon] peers in its configuration" in world.daemons[3].log())
    # Domain 1 is allowed, but the echo service is not running: clear log line, EOF.
    with world.connect(1, 2) as s:
        assert s.recv(10) == b""
    world.wait_for("the missing service to be logged",
                   lambda: "unreachable" in world.daemons[2].log())
    for d in (1, 2, 3):
        assert world.daemons[d].proc.poll() is None, f"daemon {d} died"


def test_bad_config_value_is_refused_with_its_key(tmp_path):
    conf = tmp_path / "bad.conf"
    conf.write_text('[daemon]\nrundir = "/tmp/x"\npeers = [2]\n\n[link]\nring_size = 5000\n')
    r = subprocess.run([sys.executable, "-m", "xsockd.daemon", "--backend", "sim", "--domid",
                        "1", "--config", str(conf)], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert "ring_size" in r.stderr and "Traceback" not in r.stderr


def test_junk_in_request_nodes_is_survived_and_others_cannot_write_there(world):
    world.start(1, 2)
    with world.host.xenstore(3) as xs3:
        # Domain 3 (not a peer of 2) may create nothing in domain 2's request directory.
        for name in ("garbage", "1", "3"):
            with pytest.raises(XenStoreError) as e:
                xs3.write(f"{request_dir(2)}/{name}", b"offer 12")
            assert e.value.errno == errno.EACCES
    with world.host.xenstore(1) as xs1:
        # Domain 1 may write its own node: junk there is ignored, quietly.
        for junk in (b"\xff\xfe nonsense", b"offer 007", b"offer -1", b"x" * 1500, b"offer"):
            xs1.write(f"{request_dir(2)}/1", junk)
    with world.connect(1, 2) as s:
        assert echo_roundtrip(s, b"hello") == b"hello"
    assert world.daemons[2].proc.poll() is None
    assert "Traceback" not in world.daemons[2].log()


def test_request_nodes_cannot_be_removed_by_others_and_come_back_when_the_peer_does(tmp_path):
    """Regression: any domain could remove the request directory (v1), and domain 2 then
    refused every new link until it noticed."""
    world = SimWorld(tmp_path, peers={1: [2], 2: [1, 3], 3: [2]})
    try:
        world.start(1, 2)
        with world.host.xenstore(3) as xs3:  # a peer of 2, but the node is domain 1's
            for path in (request_dir(2), f"{request_dir(2)}/1"):
                with pytest.raises(XenStoreError) as e:
                    xs3.rm(path)
                assert e.value.errno == errno.EACCES
        with world.host.xenstore(1) as xs1:  # domain 1 may remove its own; 2 makes it again
            for _ in range(3):
                xs1.rm(f"{request_dir(2)}/1")
                world.wait_for("domain 2 to recreate it",
                               lambda: world.xs_tree(f"{request_dir(2)}/1") != [])
        assert "was removed (only it or dom0 may): recreated" in world.daemons[2].log()
        with world.connect(1, 2) as s:
            assert echo_roundtrip(s, b"still linked") == b"still linked"
    finally:
        world.close()


def test_malformed_offer_is_refused_naming_the_node(tmp_path):
    world = SimWorld(tmp_path, peers={1: [2], 2: [1, 3], 3: [2]})
    try:
        world.start(1, 2)
        with world.host.xenstore(3) as xs3:  # the test acts as a hostile domain 3
            base = offer_path(3, 2)
            xs3.write(base, b"")
            xs3.set_perms(base, [XenStorePerm(3, "n"), XenStorePerm(2, "r")])
            for name, value in (("version", "2"), ("generation", "7"), ("ring-size", "12345"),
                                ("control-ref", "9"), ("event-channel", "3")):
                xs3.write(f"{base}/{name}", value)
            req = f"{request_dir(2)}/3"  # made by domain 2 for its peer 3
            xs3.write(req, b"offer 7")
            world.wait_for("the refusal", lambda: xs3.read(req) == b"refused 7 malformed-offer")
        assert "ring-size 12345 is not a power of two" in world.daemons[2].log()
        assert world.daemons[2].proc.poll() is None
        with world.connect(1, 2) as s:
            assert echo_roundtrip(s, b"still fine") == b"still fine"
    finally:
        world.close()


def test_hostile_peer_scribbling_on_the_ring_breaks_only_its_link(tmp_path):
    """A process acting as domain 2 maps the link's pages and writes garbage while data flows.

    Domain 1's daemon survives, ends only that link (its application sees EOF or a reset), sets
    a new one up on the next connection; its link with domain 3 never notices.
    """
    world = SimWorld(tmp_path, peers={1: [2, 3], 2: [1], 3: [1]}, echo_on=(2, 3))
    try:
        world.start(1, 2, 3)
        # A stream from 1 to 3 runs through the whole attack on the link from 1 to 2.
        bystander = world.connect(1, 3, timeout=60)
        result: dict[str, tuple[str, str]] = {}
        side = threading.Thread(target=lambda: result.update(r=stream_hashes(bystander, 256 << 20)))
        side.start()
        victim = world.connect(1, 2, timeout=20)
        victim.sendall(b"x" * 1000)
        assert victim.recv(1000)
        world.wait_for("the offer", lambda: world.xs_tree(offer_path(1, 2)))
        code = f"""
import sys, time, os, struct
from xsockd.backend_sim import SimBackend
from xsockd.rendezvous import read_offer
b = SimBackend(2, {str(world.sim_dir)!r})
xs = b.open_xenstore()
offer = read_offer(xs, 1, 2)
ctl = b.map(1, [offer.control_ref])
rings = b.map(1, offer.ring_refs)
c, r = ctl.buffer, rings.buffer
print("mapped", flush=True)
end = time.monotonic() + 3
while time.monotonic() < end:
    for off in (64, 128, 192, 256):
        c[off:off + 4] = os.urandom(4)
    o = int.from_bytes(os.urandom(4), "little") % (len(r) - 16)
    r[o & ~15:(o & ~15) + 16] = os.urandom(16)
del c, r
rings.close(); ctl.close(); xs.close(); b.close()
"""
        attacker = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                    text=True)
        assert attacker.stdout.readline().strip() == "mapped"
        victim.settimeout(10)
        try:
            while True:
                victim.sendall(b"y" * 65536)
                if not victim.recv(1 << 20):
                    break
        except (ConnectionResetError, BrokenPipeError, TimeoutError):
            pass
        attacker.wait(20)
        attacker.stdout.close()
        victim.close()
        world.wait_for("domain 1 to drop the attacked link",
                       lambda: "link with domain 2 down" in world.daemons[1].log())
        assert world.daemons[1].proc.poll() is None
        assert world.daemons[2].proc.poll() is None
        with world.connect(1, 2, timeout=20) as s:
            assert echo_roundtrip(s, b"recovered" * 100) == b"recovered" * 100
        side.join(60)
        bystander.close()
        assert result["r"][0] == result["r"][1]
        assert "link with domain 3 down" not in world.daemons[1].log()
    finally:
        world.close()


def test_unconfigured_domain_has_no_socket(world):
    world.start(1, 2)
    with pytest.raises(FileNotFoundError):
        world.connect(1, 7)  # not a configured peer: no socket exists for it


def test_destroyed_peer_domain_ends_streams_and_the_link_comes_back(world):
    world.start(1, 2)
    s = world.connect(1, 2)
    assert echo_roundtrip_partial(s, b"q" * 5000) == b"q" * 5000
    # Like xl destroy: domain 2 stops running at once (its daemon frozen, so it can say nothing)
    # and every handle of it is gone without unmap notifications; domain 1, a domU that may not
    # ask xenstored about domains, learns of it from the removal of domain 2's XenStore tree
    # (dom0 also from @releaseDomain: the Xen proof's xl destroy step).
    os.kill(world.daemons[2].proc.pid, signal.SIGSTOP)
    world.host.destroy_domain(2)
    assert_ended(s)
    world.wait_for("domain 1 to release the link", lambda: (
        world.accounting(1)["granted"] == 0 and world.accounting(1)["ports"] == 0
        and world.xs_tree(offer_path(1, 2)) == []))
    assert "the domain was destroyed" in world.daemons[1].log()
    os.kill(world.daemons[2].proc.pid, signal.SIGKILL)
    world.daemons[2].proc.wait(10)
    world.host.create_domain(2)
    world.daemons[2].stop()
    world.daemons[2].start()
    with world.connect(1, 2) as s2:
        assert echo_roundtrip(s2, b"back" * 100) == b"back" * 100


def echo_roundtrip_partial(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        got += sock.recv(65536)
    return got


def test_a_configured_peer_that_does_not_exist_is_refused_at_once_with_the_reason(tmp_path):
    world = SimWorld(tmp_path, peers={1: [2, 9], 2: [1]})  # the host has no domain 9
    try:
        world.start(1, 2)
        start = time.monotonic()
        assert_ended(world.connect(1, 9))
        assert time.monotonic() - start < 2  # not the 10 s wait for an attach
        # A domU may not ask xenstored whether a domain exists (only dom0 may, as on Xen):
        # it learns that nobody there made a request node for it.
        world.wait_for("the reason in the log",
                       lambda: "domain 9 does not exist" in world.daemons[1].log()
                       or "domain 9 has no link request node for us" in world.daemons[1].log())
        assert world.accounting(1)["granted"] == 0 and world.accounting(1)["ports"] == 0
        assert world.xs_tree("/local/domain/9") == []  # no junk made for it
    finally:
        world.close()


def test_a_second_daemon_for_the_same_domain_is_refused_and_the_first_keeps_working(world):
    world.start(1, 2)
    d1 = world.daemons[1]
    other = world.work / "run1-second"
    r = subprocess.run([sys.executable, "-m", "xsockd.daemon", "--backend", "sim", "--domid",
                        "1", "--sim-dir", str(world.sim_dir), "--rundir", str(other),
                        "--config", str(d1.config), "--no-dbus"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1, r.stderr
    # Started by hand (the test's child, not systemd's): the pid, and kill as the way to stop it.
    assert f"another xsockd already serves domain 1 (pid {d1.proc.pid}, started by hand, not by " \
        f"systemd): stop it first with `kill {d1.proc.pid}`" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (other / "2.sock").exists()
    with world.connect(1, 2) as s:
        assert echo_roundtrip(s, b"first one fine") == b"first one fine"


def fake_proc(root: Path, cgroup: str, parent: str) -> Path:
    """A /proc with process 40 (its cgroup file as given), child of process 1 (``parent``)."""
    (root / "40").mkdir(parents=True)
    (root / "1").mkdir()
    (root / "40" / "cgroup").write_text(cgroup)
    (root / "40" / "status").write_text("Name:\txsockd\nPPid:\t1\n")
    (root / "1" / "comm").write_text(parent + "\n")
    return root


@pytest.mark.parametrize("cgroup,parent,unit", [
    ("0::/system.slice/xsockd-dom2.service\n", "systemd", "xsockd-dom2.service"),
    ("12:pids:/\n1:name=systemd:/system.slice/xsockd.service\n0::/\n", "systemd",
     "xsockd.service"),
    ("0::/user.slice/user-0.slice/session-4.scope\n", "systemd", None),  # by hand, then disowned
    ("0::/system.slice/ssh.service\n", "bash", None),  # by hand from a shell in a service
    ("garbage", "systemd", None),
])
def test_the_unit_of_a_running_daemon_is_named_only_when_systemd_runs_it(tmp_path, cgroup,
                                                                       parent, unit):
    proc = str(fake_proc(tmp_path / "proc", cgroup, parent))
    assert systemd_unit(40, proc) == unit
    who, how = how_to_stop(40, proc)
    if unit:
        assert (who, how) == (f"pid 40, systemd unit {unit}", f"`systemctl stop {unit}`")
    else:
        assert who == "pid 40, started by hand, not by systemd" and how.startswith("`kill 40`")
    assert systemd_unit(41, proc) is None  # no such process (or one hidden from us)
    assert how_to_stop(41, proc) == ("pid 41", "`systemctl stop` of its unit, or `kill 41`")


def test_a_daemon_listing_its_own_domain_as_a_peer_does_not_start(world):
    conf = world.work / "self.conf"
    conf.write_text(f'[daemon]\nrundir = "{world.work}/self"\npeers = [1, 2]\n'
                    f'backend = "sim"\nsim_dir = "{world.sim_dir}"\n')
    r = subprocess.run([sys.executable, "-m", "xsockd.daemon", "--domid", "1", "--config",
                        str(conf), "--no-dbus"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    said = f"xsockd: {conf}:3: daemon.peers: lists domain 1, which is this domain itself"
    assert said in r.stderr and "Traceback" not in r.stderr, r.stderr
    # --check-config for that domain refuses it in the same words; for another it passes.
    check = subprocess.run([sys.executable, "-m", "xsockd.daemon", "--check-config", str(conf),
                            "--domid", "1"], capture_output=True, text=True, timeout=30)
    assert check.returncode == 1 and check.stderr.strip() in r.stderr.splitlines(), check.stderr
    assert check.stderr.startswith(said)
    # And so does a reload of a running daemon, which keeps its old configuration.
    world.start(1)
    d1 = world.daemons[1]
    d1.config.write_text(conf.read_text().replace(f"{world.work}/self",
                                                  str(world.rundir(1))))
    d1.signal(signal.SIGHUP)
    world.wait_for("the refused reload", lambda: "reload refused" in d1.log())
    assert "daemon.peers: lists domain 1, which is this domain itself" in d1.log()


def test_errors_for_a_missing_simulated_domain_and_a_missing_xen_name_the_fix(world):
    world.host.destroy_domain(3)
    r = subprocess.run([sys.executable, "-m", "xsockd.daemon", "--backend", "sim", "--domid",
                        "5", "--sim-dir", str(world.sim_dir), "--config",
                        str(world.daemons[1].config), "--no-dbus"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1, r.stderr
    # It lists the domains that exist now: not 3, destroyed before.
    assert f"the simulated host at {world.sim_dir} has no domain 5 (it has 0, 1, 2): check " \
        "--domid" in r.stderr, r.stderr
    if os.path.exists("/dev/xen"):
        return  # a Xen domain: the next check is about machines without Xen
    r = subprocess.run([sys.executable, "-m", "xsockd.daemon", "--backend", "xen", "--config",
                        str(world.daemons[1].config), "--no-dbus"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("xsockd: /dev/xen is missing") and "modprobe xen-evtchn" in \
        r.stderr, r.stderr
