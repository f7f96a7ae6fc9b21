"""systemd integration: readiness, status, watchdog, stopping, and journal logging.

The only module that imports ``systemd`` (systemd-python).  Outside systemd (no NOTIFY_SOCKET,
no journal socket) everything here is a no-op or falls back to stderr, and says so once.
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["ServiceNotifier", "setup_logging"]

log = logging.getLogger(__name__)
JOURNAL_SOCKET = "/run/systemd/journal/socket"


class ServiceNotifier:
    """sd_notify(3) for a Type=notify service; does nothing without NOTIFY_SOCKET."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._notify = None
        if self.enabled:
            from systemd import daemon  # type: ignore[import-not-found]

            self._notify = daemon.notify
        log.debug("systemd notification %s", "enabled" if self.enabled else
                  "not available (no NOTIFY_SOCKET): running outside systemd")

    def _send(self, text: str) -> bool:
        return bool(self._notify(text)) if self._notify else False

    def ready(self, status: str) -> bool:
        """Tells systemd we are ready (every listening socket exists)."""
        return self._send(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> bool:
        return self._send(f"STATUS={status}")

    def stopping(self) -> bool:
        return self._send("STOPPING=1")

    def ping(self) -> bool:
        return self._send("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Returns how often to ping the watchdog (half of WATCHDOG_USEC), or None if off.

        As sd_watchdog_enabled(3): WATCHDOG_PID, when set, must be our pid.
        """
        if not self.enabled:
            return None
        pid = os.environ.get("WATCHDOG_PID")
        if pid and pid != str(os.getpid()):
            return None
        try:
            usec = int(os.environ.get("WATCHDOG_USEC", "0"))
        except ValueError:
            return None
        return usec / 2e6 if usec > 0 else None


class _StderrFormatter(logging.Formatter):
    """One line per record, structured XSOCK_* fields appended as key=value."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = [f"{k.lower()}={v}" for k, v in sorted(vars(record).items())
                  if k.startswith("XSOCK_")]
        return f"{text} [{' '.join(fields)}]" if fields else text


def setup_logging(verbose: bool = False, journal: bool | None = None) -> str:
    """Configures the root logger: the journal when its socket exists, stderr otherwise.

    Fields passed as ``extra={"XSOCK_PEER": 2, ...}`` become journal fields (JournalHandler
    sends upper-case record attributes as fields).  Returns "journal" or "stderr".
    """
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    use_journal = os.path.exists(JOURNAL_SOCKET) if journal is None else journal
    if use_journal:
        from systemd.journal import JournalHandler  # type: ignore[import-not-found]

        handler: logging.Handler = JournalHandler(SYSLOG_IDENTIFIER="xsockd")
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_StderrFormatter("xsockd[%(process)d] %(levelname)s %(message)s"))
    root.addHandler(handler)
    return "journal" if use_journal else "stderr"
