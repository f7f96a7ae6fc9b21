"""The sim's XenStore server, spoken to by Xen's own tools (xenstore-utils) and by our client."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import struct
import subprocess
import time

import pytest

from xsockd.backend import XenStorePerm
from xsockd.errors import XenStoreError
from xsockd.sim.host import SimHost
from xsockd.xenstore_client import XenStoreClient, transact

TOOLS = ("xenstore-read", "xenstore-write", "xenstore-ls", "xenstore-rm", "xenstore-chmod",
         "xenstore-watch")


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"Xen's XenStore tools are missing ({', '.join(missing)}): "
                    "apt-get install xenstore-utils (./run setup does)")
    with SimHost(tmp_path_factory.mktemp("xs") / "sim", domains=[0, 1, 2]) as h:
        yield h


def tool(host: SimHost, domid: int, *args: str, check: bool = True
         ) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, XENSTORED_PATH=str(host.dir / f"dom{domid}" / "xenstored.sock"))
    return subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=20,
                          check=check)


def test_xen_tools_write_read_list_remove(host):
    tool(host, 0, "xenstore-write", "/t1/a", "hello", "/t1/b/c", "deep")
    assert tool(host, 0, "xenstore-read", "/t1/a").stdout == "hello\n"
    listing = tool(host, 0, "xenstore-ls", "/t1").stdout
    assert 'a = "hello"' in listing and 'c = "deep"' in listing
    tool(host, 0, "xenstore-rm", "/t1/b")
    assert tool(host, 0, "xenstore-read", "/t1/b/c", check=False).returncode != 0
    with host.xenstore(0) as xs:
        assert xs.directory("/t1") == ["a"]


def test_xen_tools_permissions_between_domains(host):
    tool(host, 1, "xenstore-write", "data/secret", "s3")  # relative: /local/domain/1/...
    # Domain 2 cannot read what domain 1 did not allow it to; dom0 can.
    denied = tool(host, 2, "xenstore-read", "/local/domain/1/data/secret", check=False)
    assert denied.returncode != 0
    assert tool(host, 0, "xenstore-read", "/local/domain/1/data/secret").stdout == "s3\n"
    # Domain 1 owns the node it created; it grants domain 2 read access with xenstore-chmod.
    tool(host, 1, "xenstore-chmod", "/local/domain/1/data/secret", "n1", "r2")
    assert tool(host, 2, "xenstore-read", "/local/domain/1/data/secret").stdout == "s3\n"
    assert tool(host, 2, "xenstore-write", "/local/domain/1/data/secret", "x",
                check=False).returncode != 0
    perms = tool(host, 0, "xenstore-ls", "-p", "/local/domain/1/data").stdout
    assert "n1" in perms and "r2" in perms


def test_xen_watch_tool_sees_changes(host):
    env = dict(os.environ, XENSTORED_PATH=str(host.dir / "dom0" / "xenstored.sock"))
    w = subprocess.Popen(["xenstore-watch", "-n", "3", "/t2"], env=env, stdout=subprocess.PIPE,
                         text=True)
    try:
        assert w.stdout.readline().strip() == "/t2"  # fires once at registration
        tool(host, 0, "xenstore-write", "/t2/x", "1")
        tool(host, 0, "xenstore-rm", "/t2")
        rest = [w.stdout.readline().strip() for _ in range(2)]
        assert "/t2/x" in rest
        assert w.wait(10) == 0
    finally:
        w.kill()
        w.wait()
        w.stdout.close()


def test_new_nodes_inherit_permissions_and_belong_to_their_creator(host):
    with host.xenstore(0) as xs0, host.xenstore(2) as xs2:
        xs0.write("/t3", b"")
        xs0.set_perms("/t3", [XenStorePerm(0, "w")])  # anyone may create below it
        xs2.write("/t3/mine", b"v")
        assert xs0.get_perms("/t3/mine") == [XenStorePerm(2, "w")]
        with pytest.raises(XenStoreError) as e:
            xs2.read("/t3")
        assert e.value.errno == errno.EACCES
        # Only the owner (or dom0) changes permissions, and cannot give a node away.
        with pytest.raises(XenStoreError) as e:
            xs2.set_perms("/t3/mine", [XenStorePerm(1, "n")])
        assert e.value.errno == errno.EPERM


def test_transactions_commit_abort_and_conflict(host):
    with host.xenstore(0) as a, host.xenstore(0) as b:
        tx = a.transaction_start()
        a.write("/t4/x", b"1", tx)
        assert a.read("/t4/x", tx) == b"1"  # a transaction sees its own writes
        with pytest.raises(XenStoreError):
            b.read("/t4/x")  # nobody else does before the commit
        assert a.transaction_end(tx)
        assert b.read("/t4/x") == b"1"
        tx = a.transaction_start()
        a.write("/t4/x", b"2", tx)
        a.transaction_end(tx, commit=False)
        assert b.read("/t4/x") == b"1"
        tx = a.transaction_start()
        assert a.read("/t4/x", tx) == b"1"
        b.write("/t4/x", b"3")  # someone else changes what the transaction read
        a.write("/t4/y", b"4", tx)
        assert a.transaction_end(tx) is False  # EAGAIN: retry
        assert transact(a, lambda t: a.read("/t4/x", t)) == b"3"


def test_watch_events_only_for_readable_nodes(host):
    with host.xenstore(0) as xs0, host.xenstore(2) as xs2:
        xs0.write("/t5/open", b"")
        xs0.set_perms("/t5/open", [XenStorePerm(0, "r")])
        xs0.write("/t5/closed", b"")
        xs2.watch("/t5", "tok")
        time.sleep(0.1)
        xs2.read_events()
        xs0.write("/t5/closed", b"x")
        xs0.write("/t5/open", b"y")
        deadline = time.monotonic() + 5
        events = []
        while not events and time.monotonic() < deadline:
            events = xs2.read_events()
            time.sleep(0.02)
        assert [e.path for e in events] == ["/t5/open"]
        assert events[0].token == "tok"


def test_watch_limit_per_domain(host):
    with host.xenstore(1) as xs:
        with pytest.raises(XenStoreError) as e:
            for i in range(200):
                xs.watch(f"/t6/{i}", "t")
        assert e.value.errno == errno.E2BIG
        assert i == 129  # xenstored's check is "more than 128 already" (do_watch)


def test_hostile_client_is_disconnected_and_the_server_survives(host):
    path = str(host.dir / "dom1" / "xenstored.sock")
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        s.sendall(struct.pack("=IIII", 2, 1, 0, 1_000_000) + b"x" * 100)  # oversized length
        s.settimeout(5)
        assert s.recv(100) == b""  # hung up on
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        s.sendall(struct.pack("=IIII", 2, 1, 0, 5) + b"/\xff\xfe\0\0")  # bad path bytes
        s.settimeout(5)
        header = s.recv(16)
        assert struct.unpack("=IIII", header)[0] == 16  # XS_ERROR
    with XenStoreClient(path) as xs:
        assert xs.read("domid") == b"1"


def test_domain_destroy_removes_its_home(host):
    with host.xenstore(0) as xs:
        assert xs.read("/local/domain/2/domid") == b"2"
        host.destroy_domain(2)
        with pytest.raises(XenStoreError) as e:
            xs.read("/local/domain/2/domid")
        assert e.value.errno == errno.ENOENT
        host.create_domain(2)
        assert xs.read("/local/domain/2/domid") == b"2"
