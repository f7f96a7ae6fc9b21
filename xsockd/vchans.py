"""The daemon's vchan endpoints, its ``[vchan.NAME]`` tables (docs/VCHAN.md).

Each endpoint (a ``VchanServer`` or a ``VchanClient``) owns its XenStore connection, its fds
and its one stream; this set starts, reloads, drains and stops them, each behind its own
failure boundary: one that cannot start or fails later is logged and left out, and the others
and the daemon's links go on.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from xsockd.admission import caller_header
from xsockd.backend import Backend
from xsockd.config import Config
from xsockd.listeners import Rundir
from xsockd.peerlog import PeerLog, escape
from xsockd.vchan_client import VchanClient
from xsockd.vchan_server import VchanServer

if TYPE_CHECKING:  # the loop's module needs GLib; the manager runs on any loop (fakeloop)
    from xsockd.loop import Loop

log = logging.getLogger("xsockd")

__all__ = ["Vchans", "vchan_setup"]


def vchan_setup(config: Config, name: str) -> object:
    """Returns what a running [vchan.NAME] was made from: its table and, for a server, its
    service's socket and caller_header; None if there is no such table."""
    cfg = config.vchans.get(name)
    if cfg is None:
        return None
    svc = config.services.get(cfg.service) if cfg.service is not None else None
    return cfg, svc.socket if svc else None, svc.caller_header if svc else None


class Vchans:
    """The running vchan endpoints of one daemon, by name."""

    def __init__(self, backend: Backend, loop: Loop, peerlog: PeerLog) -> None:
        self.backend = backend
        self.loop = loop
        self.peerlog = peerlog
        self.rundir: Rundir | None = None  # the daemon's, from start: clients listen there
        self.running: dict[str, VchanServer | VchanClient] = {}

    def start(self, config: Config, rundir: Rundir) -> None:
        """Starts every [vchan.NAME]; one that cannot start is logged and left out."""
        self.rundir = rundir
        for name in sorted(config.vchans):
            self._start(name, config)

    def _start(self, name: str, config: Config) -> None:
        cfg = config.vchans[name]
        try:
            if cfg.role == "server":
                assert cfg.service is not None
                svc = config.services[cfg.service]
                # The caller is the vchan client's domain; the "service" its vchan's name.
                header = caller_header(cfg.domain, name) if svc.caller_header else b""
                server = VchanServer(cfg, svc.socket, self.backend, self.loop, header,
                                     self.peerlog)
                self.running[name] = server
                server.start()
            else:
                assert self.rundir is not None
                listener = self.rundir.listen(cfg.domain, name)
                try:
                    client = VchanClient(cfg, listener, self.backend, self.loop, self.peerlog)
                except BaseException:  # not ours yet to stop: nobody would serve the socket
                    listener.close()
                    self.rundir.unlink(cfg.domain, name)
                    raise
                self.running[name] = client
                client.start()
        except Exception as e:  # the boundary: this vchan only
            log.error("vchan %s: cannot start: %s", name, escape(str(e)))
            self._stop(name)

    def reload(self, old: Config, new: Config, taken: set[tuple[int, str]],
               starting: bool) -> list[str]:
        """Applies the [vchan.NAME] tables of ``new``: a removed one stops (its stream ends,
        everything released), an added one starts, a changed one restarts; an unchanged one
        is left alone, its stream with it.  One that could not start before is tried again,
        unless not ``starting`` (the daemon is stopping).  ``taken``: the local sockets bound
        already (the listeners are reloaded first).  Returns what changed, one phrase each."""
        changes: list[str] = []
        names = sorted(old.vchans.keys() | new.vchans.keys())
        changed = [n for n in names if vchan_setup(old, n) != vchan_setup(new, n)]
        for name in changed:  # all stopped first: a path or socket may pass to another name
            v = self.running.get(name)
            if v is not None:
                try:
                    self._stop(name, keep_socket=(v.cfg.domain, name) in taken)
                except Exception as e:  # stopping: release what we can
                    log.error("vchan %s: stopping: %s", name, escape(str(e)))
        for name in names:
            if name not in new.vchans:
                changes.append(f"vchan {name} removed")
                continue
            if name in changed:
                what = "changed, restarted" if name in old.vchans else "added"
                changes.append(f"vchan {name} {what}")
            elif name in self.running:
                continue
            if starting:
                self._start(name, new)
        return changes

    def _stop(self, name: str, keep_socket: bool = False) -> None:
        """Stops [vchan.NAME]; a client's socket file is removed unless ``keep_socket`` (a
        reload gave its path to a peer's named service, whose listener is bound there now)."""
        v = self.running.pop(name, None)
        if v is not None:
            v.close()
            if isinstance(v, VchanClient) and self.rundir is not None and not keep_socket:
                self.rundir.unlink(v.cfg.domain, name)

    def stop(self) -> None:
        for name in list(self.running):
            try:
                self._stop(name)
            except Exception as e:  # stopping: release what we can
                log.error("vchan %s: stopping: %s", name, escape(str(e)))

    def drain(self) -> None:
        """Stopping: no vchan takes a new stream; the running ones go on until stop."""
        for name, v in list(self.running.items()):
            try:
                v.drain()
            except Exception as e:  # the boundary: this vchan only
                log.error("vchan %s: %s", name, escape(str(e)))
                self._stop(name)

    def peers_destroyed(self, exists: Callable[[int], bool]) -> None:
        """Tells each endpoint whose peer domain no longer ``exists``."""
        for name, v in list(self.running.items()):
            if not exists(v.cfg.domain):
                try:
                    v.peer_destroyed()
                except Exception as e:  # the boundary: this vchan only
                    log.error("vchan %s: %s", name, escape(str(e)))

    def held(self) -> Counter[str]:
        """``streams``: the endpoints with a stream; ``vchan``: bytes in their rings."""
        held: Counter[str] = Counter()
        for v in self.running.values():
            if v.vchan is not None and v.vchan.pump is not None:
                held["streams"] += 1
                held["vchan"] += v.vchan.in_flight()
        return held

    def describe(self) -> list[dict[str, object]]:
        """Each endpoint's kind, name, XenStore path, peer, state, streams and bytes each way
        (``ListVchans`` in org.xsockd.Xsockd1.xml)."""
        return [v.describe() for _, v in sorted(self.running.items())]
