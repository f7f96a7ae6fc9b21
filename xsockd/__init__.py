"""xsockd: byte streams between Xen domains through granted shared memory."""

__version__ = "0.1.0"
