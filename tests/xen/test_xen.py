"""The xen backend on a real hypervisor: Debian's Xen 4.17, a PV dom0 and two PV domUs, under
QEMU (the second domU is a third domain that runs no xsockd and attacks the link).

One boot runs the whole proof (``tests/xen/guest/xsproof.py``, driven from dom0); each test
below checks the steps of one claim and shows the guests' consoles when it fails.  The steps
and figures are printed as they come.  Alone: ``python -m pytest tests/xen``; by hand, with
everything the guests print: ``python tests/xen/harness.py proof``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import harness
import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "guest"))
import xscorpus  # noqa: E402

RECORDING = HERE / "xenstored-4.17.json"  # tests/test_xscorpus.py compares the sim with it
TIMEOUT = float(os.environ.get("XSOCK_XEN_TIMEOUT", "1500"))


@pytest.fixture(scope="module")
def proof(pytestconfig: pytest.Config) -> Iterator[harness.Result]:
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\nxen proof: booting Xen 4.17 with a PV dom0 and two PV domUs under QEMU",
              flush=True)
        result = harness.run((HERE / "proof_dom0.sh").read_text(),
                             (HERE / "proof_domu.sh").read_text(), timeout=TIMEOUT,
                             third_script=(HERE / "proof_third.sh").read_text())
        log = result.save("proof")
        print(f"xen proof: {len(result.steps)} steps in {result.seconds:.0f} s; "
              f"console in {log}", flush=True)
        print(figure_table(result.figures), flush=True)
    yield result


# Who carries the stream in each column of the figures: the figures' key prefixes.
COLUMNS = (("xsockd", "xsockd link"), ("vcli", "xsockd vc-client"),
           ("vsrv", "xsockd vc-server"), ("vchan", "proxy-proxy"), ("unix", "AF_UNIX dom0"))


def figure_table(figures: dict[str, str]) -> str:
    """The figures of one run: xsockd's link; xsockd as vchan client of the domU's
    vchan-socket-proxy server (vc-client) and as vchan server of its client (vc-server); the
    proxy at both ends; the same applications over AF_UNIX inside dom0 (the ceiling)."""
    rows = [("", *(label for _, label in COLUMNS))]
    for key, label in (("dom0_to_domu_MBps", "dom0 -> domU, MB/s"),
                       ("domu_to_dom0_MBps", "domU -> dom0, MB/s"),
                       ("open_first_ms", "first stream open, ms"),
                       ("open_ms", "later stream open, ms"),
                       ("open_first_eager_ms", "first stream open, eager, ms"),
                       ("open_eager_ms", "later stream open, eager, ms"),
                       ("rtt_p50_ms", "1-byte round trip p50, ms")):
        rows.append((label, *(figures.get(f"{prefix}.{key}", "-") for prefix, _ in COLUMNS)))
    for key in ("kill9_detect_s", "destroy_detect_s", "vchan-client-kill9_detect_s",
                "vchan-server-kill9_detect_s"):
        rows.append((key.replace("_", " "), figures.get(f"xsockd.{key}", "-"),
                     *("" for _ in COLUMNS[1:])))
    return ("xen proof figures (under emulation: they compare only with each other; AF_UNIX "
            "is dom0's app to its own sink and source)\n"
            + "\n".join(f"  {r[0]:34}" + "".join(f"{c:>18}" for c in r[1:]) for r in rows))


def expect(result: harness.Result, *names: str) -> None:
    """Fails unless dom0 reported every step in ``names`` as passed."""
    problems = []
    for name in names:
        got = result.steps.get(f"dom0:{name}")
        if got is None:
            problems.append(f"step {name} was never reported")
        elif not got[0]:
            problems.append(f"step {name} FAILED: {got[1]}")
    failed = [f"{n}: {d}" for n, (ok, d) in result.steps.items() if not ok]
    if problems:
        pytest.fail("\n".join(problems) + "\nall failed steps: " + "; ".join(failed)
                    + "\nlast console lines:\n" + result.tail(60), pytrace=False)


def test_both_domains_come_up_and_run_xsockd_on_the_xen_backend(proof: harness.Result) -> None:
    expect(proof, "xenstored", "init-dom0", "xenconsoled", "domu-created", "agent",
           "domu-xsockd")


def test_a_domain_not_in_the_configuration_is_refused_then_reload_admits_it(proof):
    expect(proof, "refused-unconfigured", "refused-released", "reload-adds-peer")


def test_a_configured_domain_that_does_not_exist_is_refused_at_once(proof):
    expect(proof, "unknown-domain")


def test_64_mib_each_way_from_both_sides_sha256_equal(proof):
    expect(proof, "open", "echo-dom0-app", "echo-domu-app", "throughput-to-domu",
           "throughput-from-domu")


def test_100_concurrent_streams_each_verified(proof):
    expect(proof, "concurrent-100")


def test_a_half_closed_stream_keeps_flowing_the_other_way(proof):
    expect(proof, "half-close")


def test_xenstore_permissions_hold_on_xens_own_xenstored(proof):
    expect(proof, "xs-permissions", "xs-no-squat", "xs-request-dir-kept")


def test_a_third_domain_can_neither_squat_create_read_list_nor_remove_the_link_requests(proof):
    expect(proof, "domu2-created", "third-ready", "third-attack", "third-cannot-squat",
           "third-cannot-create", "third-cannot-read-write", "third-cannot-list",
           "third-cannot-remove", "third-nodes-unchanged")


def test_a_third_domain_flooding_the_link_requests_changes_nothing(proof):
    expect(proof, "third-flood-harmless", "third-nodes-unchanged")


def test_the_link_streams_through_the_attack_and_is_set_up_again_after_it(proof):
    expect(proof, "third-streaming-unharmed", "third-link-setup-after")


def test_backend_errors_name_the_fix(proof):
    expect(proof, "clear-errors")


def test_kill_9_of_the_peer_daemon_is_seen_at_once_and_everything_released(proof):
    expect(proof, "kill9-streaming", "kill9-app-sees-end", "kill9-released", "restart-works")


def test_xl_destroy_of_the_peer_domain_is_seen_at_once_and_everything_released(proof):
    expect(proof, "destroy-streaming", "destroy-app-sees-end", "destroy-released",
           "dom0-xsockd-alive", "dom0-xsockd-stops")


def test_vchan_socket_proxy_baseline_measured_in_the_same_run(proof):
    expect(proof, "vchan-servers", "vchan-baseline")
    for key in ("dom0_to_domu_MBps", "domu_to_dom0_MBps", "open_first_ms"):
        assert float(proof.figures[f"xsockd.{key}"]) > 0
        assert float(proof.figures[f"vchan.{key}"]) > 0


def test_xsockd_vchan_client_moves_64_mib_each_way_through_the_stock_proxy_server(proof):
    expect(proof, "vchan-xsockd-start", "vchan-client-open", "vchan-client-to-domu",
           "vchan-client-from-domu")


def test_xsockd_vchan_server_moves_64_mib_each_way_through_the_stock_proxy_client(proof):
    expect(proof, "vchan-xsockd-start", "vchan-server-open", "vchan-server-to-domu",
           "vchan-server-from-domu")


def test_the_proxy_server_killed_is_seen_at_once_and_everything_released(proof):
    expect(proof, "vchan-client-kill9-streaming", "vchan-client-kill9-app-sees-end",
           "vchan-client-kill9-released")


def test_the_proxy_client_killed_is_seen_at_once_released_and_a_fresh_vchan_served(proof):
    expect(proof, "vchan-server-kill9-streaming", "vchan-server-kill9-app-sees-end",
           "vchan-server-kill9-released", "vchan-server-republished",
           "vchan-xsockd-restored")


def test_vchan_roles_round_trips_and_the_unix_ceiling_measured_in_the_same_run(proof):
    expect(proof, "unix-ceiling", "round-trip")
    for prefix, _ in COLUMNS:
        for key in ("dom0_to_domu_MBps", "domu_to_dom0_MBps", "rtt_p50_ms"):
            assert float(proof.figures.get(f"{prefix}.{key}", 0)) > 0, f"{prefix}.{key}"
    for prefix in ("vcli", "vsrv"):
        assert float(proof.figures.get(f"{prefix}.open_first_ms", 0)) > 0, prefix
    for key in ("vchan-client-kill9_detect_s", "vchan-server-kill9_detect_s"):
        assert float(proof.figures.get(f"xsockd.{key}", "inf")) < 1.0, key


def test_an_eager_link_is_up_before_any_stream_and_its_first_open_sets_none_up(proof):
    expect(proof, "eager-link-up", "eager-open", "eager-off")
    for key in ("open_first_eager_ms", "open_eager_ms"):
        assert float(proof.figures.get(f"xsockd.{key}", 0)) > 0, key


def test_no_step_failed(proof):
    failed = {n: d for n, (ok, d) in proof.steps.items() if not ok}
    assert not failed, failed


def test_xenstored_answers_the_corpus_for_the_differential_run(proof):
    """The corpus (tests/xen/guest/xscorpus.py) against Xen's own xenstored, as dom0 and the
    domU: the answers go to .cache/xen/xenstored-live.json and, when tests/xen/
    xenstored-4.17.json is missing or XSOCK_XSDIFF_RECORD=1, become the recording that
    tests/test_xscorpus.py compares the sim with."""
    expect(proof, "xscorpus")
    result = xscorpus.from_console(proof.console)
    assert result is not None, "the corpus's answers did not all reach the console"
    cases = result["cases"]
    assert sorted(cases) == sorted(c.name for c in xscorpus.live_cases(int(result["domu"])))
    live = harness.CACHE / "xenstored-live.json"
    live.write_text(json.dumps(result, indent=1) + "\n")
    steps = sum(len(v) for v in cases.values())
    print(f"\nxscorpus: {len(cases)} cases, {steps} steps answered by xenstored; in {live}")
    if not RECORDING.exists() or os.environ.get("XSOCK_XSDIFF_RECORD") == "1":
        RECORDING.write_text(json.dumps(result, indent=1) + "\n")
        print(f"xscorpus: recorded in {RECORDING}")
        return
    # xenstored answered the same in every boot so far: a change means the recording is stale.
    compared, diffs = xscorpus.compare(json.loads(RECORDING.read_text())["cases"], cases)
    assert not diffs, (f"{len(diffs)} of {compared} answers differ from {RECORDING.name} "
                       f"(XSOCK_XSDIFF_RECORD=1 records again): {diffs[:5]}")
