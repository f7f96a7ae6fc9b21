"""The xenstored wire protocol (Xen's ``io/xs_wire.h``), shared by our client and sim server.

A message is a 16-byte header ``struct xsd_sockmsg { uint32 type, req_id, tx_id, len; }`` in
host byte order, then ``len`` payload bytes (at most 4096).  Strings in payloads are
NUL-terminated; a WRITE's value is the raw rest of the payload.
"""

from __future__ import annotations

import enum
import errno
import struct
from dataclasses import dataclass

__all__ = [
    "ERRORS",
    "HEADER",
    "PAYLOAD_MAX",
    "Message",
    "Op",
    "Parser",
    "encode",
    "error_name",
    "split_strings",
]

HEADER = struct.Struct("=IIII")
PAYLOAD_MAX = 4096


class Op(enum.IntEnum):
    CONTROL = 0
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    RESET_WATCHES = 21
    DIRECTORY_PART = 22


# The error names xenstored sends (xs_wire.h's xsd_errors), with their errno values.
ERRORS: dict[str, int] = {name: getattr(errno, name) for name in (
    "EINVAL", "EACCES", "EEXIST", "EISDIR", "ENOENT", "ENOMEM", "ENOSPC", "EIO", "ENOTEMPTY",
    "ENOSYS", "EROFS", "EBUSY", "EAGAIN", "EISCONN", "E2BIG", "EPERM")}
_NAMES = {v: k for k, v in ERRORS.items()}


def error_name(code: int) -> str:
    """Returns the wire name for errno ``code`` (EINVAL for anything xenstored cannot say)."""
    return _NAMES.get(code, "EINVAL")


@dataclass(frozen=True)
class Message:
    op: int
    req_id: int
    tx_id: int
    payload: bytes


def encode(op: int, req_id: int, tx_id: int, payload: bytes) -> bytes:
    """Returns the wire bytes of one message; raises ValueError if the payload is too big."""
    if len(payload) > PAYLOAD_MAX:
        raise ValueError(f"XenStore payload of {len(payload)} bytes exceeds {PAYLOAD_MAX}")
    return HEADER.pack(op, req_id, tx_id, len(payload)) + payload


def split_strings(payload: bytes) -> list[bytes]:
    """Returns the NUL-terminated strings of a payload (a missing final NUL is tolerated)."""
    parts = payload.split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()
    return parts


class Parser:
    """Incremental decoder: ``feed`` bytes, get whole messages; rejects oversized lengths."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        """Returns the messages completed by ``data``; raises ValueError on a bad header."""
        self._buf += data
        out: list[Message] = []
        while len(self._buf) >= HEADER.size:
            op, req_id, tx_id, length = HEADER.unpack_from(self._buf)
            if length > PAYLOAD_MAX:
                raise ValueError(f"XenStore message claims {length} payload bytes")
            end = HEADER.size + length
            if len(self._buf) < end:
                break
            out.append(Message(op, req_id, tx_id, bytes(self._buf[HEADER.size:end])))
            del self._buf[:end]
        return out
