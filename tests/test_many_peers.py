"""One daemon linked with 100 peer domains at once, within 1024 grant pages on every side.

Domain 0 runs a real xsockd with peers 1..100 (``XSOCK_MANY_PEERS`` changes the count); the
peers run in one process (``peerfarm``).  Whichever side asks first, every link works and no
domain grants more than Linux's default 1024 pages: the hub divides its budget among its
peers (16 KiB rings, 9 pages a link, for 100 peers) and says so in its log.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from peerfarm import HubWorld

from xsockd.sim.host import SimHost

PEERS = int(os.environ.get("XSOCK_MANY_PEERS", "100"))
GRANT_LIMIT = 1024


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubWorld]:
    h = HubWorld(tmp_path_factory.mktemp("many"), range(1, PEERS + 1))
    try:
        h.start()
        yield h
    finally:
        h.close()


def open_all(paths: list[Path]) -> list[socket.socket]:
    socks = []
    for p in paths:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(60)
        s.connect(str(p))
        socks.append(s)
    return socks


def echo_each(socks: list[socket.socket], tag: bytes) -> None:
    """Sends a distinct message on every stream at once, then reads every echo back."""
    for i, s in enumerate(socks):
        s.sendall(tag + b" %d\n" % i)
    for i, s in enumerate(socks):
        want = tag + b" %d\n" % i
        got = b""
        while len(got) < len(want):
            chunk = s.recv(len(want) - len(got))
            assert chunk, f"stream {i} ended before its echo"
            got += chunk
        assert got == want


def assert_within_budget(host: SimHost) -> dict[int, int]:
    granted = {d: a["granted"] for d, a in host.accounting().items()}
    over = {d: g for d, g in granted.items() if g > GRANT_LIMIT}
    assert not over, f"domains over {GRANT_LIMIT} granted pages: {over}"
    return granted


def test_hub_asks_first_links_every_peer_within_its_budget(hub: HubWorld) -> None:
    socks = open_all([hub.hub_socket(d) for d in hub.domains])
    try:
        echo_each(socks, b"hub-first")
        granted = assert_within_budget(hub.host)
        # The hub granted every link, each sized from its share: 1024 // 100 = 10 pages hold
        # a 16 KiB ring (1 + 2 * 4 pages).
        assert granted[0] == 9 * len(hub.domains) if PEERS == 100 else granted[0] > 0
        assert all(granted[d] == 0 for d in hub.domains)
        log = hub.daemon.log()
        assert f"grant budget 1024 pages for {PEERS} peers" in log, log[-3000:]
        if PEERS == 100:
            assert "10 pages each, links we initiate get 16 KiB rings" in log
        # The peers now open streams the other way, on the same links, all at once.
        back = open_all([hub.farm.socket(d) for d in hub.domains])
        try:
            echo_each(back + socks, b"both-ways")
        finally:
            for s in back:
                s.close()
        assert assert_within_budget(hub.host)[0] == granted[0]
    finally:
        for s in socks:
            s.close()


def test_peers_ask_first_costs_the_hub_no_grant(hub: HubWorld) -> None:
    hub.daemon.stop()  # its links go; the peers' next streams offer new ones
    hub.daemon.start()
    half = hub.domains[: len(hub.domains) // 2]
    socks = open_all([hub.farm.socket(d) for d in half])
    try:
        echo_each(socks, b"peer-first")
        # Then the hub to every peer: half on the peers' links, half on links it offers.
        out = open_all([hub.hub_socket(d) for d in hub.domains])
        try:
            echo_each(out + socks, b"mixed")
            granted = assert_within_budget(hub.host)
            peers_links = [d for d in half if granted[d] > 0]
            assert len(peers_links) == len(half), f"peers without a link they granted: {granted}"
            assert all(granted[d] == 129 for d in half), "a peer with one link keeps 256 KiB"
            rest = len(hub.domains) - len(half)
            assert granted[0] <= (GRANT_LIMIT // PEERS) * rest
        finally:
            for s in out:
                s.close()
    finally:
        for s in socks:
            s.close()


def test_nothing_left_after_stop(hub: HubWorld) -> None:
    hub.daemon.stop()
    hub.farm.stop()
    left = hub.host.leftovers()
    assert not left, f"left behind: {left}"


def test_sim_bounds_a_domus_grant_requests_but_not_dom0s(tmp_path: Path) -> None:
    """--max-grant-requests (what lets 101 domains fit the host's descriptors) is ENOSPC past
    N requests of a domU, whatever their pages; dom0 is bounded by the page limit only."""
    from xsockd.backend_sim import SimBackend

    with SimHost(tmp_path / "sim", domains=[0, 1, 2], max_grant_requests=3):
        for domid, fits in ((1, 3), (0, 20)):
            backend = SimBackend(domid, tmp_path / "sim")
            try:
                held = [backend.grant(2, 2) for _ in range(fits)]
                if domid != 0:
                    with pytest.raises(OSError) as e:
                        backend.grant(2, 1)
                    assert e.value.errno == errno.ENOSPC and "--max-grant-requests" in str(e.value)
                    held.pop().close()
                    held.append(backend.grant(2, 1))  # one released: room for one more
                for g in held:
                    g.close()
            finally:
                backend.close()
