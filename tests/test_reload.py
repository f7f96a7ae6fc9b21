"""What a reload (SIGHUP) says it changed, and that reloaded budgets reach links already up."""

from __future__ import annotations

import signal
import socket

from simworld import SimWorld, assert_ended, echo_roundtrip

from xsockd.admission import OpenBudget
from xsockd.confdiff import describe_changes
from xsockd.config import parse_config
from xsockd.vchans import vchan_setup

BASE = """[daemon]
peers = [1, 3]
default_service = "echo"

[link]
open_rate = 100

[services.echo]
socket = "/run/e.sock"

[remote.1]
services = ["web"]
"""


def test_no_change_is_nothing():
    assert describe_changes(parse_config(BASE), parse_config(BASE)) == []


def test_three_services_added_are_three_phrases():
    new = BASE + "".join(f'\n[services.s{i}]\nsocket = "/run/s{i}.sock"\nallow = [1]\n'
                         for i in range(3))
    assert describe_changes(parse_config(BASE), parse_config(new)) == [
        "our service s0 added (allow 1)", "our service s1 added (allow 1)",
        "our service s2 added (allow 1)"]


def test_peers_services_sockets_and_settings():
    new = (BASE.replace("peers = [1, 3]", "peers = [1, 4]")
           .replace('socket = "/run/e.sock"', 'socket = "/run/e2.sock"\nallow = [4]')
           .replace('services = ["web"]', 'services = ["db"]')
           .replace("open_rate = 100", "open_rate = 5\nring_size = \"64KiB\""))
    assert describe_changes(parse_config(BASE), parse_config(new)) == [
        "peer 4 added", "peer 3 removed",
        "our service echo changed: socket /run/e2.sock, allow 4",
        "service db of domain 1 added", "service web of domain 1 removed",
        "[link] open_rate 100 -> 5 (for every peer now)",
        "[link] ring_size 262144 -> 65536 (for new links)"]
    gone = BASE.replace('default_service = "echo"\n', "").split("[services.echo]")[0]
    assert describe_changes(parse_config(BASE), parse_config(gone)) == [
        "our service echo removed", "default_service none", "service web of domain 1 removed"]


def test_a_retuned_budget_keeps_its_connects_and_takes_the_new_limits():
    b = OpenBudget(100, 64, now=0.0)
    b.connecting = 2
    b.retune(1, 2, now=0.0)
    assert b.take(0.0) is not None and "2 connects" in b.take(0.0).why
    b.connecting = 0
    assert b.take(0.0) is None             # the one token of a 1-a-second bucket
    assert "more than 1 stream opens a second" in b.take(0.0).why
    assert b.take(1.1) is None             # refilled at the new rate


def test_sighup_logs_what_changed_and_new_open_rate_reaches_an_up_link(tmp_path):
    world = SimWorld(tmp_path, peers={1: [2], 2: [1]})
    try:
        world.start(1, 2)
        with world.connect(1, 2) as s:    # the link is up, with domain 2's budget for it
            assert echo_roundtrip(s, b"before") == b"before"
        conf = world.daemons[2].config
        text = conf.read_text().replace('[link]\n', '[link]\nopen_rate = 1\n')
        text += "".join(f'\n[services.s{i}]\nsocket = "{tmp_path}/s{i}.sock"\n'
                        for i in range(3))
        conf.write_text(text)
        world.daemons[2].signal(signal.SIGHUP)
        log2 = world.daemons[2].log
        world.wait_for("the reload's line", lambda: "configuration reloaded" in log2())
        line = next(ln for ln in log2().splitlines() if "configuration reloaded" in ln)
        for phrase in ("our service s0 added (allow 1)", "our service s1 added",
                       "our service s2 added", "[link] open_rate 20000 -> 1 (for every peer "
                       "now)"):
            assert phrase in line, line
        # The link made before the reload now takes one open a second: of three opens at
        # once, at least two are refused "too many", and domain 2 says so.
        socks = [world.connect(1, 2) for _ in range(3)]
        for sock in socks:
            try:
                sock.sendall(b"x")
                sock.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused before the write: the stream has ended already
        got = []
        for sock in socks:
            sock.settimeout(10)
            try:
                got.append(sock.recv(10))
            except ConnectionResetError:
                got.append(b"")
            assert_ended(sock)
        assert got.count(b"") >= 2, got
        world.wait_for("the refusals", lambda: log2().count("more than 1 stream opens a "
                                                            "second") >= 2)
    finally:
        world.close()


# ---- [vchan.NAME] tables ---------------------------------------------------------------------

def vchan_table(name: str, role: str, domain: int, path: str, ring: str = "") -> str:
    extra = 'service = "echo"\n' if role == "server" else ""
    return (f'\n[vchan.{name}]\nrole = "{role}"\ndomain = {domain}\npath = "{path}"\n'
            f"{extra}{ring}")


def vchan_stream(world: SimWorld, name: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(world.rundir(1) / "2" / f"{name}.sock"))
    s.settimeout(10)
    return s


def echoes(s: socket.socket, data: bytes) -> bool:
    """Sends data and reads it back (no shutdown: a vchan has no half-close)."""
    s.sendall(data)
    got = b""
    while len(got) < len(data) and (chunk := s.recv(65536)):
        got += chunk
    return got == data


def test_sighup_applies_vchan_tables_and_keeps_unchanged_ones_streams(tmp_path):
    base = "/local/domain/2/data/vchan/1"
    servers = {n: vchan_table(n, "server", 1, f"data/vchan/1/{n}",
                              'ring_size = ["16KiB", "16KiB"]\n')
               for n in ("keep", "gone", "moved")}
    clients = {n: vchan_table(n, "client", 2, f"{base}/{n}") for n in ("keep", "gone", "moved")}
    world = SimWorld(tmp_path, extra={1: "".join(clients.values()),
                                      2: "".join(servers.values())})
    try:
        world.start(1, 2)

        def published(name: str) -> bool:
            return len(world.xs_tree(f"{base}/{name}")) == 3

        world.wait_for("domain 2's vchans published", lambda: all(map(published, servers)))
        kept, ended = vchan_stream(world, "keep"), vchan_stream(world, "gone")
        assert echoes(kept, b"before" * 1000) and echoes(ended, b"doomed")
        grants_before = world.accounting(2)["granted"]
        # Domain 2: gone removed, moved's rings changed, added is new; keep as it was.
        conf = world.daemons[2].config
        conf.write_text(conf.read_text().replace(servers["gone"], "").replace(
            servers["moved"], servers["moved"].replace('"16KiB", "16KiB"', '"64KiB", "16KiB"'))
            + vchan_table("added", "server", 1, "data/vchan/1/added"))
        world.daemons[2].signal(signal.SIGHUP)
        log2 = world.daemons[2].log
        world.wait_for("the reload's line", lambda: "configuration reloaded" in log2())
        line = next(ln for ln in log2().splitlines() if "configuration reloaded" in ln)
        for phrase in ("vchan added added", "vchan gone removed", "vchan moved changed, "
                       "restarted"):
            assert phrase in line, line
        assert "vchan keep" not in line and "tables kept" not in line, line
        # The removed one's stream ended cleanly and its nodes are gone; the others published.
        assert ended.recv(100) == b""
        ended.close()
        world.wait_for("added published, gone's nodes removed", lambda: (
            published("added") and published("moved") and world.xs_tree(f"{base}/gone") == []))
        # The unchanged one's stream goes on, on the same vchan.
        assert echoes(kept, b"after" * 1000)
        assert log2().count("vchan keep: domain 1 connected") == 1
        # Grants: gone's page and rings (1 + 4 + 4) went, moved's grew by 12 pages (64 KiB
        # instead of 16), added's default rings (64 KiB each way) came: 1 + 16 + 16.
        world.wait_for("the grants to settle", lambda: world.accounting(2)["granted"] ==
                       grants_before - 9 + 12 + 33)
        # Domain 1: its client of "gone" removed: its socket goes; the kept stream survives.
        conf1 = world.daemons[1].config
        conf1.write_text(conf1.read_text().replace(clients["gone"], ""))
        world.daemons[1].signal(signal.SIGHUP)
        sock = world.rundir(1) / "2" / "gone.sock"
        world.wait_for("domain 1's gone.sock removed", lambda: not sock.exists())
        assert echoes(kept, b"still")
        kept.close()
    finally:
        world.close()
    assert "Traceback" not in world.logs()


def test_a_vchan_server_restarts_when_its_service_changes_not_when_others_do():
    base = BASE + vchan_table("v", "server", 1, "data/vchan/1/v")
    setup = vchan_setup
    old = parse_config(base)
    assert setup(old, "v") == setup(parse_config(base.replace("open_rate = 100",
                                                               "open_rate = 5")), "v")
    assert setup(old, "v") != setup(parse_config(base.replace("/run/e.sock", "/run/f.sock")), "v")
    assert setup(old, "v") != setup(parse_config(base.replace(
        'socket = "/run/e.sock"', 'socket = "/run/e.sock"\ncaller_header = true')), "v")
    assert setup(old, "v") != setup(parse_config(base + "linger = 1\n"), "v")
    assert setup(old, "gone") is None


def test_a_vchan_clients_socket_passed_to_a_peers_service_by_a_reload_stays(tmp_path):
    # <rundir>/2/x.sock is a vchan client's, then (one reload) domain 2's named service x's:
    # stopping the vchan must not remove the socket the service's listener is bound at now.
    vchan = vchan_table("x", "client", 2, "/local/domain/2/data/vchan/1/x")
    world = SimWorld(tmp_path, extra={1: vchan})
    try:
        world.start(1)
        sock = world.rundir(1) / "2" / "x.sock"
        assert sock.exists()
        conf = world.daemons[1].config
        conf.write_text(conf.read_text().replace(vchan, '\n[remote.2]\nservices = ["x"]\n'))
        world.daemons[1].signal(signal.SIGHUP)
        log1 = world.daemons[1].log
        world.wait_for("the reload's line", lambda: "configuration reloaded" in log1())
        line = next(ln for ln in log1().splitlines() if "configuration reloaded" in ln)
        assert "vchan x removed" in line and "service x of domain 2 added" in line, line
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(sock))  # the service's listener, at its path
    finally:
        world.close()
