"""Debian's systemd as PID 1 in a throw-away container made from this machine's own root.

The container's root is an overlay: this machine's root file system read-only below (that one
file system: a /usr or /var mounted apart from it would be missing), a tmpfs above, mounted in
a mount namespace of its own (``unshare --mount``) so that nothing of it shows on the host, and
gone with the container. So the container starts as a copy of this machine, packages and all,
and whatever a test does inside (``apt install``, units in /etc, users, files in /run) is
thrown away when it stops. (``systemd-nspawn --volatile=yes`` would keep /usr read-only and
/etc, /var empty: no apt.) It has a network of its own (``--private-network``): the services
this machine enables start inside too, and must not touch its interfaces. The host has no
systemd of its own, hence ``--register=no --keep-unit``. Commands run inside through
``nsenter`` into every namespace of the container's systemd.

    with SystemdContainer("xsockd-test", log=tmpdir / "console.log") as c:
        c.install("/etc/systemd/system/foo.service", text)
        c.run("systemctl", "daemon-reload")

Stopping sends SIGTERM to nspawn (which halts the container), waits, then SIGKILL, and then
checks that no process of the container's PID namespace is left; ``stop`` is idempotent and
``__exit__`` always calls it, so a failing or interrupted test leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["ContainerError", "SystemdContainer"]

NSPAWN = "systemd-nspawn"
INSIDE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
              "LANG": "C.UTF-8", "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": ""}
_PR_SET_PDEATHSIG = 1


class ContainerError(AssertionError):
    """The container did not boot, or a command inside it failed (message says which)."""


def _die_with_parent() -> None:
    # If the test process is killed outright, nspawn gets SIGTERM and halts the container.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(x) for x in f.read().split()]
    return out


def _ns_pids(pid: int) -> list[int]:
    """Returns the pid of ``pid`` in each nested PID namespace (the NSpid line), or []."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return [int(x) for x in line.split()[1:]]
    except OSError:
        pass
    return []


class SystemdContainer:
    """One booted container; see the module docstring."""

    def __init__(self, name: str, *, binds_ro: Sequence[str | os.PathLike[str]] = (),
                 log: str | os.PathLike[str], boot_timeout: float = 60.0) -> None:
        self.name = name
        self.binds_ro = [str(b) for b in binds_ro]
        self.log_path = Path(log)
        # Where the overlay is mounted, in the container's mount namespace only.
        self.mountpoint = self.log_path.parent / f"{name}.root"
        self.boot_timeout = boot_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None        # the container's systemd, as seen from the host
        self._pidns: str | None = None     # its PID namespace, to find stragglers

    # ---- life cycle -----------------------------------------------------------------------

    def __enter__(self) -> SystemdContainer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        if shutil.which(NSPAWN) is None:
            raise ContainerError(f"{NSPAWN} is missing: apt-get install systemd-container")
        for tool in ("unshare", "nsenter"):
            if shutil.which(tool) is None:
                raise ContainerError(f"{tool} is missing: apt-get install util-linux")
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        nspawn = [NSPAWN, "-D", "{root}", "--register=no", "--keep-unit", "--private-network",
                  "-M", self.name, "--boot", "--console=pipe"]
        nspawn += [f"--bind-ro={b}" for b in self.binds_ro]
        # The shell mounts the overlay in unshare's private mount namespace, then becomes nspawn
        # (exec: self.proc is nspawn, which a SIGTERM halts).
        d = str(self.mountpoint)
        script = ('set -e; d=$1; shift; mount -t tmpfs -o mode=0755 xsockd-test "$d"; '
                  'mkdir "$d/upper" "$d/work" "$d/root"; '
                  'mount -t overlay -o "lowerdir=/,upperdir=$d/upper,workdir=$d/work" '
                  'xsockd-test "$d/root"; exec "$@"')
        argv = ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", script,
                "sh", d, *[a.replace("{root}", f"{d}/root") for a in nspawn]]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + self.boot_timeout
        state = "(no systemd yet)"
        while True:
            if self.proc.poll() is not None:
                raise ContainerError(f"{NSPAWN} exited with {self.proc.returncode} while "
                                     f"booting:\n{self.console()}")
            if self.pid is None:
                self.pid = self._find_init()
            if self.pid is not None:
                r = self.run("systemctl", "is-system-running", check=False, timeout=10)
                state = r.stdout.strip() or r.stderr.strip()
                if state in ("running", "degraded"):
                    return
            if time.monotonic() > deadline:
                raise ContainerError(f"container {self.name} not up after {self.boot_timeout:.0f}"
                                     f" s (is-system-running: {state}):\n{self.console()}")
            time.sleep(0.2)

    def _find_init(self) -> int | None:
        """Returns the host pid of the process that is PID 1 in a PID namespace below nspawn."""
        assert self.proc is not None
        todo = [self.proc.pid]
        while todo:
            pid = todo.pop()
            ns = _ns_pids(pid)
            if len(ns) > 1 and ns[-1] == 1:
                self._pidns = os.readlink(f"/proc/{pid}/ns/pid")
                return pid
            todo += _children(pid)
        return None

    def stop(self, timeout: float = 20.0) -> None:
        """Halts the container (SIGTERM, then SIGKILL) and kills anything of it still left."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        for pid in self.leftovers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.pid = None

    def leftovers(self) -> list[int]:
        """Returns the pids of processes still alive in the container (nspawn included)."""
        left = []
        if self.proc is not None and self.proc.poll() is None:
            left.append(self.proc.pid)
        if self._pidns is None:
            return left
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{entry}/ns/pid") == self._pidns:
                        left.append(int(entry))
        return left

    def console(self, tail: int = 4000) -> str:
        """Returns the end of nspawn's output (the container's console)."""
        try:
            return self.log_path.read_bytes()[-tail:].decode(errors="replace")
        except OSError:
            return "(no console log)"

    # ---- inside ---------------------------------------------------------------------------

    def run(self, *argv: str, input: str | bytes | None = None, check: bool = True,
            timeout: float = 60.0, text: bool = True) -> subprocess.CompletedProcess:
        """Runs argv inside the container (as root, in all its namespaces); returns the result.

        With check, a non-zero exit raises ContainerError showing the command and its output.
        """
        if self.pid is None:
            raise ContainerError(f"container {self.name} is not running")
        if isinstance(input, str) and not text:
            input = input.encode()
        r = subprocess.run(["nsenter", "-t", str(self.pid), "-a", *argv], input=input,
                           capture_output=True, text=text, timeout=timeout, env=INSIDE_ENV)
        if check and r.returncode != 0:
            # A failed systemctl says little ("A dependency job ... failed"): the journals of
            # the failed units say why, and must be read before the container goes.
            why = self.failed_units_report() if argv[0] == "systemctl" else ""
            raise ContainerError(f"in {self.name}: {shlex.join(argv)} exited with "
                                 f"{r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}{why}")
        return r

    def failed_units_report(self, lines: int = 40) -> str:
        """Returns, for each failed unit inside, its status and the end of its journal."""
        try:
            r = self.run("systemctl", "list-units", "--failed", "--plain", "--no-legend",
                         check=False, timeout=20)
            units = [line.split()[0] for line in r.stdout.splitlines() if line.strip()]
            out = f"\n--- failed units: {' '.join(units) or '(none)'}"
            for u in units:
                out += f"\n--- journalctl -u {u} -n {lines}:\n{self.journal(u, lines=lines)}"
            return out
        except (ContainerError, subprocess.TimeoutExpired) as e:
            return f"\n(no list of failed units: {e})"

    def sh(self, script: str, *, check: bool = True, timeout: float = 60.0,
           input: str | None = None) -> subprocess.CompletedProcess:
        """Runs a shell script inside the container; see ``run``."""
        return self.run("/bin/sh", "-c", script, check=check, timeout=timeout, input=input)

    def install(self, path: str, content: str, mode: int = 0o644) -> None:
        """Writes ``content`` to ``path`` inside (creating its directory), as root, with mode."""
        self.run("/bin/sh", "-c", 'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod "$2" "$1"',
                 "sh", path, f"{mode:o}", input=content)

    def remove(self, path: str) -> None:
        self.run("rm", "-f", "--", path)

    def journal(self, *units: str, lines: int = 30) -> str:
        """Returns the last lines of the journal of units (all of them if none), or why not."""
        argv = ["journalctl", "--no-pager", "-n", str(lines)]
        for u in units:
            argv += ["-u", u]
        try:
            r = self.run(*argv, check=False, timeout=20)
        except (ContainerError, subprocess.TimeoutExpired) as e:
            return f"(no journal: {e})"
        return r.stdout + r.stderr
