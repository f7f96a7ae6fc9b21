"""The README's by-hand section, run as written: its two configuration files and its commands.

The commands are taken from the README's code blocks, not copied here; only what a person
does at the keyboard is stood in for: the lines are run by one bash (job control as in a
terminal), /run/xsock-try becomes a temporary directory, a line typed into each `socat -`
comes from a pipe, and the script waits for each background process to be ready before the
next line, as a person reading its output would.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from xsockd.backend_sim import SimBackend
from xsockd.config import parse_config

README = Path(__file__).parent.parent / "README.md"
VENV = Path(sys.executable).parent.parent
MARK = "@@@ line"

# Bash run before the README's lines: waits a background line's readiness calls for.
PRELUDE = r"""
await_socket() { for _ in $(seq 300); do [ -S "$1" ] && return 0; sleep 0.1; done
                 echo "timed out waiting for the socket $1" >&2; exit 90; }
await_line() { for _ in $(seq 300); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1
               done; echo "timed out waiting for '$2' in $1" >&2; exit 90; }
"""


def section(name: str) -> str:
    text = README.read_text()
    start = text.index(f"## {name}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else len(text)]


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def by_hand_script(try_dir: Path) -> tuple[str, dict[int, str]]:
    """Returns the bash script of the by-hand commands and, per README line number, the line
    typed into its `socat -`."""
    sh = blocks(section("By hand"), "sh")
    assert len(sh) == 1, "the by-hand section has one block of commands"
    out = [PRELUDE]
    typed: dict[int, str] = {}
    for n, line in enumerate(sh[0].replace("/run/xsock-try", str(try_dir)).splitlines()):
        line = line.replace(". .venv/bin/activate", f". {VENV}/bin/activate")
        out.append(f"echo '{MARK} {n}'")
        if line.startswith("socat - "):
            typed[n] = f"typed into line {n}"
            line = f"printf '%s\\n' '{typed[n]}' | {line}"
        out.append(line)
        # What a person waits for before typing the next line.
        if "xsockd.sim.host" in line:
            out.append(f"await_socket {try_dir}/sim/control.sock")
        elif m := re.search(r"UNIX-LISTEN:([^,\s]+)", line):
            out.append(f"await_socket {m.group(1)}")
        elif m := re.search(r"^xsockd .*--domid (\d+) .*2>(\S+)", line):
            out.append(f"await_line {m.group(2)} 'xsockd: domain {m.group(1)} ready'")
    return "\n".join(out) + "\n", typed


def outputs(stdout: str) -> dict[int, str]:
    """Splits the script's stdout by README line."""
    parts: dict[int, str] = {}
    for chunk in stdout.split(MARK + " ")[1:]:
        n, _, rest = chunk.partition("\n")
        parts[int(n)] = rest
    return parts


def test_the_by_hand_configurations_are_valid():
    confs = blocks(section("By hand"), "toml")
    assert len(confs) == 2
    for text in confs:
        parse_config(text, "README")


def test_the_by_hand_commands_work_as_written(tmp_path):
    try_dir = tmp_path / "xt"
    confs = blocks(section("By hand"), "toml")
    try_dir.mkdir(mode=0o755)  # the README's first step, before its configurations are written
    (try_dir / "dom1.conf").write_text(confs[0].replace("/run/xsock-try", str(try_dir)))
    (try_dir / "dom2.conf").write_text(confs[1].replace("/run/xsock-try", str(try_dir)))
    script, typed = by_hand_script(try_dir)
    proc = subprocess.Popen(["bash", "-c", script], cwd=tmp_path, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"the by-hand run hung:\n{out}\n{err}") from None
    finally:
        bus = try_dir / "bus"
        if bus.exists() and (pid := bus.read_text().split()[-1]).isdigit():
            try:
                os.kill(int(pid), signal.SIGTERM)  # the README's last line did not run
            except ProcessLookupError:
                pass
    said = outputs(out)
    lines = blocks(section("By hand"), "sh")[0].splitlines()
    assert proc.returncode == 0 and len(said) == len(lines), f"{out}\n{err}"
    # Both talks came back: the echo as typed, "web" after the caller header.
    for n, text in typed.items():
        assert text in said[n], (lines[n], said[n], err)
        if "web.sock" in lines[n]:
            assert said[n].startswith("XSOCK/1 domid=1 service=web\n"), said[n]
    assert len(typed) == 2
    stats = next(said[n] for n, ln in enumerate(lines) if "xsockctl" in ln)
    assert re.search(r"streams_opened:\s+2\b", stats), stats
    assert re.search(r"streams_failed:\s+0\b", stats), stats
    logs = next(said[n] for n, ln in enumerate(lines) if ln.startswith("tail "))
    assert "xsockd domain 1 ready" in logs and "xsockd domain 2 ready" in logs, logs
    # The terminal got no daemon's log line, and the host's report says nothing was left.
    assert "xsockd[" not in err and "Traceback" not in err, err
    assert "sim host: nothing left behind" in err, err
    left = [p for p in try_dir.rglob("*") if p.is_socket() and p.name != "echo.sock"
            and p.name != "web.sock"]  # socat leaves its listening socket; nothing else may
    assert left == [], left


def test_the_sim_host_reports_what_a_domain_left_behind(tmp_path):
    host = subprocess.Popen([sys.executable, "-m", "xsockd.sim.host", "--dir", str(tmp_path),
                             "--domains", "0,1,2"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert host.stdout is not None and host.stdout.readline() == "ready\n"
    backend, held = SimBackend(1, tmp_path), ()
    try:
        held = (backend.grant(2, 3), backend.alloc_unbound(2))  # not released before the stop
        host.send_signal(signal.SIGTERM)
        _, err = host.communicate(timeout=30)
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()
        for thing in (*held, backend):
            try:
                thing.close()
            except OSError:
                pass  # the host is gone: nothing to tell it
    assert "sim host: LEFT BEHIND: domain 1: 3 granted pages, 1 event-channel ports" in err, err
