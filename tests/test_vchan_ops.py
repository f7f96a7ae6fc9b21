"""The operation of a vchan server in process, on the sim host with a loop whose clock the
test moves (tests/fakeloop.py): how a failing publication is retried and logged."""

from __future__ import annotations

import logging

import pytest

from tests.fakeloop import FakeLoop
from xsockd.backend import XenStorePerm
from xsockd.backend_sim import SimBackend
from xsockd.config import VchanConfig
from xsockd.sim.host import SimHost
from xsockd.vchan_server import PUBLISH_REMIND, PUBLISH_RETRY_MAX, VchanServer

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
