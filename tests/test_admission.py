"""Admission decisions, log limits and canonical rendezvous values: pure functions, no I/O."""

from __future__ import annotations

import logging

import pytest

from xsockd.admission import (
    OpenBudget,
    Refusal,
    admit_link,
    admit_stream,
    grant_budget,
    grant_plan,
)
from xsockd.config import parse_config
from xsockd.errors import ProtocolError
from xsockd.peerlog import PeerLog, escape
from xsockd.rendezvous import canonical_int, parse_offer, parse_request
from xsockd.ring import Reason

CONF = parse_config('[daemon]\npeers = [1, 2]\ndefault_service = "echo"\n'
                    '[services.echo]\nsocket = "/run/echo.sock"\n'
                    '[services.web]\nsocket = "/run/web.sock"\nallow = [2]\n')


def test_open_budget_refuses_past_its_rate_and_refills_with_time():
    b = OpenBudget(rate=100, max_connecting=1000, now=0.0)
    assert all(b.take(0.0) is None for _ in range(100))
    refusal = b.take(0.0)
    assert refusal is not None and refusal.reason == Reason.TOO_MANY
    assert "100 stream opens a second" in refusal.why
    assert b.take(0.5) is None  # half a second later: 50 more
    assert sum(b.take(0.5) is None for _ in range(100)) == 49


def test_open_budget_refuses_past_its_connects_in_progress():
    b = OpenBudget(rate=1000, max_connecting=2, now=0.0)
    assert b.take(0.0) is None
    b.connecting = 2
    refusal = b.take(0.0)
    assert refusal is not None and "2 connects to local services" in refusal.why
    b.connecting = 1
    assert b.take(0.0) is None


def test_stream_and_link_admission():
    assert admit_stream(CONF, 1, "", False).name == "echo"
    assert admit_stream(CONF, 2, "web", False).name == "web"
    for peer, name, stopping, why in [(1, "web", False, "allow list"),
                                      (1, "nope", False, "no service 'nope'"),
                                      (3, "", False, "no longer in [daemon] peers"),
                                      (1, "", True, "stopping")]:
        verdict = admit_stream(CONF, peer, name, stopping)
        assert isinstance(verdict, Refusal) and why in verdict.why
        assert verdict.reason == Reason.REFUSED
    assert admit_link(CONF, 5, 1, False) is None
    assert admit_link(CONF, 5, 3, False) is not None
    assert admit_link(CONF, 1, 1, False) is not None  # ourselves
    assert "stopping" in admit_link(CONF, 5, 1, True).why
    assert grant_budget(CONF, 0) is None
    assert "grant budget exhausted: 900 of 1024" in grant_budget(CONF, 900)


def peers_conf(n: int, link: str = "") -> object:
    return parse_config(f"[daemon]\npeers = {list(range(1, n + 1))}\n[link]\n{link}")


@pytest.mark.parametrize("peers, ring_kib, pages", [
    (1, 256, 129), (7, 256, 129), (8, 128, 65), (16, 64, 33), (12, 128, 65), (100, 16, 9),
    (200, 8, 5), (341, 4, 3)])
def test_grant_plan_sizes_rings_so_that_a_link_to_every_peer_fits(peers, ring_kib, pages):
    plan = grant_plan(peers_conf(peers))
    assert (plan.ring_size, plan.link_pages) == (ring_kib * 1024, pages)
    assert plan.link_pages * peers <= 1024  # every configured peer's link fits at once
    assert plan.shrunk == (ring_kib != 256)
    assert f"for {peers} peer" in plan.describe()
    for k in range(peers):  # whichever order they come in, each one fits
        assert grant_budget(peers_conf(peers), k * pages) is None


def test_grant_plan_never_exceeds_the_configured_ring_and_says_what_to_change():
    plan = grant_plan(peers_conf(2, 'ring_size = "16KiB"'))
    assert plan.ring_size == 16384 and not plan.shrunk
    # 400 peers leave 2 pages each: not even a 4 KiB ring; the 342nd link says why.
    why = grant_budget(peers_conf(400), 341 * 3)
    assert why is not None and "400 peers leave 2 pages each" in why
    assert "list fewer [daemon] peers" in why


def test_vchan_servers_pages_come_off_the_top_of_the_grant_budget():
    conf = parse_config("[daemon]\npeers = [1, 2]\n[services.e]\nsocket = \"/s\"\n"
                        "[vchan.v]\nrole = \"server\"\ndomain = 9\nservice = \"e\"\n"
                        "ring_size = [\"256KiB\", \"256KiB\"]\n")
    plan = grant_plan(conf)
    # 1 + 64 + 64 pages for the vchan; (1024 - 129) // 2 = 447 a peer: 256 KiB links fit.
    assert (plan.vchan_pages, plan.grant_pages, plan.share) == (129, 895, 447)
    assert "grant budget 895 pages (129 more for vchan servers) for 2 peers" in plan.describe()
    assert grant_budget(conf, 895 - 129) is None
    assert grant_budget(conf, 895 - 128) is not None


def test_escape_keeps_peer_text_on_one_line_and_bounded():
    assert escape("refused\nxsockd[1] ERROR forged") == "refused\\nxsockd[1] ERROR forged"
    assert escape("a\rb\x1b[2Kc\x0bd\u2028e\x85") == "a\\rb\\x1b[2Kc\\x0bd\\u2028e\\x85"
    assert escape(b"\xff\xfe ok") == "\\\\xff\\\\xfe ok"
    assert escape("x" * 500).endswith("...") and len(escape("x" * 500)) == 123


def test_peer_log_rate_limits_each_peer_and_says_how_many_were_left_out(caplog):
    now = [0.0]
    plog = PeerLog(logging.getLogger("xsockd.test"), lambda: now[0], burst=3, interval=10)
    with caplog.at_level(logging.INFO, logger="xsockd.test"):
        for i in range(50):
            plog.warning(7, "bad thing %d", i)
        plog.warning(8, "another peer is not silenced")
        now[0] = 11.0
        plog.warning(7, "later")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["bad thing 0", "bad thing 1", "bad thing 2",
                     "another peer is not silenced",
                     "domain 7: 47 more messages like the above were left out in 10 s", "later"]
    assert caplog.records[0].XSOCK_PEER == 7


@pytest.mark.parametrize(("text", "value"), [("0", 0), ("7", 7), ("18446744073709551615",
                                                                   2**64 - 1)])
def test_canonical_integers(text, value):
    assert canonical_int(text, 0, 2**64) == value


@pytest.mark.parametrize("text", ["00", "07", "+7", "-7", " 7", "7 ", "", "\u0667", "1e3",
                                  "1" * 21])
def test_non_canonical_integers_are_refused(text):
    assert canonical_int(text, 0, 2**70) is None


def test_request_values():
    assert parse_request(b"offer 12") == 12
    for junk in (b"offer 012", b"offer  12", b"offer 12 ", b"offer", b"", b"accepted 12",
                 b"offer 0", b"\xff offer 1"):
        assert parse_request(junk) is None


def offer_nodes(**changes: bytes) -> dict[str, bytes]:
    nodes = {"version": b"2", "generation": b"7", "ring-size": b"4096", "control-ref": b"9",
             "event-channel": b"3", "ring-refs/0": b"10 11"}
    nodes.update(changes)
    return {k: v for k, v in nodes.items() if v is not None}


def test_a_well_formed_offer_parses():
    offer = parse_offer(offer_nodes())
    assert (offer.generation, offer.ring_size, offer.ring_refs, offer.port) == (7, 4096,
                                                                                 (10, 11), 3)


@pytest.mark.parametrize(("changes", "why"), [
    ({"ring-refs/0": None, "ring-refs/00": b"10 11"}, "offer/ring-refs has chunks [00]"),
    ({"ring-refs/1": b"12"}, "want 0..0"),
    ({"ring-refs/0": b"10 011"}, "offer/ring-refs/0 is '011'"),
    ({"ring-refs/0": b"10"}, "needs 2"),
    ({"generation": b"07"}, "offer/generation is '07'"),
    ({"ring-size": b"12288"}, "not a power of two"),
    ({"ring-size": b"8388608"}, "offer/ring-size"),
    ({"version": b"1"}, "protocol version 1, we speak 2"),
    ({"event-channel": None}, "offer/event-channel is missing"),
])
def test_a_malformed_offer_is_a_protocol_error_naming_the_node(changes, why):
    with pytest.raises(ProtocolError, match=None) as e:
        parse_offer(offer_nodes(**changes))
    assert why in str(e.value)
