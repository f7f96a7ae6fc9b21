"""The man pages (man/*.rst, built by debian/rules with rst2man) agree with --help and the config.

Each option --help lists, each xsockctl command and each key of the commented reference
configuration (conf/xsockd.conf) must be in its page, and each page must build without a warning.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAN = ROOT / "man"
BIN = Path(sys.executable).parent
PAGES = {"xsockd": "xsockd.8.rst", "xsockctl": "xsockctl.1.rst",
         "xsockd-simhost": "xsockd-simhost.8.rst"}


def help_text(*argv: str) -> str:
    r = subprocess.run([str(BIN / argv[0]), *argv[1:], "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def options(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", text))


@pytest.mark.parametrize("prog", sorted(PAGES))
def test_every_option_of_help_is_in_the_man_page(prog):
    page = (MAN / PAGES[prog]).read_text()
    text = help_text(prog)
    if prog == "xsockctl":
        for cmd in ("list", "show", "close", "stats"):
            assert re.search(rf"^{cmd}\b", page, re.M), f"xsockctl(1) lacks the command {cmd}"
            text += help_text(prog, cmd)
    assert "--help" in options(text), text
    missing = sorted(o for o in options(text) if o not in page)
    assert not missing, f"man/{PAGES[prog]} does not describe {missing}"


def test_every_key_of_the_reference_configuration_is_in_xsockd_conf_5():
    page = (MAN / "xsockd.conf.5.rst").read_text()
    # Example tables shipped commented out ("#[vchan.x]", "#key = value") count too.
    shipped = (ROOT / "conf" / "xsockd.conf").read_text()
    text = re.sub(r"^#(?=\[|[a-z_]+ = )", "", shipped, flags=re.M)
    conf = tomllib.loads(text)
    keys = {k for table in ("daemon", "link") for k in conf[table]}
    keys |= {k for svc in conf["services"].values() for k in svc}
    keys |= {k for remote in conf["remote"].values() for k in remote}
    keys |= {k for vchan in conf["vchan"].values() for k in vchan}
    missing = sorted(k for k in keys if not re.search(rf"^{k}$", page, re.M))
    assert not missing, f"man/xsockd.conf.5.rst does not describe {missing}"


@pytest.mark.parametrize("page", sorted(p.name for p in MAN.glob("*.rst")))
def test_page_builds_without_a_warning(page, tmp_path):
    rst2man = shutil.which("rst2man", path="/usr/bin")
    if rst2man is None:
        pytest.fail("rst2man is missing: apt-get install python3-docutils (./run deb does)")
    r = subprocess.run([rst2man, "--exit-status=warning", str(MAN / page), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not r.stderr, r.stderr
    assert (tmp_path / "out").read_text().startswith(".\\\" Man page generated from")


@pytest.mark.parametrize("argv", [("xsockd",), ("xsockd", "demo"), ("xsockd-simhost",),
                                  ("xsockctl",), ("xsockctl", "list"), ("xsockctl", "show"),
                                  ("xsockctl", "close"), ("xsockctl", "stats")])
def test_help_shows_no_rest_markup(argv):
    """Descriptions come from docstrings written in reST; --help shows their literals plainly
    (the man pages keep the markup, rendered by rst2man)."""
    text = help_text(*argv)
    assert "``" not in text, [line for line in text.splitlines() if "``" in line]
