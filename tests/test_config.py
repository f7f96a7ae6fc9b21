"""Configuration: the shipped file, every validation rule, and --check-config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from xsockd.config import load_config, parse_config, parse_size
from xsockd.errors import ConfigError

SHIPPED = Path(__file__).parent.parent / "conf" / "xsockd.conf"


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
    ("[link]\nring_size = \"8MiB\"\n", "link.ring_size", "power of two"),
    ("[link]\nring_size = \"4MiB\"\ngrant_pages = 1024\n", "link.ring_size", "needs 2049 pages"),
    ("[link]\nmax_streams = 0\n", "link.max_streams", "integer from 1"),
    ("[link]\nmax_streams = \"9\"\n", "link.max_streams", "integer"),
    ("[daemon]\npeers = [1, 1]\n", "daemon.peers", "twice"),
    ("[daemon]\npeers = [40000]\n", "daemon.peers", "outside"),
    ("[daemon]\npeers = \"2\"\n", "daemon.peers", "list of domain ids"),
    ("[daemon]\nrundir = \"relative\"\n", "daemon.rundir", "absolute"),
    ("[daemon]\nbackend = \"kvm\"\n", "daemon.backend", "xen"),
    ("[daemon]\nfoo = 1\n", "test.conf:2: daemon.foo", "unknown key"),
    ("[deamon]\n", "test.conf:1: deamon", "unknown table"),
    ("[daemon]\ndefault_service = \"web\"\n", "daemon.default_service", "names no service"),
    ("[daemon]\npeers=[2]\n[services.a]\nallow=[2]\n", "services.a", "needs socket"),
    ("[daemon]\npeers=[2]\n[services.a]\nsocket=\"/s\"\nallow=[3]\n", "services.a.allow",
     "not in [daemon] peers"),
    ("[services.a]\nsocket=\"/" + "x" * 120 + "\"\n", "services.a.socket", "longer"),
    ("[services.\"a b\"]\nsocket=\"/s\"\n", "services.a b", "service names"),
    ("[services.a]\nsocket=\"/s\"\ncaller_header = 1\n", "services.a.caller_header",
     "true or false"),
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
    assert missing.returncode == 1 and "cannot read" in missing.stderr
