"""The rundir: refused unless ours and closed to others; nothing reached through a symlink."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from xsockd.errors import ConfigError
from xsockd.listeners import SOCKET_MODE, Rundir

NOBODY = 65534


def test_a_new_rundir_gets_the_documented_modes_whatever_the_umask(tmp_path: Path):
    old = os.umask(0o002)
    try:
        rd = Rundir(str(tmp_path / "run"))
        try:
            plain = rd.listen(2)
            named = rd.listen(2, "web")
        finally:
            os.umask(old)
        assert stat.S_IMODE(os.stat(tmp_path / "run").st_mode) == 0o755
        assert stat.S_IMODE(os.stat(tmp_path / "run" / "2").st_mode) == 0o755
        for path in (tmp_path / "run" / "2.sock", tmp_path / "run" / "2" / "web.sock"):
            st = os.lstat(path)
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == SOCKET_MODE
        c = socket.socket(socket.AF_UNIX)
        c.connect(str(tmp_path / "run" / "2" / "web.sock"))
        conn, _ = named.accept()
        conn.close()
        c.close()
        plain.close()
        named.close()
        rd.unlink(2, "web")
        assert not (tmp_path / "run" / "2").exists()  # its last service gone
        rd.close()
    finally:
        os.umask(old)


@pytest.mark.parametrize("mode", [0o775, 0o757, 0o1777])
def test_an_existing_rundir_writable_by_others_is_refused(tmp_path: Path, mode: int):
    """Regression: with a rundir in a shared place, a local user could create it first and
    put its own socket where applications expect domain 2."""
    (tmp_path / "run").mkdir()
    os.chmod(tmp_path / "run", mode)
    with pytest.raises(ConfigError, match="writable by group or others"):
        Rundir(str(tmp_path / "run"))


def test_an_existing_rundir_of_another_user_is_refused(tmp_path: Path):
    if os.geteuid() != 0:
        pytest.fail("this test needs root (to give the directory to another user)")
    (tmp_path / "run").mkdir(mode=0o755)
    os.chown(tmp_path / "run", NOBODY, NOBODY)
    with pytest.raises(ConfigError, match=f"belongs to uid {NOBODY}"):
        Rundir(str(tmp_path / "run"))


def test_a_rundir_that_is_a_symlink_is_refused(tmp_path: Path):
    (tmp_path / "elsewhere").mkdir(mode=0o755)
    (tmp_path / "run").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="not a directory"):
        Rundir(str(tmp_path / "run"))


def test_nothing_below_the_rundir_is_reached_through_a_symlink(tmp_path: Path):
    """Regression: chmod followed a symlink put in place of a named service's directory and
    re-moded a root-only directory 0755."""
    secret = tmp_path / "secret"
    secret.mkdir(mode=0o700)
    rd = Rundir(str(tmp_path / "run"))
    try:
        (tmp_path / "run" / "2").symlink_to(secret)
        with pytest.raises(OSError):
            rd.listen(2, "web")
        assert stat.S_IMODE(os.stat(secret).st_mode) == 0o700
        assert list(secret.iterdir()) == []
        # A symlink where the socket goes is not followed either: bind refuses to replace it.
        target = tmp_path / "target"
        (tmp_path / "run" / "3.sock").symlink_to(target)
        with pytest.raises(OSError):
            rd.listen(3)
        assert not target.exists()
    finally:
        rd.close()


def test_a_socket_left_by_an_earlier_run_is_replaced(tmp_path: Path):
    rd = Rundir(str(tmp_path / "run"))
    try:
        old = rd.listen(2)
        old.close()  # a killed daemon leaves its socket file
        new = rd.listen(2)
        c = socket.socket(socket.AF_UNIX)
        c.connect(str(tmp_path / "run" / "2.sock"))
        conn, _ = new.accept()
        conn.close()
        c.close()
        new.close()
    finally:
        rd.close()
