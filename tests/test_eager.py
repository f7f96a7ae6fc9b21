"""Eager links: ``[remote.N] eager = true`` sets the link with N up at start and keeps it up.

The hub (domain 0) has peers 1 (eager) and 2 (not); they run in ``peerfarm``.  The link with
1 is up before any stream, and its first stream opens about as fast as later ones, unlike
2's, which waits for the link set-up.  When peer 1 restarts (stopped cleanly, or killed), the
hub sets the link up again by itself.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from pathlib import Path

import pytest
from peerfarm import HubWorld, echo_time

from xsockd.config import parse_config
from xsockd.errors import ConfigError

UP = "link with domain 1 up"


@pytest.fixture
def world(tmp_path: Path) -> Iterator[HubWorld]:
    w = HubWorld(tmp_path, [1, 2], hub_extra="[remote.1]\neager = true\n")
    try:
        yield w.start()
    finally:
        w.close()


def wait_log(w: HubWorld, text: str, times: int, timeout: float = 15.0) -> None:
    import time
    deadline = time.monotonic() + timeout
    while w.daemon.log().count(text) < times:
        assert time.monotonic() < deadline, \
            f"{text!r} not {times} times in the hub's log:\n{w.daemon.log()[-3000:]}"
        time.sleep(0.05)


def test_eager_link_is_up_before_any_stream_and_comes_back(world: HubWorld) -> None:
    w = world
    wait_log(w, UP, 1)
    acct = w.host.accounting()
    assert acct[0]["granted"] > 0 and acct[1]["mapped"] == acct[0]["granted"], acct
    assert acct[2]["mapped"] == 0 and acct[2]["granted"] == 0, "a link with a lazy peer"
    assert "link with domain 2 up" not in w.daemon.log()

    eager_first = echo_time(w.hub_socket(1))
    lazy_first = echo_time(w.hub_socket(2))
    later = statistics.median(echo_time(w.hub_socket(1)) for _ in range(20))
    print(f"\nfirst open: eager {eager_first * 1e3:.2f} ms, lazy {lazy_first * 1e3:.2f} ms; "
          f"later opens {later * 1e3:.2f} ms")
    assert eager_first < lazy_first, "the eager peer's first stream waited like a lazy one's"

    # Peer 1 restarts cleanly, then is killed and started again: each time, the hub sets
    # the link up again without any stream asking.
    w.farm.stop()
    w.farm.start()
    wait_log(w, UP, 2)
    w.farm.kill()
    w.farm.start()
    wait_log(w, UP, 3)
    assert echo_time(w.hub_socket(1)) < 1.0
    assert w.daemon.log().count("link with domain 2 up") == 1  # the lazy one only on demand


def test_eager_is_a_boolean_of_a_configured_peer() -> None:
    base = '[daemon]\npeers = [1, 2]\n'
    cfg = parse_config(base + "[remote.1]\neager = true\n[remote.2]\nservices = []\n")
    assert cfg.eager_peers() == {1}
    with pytest.raises(ConfigError, match="eager"):
        parse_config(base + '[remote.1]\neager = "yes"\n')
    with pytest.raises(ConfigError, match="not in \\[daemon\\] peers"):
        parse_config(base + "[remote.3]\neager = true\n")
