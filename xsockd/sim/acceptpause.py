"""Accepting without spinning when the host is out of descriptors.

A listener whose accept() fails with EMFILE stays readable: watched by the selector, it would
wake the loop again at once, forever, while the connection waits in the backlog.  Such a
listener is unwatched for ``PAUSE`` seconds instead (the client waits in the backlog, as it
would on a busy xenstored), then watched again by ``resume``.
"""

from __future__ import annotations

import errno
import selectors
import socket
import time
from collections.abc import Callable
from typing import Any

__all__ = ["PAUSE", "AcceptPause"]

PAUSE = 0.1
_OUT_OF_DESCRIPTORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class AcceptPause:
    """The listeners of one server that are paused, and when each is watched again."""

    def __init__(self) -> None:
        self.paused: dict[socket.socket, tuple[float, Callable[[], Any]]] = {}

    def accept(self, sel: selectors.BaseSelector | None, sock: socket.socket
               ) -> socket.socket | None:
        """Returns a new connection, or None (nothing waiting, or paused for lack of fds)."""
        try:
            return sock.accept()[0]
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return None
        except OSError as e:
            if e.errno not in _OUT_OF_DESCRIPTORS or sel is None:
                return None
            data = sel.get_key(sock).data
            sel.unregister(sock)
            self.paused[sock] = (time.monotonic() + PAUSE, data)
            return None

    def unregister(self, sel: selectors.BaseSelector | None, sock: socket.socket) -> None:
        """Stops watching ``sock`` for good, paused or not."""
        if self.paused.pop(sock, None) is None and sel is not None:
            sel.unregister(sock)

    def resume(self, sel: selectors.BaseSelector | None, now: float | None = None) -> None:
        """Watches again every listener whose pause is over."""
        now = time.monotonic() if now is None else now
        for sock, (until, data) in list(self.paused.items()):
            if now >= until and sel is not None:
                del self.paused[sock]
                sel.register(sock, selectors.EVENT_READ, data)
