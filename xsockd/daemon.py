"""The composition root: parse arguments, build the backend, manager and loop, run.

Nothing imports this module; ``xsockd`` (the console script) calls ``main``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import resource
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from xsockd import __version__
from xsockd.backend import Backend
from xsockd.config import DOMID_MAX, Config, check_config_main, load_config
from xsockd.constants import DEFAULT_CONFIG
from xsockd.errors import XsockError
from xsockd.words import count

if TYPE_CHECKING:
    from xsockd.dbus_face import DBusFace
    from xsockd.loop import Loop
    from xsockd.manager import Manager

__all__ = ["main", "make_backend"]

log = logging.getLogger("xsockd")

DESCRIPTION = """\
xsockd links this Xen domain with peer domains through granted shared memory. For each peer
domain N in the configuration, applications connect to the Unix socket <rundir>/N.sock and
reach the service that domain N exposes to us; <rundir>/N/NAME.sock reaches its service NAME
(for each NAME in [remote.N] services). SIGHUP reloads the configuration; SIGTERM stops after
in-flight data has drained ([daemon] stop_timeout, default 10 s).

Commands:
  xsockd [options]             run the daemon (what systemd starts)
  xsockd demo [--help]         run two simulated domains and stream data between them
  xsockd --check-config FILE [--domid N]
                               validate a configuration file and exit; also as domain
                               N's daemon would (N not among its peers); on Xen, N is
                               this domain unless --domid says otherwise

The daemon serves the D-Bus interface org.xsockd.Xsockd1 on the system bus (or the bus of
--dbus-address); xsockctl talks to it. Without a reachable system bus it logs one warning and
runs without D-Bus.
"""


def domid_arg(text: str) -> int:
    """--domid's type: a domain id a domain can have (argparse reports the error)."""
    try:
        domid = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= domid <= DOMID_MAX:
        raise argparse.ArgumentTypeError(f"{domid} is not a domain id (0..{DOMID_MAX})")
    return domid


def make_backend(name: str, domid: int | None, sim_dir: str) -> Backend:
    """Returns the backend ``name`` for our domain; raises XsockError with the fix."""
    if name == "sim":
        from xsockd.backend_sim import SimBackend

        if domid is None:
            raise XsockError("the sim backend needs --domid N (which simulated domain we are)")
        return SimBackend(domid, sim_dir)
    try:
        from xsockd.backend_xen import XenBackend  # type: ignore[import-not-found]
    except ImportError as e:
        raise XsockError(f"the xen backend is not available in this build: {e}") from e
    return XenBackend(domid)


def _xen_domid() -> int | None:
    """Returns our domain id from XenStore, as the xen backend reads it; None if it cannot."""
    if not os.path.exists("/dev/xen"):
        return None
    try:
        from xsockd.backend_xen import XENBUS, XENSTORED_SOCKET  # type: ignore[import-not-found]
        from xsockd.xenstore_client import XenStoreClient

        path = XENSTORED_SOCKET if os.path.exists(XENSTORED_SOCKET) else XENBUS
        with XenStoreClient(path) as xs:
            return int(xs.read("domid"))
    except (ImportError, OSError, ValueError):  # XsockError's backend errors are OSErrors
        return None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xsockd", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, metavar="FILE",
                   help=f"configuration file (default {DEFAULT_CONFIG})")
    p.add_argument("--backend", choices=("sim", "xen"),
                   help="Xen interface: the real one, or the simulated host "
                        "(default: [daemon] backend of the configuration)")
    p.add_argument("--domid", type=domid_arg, metavar="N",
                   help="our domain id (required with --backend sim; read from XenStore on Xen)")
    p.add_argument("--sim-dir", metavar="DIR",
                   help="directory of the simulated host (default: [daemon] sim_dir)")
    p.add_argument("--rundir", metavar="DIR",
                   help="where to create <domid>.sock for each peer (default: [daemon] rundir)")
    p.add_argument("--check-config", metavar="FILE",
                   help="validate FILE, print the result and exit (0 if valid); also refuse it "
                        "as the daemon of domain N would (N among its peers), N from --domid or, "
                        "for the xen backend, from XenStore")
    bus = p.add_mutually_exclusive_group()
    bus.add_argument("--dbus-address", metavar="ADDR",
                     help="serve D-Bus on the bus at ADDR (e.g. unix:path=/run/x.sock) instead "
                          "of the system bus; failing to reach it is an error")
    bus.add_argument("--no-dbus", action="store_true",
                     help="do not serve the D-Bus interface (xsockctl cannot reach us)")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    p.add_argument("--version", action="version", version=f"xsockd {__version__}")
    return p


def _apply_overrides(config: Config, args: argparse.Namespace) -> Config:
    changes = {k: v for k, v in (("rundir", args.rundir), ("backend", args.backend),
                                 ("sim_dir", args.sim_dir)) if v is not None}
    if not changes:
        return config
    return dataclasses.replace(config, daemon=dataclasses.replace(config.daemon, **changes))


def _log_channels(manager: Manager) -> None:
    rows = [f"{'ID':>5} {'PEER':>4} {'DIR':3} {'SERVICE':12} {'STATE':8} {'IN':>12} {'OUT':>12}"]
    for c in manager.list_channels():
        rows.append(f"{c['id']:>5} {c['peer']:>4} {c['direction']:3} "
                    f"{c['service'] or '(default)':12} {c['state']:8} {c['bytes_in']:>12} "
                    f"{c['bytes_out']:>12}")
    for link in manager.links.values():
        st = link.ring.stats()
        rows.append(f"link peer {link.peer} {link.role.name.lower()}: ring {link.ring.ring_size} "
                    f"bytes/direction, {len(link.grant_refs)} grants, event channel {link.port}, "
                    f"{'up' if link.up else 'attaching'}, in {st['bytes_in']} out "
                    f"{st['bytes_out']} bytes, {st['notify_sent']} notifications")
    for v in manager.list_vchans():
        rows.append(f"{v['kind']} {v['name']} peer {v['peer']} at {v['path']}: {v['state']}, "
                    f"streams {v['streams']}, in {v['bytes_in']} out "
                    f"{v['bytes_out']} bytes")
    st = manager.statistics()
    rows.append(f"tables: {count(st['channels'], 'channel')}, {st['admitting']} being admitted, "
                f"{count(st['core_streams'], 'stream')} in the data plane; "
                f"{st['streams_fast']} of {st['streams_opened']} streams opened or accepted by "
                "the pumps themselves")
    log.info("channel table (%s):\n%s", manager.status(), "\n".join(rows))


def _start_dbus(manager: Manager, loop: Loop, backend_name: str,
                args: argparse.Namespace) -> DBusFace | None:
    """Returns the started D-Bus face, or None (with one warning) when there is no bus."""
    if args.no_dbus:
        return None
    try:
        from xsockd.dbus_face import DBusFace
    except ImportError as e:
        if args.dbus_address:
            raise XsockError(f"--dbus-address needs pydbus and PyGObject: {e}") from e
        log.warning("D-Bus interface off: %s; install python3-pydbus (Debian) "
                    "or xsockd[service] (pip)", e)
        return None
    face = DBusFace(manager, loop, backend_name)
    try:
        face.start(args.dbus_address)
    except XsockError as e:
        if args.dbus_address:
            raise
        log.warning("D-Bus interface off (xsockctl will not reach us): %s. Start the system "
                    "bus (apt-get install dbus; systemctl start dbus), or pass --dbus-address "
                    "ADDR or --no-dbus", e)
        return None
    return face


def _raise_fd_limit() -> None:
    # Every stream holds one socket in this process: allow as many as the hard limit does.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run(config: Config, args: argparse.Namespace) -> int:
    from xsockd.loop import Loop
    from xsockd.manager import Manager
    from xsockd.service import ServiceNotifier

    _raise_fd_limit()
    backend = make_backend(config.daemon.backend, args.domid, config.daemon.sim_dir)
    loop = Loop()
    manager = Manager(config, backend, loop)
    notifier = ServiceNotifier()
    face: DBusFace | None = None

    def stop() -> None:
        # Graceful: no new streams, in-flight bytes drain (up to [daemon] stop_timeout), then
        # the loop ends and manager.stop() says goodbye and releases everything.  A second
        # SIGTERM or SIGINT stops at once.
        notifier.stopping()
        manager.drain(manager.config.daemon.stop_timeout, loop.stop)

    def reload() -> None:
        try:
            new = _apply_overrides(load_config(args.config), args)
            changes = manager.reload(new)
        except XsockError as e:
            log.error("reload refused, the old configuration stays: %s", e)
            return
        log.info("configuration reloaded from %s: %s", args.config,
                 ", ".join(changes) or "no change")

    def status() -> None:
        notifier.status(manager.status())
        loop.call_later(5.0, status)

    try:
        loop.add_signal(signal.SIGTERM, stop)
        loop.add_signal(signal.SIGINT, stop)
        loop.add_signal(signal.SIGHUP, reload)
        loop.add_signal(signal.SIGUSR1, lambda: _log_channels(manager))
        manager.start()
        face = _start_dbus(manager, loop, config.daemon.backend, args)
        notifier.ready(manager.status())
        interval = notifier.watchdog_interval()
        if interval:
            # Pinged from the loop itself: a loop that stops turning gets us restarted.
            def ping() -> None:
                notifier.ping()
                loop.call_later(interval, ping)
            ping()
        loop.call_later(5.0, status)
        print(f"xsockd: domain {backend.domid} ready", file=sys.stderr, flush=True)
        loop.run()
        log.info("stopping: %s", manager.status())
    finally:
        manager.stop()
        if face is not None:
            face.close()
        loop.close()
        backend.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        from xsockd.demo import main as demo_main

        return demo_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.check_config:
        return check_config_main(
            args.check_config, args.domid,
            lambda cfg: _xen_domid() if (args.backend or cfg.daemon.backend) == "xen" else None)
    from xsockd.service import setup_logging

    setup_logging(args.verbose)
    try:
        config = _apply_overrides(load_config(args.config, "another file: --config FILE"),
                                  args)
        return run(config, args)
    except XsockError as e:
        # An OSError's own sentence, without the "[Errno N]" in front of it.
        text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        print(f"xsockd: {text}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
