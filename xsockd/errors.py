"""Exceptions of xsockd.  Each also inherits the builtin category it belongs to."""

from __future__ import annotations

__all__ = [
    "DBUS_ERRORS",
    "AccessDenied",
    "BackendError",
    "ConfigError",
    "DaemonNotRunning",
    "GrantLimitError",
    "NoSuchChannel",
    "PeerGone",
    "ProtocolError",
    "RefusedError",
    "XenStoreError",
    "XsockError",
]


class XsockError(Exception):
    """Base of every xsockd error."""


class ConfigError(XsockError, ValueError):
    """A configuration file or value is invalid.

    ``path``, ``table``, ``key`` and ``line`` say where, when known.
    """

    def __init__(self, message: str, *, path: str | None = None, table: str | None = None,
                 key: str | None = None, line: int | None = None) -> None:
        self.path, self.table, self.key, self.line = path, table, key, line
        where = []
        if path:
            where.append(path + (f":{line}" if line else ""))
        if table or key:
            where.append(".".join(p for p in (table, key) if p))
        super().__init__((": ".join(where) + ": " if where else "") + message)


class BackendError(XsockError, OSError):
    """The Xen (or simulated Xen) interface refused an operation.  ``errno`` is set."""


class GrantLimitError(BackendError):
    """No more pages may be granted (Linux gntalloc's ``limit``, or the sim's)."""


class XenStoreError(BackendError):
    """A XenStore request failed; ``path`` names the node and ``errno`` the reason."""

    def __init__(self, errno_: int, message: str, path: str | None = None) -> None:
        super().__init__(errno_, message)
        self.path = path


class ProtocolError(XsockError, ConnectionError):
    """The peer broke the link protocol (bad index, frame or XenStore entry)."""


class RefusedError(XsockError, PermissionError):
    """A domain or a stream was refused by configuration."""


class PeerGone(XsockError, ConnectionResetError):
    """The peer daemon or domain went away; ``domid`` names it."""

    def __init__(self, domid: int, message: str = "peer gone") -> None:
        super().__init__(message)
        self.domid = domid


class NoSuchChannel(XsockError, LookupError):
    """No open channel has the id ``channel_id`` (None when only the message is known)."""

    def __init__(self, channel_id: int | None, message: str | None = None) -> None:
        super().__init__(message or f"no channel {channel_id}")
        self.channel_id = channel_id


class AccessDenied(XsockError, PermissionError):
    """The caller may not do this (a D-Bus caller who is not root closing a channel)."""


class DaemonNotRunning(XsockError, ConnectionError):
    """No xsockd owns the D-Bus name on the bus asked (xsockctl's side)."""


# The one table of D-Bus error names: exception class -> name of the error reply.  The D-Bus
# face replies with these; xsockctl maps them back.  Anything else is a bug and says so.
DBUS_ERRORS: dict[type[XsockError], str] = {
    NoSuchChannel: "org.xsockd.Xsockd1.Error.NoSuchChannel",
    AccessDenied: "org.xsockd.Xsockd1.Error.AccessDenied",
    XsockError: "org.xsockd.Xsockd1.Error.Failed",
}
