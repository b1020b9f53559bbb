"""smtpd/netif.py: interface addresses over rtnetlink, without ip(8)."""
from __future__ import annotations

import ipaddress
import socket
import struct
import subprocess
import sys

import pytest

from smtpd import netif
from tests.conftest import REPO


def nlmsg(kind: int, body: bytes) -> bytes:
    msg = struct.pack("=IHHII", 16 + len(body), kind, 2, 1, 0) + body
    return msg + b"\0" * (-len(msg) % 4)


def rtattr(kind: int, value: bytes) -> bytes:
    attr = struct.pack("=HH", 4 + len(value), kind) + value
    return attr + b"\0" * (-len(attr) % 4)


def newaddr(family: int, index: int, **attrs: str) -> bytes:
    body = struct.pack("=BBBBI", family, 24, 0, 0, index)
    for name, text in attrs.items():
        kind = {"address": netif.IFA_ADDRESS, "local": netif.IFA_LOCAL}[name]
        body += rtattr(kind, socket.inet_pton(family, text))
    body += rtattr(3, b"eth0\0")                             # IFA_LABEL: ignored
    return nlmsg(netif.RTM_NEWADDR, body)


def test_parse_takes_the_local_address_and_sees_the_end():
    data = (newaddr(socket.AF_INET, 2, address="192.0.2.9", local="192.0.2.1")   # point-to-point
            + newaddr(socket.AF_INET6, 3, address="2001:db8::1")
            + newaddr(socket.AF_PACKET, 4))                                     # no address: skipped
    assert netif.parse_addresses(data) == ([(2, socket.AF_INET, "192.0.2.1"),
                                            (3, socket.AF_INET6, "2001:db8::1")], False)
    assert netif.parse_addresses(data + nlmsg(netif.NLMSG_DONE, b"\0" * 4))[1] is True


def test_parse_raises_a_netlink_error_and_stops_at_a_truncated_message():
    with pytest.raises(OSError) as err:
        netif.parse_addresses(nlmsg(netif.NLMSG_ERROR, struct.pack("=i", -13) + b"\0" * 16))
    assert err.value.errno == 13
    whole = newaddr(socket.AF_INET, 2, local="192.0.2.1")
    assert netif.parse_addresses(whole + whole[:20]) == ([(2, socket.AF_INET, "192.0.2.1")], False)


def test_this_machines_addresses_without_any_program():
    # PATH empty: nothing can be run, as in a chroot.
    code = "from smtpd import netif; print(repr(netif.interface_addresses()))"
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={"PATH": ""},
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    found = eval(res.stdout)                                   # our own repr of str/int
    assert (socket.AF_INET, "127.0.0.1") in found["lo"]
    # Every IPv6 address the kernel lists in /proc, on its interface.
    with open("/proc/net/if_inet6") as f:
        for line in f:
            hexaddr, *_, name = line.split()
            address = str(ipaddress.IPv6Address(bytes.fromhex(hexaddr)))
            assert (socket.AF_INET6, address) in found[name], (name, address)
