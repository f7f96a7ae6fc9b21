"""The rundir and its listening sockets: <rundir>/<peer>.sock and <rundir>/<peer>/<name>.sock.

An application trusts that <rundir>/2.sock leads to domain 2, so nobody but the daemon's user
may put anything there: an existing rundir is refused unless we own it and neither group nor
others may write it, and everything below it is reached from an open descriptor of it
(``dir_fd``, O_NOFOLLOW), never through a symlink someone swapped in.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from collections.abc import Iterator

from xsockd.errors import ConfigError

__all__ = ["DIR_MODE", "SOCKET_MODE", "Rundir", "listen_unix", "make_dir", "socket_path"]

SOCKET_MODE = 0o660
DIR_MODE = 0o755
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    # bind() creates the socket file with 0777 & ~umask: the mode is set at birth, so no
    # chmod (which would follow a symlink put in its place) is needed afterwards.  The pumps
    # never create files, so changing the process umask for this instant is safe.
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def listen_unix(path: str, mode: int, kind: int = socket.SOCK_STREAM,
                backlog: int = socket.SOMAXCONN) -> socket.socket:
    """Returns a non-blocking listener bound at ``path`` with exactly ``mode``, whatever the
    umask; a socket left there by an earlier run is replaced (anything else is not)."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
    try:
        sock.setblocking(False)
        with _umask(0o777 & ~mode):
            sock.bind(path)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def make_dir(path: str, mode: int = DIR_MODE) -> None:
    """Creates ``path`` (and missing parents) with ``mode``, whatever the umask; an existing
    directory is left as it is (it may be /tmp)."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        return
    os.chmod(path, mode)


def _check_owned(fd: int, path: str) -> None:
    st = os.fstat(fd)
    if st.st_uid != os.geteuid():
        raise ConfigError(f"{path} belongs to uid {st.st_uid}, not to us (uid {os.geteuid()}): "
                          "refusing to serve sockets there; remove it or choose another rundir",
                          table="daemon", key="rundir")
    if st.st_mode & 0o022:
        raise ConfigError(f"{path} is writable by group or others (mode "
                          f"{stat.S_IMODE(st.st_mode):04o}): anyone could replace our sockets; "
                          f"chmod go-w it or choose another rundir", table="daemon", key="rundir")


def socket_path(rundir: str, peer: int, service: str = "") -> str:
    """Returns <rundir>/<peer>.sock (the default service) or <rundir>/<peer>/<service>.sock."""
    if service:
        return os.path.join(rundir, str(peer), f"{service}.sock")
    return os.path.join(rundir, f"{peer}.sock")


class Rundir:
    """The daemon's socket directory, opened once and checked; ``close()`` closes it."""

    def __init__(self, path: str) -> None:
        self.path = path
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, mode=DIR_MODE, exist_ok=True)
        try:
            os.mkdir(path, DIR_MODE)
            created = True
        except FileExistsError:
            created = False
        try:
            self.fd = os.open(path, _OPEN_DIR)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise ConfigError(f"{path} is not a directory (a symlink or a file): refusing",
                                  table="daemon", key="rundir") from e
            raise
        try:
            _check_owned(self.fd, path)
            if created:
                os.fchmod(self.fd, DIR_MODE)  # whatever the umask
        except BaseException:
            os.close(self.fd)
            raise

    @contextlib.contextmanager
    def _dir_of(self, peer: int, service: str, create: bool) -> Iterator[int]:
        """Yields the descriptor of the directory that holds the socket (a subdir per peer)."""
        if not service:
            yield self.fd
            return
        name = str(peer)
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, DIR_MODE, dir_fd=self.fd)
        fd = os.open(name, _OPEN_DIR, dir_fd=self.fd)
        try:
            _check_owned(fd, os.path.join(self.path, name))
            if create:
                os.fchmod(fd, DIR_MODE)
            yield fd
        finally:
            os.close(fd)

    def listen(self, peer: int, service: str = "") -> socket.socket:
        """Returns a non-blocking listener at <rundir>/<peer>[/<service>].sock, mode 0660."""
        with self._dir_of(peer, service, create=True) as dfd:
            name = f"{service}.sock" if service else f"{peer}.sock"
            # Bound through our descriptor of the directory: no path component can be
            # swapped for a symlink between the checks above and the bind.
            return listen_unix(f"/proc/self/fd/{dfd}/{name}", SOCKET_MODE)

    def unlink(self, peer: int, service: str = "") -> None:
        """Removes the socket (and a peer's subdir once its last service is gone)."""
        try:
            with self._dir_of(peer, service, create=False) as dfd:
                name = f"{service}.sock" if service else f"{peer}.sock"
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=dfd)
        except (FileNotFoundError, ConfigError):
            return
        if service:
            with contextlib.suppress(OSError):
                os.rmdir(str(peer), dir_fd=self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
