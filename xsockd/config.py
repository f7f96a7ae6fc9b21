"""The configuration file: TOML in, frozen dataclasses out.  All validation lives here.

A bad file is refused whole, naming the file, the table, the key and (where it can be found)
the line; nothing is ever ignored with a warning.  ``xsockd --check-config`` uses the same code.
"""

from __future__ import annotations

import difflib
import errno
import re
import sys
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from xsockd.constants import (
    DEFAULT_GRANT_LIMIT,
    DEFAULT_MAX_STREAMS,
    DEFAULT_RING_SIZE,
    DEFAULT_RUNDIR,
    DEFAULT_SIM_DIR,
    DEFAULT_STREAM_WINDOW,
)
from xsockd.errors import ConfigError
from xsockd.ring import (
    MAX_RING_SIZE,
    MAX_STREAMS,
    MAX_WINDOW,
    MIN_RING_SIZE,
    MIN_WINDOW,
    link_pages,
    valid_service_name,
)
from xsockd.vchan import layout as vchan_layout
from xsockd.words import count, size_text

__all__ = [
    "Config",
    "DaemonConfig",
    "LinkConfig",
    "RemoteConfig",
    "ServiceConfig",
    "check_config_main",
    "check_own_domain",
    "load_config",
    "parse_config",
    "parse_size",
]

SERVICE_NAME_RULE = ("service names are 1-64 of A-Z a-z 0-9 _ . - (starting with a letter or "
                     "digit)")
DOMID_MAX = 0x7FEF  # DOMID_FIRST_RESERVED - 1
SUN_PATH_MAX = 107
_SIZE = re.compile(r"(\d+)\s*(KiB|MiB|K|M)?")
_UNITS = {None: 1, "K": 1024, "KiB": 1024, "M": 1 << 20, "MiB": 1 << 20}
TABLES = ("daemon", "link", "services", "remote", "vchan")
TABLES_TEXT = "[daemon], [link], [services.NAME], [remote.DOMID], [vchan.NAME]"
# libxenvchan ring orders (xsockd/vchan_core.h): 1 KiB .. 1 MiB per direction.
VCHAN_MIN_RING = 1 << 10
VCHAN_MAX_RING = 1 << 20
VCHAN_MAX_LINGER = 3600
# A TOML table header, [a.b] or [[a.b]], and one bare or quoted key of its dotted name.
_HEADER = re.compile(r"\s*\[\[?(?P<name>[^\[\]]*)\]\]?\s*(?:#.*)?$")
_KEY_PART = re.compile(r'\s*(?:"((?:[^"\\]|\\.)*)"|\'([^\']*)\'|([A-Za-z0-9_-]+))\s*(?:\.|$)')
DEFAULT_STOP_TIMEOUT = 10.0  # seconds a stopping daemon lets in-flight data drain
MAX_STOP_TIMEOUT = 3600
# What one link's peer may ask of us: stream opens a second, and connects to local services in
# progress at once (a service whose backlog is full keeps them waiting).  Past either, an OPEN
# is answered RESET 3 (too many) without a connect.
DEFAULT_OPEN_RATE = 20000
DEFAULT_MAX_CONNECTING = 64


@dataclass(frozen=True)
class DaemonConfig:
    rundir: str = DEFAULT_RUNDIR
    peers: tuple[int, ...] = ()
    default_service: str | None = None
    backend: str = "xen"
    sim_dir: str = DEFAULT_SIM_DIR
    stop_timeout: float = DEFAULT_STOP_TIMEOUT


@dataclass(frozen=True)
class LinkConfig:
    ring_size: int = DEFAULT_RING_SIZE
    stream_window: int = DEFAULT_STREAM_WINDOW
    max_streams: int = DEFAULT_MAX_STREAMS
    grant_pages: int = DEFAULT_GRANT_LIMIT
    open_rate: int = DEFAULT_OPEN_RATE
    max_connecting: int = DEFAULT_MAX_CONNECTING


@dataclass(frozen=True)
class ServiceConfig:
    name: str
    socket: str
    allow: tuple[int, ...]
    caller_header: bool = False


@dataclass(frozen=True)
class RemoteConfig:
    """``[remote.N]``: what we reach of peer domain N besides its default service."""

    domid: int
    services: tuple[str, ...] = ()
    eager: bool = False  # keep a link with it up from start, not only once a stream asks


@dataclass(frozen=True)
class VchanConfig:
    """``[vchan.NAME]``: a libxenvchan endpoint (docs/VCHAN.md).

    ``path`` is absolute: for a client inside ``/local/domain/<domain>/``, for a server
    inside our own tree (made absolute once our domain id is known: ``absolute_path``).
    """

    name: str
    role: str                     # "client" or "server"
    domain: int                   # the peer: the only domain served or looked at
    path: str                     # as configured (a server's may be relative)
    service: str | None = None    # server: the [services.X] it splices clients into
    left_order: int = 16          # client -> server ring, log2 bytes
    right_order: int = 16         # server -> client
    linger: float = 5.0

    def pages(self) -> int:
        """Returns the pages a server grants for one vchan: the shared page and the rings'
        (a ring below a page lives in the shared page); 0 for a client."""
        if self.role != "server":
            return 0
        return 1 + sum(1 << (o - 12) for o in (self.left_order, self.right_order) if o >= 12)

    def absolute_path(self, own_domid: int) -> str:
        """Returns the XenStore path; a relative one is under our own domain's tree."""
        if self.path.startswith("/"):
            return self.path
        return f"/local/domain/{own_domid}/{self.path}"


@dataclass(frozen=True)
class Config:
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    link: LinkConfig = field(default_factory=LinkConfig)
    services: Mapping[str, ServiceConfig] = field(default_factory=dict)
    remotes: Mapping[int, RemoteConfig] = field(default_factory=dict)
    vchans: Mapping[str, VchanConfig] = field(default_factory=dict)
    # Where it came from, for what is checked after parsing (check_own_domain).
    path: str | None = field(default=None, compare=False)
    peers_line: int | None = field(default=None, compare=False)

    def local_sockets(self) -> list[tuple[int, str]]:
        """Returns (peer, service) for every socket in rundir; service "" is the default."""
        named = [(r.domid, name) for r in self.remotes.values() for name in r.services]
        return sorted([(peer, "") for peer in self.daemon.peers] + named)

    def eager_peers(self) -> frozenset[int]:
        """Returns the peers whose link is set up at start and kept up (``eager = true``)."""
        return frozenset(r.domid for r in self.remotes.values() if r.eager)

    def services_for(self, peer: int) -> list[str]:
        """Returns the names of the services ``peer`` may reach."""
        return sorted(n for n, s in self.services.items() if peer in s.allow)

    def service_for(self, peer: int, name: str | None) -> ServiceConfig | None:
        """Returns the service ``name`` (None: the default) if ``peer`` may reach it."""
        name = name or self.daemon.default_service
        service = self.services.get(name) if name else None
        return service if service is not None and peer in service.allow else None

    def vchan_pages(self) -> int:
        """Returns the grant pages the [vchan.NAME] servers hold, one vchan each at a time."""
        return sum(v.pages() for v in self.vchans.values())

    def link_pages(self) -> int:
        """Returns the pages one link we initiate grants: a control page and two rings."""
        return link_pages(self.link.ring_size)


def parse_size(value: object) -> int:
    """Returns bytes for ``4096``, ``"256KiB"`` or ``"1MiB"``; raises ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError("a size, not a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and (m := _SIZE.fullmatch(value.strip())):
        return int(m.group(1)) * _UNITS[m.group(2)]
    raise ValueError(f"{value!r} is not a size such as 4096, \"256KiB\" or \"1MiB\"")


class _Reader:
    """Walks the parsed TOML, raising ConfigError that names file, table, key and line."""

    def __init__(self, text: str, path: str) -> None:
        self.text, self.path = text, path

    def line_of(self, table: str, key: str | None) -> int | None:
        """Returns the line of ``[table]`` (key None) or of ``key =`` in it, if written so."""
        lines = self.text.splitlines()
        start = next((i for i, ln in enumerate(lines)
                      if (name := _header_name(ln)) is not None and ".".join(name) == table),
                     None)
        if start is None:
            return None
        if key is None:
            return start + 1
        for i in range(start + 1, len(lines)):
            if _header_name(lines[i]) is not None:
                break
            if re.match(r"\s*[\"']?" + re.escape(key) + r"[\"']?\s*=", lines[i]):
                return i + 1
        # A key written as its own table, [daemon.peers]: point there.
        return self.line_of(f"{table}.{key}", None) if "." not in key else None

    def first_line_of(self, top: str) -> int | None:
        """Returns the first line that makes the top-level name ``top``: a header [top...] or
        [[top...]], or a ``top = `` / ``top.x = `` before any header (tomllib gives no lines)."""
        in_root = True
        for i, ln in enumerate(self.text.splitlines()):
            name = _header_name(ln)
            if name is not None:
                in_root = False
                if name[:1] == [top]:
                    return i + 1
            elif in_root and (m := re.match(r"\s*([^=#]+?)\s*=", ln)):
                first = _dotted(m.group(1))
                if first is not None and first[:1] == [top]:
                    return i + 1
        return None

    def error(self, table: str, key: str | None, message: str) -> ConfigError:
        return ConfigError(message, path=self.path, table=table, key=key,
                           line=self.line_of(table, key))

    def table(self, data: Mapping[str, Any], name: str, allowed: set[str]) -> dict[str, Any]:
        value = data.get(name, {})
        if not isinstance(value, dict):
            raise self.error(name, None, f"[{name}] must be a table")
        for key in value:
            if key not in allowed:
                raise self.error(name, key, f"unknown key; expected one of {sorted(allowed)}")
        return value

    def domids(self, table: str, key: str, value: object) -> tuple[int, ...]:
        if not isinstance(value, list) or not all(type(v) is int for v in value):
            raise self.error(table, key, "must be a list of domain ids (integers)")
        for v in value:
            if not 0 <= v <= DOMID_MAX:
                raise self.error(table, key, f"domain id {v} is outside 0..{DOMID_MAX}")
        if len(set(value)) != len(value):
            raise self.error(table, key, "lists a domain twice")
        return tuple(value)

    def path_value(self, table: str, key: str, value: object, socket: bool) -> str:
        if not isinstance(value, str) or not value.startswith("/"):
            raise self.error(table, key, "must be an absolute path (a string starting with /)")
        if socket and len(value.encode()) > SUN_PATH_MAX:
            raise self.error(table, key, f"is longer than a Unix socket path may be "
                                         f"({SUN_PATH_MAX} bytes)")
        return value

    def size(self, table: str, key: str, value: object, lo: int, hi: int) -> int:
        try:
            n = parse_size(value)
        except ValueError as e:
            raise self.error(table, key, str(e)) from None
        if lo <= n <= hi and not n & (n - 1):
            return n
        # Said in the units written: "300KiB" is answered in KiB, 307200 in bytes.
        unit = m.group(2) if isinstance(value, str) and (m := _SIZE.fullmatch(value.strip())) \
            else None

        def written(x: int, best: bool = False) -> str:
            text = (size_text(x) if best else size_text(x, unit)) if unit else str(x)
            return f'"{text}"' if isinstance(value, str) else text
        span = f"a power of two from {written(lo, True)} to {written(hi, True)}"
        if n < lo:
            raise self.error(table, key, f"{written(n)} is less than the smallest, "
                                         f"{written(lo, True)} ({span})")
        if n > hi:
            raise self.error(table, key, f"{written(n)} is more than the largest, "
                                         f"{written(hi, True)} ({span})")
        below = 1 << (n.bit_length() - 1)
        raise self.error(table, key, f"{written(n)} is not a power of two: nearest are "
                                     f"{written(below)} or {written(below * 2)}")

    def seconds(self, table: str, key: str, value: object, hi: int) -> float:
        if type(value) not in (int, float) or not 0 <= value <= hi:  # type: ignore[operator]
            raise self.error(table, key, f"must be a number of seconds from 0 to {hi}")
        return float(value)  # type: ignore[arg-type]

    def integer(self, table: str, key: str, value: object, lo: int, hi: int) -> int:
        if type(value) is not int or not lo <= value <= hi:
            raise self.error(table, key, f"must be an integer from {lo} to {hi}")
        return value


def _dotted(name: str) -> list[str] | None:
    """Returns the parts of a dotted TOML key (``a."b.c"`` -> [a, b.c]), None if it is not one."""
    parts, pos = [], 0
    while pos < len(name):
        m = _KEY_PART.match(name, pos)
        if m is None:
            return None
        parts.append(next(g for g in m.groups() if g is not None))
        pos = m.end()
    return parts or None


def _header_name(line: str) -> list[str] | None:
    """Returns the dotted name of a table header line ([a.b], [[a]]), None for other lines."""
    m = _HEADER.match(line)
    return _dotted(m.group("name")) if m else None


def _unknown_table(r: _Reader, name: str, value: object) -> ConfigError:
    """The error for a top-level name that is none of ours, with its line and a guess."""
    close = difflib.get_close_matches(name, TABLES, n=1, cutoff=0.6)
    guess = {"services": "[services.NAME]", "remote": "[remote.DOMID]"}.get(
        close[0], f"[{close[0]}]") if close else None
    table = isinstance(value, dict) or (  # [name] or [[name]]
        isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value))
    what = f"unknown table [{name}]" if table else f"{name} = ... is outside every table"
    message = what + (f"; did you mean {guess}?" if guess else "") + \
        f" (the tables are {TABLES_TEXT})"
    return ConfigError(message, path=r.path, line=r.first_line_of(name))


def parse_config(text: str, path: str = "<string>") -> Config:
    """Returns the validated configuration in ``text``; raises ConfigError."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"line (\d+)", str(e))
        raise ConfigError(f"not valid TOML: {e}", path=path,
                          line=int(m.group(1)) if m else None) from None
    r = _Reader(text, path)
    for name in data:
        if name not in TABLES:
            raise _unknown_table(r, name, data[name])

    d = r.table(data, "daemon", {"rundir", "peers", "default_service", "backend", "sim_dir",
                                 "stop_timeout"})
    backend = d.get("backend", "xen")
    if backend not in ("xen", "sim"):
        raise r.error("daemon", "backend", f"{backend!r} is not \"xen\" or \"sim\"")
    peers = r.domids("daemon", "peers", d.get("peers", []))
    daemon = DaemonConfig(
        rundir=r.path_value("daemon", "rundir", d.get("rundir", DEFAULT_RUNDIR), False),
        peers=peers, backend=backend,
        sim_dir=r.path_value("daemon", "sim_dir", d.get("sim_dir", DEFAULT_SIM_DIR), False),
        default_service=d.get("default_service"),
        stop_timeout=r.seconds("daemon", "stop_timeout",
                               d.get("stop_timeout", DEFAULT_STOP_TIMEOUT), MAX_STOP_TIMEOUT))

    lk = r.table(data, "link", {"ring_size", "stream_window", "max_streams", "grant_pages",
                                "open_rate", "max_connecting"})
    link = LinkConfig(
        ring_size=r.size("link", "ring_size", lk.get("ring_size", DEFAULT_RING_SIZE),
                         MIN_RING_SIZE, MAX_RING_SIZE),
        stream_window=r.size("link", "stream_window",
                             lk.get("stream_window", DEFAULT_STREAM_WINDOW),
                             MIN_WINDOW, MAX_WINDOW),
        max_streams=r.integer("link", "max_streams", lk.get("max_streams", DEFAULT_MAX_STREAMS),
                              1, MAX_STREAMS),
        grant_pages=r.integer("link", "grant_pages", lk.get("grant_pages", DEFAULT_GRANT_LIMIT),
                              1, 1 << 20),
        open_rate=r.integer("link", "open_rate", lk.get("open_rate", DEFAULT_OPEN_RATE),
                            1, 1 << 24),
        max_connecting=r.integer("link", "max_connecting",
                                 lk.get("max_connecting", DEFAULT_MAX_CONNECTING), 1, 65536))
    pages = link_pages(link.ring_size)
    if pages > link.grant_pages:
        raise r.error("link", "ring_size", f"a link of this ring size needs {pages} pages, more "
                                           f"than grant_pages = {link.grant_pages}")

    services: dict[str, ServiceConfig] = {}
    raw = data.get("services", {})
    if not isinstance(raw, dict):
        raise r.error("services", None, "must be tables [services.NAME]")
    for name, body in raw.items():
        table = f"services.{name}"
        if not valid_service_name(name):
            raise r.error(table, None, SERVICE_NAME_RULE)
        if not isinstance(body, dict):
            raise r.error(table, None, "must be a table")
        for key in body:
            if key not in ("socket", "allow", "caller_header"):
                raise r.error(table, key, "unknown key; expected socket, allow, caller_header")
        if "socket" not in body:
            raise r.error(table, None, "needs socket = \"/path/of/the/service.sock\"")
        allow = r.domids(table, "allow", body.get("allow", list(peers)))
        for dom in allow:
            if dom not in peers:
                raise r.error(table, "allow", f"domain {dom} is not in [daemon] peers")
        header = body.get("caller_header", False)
        if not isinstance(header, bool):
            raise r.error(table, "caller_header", "must be true or false")
        services[name] = ServiceConfig(name, r.path_value(table, "socket", body["socket"], True),
                                       allow, header)
    if daemon.default_service is not None and daemon.default_service not in services:
        raise r.error("daemon", "default_service",
                      f"names no service; define [services.{daemon.default_service}]")
    remotes = _remotes(r, data, daemon)
    vchans = _vchans(r, data, daemon, link, services, remotes)
    return Config(daemon, link, services, remotes, vchans, path, r.line_of("daemon", "peers"))


def _remotes(r: _Reader, data: Mapping[str, Any], daemon: DaemonConfig) -> dict[int, RemoteConfig]:
    """Returns the ``[remote.DOMID]`` tables: the named services of peers we may reach."""
    raw = data.get("remote", {})
    if not isinstance(raw, dict):
        raise r.error("remote", None, "must be tables [remote.DOMID]")
    remotes: dict[int, RemoteConfig] = {}
    for key, body in raw.items():
        table = f"remote.{key}"
        if not key.isdigit() or not 0 <= int(key) <= DOMID_MAX:
            raise r.error(table, None, f"[remote.DOMID] takes a domain id from 0 to {DOMID_MAX}")
        domid = int(key)
        if domid not in daemon.peers:
            raise r.error(table, None, f"domain {domid} is not in [daemon] peers")
        if not isinstance(body, dict):
            raise r.error(table, None, "must be a table")
        for k in body:
            if k not in ("services", "eager"):
                raise r.error(table, k, "unknown key; expected services or eager")
        eager = body.get("eager", False)
        if not isinstance(eager, bool):
            raise r.error(table, "eager", "must be true or false")
        names = body.get("services", [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise r.error(table, "services", "must be a list of service names (strings)")
        for name in names:
            if not valid_service_name(name):
                raise r.error(table, "services", f"{name!r} is not a service name: "
                                                 f"{SERVICE_NAME_RULE}")
            path = f"{daemon.rundir.rstrip('/')}/{domid}/{name}.sock"
            if len(path.encode()) > SUN_PATH_MAX:
                raise r.error(table, "services", f"the socket {path} would be longer than a "
                                                 f"Unix socket path may be ({SUN_PATH_MAX} "
                                                 "bytes)")
        if len(set(names)) != len(names):
            raise r.error(table, "services", "lists a service twice")
        remotes[domid] = RemoteConfig(domid, tuple(names), eager)
    return remotes


_XS_PATH = re.compile(r"[A-Za-z0-9_.@-]+(/[A-Za-z0-9_.@-]+)*")


def _vchans(r: _Reader, data: Mapping[str, Any], daemon: DaemonConfig, link_cfg: LinkConfig,
            services: Mapping[str, ServiceConfig], remotes: Mapping[int, RemoteConfig]
            ) -> dict[str, VchanConfig]:
    """Returns the ``[vchan.NAME]`` tables (docs/VCHAN.md)."""
    raw = data.get("vchan", {})
    if not isinstance(raw, dict):
        raise r.error("vchan", None, "must be tables [vchan.NAME]")
    out: dict[str, VchanConfig] = {}
    keys = {"client": {"role", "domain", "path", "linger"},
            "server": {"role", "domain", "path", "service", "ring_size", "linger"}}
    for name, body in raw.items():
        table = f"vchan.{name}"
        if not valid_service_name(name):
            raise r.error(table, None, SERVICE_NAME_RULE)
        if not isinstance(body, dict):
            raise r.error(table, None, "must be a table")
        role = body.get("role")
        if role not in keys:
            raise r.error(table, "role", 'needs role = "client" or "server"')
        for key in body:
            if key not in keys[role]:
                raise r.error(table, key, f"unknown key for a {role}; expected one of "
                                          f"{sorted(keys[role])}")
        dom = body.get("domain")
        if not isinstance(dom, int) or isinstance(dom, bool) or not 0 <= dom <= DOMID_MAX:
            raise r.error(table, "domain", f"needs domain = a domain id from 0 to {DOMID_MAX}")
        path = body.get("path", f"data/vchan/{dom}/{name}" if role == "server" else None)
        if not isinstance(path, str) or not _XS_PATH.fullmatch(path.removeprefix("/")):
            raise r.error(table, "path", "needs path = a XenStore path (A-Z a-z 0-9 _ . @ - "
                                         "between single slashes)")
        if role == "client":
            if not path.startswith(f"/local/domain/{dom}/"):
                raise r.error(table, "path", f"must be inside /local/domain/{dom}/: a server "
                                             "publishes in its own tree")
            if name in (remotes[dom].services if dom in remotes else ()):
                raise r.error(table, None, f"<rundir>/{dom}/{name}.sock is also a named "
                                           f"service of [remote.{dom}]")
            sock = f"{daemon.rundir.rstrip('/')}/{dom}/{name}.sock"
            if len(sock.encode()) > SUN_PATH_MAX:
                raise r.error(table, None, f"the socket {sock} would be longer than a Unix "
                                           f"socket path may be ({SUN_PATH_MAX} bytes)")
            out[name] = VchanConfig(name, role, dom, path, linger=r.seconds(
                table, "linger", body.get("linger", 5), VCHAN_MAX_LINGER))
            continue
        if path.startswith("/") and not re.fullmatch(r"/local/domain/\d+/.+", path):
            raise r.error(table, "path", "must be relative (under our own tree) or inside "
                                         "/local/domain/<our domid>/")
        service = body.get("service")
        if service not in services:
            raise r.error(table, "service", "must name a [services.NAME] table")
        sizes = body.get("ring_size", ["64KiB", "64KiB"])
        if not isinstance(sizes, list) or len(sizes) != 2:
            raise r.error(table, "ring_size", "must be two sizes: [left, right]")
        left, right = (r.size(table, "ring_size", v, VCHAN_MIN_RING, VCHAN_MAX_RING)
                       for v in sizes)
        try:  # libxenvchan's rules for the pair, defined once in the C core
            vchan_layout(left.bit_length() - 1, right.bit_length() - 1)
        except OSError:
            raise r.error(table, "ring_size", "libxenvchan cannot place these two rings: two "
                                              "below 4KiB must differ, and the grant list "
                                              "must fit in the shared page") from None
        linger = r.seconds(table, "linger", body.get("linger", 5), VCHAN_MAX_LINGER)
        out[name] = VchanConfig(name, role, dom, path, service, left.bit_length() - 1,
                                right.bit_length() - 1, linger)
    # Vchan servers' pages come off the top of the grant budget, before the links' shares.
    pages = sum(v.pages() for v in out.values())
    if pages + link_pages(MIN_RING_SIZE) > link_cfg.grant_pages:
        raise r.error("link", "grant_pages", f"the vchan servers hold {pages} grant pages, "
                                             f"leaving less than one link's worth of "
                                             f"grant_pages = {link_cfg.grant_pages}")
    return out


def load_config(path: str, hint: str = "") -> Config:
    """Returns the validated configuration in the file ``path``; raises ConfigError.

    ``hint`` follows the reason when the file cannot be read (e.g. how to name another file).
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        reason = "does not exist" if e.errno == errno.ENOENT else f"cannot read: {e.strerror}"
        raise ConfigError(reason + (f" ({hint})" if hint else ""), path=path) from None
    except UnicodeDecodeError:
        raise ConfigError("is not UTF-8 text", path=path) from None
    return parse_config(text, path)


def check_own_domain(config: Config, domid: int) -> None:
    """Refuses a configuration that lists ``domid``, the domain it would run in, as a peer.

    One check for start, reload and ``--check-config FILE --domid N``: the same words in each.
    """
    if domid in config.daemon.peers:
        raise ConfigError(f"lists domain {domid}, which is this domain itself: a domain is not "
                          "its own peer (remove it from peers, or check --domid)",
                          path=config.path, table="daemon", key="peers",
                          line=config.peers_line)


def check_config_main(path: str, domid: int | None = None,
                      this_domain: Callable[[Config], int | None] | None = None) -> int:
    """``xsockd --check-config FILE [--domid N]``: prints a verdict; returns the exit status.

    Without ``domid``, ``this_domain`` may name the domain the file would serve (on Xen, ours).
    """
    try:
        cfg = load_config(path)
        if domid is None and this_domain is not None:
            domid = this_domain(cfg)
        if domid is not None:
            check_own_domain(cfg, domid)
    except ConfigError as e:
        print(f"xsockd: {e}", file=sys.stderr)
        return 1
    where = f" for domain {domid}" if domid is not None else ""
    print(f"{path}: OK{where} ({count(len(cfg.daemon.peers), 'peer')}, "
          f"{count(len(cfg.services), 'service')})")
    if domid is None and cfg.daemon.peers:
        print("  (not checked against a domain id: add --domid N to check it as domain N's "
              "daemon would)")
    return 0
