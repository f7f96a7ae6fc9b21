"""The D-Bus face of the daemon (pydbus), and the client xsockctl uses to reach it.

The only module that imports ``pydbus``.  The interface is ``org.xsockd.Xsockd1.xml`` beside
this file.  Each method converts its arguments, calls one snake_case method of the Manager and
converts the result; signals and PropertiesChanged follow the manager's channel table through a
``ChannelObserver``.  Everything runs on the daemon's one GLib loop and nothing here blocks on
the data path: byte counts come from the C pumps' snapshots.

Errors reach callers under the names of ``errors.DBUS_ERRORS`` with a one-sentence message;
pydbus's traceback logging of those caller faults is filtered out.
"""

from __future__ import annotations

import array
import functools
import logging
from collections.abc import Callable
from importlib import resources
from typing import TYPE_CHECKING, Any

import pydbus  # noqa: F401  (gives Gio.DBusConnection its .pydbus attribute)
from gi.repository import Gio, GLib  # type: ignore[import-not-found]
from pydbus.generic import signal
from pydbus.method_call_context import MethodCallContext
from pydbus.registration import ObjectRegistration, ObjectWrapper

from xsockd import __version__
from xsockd.constants import DBUS_INTERFACE, DBUS_NAME, DBUS_PATH, DBUS_READ_GROUP, DBUS_XML
from xsockd.errors import (
    DBUS_ERRORS,
    AccessDenied,
    DaemonNotRunning,
    NoSuchChannel,
    XsockError,
)

if TYPE_CHECKING:
    from xsockd.loop import Loop
    from xsockd.manager import Channel, Manager

__all__ = ["CHANNEL_TYPES", "INTERFACE_XML", "STATISTICS_TYPES", "VCHAN_TYPES", "Client",
           "DBusFace", "XsockdObject"]

log = logging.getLogger(__name__)

INTERFACE_XML = resources.files("xsockd").joinpath(DBUS_XML).read_text()

# D-Bus type of each field of a channel and of the statistics (the XML documents them).
CHANNEL_TYPES = {
    "id": "u", "peer": "u", "service": "s", "direction": "s", "state": "s", "stream": "u",
    "ring_size_rx": "u", "ring_size_tx": "u", "bytes_in": "t", "bytes_out": "t",
    "created": "d", "grant_refs": "au", "event_channel": "u", "link_role": "s",
}
VCHAN_TYPES = {
    "kind": "s", "name": "s", "path": "s", "peer": "u", "state": "s", "streams": "t",
    "bytes_in": "t", "bytes_out": "t",
}
STATISTICS_TYPES = {
    "domid": "u", "channels": "u", "links": "u", "links_up": "u", "peers": "u",
    "granted_pages": "u", "grant_limit": "u", "grant_share": "u", "link_ring_size": "u",
    "link_pages": "u", "started": "d", "uptime": "d",
    "bytes_in": "t", "bytes_out": "t", "frames_in": "t", "frames_out": "t", "notify_sent": "t",
    "wakeups": "t", "streams_opened": "t", "streams_refused": "t", "streams_failed": "t",
    "streams_fast": "t", "links_opened": "t", "links_refused": "t", "links_failed": "t",
    "peer_faults": "t", "handler_failures": "t", "core_streams": "u", "admitting": "u",
}

_CALL_TIMEOUT_MS = 10_000

# pydbus names an error reply after the exception's class: these classes carry the full names.
_REPLY_CLASSES: dict[type[XsockError], type[Exception]] = {
    cls: type(name, (Exception,), {}) for cls, name in DBUS_ERRORS.items()}


class _DropCallerFaults(logging.Filter):
    """Drops pydbus's traceback for errors we reply on purpose (they are the caller's)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[0] if record.exc_info else None
        return exc not in _REPLY_CLASSES.values()


logging.getLogger("pydbus.registration").addFilter(_DropCallerFaults())


def _bus_name(address: str | None) -> str:
    return f"the bus at {address}" if address else "the system bus"


def _bus_connect(address: str | None) -> Any:
    """Returns a connection to the bus at ``address`` (None: the system bus); GLib.Error."""
    if not address:
        return Gio.bus_get_sync(Gio.BusType.SYSTEM, None)
    return Gio.DBusConnection.new_for_address_sync(
        address, Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT
        | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION, None, None)


@functools.lru_cache(maxsize=256)
def _uint32_array(values: tuple[int, ...]) -> GLib.Variant:
    """Returns an ``au`` Variant, built from bytes: PyGObject's element-by-element builder
    takes tens of milliseconds for a link's 129 grant refs on a busy machine."""
    data = array.array("I", values)
    assert data.itemsize == 4
    return GLib.Variant.new_from_bytes(GLib.VariantType("au"), GLib.Bytes.new(data.tobytes()),
                                       True)


_LEAVES: dict[str, Callable[[Any], GLib.Variant]] = {
    "u": GLib.Variant.new_uint32, "t": GLib.Variant.new_uint64, "s": GLib.Variant.new_string,
    "d": GLib.Variant.new_double, "au": lambda v: _uint32_array(tuple(v))}
_ENTRY = GLib.VariantType("{sv}")
_DICT = GLib.VariantType("a{sv}")


def _vardict(values: dict[str, object], types: dict[str, str]) -> GLib.Variant:
    """Returns ``values`` as an ``a{sv}`` Variant, typed by ``types``, built by GLib's own
    constructors (PyGObject's generic builder costs about three times as much)."""
    return GLib.Variant.new_array(_ENTRY, [
        GLib.Variant.new_dict_entry(GLib.Variant.new_string(k),
                                    GLib.Variant.new_variant(_LEAVES[types[k]](v)))
        for k, v in values.items()])


def _caller_uid(context: Any) -> int | None:
    """Returns the unix uid of the caller as the bus daemon knows it, or None."""
    sender = context.sender if context is not None else None
    if not sender:
        return None
    reply = context.bus.con.call_sync(
        "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
        "GetConnectionUnixUser", GLib.Variant("(s)", (sender,)), GLib.VariantType("(u)"),
        Gio.DBusCallFlags.NONE, 5000, None)
    return int(reply.unpack()[0])


def _method(root_only: bool = False, prebuilt: bool = False
            ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Wraps a D-Bus method: one debug line, authorization, errors under their D-Bus names.

    ``prebuilt``: the method returns its whole reply as one Variant (see ``_Wrapper``).
    """
    def wrap(func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)  # pydbus reads the signature (dbus_context) through __wrapped__
        def call(self: XsockdObject, *args: Any, dbus_context: Any = None) -> Any:
            sender = dbus_context.sender if dbus_context is not None else None
            log.debug("D-Bus %s%r from %s", func.__name__, args, sender)
            try:
                if root_only:
                    try:
                        uid = _caller_uid(dbus_context)
                    except GLib.Error as e:
                        raise AccessDenied(f"cannot tell who is calling: {e.message}") from e
                    if uid != 0:
                        raise AccessDenied(f"only root may call {func.__name__} (caller uid "
                                           f"{uid})")
                return func(self, *args, dbus_context=dbus_context)
            except XsockError as e:
                reply = next(r for c, r in _REPLY_CLASSES.items() if isinstance(e, c))
                raise reply(str(e)) from None
        call.prebuilt_reply = prebuilt  # type: ignore[attr-defined]
        return call
    return wrap


class _Wrapper(ObjectWrapper):
    """pydbus's object wrapper, except that a method marked ``prebuilt`` returns its reply as
    a finished Variant, sent as it is.  pydbus would rebuild it element by element in Python
    (``GLib.Variant(signature, result)``), the bulk of a large ListChannels."""

    def call_method(self, connection: Any, sender: str, object_path: str, interface_name: str,
                    method_name: str, parameters: Any, invocation: Any) -> None:
        method = getattr(self.object, method_name, None) \
            if interface_name == DBUS_INTERFACE else None
        if not getattr(method, "prebuilt_reply", False):
            super().call_method(connection, sender, object_path, interface_name, method_name,
                                parameters, invocation)
            return
        assert method is not None
        try:
            reply = method(*parameters.unpack(), dbus_context=MethodCallContext(invocation))
        except tuple(_REPLY_CLASSES.values()) as e:
            invocation.return_dbus_error(type(e).__name__, str(e))
            return
        except Exception as e:  # a bug: say so in the log, and to the caller in one line
            log.exception("D-Bus %s failed", method_name)
            invocation.return_dbus_error(DBUS_ERRORS[XsockError], f"internal error: {e!r}")
            return
        invocation.return_value(reply)


class XsockdObject:
    """The object at /org/xsockd/Xsockd1; its members are the interface's."""

    dbus = INTERFACE_XML

    ChannelOpened = signal()
    ChannelClosed = signal()
    PropertiesChanged = signal()

    def __init__(self, manager: Manager, backend_name: str) -> None:
        self._manager = manager
        self._backend_name = backend_name

    @_method(prebuilt=True)
    def ListChannels(self, dbus_context: Any = None) -> GLib.Variant:
        channels = [_vardict(c, CHANNEL_TYPES) for c in self._manager.list_channels()]
        return GLib.Variant.new_tuple(GLib.Variant.new_array(_DICT, channels))

    @_method(prebuilt=True)
    def ListVchans(self, dbus_context: Any = None) -> GLib.Variant:
        vchans = [_vardict(v, VCHAN_TYPES) for v in self._manager.list_vchans()]
        return GLib.Variant.new_tuple(GLib.Variant.new_array(_DICT, vchans))

    @_method(prebuilt=True)
    def GetChannel(self, channel_id: int, dbus_context: Any = None) -> GLib.Variant:
        channel = self._manager.channel_info(channel_id)
        return GLib.Variant.new_tuple(_vardict(channel, CHANNEL_TYPES))

    @_method(root_only=True)
    def CloseChannel(self, channel_id: int, dbus_context: Any = None) -> None:
        self._manager.close_channel(channel_id)
        log.info("channel %d closed over D-Bus", channel_id,
                 extra={"XSOCK_CHANNEL": channel_id})

    @_method(prebuilt=True)
    def GetStatistics(self, dbus_context: Any = None) -> GLib.Variant:
        return GLib.Variant.new_tuple(_vardict(self._manager.statistics(), STATISTICS_TYPES))

    @property
    def Domid(self) -> int:
        return self._manager.domid

    @property
    def Backend(self) -> str:
        return self._backend_name

    @property
    def Version(self) -> str:
        return __version__

    @property
    def ChannelCount(self) -> int:
        return len(self._manager.channels)


class DBusFace:
    """Publishes an XsockdObject for ``manager`` and keeps its signals in step.

    Lifecycle: created -> started (``start``: the name is owned) -> closed (``close``).
    """

    def __init__(self, manager: Manager, loop: Loop, backend_name: str) -> None:
        self._manager = manager
        self._loop = loop
        self.object = XsockdObject(manager, backend_name)
        self._con: Any = None
        self._registration: Any = None
        self._owned = False
        self._count_sent = 0
        # One PropertiesChanged per loop turn at most, however many channels came and went;
        # a Wakeup coalesces the arms of a turn into one call and allocates nothing (loop.Wakeup).
        self._count_wakeup = loop.wakeup(self._send_count)
        self.where = ""

    def __repr__(self) -> str:
        return f"<DBusFace {self.where or 'not started'}>"

    def start(self, address: str | None = None) -> None:
        """Connects to the bus at ``address`` (None: the system bus) and owns our name.

        Raises XsockError saying what failed: the bus is unreachable, or the name is
        refused (taken, or the policy file is not installed).
        """
        self.where = _bus_name(address)
        try:
            self._con = _bus_connect(address)
        except GLib.Error as e:
            raise XsockError(f"cannot connect to {self.where}: {e.message}") from None
        # A bus that goes away must not take the daemon with it (GDBus's default).
        self._con.set_exit_on_close(False)
        self._con.connect("closed", self._on_closed)
        try:
            interfaces = Gio.DBusNodeInfo.new_for_xml(INTERFACE_XML).interfaces
            self._registration = ObjectRegistration(
                self._con.pydbus, DBUS_PATH, interfaces, _Wrapper(self.object, interfaces),
                own_wrapper=True)
            self._own_name()
        except XsockError:
            self.close()
            raise
        self._manager.add_observer(self)
        self._count_sent = self.object.ChannelCount
        log.info("D-Bus: %s on %s", DBUS_NAME, self.where)

    def _own_name(self) -> None:
        flags = 4  # DBUS_NAME_FLAG_DO_NOT_QUEUE; no replacement allowed
        try:
            reply = self._con.call_sync(
                "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                "RequestName", GLib.Variant("(su)", (DBUS_NAME, flags)), GLib.VariantType("(u)"),
                Gio.DBusCallFlags.NONE, _CALL_TIMEOUT_MS, None)
        except GLib.Error as e:
            raise XsockError(f"{self.where} refused us the name {DBUS_NAME} "
                             f"({Gio.DBusError.get_remote_error(e) or e.message}); install "
                             f"conf/{DBUS_NAME}.conf in /etc/dbus-1/system.d/ and run as root"
                             ) from None
        if reply.unpack()[0] not in (1, 4):  # primary owner, or already were
            raise XsockError(f"{DBUS_NAME} is already owned on {self.where}: another xsockd "
                             f"runs there")
        self._owned = True

    def _on_closed(self, _con: Any, remote_peer_vanished: bool, _error: Any) -> None:
        if remote_peer_vanished:
            log.warning("D-Bus: %s went away; the D-Bus interface is off until restart",
                        self.where)

    # ---- ChannelObserver ---------------------------------------------------------------

    def channel_opened(self, channel: Channel) -> None:
        self.object.ChannelOpened(channel.id, channel.peer, channel.service)
        self._count_changed()

    def channel_closed(self, channel: Channel, reason: str) -> None:
        self.object.ChannelClosed(channel.id, channel.peer, reason)
        self._count_changed()

    def _count_changed(self) -> None:
        self._count_wakeup.arm()

    def _send_count(self) -> None:
        count = self.object.ChannelCount
        if count != self._count_sent and self._registration is not None:
            self._count_sent = count
            self.object.PropertiesChanged(DBUS_INTERFACE, {"ChannelCount": count}, [])

    def close(self) -> None:
        """Gives up the name and the object, and flushes pending signals.  Idempotent."""
        self._count_wakeup.close()
        if self._con is None:
            return
        con, self._con = self._con, None
        if self._registration is not None:
            self._registration.unregister()
            self._registration = None
        if not con.is_closed():
            try:
                if self._owned:
                    con.call_sync("org.freedesktop.DBus", "/org/freedesktop/DBus",
                                  "org.freedesktop.DBus", "ReleaseName",
                                  GLib.Variant("(s)", (DBUS_NAME,)), None,
                                  Gio.DBusCallFlags.NONE, 2000, None)
                con.flush_sync(None)
            except GLib.Error as e:
                log.debug("D-Bus: closing: %s", e.message)
        self._owned = False


# ---- the client side: what xsockctl uses -------------------------------------------------

_BUS_ERRORS = {
    "org.freedesktop.DBus.Error.ServiceUnknown": DaemonNotRunning,
    "org.freedesktop.DBus.Error.NameHasNoOwner": DaemonNotRunning,
    "org.freedesktop.DBus.Error.AccessDenied": AccessDenied,
}


class Client:
    """A connection to the xsockd on the bus at ``address`` (None: the system bus).

    Every call raises DaemonNotRunning when no xsockd owns the name (or the bus cannot be
    reached), AccessDenied, NoSuchChannel, or XsockError with the daemon's sentence.
    """

    def __init__(self, address: str | None = None) -> None:
        self.where = _bus_name(address)
        try:
            self._con = _bus_connect(address)
        except GLib.Error as e:
            raise DaemonNotRunning(f"cannot reach {self.where} ({e.message}); is dbus "
                                   f"running?") from None
        self._own = bool(address)

    def close(self) -> None:
        if self._own and not self._con.is_closed():
            self._con.close_sync(None)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _call(self, interface: str, method: str, args: GLib.Variant | None,
              reply: str) -> Any:
        try:
            out = self._con.call_sync(DBUS_NAME, DBUS_PATH, interface, method, args,
                                      GLib.VariantType(reply), Gio.DBusCallFlags.NO_AUTO_START,
                                      _CALL_TIMEOUT_MS, None)
        except GLib.Error as e:
            raise self._translate(e) from None
        return out.unpack()

    def _translate(self, e: GLib.Error) -> XsockError:
        name = Gio.DBusError.get_remote_error(e)
        message = e.message
        if name is not None:
            message = message.removeprefix(f"GDBus.Error:{name}: ")
        if name in _BUS_ERRORS and _BUS_ERRORS[name] is DaemonNotRunning:
            return DaemonNotRunning(f"xsockd is not running: nobody owns {DBUS_NAME} on "
                                    f"{self.where}")
        if name == "org.freedesktop.DBus.Error.AccessDenied":
            return AccessDenied(f"access denied by the bus policy: members of group "
                                f"{DBUS_READ_GROUP} may read, only root may close")
        for cls, dbus_name in DBUS_ERRORS.items():
            if name == dbus_name:  # the daemon's sentence, as it said it
                return NoSuchChannel(None, message) if cls is NoSuchChannel else cls(message)
        return XsockError(message)

    def list_channels(self) -> list[dict[str, Any]]:
        return self._call(DBUS_INTERFACE, "ListChannels", None, "(aa{sv})")[0]

    def list_vchans(self) -> list[dict[str, Any]]:
        return self._call(DBUS_INTERFACE, "ListVchans", None, "(aa{sv})")[0]

    def get_channel(self, channel_id: int) -> dict[str, Any]:
        return self._call(DBUS_INTERFACE, "GetChannel", GLib.Variant("(u)", (channel_id,)),
                          "(a{sv})")[0]

    def close_channel(self, channel_id: int) -> None:
        self._call(DBUS_INTERFACE, "CloseChannel", GLib.Variant("(u)", (channel_id,)), "()")

    def statistics(self) -> dict[str, Any]:
        return self._call(DBUS_INTERFACE, "GetStatistics", None, "(a{sv})")[0]

    def properties(self) -> dict[str, Any]:
        return self._call("org.freedesktop.DBus.Properties", "GetAll",
                          GLib.Variant("(s)", (DBUS_INTERFACE,)), "(a{sv})")[0]

