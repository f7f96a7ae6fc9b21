"""The sim backend and hypervisor: Xen's grant and event-channel semantics across processes."""

from __future__ import annotations

import errno
import select
import subprocess
import sys
import textwrap

import pytest

from xsockd.backend_sim import SimBackend
from xsockd.errors import BackendError, GrantLimitError
from xsockd.sim.host import SimHost


@pytest.fixture
def host(tmp_path):
    with SimHost(tmp_path / "sim", domains=[0, 1, 2, 3]) as h:
        yield h


def in_domain(host: SimHost, domid: int, code: str) -> subprocess.Popen[str]:
    """Runs code as a separate process acting as domain ``domid`` (``b`` is its backend)."""
    prelude = (f"import sys, os, time\nfrom xsockd.backend_sim import SimBackend\n"
               f"from xsockd.backend import UnmapNotify\n"
               f"b = SimBackend({domid}, {str(host.dir)!r})\n")
    return subprocess.Popen([sys.executable, "-c", prelude + textwrap.dedent(code)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def test_granted_pages_are_shared_memory_with_the_named_domain_only(host):
    with SimBackend(1, host.dir) as b1:
        pages = b1.grant(2, 3)
        pages.buffer[5000] = 0x42
        child = in_domain(host, 2, f"""
            m = b.map(1, {list(pages.refs)})
            print(m.buffer[5000], flush=True)
            m.buffer[100] = 0x77
            print("written", flush=True)
            sys.stdin.readline()
            m.close(); b.close()
        """)
        assert child.stdout.readline().strip() == str(0x42)
        assert child.stdout.readline().strip() == "written"
        assert pages.buffer[100] == 0x77  # the other process's write, in our memory
        assert host.accounting()[2]["mapped"] == 3
        # Domain 3 may not map what was granted to domain 2.
        other = in_domain(host, 3, f"""
            try:
                b.map(1, {list(pages.refs)})
                print("mapped")
            except OSError as e:
                print("refused", e.errno)
        """)
        assert other.stdout.read().split() == ["refused", str(errno.EINVAL)]
        other.wait()
        other.stdout.close()
        other.stdin.close()
        child.stdin.write("\n")
        child.stdin.close()
        assert child.wait(10) == 0
        child.stdout.close()
        pages.close()
    acct = host.accounting()
    assert acct[1]["granted"] == 0 and acct[2]["mapped"] == 0


def test_bogus_ref_is_refused(host):
    with SimBackend(2, host.dir) as b:
        with pytest.raises(BackendError) as e:
            b.map(1, [12345])
        assert e.value.errno == errno.EINVAL


def test_grant_limit_is_enforced_at_exactly_1024_pages(host):
    with SimBackend(1, host.dir) as b:
        held = [b.grant(2, 256) for _ in range(4)]
        assert host.accounting()[1]["granted"] == 1024
        with pytest.raises(GrantLimitError) as e:
            b.grant(2, 1)
        assert e.value.errno == errno.ENOSPC
        held.pop().close()
        held.append(b.grant(2, 1))
        for p in held:
            p.close()
        assert host.accounting()[1]["granted"] == 0


def test_event_channel_notifies_another_process(host):
    with SimBackend(1, host.dir) as b:
        ch = b.alloc_unbound(2)
        child = in_domain(host, 2, f"""
            import select
            ch = b.bind_interdomain(1, {ch.port})
            print("bound", flush=True)
            select.select([ch.fd], [], [], 10)
            ch.clear()
            ch.notify()
            print("got it", flush=True)
            sys.stdin.readline()
            ch.close(); b.close()
        """)
        assert child.stdout.readline().strip() == "bound"
        ch.notify()
        assert child.stdout.readline().strip() == "got it"
        assert select.select([ch.fd], [], [], 10)[0] == [ch.fd]
        ch.clear()
        assert select.select([ch.fd], [], [], 0)[0] == []
        child.stdin.write("\n")
        child.stdin.close()
        child.wait(10)
        child.stdout.close()
        ch.close()
    assert host.accounting()[1]["ports"] == 0


def test_binding_a_port_meant_for_another_domain_fails(host):
    with SimBackend(1, host.dir) as b1, SimBackend(3, host.dir) as b3:
        ch = b1.alloc_unbound(2)
        with pytest.raises(BackendError):
            b3.bind_interdomain(1, ch.port)
        ch.close()


def test_kill9_performs_unmap_notify_and_releases_everything(host):
    """A process that granted a page with an unmap notification dies: the byte is cleared,
    the peer's event channel fires, and the grant and port are released."""
    with SimBackend(2, host.dir) as b2:
        child = in_domain(host, 1, """
            ch = b.alloc_unbound(2)
            page = b.grant(2, 1, UnmapNotify(7, ch.port))
            page.buffer[7] = 1
            print(ch.port, page.refs[0], flush=True)
            time.sleep(60)
        """)
        port, ref = map(int, child.stdout.readline().split())
        ch = b2.bind_interdomain(1, port)
        page = b2.map(1, [ref])
        assert page.buffer[7] == 1
        child.kill()
        child.wait()
        child.stdout.close()
        child.stdin.close()
        assert select.select([ch.fd], [], [], 10)[0] == [ch.fd]  # signalled at once
        assert page.buffer[7] == 0
        page.close()
        ch.close()
    acct = host.accounting()
    assert acct[1] == {"granted": 0, "mapped": 0, "ports": 0, "connections": 0}


def test_no_simulated_host_gives_a_clear_error(tmp_path):
    with pytest.raises(BackendError) as e:
        SimBackend(1, tmp_path)
    assert "xsockd.sim.host" in str(e.value)


def test_a_port_and_grant_for_a_domain_that_does_not_exist_are_made_as_on_xen(host):
    # Xen (xen/common/event_channel.c, evtchn_alloc_unbound) looks up only the allocating
    # domain: remote_dom is stored as a number, and the default (dummy) XSM policy checks the
    # caller against the allocating domain only (with FLASK it would be EPERM).  A grant is an
    # entry the granting domain writes in its own table, domid included, never checked.  So
    # both succeed for domain 9, which does not exist; only a domain 9 created later may bind
    # the port and map the page.
    with SimBackend(1, host.dir) as b1:
        assert 9 not in host.accounting()
        evtchn = b1.alloc_unbound(9)
        pages = b1.grant(9, 1)
        pages.buffer[0] = 0x5A
        assert evtchn.port > 0 and len(pages.refs) == 1
        other = in_domain(host, 2, f"""
            try:
                b.bind_interdomain(1, {evtchn.port})
                print("bound")
            except OSError as e:
                print("refused", e.errno)
        """)
        assert other.stdout.read().split() == ["refused", str(errno.EINVAL)]
        assert other.wait(10) == 0
        other.stdout.close()
        other.stdin.close()
        host.create_domain(9)
        child = in_domain(host, 9, f"""
            e = b.bind_interdomain(1, {evtchn.port})
            m = b.map(1, {list(pages.refs)})
            print(m.buffer[0], flush=True)
            m.close(); e.close(); b.close()
        """)
        assert child.stdout.read().strip() == str(0x5A)
        assert child.wait(10) == 0
        child.stdout.close()
        child.stdin.close()
        pages.close()
        evtchn.close()
