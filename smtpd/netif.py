"""The machine's interface addresses over rtnetlink (getifaddrs(3) in OpenSMTPD's config.c).

``listen on all|<interface>`` and the ``<localnames>`` table need every address of
every interface.  Python has no getifaddrs; running ip(8) would make the package need
iproute and fail in a confined process (no binary in a chroot).  One RTM_GETADDR dump
on a NETLINK_ROUTE socket is what both getifaddrs and ``ip addr`` do: it needs no file
and no privilege (the unit allows AF_NETLINK for it).
"""
from __future__ import annotations

import os
import socket
import struct

RTM_NEWADDR = 20
RTM_GETADDR = 22
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
IFA_ADDRESS = 1
IFA_LOCAL = 2

_NLMSGHDR = struct.Struct("=IHHII")         # len, type, flags, seq, pid
_IFADDRMSG = struct.Struct("=BBBBI")        # family, prefixlen, flags, scope, index
_RTATTR = struct.Struct("=HH")              # len, type
MAX_REPLIES = 10_000                        # datagrams of one dump (each holds many addresses)


def _align(n: int) -> int:
    return (n + 3) & ~3


def parse_addresses(data: bytes) -> tuple[list[tuple[int, int, str]], bool]:
    """(index, family, address) of each RTM_NEWADDR in one datagram, and whether the
    dump ended in it.  The local address is IFA_LOCAL when present (IFA_ADDRESS is the
    peer's on a point-to-point link), else IFA_ADDRESS, as ip(8) shows it.
    Raises OSError for a netlink error message."""
    out, offset, done = [], 0, False
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            break
        body = data[offset + _NLMSGHDR.size:offset + length]
        if kind == NLMSG_DONE:
            done = True
        elif kind == NLMSG_ERROR:
            errno = -struct.unpack_from("=i", body)[0]
            if errno:
                raise OSError(errno, os.strerror(errno))
        elif kind == RTM_NEWADDR and len(body) >= _IFADDRMSG.size:
            family, _plen, _aflags, _scope, index = _IFADDRMSG.unpack_from(body)
            attrs: dict[int, bytes] = {}
            pos = _IFADDRMSG.size
            while pos + _RTATTR.size <= len(body):
                alen, atype = _RTATTR.unpack_from(body, pos)
                if alen < _RTATTR.size:
                    break
                attrs[atype] = body[pos + _RTATTR.size:pos + alen]
                pos += _align(alen)
            raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
            if raw and family in (socket.AF_INET, socket.AF_INET6):
                out.append((index, family, socket.inet_ntop(family, raw)))
        offset += _align(length)
    return out, done


def interface_addresses() -> dict[str, list[tuple[int, str]]]:
    """Interface name -> [(family, address)], in the kernel's order.  Raises OSError
    when netlink cannot be used."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       socket.NETLINK_ROUTE) as sock:
        sock.settimeout(5.0)
        sock.bind((0, 0))
        request = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(request), RTM_GETADDR,
                                 NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + request)
        found: list[tuple[int, int, str]] = []
        for _ in range(MAX_REPLIES):
            addresses, done = parse_addresses(sock.recv(65536))
            found += addresses
            if done:
                break
    names: dict[int, str] = {}
    out: dict[str, list[tuple[int, str]]] = {}
    for index, family, address in found:
        if index not in names:
            try:
                names[index] = socket.if_indextoname(index)
            except OSError:
                continue                    # the interface went away during the dump
        out.setdefault(names[index], []).append((family, address))
    return out
