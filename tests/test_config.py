"""Configuration: the shipped file, every validation rule, and --check-config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from xsockd.config import (
    check_config_main,
    check_own_domain,
    load_config,
    parse_config,
    parse_size,
)
from xsockd.errors import ConfigError
from xsockd.words import count, size_text

SHIPPED = Path(__file__).parent.parent / "conf" / "xsockd.conf"
_VCHAN_SERVER = ("[services.e]\nsocket = \"/s\"\n[vchan.q]\nrole = \"server\"\ndomain = 5\n"
                 "service = \"e\"\n")


def error_of(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        parse_config(text, "test.conf")
    return e.value


def test_shipped_file_is_valid_and_means_what_its_comments_say():
    cfg = load_config(str(SHIPPED))
    assert cfg.daemon.peers == (2,)
    assert cfg.daemon.default_service == "echo"
    assert cfg.link.ring_size == 256 * 1024
    assert cfg.link_pages() == 129
    assert cfg.service_for(2, None).socket == "/run/echo.sock"
    assert cfg.service_for(3, None) is None
    assert cfg.services_for(2) == ["echo"]


def test_defaults_when_tables_are_missing():
    cfg = parse_config("[daemon]\npeers = [1]\n")
    assert cfg.link.grant_pages == 1024 and cfg.link.max_streams == 1024
    assert cfg.daemon.rundir == "/run/xsock"
    assert cfg.service_for(1, None) is None


@pytest.mark.parametrize("value,size", [(4096, 4096), ('"256KiB"', 262144), ('"1MiB"', 1 << 20),
                                        ('"4 KiB"', 4096)])
def test_sizes(value, size):
    assert parse_config(f"[link]\nring_size = {value}\n").link.ring_size == size


@pytest.mark.parametrize("text,where,words", [
    ("[link]\nring_size = 5000\n", "test.conf:2: link.ring_size", "power of two"),
    ("[link]\nring_size = \"lots\"\n", "link.ring_size", "not a size"),
    ("[link]\nring_size = \"8MiB\"\n", "link.ring_size",
     "\"8MiB\" is more than the largest, \"4MiB\""),
    ("[link]\nring_size = \"4MiB\"\ngrant_pages = 1024\n", "link.ring_size", "needs 2049 pages"),
    ("[link]\nmax_streams = 0\n", "link.max_streams", "integer from 1"),
    ("[link]\nmax_streams = \"9\"\n", "link.max_streams", "integer"),
    ("[daemon]\npeers = [1, 1]\n", "daemon.peers", "twice"),
    ("[daemon]\npeers = [40000]\n", "daemon.peers", "outside"),
    ("[daemon]\npeers = \"2\"\n", "daemon.peers", "list of domain ids"),
    ("[daemon]\nrundir = \"relative\"\n", "daemon.rundir", "absolute"),
    ("[daemon]\nbackend = \"kvm\"\n", "daemon.backend", "xen"),
    ("[daemon]\nfoo = 1\n", "test.conf:2: daemon.foo", "unknown key"),
    ("[deamon]\n", "test.conf:1: unknown table [deamon]", "did you mean [daemon]?"),
    ("[daemon]\ndefault_service = \"web\"\n", "daemon.default_service", "names no service"),
    ("[daemon]\npeers=[2]\n[services.a]\nallow=[2]\n", "services.a", "needs socket"),
    ("[daemon]\npeers=[2]\n[services.a]\nsocket=\"/s\"\nallow=[3]\n", "services.a.allow",
     "not in [daemon] peers"),
    ("[services.a]\nsocket=\"/" + "x" * 120 + "\"\n", "services.a.socket", "longer"),
    ("[services.\"a b\"]\nsocket=\"/s\"\n", "services.a b", "service names"),
    ("[services.a]\nsocket=\"/s\"\ncaller_header = 1\n", "services.a.caller_header",
     "true or false"),
    ("[vchan.q]\ndomain = 5\n", "vchan.q.role", "client"),
    ("[vchan.q]\nrole = \"client\"\n", "vchan.q.domain", "domain id"),
    ("[vchan.q]\nrole = \"client\"\ndomain = 5\npath = \"/local/domain/6/x\"\n",
     "vchan.q.path", "inside /local/domain/5/"),
    ("[vchan.q]\nrole = \"client\"\ndomain = 5\npath = \"/local/domain/5//x\"\n",
     "vchan.q.path", "XenStore path"),
    ("[vchan.q]\nrole = \"client\"\ndomain = 5\npath = \"/local/domain/5/x\"\n"
     "service = \"e\"\n", "vchan.q.service", "unknown key for a client"),
    ("[vchan.q]\nrole = \"server\"\ndomain = 5\nservice = \"nope\"\n", "vchan.q.service",
     "[services.NAME]"),
    (_VCHAN_SERVER + "ring_size = [\"1KiB\", \"1KiB\"]\n", "vchan.q.ring_size",
     "libxenvchan cannot place"),
    (_VCHAN_SERVER + "ring_size = [\"1KiB\", \"1MiB\"]\n", "vchan.q.ring_size",
     "libxenvchan cannot place"),
    (_VCHAN_SERVER + "ring_size = [\"64KiB\", \"2MiB\"]\n", "vchan.q.ring_size", "largest"),
    (_VCHAN_SERVER + "ring_size = [\"64KiB\"]\n", "vchan.q.ring_size", "two sizes"),
    (_VCHAN_SERVER + "linger = -1\n", "vchan.q.linger", ""),
    ("[link]\ngrant_pages = 260\n" + _VCHAN_SERVER + "ring_size = [\"1MiB\", \"4KiB\"]\n",
     "link.grant_pages", "the vchan servers hold 258 grant pages"),
])
def test_each_rule_names_table_and_key(text, where, words):
    e = error_of(text)
    assert where in str(e) and words in str(e), str(e)


def test_syntax_error_names_the_line():
    e = error_of("[daemon]\npeers = [1,\nrundir = 3\n")
    assert e.line is not None and "test.conf:" in str(e) and "not valid TOML" in str(e)


def test_parse_size_rejects_booleans_and_floats():
    for bad in (True, 1.5, "1.5MiB", "-4096"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_check_config_command(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "xsockd.daemon", "--check-config", str(SHIPPED)],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "OK (1 peer, 1 service)" in ok.stdout
    bad = tmp_path / "bad.conf"
    bad.write_text("[link]\nstream_window = 3\n")
    r = subprocess.run([sys.executable, "-m", "xsockd.daemon", "--check-config", str(bad)],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert f"{bad}:2: link.stream_window" in r.stderr and "Traceback" not in r.stderr
    missing = subprocess.run([sys.executable, "-m", "xsockd.daemon", "--check-config",
                              str(tmp_path / "nope.conf")], capture_output=True, text=True)
    assert missing.returncode == 1
    assert missing.stderr == f"xsockd: {tmp_path / 'nope.conf'}: does not exist\n", missing.stderr
    # Starting the daemon with a missing file also says how to name another one.
    start = subprocess.run([sys.executable, "-m", "xsockd.daemon", "--config",
                            str(tmp_path / "nope.conf")], capture_output=True, text=True)
    assert start.returncode == 1 and "does not exist (another file: --config FILE)" in start.stderr


@pytest.mark.parametrize("text,line,words", [
    ("[daemon]\npeers = [2]\n\n[lnk]\nring_size = 4096\n", 4, "unknown table [lnk]; did you "
     "mean [link]?"),
    ("[daemon]\npeers = [2]\n[service.echo]\nsocket = \"/s\"\n", 3,
     "unknown table [service]; did you mean [services.NAME]?"),
    ("[daemon]\npeers = [2]\n[ remotes . 2 ]\nservices = []\n", 3,
     "unknown table [remotes]; did you mean [remote.DOMID]?"),
    ("# comment\n[[deamon]]\npeers = [2]\n", 2, "unknown table [deamon]"),
    ("\nrundir = \"/run/x\"\n[daemon]\n", 2, "rundir = ... is outside every table"),
    ("[daemon]\npeers = [2]\n[\"zzz\".a]\nb = 1\n", 3, "unknown table [zzz] (the tables are"),
])
def test_a_mistyped_table_is_reported_with_its_line(text, line, words):
    e = error_of(text)
    assert e.line == line and f"test.conf:{line}: " in str(e) and words in str(e), str(e)


@pytest.mark.parametrize("value,words", [
    ('"300KiB"', '"300KiB" is not a power of two: nearest are "256KiB" or "512KiB"'),
    ('"300K"', '"300K" is not a power of two: nearest are "256K" or "512K"'),
    ('"3MiB"', '"3MiB" is not a power of two: nearest are "2MiB" or "4MiB"'),
    ("307200", "307200 is not a power of two: nearest are 262144 or 524288"),
    ('"2KiB"', '"2KiB" is less than the smallest, "4KiB" (a power of two from "4KiB" to "4MiB")'),
    ("8388608", "8388608 is more than the largest, 4194304"),
])
def test_a_bad_size_is_answered_in_the_units_written(value, words):
    e = error_of(f"[link]\nring_size = {value}\n")
    assert str(e).startswith(f"test.conf:2: link.ring_size: {words}"), str(e)


def test_own_domain_among_peers_is_refused_by_check_config_with_domid(tmp_path):
    conf = tmp_path / "self.conf"
    conf.write_text("[daemon]\nbackend = \"sim\"\npeers = [1, 2]\n")
    words = f"{conf}:3: daemon.peers: lists domain 1, which is this domain itself"
    with pytest.raises(ConfigError) as e:
        check_own_domain(load_config(str(conf)), 1)
    assert words in str(e.value)
    check_own_domain(load_config(str(conf)), 3)  # any other domain may use it
    r = subprocess.run([sys.executable, "-m", "xsockd.daemon", "--check-config", str(conf),
                        "--domid", "1"], capture_output=True, text=True)
    assert r.returncode == 1 and words in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "xsockd.daemon", "--check-config", str(conf),
                        "--domid", "3"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == f"{conf}: OK for domain 3 (2 peers, 0 services)\n"
    # Without --domid (and no Xen to ask) it says what it could not check.
    r = subprocess.run([sys.executable, "-m", "xsockd.daemon", "--check-config", str(conf)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "not checked against a domain id: add --domid N" in r.stdout


def test_check_config_asks_which_domain_it_is_for_when_not_told(tmp_path, capsys):
    # On Xen the daemon's check_config_main is given a way to read our domid from XenStore.
    conf = tmp_path / "x.conf"
    conf.write_text("[daemon]\npeers = [0, 4]\n")
    assert check_config_main(str(conf), None, lambda cfg: 0) == 1
    assert f"{conf}:2: daemon.peers: lists domain 0, which is this domain itself" in \
        capsys.readouterr().err
    assert check_config_main(str(conf), 5, lambda cfg: 0) == 0  # --domid wins
    assert capsys.readouterr().out == f"{conf}: OK for domain 5 (2 peers, 0 services)\n"


def test_counts_are_singular_or_plural():
    assert (count(0, "peer"), count(1, "peer"), count(2, "peer")) == ("0 peers", "1 peer",
                                                                    "2 peers")
    assert count(1, "idle stream") == "1 idle stream" and count(3, "ox", "oxen") == "3 oxen"
    assert size_text(262144) == "256KiB" and size_text(262144, "K") == "256K"
    assert size_text(4096 * 3 + 1, "KiB") == "12289"


def test_vchan_tables():
    cfg = parse_config(_VCHAN_SERVER + "ring_size = [\"1KiB\", \"256KiB\"]\nlinger = 2\n"
                       "[vchan.c]\nrole = \"client\"\ndomain = 6\n"
                       "path = \"/local/domain/6/device-model/4/qmp-vchan\"\n")
    server, client = cfg.vchans["q"], cfg.vchans["c"]
    assert (server.role, server.domain, server.service) == ("server", 5, "e")
    assert (server.left_order, server.right_order, server.linger) == (10, 18, 2.0)
    assert server.absolute_path(3) == "/local/domain/3/data/vchan/5/q"  # the default path
    assert (client.role, client.domain, client.linger) == ("client", 6, 5.0)
    assert client.absolute_path(3) == "/local/domain/6/device-model/4/qmp-vchan"
    # The server's shared page and its 256 KiB ring's 64 pages; the 1 KiB ring is in the page.
    assert (server.pages(), client.pages(), cfg.vchan_pages()) == (65, 0, 65)
