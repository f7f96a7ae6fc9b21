"""The ring and vchan tests again, against the C core built with AddressSanitizer and UBSan.

The core parses memory a hostile peer writes; a read past a buffer there may not crash, so the
hostile and fuzz tests of tests/test_ring.py, test_fast_accept.py, test_early_data.py,
test_pump_listen.py, test_vchan.py and test_vchan_pump.py run here once more with every
out-of-bounds access, use after free and undefined behaviour made fatal. The sanitized core is
built into a temporary directory under its own module name (xsockd/_ring_core*.so is never
touched), with its ring indices (and a vchan server's) starting just below 2^32 so that every
test also crosses the index wrap. A subprocess (the sanitizer runtime must be preloaded into
the interpreter) maps it in place of xsockd._ring_core and runs pytest. A canary with a
deliberate heap overflow first proves that a report is seen.

Needs gcc with libasan8 and libubsan1 (Debian 12: packages gcc-12, libasan8, libubsan1).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from cffi import FFI

from xsockd import _build

ROOT = Path(__file__).resolve().parent.parent
SANITIZE = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer",
            "-fno-sanitize-recover=all"]
INDEX_BASE = 0xFFFFF800  # 2 KiB below the wrap: 16-aligned, not ring-aligned
MODULE = "_xsk_ring_core_sanitized"
# A sanitizer report, whichever runtime wrote it.
REPORT = re.compile(r"ERROR: \w+Sanitizer|runtime error:|SUMMARY: \w+Sanitizer")
FUZZ_ITERATIONS = 1000


def _runtime(name: str, package: str) -> str:
    """Returns the path of gcc's sanitizer runtime ``name`` (libasan, libubsan)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc is missing: install the Debian package gcc-12 (or gcc)")
    out = subprocess.run([gcc, f"-print-file-name={name}.so"], capture_output=True, text=True,
                         check=False).stdout.strip()
    real = os.path.realpath(out) if os.path.isabs(out) else ""
    if not real or not os.path.exists(real):
        pytest.fail(f"{name}.so is missing: install the Debian package {package}")
    return real


@pytest.fixture(scope="module")
def sanitized(tmp_path_factory) -> dict:
    """Builds the sanitized core and the canary; returns the environment to run them in."""
    preload = [_runtime("libasan", "libasan8"), _runtime("libubsan", "libubsan1")]
    out = tmp_path_factory.mktemp("sanitized")
    start = time.monotonic()
    core = _build.make_builder(
        MODULE, source_dir=str(ROOT / "xsockd"), extra_cflags=(*SANITIZE, "-O1", "-g"),
        extra_ldflags=tuple(SANITIZE), macros=(("XSK_TEST_INDEX_BASE", f"{INDEX_BASE:#x}u"),),
        extra_cdef=f"\n#define XSK_TEST_INDEX_BASE {INDEX_BASE}\n")
    canary = FFI()
    canary.cdef("int xsk_canary(int i);")
    canary.set_source("_xsk_canary", textwrap.dedent("""
        #include <stdlib.h>
        int xsk_canary(int i)
        {
            volatile char *p = calloc(4, 1);
            int r = p[i];
            free((void *)p);
            return r;
        }"""), extra_compile_args=[*SANITIZE, "-O0"], extra_link_args=SANITIZE)
    for builder in (core, canary):
        try:
            builder.compile(tmpdir=str(out))
        except Exception as e:  # the compiler's output (on stderr) says why
            pytest.fail(f"building the sanitized module failed: {e}")
    env = dict(os.environ)
    # Python's own allocator is not ours to judge (no leak checks); every other report is
    # fatal, with an exit code of its own.
    env.update(
        LD_PRELOAD=":".join(preload),
        ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:exitcode=86",
        UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:exitcode=87",
        XSOCKD_RING_FUZZ_ITERATIONS=str(FUZZ_ITERATIONS),
        PYTHONDONTWRITEBYTECODE="1",
    )
    print(f"sanitized build: {time.monotonic() - start:.1f}s")
    return {"dir": str(out), "env": env}


def _run(sanitized: dict, body: str, timeout: float) -> subprocess.CompletedProcess:
    """Runs ``body`` in a fresh interpreter whose xsockd._ring_core is the sanitized one."""
    boot = textwrap.dedent(f"""
        import importlib, sys
        sys.path.insert(0, {sanitized['dir']!r})
        mod = importlib.import_module({MODULE!r})
        sys.modules["xsockd._ring_core"] = mod
        import xsockd.ring, xsockd.vchan
        assert xsockd.ring.lib is mod.lib, "the sanitized core is not the one in use"
        assert xsockd.vchan.lib is mod.lib, "the sanitized core is not the one in use"
        assert xsockd.ring.lib.XSK_TEST_INDEX_BASE == {INDEX_BASE}
        assert "libasan" in open("/proc/self/maps").read(), "ASan runtime not loaded"
    """) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", boot], cwd=ROOT, env=sanitized["env"],
                          capture_output=True, text=True, timeout=timeout, check=False)


def _report(proc: subprocess.CompletedProcess) -> str | None:
    """Returns the sanitizer report in the run's output, or None."""
    text = proc.stdout + proc.stderr
    m = REPORT.search(text)
    return text[max(0, m.start() - 2000):m.start() + 30000] if m else None


def test_a_sanitizer_report_is_seen(sanitized):
    """The harness works: a heap overflow in a sanitized module is reported and fatal."""
    proc = _run(sanitized, f"""
        sys.path.insert(0, {sanitized['dir']!r})
        from _xsk_canary import lib
        lib.xsk_canary(8)
        print("canary survived")
    """, timeout=60)
    assert "canary survived" not in proc.stdout
    assert proc.returncode == 86, proc.stdout + proc.stderr
    report = _report(proc)
    assert report and "heap-buffer-overflow" in report


def _run_tests(sanitized: dict, path: str) -> None:
    """Runs the tests in ``path`` against the sanitized core; fails on a report or a failure."""
    start = time.monotonic()
    proc = _run(sanitized, f"""
        import pytest
        # -s: a report goes to fd 2, which pytest's capture would swallow when the
        # sanitizer halts the process.
        sys.exit(pytest.main(["-q", "-x", "-s", "-p", "no:cacheprovider", {path!r}]))
    """, timeout=600)  # ring tests: ~25 s alone; a loaded machine can take many times that
    elapsed = time.monotonic() - start
    print(f"sanitized {path}: {elapsed:.1f}s")
    report = _report(proc)
    if report:
        pytest.fail(f"sanitizer report (exit {proc.returncode}):\n{report}", pytrace=False)
    if proc.returncode != 0:
        pytest.fail(f"{path} failed under sanitizers (exit {proc.returncode}):\n"
                    f"{proc.stdout[-20000:]}\n{proc.stderr[-5000:]}", pytrace=False)
    assert " passed" in proc.stdout


def test_ring_tests_under_asan_and_ubsan(sanitized):
    """Every ring test, the hostile ones and a longer fuzz among them, with sanitizers."""
    _run_tests(sanitized, "tests/test_ring.py")


def test_fast_accept_tests_under_asan_and_ubsan(sanitized):
    """The pump's own admission (table, budget, fallbacks, a flooding peer), with
    sanitizers."""
    _run_tests(sanitized, "tests/test_fast_accept.py")


def test_early_data_tests_under_asan_and_ubsan(sanitized):
    """Early data and lazy ACCEPTs, both roles, a peer breaking their rules, with
    sanitizers."""
    _run_tests(sanitized, "tests/test_early_data.py")


def test_pump_listen_tests_under_asan_and_ubsan(sanitized):
    """Listeners a pump accepts on (max_streams, unlisten, out of descriptors), with
    sanitizers."""
    _run_tests(sanitized, "tests/test_pump_listen.py")


def test_vchan_tests_under_asan_and_ubsan(sanitized):
    """Every vchan endpoint test (garbage indices, orders, live bytes, a longer fuzz), with
    sanitizers and the server's indices starting just below the wrap."""
    _run_tests(sanitized, "tests/test_vchan.py")


def test_vchan_pump_tests_under_asan_and_ubsan(sanitized):
    """The vchan pump's tests (a peer dying, breaking the protocol, never consuming), with
    sanitizers."""
    _run_tests(sanitized, "tests/test_vchan_pump.py")
