"""One corpus of XenStore operation sequences, for a differential run: real xenstored (Xen 4.17,
in the Xen proof) against the sim's (tests/test_xscorpus.py), as the same domains.

Each case is a list of steps; each step runs as dom0 ("0") or as the domU ("U") through the
project's XenStore client, and gives one answer: "OK", an errno name, a value, a listing, the
watch events seen so far, or "closed" (the server closed the connection; the runner opens a new
one).  Answers are normalised so that two runs compare equal when the servers behave the same:
the domU's id becomes "U", transaction ids "tx", a node's generation "G", events are sorted.

Paths: each case works under ``/xsc/<case>`` (dom0's) and ``<domU home>/data/xsc/<case>`` (the
domU's), both removed when the case ends.  In the Xen proof dom0 drives: its steps run in dom0,
each run of consecutive domU steps in the domU's agent (``xsproof.py``'s ``op_xscorpus``);
``run_case`` takes the function that runs a batch, so both setups share everything else.
Cases marked ``live=False`` (WHY_SIM_ONLY) are left out of the proof's run; ``harness.py
xsdiff`` runs them against xenstored on their own and ``main`` records their answers.

Nothing here needs more than the standard library and ``xsockd.xenstore_client``.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import re
import select
import socket
import struct
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from xsockd.errors import XenStoreError
from xsockd.xenstore_client import XenStoreClient
from xsockd.xenstore_wire import Op

MISSING = 77          # a domain id that exists in neither setup
BIG_CHILDREN = 220    # children of 20-character names: a listing past 4096 bytes
SHORT_VALUE = 48      # longer values are answered as length and hash


@dataclass(frozen=True)
class Step:
    actor: str                       # "0" or "U"
    op: str
    args: tuple[object, ...] = ()
    tx: str | None = None            # a transaction's name in this case, or a literal id

    def describe(self, domu: int) -> str:
        shown = " ".join(_short(a) for a in self.args)
        return normalise(f"{self.op} {shown}".strip() + (f" [tx {self.tx}]" if self.tx else ""),
                         domu)


@dataclass
class Case:
    name: str
    steps: list[Step] = field(default_factory=list)
    live: bool = True                # False: run against the sim only (see WHY_SIM_ONLY)

    def __call__(self, actor: str, op: str, *args: object, tx: str | None = None) -> Case:
        self.steps.append(Step(actor, op, args, tx))
        return self


# Cases that are not run against real xenstored 4.17.7, and why (docs/SIM.md repeats this).
WHY_SIM_ONLY = {
    "wire": "Malformed requests are kept out of the Xen proof's run: on an earlier machine they "
            "stopped xenstored 4.17.7 answering every dom0 connection. Here, sent alone on new "
            "connections and in sequence on one per domain, xenstored kept answering "
            "(python tests/xen/harness.py xsdiff); that run's answers are recorded in "
            "tests/xen/xenstored-4.17-wire.json and compared too.",
}


def _short(a: object) -> str:
    if isinstance(a, bytes):
        return repr(a) if len(a) <= SHORT_VALUE else f"<{len(a)} bytes>"
    text = str(a)
    return text if len(text) <= SHORT_VALUE else f"<{len(text)} chars>"


def normalise(text: str, domu: int) -> str:
    """The domU's id as "U", wherever it names the domain (paths, permissions)."""
    text = re.sub(rf"/local/domain/{domu}(?=[/\s,\]'\"]|$)", "/local/domain/U", text)
    return re.sub(rf"(?<![\w/])([nrwb]){domu}(?![\w])", r"\1U", text)


# ---- the corpus ------------------------------------------------------------------------------

def corpus(domu: int) -> list[Case]:
    """Every case, with the domU's id in its paths and permissions."""
    u = domu
    home = f"/local/domain/{u}"
    cases: list[Case] = []

    def case(name: str, live: bool = True) -> tuple[Case, str, str]:
        c = Case(name, live=live)
        cases.append(c)
        return c, f"/xsc/{name}", f"{home}/data/xsc/{name}"

    c, d, m = case("basics")
    (c("0", "write", f"{d}/a", b"hello")("0", "read", f"{d}/a")("0", "ls", d)
     ("0", "perms", f"{d}/a")("0", "perms", d)("0", "read", f"{d}/nothing")
     ("0", "ls", f"{d}/nothing")("0", "rm", f"{d}/nothing")("0", "rm", f"{d}/no/such")
     ("0", "write", f"{d}/b/c/d", b"deep")("0", "ls", f"{d}/b")("0", "read", f"{d}/b")
     ("0", "read", f"{d}/b/c")("0", "mkdir", f"{d}/a")("0", "read", f"{d}/a")
     ("0", "write", f"{d}/a", b"")("0", "read", f"{d}/a")
     ("0", "write", f"{d}/bin", b"\x00\x01\xff\x00z")("0", "read", f"{d}/bin")
     ("0", "write", f"{d}/b", b"dir value")("0", "ls", d)("0", "read", f"{d}/b")
     ("0", "rm", f"{d}/b")("0", "ls", d)("0", "read", f"{d}/b/c/d")
     ("0", "mkdir", f"{d}/e/f")("0", "ls", f"{d}/e")("0", "rm", f"{d}/e/f")("0", "ls", f"{d}/e")
     ("0", "write", "xsc-rel/x", b"1")("0", "read", "/local/domain/0/xsc-rel/x")
     ("0", "ls", "xsc-rel")("0", "rm", "xsc-rel")("0", "read", "xsc-rel/x"))

    c, d, m = case("bad_paths")
    for bad in ("", "/", "//", f"{d}/", f"{d}//a", f"{d}/a b", f"{d}/a.b", f"{d}/é", "@",
                "@x", "@releaseDomain/x", f"{d}/a\tb", "/" + "a" * 2100):
        c("0", "read", bad)
        c("U", "read", bad)
    for bad in (f"{d}/", f"{d}/a b", "@x", "/" + "a" * 2100):
        c("0", "write", bad, b"v")("U", "write", bad, b"v")("0", "mkdir", bad)
    c("0", "ls", "/xsc")("0", "rm", d)

    c, d, m = case("inherit")
    (c("0", "mkdir", d)("0", "setperms", d, f"n0,r{u}")("0", "write", f"{d}/child", b"x")
     ("0", "perms", f"{d}/child")("U", "read", f"{d}/child")("U", "ls", d)("U", "perms", d)
     ("U", "write", f"{d}/child", b"y")("U", "write", f"{d}/new", b"y")("U", "mkdir", f"{d}/new")
     ("U", "rm", f"{d}/child")("U", "read", f"{d}/none")("U", "read", f"{d}/none/deeper")
     ("0", "setperms", f"{d}/child", "n0")("U", "read", f"{d}/child")
     ("U", "perms", f"{d}/child")("U", "read", f"{d}/child/below")
     ("0", "setperms", d, f"n0,w{u}")("U", "read", f"{d}/child")("U", "ls", d)
     ("U", "write", f"{d}/new", b"from U")("U", "perms", f"{d}/new")("0", "perms", f"{d}/new")
     ("U", "read", f"{d}/new")("U", "write", f"{d}/new/sub", b"s")("U", "perms", f"{d}/new/sub")
     ("U", "rm", f"{d}/new")("0", "ls", d)("0", "setperms", d, "r0")("U", "read", d)
     ("U", "ls", d)("0", "setperms", d, f"b{u}")("U", "write", f"{d}/g", b"")
     ("U", "perms", f"{d}/g")("0", "perms", d)("U", "setperms", d, f"n{u}")
     ("0", "rm", d))

    c, d, m = case("home")
    (c("U", "perms", home)("U", "perms", f"{home}/domid")("U", "read", "domid")
     ("U", "read", f"{home}/domid")("0", "read", f"{home}/domid")("U", "perms", f"{home}/data")
     ("U", "write", f"{home}/xsc-squat", b"x")("U", "mkdir", "xsc-squat")
     ("U", "write", "domid", b"99")("U", "rm", "domid")("U", "setperms", "domid", f"n{u}")
     ("U", "setperms", home, f"n{u}")
     ("U", "mkdir", m)("U", "perms", m)("U", "perms", f"{home}/data/xsc")
     ("U", "write", "data/xsc/home/rel", b"r")("U", "read", f"{m}/rel")("U", "ls", m)
     ("0", "write", f"{m}/by0", b"z")("0", "perms", f"{m}/by0")("U", "read", f"{m}/by0")
     ("U", "rm", f"{m}/by0")("U", "getdomainpath", str(u))("U", "getdomainpath", "0")
     ("0", "getdomainpath", str(u))("0", "getdomainpath", str(MISSING))
     ("U", "getdomainpath", "junk")("U", "read", "/local/domain/0")("U", "ls", "/local/domain")
     ("U", "ls", "/")("U", "read", "/")("U", "rm", m))

    c, d, m = case("ownership")
    (c("U", "write", f"{m}/own", b"mine")("U", "perms", f"{m}/own")
     ("U", "setperms", f"{m}/own", f"n{u},r0")("U", "perms", f"{m}/own")
     ("U", "setperms", f"{m}/own", "n0")
     ("U", "setperms", f"{m}/own", f"n{u},b{MISSING}")
     ("U", "perms", f"{m}/own")("U", "setperms", f"{m}/own", f"r{u}")
     ("U", "write", f"{m}/own", b"w")
     ("U", "read", f"{m}/own")("0", "setperms", f"{m}/own", "n0")("U", "read", f"{m}/own")
     ("U", "write", f"{m}/own", b"w")("U", "perms", f"{m}/own")("U", "rm", f"{m}/own")
     ("U", "setperms", f"{m}/own", f"n{u}")("0", "setperms", f"{m}/own", f"n0,w{u}")
     ("U", "write", f"{m}/own", b"w2")("U", "read", f"{m}/own")("U", "setperms", f"{m}/own", "n0")
     ("U", "rm", f"{m}/own")("0", "read", f"{m}/own")("U", "write", f"{m}/own2/x", b"x")
     ("0", "setperms", f"{m}/own2", f"n{u},r0")("0", "perms", f"{m}/own2/x")
     ("0", "setperms", f"{m}/own2/x", "n0")("U", "rm", f"{m}/own2")("0", "read", f"{m}/own2/x")
     ("U", "rm", m))

    c, d, m = case("perm_strings")
    c("0", "mkdir", d)
    for perms in ("x0", "n", "", "n0,", "nq", "n0x", "r0", "w0", "b0", f"n0,r{u},w{u}",
                  f"n0,r{MISSING}", f"n{MISSING}", "n-1", "n70000", "n0,n0,n0,n0,n0,n0,n0",
                  f"n{u}", "n0"):
        c("0", "setperms", d, perms)("0", "perms", d)
    c("U", "mkdir", m)
    for perms in (f"n{u},r0,r0,r0,r0", f"n{u},r0,r0,r0,r0,r0", f"n{u},r0,r0,r0,r0,r0,r0", ""):
        c("U", "setperms", m, f"n{u}")("U", "setperms", m, perms)("U", "perms", m)
    c("0", "rm", d)("U", "rm", m)

    c, d, m = case("specials")
    for special in ("@releaseDomain", "@introduceDomain"):
        (c("0", "perms", special)("U", "perms", special)("0", "read", special)
         ("0", "ls", special)("U", "write", special, b"x"))
    (c("0", "setperms", "@introduceDomain", f"n0,r{u}")("0", "perms", "@introduceDomain")
     ("0", "setperms", "@introduceDomain", "n0")("0", "setperms", "@nosuch", "n0")
     ("U", "watch", "@releaseDomain", "xs1")("U", "watch", "@introduceDomain", "xs2")
     ("0", "watch", "@releaseDomain", "xs3")("0", "watch", "@nosuch", "xs4")
     ("U", "ev")("0", "ev")("U", "unwatch", "@releaseDomain", "xs1")
     ("U", "unwatch", "@introduceDomain", "xs2")("0", "unwatch", "@releaseDomain", "xs3")
     ("0", "unwatch", "@nosuch", "xs4"))

    c, d, m = case("privileged_ops")
    for actor in ("0", "U"):
        (c(actor, "introduced", str(u))(actor, "introduced", "0")
         (actor, "introduced", str(MISSING))(actor, "introduced", "junk"))
    for op, payload in ((Op.RELEASE, f"{MISSING}\0".encode()), (Op.RESUME, f"{MISSING}\0".encode()),
                        (Op.SET_TARGET, f"{MISSING}\0{u}\0".encode()),
                        (Op.INTRODUCE, f"{MISSING}\0" "123\0" "4\0".encode()),
                        (Op.CONTROL, b"print\0x\0"), (20, b"x\0"), (99, b"x\0")):
        c("U", "raw", int(op), payload)
    for op, payload in ((20, b"x\0"), (99, b"x\0"), (Op.GET_DOMAIN_PATH, b"\0")):
        c("0", "raw", int(op), payload)

    c, d, m = case("tx_basic")
    (c("0", "mkdir", d)("0", "txstart", "t")("0", "write", f"{d}/a", b"1", tx="t")
     ("0", "read", f"{d}/a")("0", "read", f"{d}/a", tx="t")("0", "ls", d, tx="t")("0", "ls", d)
     ("0", "txend", "T", tx="t")("0", "read", f"{d}/a")("0", "txstart", "t2")
     ("0", "write", f"{d}/a", b"2", tx="t2")("0", "rm", f"{d}/a", tx="t2")
     ("0", "read", f"{d}/a", tx="t2")("0", "txend", "F", tx="t2")("0", "read", f"{d}/a")
     ("0", "txend", "T", tx="t2")("U", "txstart", "u")("U", "write", f"{m}/x", b"ux", tx="u")
     ("U", "read", f"{m}/x")("U", "perms", f"{m}/x", tx="u")("U", "txend", "T", tx="u")
     ("U", "read", f"{m}/x")("U", "perms", f"{m}/x")("0", "rm", d)("U", "rm", m))

    c, d, m = case("tx_conflict")
    (c("0", "write", f"{d}/a", b"1")("0", "txstart", "t")("0", "read", f"{d}/a", tx="t")
     ("0", "write", f"{d}/a", b"2")("0", "write", f"{d}/b", b"x", tx="t")
     ("0", "txend", "T", tx="t")("0", "read", f"{d}/b")
     ("0", "txstart", "t")("0", "read", f"{d}/a", tx="t")("0", "write", f"{d}/c", b"c")
     ("0", "write", f"{d}/z", b"z", tx="t")("0", "txend", "T", tx="t")("0", "ls", d)
     ("0", "txstart", "t")("0", "read", f"{d}/a", tx="t")("0", "write", f"{d}/a/q", b"q")
     ("0", "txend", "T", tx="t")
     ("U", "write", f"{m}/x", b"0")("U", "txstart", "u")("U", "read", f"{m}/x", tx="u")
     ("0", "write", f"{m}/x", b"by dom0")("U", "write", f"{m}/y", b"1", tx="u")
     ("U", "txend", "T", tx="u")("U", "read", f"{m}/y")("U", "txstart", "u")
     ("U", "write", f"{m}/y", b"2", tx="u")("0", "write", f"{m}/z", b"z")
     ("U", "txend", "T", tx="u")("U", "ls", m)("U", "txstart", "u")
     ("U", "read", f"{m}/x", tx="u")("0", "read", f"{m}/x")("U", "write", f"{m}/w", b"w", tx="u")
     ("U", "txend", "T", tx="u")("U", "ls", m)("U", "txstart", "u")
     ("U", "rm", f"{m}/w", tx="u")("0", "rm", f"{m}/w")("U", "txend", "T", tx="u")
     ("0", "rm", d)("U", "rm", m))

    c, d, m = case("tx_errors")
    (c("0", "mkdir", d)("0", "txend", "T", tx="4242")("0", "read", d, tx="4242")
     ("0", "write", f"{d}/a", b"1", tx="4242")("0", "txstart", "t")("0", "txstart", "t2", tx="t")
     ("0", "raw", int(Op.TRANSACTION_END), b"X\0", "t")
     ("0", "raw", int(Op.TRANSACTION_END), b"\0", "t")("0", "watch", d, "xw", tx="t")
     ("0", "ev")("0", "unwatch", d, "xw", tx="t")("0", "txend", "F", tx="t")
     ("0", "txend", "F", tx="t")("0", "txend", "T", tx="t")("U", "txend", "T", tx="4242")
     ("U", "read", f"{home}/domid", tx="4242")("U", "txstart", "u")
     ("U", "txstart", "u2", tx="u")("U", "raw", int(Op.TRANSACTION_END), b"X\0", "u")
     ("U", "txend", "F", tx="u")("U", "txend", "F", tx="u")("0", "rm", d))

    c, d, m = case("tx_quota")
    for i in range(12):
        c("U", "txstart", f"q{i}")
    for i in range(11):  # the 12th start fails: Linux drops the reply to an END of tx 0
        c("U", "txend", "F", tx=f"q{i}")
    c("U", "txstart", "after")("U", "txend", "F", tx="after")
    for i in range(12):
        c("0", "txstart", f"p{i}")
    for i in range(12):
        c("0", "txend", "F", tx=f"p{i}")

    c, d, m = case("tx_watch")
    (c("0", "mkdir", d)("0", "watch", d, "xa")("U", "watch", m, "xb")("U", "mkdir", m)
     ("0", "ev")("U", "ev")("0", "txstart", "t")("0", "write", f"{d}/a", b"1", tx="t")
     ("0", "write", f"{d}/b", b"1", tx="t")("0", "ev")("0", "txend", "T", tx="t")("0", "ev")
     ("0", "txstart", "t")("0", "write", f"{d}/c", b"1", tx="t")("0", "txend", "F", tx="t")
     ("0", "ev")("0", "txstart", "t")("0", "write", f"{d}/e", b"1", tx="t")
     ("0", "rm", f"{d}/e", tx="t")("0", "rm", f"{d}/a", tx="t")("0", "txend", "T", tx="t")
     ("0", "ev")("U", "txstart", "u")("U", "write", f"{m}/x", b"1", tx="u")
     ("U", "write", f"{m}/x/y", b"1", tx="u")("U", "ev")("0", "ev")("U", "txend", "T", tx="u")
     ("U", "ev")("0", "ev")("U", "txstart", "u")("U", "rm", f"{m}/x", tx="u")
     ("U", "write", f"{m}/x", b"again", tx="u")("U", "txend", "T", tx="u")("U", "ev")
     ("0", "unwatch", d, "xa")("U", "unwatch", m, "xb")("0", "rm", d)("U", "rm", m))

    c, d, m = case("watch_basic")
    (c("0", "watch", d, "xw")("0", "ev")("0", "write", f"{d}/a", b"1")("0", "ev")
     ("0", "write", f"{d}/a", b"1")("0", "write", f"{d}/a", b"2")("0", "ev")
     ("0", "mkdir", f"{d}/a")("0", "ev")("0", "write", f"{d}/a/b/c", b"")("0", "ev")
     ("0", "rm", f"{d}/a")("0", "ev")("0", "rm", f"{d}/a")("0", "ev")
     ("0", "watch", f"{d}/a/b", "xdeep")("0", "write", d, b"top")("0", "write", f"{d}/a/b", b"")
     ("0", "ev")("0", "rm", d)("0", "ev")("0", "watch", d, "xw")("0", "watch", d, "xw2")
     ("0", "write", f"{d}/x", b"")("0", "ev")("0", "unwatch", d, "xw")("0", "unwatch", d, "xw")
     ("0", "unwatch", d, "nosuch")("0", "write", f"{d}/y", b"")("0", "ev")
     ("0", "unwatch", d, "xw2")("0", "unwatch", f"{d}/a/b", "xdeep")
     ("0", "write", f"{d}/z", b"")("0", "ev")("0", "rm", d))

    c, d, m = case("watch_perms")
    (c("0", "mkdir", d)("U", "watch", d, "xu")("U", "watch", f"{d}/open", "xo")("U", "ev")
     ("0", "write", f"{d}/secret", b"s")("U", "ev")("0", "write", f"{d}/open", b"o")("U", "ev")
     ("0", "setperms", f"{d}/open", f"n0,r{u}")("U", "ev")("0", "write", f"{d}/open", b"o2")
     ("U", "ev")("0", "write", f"{d}/open/sub", b"")("U", "ev")
     ("0", "setperms", f"{d}/open", "n0")("U", "ev")("0", "write", f"{d}/open", b"o3")("U", "ev")
     ("0", "setperms", f"{d}/open", f"n0,r{u}")("U", "ev")("0", "rm", f"{d}/open")("U", "ev")
     ("0", "setperms", d, f"n0,r{u}")("U", "ev")("0", "write", f"{d}/new", b"")("U", "ev")
     ("0", "rm", d)("U", "ev")("U", "unwatch", d, "xu")("U", "unwatch", f"{d}/open", "xo"))

    c, d, m = case("watch_relative")
    (c("U", "mkdir", m)("U", "watch", "data/xsc/watch_relative", "xr")
     ("U", "watch", f"{m}/abs", "xa")("U", "ev")("U", "write", f"{m}/abs", b"1")("U", "ev")
     ("U", "write", "data/xsc/watch_relative/rel", b"1")("U", "ev")
     ("0", "write", f"{m}/by0", b"1")("U", "ev")("0", "watch", "xsc-relw", "x0")("0", "ev")
     ("0", "write", "/local/domain/0/xsc-relw/k", b"1")("0", "ev")("0", "rm", "xsc-relw")
     ("0", "ev")("0", "unwatch", "xsc-relw", "x0")("U", "rm", m)("U", "ev")
     ("U", "unwatch", "data/xsc/watch_relative", "xr")("U", "unwatch", f"{m}/abs", "xa"))

    c, d, m = case("watch_errors")
    for bad in ("", f"{d}/", f"{d}/a b", "/" + "a" * 2100, "@" + "a" * 2100):
        c("0", "watch", bad, "xe")("U", "watch", bad, "xe")
    (c("0", "watch", d, "")("0", "ev")("0", "unwatch", d, "")
     ("U", "watch", d, "xd")("U", "watch", d, "xd")("U", "ev")("U", "unwatch", d, "xd")
     ("U", "unwatch", d, "xd")("U", "unwatch", d, "never")("0", "watch", d, "xd")
     ("0", "watch", d, "xd")("0", "ev")("0", "unwatch", d, "xd")
     ("0", "raw", int(Op.RESET_WATCHES), b"")("0", "watch", d, "xz")("0", "ev")
     ("0", "raw", int(Op.RESET_WATCHES), b"")("0", "write", f"{d}/q", b"")("0", "ev")
     ("0", "unwatch", d, "xz")("0", "rm", d))

    c, d, m = case("rm_rules")
    (c("U", "write", f"{m}/a/b/c", b"1")("U", "write", f"{m}/a/b2", b"2")
     ("U", "watch", f"{m}/a/b/c", "xc")("U", "watch", f"{m}/a", "xa")("U", "ev")
     ("0", "setperms", f"{m}/a/b", f"n0,r{u}")("U", "rm", f"{m}/a/b")("U", "rm", f"{m}/a/b/c")
     ("U", "ev")("U", "rm", f"{m}/a/b/nothing")("U", "rm", f"{m}/a/none/x")
     ("U", "rm", f"{m}/a")("U", "ev")("U", "read", f"{m}/a/b/c")("U", "ls", m)
     ("0", "read", f"{m}/a/b/c")("U", "unwatch", f"{m}/a/b/c", "xc")
     ("U", "unwatch", f"{m}/a", "xa")("0", "write", f"{d}/p/q", b"")
     ("0", "setperms", f"{d}/p", f"n0,w{u}")("U", "rm", f"{d}/p/q")("U", "rm", f"{d}/p")
     ("0", "ls", d)("0", "rm", d)("U", "rm", m))

    c, d, m = case("quota_size")
    for n in (1000, 1900, 2000, 2100, 4000):
        c("U", "write", f"{m}/v{n}", b"v" * n)("U", "read", f"{m}/v{n}")
    for n in (2100, 4000, 4080):
        c("0", "write", f"{d}/v{n}", b"v" * n)("0", "read", f"{d}/v{n}")
    (c("0", "write", f"{m}/by0", b"z" * 3000)("U", "read", f"{m}/by0")
     ("U", "write", f"{m}/by0", b"z" * 2500)("U", "write", f"{m}/by0", b"z")
     ("U", "write", f"{m}/" + "n" * 1900, b"")("0", "rm", d)("U", "rm", m))

    c, d, m = case("quota_nodes")
    (c("U", "fill", f"{m}/q", 1200)("U", "write", f"{m}/more", b"x")("U", "mkdir", f"{m}/more")
     ("0", "write", f"{m}/by0", b"x")("U", "rm", f"{m}/q")("U", "write", f"{m}/after", b"x")
     ("U", "txstart", "u")("U", "write", f"{m}/t1", b"x", tx="u")("U", "txend", "T", tx="u")
     ("U", "ls", m)("U", "rm", m))

    c, d, m = case("directory_part")
    (c("0", "write", f"{d}/small/a", b"")("0", "write", f"{d}/small/bb", b"")
     ("0", "dirpart", f"{d}/small", "0")("0", "dirpart", f"{d}/small", "2")
     ("0", "dirpart", f"{d}/small", "5")("0", "dirpart", f"{d}/small", "99")
     ("0", "dirpart", f"{d}/small", "junk")
     ("0", "dirpart", f"{d}/nothing", "0")
     ("0", "fill", f"{d}/big/", BIG_CHILDREN, 20)
     ("0", "raw", int(Op.DIRECTORY), f"{d}/big\0".encode())
     ("0", "ls", f"{d}/big")("0", "dirpart", f"{d}/big", "0")
     ("U", "dirpart", f"{d}/small", "0")("U", "write", f"{m}/k1", b"")
     ("U", "write", f"{m}/k22", b"")("U", "dirpart", m, "0")("U", "dirpart", m, "3")
     ("U", "rm", m)
     ("0", "rm", d))

    c, d, m = case("values")
    (c("0", "write", f"{d}/nul", b"a\0b")("0", "read", f"{d}/nul")
     ("0", "raw", int(Op.WRITE), f"{d}/empty\0".encode())("0", "read", f"{d}/empty")
     ("0", "ls", d)("U", "write", f"{m}/nul", b"\0\0")("U", "read", f"{m}/nul")
     ("U", "write", f"{m}/high", bytes(range(128, 256)))("U", "read", f"{m}/high")
     ("0", "rm", d)("U", "rm", m))

    c, d, m = case("other_domains")
    (c("U", "read", f"/local/domain/{MISSING}")("U", "write", f"/local/domain/{MISSING}/x", b"")
     ("0", "write", f"/local/domain/{MISSING}/xsc", b"made")
     ("0", "perms", f"/local/domain/{MISSING}/xsc")("U", "read", f"/local/domain/{MISSING}/xsc")
     ("0", "rm", f"/local/domain/{MISSING}")("U", "read", "/local/domain/0/domid")
     ("U", "ls", "/local/domain/0")("U", "write", "/local/domain/0/data/xsc", b"")
     ("U", "read", "/tool")("U", "read", "/xsc")("0", "write", d, b"")
     ("0", "setperms", d, f"n{MISSING}")("0", "setperms", d, f"n0,r{MISSING}")("0", "perms", d)
     ("0", "rm", d))

    c, d, m = case("rm_watch_tree")
    (c("0", "write", f"{d}/a/b/c", b"")("0", "write", f"{d}/a/b/d", b"")
     ("0", "setperms", f"{d}/a/b/d", f"n0,r{u}")("0", "setperms", f"{d}/a", f"n0,r{u}")
     ("U", "watch", f"{d}/a/b/c", "x1")("U", "watch", f"{d}/a/b/d", "x2")
     ("0", "watch", f"{d}/a/b/c", "x3")("U", "watch", f"{d}/a", "x4")("U", "ev")("0", "ev")
     ("0", "rm", f"{d}/a/b")("U", "ev")("0", "ev")("0", "rm", f"{d}/a")("U", "ev")("0", "ev")
     ("U", "unwatch", f"{d}/a/b/c", "x1")("U", "unwatch", f"{d}/a/b/d", "x2")
     ("0", "unwatch", f"{d}/a/b/c", "x3")("U", "unwatch", f"{d}/a", "x4")("0", "rm", d))

    c, d, m = case("wire", live=False)
    c("0", "mkdir", d)
    for actor in ("0", "U"):
        for op, payload in WIRE_PROBES(d, m):
            c(actor, "raw", int(op), payload)(actor, "read", "/xsc")
    (c("0", "txstart", "t")("0", "raw", int(Op.TRANSACTION_END), b"T", "t")
     ("0", "read", "/xsc")
     ("0", "txend", "F", tx="t")("U", "txstart", "u")
     ("U", "raw", int(Op.TRANSACTION_END), b"T", "u")
     ("U", "read", "/xsc")("U", "txend", "F", tx="u"))

    for c in cases:  # leave nothing behind, whatever the case did
        c("0", "rm", f"/xsc/{c.name}")("0", "rm", f"{home}/data/xsc/{c.name}")
    return cases


def WIRE_PROBES(d: str, m: str) -> list[tuple[int, bytes]]:
    """Malformed requests (the ``wire`` case, and the bisect on real Xen)."""
    return [
        (Op.MKDIR, b""), (Op.MKDIR, f"{d}/nonul".encode()), (Op.MKDIR, b"\0\0"),
        (Op.MKDIR, f"{d}/mk\0extra\0".encode()), (Op.READ, f"{d}\0extra\0".encode()),
        (Op.READ, f"{d}".encode()), (Op.WRITE, f"{d}/nonul".encode()),
        (Op.GET_PERMS, f"{d}\0\0".encode()), (Op.DIRECTORY, b""),
        (Op.GET_DOMAIN_PATH, b"0"), (Op.DIRECTORY_PART, f"{d}\0".encode()),
        (Op.RM, f"{d}\0a\0b\0".encode()), (Op.WATCH, f"{d}\0a\0b\0".encode()),
        (Op.WATCH, f"{d}\0".encode()), (Op.UNWATCH, f"{d}\0a\0b\0".encode()),
        (Op.UNWATCH, f"{d}\0".encode()), (Op.TRANSACTION_START, b""),
        (Op.TRANSACTION_START, b"junk\0"), (Op.ERROR, b"x\0"), (Op.WATCH_EVENT, b"x\0y\0"),
    ]


def live_cases(domu: int) -> list[Case]:
    return [c for c in corpus(domu) if c.live]


# ---- running -----------------------------------------------------------------------------------

def errname(code: int | None) -> str:
    return errno.errorcode.get(code or errno.EIO, str(code))


def _value(path: str, v: bytes, domu: int) -> str:
    if path.endswith("domid") and v == str(domu).encode():
        return "=U"
    if len(v) > SHORT_VALUE:
        return f"=<{len(v)} bytes {hashlib.sha256(v).hexdigest()[:12]}>"
    return "=" + repr(v)


class Runner:
    """Runs steps as one domain over one connection (a new one after the server closes it)."""

    def __init__(self, domu: int, connect: Callable[[], XenStoreClient], settle: float) -> None:
        self.domu = domu
        self.connect = connect
        self.settle = settle  # how long events must stay quiet before "ev" answers
        self.xs = connect()
        self.tx: dict[str, int] = {}

    def close(self) -> None:
        self.xs.close()

    def run(self, steps: Sequence[Step]) -> list[str]:
        return [self.step(s) for s in steps]

    def step(self, s: Step) -> str:
        tx = 0
        if s.tx is not None:
            tx = int(s.tx) if s.tx.isdigit() else self.tx.get(s.tx, 0)
        try:
            answer = self._do(s, tx)
        except XenStoreError as e:
            if e.errno in (errno.ECONNRESET, errno.EBADF):
                self.xs.close()
                self.xs = self.connect()
                self.tx.clear()
                return "closed"
            answer = errname(e.errno)
        return normalise(answer, self.domu)

    def _do(self, s: Step, tx: int) -> str:
        xs, a = self.xs, s.args
        op = s.op
        if op == "read":
            return _value(str(a[0]), xs.read(str(a[0]), tx), self.domu)
        if op == "write":
            xs.write(str(a[0]), a[1], tx)  # type: ignore[arg-type]
        elif op == "mkdir":
            xs.mkdir(str(a[0]), tx)
        elif op == "rm":
            xs.rm(str(a[0]), tx)
        elif op == "ls":
            return "[" + ",".join(xs.directory(str(a[0]), tx)) + "]"
        elif op == "perms":
            return ",".join(map(str, xs.get_perms(str(a[0]), tx)))
        elif op == "setperms":
            payload = str(a[0]).encode() + b"\0" + b"".join(
                p.encode() + b"\0" for p in str(a[1]).split(",") if str(a[1]))
            xs.request(Op.SET_PERMS, payload, tx, str(a[0]))
        elif op == "txstart":
            new = int(xs.request(Op.TRANSACTION_START, b"\0", tx).rstrip(b"\0"))
            self.tx[str(a[0])] = new
            return "tx"
        elif op == "txend":
            xs.request(Op.TRANSACTION_END, str(a[0]).encode() + b"\0", tx)
        elif op == "watch":
            xs.request(Op.WATCH, f"{a[0]}\0{a[1]}\0".encode(), tx, str(a[0]))
        elif op == "unwatch":
            xs.request(Op.UNWATCH, f"{a[0]}\0{a[1]}\0".encode(), tx, str(a[0]))
        elif op == "ev":
            return self._events()
        elif op == "getdomainpath":
            return xs.request(Op.GET_DOMAIN_PATH, f"{a[0]}\0".encode()).rstrip(b"\0").decode()
        elif op == "introduced":
            return xs.request(Op.IS_DOMAIN_INTRODUCED, f"{a[0]}\0".encode()).rstrip(
                b"\0").decode()
        elif op == "dirpart":
            reply = xs.request(Op.DIRECTORY_PART, f"{a[0]}\0{a[1]}\0".encode(), tx)
            gen, _, names = reply.partition(b"\0")
            return f"G{'' if gen.isdigit() else '?'} " + repr(names)
        elif op == "fill":
            return self._fill(str(a[0]), int(a[1]), int(a[2]) if len(a) > 2 else 0)  # type: ignore[call-overload]
        elif op == "raw":
            reply = xs.request(int(a[0]), a[1], self.tx.get(str(a[2]), 0) if len(a) > 2 else 0)  # type: ignore[arg-type]
            if a[0] == Op.TRANSACTION_START and reply.rstrip(b"\0").isdigit():
                return "reply tx"
            return "reply " + repr(reply)
        else:
            raise ValueError(f"unknown corpus op {op}")
        return "OK"

    def _fill(self, prefix: str, n: int, width: int) -> str:
        """Writes prefix + i for i < n until one fails: its error, or OK."""
        sep = "" if prefix.endswith("/") else "/"
        for i in range(n):
            name = str(i).rjust(width, "x") if width else str(i)
            try:
                self.xs.write(f"{prefix}{sep}{name}", b"")
            except XenStoreError as e:
                return errname(e.errno)
        return "OK"

    def _events(self) -> str:
        """The events that arrived so far, sorted: a request first (every event xenstored
        queued before its reply has come when the reply has), then until quiet for
        ``settle`` seconds (Linux's xenbus device passes events on from a kernel thread)."""
        self.xs.request(Op.GET_DOMAIN_PATH, b"0\0")
        seen = self.xs.read_events()
        while select.select([self.xs.fileno()], [], [], self.settle)[0]:
            more = self.xs.read_events()
            if not more:
                break
            seen += more
        shown = sorted(f"{e.path} {e.token}" for e in seen if "/data/proof" not in e.path)
        return "ev[" + "; ".join(shown) + "]"


Batch = Callable[[str, str, int, int], list[str]]   # (actor, case, start, end) -> answers


def run_case(case: Case, domu: int, batch: Batch) -> list[list[str]]:
    """Runs a case, each run of consecutive steps of one actor as one batch; returns
    [actor, step, answer] per step."""
    out: list[list[str]] = []
    i = 0
    while i < len(case.steps):
        actor = case.steps[i].actor
        j = i
        while j < len(case.steps) and case.steps[j].actor == actor:
            j += 1
        answers = batch(actor, case.name, i, j)
        if len(answers) != j - i:
            raise RuntimeError(f"{case.name}: {j - i} steps, {len(answers)} answers")
        for s, ans in zip(case.steps[i:j], answers, strict=True):
            out.append([actor, s.describe(domu), ans])
        i = j
    return out


def run_all(cases: Sequence[Case], domu: int, batch: Batch) -> dict[str, list[list[str]]]:
    return {c.name: run_case(c, domu, batch) for c in cases}


def compare(recorded: dict[str, list[list[str]]], got: dict[str, list[list[str]]]
            ) -> tuple[int, list[tuple[str, int, str, str, str]]]:
    """Returns (steps compared, differences as (case, index, step, recorded, got))."""
    n, diffs = 0, []
    for name, steps in recorded.items():
        mine = got.get(name, [])
        for i, (actor, desc, want) in enumerate(steps):
            n += 1
            have = mine[i][2] if i < len(mine) and mine[i][1] == desc else "<step missing>"
            if have != want:
                diffs.append((name, i, f"{actor} {desc}", want, have))
    return n, diffs


# ---- the wire bisect (real Xen only) ------------------------------------------------------------

def raw_exchange(path: str, op: int, payload: bytes, tx: int = 0, timeout: float = 5.0) -> str:
    """Sends one request on a new connection: what came back, within ``timeout``."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall(struct.pack("=IIII", op, 7, tx, len(payload)) + payload)
        head = s.recv(16)
        if len(head) < 16:
            return "closed"
        rop, _, _, n = struct.unpack("=IIII", head)
        body = b""
        while len(body) < n:
            more = s.recv(n - len(body))
            if not more:
                break
            body += more
        return f"{rop} {body!r}"
    except TimeoutError:
        return "no answer"
    except OSError as e:
        return f"error {e.strerror}"
    finally:
        s.close()


def wire_bisect(path: str) -> list[tuple[str, str, str]]:
    """Sends each malformed request of the ``wire`` case alone, each on its own connection,
    then checks that a new connection is answered.  Returns (request, answer, health after)
    until the first request after which xenstored stops answering."""
    probes = [(f"{Op(op).name} {payload!r}", int(op), payload)
              for op, payload in WIRE_PROBES("/xsc/wire", "/xsc/wire")]
    out = []
    for name, op, payload in probes:
        answer = raw_exchange(path, int(op), payload)
        time.sleep(0.5)
        health = raw_exchange(path, int(Op.READ), b"/local\0")
        out.append((name, answer, health))
        if not health.startswith(f"{int(Op.READ)} "):
            break
    else:  # TRANSACTION_END "T" without NUL needs a transaction on the same connection
        s = XenStoreClient(path)
        try:
            tx = int(s.request(Op.TRANSACTION_START, b"\0").rstrip(b"\0"))
            try:
                answer = "reply " + repr(s.request(Op.TRANSACTION_END, b"T", tx))
            except XenStoreError as e:
                answer = errname(e.errno)
        finally:
            s.close()
        time.sleep(0.5)
        out.append(("TRANSACTION_END 'T' without NUL", answer,
                    raw_exchange(path, int(Op.READ), b"/local\0")))
    return out



# ---- carrying the answers out of the guest -----------------------------------------------------

CONSOLE_TAG = "XSOCK-XSC"        # the corpus's answers
SIM_ONLY_TAG = "XSOCK-XSCSIM"    # the sim-only cases' (harness.py xsdiff)
_CHUNK = 160


def to_console(result: dict[str, object], tag: str = CONSOLE_TAG) -> list[str]:
    """Console lines carrying ``result`` (JSON, compressed, base64 in numbered chunks)."""
    data = base64.b64encode(zlib.compress(json.dumps(result).encode(), 9)).decode()
    chunks = [data[i:i + _CHUNK] for i in range(0, len(data), _CHUNK)]
    return [f"{tag} {i} {len(chunks)} {c}" for i, c in enumerate(chunks)]


def from_console(lines: Sequence[str], tag: str = CONSOLE_TAG) -> dict[str, object] | None:
    """The result ``to_console`` printed, or None if a chunk is missing."""
    chunks: dict[int, str] = {}
    total = -1
    for line in lines:
        m = re.search(rf"{tag} (\d+) (\d+) (\S+)", line)
        if m and not line.startswith("DOMU"):
            chunks[int(m.group(1))] = m.group(3)
            total = int(m.group(2))
    if total < 0 or len(chunks) != total:
        return None
    data = "".join(chunks[i] for i in range(total))
    return json.loads(zlib.decompress(base64.b64decode(data)))  # type: ignore[no-any-return]


def main(argv: Sequence[str]) -> int:
    """``python tests/xen/guest/xscorpus.py record-sim-only CONSOLE_LOG``: writes the sim-only
    cases' answers from a ``harness.py xsdiff`` console to tests/xen/xenstored-4.17-wire.json."""
    if len(argv) != 2 or argv[0] != "record-sim-only":
        print(main.__doc__)
        return 2
    with open(argv[1], errors="replace") as f:
        result = from_console(f.read().splitlines(), SIM_ONLY_TAG)
    if result is None:
        print(f"{argv[1]}: no complete {SIM_ONLY_TAG} answers")
        return 1
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                       "xenstored-4.17-wire.json")
    with open(out, "w") as f:
        f.write(json.dumps(result, indent=1) + "\n")
    print(f"recorded {out}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
