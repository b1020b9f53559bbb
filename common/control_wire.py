"""Framing on the control socket: a 4-byte big-endian length, then one msgpack
message of the ClientMessage union (common.messages).  Both ends cap the frame
size; control drops a client that sends anything else."""
from __future__ import annotations

import asyncio
import socket
import struct

from common import messages

MAX_REQUEST = 64 * 1024
MAX_REPLY = 64 * 1024 * 1024
_LEN = struct.Struct(">I")

# control's refusal of a command to a client that is neither root nor the daemon's
# user; smtpctl prints it as OpenSMTPD's does: "smtpctl: need root privileges".
PERMISSION_DENIED = "need root privileges"


class WireError(Exception):
    pass


def frame(msg) -> bytes:
    data = messages.encode_client(msg)
    return _LEN.pack(len(data)) + data


async def read_frame(reader: asyncio.StreamReader, limit: int = MAX_REQUEST):
    head = await reader.readexactly(4)
    (size,) = _LEN.unpack(head)
    if size > limit:
        raise WireError(f"frame of {size} bytes is over the limit")
    try:
        return messages.decode_client(await reader.readexactly(size))
    except Exception as exc:
        raise WireError(f"bad frame: {exc}") from None


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise WireError("connection closed by smtpd")
        buf += chunk
    return bytes(buf)


def recv_frame(sock: socket.socket):
    (size,) = _LEN.unpack(_recv_exactly(sock, 4))
    if size > MAX_REPLY:
        raise WireError(f"reply of {size} bytes is over the limit")
    try:
        return messages.decode_client(_recv_exactly(sock, size))
    except Exception as exc:
        raise WireError(f"bad reply: {exc}") from None
