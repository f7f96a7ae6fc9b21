"""systemd integration without systemd: sd_notify messages on a test NOTIFY_SOCKET, reload."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from simworld import SimWorld

from xsockd.service import ServiceNotifier


@pytest.fixture
def notify_socket(tmp_path):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(10)
    yield path, sock
    sock.close()


def messages_until(sock: socket.socket, want: str, timeout: float = 10) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while not any(want in m for m in got):
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        got.append(sock.recv(4096).decode())
    return got


def test_notifier_is_a_no_op_outside_systemd(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = ServiceNotifier()
    assert n.ready("x") is False and n.watchdog_interval() is None


def test_watchdog_interval_is_half_of_watchdog_usec(monkeypatch, notify_socket):
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_socket[0]))
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert ServiceNotifier().watchdog_interval() == 1.5
    monkeypatch.setenv("WATCHDOG_PID", "1")  # meant for another process
    assert ServiceNotifier().watchdog_interval() is None


def test_daemon_notifies_reloads_and_stops(tmp_path, notify_socket):
    path, sock = notify_socket
    world = SimWorld(tmp_path, peers={1: [2], 2: [1]})
    try:
        world.start(2)
        d1 = world.daemons[1]
        env = dict(os.environ, NOTIFY_SOCKET=str(path), WATCHDOG_USEC="400000")
        proc = subprocess.Popen([sys.executable, "-m", "xsockd.daemon", "--backend", "sim",
                                 "--domid", "1", "--config", str(d1.config)], env=env,
                                stderr=subprocess.PIPE, text=True)
        try:
            ready = messages_until(sock, "READY=1")
            assert any("STATUS=" in m for m in ready)
            assert (world.rundir(1) / "2.sock").exists()  # ready only once sockets exist
            messages_until(sock, "WATCHDOG=1", timeout=2)
            # Reload with a new peer: its socket appears; the old one stays.
            d1.config.write_text(d1.config.read_text().replace("peers = [2]", "peers = [2, 3]"))
            proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while not (world.rundir(1) / "3.sock").exists():
                assert time.monotonic() < deadline, "reload did not add peer 3"
                time.sleep(0.05)
            # A broken file is refused; the old configuration (peers 2 and 3) stays.
            d1.config.write_text("[daemon\n")
            proc.send_signal(signal.SIGHUP)
            time.sleep(0.5)
            assert (world.rundir(1) / "3.sock").exists() and proc.poll() is None
            with world.connect(1, 2) as s:
                s.sendall(b"ping")
                s.shutdown(socket.SHUT_WR)
                assert s.recv(10) == b"ping"
            proc.send_signal(signal.SIGTERM)
            messages_until(sock, "STOPPING=1")
            assert proc.wait(15) == 0
            err = proc.stderr.read()
            assert "reload refused" in err and "peer 3 added" in err
            assert not (world.rundir(1) / "2.sock").exists()  # removed on the way out
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stderr.close()
    finally:
        world.close()
