"""PROXY protocol v2 headers (smtpd/proxy_v2.py): what a balancer sends, byte by byte."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtpd.proxy_v2 import SIGNATURE, ProxyError, ProxyHeader, build, parse

SMTP = b"EHLO client.example\r\n"


def test_tcp4_header_gives_client_and_destination():
    header = build(("192.0.2.7", 40000), ("198.51.100.1", 25))
    assert len(header) == 16 + 12
    assert parse(header + SMTP) == ProxyHeader(28, False, ("192.0.2.7", 40000),
                                               ("198.51.100.1", 25), "inet")


def test_tcp6_header_gives_client_and_destination():
    got = parse(build(("2001:db8::7", 1234), ("2001:db8::1", 587)))
    assert got == ProxyHeader(16 + 36, False, ("2001:db8::7", 1234), ("2001:db8::1", 587), "inet6")


def test_local_command_keeps_the_connection_addresses():
    got = parse(build(None, None, local=True) + SMTP)
    assert got == ProxyHeader(16, True, None, None, "unspec")


def test_tlvs_are_skipped_and_counted_in_consumed():
    tlvs = b"\x01\x00\x02h2" + b"\x04\x00\x03abc"     # ALPN, NOOP
    header = build(("192.0.2.7", 1), ("192.0.2.8", 2), tlvs=tlvs)
    got = parse(header + SMTP)
    assert got.consumed == len(header) and got.src == ("192.0.2.7", 1)
    assert (header + SMTP)[got.consumed:] == SMTP


def test_unix_stream_paths():
    body = b"/run/src.sock".ljust(108, b"\0") + b"/run/dst.sock".ljust(108, b"\0")
    header = SIGNATURE + bytes([0x21, 0x31]) + struct.pack("!H", len(body)) + body
    assert parse(header) == ProxyHeader(16 + 216, False, ("/run/src.sock", 0), ("/run/dst.sock", 0), "unix")


@pytest.mark.parametrize("data, reason", [
    (b"EHLO x\r\n", "invalid signature"),
    (SIGNATURE[:5] + b"X", "invalid signature"),
    (SIGNATURE + bytes([0x11, 0x11, 0, 12]), "invalid version"),          # version 1
    (SIGNATURE + bytes([0x21, 0x12, 0, 12]), "unsupported address family"),   # UDP
    (SIGNATURE + bytes([0x21, 0x41, 0, 12]), "unsupported address family"),
    (SIGNATURE + bytes([0x21, 0x11, 0, 11]), "address info too short"),
    (SIGNATURE + bytes([0x21, 0x21, 0, 12]), "address info too short"),
    (SIGNATURE + bytes([0x22, 0x11, 0, 12]), "unknown command"),
    (SIGNATURE + bytes([0x21, 0x00, 0, 0]), "UNSPEC family not supported for PROXYing"),
])
def test_bad_headers_are_refused_with_the_reason(data, reason):
    with pytest.raises(ProxyError, match=reason):
        parse(data + b"\0" * 40)


def test_plain_smtp_on_a_proxy_listener_is_refused_at_the_first_byte():
    with pytest.raises(ProxyError):
        parse(b"Q")


def test_incomplete_header_asks_for_more():
    header = build(("192.0.2.7", 40000), ("198.51.100.1", 25))
    for cut in range(len(header)):
        assert parse(header[:cut]) is None


HEADERS = st.one_of(
    st.builds(lambda a, b, p, q: build((a, p), (b, q)), st.ip_addresses(v=4).map(str),
              st.ip_addresses(v=4).map(str), st.integers(0, 65535), st.integers(0, 65535)),
    st.builds(lambda a, b, p, q, t: build((a, p), (b, q), tlvs=t), st.ip_addresses(v=6).map(str),
              st.ip_addresses(v=6).map(str), st.integers(0, 65535), st.integers(0, 65535),
              st.binary(max_size=64)),
    st.builds(lambda t: build(None, None, local=True, tlvs=t), st.binary(max_size=64)),
)


@settings(max_examples=300, deadline=None)
@given(HEADERS, st.binary(max_size=64), st.data())
def test_any_split_of_a_valid_header_parses_once_whole(header, rest, data):
    """Fed as a reader accumulates it, in arbitrary pieces: None until the header is
    whole, then the same answer whatever the split, never an error."""
    stream = header + rest
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    whole = parse(stream)
    assert whole is not None and whole.consumed == len(header)
    for cut in cuts:
        got = parse(stream[:cut])
        assert got is None if cut < len(header) else got == whole


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_never_crashes(data):
    try:
        got = parse(data)
    except ProxyError:
        return
    assert got is None or 16 <= got.consumed <= len(data)


@settings(max_examples=1000, deadline=None)
@given(st.binary(min_size=4, max_size=200))
def test_garbage_after_a_valid_prefix_never_crashes(tail):
    data = SIGNATURE + tail
    try:
        got = parse(data)
    except ProxyError:
        return
    assert got is None or 16 <= got.consumed <= len(data)
