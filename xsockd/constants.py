"""Names, paths and defaults shared by every xsockd module."""

from __future__ import annotations

DEFAULT_CONFIG = "/etc/xsockd/xsockd.conf"
DEFAULT_RUNDIR = "/run/xsock"
DEFAULT_SIM_DIR = "/run/xsock-sim"

# Ring geometry, bytes of data per direction (a power of two).  The limits of ring sizes,
# windows and service names are the C core's: ``xsockd.ring`` exports them.
DEFAULT_RING_SIZE = 256 * 1024
DEFAULT_STREAM_WINDOW = 256 * 1024

DEFAULT_MAX_STREAMS = 1024
# Linux gntalloc's default ``limit`` module parameter: pages granted by one domain at once.
DEFAULT_GRANT_LIMIT = 1024

# XenStore: everything of ours lives under <domain path>/data/xsock.
XS_ROOT = "data/xsock"
PROTOCOL_VERSION = 2

# D-Bus names, versioned from day one.
DBUS_NAME = "org.xsockd.Xsockd1"
DBUS_PATH = "/org/xsockd/Xsockd1"
DBUS_INTERFACE = "org.xsockd.Xsockd1"
# The interface's introspection XML, a file of the package (also its documentation).
DBUS_XML = "org.xsockd.Xsockd1.xml"
# The group whose members may read (list, get, statistics, properties) over the system bus.
DBUS_READ_GROUP = "xsock"
