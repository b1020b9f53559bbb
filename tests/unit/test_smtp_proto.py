"""The SMTP protocol core (smtpd/smtp_proto.py) without sockets: replies as OpenSMTPD
6.8 gives them, the wait points, pipelining, STARTTLS, AUTH, PROXY, the body."""
from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from smtpd import smtp_proto
from smtpd.smtp_proto import (
    PAUSED, AuthCredentials, MailFrom, RcptTo, ServerConnection, Settings, StartTls, State,
)
from tests.unit.smtp_sessions import FRAGMENTS, Driver, check_session, proxy_header, proxy_parse, random_session, run


def replies(driver: Driver) -> list[str]:
    return [r for _c, r in driver.replies]


def session(*lines: bytes, **kw) -> Driver:
    return run(b"".join(lines), [], Settings(**{"hostname": "mx.test", "peer": "192.0.2.1", **kw}) if kw else None)


def test_a_plain_transaction():
    d = session(b"EHLO c.test\r\n", b"MAIL FROM:<a@b.test>\r\n", b"RCPT TO:<alice@example.test>\r\n",
                b"DATA\r\n", b"Subject: x\r\n\r\n..dotted\r\nend\r\n.\r\n", b"QUIT\r\n")
    got = replies(d)
    assert got[0] == "220 mx.test ESMTP pysmtpd"
    assert got[1].split("\r\n") == [
        "250-mx.test Hello c.test [192.0.2.1], pleased to meet you", "250-8BITMIME",
        "250-ENHANCEDSTATUSCODES", "250-SIZE 4096", "250-DSN", "250-STARTTLS", "250-PIPELINING", "250 HELP"]
    assert got[2:] == ["250 2.0.0 Ok", "250 2.1.5 Destination address valid: Recipient ok",
                       '354 Enter mail, end with "." on a line by itself',
                       "250 2.0.0 00000001 Message accepted for delivery", "221 2.0.0 Bye"]
    assert bytes(d.body) == b"Subject: x\n\n.dotted\nend\n"
    assert d.closed == "quit"


@pytest.mark.parametrize("line, reply", [
    (b"MAIL FROM:bogus", "553 5.1.0 Sender address syntax error"),
    (b"MAIL FROM:<bad address>", "553 5.1.0 Sender address syntax error"),
    (b"MAIL FROM <a@b.test>", "500 5.5.1 Invalid command: Command unrecognized"),
    (b"MAIL FROM:<a@b.test> SMTPUTF8", "503 5.5.4 Invalid command arguments: Unsupported option SMTPUTF8"),
    (b"MAIL FROM:<a@b.test> FOO=1", "503 5.5.4 Invalid command arguments: Unsupported option FOO=1"),
    (b"VRFY root", "500 5.5.1 Invalid command: Command unrecognized"),
    (b"EXPN staff", "500 5.5.1 Invalid command: Command unrecognized"),
    (b"FOO", "500 5.5.1 Invalid command: Command unrecognized"),
    (b"RCPT TO:<a@b.test>", "503 5.5.1 Invalid command: Command not allowed at this point."),
    (b"DATA", "503 5.5.1 Invalid command: Command not allowed at this point."),
    (b"NOOP now", "500 5.5.4 Invalid command arguments: command does not accept arguments."),
    (b"EHLO again.test", "503 5.5.1 Invalid command: Already identified"),
    (b"AUTH PLAIN", "503 5.5.1 Invalid command: Command not supported"),     # not before TLS
    (b"STARTTLS now", "501 5.5.4 Invalid command arguments: No parameters allowed"),
    (b"WIZ", "500 5.5.1 Invalid command: this feature is not supported yet ;-)"),
])
def test_refusals_as_opensmtpd_6_8(line, reply):
    d = session(b"EHLO c.test\r\n", line + b"\r\n")
    assert replies(d)[-1] == reply
    assert d.replies[-1][0] in (line.decode(), "AUTH PLAIN")       # what failed-command logs


def test_size_parameter_is_accepted_as_opensmtpd_does():
    d = session(b"EHLO c.test\r\n", b"MAIL FROM:<a@b.test> SIZE=999999999 BODY=8BITMIME AUTH=<>\r\n")
    assert replies(d)[-1] == "250 2.0.0 Ok"


def test_commands_before_helo_and_out_of_order():
    d = session(b"MAIL FROM:<a@b.test>\r\n", b"RSET\r\n", b"HELO c.test\r\n", b"DATA\r\n",
                b"MAIL FROM:<a@b.test>\r\n", b"DATA\r\n", b"MAIL FROM:<a@b.test>\r\n")
    assert replies(d)[1:] == [
        "503 5.5.1 Invalid command: Command not allowed at this point.",
        "503 5.5.1 Invalid command: Command not allowed at this point.",
        "250 mx.test Hello c.test [192.0.2.1], pleased to meet you",
        "503 5.5.1 Invalid command: Command not allowed at this point.",
        "250 2.0.0 Ok",
        "503 5.5.4 Invalid command arguments: No recipient specified",
        "503 5.5.1 Invalid command: Command not allowed at this point."]


def test_duplicate_recipients_make_one_envelope_and_limits_hold():
    d = session(b"EHLO c.test\r\n", b"MAIL FROM:<a@b.test>\r\n",
                *[b"RCPT TO:<alice@example.test>\r\n"] * 10, b"RCPT TO:<Alice@example.test>\r\n",
                *[b"RCPT TO:<u%d@example.test>\r\n" % i for i in range(6)])
    rcpt_events = [e for e in d.events if e[0] == "RcptTo"]
    assert len(rcpt_events) == 5                 # alice once, then up to max_rcpt=5
    assert replies(d)[-1] == "451 4.5.3 Too many recipients: Too many recipients"
    assert replies(d).count("250 2.1.5 Destination address valid: Recipient ok") == 15


def test_max_mails_per_session():
    one = b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\nx\r\n.\r\n"
    d = session(b"EHLO c.test\r\n", one * 3, b"MAIL FROM:<a@b.test>\r\n")
    assert replies(d)[-1] == "452 4.5.3 Too many recipients: Too many messages sent"


def test_the_body_ends_only_at_crlf_dot_crlf():
    d = session(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n",
                b"a\n.\nMAIL FROM:<evil@x.test>\r\nb\r.\rc\r\n.x\r\n.\r\nNOOP\r\n")
    assert bytes(d.body) == b"a\n.\nMAIL FROM:<evil@x.test>\nb\r.\rc\nx\n"
    assert replies(d)[-2:] == ["250 2.0.0 00000001 Message accepted for delivery", "250 2.0.0 Ok"]


def test_a_message_too_big_is_read_to_its_end_and_the_transaction_reset():
    big = b"x" * 998 + b"\r\n"
    d = session(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n", big * 10,
                b".\r\nMAIL FROM:<a@b.test>\r\n")
    assert replies(d)[-2:] == ["554 5.3.4 Message too big for system: Transaction failed, message too big",
                               "250 2.0.0 Ok"]
    assert len(d.body) <= 4096 + smtp_proto.CHUNK_MAX     # stopped at the limit, not buffered


def test_a_loop_is_refused():
    d = session(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n",
                b"Received: x\r\n" * 100, b"\r\nbody\r\n.\r\n")
    assert replies(d)[-1] == "500 5.4.6 Routing loop detected: Loop detected"


def test_internal_faults_are_temporary():
    d = session(b"EHLO c.test\r\nMAIL FROM:<fault@b.test>\r\nNOOP\r\n")
    assert replies(d)[-1] == "421 4.3.0 Temporary failure" and d.closed == "quit"
    conn = ServerConnection(Settings(hostname="mx.test"))
    conn.greet()
    conn.receive_data(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n")
    for _ in range(2):
        conn.next_event()
        conn.accept()
    assert isinstance(conn.next_event(), RcptTo)
    conn.internal_error()                 # in a transaction: 451, reset, the session goes on
    assert conn.data_to_send().endswith(b"451 4.3.0 Temporary failure\r\n")
    assert conn.tx is None and conn.state is State.HELO
    conn.receive_data(b"MAIL FROM:<a@b.test>\r\n")
    assert isinstance(conn.next_event(), MailFrom)


def test_a_refusal_that_is_not_a_4xx_or_5xx_becomes_a_tempfail():
    conn = ServerConnection(Settings(hostname="mx.test"))
    conn.greet()
    conn.receive_data(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n")
    conn.next_event()
    conn.accept()
    conn.next_event()
    conn.refuse("250 fine\r\nbogus")
    assert conn.data_to_send().endswith(b"421 4.3.0 Temporary failure\r\n") and conn.closing


@pytest.mark.parametrize("length, reply", [(5000, "500 5.0.0 Command line too long"),
                                           (70000, "500 5.0.0 Line too long")])
def test_a_long_command_line_ends_the_session(length, reply):
    d = session(b"EHLO c.test\r\n", b"NOOP " + b"x" * length + b"\r\nQUIT\r\n")
    assert replies(d)[-1] == reply and d.closed == "bad-input"


def test_a_command_ends_at_its_nul_as_in_opensmtpd():
    d = session(b"EHLO c.test\r\n", b"MAIL FROM:<send\x00er@client.test>\r\n")
    assert d.replies[-1] == ("MAIL FROM:<send", "553 5.1.0 Sender address syntax error")


def test_rcpt_unknown_parameter_as_opensmtpd_6_8():
    d = session(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.test> FOO=bar\r\n")
    assert replies(d)[-1] == "503 Unsupported option FOO=bar"


def test_starttls_discards_what_was_pipelined_after_it():
    conn = ServerConnection(Settings(hostname="mx.test", starttls=True))
    conn.greet()
    conn.receive_data(b"EHLO c\r\nSTARTTLS\r\nMAIL FROM:<evil@x.test>\r\n")
    conn.next_event()
    conn.accept()
    event = conn.next_event()
    assert isinstance(event, StartTls)
    conn.accept()
    assert conn.data_to_send().endswith(b"220 2.0.0 Ready to start TLS\r\n")
    assert conn.next_event() is PAUSED and conn.state is State.TLS
    conn.tls_established()
    conn.receive_data(b"MAIL FROM:<a@b.test>\r\nEHLO c\r\n")
    conn.next_event()
    assert conn.data_to_send() == b"503 5.5.1 Invalid command: Command not allowed at this point.\r\n"
    conn.next_event()
    conn.accept()
    out = conn.data_to_send().decode()
    assert "250-STARTTLS" not in out and "250-8BITMIME" in out      # offered once, not again


def test_tls_require_and_auth_require():
    d = session(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\n", hostname="mx.test", starttls=True, tls_require=True)
    assert replies(d)[-1] == "530 5.5.1 Invalid command: Must issue a STARTTLS command first"
    d = session(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\n", hostname="mx.test", smtps=True, auth="required")
    assert replies(d)[-1] == "530 5.5.1 Invalid command: Must issue an AUTH command first"
    assert "250-AUTH PLAIN LOGIN" in replies(d)[1]


@pytest.mark.parametrize("lines, user, password", [
    ([b"AUTH PLAIN AHVzZXIAcGFzcw=="], "user", "pass"),
    ([b"AUTH PLAIN", b"AHVzZXIAcGFzcw=="], "user", "pass"),
    ([b"AUTH LOGIN", b"dXNlcg==", b"cGFzcw=="], "user", "pass"),
    ([b"AUTH LOGIN dXNlcg==", b"cGFzcw=="], "user", "pass"),
])
def test_auth_plain_and_login(lines, user, password):
    conn = ServerConnection(Settings(hostname="mx.test", smtps=True, auth="required"))
    conn.greet()
    conn.receive_data(b"EHLO c\r\n" + b"".join(l + b"\r\n" for l in lines) + b"MAIL FROM:<a@b.test>\r\n")
    conn.next_event()
    conn.accept()
    event = conn.next_event()
    assert isinstance(event, AuthCredentials) and (event.user, event.password) == (user, password)
    out = conn.data_to_send()
    assert out.count(b"334 ") == len(lines) - 1
    conn.accept()
    assert conn.data_to_send() == b"235 2.0.0 Authentication succeeded\r\n"
    assert isinstance(conn.next_event(), MailFrom)


def test_auth_failures_and_bad_responses():
    d = session(b"EHLO c.test\r\nAUTH PLAIN AHUAYmFk\r\nAUTH LOGIN\r\n!!!\r\nAUTH FOO\r\nAUTH PLAIN *\r\n",
                hostname="mx.test", smtps=True, auth="optional")
    assert replies(d)[2:] == ["535 Authentication failed", "334 VXNlcm5hbWU6", "501 5.5.2 Syntax error: Syntax error",
                              '504 5.7.4 Security features not supported: AUTH method "FOO" not supported',
                              "501 5.5.2 Syntax error: Syntax error"]
    logged = [c for c, r in d.replies if r[:1] in "45"]
    assert logged == ["AUTH PLAIN (...)", "AUTH LOGIN (username)", "AUTH FOO", "AUTH PLAIN (...)"]
    assert not any("AHUAYmFk" in c for c, _r in d.replies)          # never the credentials


def test_proxy_v2_header_comes_first():
    settings = Settings(hostname="mx.test", proxy_v2=True, proxy_parser=proxy_parse)
    d = run(proxy_header("198.51.100.9") + b"EHLO c.test\r\n", [3, 17], settings)
    assert d.events[0] == ("proxy", ("198.51.100.9", 4242))
    assert replies(d)[0] == "220 mx.test ESMTP pysmtpd" and replies(d)[1].startswith("250-")
    bad = run(b"EHLO c.test\r\n", [], Settings(hostname="mx.test", proxy_v2=True, proxy_parser=proxy_parse))
    assert bad.closed == "proxy-error" and not bad.out


def test_replies_grammar():
    assert smtp_proto.reply_lines_valid(b"250-a\r\n250 b\r\n")
    for bad in (b"250-a\r\n", b"250-a\r\n251 b\r\n", b"600 x\r\n", b"25 x\r\n", b"250 \x00\r\n", b"250 x"):
        assert not smtp_proto.reply_lines_valid(bad), bad


# -- generated sessions: arbitrary byte splits, never a crash, never a bad reply ---------

SESSIONS_PER_EXAMPLE = 100


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(seed=st.integers(0, 2**64 - 1))
def test_100k_generated_sessions_split_anywhere(seed):
    """1000 examples x 100 sessions: 10^5 sessions cut at random points (sometimes
    byte by byte), none may crash or leave the session hanging at EOF, every reply in
    RFC 5321's grammar; one in four is also run whole, and the replies, events and
    committed messages must not depend on the cuts."""
    rng = random.Random(seed)
    for index in range(SESSIONS_PER_EXAMPLE):
        check_session(*random_session(rng), compare=index % 4 == 0)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(parts=st.lists(st.sampled_from(FRAGMENTS) | st.binary(max_size=30), max_size=30),
       cuts=st.lists(st.integers(1, 4000), max_size=20))
def test_sessions_from_hypothesis_fragments(parts, cuts):
    check_session(b"".join(parts), cuts)


def test_received_line_as_opensmtpd_writes_it():
    from smtpd.enqueue import received_line
    plain = received_line(helo="c.test", rdns="host.test", ip="192.0.2.1", name="mx.test", esmtp=True,
                          msgid=0x1234, rcpts=["a@b.test"]).decode()
    assert plain.startswith("Received: from c.test (host.test [192.0.2.1])\n\tby mx.test (pysmtpd) "
                            "with ESMTP id 00001234\n\tfor <a@b.test>;\n\t")
    tls = received_line(helo="c.test", rdns="host.test", ip="192.0.2.1", name="mx.test", esmtp=True,
                        msgid=0x1234, rcpts=["a@b.test", "c@d.test"], secure=True, user="bob",
                        tls_clause="TLSv1.3:TLS_AES_256_GCM_SHA384:256:NO", mask_src=True,
                        received_auth=True).decode()
    assert tls.startswith("Received: by mx.test (pysmtpd) with ESMTPSA id 00001234 "
                          "(TLSv1.3:TLS_AES_256_GCM_SHA384:256:NO) auth=yes user=bob;\n\t")
