"""OpenSMTPD 6's table protocol: imsg frames over the program's socket (smtpd-api.h,
opensmtpd-extras' api/table_api.c).  Debian 12's opensmtpd-extras 6.7 table programs
(table-passwd, table-sqlite, table-ldap, ...) speak it, not 7.x's line protocol.

A frame is imsg's 16-byte header in host byte order (type, total length, flags,
peerid, pid) and its data.  The requests and what the program answers (always
PROC_TABLE_OK, with an int result r: 1 found, 0 not found, -1 error):

    OPEN    u32 version (2), char name[LINE_MAX]     -> OK (no data)
    UPDATE  -                                        -> OK, int r
    CHECK   int service, size_t 0 (no params), key\\0 -> OK, int r
    LOOKUP  int service, size_t 0, key\\0             -> OK, int r [, value\\0 when r == 1]
    FETCH   int service, size_t 0                    -> OK, int r [, value\\0 when r == 1]
    CLOSE   -                                        -> (the program exits)

Pure encoding and decoding; smtpd/table/proc.py moves the bytes.
"""
from __future__ import annotations

import os
import struct

API_VERSION = 2
LINE_MAX = 2048                      # Linux's, the size of table_open_params.name
HEADER = struct.Struct("=IHHII")
MAX_IMSGSIZE = 16384
PROC_TABLE_OK, PROC_TABLE_FAIL, PROC_TABLE_OPEN, PROC_TABLE_CLOSE = 0, 1, 2, 3
PROC_TABLE_UPDATE, PROC_TABLE_CHECK, PROC_TABLE_LOOKUP, PROC_TABLE_FETCH = 4, 5, 6, 7
SERVICE_BITS = {
    "alias": 0x001, "domain": 0x002, "credentials": 0x004, "netaddr": 0x008,
    "userinfo": 0x010, "source": 0x020, "mailaddr": 0x040, "addrname": 0x080,
    "mailaddrmap": 0x100, "relayhost": 0x200, "string": 0x400, "regex": 0x800,
}
REQUESTS = {"lookup": PROC_TABLE_LOOKUP, "check": PROC_TABLE_CHECK, "fetch": PROC_TABLE_FETCH,
            "update": PROC_TABLE_UPDATE}


class ImsgError(ValueError):
    pass


def frame(kind: int, data: bytes = b"") -> bytes:
    return HEADER.pack(kind, HEADER.size + len(data), 0, 0, os.getpid()) + data


def open_frame(name: str) -> bytes:
    encoded = name.encode()[:LINE_MAX - 1]
    return frame(PROC_TABLE_OPEN, struct.pack("=I", API_VERSION) + encoded.ljust(LINE_MAX, b"\0"))


def request_frame(what: str, service: str | None, key: str | None) -> bytes:
    if what == "update":
        return frame(PROC_TABLE_UPDATE)
    data = struct.pack("=i", SERVICE_BITS[service]) + struct.pack("@N", 0)   # size_t 0: no params
    if key is not None:
        data += key.encode() + b"\0"
    return frame(REQUESTS[what], data)


def body_length(header: bytes) -> int:
    """The length of the data after this header; ImsgError when it cannot be ours."""
    kind, length, _flags, _peer, _pid = HEADER.unpack(header)
    if length < HEADER.size or length > MAX_IMSGSIZE:
        raise ImsgError(f"bad imsg length {length}")
    if kind != PROC_TABLE_OK:
        raise ImsgError(f"unexpected imsg type {kind}")
    return length - HEADER.size


def reply_text(what: str, data: bytes) -> str:
    """A reply in the line protocol's words (``found|VALUE``, ``found``, ``not-found``,
    ``error``, ``ok``), so one parser serves both protocols."""
    if len(data) < 4:
        raise ImsgError("short reply")
    (result,) = struct.unpack("=i", data[:4])
    if what == "update":
        return "ok" if result == 1 else "error"
    if result == 0:
        return "not-found"
    if result != 1:
        return "error"
    if what == "check":
        return "found"
    value = data[4:].split(b"\0", 1)[0]
    return "found|" + value.decode("utf-8", "replace")
