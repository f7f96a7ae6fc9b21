"""xsockctl: list, show, close channels of the local xsockd and read its statistics.

It reaches the daemon only over D-Bus (``dbus_face.Client``), never through its files.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from xsockd import __version__
from xsockd.constants import DBUS_NAME, DBUS_READ_GROUP
from xsockd.errors import AccessDenied, DaemonNotRunning, NoSuchChannel, XsockError

__all__ = ["EXIT_DENIED", "EXIT_ERROR", "EXIT_NOT_RUNNING", "EXIT_OK", "EXIT_USAGE", "main"]

EXIT_OK = 0
EXIT_ERROR = 1          # the daemon refused: no such channel, or it failed and said why
EXIT_USAGE = 2          # bad command line (argparse's code)
EXIT_NOT_RUNNING = 3    # no xsockd on the bus, or no bus
EXIT_DENIED = 4         # the bus policy or the daemon denied the call

DESCRIPTION = f"""\
Inspect and control the xsockd of this domain over D-Bus ({DBUS_NAME}).

Commands:
  list          the open channels, one line each; then the [vchan.NAME] endpoints
                (libxenvchan), if any: kind, name, peer, state, streams, bytes, path
  show ID       every field of channel ID (grant refs, event channel, ring sizes...)
  close ID      abort channel ID: both applications see the stream end (root only)
  stats         the daemon's domain, backend, version and counters
Each takes --json for machine-readable output, before or after the command.

Access on the system bus: root may do everything; members of group {DBUS_READ_GROUP} may list,
show and stats; others may do nothing.

Exit status:
  {EXIT_OK}  success
  {EXIT_ERROR}  no such channel, or the daemon could not do it (the message says why)
  {EXIT_USAGE}  bad command line
  {EXIT_NOT_RUNNING}  xsockd is not running (nobody owns {DBUS_NAME}) or the bus is unreachable
  {EXIT_DENIED}  access denied (by the bus policy or by the daemon)
"""

COLUMNS = [("ID", ">"), ("PEER", ">"), ("DIR", "<"), ("SERVICE", "<"), ("STATE", "<"),
           ("BYTES IN", ">"), ("BYTES OUT", ">"), ("RING", ">"), ("AGE", ">"), ("EVTCHN", ">"),
           ("GRANTS", ">")]
VCHAN_COLUMNS = [("KIND", "<"), ("NAME", "<"), ("PEER", ">"), ("STATE", "<"), ("STREAMS", ">"),
                 ("BYTES IN", ">"), ("BYTES OUT", ">"), ("PATH", "<")]


def _global_options() -> argparse.ArgumentParser:
    """The options every command takes, before or after it (``--json list``, ``list --json``).

    They are added to the main parser and to each command's; SUPPRESS as the default keeps a
    value given before the command from being reset by the command's parser.
    """
    g = argparse.ArgumentParser(add_help=False)
    opts = g.add_argument_group("options (before or after COMMAND)")
    opts.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                      help="print JSON instead of text")
    opts.add_argument("--system", action="store_true", default=argparse.SUPPRESS,
                      help="talk to the xsockd on the system bus (the default)")
    opts.add_argument("--address", metavar="ADDR", default=argparse.SUPPRESS,
                      help="talk to the xsockd on the bus at ADDR (as xsockd --dbus-address)")
    return g


def _parser() -> argparse.ArgumentParser:
    common = _global_options()
    p = argparse.ArgumentParser(prog="xsockctl", description=DESCRIPTION, parents=[common],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"xsockctl {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("list", parents=[common], help="list the open channels and vchans")
    for name, what in (("show", "show every field of channel ID"),
                       ("close", "abort channel ID (root only)")):
        sp = sub.add_parser(name, parents=[common], help=what)
        sp.add_argument("id", type=int, metavar="ID", help="channel id, as list shows it")
    sub.add_parser("stats", parents=[common], help="show the daemon's counters")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Returns the command line with every global option set, wherever it was given."""
    p = _parser()
    args = p.parse_args(argv)
    if getattr(args, "system", False) and getattr(args, "address", None) is not None:
        p.error("--system and --address ADDR name two different buses: give one")
    args.json = getattr(args, "json", False)
    args.system = getattr(args, "system", False)
    args.address = getattr(args, "address", None)
    return args


def _age(created: float) -> str:
    secs = max(0, int(time.time() - created))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{secs // size}{unit}"
    return f"{secs}s"


def _ring(size: int) -> str:
    return f"{size // 1048576}M" if size >= 1048576 and size % 1048576 == 0 else \
        f"{size // 1024}K" if size % 1024 == 0 else str(size)


def _table(columns: list[tuple[str, str]], rows: list[list[str]]) -> str:
    """Returns ``rows`` under a header line of ``columns`` (name, alignment)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, (h, _) in enumerate(columns)]
    lines = []
    for cells in [[h for h, _ in columns], *rows]:
        lines.append("  ".join(f"{cell:{align}{w}}" for cell, (_, align), w
                               in zip(cells, columns, widths, strict=True)).rstrip())
    return "\n".join(lines)


def format_table(channels: list[dict[str, Any]]) -> str:
    """Returns the channels as a table with a header line."""
    return _table(COLUMNS, [
        [str(c["id"]), str(c["peer"]), c["direction"], c["service"] or "(default)",
         c["state"], str(c["bytes_in"]), str(c["bytes_out"]), _ring(c["ring_size_tx"]),
         _age(c["created"]), str(c["event_channel"]), str(len(c["grant_refs"]))]
        for c in channels])


def format_vchans(vchans: list[dict[str, Any]]) -> str:
    """Returns the vchan endpoints as a table with a header line.  Its rows start with a
    word, never a number: what reads channel ids from ``list`` (the completion) skips them."""
    return _table(VCHAN_COLUMNS, [
        [v["kind"], v["name"], str(v["peer"]), v["state"], str(v["streams"]),
         str(v["bytes_in"]), str(v["bytes_out"]), v["path"]] for v in vchans])


def _ranges(numbers: list[int]) -> str:
    """Returns "8-136 (129)" for a run of consecutive numbers, "3 7 9 (3)" otherwise."""
    parts: list[str] = []
    start = prev = None
    for n in [*numbers, None]:
        if n is not None and prev is not None and n == prev + 1:
            prev = n
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = n
    return f"{' '.join(parts)} ({len(numbers)})"


def format_fields(fields: dict[str, Any]) -> str:
    """Returns ``fields`` as aligned "key: value" lines."""
    width = max(map(len, fields), default=0)
    lines = []
    for key, value in fields.items():
        if isinstance(value, list):
            value = _ranges(value)
        elif key in ("created", "started") and isinstance(value, float):
            value = f"{value:.3f} ({time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(value))})"
        elif isinstance(value, float):
            value = f"{value:.3f}"
        elif key == "service" and not value:
            value = "(default)"  # as list shows it
        lines.append(f"{key + ':':{width + 1}} {value}")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    try:
        from xsockd.dbus_face import Client
    except ImportError as e:
        print("xsockctl: needs pydbus and PyGObject (Debian: apt install python3-pydbus "
              f"python3-gi; pip: pip install 'xsockd[service]'): {e}",
              file=sys.stderr)
        return EXIT_ERROR
    with Client(args.address) as client:
        if args.command == "list":
            channels = client.list_channels()
            vchans = client.list_vchans()
            if args.json:
                print(json.dumps({"channels": channels, "vchans": vchans}, indent=2))
                return EXIT_OK
            print(format_table(channels) if channels else "no channels")
            if vchans:
                print(f"\n{format_vchans(vchans)}")
        elif args.command == "show":
            channel = client.get_channel(args.id)
            print(json.dumps(channel, indent=2) if args.json else format_fields(channel))
        elif args.command == "close":
            client.close_channel(args.id)
            print(json.dumps({"closed": args.id}) if args.json else f"channel {args.id} closed")
        else:
            props = client.properties()
            fields = {"backend": props["Backend"], "version": props["Version"],
                      **client.statistics()}
            print(json.dumps(fields, indent=2) if args.json else format_fields(fields))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return _run(args)
    except DaemonNotRunning as e:
        print(f"xsockctl: {e}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    except AccessDenied as e:
        print(f"xsockctl: {e}", file=sys.stderr)
        return EXIT_DENIED
    except (NoSuchChannel, XsockError) as e:
        print(f"xsockctl: {e}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        return EXIT_OK  # `xsockctl list | head`


if __name__ == "__main__":
    sys.exit(main())
