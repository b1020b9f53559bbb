"""Generated SMTP sessions and a reference driver for the protocol core's tests and
its fuzz run (tests/fuzz/fuzz_smtp_proto.py): no sockets, no other process."""
from __future__ import annotations

import base64
import random

from smtpd import smtp_proto
from smtpd.smtp_proto import (
    NEED_DATA, PAUSED, AuthCredentials, ConnectionClosed, DataChunk, DataEnd, MailFrom,
    ProxyReceived, RcptTo, ServerConnection, Settings,
)


class ProxyHeader:
    """What smtpd.proxy_v2.parse returns (its interface, I8-INTERFACES.md)."""
    def __init__(self, consumed, local, src, dst):
        self.consumed, self.local, self.src, self.dst = consumed, local, src, dst


PROXY_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def proxy_parse(buf: bytes):
    """A PROXY v2 parser for IPv4 TCP headers only, enough to drive the core."""
    if len(buf) < 16:
        if not PROXY_SIG.startswith(buf[:12]):
            raise ValueError("not a PROXY v2 header")
        return None
    if buf[:12] != PROXY_SIG or buf[12] not in (0x20, 0x21):
        raise ValueError("not a PROXY v2 header")
    length = int.from_bytes(buf[14:16], "big")
    if len(buf) < 16 + length:
        return None
    if buf[12] == 0x20:
        return ProxyHeader(16 + length, True, None, None)
    body = buf[16:16 + length]
    src = ".".join(str(b) for b in body[0:4]), int.from_bytes(body[8:10], "big")
    dst = ".".join(str(b) for b in body[4:8]), int.from_bytes(body[10:12], "big")
    return ProxyHeader(16 + length, False, src, dst)


def proxy_header(src: str = "192.0.2.7", port: int = 4242) -> bytes:
    body = bytes(int(x) for x in src.split(".")) + bytes([127, 0, 0, 1]) + port.to_bytes(2, "big") + (25).to_bytes(2, "big")
    return PROXY_SIG + bytes([0x21, 0x11]) + len(body).to_bytes(2, "big") + body


class Driver:
    """Answers the core's events as pony would, deterministically: a recipient whose
    local part starts with "no" is refused, a password "bad" fails, a sender
    "fault@..." makes an internal error; everything else succeeds."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings(hostname="mx.test", peer="192.0.2.1", max_message_size=4096,
                                             max_rcpt=5, max_mails=3, starttls=True, auth="optional")
        self.replies: list[tuple[str, str]] = []
        self.conn = ServerConnection(self.settings, on_reply=lambda c, cmd, r: self.replies.append((cmd, r)))
        self.out = bytearray()
        self.events: list[object] = []
        self.body = bytearray()          # committed messages, one after the other
        self.message = bytearray()       # the message being received
        self.closed = ""
        self.msgid = 0

    def feed(self, data: bytes) -> None:
        self.conn.receive_data(data)
        self.pump()

    def pump(self) -> None:
        conn = self.conn
        for _ in range(100000):
            event = conn.next_event()
            if event is NEED_DATA:
                break
            if event is PAUSED:
                if conn.state is smtp_proto.State.CONNECTED:
                    conn.greet()
                    continue
                if conn.state is smtp_proto.State.TLS:
                    conn.tls_established()
                    continue
                if conn.closing:
                    self.closed = "quit"      # the driver closes once the replies are out
                break
            if isinstance(event, ConnectionClosed):
                self.closed = event.reason
                break
            if isinstance(event, DataChunk):
                self.message += event.data
                continue
            if isinstance(event, DataEnd):
                if not event.error:             # what reached the queue and was committed
                    self.body += self.message
                self.message = bytearray()
            self.events.append(_summary(event))
            self.answer(event)
        else:
            raise AssertionError("the core never stops")
        self.out += conn.data_to_send()

    def answer(self, event) -> None:
        conn = self.conn
        if isinstance(event, ProxyReceived):
            return
        if isinstance(event, MailFrom) and event.sender.startswith("fault@"):
            conn.internal_error()
        elif isinstance(event, MailFrom) and event.sender.startswith("tempfail@"):
            conn.refuse(smtp_proto.R_TEMPFAIL)
        elif isinstance(event, RcptTo) and event.rcpt.startswith("no"):
            conn.refuse(f"550 5.7.1 Invalid recipient: <{event.rcpt}>")
        elif isinstance(event, AuthCredentials) and event.password == "bad":
            conn.refuse(smtp_proto.R_AUTH_FAILED)
        elif isinstance(event, DataEnd):
            if event.error:
                conn.refuse(smtp_proto.R_TOO_BIG if event.error == "size" else smtp_proto.R_LOOP)
            else:
                self.msgid += 1
                conn.accept(msgid=self.msgid)
        else:
            conn.accept()


def _summary(event) -> tuple:
    if isinstance(event, DataEnd):
        return ("end", event.size, event.error)
    if isinstance(event, ProxyReceived):
        return ("proxy", event.header.src)
    return (type(event).__name__, event.phase.value, event.line)


def run(data: bytes, cuts: list[int], settings: Settings | None = None) -> Driver:
    """Feed ``data`` cut at ``cuts`` (offsets), then EOF."""
    driver = Driver(settings)
    driver.pump()
    last = 0
    for cut in sorted(set(c for c in cuts if 0 < c < len(data))):
        driver.feed(data[last:cut])
        last = cut
    driver.feed(data[last:])
    if not driver.closed:
        driver.feed(b"")
    return driver


def _b64(text: bytes) -> bytes:
    return base64.b64encode(text)


FRAGMENTS = [
    b"EHLO client.test\r\n", b"HELO client.test\r\n", b"EHLO\r\n", b"HELO bad name\r\n",
    b"MAIL FROM:<a@remote.test>\r\n", b"MAIL FROM:<>\r\n", b"MAIL FROM:bogus\r\n",
    b"MAIL FROM:<a@remote.test> SIZE=100 BODY=8BITMIME\r\n", b"MAIL FROM:<a@remote.test> SMTPUTF8\r\n",
    b"MAIL FROM:<a@remote.test> RET=HDRS ENVID=x\r\n", b"MAIL FROM:<fault@remote.test>\r\n",
    b"MAIL FROM:<tempfail@remote.test>\r\n",
    b"RCPT TO:<alice@example.test>\r\n", b"RCPT TO:<ALICE@example.test>\r\n", b"RCPT TO:<nobody@x.test>\r\n",
    b"RCPT TO:<postmaster>\r\n", b"RCPT TO:<b@x.test> NOTIFY=NEVER\r\n", b"RCPT TO:<>\r\n",
    b"DATA\r\n", b"DATA x\r\n", b"RSET\r\n", b"NOOP\r\n", b"NOOP x\r\n", b"HELP\r\n", b"VRFY root\r\n",
    b"EXPN list\r\n", b"WIZ\r\n", b"STARTTLS\r\n", b"STARTTLS x\r\n", b"QUIT\r\n", b"FOO\r\n", b"\r\n",
    b"AUTH PLAIN\r\n", b"AUTH PLAIN " + _b64(b"\0u\0p") + b"\r\n", b"AUTH LOGIN\r\n",
    b"AUTH CRAM-MD5\r\n", _b64(b"\0u\0bad") + b"\r\n", _b64(b"user") + b"\r\n", b"*\r\n", b"!!!\r\n",
    b"Subject: x\r\n\r\nbody\r\n", b"..dot\r\n", b".\r\n", b"\r\n.\r\n", b"\n.\n", b"\r.\r", b".\n",
    b"Received: x\r\n", b"x" * 300 + b"\r\n", b"\x00\x1b[31m\r\n", b"\xff\xfe\r\n", b"mail from:<c@d.test>\r\n",
    b"rcpt to:<alice@example.test>\r\n", b"MAIL FROM: <sp@ace.test>\r\n", b"RCPT TO:<a\x00b@x.test>\r\n",
    b"\r", b"\n", b".", b"\r\n", b"x" * 5000, b"MAIL FROM:<x@y.test>\n", b"QUIT",
]


def random_session(rng: random.Random) -> tuple[bytes, list[int]]:
    """A session's bytes from FRAGMENTS (mostly in a sensible order) and random cut points."""
    parts = [b"EHLO client.test\r\n"] if rng.random() < 0.8 else []
    for _ in range(rng.randint(0, 12)):
        if rng.random() < 0.3:
            parts += [b"MAIL FROM:<a@remote.test>\r\n", b"RCPT TO:<alice@example.test>\r\n", b"DATA\r\n",
                      rng.choice(FRAGMENTS), rng.choice(FRAGMENTS), b"\r\n.\r\n"]
        elif rng.random() < 0.05:
            parts.append(bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 40))))
        else:
            parts.append(rng.choice(FRAGMENTS))
    data = b"".join(parts)
    cuts = [rng.randint(1, max(1, len(data) - 1)) for _ in range(rng.randint(0, 12))]
    if rng.random() < 0.02 and len(data) < 600:
        cuts = list(range(1, len(data)))        # one byte at a time
    return data, cuts


def check_session(data: bytes, cuts: list[int], *, compare: bool = True) -> Driver:
    """Run a session cut at ``cuts``: it must end, every reply well formed; with
    ``compare``, also whole, and both must agree (same replies, events, messages)."""
    cut = run(data, cuts)
    assert smtp_proto.reply_lines_valid(bytes(cut.out)), bytes(cut.out)[-2000:]
    assert cut.closed, "a session fed EOF must end"
    if not compare:
        return cut
    whole = run(data, [])
    if b"220 2.0.0 Ready to start TLS" in whole.out:
        # What follows STARTTLS in the same read is dropped (CVE-2011-0411), what comes
        # in a later read is the TLS session's: the cuts rightly change the outcome.
        return cut
    assert cut.out == whole.out, (data[:3000], cuts)
    assert cut.events == whole.events and cut.body == whole.body, (data[:3000], cuts)
    return cut
