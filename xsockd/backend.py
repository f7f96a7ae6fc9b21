"""The interface every Xen backend implements: grants, event channels and XenStore.

Two implementations exist: ``backend_sim.SimBackend`` (simulated domains on one host) and
``backend_xen.XenBackend`` (the kernel's /dev/xen devices).  Nothing above this module knows
which one runs.  The interface mirrors what Linux offers a user-space process on Xen:

* gntalloc: grant pages of our own to one other domain (``Backend.grant``);
* gntdev:   map pages another domain granted to us (``Backend.map``);
* evtchn:   event channels, one handle (one pollable fd) per channel;
* xenbus:   XenStore connections speaking the xenstored wire protocol.

Resources belong to the object that returned them and are released by its ``close()``; if the
process dies, the kernel (or the sim's hypervisor) releases them and performs any unmap
notification that was registered.

Lifecycle of every resource object: open -> closed (``close()`` is idempotent).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = [
    "Backend",
    "EventChannel",
    "MappedPages",
    "SharedPages",
    "UnmapNotify",
    "WatchEvent",
    "XenStore",
    "XenStorePerm",
]


@dataclass(frozen=True)
class UnmapNotify:
    """What to do when our mapping or grant goes away (close, or death of this process).

    ``offset`` is a byte offset into the region whose byte is set to 0; ``port`` is a *local*
    event-channel port that is then signalled.  Either may be None.
    """

    offset: int | None
    port: int | None


class SharedPages(abc.ABC):
    """A region of whole pages shared with one peer domain (granted by us or mapped from it)."""

    peer: int
    count: int

    @property
    @abc.abstractmethod
    def buffer(self) -> memoryview:
        """Returns a writable memoryview of the whole region (``count`` pages)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Unshares or unmaps the region; performs its unmap notification if one was set."""


class GrantedPages(SharedPages):
    """Pages of ours granted to ``peer``; ``refs`` are their grant references, in order."""

    refs: tuple[int, ...]


class MappedPages(SharedPages):
    """Pages granted to us by ``peer``, mapped contiguously in the order of ``refs``."""

    refs: tuple[int, ...]


class EventChannel(abc.ABC):
    """One end of an interdomain event channel, with its own pollable fd.

    The C ring core drives the data path itself, so it needs the raw handles: ``kind`` says
    how to use them.

    * ``kind == "eventfd"`` (sim): ``fd`` is an eventfd that becomes readable when the peer
      notifies (read 8 bytes to clear it); ``notify_fd`` is the peer's eventfd (write an
      8-byte 1 to notify).
    * ``kind == "xen"``: ``fd`` is an open /dev/xen/evtchn handle bound to ``port`` only;
      readable when the port fired (read the 4-byte port numbers, then write them back to
      unmask); notify with ``IOCTL_EVTCHN_NOTIFY`` on ``port``.
    """

    kind: str
    port: int          # our local port number
    peer: int          # remote domain id
    fd: int
    notify_fd: int     # "eventfd" kind only; -1 otherwise

    @abc.abstractmethod
    def notify(self) -> None:
        """Signals the remote end."""

    @abc.abstractmethod
    def clear(self) -> None:
        """Consumes pending notifications so that ``fd`` stops being readable; with none
        pending, returns at once (``fd`` is non-blocking; the xen backend's was not, and a
        clear with nothing pending hung the caller)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Closes our end; the remote end stops receiving our notifications."""


@dataclass(frozen=True)
class XenStorePerm:
    """One entry of a node's permission list: ``perm`` is "n", "r", "w" or "b" (both).

    As in xenstored, the first entry of a list names the owner and the access of every
    domain not listed afterwards.
    """

    domid: int
    perm: str

    def __str__(self) -> str:
        return f"{self.perm}{self.domid}"

    @classmethod
    def parse(cls, text: str) -> XenStorePerm:
        """Returns the entry for wire text such as ``"r2"``; raises ValueError if malformed."""
        if len(text) < 2 or text[0] not in "nrwb" or not text[1:].isdigit():
            raise ValueError(f"bad XenStore permission {text!r}")
        return cls(int(text[1:]), text[0])


@dataclass(frozen=True)
class WatchEvent:
    path: str
    token: str


class XenStore(abc.ABC):
    """A connection to XenStore.  Calls block until xenstored answers (it is local and quick).

    Relative paths are relative to our domain's home, ``/local/domain/<domid>``.  Errors raise
    ``XenStoreError`` with the errno xenstored sent (ENOENT, EACCES, EAGAIN, EINVAL, ...).
    ``tx`` is a transaction id from ``transaction_start`` (0: none).
    """

    @abc.abstractmethod
    def read(self, path: str, tx: int = 0) -> bytes:
        """Returns the value of ``path``."""

    @abc.abstractmethod
    def write(self, path: str, value: bytes | str, tx: int = 0) -> None:
        """Creates or overwrites ``path`` (and missing parents, as xenstored does)."""

    @abc.abstractmethod
    def mkdir(self, path: str, tx: int = 0) -> None:
        """Creates ``path`` with an empty value if it does not exist."""

    @abc.abstractmethod
    def rm(self, path: str, tx: int = 0) -> None:
        """Removes ``path`` and everything below it."""

    @abc.abstractmethod
    def directory(self, path: str, tx: int = 0) -> list[str]:
        """Returns the names of the children of ``path``."""

    @abc.abstractmethod
    def get_perms(self, path: str, tx: int = 0) -> list[XenStorePerm]:
        """Returns the permission list of ``path``."""

    @abc.abstractmethod
    def set_perms(self, path: str, perms: Sequence[XenStorePerm], tx: int = 0) -> None:
        """Replaces the permission list of ``path``."""

    @abc.abstractmethod
    def transaction_start(self) -> int:
        """Returns a new transaction id."""

    @abc.abstractmethod
    def transaction_end(self, tx: int, commit: bool = True) -> bool:
        """Ends ``tx``; returns False if a commit lost a race (EAGAIN: retry the transaction)."""

    @abc.abstractmethod
    def get_domain_path(self, domid: int) -> str:
        """Returns the home path of ``domid`` (``/local/domain/<domid>``)."""

    @abc.abstractmethod
    def domain_exists(self, domid: int) -> bool:
        """Returns False once ``domid`` is gone (xenstored no longer knows it as introduced).

        Raises XenStoreError where xenstored does not let us ask (EACCES for a domU).
        """

    @abc.abstractmethod
    def watch(self, path: str, token: str) -> None:
        """Asks for a ``WatchEvent`` whenever ``path`` or anything below it changes.

        As with xenstored, one event fires at once on registration.
        """

    @abc.abstractmethod
    def unwatch(self, path: str, token: str) -> None:
        """Cancels a watch."""

    @abc.abstractmethod
    def fileno(self) -> int:
        """Returns an fd that is readable when watch events may be waiting."""

    @abc.abstractmethod
    def read_events(self) -> list[WatchEvent]:
        """Returns the watch events that have arrived, without blocking."""

    @abc.abstractmethod
    def close(self) -> None:
        """Closes the connection; its watches and open transactions end with it."""


class Backend(abc.ABC):
    """One domain's access to Xen.  ``domid`` is our own domain id."""

    name: str
    domid: int

    @abc.abstractmethod
    def grant(self, peer: int, count: int, notify: UnmapNotify | None = None) -> GrantedPages:
        """Returns ``count`` new zeroed pages of ours granted (writable) to ``peer`` only.

        Raises GrantLimitError (ENOSPC) past the per-domain limit, BackendError otherwise.
        """

    @abc.abstractmethod
    def map(self, peer: int, refs: Sequence[int], notify: UnmapNotify | None = None
            ) -> MappedPages:
        """Returns ``peer``'s pages ``refs`` mapped writable, contiguously, in that order.

        Raises BackendError (EINVAL/EPERM) if any ref is not granted by ``peer`` to us.
        """

    @abc.abstractmethod
    def alloc_unbound(self, peer: int) -> EventChannel:
        """Returns a new port of ours that only ``peer`` may bind."""

    @abc.abstractmethod
    def bind_interdomain(self, peer: int, remote_port: int) -> EventChannel:
        """Returns a new port of ours bound to ``peer``'s unbound ``remote_port``."""

    @abc.abstractmethod
    def open_xenstore(self) -> XenStore:
        """Returns a new XenStore connection acting as our domain."""

    @abc.abstractmethod
    def close(self) -> None:
        """Releases whatever the backend itself holds (not the objects it returned)."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# A factory that builds a backend for a domain: ``make(domid) -> Backend``.
BackendFactory = Callable[[int], Backend]
