"""Log lines a peer can cause but neither flood nor forge.

Whatever a peer does that makes us warn (a refused stream, a malformed request, a protocol
error) goes through ``PeerLog``: at most ``burst`` lines per peer per ``interval`` seconds,
then one line saying how many were left out.  Text a peer wrote (a refusal reason, a service
name) goes through ``escape`` first, so that a newline cannot start a line of its choosing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

__all__ = ["PeerLog", "escape"]

MAX_TEXT = 120


def escape(text: str | bytes, limit: int = MAX_TEXT) -> str:
    """Returns peer-written ``text`` printable on one line: controls escaped, length bounded."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "backslashreplace")
    out = []
    for ch in text[:limit]:
        if ch == "\\":
            out.append("\\\\")
        elif ch.isprintable() and ch.isascii():
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    if len(text) > limit:
        out.append("...")
    return "".join(out)


class PeerLog:
    """Rate-limited warnings by peer.  ``clock`` returns monotonic seconds."""

    def __init__(self, logger: logging.Logger, clock: Callable[[], float], *,
                 burst: int = 10, interval: float = 10.0) -> None:
        self.log = logger
        self.clock = clock
        self.burst = burst
        self.interval = interval
        # peer -> [window start, lines logged in it, lines left out]
        self._windows: dict[int, list[float]] = {}

    def info(self, peer: int, msg: str, *args: object, **extra: object) -> None:
        self._emit(logging.INFO, peer, msg, args, extra)

    def warning(self, peer: int, msg: str, *args: object, **extra: object) -> None:
        self._emit(logging.WARNING, peer, msg, args, extra)

    def error(self, peer: int, msg: str, *args: object, **extra: object) -> None:
        self._emit(logging.ERROR, peer, msg, args, extra)

    def _emit(self, level: int, peer: int, msg: str, args: tuple[object, ...],
              extra: dict[str, object]) -> None:
        now = self.clock()
        w = self._windows.get(peer)
        if w is None or now - w[0] >= self.interval:
            if w is not None and w[2]:
                self.log.warning("domain %d: %d more messages like the above were left out in "
                                 "%g s", peer, int(w[2]), self.interval,
                                 extra={"XSOCK_PEER": peer})
            w = self._windows[peer] = [now, 0, 0]
        if w[1] >= self.burst:
            w[2] += 1
            return
        w[1] += 1
        self.log.log(level, msg, *args, extra={"XSOCK_PEER": peer, **extra})

    def flush(self) -> None:
        """Says, for each peer whose window ended with lines left out, how many (call it
        every ``interval`` seconds, so that the count is not held until the peer's next)."""
        now = self.clock()
        for peer, w in list(self._windows.items()):
            if now - w[0] >= self.interval:
                if w[2]:
                    self.log.warning("domain %d: %d more messages like the above were left "
                                     "out in %g s", peer, int(w[2]), self.interval,
                                     extra={"XSOCK_PEER": peer})
                del self._windows[peer]

    def forget(self, peer: int) -> None:
        """Drops ``peer``'s window (a peer removed from the configuration)."""
        self._windows.pop(peer, None)
