"""What an SMTP client sees: EHLO, enhanced status codes, DATA framing."""
from __future__ import annotations

import socket
import time

from tests.conftest import free_port, wait_for
from tests.e2e.helpers import config, maildir_messages


class Client:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.buf = b""

    def reply(self) -> list[str]:
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                data = self.sock.recv(65536)
                assert data, "connection closed"
                self.buf += data
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line.decode())
            if line[3:4] == b" ":
                return lines

    def cmd(self, line: str) -> list[str]:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()


def test_ehlo_and_replies_carry_enhanced_status_codes(make_daemon, tmp_path):
    port = free_port()
    make_daemon(config(tmp_path / "d", port)).start()
    c = Client(port)
    assert c.reply()[0].startswith("220 ")
    ehlo = c.cmd("EHLO client.test")
    assert ehlo[0].startswith("250-") and "Hello client.test [127.0.0.1]" in ehlo[0]
    for ext in ("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"):
        assert f"250-{ext}" in ehlo, ehlo
    assert any(l.startswith("250-SIZE ") for l in ehlo)
    # RFC 2034: no enhanced code in the replies to HELO/EHLO (as OpenSMTPD)
    assert ehlo[-1] == "250 HELP", ehlo
    # as OpenSMTPD 6.8: one greeting per session (until STARTTLS)
    assert c.cmd("HELO client.test")[0] == "503 5.5.1 Invalid command: Already identified"
    other = Client(port)
    other.reply()
    assert other.cmd("EHLO")[0] == "501 5.5.1 Invalid command: EHLO requires domain name"
    assert other.cmd("HELO bad name")[0] == "501 5.5.4 Invalid command arguments: Invalid domain name"
    helo = other.cmd("HELO client.test")
    assert len(helo) == 1 and helo[0].startswith("250 ") and helo[0].split()[1] != "2.0.0", helo
    assert helo[0].endswith(" Hello client.test [127.0.0.1], pleased to meet you"), helo
    assert c.cmd("HELP")[-1] == "214 2.0.0 End of HELP info"
    assert c.cmd("RCPT TO:<alice@example.test>")[0].startswith("503 5.5.1 ")
    assert c.cmd("MAIL FROM:<bad address>")[0] == "553 5.1.0 Sender address syntax error"
    assert c.cmd("MAIL FROM:bogus")[0] == "553 5.1.0 Sender address syntax error"
    assert c.cmd("FOO")[0] == "500 5.5.1 Invalid command: Command unrecognized"
    assert c.cmd("NOOP")[0] == "250 2.0.0 Ok"
    assert c.cmd("MAIL FROM:<a@remote.test>")[0] == "250 2.0.0 Ok"
    assert c.cmd("RCPT TO:<alice@example.test>")[0].startswith("250 2.1.5 ")
    # RFC 5321 4.5.1: a bare <postmaster> is an address, not a syntax error
    assert not c.cmd("RCPT TO:<Postmaster>")[0].startswith("501"), "bare postmaster refused"
    assert c.cmd("RSET")[0] == "250 2.0.0 Reset state"
    assert c.cmd("QUIT")[0] == "221 2.0.0 Bye"


def test_pipelined_session_and_bare_lf_never_ends_data(make_daemon, tmp_path):
    port = free_port()
    make_daemon(config(tmp_path / "d", port)).start()
    c = Client(port)
    c.reply()
    c.cmd("EHLO client.test")
    # all at once: the server must answer each command in order
    c.sock.sendall(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
    assert c.reply()[0].startswith("250 ")
    assert c.reply()[0].startswith("250 ")
    assert c.reply()[0].startswith("354 ")
    # a smuggling attempt: <LF>.<LF> and <CR>.<CR> must stay message content
    c.sock.sendall(b"Subject: smuggle\r\n\r\nbody\n.\nMAIL FROM:<evil@x.test>\r\n"
                   b"x\r.\rRCPT TO:<bob@example.test>\r\nend\r\n.\r\n")
    final = c.reply()[0]
    assert final.startswith("250 2.0.0 ") and "Message accepted" in final
    assert c.cmd("QUIT")[0].startswith("221")
    msgs = wait_for(lambda: maildir_messages(tmp_path / "d", "alice"), 20, "delivery")
    assert b"MAIL FROM:<evil@x.test>" in msgs[0] and b"RCPT TO:<bob@example.test>" in msgs[0]
    time.sleep(0.5)
    assert maildir_messages(tmp_path / "d", "bob") == []


def test_message_size_limit(make_daemon, tmp_path):
    port = free_port()
    conf = config(tmp_path / "d", port, extra="smtp max-message-size 10K")
    make_daemon(conf).start()
    c = Client(port)
    c.reply()
    assert "250-SIZE 10240" in c.cmd("EHLO client.test")
    # as OpenSMTPD 6.8: SIZE= is accepted and not acted upon; the limit holds at DATA
    assert c.cmd("MAIL FROM:<a@remote.test> SIZE=20000")[0] == "250 2.0.0 Ok"
    c.cmd("RCPT TO:<alice@example.test>")
    assert c.cmd("DATA")[0].startswith("354")
    c.sock.sendall(b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 20 + b".\r\n")
    assert c.reply()[0] == "554 5.3.4 Message too big for system: Transaction failed, message too big"
    # the transaction is reset: the next one works without RSET
    assert c.cmd("MAIL FROM:<a@remote.test>")[0] == "250 2.0.0 Ok"
    c.cmd("RCPT TO:<alice@example.test>")
    assert c.cmd("DATA")[0].startswith("354")
    c.sock.sendall(b"Subject: small\r\n\r\nok\r\n.\r\n")
    assert c.reply()[0].startswith("250 2.0.0 ")


def test_null_sender_is_accepted_and_delivered(make_daemon, tmp_path):
    """MAIL FROM:<> (bounces, DSNs) must work; a second MAIL inside it is still refused."""
    port = free_port()
    make_daemon(config(tmp_path / "d", port)).start()
    c = Client(port)
    c.reply()
    c.cmd("EHLO client.test")
    assert c.cmd("MAIL FROM:<>")[0] == "250 2.0.0 Ok"
    assert c.cmd("MAIL FROM:<a@remote.test>")[0].startswith("503 5.5.1 ")
    assert c.cmd("RCPT TO:<>")[0].startswith("501 5.1.3 ")
    assert c.cmd("RCPT TO:<alice@example.test>")[0].startswith("250 2.1.5 ")
    assert c.cmd("DATA")[0].startswith("354")
    c.sock.sendall(b"Subject: bounce\r\n\r\nreport\r\n.\r\n")
    assert c.reply()[0].startswith("250 2.0.0 ")
    c.cmd("QUIT")
    msgs = wait_for(lambda: maildir_messages(tmp_path / "d", "alice"), 20, "delivery")
    # as OpenSMTPD's mda: no Return-Path line for the null sender
    assert msgs[0].startswith(b"Delivered-To: alice@example.test\n") and b"Subject: bounce" in msgs[0]
