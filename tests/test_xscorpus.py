"""The differential run's sim side: the corpus of tests/xen/guest/xscorpus.py replayed against the
sim's xenstored as the same domains, compared with what Xen 4.17's C xenstored answered
(tests/xen/xenstored-4.17.json, recorded by the Xen proof, tests/xen/test_xen.py; and, for the
cases the proof does not run, tests/xen/xenstored-4.17-wire.json from harness.py xsdiff).

Every difference is either fixed in the sim or listed in ALLOWED with its reason; docs/SIM.md
("Differential conformance") gives the same reasons, and this test checks that it does.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from xsockd.sim.host import SimHost

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "xen" / "guest"))
import xscorpus  # noqa: E402

RECORDING = ROOT / "tests" / "xen" / "xenstored-4.17.json"
# The sim-only cases' answers, recorded by python tests/xen/harness.py xsdiff (WHY_SIM_ONLY).
SIM_ONLY_RECORDING = ROOT / "tests" / "xen" / "xenstored-4.17-wire.json"
SIM_DOC = ROOT / "docs" / "SIM.md"

# (case, "<actor> <step>" as in the recording) -> why the sim answers differently.  Each reason
# is a bullet of docs/SIM.md's "Differential conformance" section, word for word.
KERNEL_WATCHES = (
    "Linux's /dev/xen/xenbus answers a domU's WATCH and UNWATCH itself: each WATCH becomes a "
    "new watch of the kernel's own (a duplicate is accepted and its events come twice) and "
    "every UNWATCH is acknowledged, known or not. The sim's domU socket answers as xenstored "
    "does, as xenstored 4.17 answers dom0 in the same case (EEXIST, ENOENT).")
MALFORMED = (
    "xenstored 4.17.7 answers a request whose payload is not the strings it expects (no "
    "terminating NUL, too many strings) with ENOMEM, ENOENT or EACCES rather than EINVAL: the "
    "errno varies with the request and the domain, and one request (MKDIR of two empty "
    "strings) got ENOMEM in one boot and EINVAL in the next. The sim answers EINVAL.")
ALLOWED: dict[tuple[str, str], str] = {
    ("watch_errors", "U watch /xsc/watch_errors xd"): KERNEL_WATCHES,
    ("watch_errors", "U ev"): KERNEL_WATCHES,
    ("watch_errors", "U unwatch /xsc/watch_errors xd"): KERNEL_WATCHES,
    ("watch_errors", "U unwatch /xsc/watch_errors never"): KERNEL_WATCHES,
    ("wire", "U raw 4 b'/xsc/wire\\x00a\\x00b\\x00'"): KERNEL_WATCHES,
    ("wire", "U raw 5 b'/xsc/wire\\x00a\\x00b\\x00'"): KERNEL_WATCHES,
}
for _actor in ("0", "U"):
    for _step in ("12 b''", "12 b'/xsc/wire/nonul'", "12 b'\\x00\\x00'",
                  "12 b'/xsc/wire/mk\\x00extra\\x00'", "2 b'/xsc/wire\\x00extra\\x00'",
                  "2 b'/xsc/wire'", "3 b'/xsc/wire\\x00\\x00'", "1 b''",
                  "13 b'/xsc/wire\\x00a\\x00b\\x00'"):
        ALLOWED[("wire", f"{_actor} raw {_step}")] = MALFORMED


def replay(directory: Path, domu: int, cases: list[xscorpus.Case]) -> dict[str, list[list[str]]]:
    """Runs ``cases`` against a sim host whose domains are 0, ``domu`` and one more."""
    steps = {c.name: c.steps for c in cases}
    with SimHost(directory, domains=[0, domu, domu + 1]) as host:
        runners = {a: xscorpus.Runner(domu, lambda d=d: host.xenstore(d), settle=0.02)
                   for a, d in (("0", 0), ("U", domu))}
        try:
            return xscorpus.run_all(cases, domu, lambda actor, case, i, j: runners[actor].run(
                steps[case][i:j]))
        finally:
            for r in runners.values():
                r.close()


def load(path: Path) -> dict[str, object]:
    if not path.exists():
        pytest.fail(f"{path} is missing: record it with the Xen proof (./run test tests/xen; "
                    "XSOCK_XSDIFF_RECORD=1 records again) or, for the sim-only cases, "
                    "python tests/xen/harness.py xsdiff then python tests/xen/guest/xscorpus.py "
                    "record-sim-only .cache/xen/xsdiff.console.log")
    return json.loads(path.read_text())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def recorded() -> dict[str, list[list[str]]]:
    """Both recordings' cases, by name (the same domU id in both)."""
    main, sim_only = load(RECORDING), load(SIM_ONLY_RECORDING)
    assert main["domu"] == sim_only["domu"]
    return {**main["cases"], **sim_only["cases"]}  # type: ignore[dict-item]


@pytest.fixture(scope="module")
def replayed(tmp_path_factory) -> dict[str, list[list[str]]]:
    """Every case, the sim-only ones last (as harness.py xsdiff runs them)."""
    domu = int(load(RECORDING)["domu"])  # type: ignore[call-overload]
    cases = xscorpus.corpus(domu)
    cases = [c for c in cases if c.live] + [c for c in cases if not c.live]
    return replay(tmp_path_factory.mktemp("xsc") / "sim", domu, cases)


def test_the_sim_answers_the_corpus_as_xenstored_does(recorded, replayed):
    assert sorted(recorded) == sorted(replayed), \
        "the corpus changed since the recordings: record again (XSOCK_XSDIFF_RECORD=1)"
    compared, diffs = xscorpus.compare(recorded, replayed)
    allowed = [d for d in diffs if (d[0], d[2]) in ALLOWED]
    unexplained = [d for d in diffs if (d[0], d[2]) not in ALLOWED]
    print(f"\nxscorpus: {compared} steps compared with xenstored 4.17, {len(diffs)} differences, "
          f"{len(allowed)} allowed")
    for case, i, step, want, have in diffs:
        why = "allowed" if (case, step) in ALLOWED else "NOT ALLOWED"
        print(f"  {case}[{i}] {step}: xenstored {want!r}, sim {have!r} ({why})")
    assert compared >= 700
    assert not unexplained, "\n".join(
        f"{case}[{i}] {step}: xenstored answered {want!r}, the sim {have!r}"
        for case, i, step, want, have in unexplained)


def test_every_allowed_difference_happens_and_is_documented(recorded, replayed):
    doc = SIM_DOC.read_text()
    section = doc.split("## Differential conformance", 1)[1].split("\n## ", 1)[0]
    for reason in set(ALLOWED.values()) | set(xscorpus.WHY_SIM_ONLY.values()):
        assert " ".join(reason.split()) in " ".join(section.split()), \
            f"docs/SIM.md does not give this reason: {reason}"
    _, diffs = xscorpus.compare(recorded, replayed)
    stale = set(ALLOWED) - {(d[0], d[2]) for d in diffs}
    assert not stale, f"allowed differences that no longer happen: {sorted(stale)}"


def test_the_sim_keeps_serving_through_the_sim_only_cases(replayed):
    """After each malformed request the domain's next request is answered, over the same
    connection: nothing closes it, nothing stops the server."""
    for name in xscorpus.WHY_SIM_ONLY:
        answers = [a for _, _, a in replayed[name]]
        assert answers and "closed" not in answers and "ETIMEDOUT" not in answers, answers
