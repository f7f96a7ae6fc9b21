"""``xsockd demo``: two simulated domains, an xsockd in each, a stream through them.

Starts a simulated Xen host with domains 0, 1 and 2, an xsockd process for domains 1 and 2, and
an echo service in domain 2; streams data from an application in domain 1 through
``<rundir1>/2.sock`` to the service and back, checks sha256 both ways, prints throughput with a
progress bar and the daemons' channel tables, then stops everything and checks that no grant,
event-channel port or XenStore node is left.  Exit status 0 only if the data arrived intact and
everything was released.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from xsockd.config import parse_config, parse_size
from xsockd.constants import DEFAULT_GRANT_LIMIT
from xsockd.errors import ConfigError
from xsockd.ring import MAX_RING_SIZE, MIN_RING_SIZE, link_pages
from xsockd.sim.child import terminate
from xsockd.sim.host import SimHost
from xsockd.words import plain, size_text

__all__ = ["DaemonProcess", "config_text", "main", "write_config"]

MiB = 1 << 20


def config_text(*, rundir: Path, sim_dir: Path, peers: Sequence[int],
                services: dict[str, Path] | None = None, default: str | None = None,
                ring_size: str = "256KiB", window: str | None = None, extra: str = "") -> str:
    """Returns the text of an xsockd configuration file for a simulated domain."""
    lines = ["[daemon]", f'rundir = "{rundir}"', f"peers = {list(peers)}",
             'backend = "sim"', f'sim_dir = "{sim_dir}"']
    if default:
        lines.append(f'default_service = "{default}"')
    lines += ["", "[link]", f'ring_size = "{ring_size}"']
    if window:
        lines.append(f'stream_window = "{window}"')
    lines.append("")
    for name, sock in (services or {}).items():
        lines += [f"[services.{name}]", f'socket = "{sock}"', ""]
    return "\n".join(lines) + extra + "\n"


def write_config(path: Path, *, rundir: Path, sim_dir: Path, peers: Sequence[int],
                 services: dict[str, Path] | None = None, default: str | None = None,
                 ring_size: str = "256KiB", window: str | None = None, extra: str = "") -> Path:
    """Writes an xsockd configuration file for a simulated domain; returns its path."""
    path.write_text(config_text(rundir=rundir, sim_dir=sim_dir, peers=peers, services=services,
                                default=default, ring_size=ring_size, window=window,
                                extra=extra))
    return path


class DaemonProcess:
    """An ``xsockd --backend sim`` process whose log is kept in a file.

    ``start()`` returns once the daemon says it is ready (its sockets exist).  It serves D-Bus
    only on the bus ``dbus_address`` names (never on the system bus).
    """

    def __init__(self, domid: int, config: Path, log_path: Path, verbose: bool = False,
                 dbus_address: str | None = None) -> None:
        self.domid = domid
        self.dbus_address = dbus_address
        self.config = config
        self.log_path = log_path
        self.verbose = verbose
        self.proc: subprocess.Popen[bytes] | None = None
        self._pump: threading.Thread | None = None

    def start(self, timeout: float = 20.0) -> None:
        cmd = [sys.executable, "-m", "xsockd.daemon", "--backend", "sim",
               "--domid", str(self.domid), "--config", str(self.config)]
        if self.verbose:
            cmd.append("-v")
        cmd += ["--dbus-address", self.dbus_address] if self.dbus_address else ["--no-dbus"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        ready = threading.Event()  # set on the "ready" line, or when stderr ends
        said_ready = threading.Event()
        stderr = self.proc.stderr
        assert stderr is not None

        def pump() -> None:
            with open(self.log_path, "ab") as log:
                for line in stderr:
                    log.write(line)
                    log.flush()
                    if b"ready" in line and b"xsockd: domain" in line:
                        said_ready.set()
                        ready.set()
            ready.set()

        self._pump = threading.Thread(target=pump, daemon=True)
        self._pump.start()
        if ready.wait(timeout) and said_ready.is_set() and self.proc.poll() is None:
            return
        # Not ready.  If its stderr ended, it is exiting but may not be reaped yet (poll() can
        # still say it runs): wait for it, so that its whole stderr is in the log.
        how = f"exited with status {self.proc.poll()}"
        if self.proc.poll() is None:
            try:
                self.proc.wait(5 if ready.is_set() else 0)
                how = f"exited with status {self.proc.returncode}"
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                how = ("closed its stderr but did not exit; killed" if ready.is_set()
                       else f"not ready within {timeout:g} s; killed")
        self._pump.join(5)
        log = self.log().strip() or "(it wrote nothing)"
        raise RuntimeError(f"xsockd for domain {self.domid} did not start ({how}):\n{log}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, signum: int) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signum)

    def stop(self, timeout: float = 15.0) -> int:
        """Returns the exit status after SIGTERM (killing it if it does not stop in time)."""
        if self.proc is None:
            return 0
        terminate(self.proc, timeout)
        if self._pump:
            self._pump.join(5)
        if self.proc.stderr:
            self.proc.stderr.close()
        return self.proc.returncode


def serve_echo(path: str) -> int:
    """Echoes every connection back and prints ``sha256 <hex> <bytes>`` per connection."""
    if os.path.exists(path):
        os.unlink(path)  # a stale socket of an earlier run
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(socket.SOMAXCONN)
    print("listening", flush=True)

    def echo(conn: socket.socket) -> None:
        h = hashlib.sha256()
        buf = bytearray(256 * 1024)
        view = memoryview(buf)
        total = 0
        with conn:
            try:
                while n := conn.recv_into(buf):
                    h.update(view[:n])
                    conn.sendall(view[:n])
                    total += n
                conn.shutdown(socket.SHUT_WR)
            except OSError as e:  # the caller went away: report it, serve the others
                print(f"error {e.strerror} {total}", flush=True)
                return
        print(f"sha256 {h.hexdigest()} {total}", flush=True)

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=echo, args=(conn,), daemon=True).start()


def _bar(done: int, total: int, rate: float, width: int = 30) -> str:
    filled = width * done // max(total, 1)
    return (f"\r  [{'#' * filled}{'.' * (width - filled)}] {done // MiB:5d}/{total // MiB} MiB"
            f"  {rate / 1e6:8.1f} MB/s ")


def stream_through(path: str, total: int, progress: bool = True,
                   midway: threading.Event | None = None,
                   release: threading.Event | None = None) -> tuple[str, str, float]:
    """Returns (sha256 sent, sha256 received back, seconds) for ``total`` bytes echoed.

    ``midway`` is set once half the bytes came back or all were sent, the stream still open;
    given ``release``, the stream is not half-closed before it is set (for up to 30 s).  The
    seconds are those until the last byte came back (the end of the stream may come later).
    """
    blocks = [os.urandom(MiB) for _ in range(8)]
    sent_hash, back_hash = hashlib.sha256(), hashlib.sha256()
    counters = {"sent": 0, "back": 0}
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)

    failure: list[BaseException] = []

    def writer() -> None:
        i = 0
        try:
            while counters["sent"] < total:
                chunk = blocks[i % len(blocks)][: total - counters["sent"]]
                sock.sendall(chunk)
                sent_hash.update(chunk)
                counters["sent"] += len(chunk)
                i += 1
            if midway:
                midway.set()
            if release:
                release.wait(30)
            sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            failure.append(e)
            if midway:
                midway.set()

    start = time.monotonic()
    t = threading.Thread(target=writer, daemon=True)
    t.start()
    buf = bytearray(MiB)
    view = memoryview(buf)
    last = last_byte = 0.0
    while True:
        ready, _, _ = select.select([sock], [], [], 30)
        if not ready:
            raise TimeoutError(f"no data for 30 s after {counters['back']} bytes")
        n = sock.recv_into(buf)
        if not n:
            break
        back_hash.update(view[:n])
        counters["back"] += n
        now = last_byte = time.monotonic()
        if midway and counters["back"] >= total // 2:
            midway.set()
        if progress and now - last > 0.2:
            last = now
            print(_bar(counters["back"], total, counters["back"] / (now - start)), end="",
                  file=sys.stderr, flush=True)
    t.join()
    elapsed = (last_byte if counters["back"] else time.monotonic()) - start
    sock.close()
    if failure or counters["back"] != total:
        raise ConnectionError(f"the stream ended after {counters['sent']} bytes sent and "
                              f"{counters['back']} received back of {total}: "
                              f"{failure[0] if failure else 'early EOF'}")
    if progress:
        print(_bar(counters["back"], total, counters["back"] / elapsed), file=sys.stderr)
    return sent_hash.hexdigest(), back_hash.hexdigest(), elapsed


def _table(daemon: DaemonProcess, before: int, timeout: float = 5.0) -> str:
    """Returns the channel table the daemon logged after SIGUSR1."""
    daemon.signal(signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = daemon.log()[before:]
        if "channel table" in text and "link peer" in text:
            lines = text[text.index("channel table"):].splitlines()
            keep = [ln for ln in lines
                    if (ln.strip() and "INFO" not in ln) or "channel table" in ln]
            return "\n".join("    " + ln for ln in keep[:12])
        time.sleep(0.05)
    return "    (no table logged)"


def _largest_ring(grant_pages: int = DEFAULT_GRANT_LIMIT) -> int:
    """The largest ring size a link can have within ``grant_pages`` (1 + 2 * ring / 4096)."""
    ring = MAX_RING_SIZE
    while ring > MIN_RING_SIZE and link_pages(ring) > grant_pages:
        ring //= 2
    return ring


RING_RANGE = f"a power of two from {size_text(MIN_RING_SIZE)} to {size_text(_largest_ring())}"


def _ring_size(text: str) -> int:
    """argparse type of --ring-size: xsockd's own size syntax and limits."""
    try:
        n = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not MIN_RING_SIZE <= n <= _largest_ring() or n & (n - 1):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not {RING_RANGE} (a link needs 1 + 2 * ring / 4096 grant "
            f"pages, and a domain has {DEFAULT_GRANT_LIMIT})")
    return n


def _mib(text: str) -> int:
    """argparse type of --mib: a positive integer."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return n


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xsockd demo", description=plain(__doc__),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mib", type=_mib, default=256, metavar="N",
                   help="MiB to stream each way, a positive integer (default 256)")
    p.add_argument("--ring-size", type=_ring_size, default=256 * 1024, metavar="SIZE",
                   help=f"ring bytes per direction of the link, such as 65536, 64KiB or 1MiB: "
                        f"{RING_RANGE} (default 256KiB)")
    p.add_argument("--dir", metavar="DIR",
                   help="working directory (configurations, the daemons' logs, sockets), kept "
                        "afterwards; it must be new, empty or one an earlier demo used, since "
                        "the demo overwrites its files (default: a new temporary one, removed "
                        "at the end)")
    p.add_argument("--serve-echo", metavar="SOCKET", help=argparse.SUPPRESS)
    return p


def _configs(work: Path, ring_size: int) -> dict[int, str]:
    """The configuration texts of domains 1 and 2 in ``work``."""
    sim_dir = work / "sim"
    return {
        1: config_text(rundir=work / "run1", sim_dir=sim_dir, peers=[2],
                       ring_size=str(ring_size)),
        2: config_text(rundir=work / "run2", sim_dir=sim_dir, peers=[1],
                       services={"echo": work / "echo.sock"}, default="echo",
                       ring_size=str(ring_size)),
    }


# Left in a --dir the demo used: a later run may overwrite what is there, as its own.
MARKER = ".xsockd-demo"


def _claim(parser: argparse.ArgumentParser, work: Path) -> None:
    """Creates ``work`` or takes it if empty or already the demo's; refuses anything else,
    whose files (dom1.conf, echo.sock, run1/, sim/ ...) the demo would overwrite."""
    try:
        work.mkdir(parents=True, exist_ok=True)
        mine = (work / MARKER).exists() or not any(work.iterdir())
        if mine:
            (work / MARKER).write_text("a working directory of xsockd demo; its files are "
                                       "overwritten by the next demo run here\n")
    except OSError as e:
        parser.error(f"argument --dir: cannot use {work}: {e.strerror}")
    if not mine:
        parser.error(f"argument --dir: {work} is not empty and no earlier demo used it; the "
                     "demo would overwrite files there (dom1.conf, dom2.conf, echo.sock, run1/, "
                     "run2/, sim/, xsockd-*.log): name a new or empty directory, such as "
                     f"{work / 'xsockd-demo'}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.serve_echo:
        return serve_echo(args.serve_echo)
    with tempfile.TemporaryDirectory(prefix="xsockd-demo-") as tmp:
        work = Path(args.dir).resolve() if args.dir else Path(tmp)
        # Everything is checked by xsockd's own validator before anything starts.
        for dom, text in _configs(work, args.ring_size).items():
            try:
                parse_config(text, f"dom{dom}.conf")
            except ConfigError as e:
                parser.error(f"the demo's configuration would be invalid: {e}")
        if args.dir:
            _claim(parser, work)
        ok = _demo(work, args.mib * MiB, args.ring_size)
        if args.dir:
            print(f"(configurations and the daemons' logs are kept in {work})")
        elif not ok:
            print("(the daemons' logs went with the temporary directory; "
                  "run again with --dir DIR to keep them)")
    return 0 if ok else 1


def _demo(work: Path, total: int, ring_size: int) -> bool:
    sim_dir = work / "sim"
    echo_sock = work / "echo.sock"
    run1 = work / "run1"
    print(f"xsockd demo: simulated host in {sim_dir}, domains 0, 1 and 2")
    with SimHost(sim_dir, domains=[0, 1, 2]) as host:
        texts = _configs(work, ring_size)
        conf1, conf2 = work / "dom1.conf", work / "dom2.conf"
        conf1.write_text(texts[1])
        conf2.write_text(texts[2])
        echo = subprocess.Popen([sys.executable, "-m", "xsockd.demo", "--serve-echo",
                                 str(echo_sock)], stdout=subprocess.PIPE, text=True)
        daemons = [DaemonProcess(1, conf1, work / "xsockd-1.log"),
                   DaemonProcess(2, conf2, work / "xsockd-2.log")]
        try:
            assert echo.stdout is not None
            if echo.stdout.readline().strip() != "listening":
                print(f"  FAILED: the echo service did not start at {echo_sock}")
                return False
            try:
                for d in daemons:
                    d.start()
            except RuntimeError as e:
                print("  FAILED: " + str(e).replace("\n", "\n    "))
                return False
            print(f"  xsockd running for domains 1 and 2; echo service in domain 2 at {echo_sock}")
            path = str(run1 / "2.sock")
            print(f"  streaming {total // MiB} MiB from domain 1 through {path} to domain 2's "
                  f"echo service and back")
            marks = [len(d.log()) for d in daemons]
            result: dict[str, object] = {}
            midway, release = threading.Event(), threading.Event()

            def transfer() -> None:
                try:
                    result["r"] = stream_through(path, total, midway=midway, release=release)
                except Exception as e:
                    result["e"] = e

            t = threading.Thread(target=transfer)
            t.start()
            # The tables are taken with the stream open: once half the data came back, or (a
            # short transfer) once all was sent and before the stream is half-closed.
            while not midway.wait(0.05) and t.is_alive():
                pass
            tables = [_table(d, m) for d, m in zip(daemons, marks, strict=True)]
            release.set()
            t.join()
            if "e" in result:
                print(f"\n  FAILED: {result['e']}")
                return False
            sent, back, elapsed = result["r"]  # type: ignore[misc]
            service_line = echo.stdout.readline().split()
            got = service_line[1] if len(service_line) == 3 else "(none)"
            for d, table in zip(daemons, tables, strict=True):
                print(f"  channel table of domain {d.domid} during the transfer "
                      f"(stream open):\n{table}")
            print(f"  domain 1 -> 2: sha256 {sent[:16]}... sent, {got[:16]}... received: "
                  f"{'OK' if got == sent else 'MISMATCH'}")
            print(f"  domain 2 -> 1: sha256 {sent[:16]}... echoed, {back[:16]}... received: "
                  f"{'OK' if back == sent else 'MISMATCH'}")
            print(f"  {2 * total // MiB} MiB moved in {elapsed:.2f} s: "
                  f"{2 * total / elapsed / 1e6:.0f} MB/s through the two daemons "
                  f"({total / elapsed / 1e6:.0f} MB/s each way)")
            intact = got == sent and back == sent
        finally:
            codes = [d.stop() for d in daemons]
            echo.kill()
            echo.wait()
            if echo.stdout:
                echo.stdout.close()
        left = host.leftovers()
        clean = not left and codes == [0, 0]
        print(f"  daemons stopped (exit {codes[0]} and {codes[1]}); "
              f"grants, ports and XenStore nodes left: {left or 'none'}")
    print("demo " + ("passed" if intact and clean else "FAILED"))
    return intact and clean


if __name__ == "__main__":
    sys.exit(main())
