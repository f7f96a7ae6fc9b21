"""The D-Bus face and xsockctl, against real daemons on a private dbus-daemon.

Each bus is a real ``dbus-daemon`` started by a fixture (ready when it prints its pid) and
killed at the end; the daemons are real xsockd processes on the simulated host.  The test talks
to them with pydbus, with ``busctl`` and with the installed ``xsockctl`` command.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import pydbus
import pytest
from gi.repository import Gio, GLib
from privatebus import PrivateBus
from simworld import SimWorld, stream_hashes

from tests.test_vchan_sim import CLIENT, SERVER, SERVER_PATH, echo_hashes, published, vchan_connect
from xsockd import __version__
from xsockd.constants import DBUS_INTERFACE, DBUS_NAME, DBUS_PATH
from xsockd.dbus_face import (
    CHANNEL_TYPES,
    INTERFACE_XML,
    STATISTICS_TYPES,
    VCHAN_TYPES,
    XsockdObject,
)
from xsockd.errors import DBUS_ERRORS
from xsockd.ring import link_pages

ROOT = Path(__file__).parent.parent
XSOCKCTL = str(Path(sys.executable).with_name("xsockctl"))
POLICY = ROOT / "conf" / "org.xsockd.Xsockd1.conf"
NOBODY = pwd.getpwnam("nobody")

# Like the system bus's own configuration: nobody may own names or call methods unless a
# policy file punches a hole (it is included below).
SYSTEM_LIKE_CONF = """<busconfig>
  <listen>unix:tmpdir=/tmp</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
  </policy>
  <include>{policy}</include>
</busconfig>
"""

# A bus anyone may use for anything: only the daemon's own check stands in the way.
OPEN_CONF = """<busconfig>
  <listen>unix:tmpdir=/tmp</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
  </policy>
</busconfig>
"""


@pytest.fixture
def bus():
    b = PrivateBus()
    yield b
    b.close()


@pytest.fixture
def world(tmp_path, bus):
    w = SimWorld(tmp_path, peers={1: [2], 2: [1]}, dbus={1: bus.address})
    w.start(1, 2)
    yield w
    w.close()
    assert "Traceback" not in w.daemons[1].log()  # no handler may have failed


@pytest.fixture
def proxy(bus, world):
    with pydbus.connect(bus.address) as b:
        yield b.get(DBUS_NAME, DBUS_PATH)


# What xsockctl imports from outside the system's Python: printed as {top-level name: path}.
_IMPORTED_FROM = """
import json, os, sys
before = set(sys.modules)
import xsockd.cli, xsockd.dbus_face
ours = (os.path.realpath(sys.prefix), os.path.realpath(sys.argv[1]))
found = {}
for name in set(sys.modules) - before:
    top = sys.modules.get(name.split(".")[0])
    f = os.path.realpath(getattr(top, "__file__", None) or "/")
    if f.startswith(ours):
        found[top.__name__] = os.path.dirname(f) if f.endswith("__init__.py") else f
print(json.dumps(found))
"""

ENTRY = """import sys
sys.path.insert(0, {dir!r})
from xsockd.cli import main
sys.exit(main())
"""


@pytest.fixture(scope="session")
def foreign_xsockctl():
    """Returns a command that runs xsockctl for another user (nobody) wherever we are.

    The checkout and its .venv may be where that user cannot go (root's home is 0700): the
    packages xsockctl imports from them are copied into a world-readable directory under
    /tmp and run with the system's Python, whose own packages (gi) the venv uses too.
    """
    found = json.loads(subprocess.run([sys.executable, "-c", _IMPORTED_FROM, str(ROOT)],
                                      capture_output=True, text=True, check=True,
                                      timeout=60).stdout)
    assert "xsockd" in found, found  # pydbus too, unless the system's (python3-pydbus)
    home = Path(tempfile.mkdtemp(prefix="xsockctl-", dir="/tmp"))
    try:
        for name, path in found.items():
            if os.path.isdir(path):
                shutil.copytree(path, home / name,
                                ignore=shutil.ignore_patterns("__pycache__", "*.c", "*.h"))
            else:
                shutil.copy2(path, home / os.path.basename(path))
        (home / "xsockctl").write_text(ENTRY.format(dir=str(home)))
        for d, _, files in os.walk(home):
            os.chmod(d, 0o755)
            for f in files:
                os.chmod(os.path.join(d, f), 0o644)
        command = (os.path.realpath(sys.executable), "-B", str(home / "xsockctl"))
        # The copy alone (no venv, no checkout on the path) has all xsockctl imports.
        check = subprocess.run([command[0], "-B", "-c", "import sys; sys.path.insert(0, "
                                f"{str(home)!r}); import xsockd.cli, xsockd.dbus_face; "
                                "print(xsockd.__file__)"], capture_output=True, text=True,
                               timeout=60, cwd="/")
        assert check.stdout.startswith(str(home)), check.stderr
        yield command
    finally:
        shutil.rmtree(home, ignore_errors=True)


def xsockctl(address: str, *args: str, user: pwd.struct_passwd | None = None,
             groups: str | None = None, command: Sequence[str] = (XSOCKCTL,)
             ) -> subprocess.CompletedProcess[str]:
    """Runs xsockctl on the bus at ``address``; as ``user`` (root only) with ``command``, the
    foreign_xsockctl that user can run."""
    cmd = [*command, "--address", address, *args]
    if user is not None:
        assert tuple(command) != (XSOCKCTL,), "as another user: command=foreign_xsockctl"
        cmd = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}",
               f"--groups={groups}" if groups else "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd="/")


def busctl(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["busctl", f"--address={address}", *args], capture_output=True,
                          text=True, timeout=60)


def pump(cond, timeout: float = 10.0):
    """Runs the default GLib main context (where pydbus delivers signals) until cond()."""
    ctx = GLib.MainContext.default()
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for a D-Bus signal")
        ctx.iteration(False) or time.sleep(0.01)
    return cond()


def open_echo(world: SimWorld, data: bytes = b"x" * 1000) -> socket.socket:
    """Returns a channel through domain 1 to domain 2's echo, with ``data`` echoed once."""
    s = world.connect(1, 2)
    s.sendall(data)
    got = b""
    while len(got) < len(data):
        got += s.recv(65536)
    assert got == data
    return s


def remote_error(e: GLib.Error) -> str | None:
    return Gio.DBusError.get_remote_error(e)


# ---- the interface's shape ------------------------------------------------------------------

def test_introspection_xml_matches_the_object_and_the_tables():
    iface = ET.fromstring(INTERFACE_XML).find(f"interface[@name='{DBUS_INTERFACE}']")
    assert iface is not None
    methods = {m.get("name") for m in iface.findall("method")}
    signals = {s.get("name") for s in iface.findall("signal")}
    props = {p.get("name"): p.get("type") for p in iface.findall("property")}
    assert methods == {"ListChannels", "ListVchans", "GetChannel", "CloseChannel",
                       "GetStatistics"}
    assert signals == {"ChannelOpened", "ChannelClosed"}
    assert props == {"Domid": "u", "Backend": "s", "Version": "s", "ChannelCount": "u"}
    for name in methods | signals | set(props):
        assert hasattr(XsockdObject, name), name
    # Every channel field and error name is documented in the XML's comment.
    for key, sig in (*CHANNEL_TYPES.items(), *VCHAN_TYPES.items()):
        assert re.search(rf"^ +{key} +{re.escape(sig)} ", INTERFACE_XML, re.M), key
    for name in DBUS_ERRORS.values():
        assert name.startswith(DBUS_INTERFACE + ".Error.") and name in INTERFACE_XML
    assert len(set(DBUS_ERRORS.values())) == len(DBUS_ERRORS)


def test_policy_file_names_our_bus_name_and_group():
    root = ET.parse(POLICY).getroot()
    policies = {(p.get("user"), p.get("group"), p.get("context")): p
                for p in root.findall("policy")}
    assert ("root", None, None) in policies and (None, "xsock", None) in policies
    members = {a.get("send_member") for a in policies[(None, "xsock", None)]}
    assert members == {"ListChannels", "ListVchans", "GetChannel", "GetStatistics", "Get",
                       "GetAll", "Introspect"}
    default = policies[(None, None, "default")]
    assert {(d.tag, d.get("own"), d.get("send_destination")) for d in default} == {
        ("deny", DBUS_NAME, None), ("deny", None, DBUS_NAME)}


# ---- reading over the bus --------------------------------------------------------------------

def test_list_and_get_show_the_open_channel(world, proxy):
    t0 = time.time()
    with open_echo(world, b"y" * 4000):
        channels = pump(lambda: [c for c in proxy.ListChannels() if c["bytes_in"] == 4000])
        assert len(channels) == 1
        ch = channels[0]
        assert set(ch) == set(CHANNEL_TYPES)
        assert (ch["peer"], ch["service"], ch["direction"], ch["state"]) == (2, "", "out", "open")
        assert ch["bytes_out"] == 4000
        assert ch["ring_size_rx"] == ch["ring_size_tx"] == 256 * 1024
        assert ch["link_role"] == "initiator" and ch["event_channel"] > 0
        # We granted the link's pages: as many refs as pages, all distinct.
        assert len(ch["grant_refs"]) == len(set(ch["grant_refs"])) == link_pages(256 * 1024)
        assert world.accounting(1)["granted"] == len(ch["grant_refs"])
        assert t0 - 1 <= ch["created"] <= time.time()
        assert proxy.GetChannel(ch["id"]) == ch
        assert proxy.ChannelCount == 1


def test_busctl_and_xsockctl_see_the_same_channel(world, bus):
    with open_echo(world, b"z" * 777):
        r = busctl(bus.address, "--json=short", "call", DBUS_NAME, DBUS_PATH, DBUS_INTERFACE,
                   "ListChannels")
        assert r.returncode == 0, r.stderr
        reply = json.loads(r.stdout)
        assert reply["type"] == "aa{sv}"
        (ch,) = reply["data"][0]
        assert ch["peer"] == {"type": "u", "data": 2}
        assert ch["bytes_in"]["type"] == "t" and ch["bytes_in"]["data"] == 777
        ident = ch["id"]["data"]

        r = xsockctl(bus.address, "list")
        assert r.returncode == 0, r.stderr
        header, row = r.stdout.splitlines()
        assert header.split()[:5] == ["ID", "PEER", "DIR", "SERVICE", "STATE"]
        assert row.split()[:7] == [str(ident), "2", "out", "(default)", "open", "777", "777"]

        r = xsockctl(bus.address, "list", "--json")
        assert r.returncode == 0 and json.loads(r.stdout) == {
            "channels": [json.loads(r.stdout)["channels"][0]], "vchans": []}
        assert json.loads(r.stdout)["channels"][0]["id"] == ident

        r = xsockctl(bus.address, "show", str(ident))
        assert r.returncode == 0, r.stderr
        fields = dict(line.split(":", 1) for line in r.stdout.splitlines())
        assert fields["peer"].strip() == "2" and fields["link_role"].strip() == "initiator"
        assert fields["grant_refs"].strip().endswith(f"({link_pages(256 * 1024)})")
        shown = json.loads(xsockctl(bus.address, "show", str(ident), "--json").stdout)
        assert shown["grant_refs"] == ch["grant_refs"]["data"]



def test_global_options_work_before_or_after_the_command(world, bus):
    with open_echo(world, b"o" * 300):
        outputs = []
        for argv in (["--json", "--address", bus.address, "list"],
                     ["list", "--json", "--address", bus.address],
                     ["--address", bus.address, "list", "--json"],
                     ["--json", "list", "--address", bus.address]):
            r = subprocess.run([XSOCKCTL, *argv], capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, (argv, r.stderr)
            outputs.append([(c["id"], c["bytes_in"]) for c in json.loads(r.stdout)["channels"]])
        assert outputs[0] == [(outputs[0][0][0], 300)] and all(o == outputs[0] for o in outputs)
        ident = str(outputs[0][0][0])
        for argv in (["--json", "show", ident], ["show", ident, "--json"]):
            r = xsockctl(bus.address, *argv)
            assert r.returncode == 0 and json.loads(r.stdout)["bytes_out"] == 300, r.stderr

def test_statistics_and_properties(world, proxy, bus):
    with open_echo(world, b"s" * 5000):
        stats = pump(lambda: (s := proxy.GetStatistics())["bytes_out"] >= 5000 and s)
        assert set(stats) == set(STATISTICS_TYPES)
        assert stats["domid"] == 1 and stats["channels"] == 1 and stats["links_up"] == 1
        assert stats["streams_opened"] == 1 and stats["granted_pages"] == link_pages(256 * 1024)
        assert stats["bytes_in"] >= 5000 and stats["uptime"] > 0
        assert (proxy.Domid, proxy.Backend, proxy.Version) == (1, "sim", __version__)
        r = xsockctl(bus.address, "stats", "--json")
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["domid"] == 1 and out["backend"] == "sim" and out["channels"] == 1
        text = xsockctl(bus.address, "stats").stdout
        assert "granted_pages:" in text and "version:" in text


# ---- signals ---------------------------------------------------------------------------------

def test_signals_and_channel_count_changes(world, proxy):
    opened, closed, changed = [], [], []
    proxy.ChannelOpened.connect(lambda *a: opened.append(a))
    proxy.ChannelClosed.connect(lambda *a: closed.append(a))
    proxy.PropertiesChanged.connect(lambda iface, ch, inv: changed.append((iface, ch)))
    # A round trip through the bus after subscribing: the bus has then seen our match rules, so
    # no signal of the stream below can pass it before they are in place.
    assert proxy.ChannelCount == 0
    s = open_echo(world)
    pump(lambda: opened and (DBUS_INTERFACE, {"ChannelCount": 1}) in changed)
    ((ident, peer, service),) = opened
    assert (peer, service) == (2, "")
    assert proxy.GetChannel(ident)["peer"] == 2
    s.shutdown(socket.SHUT_WR)  # both ends finish: the channel ends normally
    assert s.recv(10) == b""
    s.close()
    pump(lambda: closed and (DBUS_INTERFACE, {"ChannelCount": 0}) in changed)
    assert closed == [(ident, 2, "done")]
    assert proxy.ChannelCount == 0 and proxy.ListChannels() == []


def test_close_ends_the_stream_for_the_application(world, proxy, bus):
    closed = []
    proxy.ChannelClosed.connect(lambda *a: closed.append(a))
    assert proxy.ChannelCount == 0  # the bus has our match rule (see above)
    with open_echo(world) as s:
        (ch,) = proxy.ListChannels()
        r = xsockctl(bus.address, "close", str(ch["id"]))
        assert r.returncode == 0, r.stderr
        assert f"channel {ch['id']} closed" in r.stdout
        s.settimeout(10)
        assert s.recv(100) == b""  # EOF: the daemon closed its end
        pump(lambda: closed)
        assert closed[0][:2] == (ch["id"], 2)
        pump(lambda: proxy.ListChannels() == [])
        assert world.echo is not None


# ---- errors ----------------------------------------------------------------------------------

def test_bad_channel_id_is_a_named_error_without_traceback(world, proxy, bus):
    with pytest.raises(GLib.Error) as info:
        proxy.GetChannel(4242)
    assert remote_error(info.value) == "org.xsockd.Xsockd1.Error.NoSuchChannel"
    assert "Traceback" not in info.value.message and "4242" in info.value.message
    with pytest.raises(GLib.Error) as info:
        proxy.CloseChannel(4242)
    assert remote_error(info.value) == "org.xsockd.Xsockd1.Error.NoSuchChannel"

    r = busctl(bus.address, "call", DBUS_NAME, DBUS_PATH, DBUS_INTERFACE, "GetChannel", "u",
               "4242")
    assert r.returncode != 0 and "no channel 4242" in r.stderr
    for args in (("show", "4242"), ("close", "4242")):
        r = xsockctl(bus.address, *args)
        assert r.returncode == 1
        assert r.stderr.strip() == "xsockctl: no channel 4242", r.stderr
    assert "Traceback" not in world.daemons[1].log()


def test_xsockctl_when_no_daemon_owns_the_name(bus):
    r = xsockctl(bus.address, "list")
    assert r.returncode == 3
    assert r.stderr.strip() == (f"xsockctl: xsockd is not running: nobody owns {DBUS_NAME} on "
                                f"the bus at {bus.address}")
    r = xsockctl("unix:path=/nonexistent/bus", "stats")
    assert r.returncode == 3 and "cannot reach" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([XSOCKCTL, "--help"], capture_output=True, text=True, timeout=60)
    for word in ("list", "show ID", "close ID", "stats", "--json", "--address", "--system",
                 "Exit status", "not running", "access denied"):
        assert word in r.stdout, word


# ---- who may do what -------------------------------------------------------------------------

@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_daemon_refuses_close_to_non_root_even_on_an_open_bus(tmp_path, foreign_xsockctl):
    conf = tmp_path / "open.conf"
    conf.write_text(OPEN_CONF)
    bus = PrivateBus(conf)
    w = SimWorld(tmp_path, peers={1: [2], 2: [1]}, dbus={1: bus.address})
    try:
        w.start(1, 2)
        with open_echo(w) as s:
            r = xsockctl(bus.address, "list", user=NOBODY, command=foreign_xsockctl)
            assert r.returncode == 0, r.stderr
            ident = r.stdout.splitlines()[1].split()[0]
            r = xsockctl(bus.address, "close", ident, user=NOBODY, command=foreign_xsockctl)
            assert r.returncode == 4
            assert "only root may call CloseChannel" in r.stderr and "Traceback" not in r.stderr
            s.sendall(b"still here")  # the channel survived
            assert s.recv(100) == b"still here"
            assert xsockctl(bus.address, "close", ident).returncode == 0  # root may
            assert s.recv(100) == b""
    finally:
        w.close()
        bus.close()
    assert "Traceback" not in w.daemons[1].log()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_nobody_runs_xsockctl_wherever_the_checkout_is(foreign_xsockctl):
    # The checkout may be under /root (0700): nobody runs a copy outside it, as it is here.
    r = subprocess.run(["setpriv", f"--reuid={NOBODY.pw_uid}", f"--regid={NOBODY.pw_gid}",
                        "--clear-groups", *foreign_xsockctl, "--version"],
                       capture_output=True, text=True, timeout=60, cwd="/")
    assert (r.returncode, r.stdout.strip()) == (0, f"xsockctl {__version__}"), r.stderr
    entry = Path(foreign_xsockctl[-1])
    assert entry.parent.parent == Path("/tmp") and not str(entry).startswith(str(ROOT))
    assert (entry.parent / "xsockd" / "cli.py").stat().st_mode & 0o004


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv to act as other users")
def test_policy_file_on_a_system_like_bus(tmp_path, foreign_xsockctl):
    # The shipped policy, with its group renamed to one that exists here ("users"), so that
    # a member can be made with setpriv --groups without touching /etc/group.
    group = "users"
    gid = subprocess.run(["getent", "group", group], capture_output=True, text=True,
                         check=True).stdout.split(":")[2]
    policy = tmp_path / "policy.conf"
    policy.write_text(POLICY.read_text().replace('group="xsock"', f'group="{group}"'))
    conf = tmp_path / "system-like.conf"
    conf.write_text(SYSTEM_LIKE_CONF.format(policy=policy))
    bus = PrivateBus(conf)
    w = SimWorld(tmp_path, peers={1: [2], 2: [1]}, dbus={1: bus.address})
    try:
        w.start(1, 2)  # as root: it may own the name
        with open_echo(w) as s:
            # Outside the group: nothing, not even a list.
            r = xsockctl(bus.address, "list", user=NOBODY, command=foreign_xsockctl)
            assert r.returncode == 4 and "access denied by the bus policy" in r.stderr, r.stderr
            # In the group: list, show, stats; not close.
            member = {"user": NOBODY, "groups": gid, "command": foreign_xsockctl}
            r = xsockctl(bus.address, "list", **member)
            assert r.returncode == 0, r.stderr
            ident = r.stdout.splitlines()[1].split()[0]
            assert xsockctl(bus.address, "show", ident, **member).returncode == 0
            assert xsockctl(bus.address, "stats", **member).returncode == 0
            r = xsockctl(bus.address, "close", ident, **member)
            assert r.returncode == 4 and "bus policy" in r.stderr
            s.sendall(b"alive")
            assert s.recv(100) == b"alive"
            # Nobody but root may own the name.
            r = subprocess.run(["setpriv", f"--reuid={NOBODY.pw_uid}",
                                f"--regid={NOBODY.pw_gid}", "--clear-groups", "gdbus", "call",
                                "--address", bus.address, "--dest", "org.freedesktop.DBus",
                                "--object-path", "/org/freedesktop/DBus", "--method",
                                "org.freedesktop.DBus.RequestName", DBUS_NAME, "4"],
                               capture_output=True, text=True, timeout=60, cwd="/")
            assert r.returncode != 0 and "AccessDenied" in r.stderr
            # Root closes.
            assert xsockctl(bus.address, "close", ident).returncode == 0
            assert s.recv(100) == b""
    finally:
        w.close()
        bus.close()


# ---- the daemon's options --------------------------------------------------------------------

def start_xsockd(world: SimWorld, *args: str, env: dict[str, str] | None = None
                 ) -> tuple[subprocess.Popen[str], list[str]]:
    """Starts xsockd for domain 1 by hand; returns it and its stderr lines up to ready."""
    proc = subprocess.Popen([sys.executable, "-m", "xsockd.daemon", "--backend", "sim",
                             "--domid", "1", "--config", str(world.daemons[1].config), *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "ready" in line and "xsockd: domain" in line:
            break
    return proc, lines


def test_without_a_system_bus_the_daemon_warns_once_and_runs(tmp_path):
    w = SimWorld(tmp_path, peers={1: [2], 2: [1]})
    w.start(2)
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=f"unix:path={tmp_path}/no-bus")
    proc, lines = start_xsockd(w, env=env)
    try:
        assert proc.poll() is None, "".join(lines)
        warnings = [ln for ln in lines if "D-Bus interface off" in ln]
        assert len(warnings) == 1 and "--no-dbus" in warnings[0], lines
        with open_echo(w, b"works without D-Bus") as s:
            s.shutdown(socket.SHUT_WR)
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
        w.close()


def test_unreachable_dbus_address_is_an_error(tmp_path):
    w = SimWorld(tmp_path, peers={1: [2], 2: [1]})
    try:
        proc, lines = start_xsockd(w, "--dbus-address", f"unix:path={tmp_path}/no-bus")
        _, rest = proc.communicate(timeout=30)
        assert proc.returncode == 1
        text = "".join(lines) + rest
        assert "cannot connect to the bus at" in text and "Traceback" not in text
    finally:
        w.close()


def test_second_daemon_cannot_take_the_name(world, bus):
    # Another domain's daemon (3, with domain 2's configuration) on the same bus: the name is
    # domain 1's, so it must refuse to start.
    proc = subprocess.run([sys.executable, "-m", "xsockd.daemon", "--backend", "sim",
                           "--domid", "3", "--config", str(world.daemons[2].config),
                           "--rundir", str(world.work / "run2b"), "--dbus-address",
                           bus.address], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "already owned" in proc.stderr and "Traceback" not in proc.stderr


# ---- under load ------------------------------------------------------------------------------

def test_list_answers_while_streams_move_data(world, proxy):
    n, size = 4, 64 << 20
    socks = [world.connect(1, 2, timeout=120) for _ in range(n)]
    results: list[tuple[str, str]] = []
    threads = [threading.Thread(target=lambda s=s: results.append(stream_hashes(s, size)))
               for s in socks]
    for t in threads:
        t.start()
    try:
        times = []
        while any(t.is_alive() for t in threads) and len(times) < 50:
            t0 = time.monotonic()
            channels = proxy.ListChannels()
            times.append(time.monotonic() - t0)
            assert len(channels) <= n
            time.sleep(0.02)
        assert times and max(times) < 5.0, times
    finally:
        for t in threads:
            t.join(300)
        for s in socks:
            s.close()
    assert len(results) == n and all(a == b for a, b in results)


# ---- vchans beside the channels --------------------------------------------------------------

def test_vchans_are_listed_beside_the_channels(tmp_path):
    bus1, bus2 = PrivateBus(), PrivateBus()
    w = SimWorld(tmp_path, extra={1: CLIENT, 2: SERVER},
                 dbus={1: bus1.address, 2: bus2.address})
    try:
        w.start(1, 2)
        w.wait_for("domain 2's vchan published", lambda: published(w))
        with pydbus.connect(bus1.address) as b1, pydbus.connect(bus2.address) as b2:
            client, server = b1.get(DBUS_NAME, DBUS_PATH), b2.get(DBUS_NAME, DBUS_PATH)
            entry = {"path": SERVER_PATH, "streams": 0, "bytes_in": 0, "bytes_out": 0}
            assert client.ListVchans() == [{**entry, "kind": "vchan-client", "name": "echo2",
                                            "peer": 2, "state": "idle"}]
            assert server.ListVchans() == [{**entry, "kind": "vchan-server", "name": "echo1",
                                            "peer": 1, "state": "published"}]
            s = vchan_connect(w)
            sent, got = echo_hashes(s, 1 << 20)
            assert sent == got
            # While the stream runs: the counts come from its pump, without stopping it.
            (v,) = client.ListVchans()
            assert (v["state"], v["streams"], v["bytes_in"], v["bytes_out"]) == (
                "connected", 1, 1 << 20, 1 << 20)
            (v,) = server.ListVchans()
            assert (v["state"], v["streams"], v["bytes_in"], v["bytes_out"]) == (
                "serving", 1, 1 << 20, 1 << 20)
            r = xsockctl(bus1.address, "list")
            assert r.returncode == 0, r.stderr
            lines = r.stdout.splitlines()
            assert lines[:2] == ["no channels", ""], r.stdout
            assert lines[2].split() == ["KIND", "NAME", "PEER", "STATE", "STREAMS", "BYTES",
                                        "IN", "BYTES", "OUT", "PATH"]
            assert lines[3].split() == ["vchan-client", "echo2", "2", "connected", "1",
                                        str(1 << 20), str(1 << 20), SERVER_PATH]
            listed = json.loads(xsockctl(bus1.address, "list", "--json").stdout)
            assert listed["channels"] == [] and listed["vchans"] == client.ListVchans()
            s.close()
            # The ended stream's bytes stay in the totals; the next stream's add to them.
            w.wait_for("the client idle again",
                       lambda: client.ListVchans()[0]["state"] == "idle")
            w.wait_for("the server republished", lambda: published(w))
            s = vchan_connect(w)
            sent, got = echo_hashes(s, 1000)
            assert sent == got
            s.close()
            w.wait_for("the second stream ended",
                       lambda: client.ListVchans()[0]["state"] == "idle")
            (v,) = client.ListVchans()
            assert (v["streams"], v["bytes_in"], v["bytes_out"]) == (
                2, (1 << 20) + 1000, (1 << 20) + 1000)
    finally:
        w.close()
        bus1.close()
        bus2.close()
    assert "Traceback" not in w.logs()
