"""The README's TCP bridges, run: a TCP server as a service, and a channel as a local TCP
port, each with socat and with systemd-socket-proxyd.

The commands and units are taken from the README's section "TCP services and TCP ports"; its
paths and ports become the test's.  A unit pair (X.socket with ListenStream, X.service with
ExecStart) is run as systemd would run it, by ``systemd-socket-activate -l LISTEN EXECSTART``:
the listening socket is made first and handed to the relay, which starts on the first
connection.
"""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from simworld import SimWorld, echo_roundtrip

README = Path(__file__).parent.parent / "README.md"
PROXYD = "/lib/systemd/systemd-socket-proxyd"


def section() -> str:
    text = README.read_text()
    start = text.index("## TCP services and TCP ports\n")
    return text[start:text.index("\n## ", start + 1)]


def socat_lines() -> list[str]:
    lines = [ln.strip() for b in re.findall(r"```sh\n(.*?)```", section(), re.S)
             for ln in b.splitlines() if ln.strip()]
    assert len(lines) == 2 and all(ln.startswith("socat ") for ln in lines), lines
    return lines


def units() -> dict[str, dict[str, str]]:
    """Returns the README's units by file name: their keys, every section merged."""
    out = {}
    for block in re.findall(r"```ini\n(.*?)```", section(), re.S):
        name = block.splitlines()[0].removeprefix("# ").strip()
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        parser.read_string(block)
        out[name] = {k: v for sec in parser.sections() for k, v in parser[sec].items()}
    assert set(out) == {"xsock-web.socket", "xsock-web.service", "xsock-to-2.socket",
                        "xsock-to-2.service"}, out
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TcpEcho(socketserver.ThreadingTCPServer):
    """A TCP echo server on 127.0.0.1: the "web" service of domain 2."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                while data := self.request.recv(65536):
                    self.request.sendall(data)

        super().__init__(("127.0.0.1", 0), Handler)
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()


def relay(cmd: str, subst: dict[str, str]) -> subprocess.Popen[bytes]:
    for old, new in subst.items():
        cmd = cmd.replace(old, new)
    argv = shlex.split(cmd.removesuffix("&").strip())
    assert shutil.which(argv[0]), f"{argv[0]} is needed (Debian package of the same name)"
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL)


def activate(listen: str, exec_start: str, subst: dict[str, str]) -> subprocess.Popen[bytes]:
    """Runs a unit pair as systemd would: the socket first, the relay on a connection."""
    for old, new in subst.items():
        listen, exec_start = listen.replace(old, new), exec_start.replace(old, new)
    return relay(f"systemd-socket-activate -l {listen} {exec_start}", {})


def exchange(sock: socket.socket, data: bytes, half_close: bool) -> bytes:
    """Returns what an echo sends back for ``data``: to EOF after a half-close (socat keeps the
    other direction open), else exactly ``len(data)`` bytes (systemd-socket-proxyd ends the
    whole connection when one side ends its writes)."""
    if half_close:
        return echo_roundtrip(sock, data)
    writer = threading.Thread(target=sock.sendall, args=(data,))
    writer.start()
    got = bytearray()
    while len(got) < len(data) and (chunk := sock.recv(1 << 20)):
        got += chunk
    writer.join()
    return bytes(got)


def wait_listening(connect: object, what: str) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            connect().close()  # type: ignore[operator]
            return
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} never listened") from None
            time.sleep(0.05)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        p.terminate()
        p.wait(10)


def test_the_readme_names_what_it_uses():
    assert Path(PROXYD).exists(), f"{PROXYD} is needed (package systemd)"
    u = units()
    assert u["xsock-web.service"]["ExecStart"].startswith(PROXYD)
    assert u["xsock-to-2.service"]["ExecStart"] == f"{PROXYD} /run/xsock/2.sock"
    assert u["xsock-to-2.socket"]["ListenStream"].startswith("127.0.0.1:")


@pytest.mark.parametrize("how", ["socat", "systemd-socket-proxyd"])
def test_a_tcp_server_as_a_service(tmp_path, procs, how):
    server = TcpEcho()
    world = SimWorld(tmp_path, peers={1: [2], 2: [1]})  # domain 2's service: world.echo_path
    try:
        subst = {"/run/xsock-web.sock": str(world.echo_path),
                 "127.0.0.1:8080": f"127.0.0.1:{server.port}"}
        if how == "socat":
            procs.append(relay(socat_lines()[0], subst))
        else:
            u = units()
            procs.append(activate(u["xsock-web.socket"]["ListenStream"],
                                  u["xsock-web.service"]["ExecStart"], subst))
        wait_listening(lambda: _unix(world.echo_path), "the relay's socket")
        world.start(1, 2, echo=False)
        data = bytes(range(256)) * 4000
        for _ in range(3):  # a relay serves connection after connection
            with world.connect(1, 2) as s:
                assert exchange(s, data, half_close=how == "socat") == data
    finally:
        world.close()
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("how", ["socat", "systemd-socket-proxyd"])
def test_a_channel_as_a_local_tcp_port(tmp_path, procs, how):
    world = SimWorld(tmp_path, peers={1: [2], 2: [1]})
    port = free_port()
    try:
        world.start(1, 2)
        subst = {"/run/xsock/2.sock": str(world.rundir(1) / "2.sock"), "9000": str(port)}
        if how == "socat":
            procs.append(relay(socat_lines()[1], subst))
        else:
            u = units()
            procs.append(activate(u["xsock-to-2.socket"]["ListenStream"],
                                  u["xsock-to-2.service"]["ExecStart"], subst))
        wait_listening(lambda: socket.create_connection(("127.0.0.1", port)), "the TCP port")
        data = b"over TCP, then a channel" * 5000
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                assert exchange(s, data, half_close=how == "socat") == data
    finally:
        world.close()


def _unix(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
    except OSError:
        s.close()
        raise
    return s
