"""The module layering of STYLE.md, checked on the import statements of every module."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).parent.parent / "xsockd"

# module -> xsockd modules it may import (None: anything in the package)
ALLOWED: dict[str, set[str] | None] = {
    "errors": set(),
    "constants": set(),
    "words": set(),  # counts, sizes and --help text: a leaf, as errors and constants
    "backend": set(),
    "ring": {"_ring_core"},
    "vchan": {"_ring_core"},  # the libxenvchan endpoint: a leaf beside ring
    "config": {"constants", "errors", "ring", "vchan", "words"},
    "xenstore_wire": set(),
    "xenstore_client": {"backend", "errors", "xenstore_wire"},
    "link": {"backend", "ring"},
    "rendezvous": {"backend", "constants", "errors", "ring", "xenstore_client"},
    "admission": {"config", "ring", "words"},
    "listeners": {"errors"},
    "peerlog": set(),
    "advice": {"ring"},
    "confdiff": {"config"},
    "manager": {"admission", "advice", "backend", "confdiff", "config", "constants", "errors",
                "link", "listeners", "loop", "peerlog", "rendezvous", "ring", "vchans", "words"},
    # The vchan roles (docs/VCHAN.md): the endpoint and pump driven through the backend, and
    # the daemon's set of them.
    "vchans": {"admission", "backend", "config", "listeners", "loop", "peerlog", "vchan_client",
               "vchan_server"},
    "vchan_server": {"backend", "config", "loop", "peerlog", "vchan", "xenstore_client"},
    "vchan_client": {"backend", "config", "errors", "loop", "peerlog", "rendezvous", "vchan",
                     "xenstore_client"},
    "backend_sim": {"backend", "errors", "sim.hypervisor", "xenstore_client"},
    # The face sees the manager only through its snake_case methods (and the loop's call_soon).
    "dbus_face": {"constants", "errors", "loop", "manager"},
    # xsockctl reaches the daemon over D-Bus only: never the manager, links or rings.
    "cli": {"constants", "errors", "dbus_face"},
}
# The private C module (ring_core.c with vchan_core.c and vchan_pump.c) has two Python faces:
# ring for xsockd's own links, vchan for libxenvchan's endpoint; nothing else calls into C.
FORBIDDEN_EVERYWHERE_BUT = {"gi": {"loop", "dbus_face"}, "pydbus": {"dbus_face"},
                            "systemd": {"service"}, "xsockd._ring_core": {"ring", "vchan"}}


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_layering():
    problems = []
    for path in sorted(PKG.rglob("*.py")):
        name = str(path.relative_to(PKG).with_suffix("")).replace("/", ".")
        mods = imports_of(path)
        ours = {m.removeprefix("xsockd.") for m in mods if m.startswith("xsockd.")}
        allowed = ALLOWED.get(name)
        if allowed is not None and not ours <= allowed:
            problems.append(f"{name} imports {sorted(ours - allowed)}")
        if "daemon" in ours:
            problems.append(f"{name} imports daemon (nothing may)")
        for lib, who in FORBIDDEN_EVERYWHERE_BUT.items():
            if any(m == lib or m.startswith(lib + ".") for m in mods) and name not in who:
                problems.append(f"{name} imports {lib}")
    assert not problems, problems


def test_manager_knows_no_faces():
    mods = imports_of(PKG / "manager.py")
    assert not {m for m in mods if m.split(".")[-1] in ("dbus_face", "service", "daemon")}
