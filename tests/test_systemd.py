"""xsockd installed from its Debian package, under a real systemd as PID 1.

One container per module (tests/systemd_container.py), a throw-away copy of this machine.  The
package is built once on the host with the README's ``./run deb`` and installed inside with
apt, following the README's "On a real host" lines: after ``systemctl enable --now xsockd``
the unit is skipped (no /dev/xen), and with the sim drop-in the package ships it runs as domain
1 of the simulated Xen host.  A second xsockd as simulated domain 2 (a test-only unit, the
package's /usr/bin/xsockd) offers an echo service (socat) and a socket-activated service that
reads the caller header.  The tests run in file order and share the container; each one first
brings about the state it needs; the last ones upgrade the package and purge it.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from systemd_container import ContainerError, SystemdContainer

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
ETC = "/etc/systemd/system"
# Where the checkout is inside the container, for the README's relative ./build/deb path.
CHECKOUT = "/root/xsockd"
MiB = 1 << 20

BUS = ("org.xsockd.Xsockd1", "/org/xsockd/Xsockd1", "org.xsockd.Xsockd1")
ALL_UNITS = ("xsockd", "xsockd-dom2", "xsockd-simhost")

DOM2_CONF = """\
[daemon]
rundir = "/run/xsock-dom2"
peers = [1]
default_service = "echo"
backend = "sim"
sim_dir = "/run/xsock-sim"

[services.echo]
socket = "/run/xsock-echo/echo.sock"

[services.hello]
socket = "/run/xsock-hello.sock"
allow = [1]
caller_header = true
"""

# Domain 2's side: an echo service, and a socket-activated one that answers with the header.
# Its files live in /etc/xsockd-test: the package's /etc/xsockd is the package's.
TEST_UNITS = {
    "xsock-echo.service": """\
[Unit]
Description=echo service offered by simulated domain 2 (test)

[Service]
RuntimeDirectory=xsock-echo
ExecStart=/usr/bin/socat UNIX-LISTEN:/run/xsock-echo/echo.sock,fork,mode=600 EXEC:cat
""",
    "xsockd-dom2.service": """\
[Unit]
Description=xsockd as simulated domain 2 (test)
Requires=xsockd-simhost.service xsock-echo.service xsock-hello.socket
After=xsockd-simhost.service xsock-echo.service xsock-hello.socket

[Service]
Type=notify
NotifyAccess=main
RuntimeDirectory=xsock-dom2
# Domain 2 shares the container's system bus with domain 1: only domain 1 serves D-Bus.
ExecStart=/usr/bin/xsockd --backend sim --domid 2 --config /etc/xsockd-test/dom2.conf --no-dbus
""",
    "xsock-hello.socket": """\
[Unit]
Description=socket-activated named service "hello" of simulated domain 2 (test)

[Socket]
ListenStream=/run/xsock-hello.sock
Accept=yes
""",
    "xsock-hello@.service": """\
[Unit]
Description=one connection to the "hello" service (test)

[Service]
ExecStart=/bin/sh /etc/xsockd-test/hello.sh
StandardInput=socket
StandardOutput=socket
StandardError=journal
""",
}
# The first line a caller_header service reads is the header; it answers got[HEADER], then echoes.
HELLO_SH = 'IFS= read -r header\nprintf "got[%s]\\n" "$header"\nexec cat\n'

# Read the simulated host's accounting and domain 1's XenStore nodes, from inside.
PROBE = """\
import json
from xsockd.sim.host import sim_accounting
from xsockd.xenstore_client import XenStoreClient

sim = "/run/xsock-sim"
def tree(xs, path):
    try:
        children = xs.directory(path)
    except OSError:
        return []
    return [path] + [n for c in children for n in tree(xs, f"{path}/{c}")]
xs = XenStoreClient(sim + "/dom0/xenstored.sock")
# Domain 1's whole tree (its offer to 2 among it); the request node at domain 2 is domain 2's.
nodes = tree(xs, "/local/domain/1/data/xsock")
xs.close()
print(json.dumps({"accounting": sim_accounting(sim), "nodes": nodes}))
"""

# What a package may leave behind, to compare before install and after purge: every path under
# /etc, /usr and systemd's state, and the state directories in /var/lib.  (Not the whole root:
# it is this live machine's, seen through the overlay, and other work changes it meanwhile.)
# Left out: the backups shadow's tools make of /etc/subuid and the like (the test's useradd).
SNAPSHOT = ("{ find /etc /usr /var/lib/systemd -xdev ! -regex '/etc/[^/]*-'; "
            "find /var/lib -mindepth 1 -maxdepth 1; } | sort")
BEFORE_INSTALL: list[str] = []   # SNAPSHOT's lines, taken before the package is installed


def dom1_conf(peers: tuple[int, ...] = (2,), remote: str = "") -> str:
    return (f'[daemon]\nrundir = "/run/xsock"\npeers = [{", ".join(map(str, peers))}]\n'
            f'backend = "sim"\nsim_dir = "/run/xsock-sim"\n{remote}')


NAMED = '\n[remote.2]\nservices = ["hello"]\n'


def readme_blocks() -> list[list[str]]:
    """Returns the command lines (comments stripped) of each sh block of "On a real host"."""
    text = README.read_text()
    section = text.split("## On a real host", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    return [[line.split("  #")[0].strip() for line in b.splitlines() if line.strip()]
            for b in blocks]


INSTALL, _RELOAD, SIM = readme_blocks()


# ---- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def deb() -> Path:
    """The package, built on the host by the README's first line."""
    assert INSTALL[0] == "./run deb", f"README's first line is {INSTALL[0]!r}"
    r = subprocess.run([str(ROOT / "run"), "deb"], cwd=ROOT, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, f"./run deb failed:\n{r.stdout}{r.stderr}"
    assert "root privileges" not in r.stderr, r.stderr  # lintian as nobody, or told it is meant
    path = Path(r.stdout.split()[-1])
    assert path.is_file() and path.name.startswith("xsockd_") and path.suffix == ".deb", r.stdout
    return path


@pytest.fixture(scope="module")
def c(tmp_path_factory, deb):
    if os.geteuid() != 0:
        pytest.fail("booting a systemd container needs root (sudo ./run test)")
    log = tmp_path_factory.mktemp("container") / "console.log"
    box = SystemdContainer(f"xsockd-test-{os.getpid()}", log=log)
    try:
        box.start()
        _install(box, deb)
        yield box
    finally:
        box.stop()
    left = box.leftovers()
    assert not left, f"processes of the container survived its stop: {left}"
    assert not Path(f"/run/systemd/nspawn/propagate/{box.name}").exists()


def put_deb(c: SystemdContainer, deb: Path) -> str:
    """Copies deb into the container's checkout; returns its path inside."""
    inside = f"{CHECKOUT}/build/deb/{deb.name}"
    c.run("/bin/sh", "-c", 'mkdir -p "$(dirname "$1")" && cat > "$1"', "sh", inside,
          input=deb.read_bytes(), text=False)
    return inside


def apt(c: SystemdContainer, line: str) -> subprocess.CompletedProcess:
    """Runs an apt command line in the container's checkout, as an administrator would."""
    # The timers of this machine's apt (apt-daily) may hold the lock for a moment.
    r = c.sh(f"cd {CHECKOUT} && {line} -o DPkg::Lock::Timeout=60", check=False, timeout=300)
    assert r.returncode == 0, f"{line}: {r.stdout[-3000:]}{r.stderr}" + journal(c)
    return r


def _install(c: SystemdContainer, deb: Path) -> None:
    """The README's lines up to the editor, then domain 2's test units, users and files."""
    # This machine may forbid starting services (a policy-rc.d for image builds): not a booted
    # systemd's business.
    c.run("rm", "-f", "/usr/sbin/policy-rc.d")
    BEFORE_INSTALL[:] = c.sh(SNAPSHOT, timeout=120).stdout.splitlines()
    put_deb(c, deb)
    apt(c, INSTALL[1])
    assert INSTALL[2].startswith("editor /etc/xsockd/xsockd.conf"), INSTALL
    c.install("/etc/xsockd/xsockd.conf", dom1_conf())
    for name, text in TEST_UNITS.items():
        c.install(f"{ETC}/{name}", text)
    c.install("/etc/xsockd-test/dom2.conf", DOM2_CONF)
    c.install("/etc/xsockd-test/hello.sh", HELLO_SH)
    # The package made group xsock; alice is in it, bob is not.
    c.sh("useradd -M -U -G xsock alice && useradd -M -U bob")
    c.run("systemctl", "daemon-reload")
    c.run("systemctl", "start", "xsockd-dom2.service")


def journal(c: SystemdContainer, *units: str) -> str:
    units = units or ALL_UNITS
    return f"\n--- journalctl -u {' -u '.join(units)} -n 30:\n{c.journal(*units)}"


def prop(c: SystemdContainer, unit: str, name: str) -> str:
    return c.run("systemctl", "show", "-P", name, unit).stdout.strip()


def wait_for(c: SystemdContainer, what: str, cond: Callable[[], Any], timeout: float = 10.0,
             units: tuple[str, ...] = ()) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}"
                                 + journal(c, *units))
        time.sleep(0.1)


def counts(status: str) -> tuple[int, int, int] | None:
    """Returns (channels, links up, links) from a StatusText, None if it does not say."""
    ch = re.search(r"\b(\d+) channels?\b", status)
    up = re.search(r"\b(\d+) of (\d+) links? up\b", status)
    return (int(ch[1]), int(up[1]), int(up[2])) if ch and up else None


def exists(c: SystemdContainer, path: str, kind: str = "-S") -> bool:
    return c.run("test", kind, path, check=False).returncode == 0


def ensure_active(c: SystemdContainer) -> None:
    if c.run("systemctl", "is-active", "xsockd", check=False).stdout.strip() != "active":
        r = c.run("systemctl", "start", "xsockd", check=False, timeout=60)
        assert r.returncode == 0, f"systemctl start xsockd failed: {r.stderr}" + journal(c)


def echo_through(c: SystemdContainer, path: str, size: int) -> tuple[str, str, int]:
    """Streams size random bytes through the echo at path, inside; returns both sha256, size."""
    r = c.sh(f"head -c {size} /dev/urandom > /tmp/in && "
             f"socat -b 65536 -t 60 UNIX-CONNECT:{path} - < /tmp/in > /tmp/out; "
             f"sha256sum < /tmp/in; sha256sum < /tmp/out; stat -c %s /tmp/out; rm -f /tmp/in "
             f"/tmp/out", timeout=120)
    sent, got, n = r.stdout.split("\n")[:3]
    return sent.split()[0], got.split()[0], int(n)


class HeldStream:
    """An application in the container holding one stream open: socat on stdin/stdout.

    socat exits 1 s after the stream ends (-t 1); only then does nsenter, which holds the same
    stdout, exit too, and the pipe show EOF.
    """

    def __init__(self, c: SystemdContainer, path: str = "/run/xsock/2.sock") -> None:
        assert c.pid is not None
        self.c = c
        self.proc = subprocess.Popen(["nsenter", "-t", str(c.pid), "-a", "socat", "-t", "1",
                                      "-", f"UNIX-CONNECT:{path}"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env={"PATH": "/usr/bin:/bin"})

    def echo(self, data: bytes, timeout: float = 10.0) -> bytes:
        """Writes data, returns what comes back within timeout (all of it, if it does)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()
        return self.read(len(data), timeout)

    def read(self, n: int, timeout: float = 10.0) -> bytes:
        """Returns up to n bytes, fewer on EOF or timeout."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        got = b""
        deadline = time.monotonic() + timeout
        while len(got) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                break
            chunk = os.read(fd, n - len(got))
            if not chunk:
                break
            got += chunk
        return got

    def at_eof(self, timeout: float = 10.0) -> bool:
        """Returns True if the stream ends within timeout (socat then exits, closing stdout)."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if select.select([fd], [], [], left)[0] and os.read(fd, 65536) == b"":
                return True
        return False

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f:
                f.close()


@pytest.fixture
def held(c):
    ensure_active(c)
    streams: list[HeldStream] = []

    def open_stream(path: str = "/run/xsock/2.sock") -> HeldStream:
        s = HeldStream(c, path)
        streams.append(s)
        return s

    yield open_stream
    for s in streams:
        s.close()


def probe(c: SystemdContainer) -> dict[str, Any]:
    # Debian's python3 with the package's xsockd.sim, as installed.
    return json.loads(c.run("/usr/bin/python3", "-c", PROBE).stdout)


def busctl(c: SystemdContainer, method: str, *args: str, user: str | None = None,
           check: bool = False) -> subprocess.CompletedProcess:
    argv = ["busctl", "--system", "--json=short", "call", *BUS, method, *args]
    if user:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *argv]
    return c.run(*argv, check=check, timeout=30)


def denied(r: subprocess.CompletedProcess) -> bool:
    """Returns True if a busctl call failed with an access-denied error (bus or daemon)."""
    return r.returncode != 0 and "access denied" in (r.stderr + r.stdout).lower()


def unvariant(value: Any) -> Any:
    """busctl --json wraps each variant as {"type": .., "data": ..}: returns the plain value."""
    if isinstance(value, dict) and set(value) == {"type", "data"}:
        return unvariant(value["data"])
    if isinstance(value, dict):
        return {k: unvariant(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unvariant(v) for v in value]
    return value


def channels_over_busctl(c: SystemdContainer, user: str | None = None) -> list[dict[str, Any]]:
    r = busctl(c, "ListChannels", user=user)
    assert r.returncode == 0, f"busctl ListChannels failed: {r.stderr}" + journal(c, "xsockd")
    return unvariant(json.loads(r.stdout)["data"][0])


def peer_of(channel: dict[str, Any]) -> Any:
    for key in ("peer", "peer_domid", "domid", "PeerDomid", "Peer"):
        if key in channel:
            return channel[key]
    return None


def id_of(channel: dict[str, Any]) -> int:
    for key in ("id", "Id", "ID", "channel", "channel_id"):
        if key in channel:
            return int(channel[key])
    raise AssertionError(f"no id in the channel record {channel}")


def require_dbus(c: SystemdContainer) -> None:
    r = c.run("busctl", "--system", "status", BUS[0], check=False)
    assert r.returncode == 0, f"{BUS[0]} is not on the system bus: {r.stderr}" \
        + journal(c, "xsockd", "dbus")


# ---- the tests, in the order they run ---------------------------------------------------------


def test_package_installed_what_it_should(c, deb):
    r = c.run("dpkg-query", "-W", "-f", "${Status} ${Version}", "xsockd")
    assert r.stdout == f"install ok installed {deb.name.split('_')[1]}", r.stdout
    r = c.sh("getent group xsock; ls /usr/share/dbus-1/system.d/org.xsockd.Xsockd1.conf "
             "/usr/lib/sysusers.d/xsockd.conf /usr/share/bash-completion/completions/xsockctl; "
             "dpkg-query -W -f '${Conffiles}' xsockd; echo; systemctl is-enabled xsockd; "
             "man -w xsockd.8 xsockctl.1 xsockd.conf.5 xsockd-simhost.8", check=False)
    for want in ("xsock:x:", "org.xsockd.Xsockd1.conf", "/etc/xsockd/xsockd.conf ",
                 "\ndisabled\n", "man8/xsockd.8.gz", "man1/xsockctl.1.gz",
                 "man5/xsockd.conf.5.gz", "man8/xsockd-simhost.8.gz"):
        assert want in r.stdout, f"{want!r} not in:\n{r.stdout}{r.stderr}"
    # The package's own Python: Debian's interpreter, nothing from this checkout or a venv.
    r = c.run("/usr/bin/python3", "-c", "import xsockd; print(xsockd.__file__)")
    assert r.stdout.strip() == "/usr/lib/python3/dist-packages/xsockd/__init__.py", r.stdout


def test_enabled_without_xen_the_unit_is_skipped_not_failed(c):
    # The README's next line, on this machine without /dev/xen and before the sim drop-in.
    line = INSTALL[3]
    assert line == "systemctl enable --now xsockd", INSTALL
    r = c.sh(line, check=False, timeout=60)
    assert r.returncode == 0, f"{line}: {r.stdout}{r.stderr}" + journal(c, "xsockd")
    assert c.run("systemctl", "is-enabled", "xsockd").stdout.strip() == "enabled"
    assert prop(c, "xsockd", "ConditionResult") == "no"
    assert prop(c, "xsockd", "ActiveState") == "inactive" and \
        prop(c, "xsockd", "Result") == "success", journal(c, "xsockd")
    assert c.run("systemctl", "is-failed", "xsockd", check=False).returncode != 0


def test_units_verify_inside_the_container(c):
    # The shipped units as installed, with the sim drop-in as the README puts it there.
    c.sh(" && ".join(SIM[:-1]))
    r = c.run("systemd-analyze", "verify", "--man=no", "xsockd.service",
              "xsockd-simhost.service", *TEST_UNITS, check=False)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", \
        f"systemd-analyze verify in the container:\n{r.stdout}{r.stderr}"


def test_start_returns_once_the_socket_exists(c):
    assert prop(c, "xsockd", "Type") == "notify"
    # The README's sim block; then in one shell: nothing may create the socket between the
    # (re)start returning and the check.
    assert SIM[-1] == "systemctl daemon-reload && systemctl restart xsockd", SIM
    r = c.sh(f"{' && '.join(SIM)}; echo start=$?; test -S /run/xsock/2.sock && echo socket; "
             "systemctl is-active xsockd", check=False, timeout=60)
    assert r.stdout.split() == ["start=0", "socket", "active"], \
        f"after {SIM}: {r.stdout}{r.stderr}" + journal(c)
    assert prop(c, "xsockd", "ExecStart").startswith("{ path=/usr/bin/xsockd ;"), \
        prop(c, "xsockd", "ExecStart")
    assert prop(c, "xsockd-simhost", "ActiveState") == "active"
    status = prop(c, "xsockd", "StatusText")
    assert counts(status) is not None, f"StatusText={status!r}" + journal(c, "xsockd")


def test_stream_32_mib_through_the_socket_arrives_intact(c):
    ensure_active(c)
    sent, got, n = echo_through(c, "/run/xsock/2.sock", 32 * MiB)
    assert n == 32 * MiB and sent == got, \
        f"{n} bytes came back, sha256 {got} (sent {sent})" + journal(c)


def test_status_text_counts_an_open_channel(c, held):
    s = held()
    assert s.echo(b"status\n") == b"status\n", journal(c)
    # STATUS= is refreshed every 5 s.
    wait_for(c, "StatusText with one channel and one link up",
             lambda: counts(prop(c, "xsockd", "StatusText")) == (1, 1, 1),
             timeout=12, units=("xsockd",))


def test_journal_holds_structured_fields(c):
    ensure_active(c)
    sent, got, n = echo_through(c, "/run/xsock/2.sock", MiB)
    assert sent == got and n == MiB

    def records() -> list[dict[str, Any]]:
        out = c.run("journalctl", "-u", "xsockd", "-o", "json", "--no-pager").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def closed_channel() -> list[dict[str, Any]]:
        # The channel just used closed with 1 MiB each way (one info record per channel).
        return [r for r in records() if r.get("XSOCK_BYTES") == str(2 * MiB)]

    found = wait_for(c, "a journal record with XSOCK_BYTES=2097152", closed_channel, timeout=5,
                     units=("xsockd",))
    rec = found[-1]
    assert rec.get("XSOCK_PEER") == "2" and rec.get("XSOCK_CHANNEL", "").isdigit(), rec
    assert rec.get("XSOCK_SERVICE") == "(default)" and rec.get("PRIORITY") == "6", rec
    assert rec.get("XSOCK_BYTES_IN") == rec.get("XSOCK_BYTES_OUT") == str(MiB), rec
    assert rec.get("SYSLOG_IDENTIFIER") == "xsockd" and rec.get("_SYSTEMD_UNIT") == \
        "xsockd.service", rec
    # Info-level records (what a production journal holds) carry the peer too.
    assert any(r.get("XSOCK_PEER") == "2" and r.get("PRIORITY") == "6"
               and "link with domain 2 up" in r.get("MESSAGE", "") for r in records()), \
        "no info record 'link with domain 2 up' with XSOCK_PEER=2" + journal(c, "xsockd")


def test_reload_adds_a_peer_and_keeps_an_open_stream(c, held):
    c.install("/etc/xsockd/xsockd.conf", dom1_conf())
    c.run("systemctl", "reload", "xsockd")
    s = held()
    assert s.echo(b"before reload\n") == b"before reload\n", journal(c)
    pid = prop(c, "xsockd", "MainPID")
    wait_for(c, "no /run/xsock/3.sock with peers = [2]",
             lambda: not exists(c, "/run/xsock/3.sock"), units=("xsockd",))
    c.install("/etc/xsockd/xsockd.conf", dom1_conf(peers=(2, 3)))
    c.run("systemctl", "reload", "xsockd")
    wait_for(c, "/run/xsock/3.sock after reload", lambda: exists(c, "/run/xsock/3.sock"),
             units=("xsockd",))
    wait_for(c, "'peer 3 added' in the journal",
             lambda: "peer 3 added" in c.journal("xsockd", lines=50), units=("xsockd",))
    assert s.echo(b"after reload\n") == b"after reload\n", \
        "the stream opened before the reload stopped echoing" + journal(c)
    assert prop(c, "xsockd", "MainPID") == pid and prop(c, "xsockd", "ActiveState") == "active"


def test_reload_with_a_broken_file_is_refused(c, held):
    c.install("/etc/xsockd/xsockd.conf", dom1_conf(peers=(2, 3)))
    c.run("systemctl", "reload", "xsockd")
    wait_for(c, "/run/xsock/3.sock", lambda: exists(c, "/run/xsock/3.sock"), units=("xsockd",))
    s = held()
    assert s.echo(b"x\n") == b"x\n", journal(c)
    pid = prop(c, "xsockd", "MainPID")
    c.install("/etc/xsockd/xsockd.conf", "[daemon]\npeers = [2, \n")  # a TOML syntax error
    try:
        c.run("systemctl", "reload", "xsockd")
        wait_for(c, "'reload refused' in the journal",
                 lambda: "reload refused" in c.journal("xsockd", lines=50), units=("xsockd",))
        time.sleep(0.3)  # whatever a wrong reload would do, give it the time to do it
        assert exists(c, "/run/xsock/2.sock") and exists(c, "/run/xsock/3.sock"), \
            "a refused reload removed sockets" + journal(c, "xsockd")
        assert prop(c, "xsockd", "ActiveState") == "active" and \
            prop(c, "xsockd", "MainPID") == pid, journal(c, "xsockd")
        assert s.echo(b"still\n") == b"still\n", journal(c)
    finally:
        c.install("/etc/xsockd/xsockd.conf", dom1_conf(peers=(2, 3)))


def test_xsockctl_and_busctl_list_an_open_channel(c, held):
    require_dbus(c)
    s = held()
    assert s.echo(b"listed\n") == b"listed\n", journal(c)
    chans = channels_over_busctl(c)
    assert any(peer_of(ch) == 2 for ch in chans), f"ListChannels: {chans}"
    r = c.run("/usr/bin/xsockctl", "--system", "list", "--json", check=False)
    assert r.returncode == 0, f"xsockctl list --json: {r.stdout}{r.stderr}" + journal(c, "xsockd")
    listed = json.loads(r.stdout)
    rows = listed if isinstance(listed, list) else listed.get("channels", [])
    assert any(peer_of(row) == 2 for row in rows), f"xsockctl list --json: {r.stdout}"
    ids = {id_of(ch) for ch in chans}
    table = c.run("/usr/bin/xsockctl", "list").stdout
    assert any(re.search(rf"^\s*{i}\s", table, re.M) for i in ids), f"xsockctl list:\n{table}"


def test_bus_policy_members_list_others_do_not_only_root_closes(c, held):
    require_dbus(c)
    s = held()
    assert s.echo(b"policy\n") == b"policy\n", journal(c)
    chans = channels_over_busctl(c)
    ours = [ch for ch in chans if peer_of(ch) == 2]
    assert ours, f"ListChannels: {chans}"
    cid = str(max(id_of(ch) for ch in ours))  # the newest: this test's stream

    assert channels_over_busctl(c, user="alice"), "a member of group xsock could not list"
    r = busctl(c, "CloseChannel", "u", cid, user="alice")
    assert denied(r), \
        f"a member of group xsock closed a channel: {r.stdout}{r.stderr}"
    r = busctl(c, "ListChannels", user="bob")
    assert denied(r), \
        f"a user outside group xsock listed channels: {r.stdout}{r.stderr}"
    r = busctl(c, "CloseChannel", "u", cid, user="bob")
    assert denied(r), f"a user outside group xsock closed a channel: {r.stdout}{r.stderr}"
    assert s.echo(b"alive\n") == b"alive\n", "the stream died although nobody could close it"

    def xsockctl(user: str, *args: str) -> subprocess.CompletedProcess:
        return c.run("setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups",
                     "/usr/bin/xsockctl", *args, check=False)

    r = xsockctl("alice", "list")
    assert r.returncode == 0 and re.search(rf"^\s*{cid}\s", r.stdout, re.M), \
        f"xsockctl list as a group member: rc {r.returncode}\n{r.stdout}{r.stderr}"
    for user, args in (("alice", ("close", cid)), ("bob", ("list",))):
        r = xsockctl(user, *args)
        assert r.returncode != 0 and "denied" in r.stderr.lower() \
            and "Traceback" not in r.stderr, \
            f"xsockctl {' '.join(args)} as {user}: rc {r.returncode}\n{r.stdout}{r.stderr}"

    r = busctl(c, "CloseChannel", "u", cid)
    assert r.returncode == 0, f"root could not close channel {cid}: {r.stderr}" \
        + journal(c, "xsockd")
    assert s.at_eof(), "the closed channel's stream did not end" + journal(c, "xsockd")
    assert int(cid) not in {id_of(ch) for ch in channels_over_busctl(c)}


def test_named_service_appears_on_reload(c):
    ensure_active(c)
    c.install("/etc/xsockd/xsockd.conf", dom1_conf(peers=(2, 3), remote=NAMED))
    r = c.run("/usr/bin/xsockd", "--check-config", "/etc/xsockd/xsockd.conf", check=False)
    assert r.returncode == 0, \
        f"[remote.2] services = [\"hello\"] is not accepted yet: {r.stdout}{r.stderr}"
    c.run("systemctl", "reload", "xsockd")
    wait_for(c, "/run/xsock/2/hello.sock after reload",
             lambda: exists(c, "/run/xsock/2/hello.sock"), units=("xsockd",))


def test_socket_activated_named_service_learns_the_caller(c):
    ensure_active(c)
    if not exists(c, "/run/xsock/2/hello.sock"):
        c.install("/etc/xsockd/xsockd.conf", dom1_conf(peers=(2, 3), remote=NAMED))
        c.run("systemctl", "restart", "xsockd", check=False)
        assert exists(c, "/run/xsock/2/hello.sock"), \
            "no /run/xsock/2/hello.sock with [remote.2] services = [\"hello\"]" + journal(c)
    assert prop(c, "xsock-hello.socket", "ActiveState") == "active"
    accepted = int(prop(c, "xsock-hello.socket", "NAccepted"))
    assert accepted == 0, f"{accepted} connections to the hello socket before the first one"
    r = c.sh("printf 'ping\\n' | socat -t 10 - UNIX-CONNECT:/run/xsock/2/hello.sock",
             check=False, timeout=30)
    want = "got[XSOCK/1 domid=1 service=hello]\nping\n"
    assert r.stdout == want, f"through /run/xsock/2/hello.sock: {r.stdout!r}, want {want!r} " \
        f"{r.stderr}" + journal(c, "xsockd", "xsockd-dom2", "xsock-hello.socket")
    assert int(prop(c, "xsock-hello.socket", "NAccepted")) == 1, \
        "the socket unit did not start the service" + journal(c, "xsock-hello.socket")


def test_watchdog_kills_a_hung_daemon_and_systemd_restarts_it(c):
    c.install(f"{ETC}/xsockd.service.d/zz-watchdog.conf", "[Service]\nWatchdogSec=3\n")
    c.run("systemctl", "daemon-reload")
    c.run("systemctl", "restart", "xsockd")
    assert prop(c, "xsockd", "WatchdogUSec") == "3s"
    pid, restarts = prop(c, "xsockd", "MainPID"), int(prop(c, "xsockd", "NRestarts"))
    c.run("kill", "-STOP", pid)

    def restarted() -> bool:
        return (int(prop(c, "xsockd", "NRestarts")) > restarts
                and prop(c, "xsockd", "MainPID") not in ("0", pid)
                and prop(c, "xsockd", "ActiveState") == "active")

    wait_for(c, "the watchdog to kill and systemd to restart xsockd", restarted, timeout=20,
             units=("xsockd",))
    assert "Watchdog timeout" in c.journal("xsockd", lines=50), journal(c, "xsockd")
    assert exists(c, "/run/xsock/2.sock"), journal(c, "xsockd")
    sent, got, n = echo_through(c, "/run/xsock/2.sock", MiB)
    assert sent == got and n == MiB, "no echo after the restart" + journal(c)


def test_stop_releases_every_grant_port_and_node(c, held):
    s = held()
    assert s.echo(b"held\n") == b"held\n", journal(c)
    before = probe(c)
    assert before["accounting"]["1"]["granted"] > 0 and before["accounting"]["1"]["ports"] > 0 \
        and before["nodes"], f"no link to release: {before}"
    start = time.monotonic()
    r = c.run("systemctl", "stop", "xsockd", check=False, timeout=60)
    took = time.monotonic() - start
    assert r.returncode == 0, r.stderr + journal(c, "xsockd")
    assert prop(c, "xsockd", "Result") == "success" and \
        prop(c, "xsockd", "ExecMainStatus") == "0", \
        "xsockd did not exit cleanly on stop" + journal(c, "xsockd")
    assert s.at_eof(), "the open stream did not end when xsockd stopped"
    after = probe(c)
    left = {k: v for k, v in after["accounting"]["1"].items() if v}
    assert not left and not after["nodes"], \
        f"domain 1 still holds {left}, XenStore nodes {after['nodes']}" + journal(c)
    assert not exists(c, "/run/xsock", "-e"), "RuntimeDirectory /run/xsock survived the stop"
    # The stream was idle, every byte echoed and read: nothing to drain, so the graceful stop
    # must not wait for [daemon] stop_timeout (10 s by default).
    assert took < 5, f"systemctl stop took {took:.1f} s with one idle stream (nothing in " \
        f"flight): the drain waited for stop_timeout" + journal(c, "xsockd")


def test_a_failing_start_shows_the_journal_of_the_failed_unit(c):
    # What a failure inside says must be read before the container goes: the error carries it.
    c.install(f"{ETC}/xsock-fails.service",
              "[Service]\nType=oneshot\nExecStart=/bin/sh -c 'echo the-reason-it-failed; exit 3'\n")
    c.run("systemctl", "daemon-reload")
    try:
        with pytest.raises(ContainerError) as e:
            c.run("systemctl", "start", "xsock-fails")
        assert "failed units: xsock-fails.service" in str(e.value) and \
            "the-reason-it-failed" in str(e.value), str(e.value)
    finally:
        c.remove(f"{ETC}/xsock-fails.service")
        c.run("systemctl", "reset-failed", "xsock-fails", check=False)
        c.run("systemctl", "daemon-reload")


def test_cleanup_checks_work(c):
    # The fixture's teardown relies on leftovers(): while running, it must see the container.
    left = c.leftovers()
    assert c.proc is not None and c.proc.pid in left and c.pid in left, left


def newer_build(deb: Path, tmp: Path) -> Path:
    """Builds the package again from a copy of this tree with a higher xsockd.__version__.

    The copy has no .git: ./run deb takes the tree as a release's source would come.
    """
    src = tmp / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".cache", "build", "__pycache__", "*.egg-info", "*.so", ".*_cache",
        ".hypothesis"))
    version = deb.name.split("_")[1]
    init = src / "xsockd" / "__init__.py"
    text = init.read_text()
    assert f'\n__version__ = "{version}"\n' in text, text
    init.write_text(text.replace(f'__version__ = "{version}"', f'__version__ = "{version}+1"'))
    r = subprocess.run([str(src / "run"), "deb"], cwd=src, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, f"./run deb of the newer version failed:\n{r.stdout}{r.stderr}"
    assert "root privileges" not in r.stderr, r.stderr  # a tree nobody cannot read: --allow-root
    out = Path(r.stdout.split()[-1])
    assert out.name == deb.name.replace(f"_{version}_", f"_{version}+1_"), out
    return out


def test_upgrade_keeps_the_edited_configuration_and_restarts_the_daemon(c, deb, tmp_path):
    edited = dom1_conf(peers=(2, 3), remote=NAMED) + "# edited by the administrator\n"
    c.install("/etc/xsockd/xsockd.conf", edited)
    c.run("systemctl", "restart", "xsockd")
    pid = prop(c, "xsockd", "MainPID")
    newer = newer_build(deb, tmp_path)
    put_deb(c, newer)
    apt(c, f"apt-get install -y ./build/deb/{newer.name}")
    version = c.run("dpkg-query", "-W", "-f", "${Version}", "xsockd").stdout
    assert version == newer.name.split("_")[1], version
    assert c.run("cat", "/etc/xsockd/xsockd.conf").stdout == edited, \
        "the upgrade changed the edited /etc/xsockd/xsockd.conf"
    assert c.run("ls", "-A", "/etc/xsockd").stdout.split() == ["xsockd.conf"], \
        "the upgrade left a .dpkg-* file beside the configuration"
    wait_for(c, "xsockd restarted by the upgrade",
             lambda: prop(c, "xsockd", "MainPID") not in ("0", pid)
             and prop(c, "xsockd", "ActiveState") == "active", units=("xsockd",))
    wait_for(c, "/run/xsock/2/hello.sock (the edited configuration in use)",
             lambda: exists(c, "/run/xsock/2/hello.sock"), units=("xsockd",))
    # The daemon now running is the new build's.
    r = c.run("busctl", "--system", "get-property", *BUS, "Version", check=False)
    assert r.stdout.strip() == f's "{version}"', \
        f"Version after the upgrade: {r.stdout}{r.stderr}" + journal(c, "xsockd")
    sent, got, n = echo_through(c, "/run/xsock/2.sock", MiB)
    assert sent == got and n == MiB, "no echo after the upgrade" + journal(c)


def test_purge_leaves_no_file_unit_group_or_socket(c):
    # What the tests added is theirs to take away: domain 2's units and files, the drop-ins.
    c.run("systemctl", "stop", "xsockd-dom2", "xsock-echo", "xsock-hello.socket")
    c.sh(f"rm -rf {ETC}/xsockd.service.d /etc/xsockd-test /run/xsock-hello.sock "
         + " ".join(f"{ETC}/{u}" for u in TEST_UNITS))
    c.run("systemctl", "daemon-reload")
    apt(c, "apt-get purge -y xsockd")
    after = c.sh(SNAPSHOT, timeout=120).stdout.splitlines()
    added = sorted(set(after) - set(BEFORE_INSTALL))
    removed = sorted(set(BEFORE_INSTALL) - set(after))
    assert not added and not removed, f"after purge, new: {added}, gone: {removed}"
    assert c.run("getent", "group", "xsock", check=False).returncode == 2, "group xsock is left"
    # (list-unit-files exits 1 when nothing matches.)
    units = c.run("systemctl", "list-units", "--all", "--plain", "--no-legend", "xsockd*",
                  check=False).stdout
    files = c.run("systemctl", "list-unit-files", "--no-legend", "xsockd*", check=False).stdout
    assert not units.strip() and not files.strip(), f"units left: {units}{files}"
    r = c.sh("find /run -name '*xsock*'; ss -xlH | grep xsock", check=False)
    assert not r.stdout.strip(), f"left in /run or listening: {r.stdout}"
