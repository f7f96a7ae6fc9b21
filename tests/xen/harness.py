"""Boots Debian's Xen 4.17 under QEMU (TCG) with a PV dom0 and a PV domU, both able to run
the project, and runs a scenario in them.

The guests' roots are initramfs images built from Debian packages (downloaded by name with
``apt-get download``, unpacked with ``dpkg-deb -x``) plus the project's working tree and the
cffi module of the running Python.  Everything downloaded or unpacked is cached under
``.cache/xen`` (``XSOCK_XEN_CACHE`` overrides), keyed on package versions; the per-scenario
images are rebuilt in seconds.

A scenario is two shell scripts: ``dom0`` runs after xenstored, xen-init-dom0, xenconsoled
and ``xl create`` of the domU (whose domid is in ``$DOMU``), ``domu`` runs in the domU.  A
scenario may add a third script, ``third``: then a second, smaller domU ("domu2", domid in
``$DOMU2``) boots from the same image and runs it.  Each reports with lines
``XSOCK-STEP <name> PASS|FAIL <detail>`` on its console; the domUs' consoles are relayed by dom0,
prefixed ``DOMU:`` and ``DOMU2:``.  dom0 powers the machine off when its script ends.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("XSOCK_XEN_CACHE", ROOT / ".cache" / "xen"))
GUEST = Path(__file__).resolve().parent / "guest"
KERNEL = "6.1.0-56-amd64"
PACKAGES = [
    "xen-hypervisor-4.17-amd64", "xen-utils-4.17", "xenstore-utils", "libxencall1",
    "libxenevtchn1", "libxenforeignmemory1", "libxengnttab1", "libxenmisc4.17", "libxenstore4",
    "libxentoollog1", "libyajl2", "libxendevicemodel1", "libxentoolcore1", "libxenhypfs1",
    f"linux-image-{KERNEL}", "python3.11-minimal", "libpython3.11-minimal",
    "libpython3.11-stdlib", "libffi8", "libexpat1", "libncurses6", "libtinfo6",
    # The daemon's loop is GLib's (through Debian's python3-gi), as on a real Xen host.
    "python3-gi", "gir1.2-glib-2.0", "libgirepository-1.0-1", "libglib2.0-0", "libpcre2-8-0",
    "libmount1", "libselinux1", "libblkid1",
]
HOST_LIBS = ["libc.so.6", "libm.so.6", "liblzma.so.5", "libuuid.so.1", "libz.so.1",
             "libzstd.so.1", "libgcc_s.so.1", "libpthread.so.0", "libdl.so.2", "librt.so.1",
             "libbz2.so.1.0", "libcrypto.so.3", "libssl.so.3"]
XEN_MODULES = ["xen-evtchn", "xen-gntdev", "xen-gntalloc", "xen-privcmd", "xenfs"]
# XSAVE hidden from the guests: with it, TCG's emulation of SMP PV guests corrupts user
# vector-register state now and then (docs/XEN.md, "The emulation and XSAVE").
QEMU_CPU = "max,-xsave,-avx,-avx2,-avx512f"
STEP = re.compile(r"XSOCK-STEP (\S+) (PASS|FAIL) ?(.*)")
RELAYED = re.compile(r"(DOMU2?): ")  # a domU's console line, relayed by dom0
FIGURE = re.compile(r"XSOCK-FIGURE (\S+) (\S+)")
SILENCE = 300.0  # seconds without a console line: the guests are stuck

INIT_COMMON = """#!/bin/sh
export PATH=/bin:/usr/bin:/usr/lib/xen-4.17/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp; mkdir -p /dev/pts /run; mount -t devpts devpts /dev/pts
mount -t tmpfs run /run
for m in @MODULES@; do insmod /mods/$m.ko; done
mount -t xenfs xenfs /proc/xen
step() { echo "XSOCK-STEP $*"; }
""".replace("@MODULES@", " ".join(XEN_MODULES))

DOM0_INIT = INIT_COMMON + r"""
mkdir -p /var/run/xenstored /var/lib/xenstored /var/log/xen /var/lib/xen /var/run/xen
xenstored --pid-file /var/run/xenstored.pid && step xenstored PASS
xen-init-dom0 >/dev/null && step init-dom0 PASS
xenconsoled --log=guest --log-dir=/var/log/xen && step xenconsoled PASS
if xl create /etc/xen/domu.cfg >/tmp/xl.log 2>&1; then step domu-created PASS
else step domu-created FAIL "$(tail -3 /tmp/xl.log)"; fi
export DOMU=$(xl domid domu)
if [ -f /scenario/third.sh ]; then  # the second domU: same image, its kernel line picks third.sh
  if xl create /etc/xen/domu2.cfg >/tmp/xl2.log 2>&1; then step domu2-created PASS
  else step domu2-created FAIL "$(tail -3 /tmp/xl2.log)"; fi
  export DOMU2=$(xl domid domu2)
fi
# wait_domu NAME [SECONDS]: waits until the domU has reported step NAME (0 if it did).
wait_domu() {
  i=0; while [ $i -lt $((${2:-120} * 5)) ]; do
    grep -q "XSOCK-STEP $1 " /var/log/xen/guest-domu.log 2>/dev/null && return 0
    sleep 0.2; i=$((i + 1)); done; return 1; }
# Relay the domUs' consoles (xenconsoled's logs) to ours.
relay() {
  (while [ ! -f /var/log/xen/guest-$1.log ]; do sleep 0.2; done
   tail -f /var/log/xen/guest-$1.log | while IFS= read -r l; do echo "$2: $l"; done) & }
relay domu DOMU
[ -n "${DOMU2:-}" ] && relay domu2 DOMU2
. /scenario/dom0.sh
# The relay polls; replay what the domUs said so that nothing is lost at power-off.
replay() {
  [ -f /var/log/xen/guest-$1.log ] && grep -v '^\[' /var/log/xen/guest-$1.log | sed "s/^/$2: /"; }
sleep 2; replay domu DOMU; replay domu2 DOMU2
step dom0-done PASS
sleep 1
poweroff -f
"""

DOMU_INIT = INIT_COMMON + """
if grep -qw xsock_role=third /proc/cmdline; then . /scenario/third.sh; step domu2-done PASS
else . /scenario/domu.sh; step domu-done PASS; fi
sleep 3600
"""

DOMU_CFG = """name = "domu"
type = "pv"
kernel = "/boot/vmlinuz"
ramdisk = "/boot/domu.gz"
extra = "console=hvc0 quiet"
memory = 256
vcpus = 1
on_crash = "preserve"
"""
# The second domU: the same kernel and image with less memory and one vCPU.  Its root, an
# initramfs of about 45 MB, lives in that memory: 160 MiB is too little to unpack it
# ("Initramfs unpacking failed: write error"). dom0 1024 MiB + 256 + 192 fit in QEMU's 2048.
DOMU2_CFG = DOMU_CFG.replace('name = "domu"', 'name = "domu2"').replace(
    "quiet", "quiet xsock_role=third").replace("memory = 256", "memory = 192")


@dataclass
class Result:
    steps: dict[str, tuple[bool, str]] = field(default_factory=dict)
    figures: dict[str, str] = field(default_factory=dict)
    console: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.console[-n:])

    def save(self, scenario: str) -> Path:
        """Writes the whole console to ``.cache/xen/<scenario>.console.log``; returns it."""
        log = CACHE / f"{scenario}.console.log"
        log.write_text("\n".join(self.console) + "\n")
        return log


def _run(cmd: list[str], **kw: object) -> None:
    subprocess.run(cmd, check=True, **kw)  # type: ignore[call-overload]


def fetch_packages() -> Path:
    """Returns the unpacked root of every package, downloading what is missing."""
    debs = CACHE / "debs"
    root = CACHE / "root"
    debs.mkdir(parents=True, exist_ok=True)
    have = {p.name.split("_")[0] for p in debs.glob("*.deb")}
    missing = [p for p in PACKAGES if p not in have]
    if missing:
        print(f"xen harness: downloading {len(missing)} Debian packages", flush=True)
        try:
            _run(["apt-get", "download", "-qq", *missing], cwd=debs)
        except subprocess.CalledProcessError:
            # A machine whose package lists are missing or stale: refresh them once.
            _run(["apt-get", "update", "-qq"])
            _run(["apt-get", "download", "-qq", *missing], cwd=debs)
    stamp = root / ".unpacked"
    key = "\n".join(sorted(p.name for p in debs.glob("*.deb")))
    if not stamp.exists() or stamp.read_text() != key:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        for deb in sorted(debs.glob("*.deb")):
            _run(["dpkg-deb", "-x", str(deb), str(root)])
        stamp.write_text(key)
    return root


def _copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True)


def _base_tree(root: Path, d: Path) -> None:
    for sub in ("bin", "mods", "etc", "lib64", "lib/x86_64-linux-gnu", "usr/lib", "proc", "sys",
                "dev", "tmp", "var/log", "scenario", "boot"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    busybox = shutil.which("busybox")
    if busybox is None:
        raise RuntimeError("busybox is missing: apt-get install busybox-static")
    shutil.copy(busybox, d / "bin" / "busybox")
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True).stdout.split()
    for a in applets:
        if not (d / "bin" / a).exists():
            (d / "bin" / a).symlink_to("busybox")
    mods = root / "lib/modules" / KERNEL / "kernel/drivers/xen"
    for m in XEN_MODULES:
        src = mods / (f"xenfs/{m}.ko" if m == "xenfs" else f"{m}.ko")
        shutil.copy(src, d / "mods" / f"{m}.ko")
    _copy_tree(root / "usr/lib/x86_64-linux-gnu", d / "usr/lib/x86_64-linux-gnu")
    if (root / "lib/x86_64-linux-gnu").exists():  # libexpat1 and others install there
        _copy_tree(root / "lib/x86_64-linux-gnu", d / "lib/x86_64-linux-gnu")
    for lib in HOST_LIBS:
        for base in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu"):
            if os.path.exists(f"{base}/{lib}"):
                shutil.copy(f"{base}/{lib}", d / "lib/x86_64-linux-gnu" / lib)
                break
    shutil.copy("/lib64/ld-linux-x86-64.so.2", d / "lib64")
    shutil.copy(root / "usr/bin/xenstore", d / "bin" / "xenstore")
    for t in ("read", "write", "ls", "list", "rm", "chmod", "watch", "exists"):
        (d / "bin" / f"xenstore-{t}").symlink_to("xenstore")
    shutil.copy(root / "usr/lib/xen-4.17/bin/vchan-socket-proxy", d / "bin")
    # Python and the project: Debian's interpreter, the host venv's cffi, our working tree.
    (d / "usr/bin").mkdir(parents=True, exist_ok=True)
    shutil.copy(root / "usr/bin/python3.11", d / "usr/bin/python3")
    _copy_tree(root / "usr/lib/python3.11", d / "usr/lib/python3.11")
    site = d / "usr/lib/python3/dist-packages"
    site.mkdir(parents=True, exist_ok=True)
    import cffi  # the running environment's

    cffi_dir = Path(cffi.__file__).parent
    _copy_tree(cffi_dir, site / "cffi")
    for so in cffi_dir.parent.glob("_cffi_backend*.so"):
        shutil.copy(so, site)
    import pycparser  # cffi's ABI mode parses declarations with it

    _copy_tree(Path(pycparser.__file__).parent, site / "pycparser")
    try:  # Debian's pycparser (2.21) imports ply, which it does not bundle; PyPI's 3.x does not
        import ply  # type: ignore[import-untyped]
    except ImportError:
        pass
    else:
        _copy_tree(Path(ply.__file__).parent, site / "ply")
    libs = cffi_dir.parent / "cffi.libs"
    if libs.exists():
        _copy_tree(libs, site / "cffi.libs")
    _copy_tree(root / "usr/lib/python3/dist-packages/gi", site / "gi")
    _copy_tree(ROOT / "xsockd", site / "xsockd")
    for junk in site.rglob("__pycache__"):
        shutil.rmtree(junk)


def _copy_guest_files(tree: Path) -> None:
    """The scenario programs both guests run (tests/xen/guest/*.py) go to /scenario."""
    for p in GUEST.glob("*.py"):
        shutil.copy(p, tree / "scenario" / p.name)


def _cpio(tree: Path, out: Path) -> None:
    files = subprocess.run(["find", "."], cwd=tree, capture_output=True, check=True).stdout
    data = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=tree, input=files,
                          capture_output=True, check=True).stdout
    out.write_bytes(gzip.compress(data, compresslevel=1))


def build(dom0_script: str, domu_script: str, third_script: str | None = None
          ) -> tuple[Path, Path, Path]:
    """Returns (xen, kernel, dom0 initrd) paths for a scenario, building what is not cached."""
    root = fetch_packages()
    xen = CACHE / "xen.elf"
    if not xen.exists():
        xen.write_bytes(gzip.decompress((root / "boot/xen-4.17-amd64.gz").read_bytes()))
    kernel = root / "boot" / f"vmlinuz-{KERNEL}"
    key = hashlib.sha256()
    for p in sorted((ROOT / "xsockd").rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:
            key.update(p.name.encode() + p.read_bytes())
    key.update(Path(__file__).read_bytes() + dom0_script.encode() + domu_script.encode())
    key.update(b"third\0" + third_script.encode() if third_script is not None else b"")
    for p in sorted(GUEST.glob("*.py")):
        key.update(p.name.encode() + p.read_bytes())
    image = CACHE / f"dom0-{key.hexdigest()[:16]}.gz"
    if image.exists():
        return xen, kernel, image
    work = CACHE / "build"
    shutil.rmtree(work, ignore_errors=True)
    domu, dom0 = work / "domu", work / "dom0"
    _base_tree(root, domu)
    (domu / "init").write_text(DOMU_INIT)
    (domu / "scenario/domu.sh").write_text(domu_script)
    if third_script is not None:
        (domu / "scenario/third.sh").write_text(third_script)
    _copy_guest_files(domu)
    (domu / "init").chmod(0o755)
    _base_tree(root, dom0)
    _copy_tree(root / "usr/lib/xen-4.17", dom0 / "usr/lib/xen-4.17")
    (dom0 / "etc/xen").mkdir(parents=True, exist_ok=True)
    (dom0 / "etc/xen/domu.cfg").write_text(DOMU_CFG)
    (dom0 / "etc/xen/domu2.cfg").write_text(DOMU2_CFG)
    (dom0 / "init").write_text(DOM0_INIT)
    (dom0 / "init").chmod(0o755)
    (dom0 / "scenario/dom0.sh").write_text(dom0_script)
    if third_script is not None:  # dom0 creates the second domU when this file exists
        (dom0 / "scenario/third.sh").write_text(third_script)
    _copy_guest_files(dom0)
    _cpio(domu, dom0 / "boot/domu.gz")
    shutil.copy(kernel, dom0 / "boot/vmlinuz")
    for old in CACHE.glob("dom0-*.gz"):
        old.unlink()
    _cpio(dom0, image)
    shutil.rmtree(work)
    return xen, kernel, image


def boot(dom0_script: str, domu_script: str, timeout: float = 600,
         third_script: str | None = None) -> Iterator[str]:
    """Yields console lines of one run; QEMU is killed when the generator closes."""
    if shutil.which("qemu-system-x86_64") is None:
        raise RuntimeError("qemu-system-x86_64 is missing: apt-get install qemu-system-x86")
    xen, kernel, initrd = build(dom0_script, domu_script, third_script)
    # XSOCK_QEMU_CPU / _ACCEL / _SMP vary the emulation (see docs/XEN.md).
    env = os.environ.get
    cmd = ["qemu-system-x86_64", "-machine", "q35",
           "-accel", env("XSOCK_QEMU_ACCEL", "tcg,thread=multi"),
           "-cpu", env("XSOCK_QEMU_CPU", QEMU_CPU), "-smp", env("XSOCK_QEMU_SMP", "2"),
           "-m", "2048", "-nographic", "-no-reboot", "-kernel", str(xen),
           "-append", "console=com1 com1=115200 dom0_mem=1024M,max:1024M smap=0 smep=0 "
           + env("XSOCK_XEN_ARGS", ""),
           "-initrd", f"{kernel} console=hvc0,{initrd}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    assert proc.stdout is not None
    lines: queue.Queue[bytes | None] = queue.Queue()

    def read() -> None:  # a thread, so that a silent guest cannot block us past the deadline
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines.put(raw)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            try:
                raw = lines.get(timeout=max(0.0, min(left, SILENCE)))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"the Xen guests ran past {timeout:.0f} s") from None
                raise TimeoutError(f"the guests printed nothing for {SILENCE:.0f} s") from None
            if raw is None:
                return
            yield raw.decode(errors="replace").rstrip("\r\n")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()


def run(dom0_script: str, domu_script: str, timeout: float = 600, echo: bool = True,
        third_script: str | None = None) -> Result:
    """Returns the steps the guests reported, printing each as it comes."""
    result = Result()
    start = time.monotonic()
    lines = boot(dom0_script, domu_script, timeout, third_script)
    try:
        for line in lines:
            result.console.append(line)
            relayed = RELAYED.match(line)
            if (f := FIGURE.search(line)) and not relayed:
                result.figures[f.group(1)] = f.group(2)
            m = STEP.search(line)
            if not m:
                continue
            where = {"DOMU": "domU", "DOMU2": "domU2"}[relayed.group(1)] if relayed else "dom0"
            name = f"{where}:{m.group(1)}"
            result.steps[name] = (m.group(2) == "PASS", m.group(3))
            if echo:
                print(f"  [{time.monotonic() - start:6.1f} s] {name} {m.group(2)} {m.group(3)}",
                      flush=True)
            if name == "dom0:dom0-done":
                break
    except TimeoutError as e:
        result.steps["harness:timeout"] = (False, str(e))
    finally:
        lines.close()  # kills QEMU, also on an exception or an interrupt
        result.seconds = time.monotonic() - start
    return result


def main(argv: list[str]) -> int:
    """``python tests/xen/harness.py SCENARIO``: runs tests/xen/SCENARIO_dom0.sh and _domu.sh
    (and _third.sh in a second domU, if the scenario has one)."""
    here = Path(__file__).parent
    name = argv[0] if argv else "stream"
    third = here / f"{name}_third.sh"
    r = run((here / f"{name}_dom0.sh").read_text(), (here / f"{name}_domu.sh").read_text(),
            timeout=float(os.environ.get("XSOCK_XEN_TIMEOUT", "1800")),
            third_script=third.read_text() if third.exists() else None)
    ok = bool(r.steps) and all(passed for passed, _ in r.steps.values())
    log = r.save(name)
    print(f"{name}: full console in {log}")
    print(f"{name}: {'PASS' if ok else 'FAIL'} in {r.seconds:.0f} s")
    if not ok:
        print(r.tail(80))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
