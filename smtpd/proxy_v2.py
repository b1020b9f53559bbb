"""The PROXY protocol version 2 header a TCP load balancer sends before the client's
bytes, on a ``listen on ... proxy-v2`` listener (OpenSMTPD's proxy.c); pure.

``parse(buf)`` looks at the bytes received so far: None while the header is
incomplete, a ``ProxyHeader`` once it is whole (``consumed`` bytes of ``buf`` are
the header; what follows is the SMTP session's), ``ProxyError`` as soon as the
bytes cannot be a valid header.  PROXY with TCP over IPv4 or IPv6 gives the
client's and the balancer-side addresses; LOCAL (the balancer's own health
checks) keeps the connection's addresses; TLVs are skipped, as OpenSMTPD does.
"""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
HEADER = struct.Struct("!12sBBH")           # signature, version/command, family, length
COMMAND_LOCAL, COMMAND_PROXY = 0x0, 0x1
# family byte: address family (high nibble) and transport (low nibble), as proxy.c accepts them
FAMILY_UNSPEC, FAMILY_TCP4, FAMILY_TCP6, FAMILY_UNIX_STREAM = 0x00, 0x11, 0x21, 0x31
ADDRESS_LENGTH = {FAMILY_UNSPEC: 0, FAMILY_TCP4: 12, FAMILY_TCP6: 36, FAMILY_UNIX_STREAM: 216}
FAMILY_NAME = {FAMILY_UNSPEC: "unspec", FAMILY_TCP4: "inet", FAMILY_TCP6: "inet6",
               FAMILY_UNIX_STREAM: "unix"}


class ProxyError(ValueError):
    """Not a PROXY v2 header we can use; the text is proxy.c's reason."""


@dataclass(frozen=True)
class ProxyHeader:
    consumed: int                           # header bytes, to drop from the stream
    local: bool                             # LOCAL command: keep the connection's own addresses
    src: tuple[str, int] | None             # the client as the balancer saw it
    dst: tuple[str, int] | None             # the address the client connected to
    family: str = ""                        # "inet", "inet6", "unix" or "unspec"


def parse(buf: bytes) -> ProxyHeader | None:
    prefix = bytes(buf[:len(SIGNATURE)])
    if not SIGNATURE.startswith(prefix):
        raise ProxyError("invalid signature")
    if len(buf) < HEADER.size:
        return None
    _sig, ver_cmd, family, length = HEADER.unpack_from(buf)
    if ver_cmd >> 4 != 2:
        raise ProxyError("invalid version")
    if family not in ADDRESS_LENGTH:
        raise ProxyError("unsupported address family")
    if length < ADDRESS_LENGTH[family]:
        raise ProxyError("address info too short")
    command = ver_cmd & 0xF
    if command not in (COMMAND_LOCAL, COMMAND_PROXY):
        raise ProxyError("unknown command")
    if command == COMMAND_PROXY and family == FAMILY_UNSPEC:
        raise ProxyError("UNSPEC family not supported for PROXYing")
    total = HEADER.size + length
    if len(buf) < total:
        return None
    if command == COMMAND_LOCAL:
        return ProxyHeader(total, True, None, None, FAMILY_NAME[family])
    body = bytes(buf[HEADER.size:total])
    if family == FAMILY_TCP4:
        src, dst, sport, dport = struct.unpack_from("!4s4sHH", body)
    elif family == FAMILY_TCP6:
        src, dst, sport, dport = struct.unpack_from("!16s16sHH", body)
    else:
        src_path = body[:108].split(b"\0", 1)[0].decode("utf-8", "replace")
        dst_path = body[108:216].split(b"\0", 1)[0].decode("utf-8", "replace")
        return ProxyHeader(total, False, (src_path, 0), (dst_path, 0), "unix")
    return ProxyHeader(total, False, (str(ipaddress.ip_address(src)), sport),
                       (str(ipaddress.ip_address(dst)), dport), FAMILY_NAME[family])


def build(src: tuple[str, int] | None, dst: tuple[str, int] | None, *, local: bool = False,
          tlvs: bytes = b"") -> bytes:
    """A header as a balancer sends it (tests, and tools that speak to a proxy-v2
    listener): PROXY over TCP for the addresses' family, or LOCAL."""
    if local or src is None or dst is None:
        return HEADER.pack(SIGNATURE, 0x20 | COMMAND_LOCAL, FAMILY_UNSPEC, len(tlvs)) + tlvs
    s, d = ipaddress.ip_address(src[0]), ipaddress.ip_address(dst[0])
    if s.version != d.version:
        raise ValueError("source and destination of different families")
    family = FAMILY_TCP4 if s.version == 4 else FAMILY_TCP6
    body = s.packed + d.packed + struct.pack("!HH", src[1], dst[1]) + tlvs
    return HEADER.pack(SIGNATURE, 0x20 | COMMAND_PROXY, family, len(body)) + body
