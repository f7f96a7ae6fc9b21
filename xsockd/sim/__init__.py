"""The simulated Xen host: XenStore server, grant table and event channels for several domains."""

# Every socket of the simulated host: only its own user (the one the daemons and Xen's tools
# run as, as /var/run/xenstored/socket on Xen is root's alone) may connect; the umask plays no
# part (listeners.listen_unix).
SOCKET_MODE = 0o600
