"""Named services: [remote.N] sockets, the caller header, services slow to start or
socket-activated, and reload."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from ringpair import RingPair
from simworld import SimWorld, echo_roundtrip

from xsockd.config import load_config, parse_config
from xsockd.errors import ConfigError
from xsockd.ring import EventType, Reason

# ---- configuration ------------------------------------------------------------------------

REMOTE = """[daemon]
peers = [2, 3]

[remote.2]
# Named services of domain 2 that applications here may reach: <rundir>/2/<name>.sock each.
services = ["echo", "web"]
"""


def test_remote_table_lists_the_sockets_to_create():
    cfg = parse_config(REMOTE)
    assert cfg.remotes[2].services == ("echo", "web")
    assert cfg.local_sockets() == [(2, ""), (2, "echo"), (2, "web"), (3, "")]
    assert parse_config("[daemon]\npeers = [2]\n").remotes == {}


@pytest.mark.parametrize("text,where,words", [
    ("[daemon]\npeers = [2]\n\n[remote.3]\nservices = [\"a\"]\n", "test.conf:4: remote.3",
     "not in [daemon] peers"),
    ("[daemon]\npeers = [2]\n[remote.2]\nservices = [\"a\", \"a\"]\n",
     "test.conf:4: remote.2.services", "twice"),
    ("[daemon]\npeers = [2]\n[remote.2]\nservices = [\"a b\"]\n",
     "test.conf:4: remote.2.services", "not a service name"),
    ("[daemon]\npeers = [2]\n[remote.2]\nservices = [\"-a\"]\n", "remote.2.services",
     "not a service name"),
    ("[daemon]\npeers = [2]\n[remote.2]\nservices = \"web\"\n", "remote.2.services",
     "list of service names"),
    ("[daemon]\npeers = [2]\n[remote.2]\nservices = [2]\n", "remote.2.services",
     "list of service names"),
    ("[daemon]\npeers = [2]\n[remote.2]\nservice = [\"a\"]\n", "test.conf:4: remote.2.service",
     "unknown key"),
    ("[daemon]\npeers = [2]\n[remote.two]\nservices = [\"a\"]\n", "remote.two",
     "domain id"),
    ("[daemon]\npeers = [2]\nrundir = \"/" + "r" * 90 + "\"\n[remote.2]\nservices = [\""
     + "s" * 20 + "\"]\n", "remote.2.services", "longer than a Unix socket path"),
    ("[daemon]\npeers = [2]\nstop_timeout = -1\n", "test.conf:3: daemon.stop_timeout",
     "seconds"),
    ("[daemon]\nstop_timeout = \"10s\"\n", "daemon.stop_timeout", "seconds"),
])
def test_remote_and_stop_timeout_errors_name_file_table_key_and_line(text, where, words):
    with pytest.raises(ConfigError) as e:
        parse_config(text, "test.conf")
    assert where in str(e.value) and words in str(e.value), str(e.value)


def test_shipped_file_has_the_remote_table_and_stop_timeout():
    cfg = load_config(str(Path(__file__).parent.parent / "conf" / "xsockd.conf"))
    assert cfg.remotes[2].services == ("echo", "web")
    assert cfg.daemon.stop_timeout == 10.0


def test_stop_timeout_default_and_value():
    assert parse_config("").daemon.stop_timeout == 10.0
    assert parse_config("[daemon]\nstop_timeout = 0.5\n").daemon.stop_timeout == 0.5


# ---- services on the accepting side --------------------------------------------------------

class Recorder:
    """A service that echoes everything back (a caller header included) and keeps it."""

    def __init__(self, path) -> None:
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(str(path))
        self.srv.listen(16)
        self.received: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            got = bytearray()
            with conn:
                while chunk := conn.recv(65536):
                    got += chunk
                    conn.sendall(chunk)
            self.received.append(bytes(got))

    def close(self) -> None:
        self.srv.close()


def named_world(tmp_path, remote: str = '"web", "secret", "nope"') -> SimWorld:
    web, secret = tmp_path / "web.sock", tmp_path / "secret.sock"
    return SimWorld(tmp_path, peers={1: [2], 2: [1, 3], 3: [2]}, extra={
        1: f"\n[remote.2]\nservices = [{remote}]\n",
        2: f'\n[services.web]\nsocket = "{web}"\ncaller_header = true\n\n'
           f'[services.secret]\nsocket = "{secret}"\nallow = [3]\n'})


def connect_named(world: SimWorld, src: int, dst: int, name: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(world.rundir(src) / str(dst) / f"{name}.sock"))
    s.settimeout(30)
    return s


def test_named_service_sockets_header_refusals_and_reload(tmp_path):
    world = named_world(tmp_path)
    web = Recorder(tmp_path / "web.sock")
    try:
        world.start(1, 2)
        d = world.rundir(1) / "2"
        assert stat.S_IMODE(d.stat().st_mode) == 0o755
        for name in ("web", "secret", "nope"):
            assert stat.S_IMODE((d / f"{name}.sock").lstat().st_mode) == 0o660
        assert (world.rundir(1) / "2.sock").exists()  # the default service's socket stays
        # web: the service first reads who calls, then the caller's bytes untouched.
        with connect_named(world, 1, 2, "web") as s:
            assert echo_roundtrip(s, b"GET /\n") == b"XSOCK/1 domid=1 service=web\nGET /\n"
        world.wait_for("the service to finish", lambda: web.received)
        assert web.received == [b"XSOCK/1 domid=1 service=web\nGET /\n"]
        # The default service still reaches the echo (no header: it has none configured).
        with world.connect(1, 2) as s:
            assert echo_roundtrip(s, b"plain") == b"plain"
        # secret allows only domain 3; nope is not a service of domain 2: both refused, EOF
        # here, and both daemons say so.
        for name in ("secret", "nope"):
            with connect_named(world, 1, 2, name) as s:
                assert s.recv(10) == b""
            world.wait_for(f"the refusal of {name}", lambda n=name: (
                f"refused stream from domain 1 to service '{n}'" in world.daemons[2].log()
                and f"domain 2 refused service '{n}'" in world.daemons[1].log()))
        # Reload: web goes, echo comes (the named echo service: domain 2's default, by name).
        conf = world.daemons[1].config
        conf.write_text(conf.read_text().replace('"web", "secret", "nope"', '"echo"'))
        world.daemons[1].signal(signal.SIGHUP)
        world.wait_for("the reload", lambda: (d / "echo.sock").exists()
                       and not (d / "web.sock").exists())
        assert sorted(os.listdir(d)) == ["echo.sock"]
        with connect_named(world, 1, 2, "echo") as s:
            assert echo_roundtrip(s, b"by name" * 100) == b"by name" * 100
        assert "service web of domain 2 removed" in world.daemons[1].log()
        assert "service echo of domain 2 added" in world.daemons[1].log()
        # Without the [remote.2] table the directory goes too; the default socket stays.
        conf.write_text(conf.read_text().split("[remote.2]")[0])
        world.daemons[1].signal(signal.SIGHUP)
        world.wait_for("the directory to go", lambda: not d.exists())
        assert (world.rundir(1) / "2.sock").exists()
        # Back again, then a stop removes sockets and directory.
        conf.write_text(conf.read_text() + '\n[remote.2]\nservices = ["web"]\n')
        world.daemons[1].signal(signal.SIGHUP)
        world.wait_for("web again", lambda: (d / "web.sock").exists())
        assert world.daemons[1].stop() == 0
        assert not d.exists() and not (world.rundir(1) / "2.sock").exists()
    finally:
        web.close()
        world.close()


# ---- services that start late or on demand -------------------------------------------------

def test_a_service_whose_socket_appears_late_is_waited_for(tmp_path):
    world = named_world(tmp_path, remote='"web"')
    try:
        world.start(1, 2)
        # No socket yet (ENOENT): the stream waits; the service starts half a second later.
        with connect_named(world, 1, 2, "web") as s:
            s.sendall(b"early")
            time.sleep(0.5)
            web = Recorder(tmp_path / "web.sock")
            s.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := s.recv(1024):
                got += chunk
        assert got == b"XSOCK/1 domid=1 service=web\nearly"
        web.close()
        os.unlink(tmp_path / "web.sock")
        # Bound but not listening yet (ECONNREFUSED): the same.
        half = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        half.bind(str(tmp_path / "web.sock"))
        with connect_named(world, 1, 2, "web") as s:
            time.sleep(0.5)
            half.listen(4)
            conn, _ = half.accept()
            assert conn.recv(100) == b"XSOCK/1 domid=1 service=web\n"
            conn.sendall(b"late but there")
            assert s.recv(100) == b"late but there"
            conn.close()
        half.close()
        assert "unreachable" not in world.daemons[2].log()
    finally:
        world.close()


def test_a_service_that_never_comes_is_refused_after_the_short_wait(tmp_path):
    world = named_world(tmp_path, remote='"web"')
    try:
        world.start(1, 2)
        start = time.monotonic()
        with connect_named(world, 1, 2, "web") as s:
            assert s.recv(10) == b""
        took = time.monotonic() - start
        assert 1.5 < took < 10, took
        world.wait_for("both sides to log it", lambda: (
            "service 'web'" in world.daemons[2].log() and "unreachable" in world.daemons[2].log()
            and "domain 2 could not reach its service 'web'" in world.daemons[1].log()))
    finally:
        world.close()


SOCKET_ACTIVATED = r"""
import os, socket, sys, time
assert os.environ["LISTEN_FDS"] == "1" and int(os.environ["LISTEN_PID"]) == os.getpid()
open(sys.argv[1], "w").close()           # started: the first connection woke us
time.sleep(0.5)                          # a slow start: the caller waits in the backlog
srv = socket.socket(fileno=3)
conn, _ = srv.accept()
header = b""
while not header.endswith(b"\n"):
    header += conn.recv(1)
body = b""
while chunk := conn.recv(65536):
    body += chunk
conn.sendall(b"activated; you are " + header.split()[1] + b"; " + body)
conn.close()
"""


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="needs systemd-socket-activate")
def test_socket_activated_service_starts_on_first_connection_and_learns_the_caller(tmp_path):
    world = named_world(tmp_path, remote='"web"')
    marker = tmp_path / "started"
    script = tmp_path / "activated.py"
    script.write_text(SOCKET_ACTIVATED)
    activator = subprocess.Popen(["systemd-socket-activate", "-l", str(tmp_path / "web.sock"),
                                  sys.executable, str(script), str(marker)],
                                 stderr=subprocess.PIPE, text=True)
    try:
        assert "Listening on" in activator.stderr.readline()
        world.start(1, 2)
        assert not marker.exists()  # nothing runs until a connection arrives
        with connect_named(world, 1, 2, "web") as s:
            s.sendall(b"hello")
            s.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := s.recv(1024):
                got += chunk
        assert got == b"activated; you are domid=1; hello"
        assert marker.exists()
        assert activator.wait(10) == 0
    finally:
        if activator.poll() is None:
            activator.kill()
            activator.wait()
        activator.stderr.close()
        world.close()


def test_accepting_a_stream_the_peer_reset_meanwhile_is_harmless():
    """Regression: while the control plane waited for a slow service, the opener gave up; the
    late accept must close the service's socket, and the stream's one CLOSED event came with
    the RESET (so the channel table cannot keep it), not a second one with the accept."""
    p = RingPair()
    try:
        app, a_end = socket.socketpair()
        sid, a_serial = p.a.open_stream(a_end, "svc")
        serial = p.wait_event(p.b, EventType.OPEN_REQUEST).serial
        assert p.a.close_stream(sid, a_serial)
        assert p.wait_event(p.a, EventType.CLOSED).arg == Reason.CLOSED
        closed = p.wait_event(p.b, EventType.CLOSED)  # the RESET reached the acceptor
        assert (closed.stream, closed.serial) == (sid, serial)
        svc, b_end = socket.socketpair()
        assert p.b.accept_stream(sid, serial, b_end) is False
        assert svc.recv(10) == b""  # its socket was closed
        time.sleep(0.2)
        assert [e for e in p.b.events() if e.type == EventType.CLOSED] == []
        app.close()
        svc.close()
    finally:
        p.close()
