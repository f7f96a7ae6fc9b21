"""``./run clean`` on a copy of the checkout: what set-up, builds and tests made goes, and it
says what and how much; the source tree and a cache outside the checkout stay."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).parent.parent

MADE = {  # what set-up, builds and test runs leave: path -> bytes
    ".venv/bin/python": 1000, ".venv/lib/site.py": 3000, "build/temp/ring_core.o": 5000,
    "xsockd.egg-info/PKG-INFO": 100, "xsockd/_ring_core.abi3.so": 200_000,
    "xsockd/_ring_core.c": 50_000, "xsockd/__pycache__/manager.cpython-311.pyc": 100,
    "tests/__pycache__/x.pyc": 100, ".cache/xen/debs/xen.deb": 3 << 20,
    ".cache/xen/root/usr/lib/x": 1 << 20, ".pytest_cache/v/x": 10, ".ruff_cache/x": 10,
    ".hypothesis/examples/x": 10,
}
SOURCE = ["README.md", "xsockd/manager.py", "xsockd/ring_core.c", "tests/test_x.py",
          "dom1.conf", "conf/xsockd.conf", ".gitignore"]


def checkout(tmp_path: Path) -> Path:
    co = tmp_path / "co"
    co.mkdir()
    shutil.copy(ROOT / "run", co / "run")
    for rel, size in MADE.items():
        (co / rel).parent.mkdir(parents=True, exist_ok=True)
        (co / rel).write_bytes(os.urandom(size))
    for rel in SOURCE:
        (co / rel).parent.mkdir(parents=True, exist_ok=True)
        (co / rel).write_text("source\n")
    return co


def clean(co: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(co / "run"), "clean"], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **env})


def test_clean_removes_what_was_made_and_says_how_much(tmp_path):
    co = checkout(tmp_path)
    r = clean(co)
    assert r.returncode == 0, r.stderr
    for rel in MADE:
        assert not (co / rel).exists(), f"{rel} is left"
    for rel in [*SOURCE, "run"]:
        assert (co / rel).read_text(), f"{rel} was removed"
    lines = r.stdout.splitlines()
    for top in (".venv", "build", "xsockd.egg-info", "xsockd/_ring_core.abi3.so",
                "xsockd/_ring_core.c", "xsockd/__pycache__", "tests/__pycache__",
                ".pytest_cache", ".ruff_cache", ".hypothesis"):
        assert any(ln.startswith(f"run: removed {top} (") for ln in lines), (top, r.stdout)
    assert "run: removed .cache (4 MiB)" in lines, r.stdout
    assert lines[-1] == "run: removed 4 MiB in all", r.stdout
    # Again: nothing left to remove, and it says so.
    assert clean(co).stdout.splitlines() == ["run: removed 0 KiB in all"]


def test_clean_keeps_a_cache_outside_the_checkout_and_names_it(tmp_path):
    co = checkout(tmp_path)
    outside = tmp_path / "xencache"
    (outside / "debs").mkdir(parents=True)
    (outside / "debs" / "xen.deb").write_bytes(os.urandom(2 << 20))
    r = clean(co, XSOCK_XEN_CACHE=str(outside))
    assert (outside / "debs" / "xen.deb").exists()
    assert f"run: kept the Xen cache {outside} (XSOCK_XEN_CACHE; 2 MiB)" in r.stdout, r.stdout


def test_run_help_lists_clean():
    r = subprocess.run(["sh", str(ROOT / "run"), "help"], capture_output=True, text=True)
    assert r.returncode == 2 and "./run clean" in r.stdout
