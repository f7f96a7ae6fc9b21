"""The bash completion of xsockctl (conf/completion/xsockctl) offers its commands and options."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "conf" / "completion" / "xsockctl"


# Stands in for xsockctl on PATH: its list of two open channels, then a vchan (whose rows
# are no channel ids).
FAKE_XSOCKCTL = """#!/bin/sh
[ "$1" = list ] || exit 2
echo "   ID PEER DIR SERVICE  STATE"
echo "    3    2 out (default) open"
echo "   12    2 in  web       open"
echo ""
echo "KIND          NAME  PEER  STATE      STREAMS"
echo "vchan-server  qmp      7  published        0"
"""


def complete(*words: str, bindir: Path | None = None) -> list[str]:
    """Returns what bash completes for the command line ``xsockctl WORDS`` (last word: cursor)."""
    if shutil.which("bash") is None:
        pytest.fail("bash is missing")
    argv = " ".join(f"'{w}'" for w in ("xsockctl", *words))
    path = f"{bindir}:/usr/bin:/bin" if bindir else "/usr/bin:/bin"
    script = (f'source "{SCRIPT}"; COMP_WORDS=({argv}); COMP_CWORD={len(words)}; '
              f'PATH={path} _xsockctl; printf "%s\\n" "${{COMPREPLY[@]}}"')
    r = subprocess.run(["bash", "--norc", "-c", script], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0 and not r.stderr, r.stderr
    return [w for w in r.stdout.splitlines() if w]


def test_first_word_offers_commands_and_options():
    assert set(complete("")) == {"list", "show", "close", "stats", "--system", "--address",
                                 "--json", "--help", "--version"}
    assert complete("st") == ["stats"]


def test_after_a_command_only_its_options():
    assert complete("list", "--") == ["--json", "--system", "--address", "--help"]



def test_show_and_close_offer_the_ids_of_open_channels(tmp_path):
    fake = tmp_path / "xsockctl"
    fake.write_text(FAKE_XSOCKCTL)
    fake.chmod(0o755)
    assert complete("--system", "show", "", bindir=tmp_path) == ["3", "12"]
    assert complete("close", "1", bindir=tmp_path) == ["12"]
    assert complete("close", "--", bindir=tmp_path) == ["--json", "--system", "--address",
                                                        "--help"]


def test_address_offers_a_unix_path():
    assert complete("--address", "") == ["unix:path="]
