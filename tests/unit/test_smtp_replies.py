import pytest

from smtpd.relay_url import RelayUrlError, parse_relay_url
from smtpd.enqueue import count_received as _count_received
from smtpd.mailbox import valid_mailbox


@pytest.mark.parametrize("addr", ["a@b.test", "first.last+tag@example.org", '"quoted str"@x.test',
                                  "u@[127.0.0.1]", "x@sub-domain.example"])
def test_valid_mailboxes(addr):
    assert valid_mailbox(addr)


@pytest.mark.parametrize("addr", ["", "no-at", "a@", "@b", "a b@c.test", "a@b..c", "a;rm -rf /@x.test",
                                  "a@-bad.test", "`id`@x.test" + "x" * 300, "a\n@b.test", "a@b.test\r",
                                  "a@b.test."])
def test_invalid_mailboxes(addr):
    assert not valid_mailbox(addr)


def test_received_headers_are_counted_in_the_header_block_only():
    msg = b"Received: a\nreceived: b\nSubject: s\n\nReceived: body\n"
    assert _count_received(msg) == 2


def test_relay_urls():
    assert str(parse_relay_url("smtp://127.0.0.1:2526")) == "smtp://127.0.0.1:2526"
    u = parse_relay_url("smtp+tls://bob@mail.example.org:587")
    assert (u.scheme, u.label, u.host, u.port) == ("smtp+tls", "bob", "mail.example.org", 587)
    assert parse_relay_url("mx.example.org").port == 25
    assert parse_relay_url("smtps://[::1]").port == 465 and parse_relay_url("smtps://[::1]").host == "::1"
    for bad in ("lmtp://host", "ftp://x", "smtp://bob@x", "smtp://x:99999", "smtp://[::1"):
        with pytest.raises(RelayUrlError):
            parse_relay_url(bad)


def test_helo_names():
    from smtpd.smtp_proto import valid_helo
    for good in ("x", "mail.example.com", "mail.example.com.", "win_pc.lan", "[192.0.2.1]", "[IPv6:2001:db8::1]"):
        assert valid_helo(good), good
    for bad in ("", ".", "a..b", "-a.b", "a b", "a\tb", "x\r\nRCPT", "[1.2.3.4", "a" * 64, "a." * 130):
        assert not valid_helo(bad), bad
