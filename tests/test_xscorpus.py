"""The differential run's sim side: the corpus of tests/xen/guest/xscorpus.py replayed against the
sim's xenstored as the same domains, compared with what Xen 4.17's C xenstored answered
(tests/xen/xenstored-4.17.json, recorded by the Xen proof, tests/xen/test_xen.py).

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
SIM_DOC = ROOT / "docs" / "SIM.md"

# (case, "<actor> <step>" as in the recording) -> why the sim answers differently.  Each reason
# is a bullet of docs/SIM.md's "Differential conformance" section, word for word.
KERNEL_WATCHES = (
    "Linux's /dev/xen/xenbus answers a domU's WATCH and UNWATCH itself: each WATCH becomes a "
    "new watch of the kernel's own (a duplicate is accepted and its events come twice) and "
    "every UNWATCH is acknowledged, known or not. The sim's domU socket answers as xenstored "
    "does, as xenstored 4.17 answers dom0 in the same case (EEXIST, ENOENT).")
ALLOWED: dict[tuple[str, str], str] = {
    ("watch_errors", "U watch /xsc/watch_errors xd"): KERNEL_WATCHES,
    ("watch_errors", "U ev"): KERNEL_WATCHES,
    ("watch_errors", "U unwatch /xsc/watch_errors xd"): KERNEL_WATCHES,
    ("watch_errors", "U unwatch /xsc/watch_errors never"): KERNEL_WATCHES,
}


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


@pytest.fixture(scope="module")
def recording() -> dict[str, object]:
    if not RECORDING.exists():
        pytest.fail(f"{RECORDING} is missing: record it with the Xen proof "
                    "(./run test tests/xen; XSOCK_XSDIFF_RECORD=1 records again)")
    return json.loads(RECORDING.read_text())


def test_the_sim_answers_the_corpus_as_xenstored_does(recording, tmp_path):
    domu = int(recording["domu"])  # type: ignore[call-overload]
    cases = xscorpus.live_cases(domu)
    recorded: dict[str, list[list[str]]] = recording["cases"]  # type: ignore[assignment]
    assert sorted(recorded) == sorted(c.name for c in cases), \
        "the corpus changed since the recording: record again (XSOCK_XSDIFF_RECORD=1)"
    got = replay(tmp_path / "sim", domu, cases)
    compared, diffs = xscorpus.compare(recorded, got)
    allowed = [d for d in diffs if (d[0], d[2]) in ALLOWED]
    unexplained = [d for d in diffs if (d[0], d[2]) not in ALLOWED]
    print(f"\nxscorpus: {compared} steps compared with xenstored 4.17, {len(diffs)} differences, "
          f"{len(allowed)} allowed")
    for case, i, step, want, have in diffs:
        why = ALLOWED.get((case, step), "NOT ALLOWED")
        print(f"  {case}[{i}] {step}: xenstored {want!r}, sim {have!r} ({why})")
    assert compared >= 400
    assert not unexplained, "\n".join(
        f"{case}[{i}] {step}: xenstored answered {want!r}, the sim {have!r}"
        for case, i, step, want, have in unexplained)


def test_every_allowed_difference_happens_and_is_documented(recording, tmp_path):
    doc = SIM_DOC.read_text()
    section = doc.split("## Differential conformance", 1)[1].split("\n## ", 1)[0]
    for reason in set(ALLOWED.values()) | set(xscorpus.WHY_SIM_ONLY.values()):
        assert " ".join(reason.split()) in " ".join(section.split()), \
            f"docs/SIM.md does not give this reason: {reason}"
    recorded: dict[str, list[list[str]]] = recording["cases"]  # type: ignore[assignment]
    steps = {(name, f"{s[0]} {s[1]}") for name, ss in recorded.items() for s in ss}
    stale = [k for k in ALLOWED if k not in steps]
    assert not stale, f"allowed differences for steps the corpus no longer has: {stale}"


def test_the_sim_only_cases_keep_the_sim_serving(tmp_path):
    """The cases real xenstored is not given (WHY_SIM_ONLY): the sim answers every step and
    keeps answering afterwards."""
    cases = [c for c in xscorpus.corpus(1) if not c.live]
    assert {c.name for c in cases} == set(xscorpus.WHY_SIM_ONLY)
    got = replay(tmp_path / "sim", 1, cases)
    for name, steps in got.items():
        for actor, desc, answer in steps:
            if desc == "read /xsc":  # the check after each malformed request: answered
                assert answer not in ("closed", "ETIMEDOUT"), f"{name}: {actor} -> {answer}"
    answers = [a for steps in got.values() for _, desc, a in steps if desc != "read /xsc"]
    assert "closed" not in answers and "ETIMEDOUT" not in answers
