"""``sendmail -bs``'s dialogue (smtpctl/sendmail_smtp.py), without I/O."""
from __future__ import annotations

import io

from common.submission import parse_args
from smtpctl.sendmail_smtp import Dialogue, read_data


def dialogue():
    got = []

    def submit(opts, rcpts, data):
        got.append((opts, rcpts, data))
        return "250 2.0.0 12345678 Message accepted for delivery"
    return Dialogue("mx.test", submit, parse_args([])), got


def test_a_transaction():
    d, got = dialogue()
    assert d.banner().startswith("220 mx.test ESMTP")
    assert d.line("MAIL FROM:<a@x>")[0].startswith("503")
    assert d.line("EHLO client")[0].splitlines()[-1] == "250 HELP"
    assert d.line("RCPT TO:<b@x>")[0].startswith("503")
    assert d.line("MAIL FROM:<a@x> RET=HDRS ENVID=e1") == ("250 2.0.0 Ok", False)
    assert d.line("DATA")[0].startswith("503")
    assert d.line("RCPT TO:<b@x> NOTIFY=NEVER")[0].startswith("250")
    assert d.line("rcpt to: <c@x>")[0].startswith("250")
    assert d.line("RCPT TO:b@x")[0].startswith("501")
    assert d.line("DATA") == ('354 Enter mail, end with "." on a line by itself', True)
    assert d.message(b"Subject: s\n\nbody\n").startswith("250 2.0.0 12345678")
    opts, rcpts, data = got[0]
    assert rcpts == ["b@x", "c@x"] and data == b"Subject: s\n\nbody\n"
    assert (opts.sender, opts.dsn_ret, opts.dsn_envid, opts.dsn_notify) == ("a@x", "HDRS", "e1", "NEVER")
    assert d.line("DATA")[0].startswith("503"), "the transaction ended with the message"
    assert d.line("VRFY x")[0].startswith("252") and d.line("BOGUS")[0].startswith("500")
    assert d.line("QUIT")[0].startswith("221") and d.done


def test_data_is_dot_unstuffed_and_ends_at_dot():
    stream = io.BytesIO(b"a\r\n..b\r\n.\r\nQUIT\r\n")
    assert read_data(stream) == b"a\n.b\n" and stream.readline() == b"QUIT\r\n"
    assert read_data(io.BytesIO(b"no end\r\n")) is None
