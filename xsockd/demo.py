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

from xsockd.sim.host import SimHost

__all__ = ["DaemonProcess", "main", "write_config"]

MiB = 1 << 20


def write_config(path: Path, *, rundir: Path, sim_dir: Path, peers: Sequence[int],
                 services: dict[str, Path] | None = None, default: str | None = None,
                 ring_size: str = "256KiB", window: str | None = None, extra: str = "") -> Path:
    """Writes an xsockd configuration file for a simulated domain; returns its path."""
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
    path.write_text("\n".join(lines) + extra + "\n")
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
        ready = threading.Event()
        stderr = self.proc.stderr
        assert stderr is not None

        def pump() -> None:
            with open(self.log_path, "ab") as log:
                for line in stderr:
                    log.write(line)
                    log.flush()
                    if b"ready" in line and b"xsockd: domain" in line:
                        ready.set()
            ready.set()

        self._pump = threading.Thread(target=pump, daemon=True)
        self._pump.start()
        if not ready.wait(timeout) or self.proc.poll() is not None:
            raise RuntimeError(f"xsockd for domain {self.domid} did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, signum: int) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signum)

    def stop(self, timeout: float = 15.0) -> int:
        """Returns the exit status after SIGTERM (killing it if it does not stop in time)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
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


def stream_through(path: str, total: int, progress: bool = True) -> tuple[str, str, float]:
    """Returns (sha256 sent, sha256 received back, seconds) for ``total`` bytes echoed."""
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
            sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            failure.append(e)

    start = time.monotonic()
    t = threading.Thread(target=writer, daemon=True)
    t.start()
    buf = bytearray(MiB)
    view = memoryview(buf)
    last = 0.0
    while True:
        ready, _, _ = select.select([sock], [], [], 30)
        if not ready:
            raise TimeoutError(f"no data for 30 s after {counters['back']} bytes")
        n = sock.recv_into(buf)
        if not n:
            break
        back_hash.update(view[:n])
        counters["back"] += n
        now = time.monotonic()
        if progress and now - last > 0.2:
            last = now
            print(_bar(counters["back"], total, counters["back"] / (now - start)), end="",
                  file=sys.stderr, flush=True)
    elapsed = time.monotonic() - start
    t.join()
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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xsockd demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mib", type=int, default=256, help="MiB to stream each way (default 256)")
    p.add_argument("--dir", help="working directory (default: a new temporary one)")
    p.add_argument("--ring-size", default="256KiB", help="ring bytes per direction")
    p.add_argument("--keep", action="store_true", help="keep the working directory")
    p.add_argument("--serve-echo", metavar="SOCKET", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.serve_echo:
        return serve_echo(args.serve_echo)
    with tempfile.TemporaryDirectory(prefix="xsockd-demo-") as tmp:
        work = Path(args.dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        ok = _demo(work, args.mib * MiB, args.ring_size)
        if args.keep and not args.dir:
            print(f"(logs were in {work}; --dir keeps them)")
    return 0 if ok else 1


def _demo(work: Path, total: int, ring_size: str) -> bool:
    sim_dir = work / "sim"
    echo_sock = work / "echo.sock"
    run1, run2 = work / "run1", work / "run2"
    print(f"xsockd demo: simulated host in {sim_dir}, domains 0, 1 and 2")
    with SimHost(sim_dir, domains=[0, 1, 2]) as host:
        conf1 = write_config(work / "dom1.conf", rundir=run1, sim_dir=sim_dir, peers=[2],
                             ring_size=ring_size)
        conf2 = write_config(work / "dom2.conf", rundir=run2, sim_dir=sim_dir, peers=[1],
                             services={"echo": echo_sock}, default="echo", ring_size=ring_size)
        echo = subprocess.Popen([sys.executable, "-m", "xsockd.demo", "--serve-echo",
                                 str(echo_sock)], stdout=subprocess.PIPE, text=True)
        daemons = [DaemonProcess(1, conf1, work / "xsockd-1.log"),
                   DaemonProcess(2, conf2, work / "xsockd-2.log")]
        try:
            assert echo.stdout is not None
            if echo.stdout.readline().strip() != "listening":
                print(f"  FAILED: the echo service did not start at {echo_sock}")
                return False
            for d in daemons:
                d.start()
            print(f"  xsockd running for domains 1 and 2; echo service in domain 2 at {echo_sock}")
            path = str(run1 / "2.sock")
            print(f"  streaming {total // MiB} MiB from domain 1 through {path} to domain 2's "
                  f"echo service and back")
            marks = [len(d.log()) for d in daemons]
            result: dict[str, object] = {}

            def transfer() -> None:
                try:
                    result["r"] = stream_through(path, total)
                except Exception as e:
                    result["e"] = e

            t = threading.Thread(target=transfer)
            t.start()
            time.sleep(0.5)
            tables = [_table(d, m) for d, m in zip(daemons, marks, strict=True)]
            t.join()
            if "e" in result:
                print(f"\n  FAILED: {result['e']}")
                return False
            sent, back, elapsed = result["r"]  # type: ignore[misc]
            service_line = echo.stdout.readline().split()
            got = service_line[1] if len(service_line) == 3 else "(none)"
            for d, table in zip(daemons, tables, strict=True):
                print(f"  channel table of domain {d.domid} during the transfer:\n{table}")
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
