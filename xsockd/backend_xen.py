"""The ``xen`` backend: the kernel's /dev/xen devices through Xen's own userspace libraries.

Why the libraries (libxengnttab, libxenevtchn, loaded with cffi in ABI mode) rather than raw
ioctls: they are Xen's stable, documented interface to gntalloc/gntdev/evtchn, they already
handle the kernel's quirks (notify offsets, unmap ordering), and Debian ships them with every
Xen host.  The data path does not go through them: the C ring core polls the event channel's
fd itself and notifies with IOCTL_EVTCHN_NOTIFY, exactly as libxenevtchn does on Linux.
XenStore is spoken directly (our own client) over xenstored's socket in dom0 or
/dev/xen/xenbus elsewhere: the same wire protocol as the sim's.
"""

from __future__ import annotations

import errno
import os
import warnings
from collections.abc import Sequence
from typing import Any

from cffi import FFI

from xsockd.backend import Backend, EventChannel, GrantedPages, MappedPages, UnmapNotify
from xsockd.errors import BackendError, GrantLimitError
from xsockd.xenstore_client import XenStoreClient

__all__ = ["XenBackend"]

PAGE = 4096
NO_NOTIFY = 0xFFFFFFFF  # libxengnttab: -1 as uint32, "no notification of this kind"
XENSTORED_SOCKET = "/var/run/xenstored/socket"
XENBUS = "/dev/xen/xenbus"
NO_XEN = ("/dev/xen is missing: this is not a Xen domain, or the kernel modules xen-evtchn, "
          "xen-gntdev, xen-gntalloc and xenfs are not loaded (load them: modprobe xen-evtchn "
          "xen-gntdev xen-gntalloc xenfs)")

_ffi = FFI()
_ffi.cdef("""
typedef struct xengntdev_handle xengnttab_handle;
typedef struct xengntdev_handle xengntshr_handle;
typedef struct xenevtchn_handle xenevtchn_handle;
xengntshr_handle *xengntshr_open(void *logger, unsigned open_flags);
int xengntshr_close(xengntshr_handle *xgs);
void *xengntshr_share_pages(xengntshr_handle *xgs, uint32_t domid, int count, uint32_t *refs,
                            int writable);
void *xengntshr_share_page_notify(xengntshr_handle *xgs, uint32_t domid, uint32_t *ref,
                                  int writable, uint32_t notify_offset, uint32_t notify_port);
int xengntshr_unshare(xengntshr_handle *xgs, void *start_address, uint32_t count);
xengnttab_handle *xengnttab_open(void *logger, unsigned open_flags);
int xengnttab_close(xengnttab_handle *xgt);
void *xengnttab_map_domain_grant_refs(xengnttab_handle *xgt, uint32_t count, uint32_t domid,
                                      uint32_t *refs, int prot);
void *xengnttab_map_grant_ref_notify(xengnttab_handle *xgt, uint32_t domid, uint32_t ref,
                                     int prot, uint32_t notify_offset, uint32_t notify_port);
int xengnttab_unmap(xengnttab_handle *xgt, void *start_address, uint32_t count);
xenevtchn_handle *xenevtchn_open(void *logger, unsigned open_flags);
int xenevtchn_close(xenevtchn_handle *xce);
int xenevtchn_fd(xenevtchn_handle *xce);
int xenevtchn_notify(xenevtchn_handle *xce, uint32_t port);
int xenevtchn_bind_unbound_port(xenevtchn_handle *xce, uint32_t domid);
int xenevtchn_bind_interdomain(xenevtchn_handle *xce, uint32_t domid, uint32_t remote_port);
int xenevtchn_unbind(xenevtchn_handle *xce, uint32_t port);
int xenevtchn_pending(xenevtchn_handle *xce);
int xenevtchn_unmask(xenevtchn_handle *xce, uint32_t port);
""")
PROT_RW = 0x1 | 0x2


def _load(name: str) -> Any:
    try:
        return _ffi.dlopen(name)
    except OSError as e:
        raise BackendError(errno.ENOENT, f"{name} is missing ({e}); install Xen's libraries "
                                         "(Debian: libxengnttab1 libxenevtchn1)") from None


def _fail(what: str, peer: int | None = None) -> BackendError:
    err = _ffi.errno or errno.EIO
    if err == errno.ENOENT:
        return BackendError(err, f"{what}: {NO_XEN}")
    if err == errno.ENOSPC:
        return GrantLimitError(err, f"{what}: the domain's grant limit is reached; raise the "
                                    "xen_gntalloc module parameter 'limit' "
                                    "(/sys/module/xen_gntalloc/parameters/limit)")
    if err == errno.ESRCH and peer is not None:
        return BackendError(err, f"{what}: domain {peer} does not exist")
    return BackendError(err, f"{what}: {os.strerror(err)}")


class _XenPages:
    """A granted or mapped region; ``release`` undoes it (and fires its unmap notify)."""

    def __init__(self, peer: int, refs: Sequence[int], ptr: Any, release: Any) -> None:
        self.peer = peer
        self.refs = tuple(refs)
        self.count = len(self.refs)
        self._ptr = ptr
        self._release = release
        self._view: memoryview | None = memoryview(_ffi.buffer(ptr, self.count * PAGE))

    @property
    def buffer(self) -> memoryview:
        if self._view is None:
            raise ValueError("pages are closed")
        return self._view

    def close(self) -> None:
        if self._view is None:
            return
        self._view.release()
        self._view = None
        self._release(self._ptr, self.count)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} peer={self.peer} refs={self.refs[:4]}>"

    def __del__(self) -> None:
        if getattr(self, "_view", None) is not None:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)
            self.close()


class XenGrantedPages(_XenPages, GrantedPages):
    pass


class XenMappedPages(_XenPages, MappedPages):
    pass


class XenEventChannel(EventChannel):
    """One port on its own /dev/xen/evtchn handle, so that its fd fires for this port only."""

    kind = "xen"

    def __init__(self, lib: Any, handle: Any, peer: int, port: int) -> None:
        self._lib = lib
        self._handle = handle
        self.peer = peer
        self.port = port
        self.fd = lib.xenevtchn_fd(handle)
        # libxenevtchn opens /dev/xen/evtchn blocking, and its pending() is a read(): with
        # nothing pending, clear() would hang the caller.  The vchan server clears on its
        # once-a-second poll too, which on real Xen stopped the daemon's loop for good.
        os.set_blocking(self.fd, False)
        self.notify_fd = -1

    def notify(self) -> None:
        self._lib.xenevtchn_notify(self._handle, self.port)

    def clear(self) -> None:
        port = self._lib.xenevtchn_pending(self._handle)
        if port >= 0:
            self._lib.xenevtchn_unmask(self._handle, port)

    def close(self) -> None:
        if self._handle is None:
            return
        self._lib.xenevtchn_unbind(self._handle, self.port)
        self._lib.xenevtchn_close(self._handle)
        self._handle = None
        self.fd = -1

    def __repr__(self) -> str:
        return f"<XenEventChannel port={self.port} peer={self.peer}>"

    def __del__(self) -> None:
        if getattr(self, "_handle", None) is not None:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)
            self.close()


class XenBackend(Backend):
    """This domain on real Xen.  ``domid`` None: read it from XenStore."""

    name = "xen"

    def __init__(self, domid: int | None = None) -> None:
        if not os.path.exists("/dev/xen"):
            raise BackendError(errno.ENOENT, NO_XEN)
        self._gnt = _load("libxengnttab.so.1")
        self._evt = _load("libxenevtchn.so.1")
        self._shr = self._gnt.xengntshr_open(_ffi.NULL, 0)
        if self._shr == _ffi.NULL:
            raise _fail("opening /dev/xen/gntalloc")
        self._tab = self._gnt.xengnttab_open(_ffi.NULL, 0)
        if self._tab == _ffi.NULL:
            err = _fail("opening /dev/xen/gntdev")
            self._gnt.xengntshr_close(self._shr)
            raise err
        if domid is None:
            with self.open_xenstore() as xs:
                domid = int(xs.read("domid"))
        self.domid = domid

    def grant(self, peer: int, count: int, notify: UnmapNotify | None = None) -> GrantedPages:
        refs = _ffi.new("uint32_t[]", count)
        if notify is not None:
            if count != 1:
                raise BackendError(errno.EINVAL, "unmap notification needs a one-page grant")
            ptr = self._gnt.xengntshr_share_page_notify(
                self._shr, peer, refs, 1,
                NO_NOTIFY if notify.offset is None else notify.offset,
                NO_NOTIFY if notify.port is None else notify.port)
        else:
            ptr = self._gnt.xengntshr_share_pages(self._shr, peer, count, refs, 1)
        if ptr == _ffi.NULL:
            raise _fail(f"granting {count} pages to domain {peer}", peer)
        return XenGrantedPages(peer, list(refs), ptr,
                               lambda p, n: self._gnt.xengntshr_unshare(self._shr, p, n))

    def map(self, peer: int, refs: Sequence[int], notify: UnmapNotify | None = None
            ) -> MappedPages:
        if notify is not None:
            if len(refs) != 1:
                raise BackendError(errno.EINVAL, "unmap notification needs a one-page mapping")
            ptr = self._gnt.xengnttab_map_grant_ref_notify(
                self._tab, peer, refs[0], PROT_RW,
                NO_NOTIFY if notify.offset is None else notify.offset,
                NO_NOTIFY if notify.port is None else notify.port)
        else:
            arr = _ffi.new("uint32_t[]", list(refs))
            ptr = self._gnt.xengnttab_map_domain_grant_refs(self._tab, len(refs), peer, arr,
                                                            PROT_RW)
        if ptr == _ffi.NULL:
            raise _fail(f"mapping {len(refs)} pages of domain {peer}", peer)
        return XenMappedPages(peer, refs, ptr,
                              lambda p, n: self._gnt.xengnttab_unmap(self._tab, p, n))

    def _channel(self, peer: int, bind: Any, what: str) -> EventChannel:
        handle = self._evt.xenevtchn_open(_ffi.NULL, 0)
        if handle == _ffi.NULL:
            raise _fail("opening /dev/xen/evtchn")
        port = bind(handle)
        if port < 0:
            err = _fail(what, peer)
            self._evt.xenevtchn_close(handle)
            raise err
        return XenEventChannel(self._evt, handle, peer, port)

    def alloc_unbound(self, peer: int) -> EventChannel:
        return self._channel(peer, lambda h: self._evt.xenevtchn_bind_unbound_port(h, peer),
                             f"allocating an event channel for domain {peer}")

    def bind_interdomain(self, peer: int, remote_port: int) -> EventChannel:
        return self._channel(
            peer, lambda h: self._evt.xenevtchn_bind_interdomain(h, peer, remote_port),
            f"binding port {remote_port} of domain {peer}")

    def open_xenstore(self) -> XenStoreClient:
        path = XENSTORED_SOCKET if os.path.exists(XENSTORED_SOCKET) else XENBUS
        return XenStoreClient(path)

    def close(self) -> None:
        if self._tab is not None:
            self._gnt.xengnttab_close(self._tab)
            self._gnt.xengntshr_close(self._shr)
            self._tab = self._shr = None
