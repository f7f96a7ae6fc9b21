"""The simulated Xen host: XenStore server, grant table and event channels for several domains."""
