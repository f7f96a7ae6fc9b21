"""The operation of a vchan server in process, on the sim host with a loop whose clock the
test moves (tests/fakeloop.py): how a failing publication is retried and logged."""

from __future__ import annotations

import errno
import logging
import select
import socket
import struct
import time

import pytest

from tests.fakeloop import FakeLoop
from tests.vchanpair import CLI_LIVE, GRANTS
from xsockd.backend import UnmapNotify, XenStorePerm
from xsockd.backend_sim import SimBackend
from xsockd.config import VchanConfig, parse_config
from xsockd.errors import XenStoreError
from xsockd.manager import Manager
from xsockd.peerlog import PeerLog
from xsockd.sim.host import SimHost
from xsockd.vchan_client import VchanClient, read_published
from xsockd.vchan_server import PUBLISH_REMIND, PUBLISH_RETRY_MAX, VchanServer, _Published

PATH = "/local/domain/2/data/vchan/1/echo1"
CFG = VchanConfig("echo1", "server", 1, "data/vchan/1/echo1", "echo", 16, 14)
RINGS = 16 + 4  # pages of orders 16 and 14; plus the shared page


@pytest.fixture
def host(tmp_path):
    with SimHost(tmp_path / "sim", domains=[0, 1, 2]) as h:
        yield h


def test_a_failing_publication_backs_off_and_warns_once(host, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="xsockd.vchan")
    loop = FakeLoop()
    with SimBackend(2, host.dir) as backend, SimBackend(2, host.dir) as hog:
        # Another holder of domain 2's grants leaves room for the shared page, not the rings.
        held = hog.grant(1, host.grant_limit - RINGS)
        server = VchanServer(CFG, str(tmp_path / "echo.sock"), backend, loop)
        try:
            server.start()
            minutes = 30
            for _ in range(minutes * 60):
                loop.advance(1.0)
            failures = [r for r in caplog.records if "cannot publish" in r.getMessage()]
            warned = [r for r in failures if r.levelno == logging.WARNING]
            # Every 5 s before: 360 warnings in half an hour.  Now the first failure, then a
            # reminder every PUBLISH_REMIND seconds; tries every PUBLISH_RETRY_MAX at most.
            # (a reminder comes with the first try PUBLISH_REMIND after the last warning)
            reminders = int(minutes * 60 // PUBLISH_REMIND)
            assert reminders - 1 <= len(warned) - 1 <= reminders, \
                [r.getMessage() for r in warned]
            assert "would grant" in warned[0].getMessage()
            assert "still cannot publish" in warned[-1].getMessage()
            assert len(failures) <= minutes * 60 / PUBLISH_RETRY_MAX + 8, len(failures)
            assert server.state == "idle"
            acct = host.accounting()[2]
            assert acct["granted"] == host.grant_limit - RINGS and acct["ports"] == 0, acct
            # The cause gone, the next try (within PUBLISH_RETRY_MAX) publishes.
            held.close()
            caplog.clear()
            loop.advance(PUBLISH_RETRY_MAX)
            assert server.state == "published"
            (ok,) = [r.getMessage() for r in caplog.records if "published" in r.getMessage()]
            assert ok.endswith(f"after {len(failures)} failed tries"), ok
            with host.xenstore(0) as xs:
                assert sorted(xs.directory(PATH)) == ["event-channel", "ring-ref"]
        finally:
            server.close()
    assert host.leftovers() == {}


def test_each_distinct_publication_error_is_warned_once(host, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="xsockd.vchan")
    loop = FakeLoop()
    parent = PATH.rsplit("/", 1)[0]
    with SimBackend(2, host.dir) as backend, SimBackend(2, host.dir) as hog:
        held = hog.grant(1, host.grant_limit - RINGS)
        server = VchanServer(CFG, str(tmp_path / "echo.sock"), backend, loop)
        try:
            server.start()
            loop.advance(120)
            # Grants back, but dom0 made our path's parent one we may not write: another error.
            with host.xenstore(0) as xs:
                xs.write(parent, "")
                xs.set_perms(parent, [XenStorePerm(0, "n")])
            held.close()
            for _ in range(240):
                loop.advance(1.0)
            warned = [r.getMessage() for r in caplog.records
                      if r.levelno == logging.WARNING and "cannot publish" in r.getMessage()]
            assert len(warned) == 2, warned
            assert "would grant" in warned[0] and "EACCES" in warned[1], warned
            with host.xenstore(0) as xs:
                xs.rm(parent)
            loop.advance(PUBLISH_RETRY_MAX)
            assert server.state == "published"
        finally:
            server.close()
    assert host.leftovers() == {}


def test_the_poll_of_a_published_vchan_never_clears_a_quiet_event_channel(host, tmp_path):
    # On Xen, clearing is libxenevtchn's xenevtchn_pending: a read() of a blocking
    # /dev/xen/evtchn handle, which waits until the peer signals.  Cleared with nothing
    # pending, the daemon's loop would hang there until the client came (or forever).
    loop = FakeLoop()
    quiet_clears = []
    with SimBackend(2, host.dir) as backend:
        server = VchanServer(CFG, str(tmp_path / "echo.sock"), backend, loop)
        try:
            server.start()
            assert server.state == "published" and server.vchan is not None
            evtchn = server.vchan.evtchn
            real = evtchn.clear

            def clear() -> None:
                if not select.select([evtchn.fd], [], [], 0)[0]:
                    quiet_clears.append(loop.time())
                real()
            evtchn.clear = clear  # type: ignore[method-assign]
            for _ in range(5):  # the once-a-second look at the page, nobody signalling
                loop.advance(1.0)
            assert server.state == "published"
        finally:
            server.close()
    assert quiet_clears == []
    assert host.leftovers() == {}


# ---- the client (xsockd as vchan client of domain 2, in domain 1) -----------------------------

CLIENT_CFG = VchanConfig("qmp", "client", 2, PATH)


@pytest.fixture
def client(host, tmp_path):
    """A started VchanClient in domain 1 for domain 2's PATH, and its listener's path."""
    loop = FakeLoop()
    listen_path = str(tmp_path / "qmp.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    listener.bind(listen_path)
    listener.listen(8)
    with SimBackend(1, host.dir) as backend:
        c = VchanClient(CLIENT_CFG, listener, backend, loop, PeerLog(
            logging.getLogger("xsockd.vchan"), loop.time))
        c.start()
        try:
            yield c, loop, listen_path
        finally:
            c.close()


def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.settimeout(10)
    return s


def advertise(xs2, v: _Published) -> None:
    """Domain 2 writes its published vchan's nodes at PATH, readable by domain 1, as a
    libxenvchan server does."""
    assert v.evtchn is not None
    for name, value in (("ring-ref", v.ring_ref), ("event-channel", v.evtchn.port)):
        xs2.write(f"{PATH}/{name}", str(value).encode())
        xs2.set_perms(f"{PATH}/{name}", [XenStorePerm(2, "n"), XenStorePerm(1, "r")])


def test_a_watch_storm_costs_the_waiting_client_one_read_per_batch(host, client):
    c, loop, listen_path = client
    reads = []
    real = c.xs.transaction_start
    c.xs.transaction_start = lambda: reads.append(1) or real()  # type: ignore[method-assign]
    with host.xenstore(2) as xs2:
        # Domain 2's own tree, readable by domain 1 (so its writes fire domain 1's watch).
        xs2.write(PATH, b"")
        xs2.set_perms(PATH, [XenStorePerm(2, "n"), XenStorePerm(1, "r")])
        app = connect(listen_path)
        loop.run_until(lambda: c.state == "waiting" and reads, what="the first try")
        reads.clear()
        storm = 300
        for i in range(storm):  # not a publication: a node the client does not look for
            xs2.write(f"{PATH}/junk", str(i).encode())
        time.sleep(0.2)  # every event queued on domain 1's connection
        while loop.run_once(0.05):
            pass
        xs2.rm(PATH)
    # A transaction (4 round trips) per event would let domain 2 make us spend 4 requests
    # and a pass of the loop for each of its writes; what it wrote is read once per batch.
    assert c.state == "waiting"
    assert 1 <= len(reads) <= storm // 10, len(reads)
    app.close()


def test_a_server_ending_every_stream_costs_the_client_its_log_budget_only(host, client,
                                                                            caplog):
    caplog.set_level(logging.INFO, logger="xsockd.vchan")
    c, loop, listen_path = client
    cycles = 15
    with SimBackend(2, host.dir) as b2, host.xenstore(2) as xs2:
        for _ in range(cycles):
            # A server (domain 2, no xsockd) that ends each stream as soon as it begins.
            v = _Published(b2, 1, 16, 14)
            try:
                assert v.evtchn is not None
                advertise(xs2, v)
                app = connect(listen_path)
                loop.run_until(lambda: c.state == "connected", what="the client connected")
            finally:
                v.close()  # srv_live 0, everything released
            assert app.recv(10) == b""
            app.close()
            loop.run_until(lambda: c.state == "idle", what="the stream's end")
        xs2.rm(PATH)
    lines = [r.getMessage() for r in caplog.records if "domain 2" in r.getMessage()]
    # Two lines a stream (connected, ended) would be 30: the peer's budget is 10 in 10 s.
    assert c.streams == cycles
    assert len(lines) <= 10, lines
    assert host.accounting()[1].get("mapped", 0) == 0


def test_ring_grants_that_do_not_map_release_the_page_and_port_taken(host, client, caplog):
    # The server's page is fine but its grant list names pages it never granted: the client
    # fails at its deepest point of set-up (port bound, shared page mapped, probed).
    c, loop, listen_path = client
    with SimBackend(2, host.dir) as b2, host.xenstore(2) as xs2:
        v = _Published(b2, 1, 16, 14)
        try:
            assert v.evtchn is not None and v.shared is not None
            for i in range(16 + 4):
                struct.pack_into("<I", v.shared.buffer, GRANTS + 4 * i, 0xFFFFFF00 + i)
            advertise(xs2, v)
            app = connect(listen_path)
            loop.run_until(lambda: c.state == "idle" and c.streams == 0 and any(
                "opening domain 2's vchan" in r.getMessage() for r in caplog.records),
                what="the failed open")
            assert app.recv(10) == b""  # the application sees EOF
            app.close()
            acct = host.accounting()[1]
            assert not acct.get("mapped") and not acct.get("ports"), acct
            # Never attached; our unmap notification ran all the same: the server (whose
            # page was wrong) sees a client come and go.
            assert v.shared.buffer[CLI_LIVE] == 0
        finally:
            v.close()
        xs2.rm(PATH)


def test_a_page_another_client_holds_is_refused_without_touching_it(host, client, caplog):
    # A libxenvchan server keeps its nodes while it serves: a second client finds them.
    # Refusing it (EBUSY) must not cost the first client its stream, as unmapping a page
    # mapped with our unmap notification would (it clears cli_live: the server sees its
    # client gone).
    c, loop, listen_path = client
    with SimBackend(2, host.dir) as b2, host.xenstore(2) as xs2:
        v = _Published(b2, 1, 16, 14)
        try:
            assert v.evtchn is not None and v.shared is not None
            v.shared.buffer[CLI_LIVE] = 1  # another client of domain 1 is connected
            advertise(xs2, v)
            app = connect(listen_path)
            loop.run_until(lambda: c.state == "idle" and any(
                "opening domain 2's vchan" in r.getMessage() for r in caplog.records),
                what="the refusal")
            assert app.recv(10) == b""
            app.close()
            assert any("busy" in r.getMessage() for r in caplog.records), \
                [r.getMessage() for r in caplog.records]
            assert v.shared.buffer[CLI_LIVE] == 1  # the other client's stream goes on
            acct = host.accounting()[1]
            assert not acct.get("mapped") and not acct.get("ports"), acct
        finally:
            v.close()
        xs2.rm(PATH)


def test_a_client_gone_during_set_up_costs_the_server_that_vchan_only(host, tmp_path, caplog):
    # Domain 1 maps the page with its unmap notification, as a libxenvchan client does first,
    # and dies before it marks itself connected: the notification clears cli_live (2 -> 0).
    caplog.set_level(logging.INFO, logger="xsockd.vchan")
    loop = FakeLoop()
    with SimBackend(2, host.dir) as backend, SimBackend(1, host.dir) as b1:
        server = VchanServer(CFG, str(tmp_path / "echo.sock"), backend, loop)
        try:
            server.start()
            with b1.open_xenstore() as xs1:
                pub = read_published(xs1, PATH, 2)
                evtchn = b1.bind_interdomain(2, pub.port)
                page = b1.map(2, [pub.ring_ref], UnmapNotify(CLI_LIVE, evtchn.port))
                page.close()
                evtchn.close()
                loop.run_until(lambda: server.state == "published" and read_published(
                    xs1, PATH, 2) != pub, what="a fresh vchan")
            assert any("left before it was served" in r.getMessage() for r in caplog.records)
            assert server.streams == 0
            acct = host.accounting()[2]
            assert acct["granted"] == 1 + RINGS and acct["ports"] == 1, acct  # the old freed
        finally:
            server.close()
    assert host.leftovers() == {}


class _NoSecondXenStore(SimBackend):
    """Domain 1 whose XenStore connections after the first (the manager's) are refused: as
    when the daemon is out of descriptors."""

    opened = 0

    def open_xenstore(self):  # type: ignore[no-untyped-def]
        self.opened += 1
        if self.opened > 1:
            raise XenStoreError(errno.EMFILE, "no descriptor for a XenStore connection")
        return super().open_xenstore()


def test_a_client_that_cannot_start_leaves_no_socket_behind(host, tmp_path, caplog):
    rundir = tmp_path / "run1"
    text = (f'[daemon]\nrundir = "{rundir}"\npeers = [2]\nsim_dir = "{host.dir}"\n'
            f'backend = "sim"\n[vchan.qmp]\nrole = "client"\ndomain = 2\npath = "{PATH}"\n')
    loop = FakeLoop()
    with _NoSecondXenStore(1, host.dir) as backend:
        m = Manager(parse_config(text), backend, loop)
        m.start()
        try:
            assert any("vchan qmp: cannot start" in r.getMessage() for r in caplog.records)
            assert m.list_vchans() == []
            # Bound before the failure: an application would connect to a socket nobody
            # serves (ECONNREFUSED), and the file would outlive the daemon.
            assert not (rundir / "2" / "qmp.sock").exists()
        finally:
            m.stop()
    assert not (rundir / "2" / "qmp.sock").exists()
