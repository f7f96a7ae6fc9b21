"""The simulated hypervisor and host against hostile domains (issue 10, items 3, 4 and 9).

Each test speaks the hypervisor's wire protocol through raw SOCK_SEQPACKET sockets (``RawHv``),
sending what a well-behaved client never sends, checks the answer (an error for that request,
or that connection closed), then that the host still serves another domain.
"""

from __future__ import annotations

import array
import errno
import fcntl
import json
import mmap
import os
import resource
import selectors
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import xsockd.sim.hypervisor as hv_module
from xsockd.backend_sim import SimBackend
from xsockd.errors import BackendError
from xsockd.sim.acceptpause import PAUSE
from xsockd.sim.host import MAX_CONTROL_CLIENTS, SimHost, control
from xsockd.sim.hypervisor import (
    MAX_CONNECTIONS,
    MAX_FDS,
    MAX_MAPPED,
    Hypervisor,
    recv_message,
)
from xsockd.sim.xenstored import XenStoreServer


@pytest.fixture
def host(tmp_path) -> Iterator[SimHost]:
    with SimHost(tmp_path / "sim", domains=[0, 1, 2, 3]) as h:
        yield h


class RawHv:
    """A raw hypervisor connection as one domain: sends any bytes, with any descriptors."""

    def __init__(self, sim_dir: Path, domid: int) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.connect(str(sim_dir / f"dom{domid}" / "hypervisor.sock"))
        self.sock.settimeout(10)

    def __enter__(self) -> RawHv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def ask(self, request: dict[str, Any] | bytes, fds: list[int] | tuple[int, ...] = ()
            ) -> tuple[dict[str, Any], list[int]]:
        data = request if isinstance(request, bytes) else json.dumps(request).encode()
        anc = ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
               if fds else [])
        self.sock.sendmsg([data], anc)
        reply, got = recv_message(self.sock)
        assert reply is not None, "the hypervisor hung up"
        return reply, got

    def refused(self, request: dict[str, Any] | bytes, fds: tuple[int, ...] = ()) -> int:
        """Returns the errno of a refusal (fails if the request was granted)."""
        reply, got = self.ask(request, fds)
        for fd in got:
            os.close(fd)
        assert reply["ok"] is False, f"{request!r:.80} was accepted: {reply}"
        return reply["errno"]

    def ok(self, request: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        reply, got = self.ask(request)
        assert reply["ok"] is True, reply
        return reply, got


def fd_count(host: SimHost) -> int:
    assert host.proc is not None and host.proc.poll() is None, "the host died"
    return len(os.listdir(f"/proc/{host.proc.pid}/fd"))


def settled_fd_count(host: SimHost) -> int:
    """The host's descriptors once closed clients are seen to have gone."""
    end = time.monotonic() + 5
    count = fd_count(host)
    while time.monotonic() < end:
        time.sleep(0.05)
        now = fd_count(host)
        if now == count:
            return now
        count = now
    return count


def assert_serves(host: SimHost, domid: int = 2) -> None:
    """Another domain still gets an event channel and shared pages."""
    with SimBackend(domid, host.dir) as b:
        ch = b.alloc_unbound(1)
        pages = b.grant(1, 1)
        pages.buffer[0] = 7
        pages.close()
        ch.close()
    assert control(host.dir, {"op": "stats"})["internal_errors"] == 0


# ---- grants: sealed pages made by the hypervisor -------------------------------------------


def test_a_granter_cannot_shrink_or_grow_pages_under_a_mapping(host):
    """Regression: a granter that shrank its memfd after the peer mapped it killed the
    grantee with SIGBUS.  Now the hypervisor makes the memfd and seals it."""
    with RawHv(host.dir, 1) as raw, SimBackend(2, host.dir) as b2:
        reply, fds = raw.ok({"op": "grant", "peer": 2, "count": 2})
        assert len(fds) == 1
        (fd,) = fds
        mapped = b2.map(1, reply["refs"])
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 3 * mmap.PAGESIZE)
        with pytest.raises(PermissionError):  # nor can it lift the seals
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
        assert os.fstat(fd).st_size == 2 * mmap.PAGESIZE
        os.pwrite(fd, b"granter", mmap.PAGESIZE)
        # The grantee's mapping works, to its last byte (a fault here would be SIGBUS).
        view = mapped.buffer
        assert bytes(view[mmap.PAGESIZE:mmap.PAGESIZE + 7]) == b"granter"
        view[-1] = 0x5A
        assert os.pread(fd, 1, 2 * mmap.PAGESIZE - 1) == b"\x5a"
        mapped.close()
        os.close(fd)


def test_a_grant_request_that_brings_its_own_memory_is_refused(host):
    fd = os.memfd_create("hostile")
    try:
        os.ftruncate(fd, mmap.PAGESIZE)
        with RawHv(host.dir, 1) as raw:
            assert raw.refused({"op": "grant", "peer": 2, "count": 1}, (fd,)) == errno.EINVAL
            assert host.accounting()[1]["granted"] == 0
            _, fds = raw.ok({"op": "grant", "peer": 2, "count": 1})  # still served
            os.close(fds[0])
    finally:
        os.close(fd)
    assert_serves(host)


# ---- per-domain bounds ---------------------------------------------------------------------


def test_event_channel_ports_are_bounded_per_domain(host):
    """Regression: about 500 ports killed the host with EMFILE.  Ports are bounded per
    domain (Xen's max_event_channels, 1023, or what the descriptor limit covers); past it
    ENOSPC, to that domain only."""
    limit = control(host.dir, {"op": "stats"})["max_event_channels"]
    assert 64 <= limit <= 1023
    before = fd_count(host)
    with RawHv(host.dir, 1) as raw:
        for _ in range(limit):
            _, fds = raw.ok({"op": "alloc_unbound", "peer": 2})
            for fd in fds:
                os.close(fd)
        assert raw.refused({"op": "alloc_unbound", "peer": 2}) == errno.ENOSPC
        assert host.accounting()[1]["ports"] == limit
        # Two eventfds a port, our connection, and a control client not yet seen to go.
        assert fd_count(host) - before <= 2 * limit + 2
        assert_serves(host, 2)
    assert host.accounting()[1]["ports"] == 0
    assert settled_fd_count(host) <= before


def test_max_event_channels_option_and_bind_counts_too(tmp_path):
    with SimHost(tmp_path / "sim", domains=[0, 1, 2], max_event_channels=3) as h:
        with RawHv(h.dir, 1) as one, RawHv(h.dir, 2) as two:
            ports = []
            for _ in range(3):
                reply, fds = one.ok({"op": "alloc_unbound", "peer": 2})
                ports.append(reply["port"])
                for fd in fds:
                    os.close(fd)
            assert one.refused({"op": "alloc_unbound", "peer": 2}) == errno.ENOSPC
            for _ in range(3):
                _, fds = two.ok({"op": "alloc_unbound", "peer": 1})
                for fd in fds:
                    os.close(fd)
            assert two.refused({"op": "bind", "peer": 1, "port": ports[0]}) == errno.ENOSPC


def test_a_host_whose_descriptor_limit_covers_too_little_refuses_to_start(tmp_path):
    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (600, 600))

    r = subprocess.run([sys.executable, "-m", "xsockd.sim.host", "--dir", str(tmp_path / "s"),
                        "--domains", "0,1,2"], preexec_fn=low_limit, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "RLIMIT_NOFILE" in r.stderr and "Traceback" not in r.stderr


def test_domains_past_the_budgeted_number_are_refused(tmp_path):
    with SimHost(tmp_path / "sim", domains=[0, 1], max_domains=2) as h:
        with pytest.raises(RuntimeError, match="covers 2 domains"):
            h.create_domain(2)
        h.destroy_domain(1)
        h.create_domain(2)
        assert h.accounting()[2]["connections"] == 0


def test_mapped_pages_are_bounded_per_domain(host):
    with RawHv(host.dir, 1) as granter, RawHv(host.dir, 2) as mapper:
        reply, fds = granter.ok({"op": "grant", "peer": 2, "count": 1024})
        os.close(fds[0])
        refs = reply["refs"]
        for _ in range(MAX_MAPPED // 1024):
            _, fds = mapper.ok({"op": "map", "peer": 1, "refs": refs})
            for fd in fds:
                os.close(fd)
        assert mapper.refused({"op": "map", "peer": 1, "refs": refs[:1]}) == errno.ENOMEM
        assert host.accounting()[2]["mapped"] == MAX_MAPPED
    assert host.accounting()[2]["mapped"] == 0
    assert_serves(host, 3)


def test_one_map_sends_at_most_253_descriptors(host):
    with RawHv(host.dir, 1) as granter, RawHv(host.dir, 2) as mapper:
        refs = []
        for _ in range(MAX_FDS + 1):
            reply, fds = granter.ok({"op": "grant", "peer": 2, "count": 1})
            os.close(fds[0])
            refs += reply["refs"]
        assert mapper.refused({"op": "map", "peer": 1, "refs": refs}) == errno.E2BIG
        reply, fds = mapper.ok({"op": "map", "peer": 1, "refs": refs[:MAX_FDS]})
        assert len(fds) == MAX_FDS
        for fd in fds:
            os.close(fd)


def test_connections_per_domain_are_bounded(host):
    socks = [RawHv(host.dir, 1) for _ in range(MAX_CONNECTIONS)]
    try:
        _, fds = socks[-1].ok({"op": "alloc_unbound", "peer": 2})  # all of them served
        for fd in fds:
            os.close(fd)
        with RawHv(host.dir, 1) as extra:
            assert extra.sock.recv(100) == b"", "a connection past the limit was served"
        assert host.accounting()[1]["connections"] == MAX_CONNECTIONS
        assert_serves(host, 2)
    finally:
        for s in socks:
            s.sock.close()


def test_control_clients_are_bounded_and_malformed_control_requests_answered(host):
    path = str(host.dir / "control.sock")
    socks = []
    try:
        for _ in range(MAX_CONTROL_CLIENTS):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.connect(path)
            s.settimeout(10)
            socks.append(s)
        for bad in (b"[", b'{"op": "create_domain", "domid": "x"}',
                    b'{"op": "create_domain", "domid": 1}',
                    b'{"op": "destroy_domain", "domid": 99999999}', b'{"op": 5}', b"\xff"):
            socks[0].send(bad)
            reply = json.loads(socks[0].recv(65536) or b"{}")
            if bad in (b"[", b"\xff"):  # not a request at all: that client is hung up on
                assert reply == {}
                socks[0].close()
                socks[0] = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                socks[0].connect(path)
                socks[0].settimeout(10)
            else:
                assert reply["ok"] is False
                assert reply["errno"] in (errno.EINVAL, errno.ENOSYS, errno.EEXIST)
        extra = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        extra.connect(path)
        extra.settimeout(10)
        with extra:
            assert extra.recv(100) == b"", "a control client past the limit was served"
    finally:
        for s in socks:
            s.close()
    assert_serves(host)


# ---- malformed requests ----------------------------------------------------------------------

MALFORMED: list[tuple[bytes | dict[str, Any], int]] = [
    (b"not json", errno.EINVAL),
    (b"\xff\xfe\x00", errno.EINVAL),
    (b"[1, 2]", errno.EINVAL),
    (b"[" * 60000, errno.EINVAL),                       # nesting deeper than json can parse
    (b'{"op": "grant", "peer": 2, "count": 1' + b"1" * 5000 + b"}", errno.EINVAL),
    ({"op": "fly"}, errno.ENOSYS),
    ({"op": 7}, errno.EINVAL),
    ({}, errno.EINVAL),
    ({"op": "grant", "peer": 2}, errno.EINVAL),
    ({"op": "grant", "peer": 2, "count": 1, "fd": 3}, errno.EINVAL),
    ({"op": "grant", "peer": True, "count": 1}, errno.EINVAL),
    ({"op": "grant", "peer": 2, "count": 1.0}, errno.EINVAL),
    ({"op": "grant", "peer": 2, "count": "1"}, errno.EINVAL),
    ({"op": "grant", "peer": -1, "count": 1}, errno.EINVAL),
    ({"op": "grant", "peer": 0x7FF0, "count": 1}, errno.EINVAL),
    ({"op": "grant", "peer": 2, "count": 0}, errno.EINVAL),
    ({"op": "grant", "peer": 2, "count": 4097}, errno.EINVAL),
    ({"op": "grant", "peer": 2, "count": 1, "notify": [0]}, errno.EINVAL),
    ({"op": "grant", "peer": 2, "count": 1, "notify": [4096, None]}, errno.EINVAL),
    ({"op": "grant", "peer": 2, "count": 1, "notify": [None, 1]}, errno.EINVAL),
    ({"op": "grant", "peer": 2, "count": 1, "notify": {"a": 1}}, errno.EINVAL),
    ({"op": "map", "peer": 1, "refs": "8"}, errno.EINVAL),
    ({"op": "map", "peer": 1, "refs": []}, errno.EINVAL),
    ({"op": "map", "peer": 1, "refs": [8] * 4097}, errno.EINVAL),
    ({"op": "map", "peer": 1, "refs": [None]}, errno.EINVAL),
    ({"op": "map", "peer": 1, "refs": [2**64]}, errno.EINVAL),
    ({"op": "map", "peer": 1, "refs": [12345]}, errno.EINVAL),
    ({"op": "unmap", "id": 99}, errno.EINVAL),
    ({"op": "ungrant", "id": 99}, errno.EINVAL),
    ({"op": "ungrant", "id": [1]}, errno.EINVAL),
    ({"op": "bind", "peer": 1, "port": 0}, errno.EINVAL),
    ({"op": "bind", "peer": 1, "port": 77}, errno.EINVAL),
    ({"op": "close_port", "port": 77}, errno.EINVAL),
    ({"op": "alloc_unbound", "peer": None}, errno.EINVAL),
    (b"{" + b'"a": 1, ' * 9000 + b'"op": "fly"}', errno.E2BIG),   # over 64 KiB
]


def test_every_malformed_request_gets_an_error_and_the_connection_stays(host):
    before = fd_count(host)
    with RawHv(host.dir, 2) as raw:
        for request, code in MALFORMED:
            assert raw.refused(request) == code, request if isinstance(request, dict) else \
                request[:60]
        # Descriptors are never accepted from a client, even 253 of them, and never kept.
        r, w = os.pipe()
        try:
            assert raw.refused({"op": "alloc_unbound", "peer": 1}, (r,) * MAX_FDS) \
                == errno.EINVAL
        finally:
            os.close(r)
            os.close(w)
        # An empty message reads as a hang-up: only this connection is closed.
        raw.sock.send(b"")
        assert raw.sock.recv(100) == b""
    assert settled_fd_count(host) <= before
    acct = host.accounting()[2]
    assert acct["granted"] == acct["mapped"] == acct["ports"] == 0
    assert_serves(host, 2)


def test_running_out_of_descriptors_is_an_error_answer_not_a_crash(tmp_path, monkeypatch):
    """EMFILE while serving a request (here from eventfd) answers that request; the
    connection and the hypervisor go on."""
    sel = selectors.DefaultSelector()
    hv = Hypervisor()
    hv.register(sel)
    hv.add_domain(1, str(tmp_path / "hv.sock"))
    client = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    client.connect(str(tmp_path / "hv.sock"))
    client.settimeout(5)

    def serve() -> None:
        for key, _ in sel.select(1):
            key.data()

    def ask(request: dict[str, Any]) -> dict[str, Any]:
        client.send(json.dumps(request).encode())
        serve()
        reply, fds = recv_message(client)
        for fd in fds:
            os.close(fd)
        assert reply is not None
        return reply

    serve()  # accept

    def no_fds(*_: object) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(hv_module.os, "eventfd", no_fds)
    monkeypatch.setattr(hv_module.os, "memfd_create", no_fds)
    assert ask({"op": "alloc_unbound", "peer": 2})["errno"] == errno.EMFILE
    assert ask({"op": "grant", "peer": 2, "count": 1})["errno"] == errno.EMFILE
    monkeypatch.undo()
    assert ask({"op": "alloc_unbound", "peer": 2})["ok"] is True
    assert hv.accounting()[1]["ports"] == 1 and hv.internal_errors == 0
    client.close()
    serve()
    assert hv.accounting()[1] == {"granted": 0, "mapped": 0, "ports": 0, "connections": 0}
    hv.close()
    sel.close()


# ---- listeners: modes and accepting ------------------------------------------------------


def test_socket_and_directory_modes_do_not_come_from_the_umask(tmp_path):
    """Regression (item 9): with umask 002 the sockets were group-writable."""
    old = os.umask(0o002)
    try:
        with SimHost(tmp_path / "sim", domains=[0, 1]) as h:
            modes = {}
            for path in [h.dir, h.dir / "control.sock", *h.dir.glob("dom*"),
                         *h.dir.glob("dom*/*.sock")]:
                st = os.lstat(path)
                name = str(path.relative_to(h.dir))
                modes[name] = (stat.S_ISSOCK(st.st_mode), stat.S_IMODE(st.st_mode))
    finally:
        os.umask(old)
    assert len(modes) == 1 + 1 + 2 + 4
    for name, (is_sock, mode) in modes.items():
        assert mode == (0o600 if is_sock else 0o755), f"{name}: {mode:o}"


def test_an_existing_directory_keeps_its_mode(tmp_path):
    """--dir /tmp must not make /tmp 0755: only what the host creates gets its modes."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    with SimHost(shared, domains=[0, 1]):
        assert stat.S_IMODE(os.stat(shared).st_mode) == 0o1777
        assert stat.S_IMODE(os.stat(shared / "dom1").st_mode) == 0o755


def test_xenstored_out_of_descriptors_pauses_accepting_instead_of_spinning(tmp_path):
    """A listener whose accept fails with EMFILE stays readable: the loop must not spin on
    it.  The client waits in the backlog and is served once descriptors are free."""
    sel = selectors.DefaultSelector()
    server = XenStoreServer()
    server.register(sel)
    server.add_domain(1, str(tmp_path / "xs.sock"))
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(str(tmp_path / "xs.sock"))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    spare: list[int] = []
    try:
        highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1, hard))
        while True:  # fill every free descriptor below the limit
            try:
                spare.append(os.dup(0))
            except OSError:
                break
        wakeups = 0
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            for key, _ in sel.select(0.05):
                wakeups += 1
                key.data()
            server.resume_accepting()
        assert not server.conns
        assert wakeups <= 0.5 / PAUSE + 2, f"{wakeups} wakeups in 0.5 s: spinning"
    finally:
        for fd in spare:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    end = time.monotonic() + 2
    while not server.conns and time.monotonic() < end:
        for key, _ in sel.select(0.05):
            key.data()
        server.resume_accepting()
    assert len(server.conns) == 1, "the waiting client was never accepted"
    client.close()
    server.close()
    sel.close()


def test_the_sim_backend_reports_a_refused_port_as_a_backend_error(tmp_path):
    with SimHost(tmp_path / "sim", domains=[0, 1], max_event_channels=1) as h:
        with SimBackend(1, h.dir) as b:
            ch = b.alloc_unbound(0)
            with pytest.raises(BackendError) as e:
                b.alloc_unbound(0)
            assert e.value.errno == errno.ENOSPC and type(e.value) is BackendError
            ch.close()
