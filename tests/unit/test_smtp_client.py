"""The sans-I/O SMTP/LMTP client core (smtpd/smtp_client.py): dialogues played
against scripted server replies, byte for byte, with no socket."""
from __future__ import annotations

import base64

import pytest

from smtpd.smtp_client import (
    NEED_DATA, ClientSettings, Closed, LocalProtocolError, Ready, RemoteProtocolError,
    SessionFailed, SmtpClient, StartTls, Transaction, TransactionDone, encode_body,
)

EHLO_PLAIN = b"250-mx.test\r\n250 8BITMIME\r\n"


def events(client: SmtpClient, data: bytes = b"") -> list:
    """Feed ``data``; every event up to NEED_DATA."""
    if data:
        client.receive_data(data)
    out = []
    for _ in range(100):
        ev = client.next_event()
        if ev is NEED_DATA:
            return out
        out.append(ev)
    raise AssertionError("no NEED_DATA after 100 events")


def greeted(settings: ClientSettings, ehlo: bytes = EHLO_PLAIN) -> SmtpClient:
    client = SmtpClient(settings)
    assert events(client, b"220 mx.test ESMTP\r\n") == []
    assert client.data_to_send() == f"EHLO {settings.helo}\r\n".encode()
    evs = events(client, ehlo)
    assert isinstance(evs[-1], Ready), evs
    return client


def plain(**kw) -> ClientSettings:
    return ClientSettings(helo="me.test", tls="no", **kw)


def test_plain_transaction_then_rset_free_reuse_and_quit():
    client = greeted(plain())
    client.send_mail(Transaction("a@x.test", ("b@y.test", "c@y.test"), b"Subject: s\n\nhi\n"))
    assert client.data_to_send() == b"MAIL FROM:<a@x.test>\r\n"
    assert events(client, b"250 ok\r\n") == []
    assert client.data_to_send() == b"RCPT TO:<b@y.test>\r\n"
    events(client, b"250 ok\r\n")
    assert client.data_to_send() == b"RCPT TO:<c@y.test>\r\n"
    events(client, b"550 5.1.1 no such user\r\n")
    assert client.data_to_send() == b"DATA\r\n"
    events(client, b"354 go\r\n")
    assert client.data_to_send() == b"Subject: s\r\n\r\nhi\r\n.\r\n"
    (done,) = events(client, b"250 2.0.0 queued\r\n")
    assert isinstance(done, TransactionDone) and done.reusable
    assert [(r.rcpt, r.status, r.reply) for r in done.results] == [
        ("b@y.test", "ok", "250 2.0.0 queued"), ("c@y.test", "permfail", "550 5.1.1 no such user")]
    # a second message on the same session needs no RSET after a successful one
    client.send_mail(Transaction("a@x.test", ("d@y.test",), b"x\n"))
    assert client.data_to_send() == b"MAIL FROM:<a@x.test>\r\n"
    events(client, b"451 4.3.0 try later\r\n")
    assert client.data_to_send() == b"RSET\r\n"
    (done,) = events(client, b"250 ok\r\n")
    assert done.results[0].status == "tempfail" and done.results[0].reply == "451 4.3.0 try later"
    client.quit()
    assert client.data_to_send() == b"QUIT\r\n"
    assert events(client, b"221 bye\r\n") == [Closed()]


def test_helo_fallback_when_ehlo_refused():
    client = SmtpClient(plain())
    events(client, b"220 old\r\n")
    client.data_to_send()
    assert events(client, b"502 what\r\n") == []
    assert client.data_to_send() == b"HELO me.test\r\n"
    (ready,) = events(client, b"250 old\r\n")
    assert isinstance(ready, Ready) and ready.extensions == {}


def test_banner_refused_is_a_failure_and_quits():
    client = SmtpClient(plain())
    (failed,) = events(client, b"554 go away\r\n")
    assert failed == SessionFailed("permfail", "554 go away", failed.reply)
    assert client.data_to_send() == b"QUIT\r\n"


def test_pipelining_sends_mail_rcpts_and_data_at_once_and_the_message_after_354():
    client = greeted(plain(), b"250-mx.test\r\n250-PIPELINING\r\n250 SIZE 1000\r\n")
    client.send_mail(Transaction("a@x.test", ("b@y.test", "c@y.test"), b"hi\n", size=3))
    assert client.data_to_send() == (b"MAIL FROM:<a@x.test> SIZE=3\r\nRCPT TO:<b@y.test>\r\n"
                                     b"RCPT TO:<c@y.test>\r\nDATA\r\n")
    assert events(client, b"250 ok\r\n250 ok\r\n550 no\r\n") == []
    assert client.data_to_send() == b""          # the message waits for the 354
    events(client, b"354 go\r\n")
    assert client.data_to_send() == b"hi\r\n.\r\n"
    (done,) = events(client, b"250 ok\r\n")
    assert [(r.status, r.reply) for r in done.results] == [("ok", "250 ok"), ("permfail", "550 no")]


def pipelined(rcpts: tuple[str, ...], replies: bytes, body: bytes = b"hi\n") -> SmtpClient:
    """A pipelined transaction (MAIL, RCPTs and DATA in one write) given ``replies``."""
    client = greeted(plain(), b"250-mx.test\r\n250 PIPELINING\r\n")
    client.send_mail(Transaction("a@x.test", rcpts, body))
    assert client.data_to_send().endswith(b"RCPT TO:<%s>\r\nDATA\r\n" % rcpts[-1].encode())
    assert events(client, replies) == []
    return client


def results_after_rset(client: SmtpClient) -> list[tuple[str, str]]:
    assert client.data_to_send() == b"RSET\r\n"
    (done,) = events(client, b"250 ok\r\n")
    assert done.reusable
    return [(r.status, r.reply) for r in done.results]


def test_pipelining_no_recipient_taken_means_no_message_then_rset():
    client = pipelined(("b@y.test",), b"250 ok\r\n550 no\r\n554 no valid recipients\r\n")
    assert results_after_rset(client) == [("permfail", "550 no")]


def test_pipelining_a_354_after_no_recipient_gets_an_empty_message_not_the_body():
    client = pipelined(("b@y.test", "c@y.test"), b"250 ok\r\n450 busy\r\n550 no\r\n354 go\r\n",
                       body=b"secret\n")
    assert client.data_to_send() == b".\r\n"
    assert events(client, b"554 no recipients\r\n") == []
    assert results_after_rset(client) == [("tempfail", "450 busy"), ("permfail", "550 no")]


def test_pipelining_refused_mail_fails_every_recipient_with_its_reply():
    client = pipelined(("b@y.test",), b"451 try later\r\n503 need mail\r\n503 need rcpt\r\n")
    assert results_after_rset(client) == [("tempfail", "451 try later")]


def test_pipelining_refused_data_fails_the_recipients_taken():
    client = pipelined(("b@y.test", "c@y.test"), b"250 ok\r\n250 ok\r\n550 no\r\n452 no room\r\n")
    assert results_after_rset(client) == [("tempfail", "452 no room"), ("permfail", "550 no")]


def test_size_over_the_peer_limit_fails_before_mail():
    client = greeted(plain(), b"250-mx.test\r\n250 SIZE 10\r\n")
    client.send_mail(Transaction("a@x.test", ("b@y.test",), b"x" * 20, size=20))
    assert client.data_to_send() == b""
    (done,) = events(client)
    assert done.results[0].status == "permfail"


def test_dsn_parameters_only_when_offered():
    txn = Transaction("a@x.test", ("b@y.test",), b"x\n", mail_params="RET=HDRS",
                      rcpt_params=("NOTIFY=NEVER",), dsn=True)
    client = greeted(plain(), b"250-mx.test\r\n250 DSN\r\n")
    client.send_mail(txn)
    assert client.data_to_send() == b"MAIL FROM:<a@x.test> RET=HDRS\r\n"
    events(client, b"250 ok\r\n")
    assert client.data_to_send() == b"RCPT TO:<b@y.test> NOTIFY=NEVER\r\n"
    client = greeted(plain())
    client.send_mail(txn)
    assert client.data_to_send() == b"MAIL FROM:<a@x.test>\r\n"


def test_lmtp_one_reply_per_recipient_after_data():
    client = SmtpClient(ClientSettings(helo="me.test", lmtp=True, tls="no"))
    events(client, b"220 lmtp\r\n")
    assert client.data_to_send() == b"LHLO me.test\r\n"
    (ready,) = events(client, b"250-lmtp\r\n250 PIPELINING\r\n")
    client.send_mail(Transaction("a@x.test", ("b@y.test", "c@y.test", "d@y.test"), b"hi\n"))
    client.data_to_send()
    events(client, b"250 ok\r\n250 ok\r\n550 no such user\r\n250 ok\r\n")
    assert client.data_to_send() == b"DATA\r\n"
    events(client, b"354 go\r\n")
    client.data_to_send()
    assert events(client, b"250 2.0.0 b delivered\r\n") == []     # one of two replies
    (done,) = events(client, b"452 4.2.2 d over quota\r\n")
    assert [(r.rcpt, r.status, r.reply) for r in done.results] == [
        ("b@y.test", "ok", "250 2.0.0 b delivered"),
        ("c@y.test", "permfail", "550 no such user"),
        ("d@y.test", "tempfail", "452 4.2.2 d over quota")]


def test_lmtp_refused_lhlo_has_no_helo_fallback():
    client = SmtpClient(ClientSettings(helo="me.test", lmtp=True, tls="no"))
    events(client, b"220 lmtp\r\n")
    client.data_to_send()
    (failed,) = events(client, b"500 no\r\n")
    assert isinstance(failed, SessionFailed) and failed.status == "permfail"


# --- STARTTLS ------------------------------------------------------------------------------

STARTTLS_EHLO = b"250-mx.test\r\n250-STARTTLS\r\n250 AUTH PLAIN LOGIN\r\n"


def starttls_client(mode: str, creds=None) -> SmtpClient:
    client = SmtpClient(ClientSettings(helo="me.test", tls=mode, credentials=creds))
    events(client, b"220 mx\r\n")
    client.data_to_send()
    assert events(client, STARTTLS_EHLO) == []
    assert client.data_to_send() == b"STARTTLS\r\n"
    return client


def test_starttls_then_greets_again():
    client = starttls_client("opportunistic")
    assert events(client, b"220 go ahead\r\n") == [StartTls()]
    assert client.data_to_send() == b""
    with pytest.raises(LocalProtocolError):
        client.send_mail(Transaction("a@x.test", ("b@y.test",), b""))
    client.tls_started()
    assert client.tls_active and client.extensions == {}
    assert client.data_to_send() == b"EHLO me.test\r\n"
    (ready,) = events(client, b"250-mx.test\r\n250 AUTH PLAIN\r\n")
    assert isinstance(ready, Ready) and "STARTTLS" not in ready.extensions


def test_starttls_refused_opportunistic_goes_on_in_plain_text():
    client = starttls_client("opportunistic")
    (ready,) = events(client, b"454 4.7.0 TLS not available\r\n")
    assert isinstance(ready, Ready) and not client.tls_active


def test_starttls_refused_when_required_fails():
    client = starttls_client("required")
    (failed,) = events(client, b"454 4.7.0 TLS not available\r\n")
    assert failed.status == "tempfail" and failed.text.startswith("STARTTLS rejected: 454")


def test_tls_required_but_not_offered():
    client = SmtpClient(ClientSettings(helo="me.test", tls="required"))
    events(client, b"220 mx\r\n")
    client.data_to_send()
    (failed,) = events(client, EHLO_PLAIN)
    assert failed.text == "TLS required but not supported by remote host"
    assert client.data_to_send() == b"QUIT\r\n"


def test_no_starttls_when_mode_is_no():
    client = greeted(plain(), STARTTLS_EHLO)
    assert not client.tls_active


def test_bytes_after_the_starttls_reply_are_refused():
    client = starttls_client("required")
    with pytest.raises(RemoteProtocolError, match="after STARTTLS"):
        events(client, b"220 go ahead\r\n250 injected\r\n")


# --- AUTH ----------------------------------------------------------------------------------

def test_auth_plain_after_starttls():
    client = starttls_client("required", ("bob", "s3cr:et"))
    events(client, b"220 go\r\n")
    client.tls_started()
    client.data_to_send()
    assert events(client, STARTTLS_EHLO) == []
    token = base64.b64encode(b"\0bob\0s3cr:et").decode()
    assert client.data_to_send() == f"AUTH PLAIN {token}\r\n".encode()
    (ready,) = events(client, b"235 2.7.0 ok\r\n")
    assert isinstance(ready, Ready) and client.authenticated_as == "bob"


def test_auth_login_when_only_login_is_offered():
    client = SmtpClient(ClientSettings(helo="me.test", tls="smtps", credentials=("bob", "pw")))
    events(client, b"220 mx\r\n")
    client.data_to_send()
    events(client, b"250-mx\r\n250 AUTH LOGIN\r\n")
    assert client.data_to_send() == b"AUTH LOGIN\r\n"
    events(client, b"334 VXNlcm5hbWU6\r\n")
    assert client.data_to_send() == base64.b64encode(b"bob") + b"\r\n"
    events(client, b"334 UGFzc3dvcmQ6\r\n")
    assert client.data_to_send() == base64.b64encode(b"pw") + b"\r\n"
    (ready,) = events(client, b"235 ok\r\n")
    assert isinstance(ready, Ready)


def test_auth_refused():
    client = SmtpClient(ClientSettings(helo="me.test", tls="smtps", credentials=("bob", "pw")))
    events(client, b"220 mx\r\n")
    client.data_to_send()
    events(client, b"250-mx\r\n250 AUTH PLAIN\r\n")
    client.data_to_send()
    (failed,) = events(client, b"535 5.7.8 bad credentials\r\n")
    assert failed.status == "tempfail" and failed.text == "AUTH rejected: 535 5.7.8 bad credentials"


def test_never_auth_over_cleartext():
    # opportunistic TLS the server does not offer: the credentials are not sent
    client = SmtpClient(ClientSettings(helo="me.test", tls="opportunistic", credentials=("bob", "pw")))
    events(client, b"220 mx\r\n")
    client.data_to_send()
    (failed,) = events(client, b"250-mx\r\n250 AUTH PLAIN LOGIN\r\n")
    assert failed.text == "Refuse to AUTH over insecure channel"
    assert client.data_to_send() == b"QUIT\r\n"


def test_auth_not_advertised_and_no_usable_mechanism():
    for ehlo, text in ((b"250 mx\r\n", "AUTH not advertised"),
                       (b"250-mx\r\n250 AUTH CRAM-MD5\r\n", "no supported AUTH method")):
        client = SmtpClient(ClientSettings(helo="me.test", tls="smtps", credentials=("u", "p")))
        events(client, b"220 mx\r\n")
        client.data_to_send()
        (failed,) = events(client, ehlo)
        assert failed.text == text


# --- replies the server gets wrong ----------------------------------------------------------

@pytest.mark.parametrize("bad", [b"hello\r\n", b"25\r\n", b"250x\r\n", b"250-a\r\n251 b\r\n"])
def test_malformed_replies(bad):
    client = SmtpClient(plain())
    with pytest.raises(RemoteProtocolError, match="Bad response"):
        events(client, bad)


def test_over_long_reply_line():
    client = SmtpClient(plain())
    with pytest.raises(RemoteProtocolError, match="too much data"):
        events(client, b"220 " + b"x" * 5000)


def test_end_of_file_mid_session_and_after_quit():
    client = greeted(plain())
    client.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="closed"):
        client.next_event()
    client = greeted(plain())
    client.quit()
    client.receive_data(b"")
    assert client.next_event() == Closed()


def test_replies_split_across_reads():
    client = SmtpClient(plain())
    for chunk in (b"22", b"0-mx\r", b"\n220 mx\r\n"):
        client.receive_data(chunk)
    assert client.next_event() is NEED_DATA
    assert client.data_to_send() == b"EHLO me.test\r\n"


# --- the body ------------------------------------------------------------------------------

def test_body_line_ends_normalised_and_dots_stuffed():
    body = b"Subject: x\r\n\r\na\rb\nc\r\n.\r\n.hidden\rMAIL FROM:<evil>\n"
    assert encode_body(body) == (b"Subject: x\r\n\r\na\r\nb\r\nc\r\n..\r\n..hidden\r\n"
                                 b"MAIL FROM:<evil>\r\n.\r\n")


def test_body_without_final_newline_and_empty_body():
    assert encode_body(b"a\n.") == b"a\r\n..\r\n.\r\n"
    assert encode_body(b"") == b".\r\n"


def test_long_lines_are_folded_to_998_octets():
    header = b"X-Long: " + b"h" * 2000
    body_line = b"." + b"b" * 2500
    out = encode_body(header + b"\n\n" + body_line + b"\n")
    lines = out.split(b"\r\n")
    assert max(len(l) for l in lines) <= 999          # 998 plus a stuffed dot at most
    head_end = lines.index(b"")
    assert all(l.startswith(b" ") for l in lines[1:head_end])     # header continuations
    assert lines[0] + b"".join(l[1:] for l in lines[1:head_end]) == header
    body = lines[head_end + 1:-2]
    assert body[0].startswith(b"..") and b"".join(body)[1:] == body_line


def test_folding_does_not_cut_a_utf8_character():
    line = b"a" * 997 + "é".encode() + b"z"
    pieces = encode_body(b"\n" + line + b"\n").split(b"\r\n")[1:-2]
    assert [p.decode() for p in pieces] == ["a" * 997, "éz"]


# --- however the replies are split into reads ---------------------------------------------

SERVER_SCRIPT = [b"220 mx\r\n", b"250-mx\r\n250-PIPELINING\r\n250 SIZE 100\r\n",
                 b"250 ok\r\n250 ok\r\n550 no\r\n", b"354 go\r\n", b"250 queued\r\n", b"221 bye\r\n"]


def _run_split(cuts: list[int]) -> tuple[list, bytes]:
    """The whole session, each server answer cut into reads at ``cuts`` (a server
    answers only what it was sent, so the steps stay in order)."""
    client = SmtpClient(plain())
    seen, sent = [], b""
    for answer in SERVER_SCRIPT:
        points = sorted({c % (len(answer) + 1) for c in cuts} | {0, len(answer)})
        for start, end in zip(points, points[1:]):
            seen += events(client, answer[start:end])
        sent += client.data_to_send()
        if seen and isinstance(seen[-1], Ready) and client.state == "ready":
            client.send_mail(Transaction("a@x", ("b@y", "c@y"), b"hi\n"))
            sent += client.data_to_send()
        elif seen and isinstance(seen[-1], TransactionDone) and client.state == "ready":
            client.quit()
            sent += client.data_to_send()
    return seen, sent


def test_events_do_not_depend_on_how_replies_are_split():
    from hypothesis import given, settings, strategies as st

    reference = _run_split([])
    assert [type(e).__name__ for e in reference[0]] == ["Ready", "TransactionDone", "Closed"]
    assert [r.status for r in reference[0][1].results] == ["ok", "permfail"]
    assert reference[1].endswith(b"DATA\r\nhi\r\n.\r\nQUIT\r\n")

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.integers(min_value=0, max_value=200), max_size=20))
    def check(cuts):
        assert _run_split(cuts) == reference

    check()


def test_the_fast_body_encoding_gives_the_bytes_of_the_line_by_line_one():
    from hypothesis import given, settings, strategies as st
    from smtpd.smtp_client import _encode_lines

    pieces = st.sampled_from([b"a", b"\xc3\xa9", b".", b"..", b"\n", b"\n.", b"\r", b"\r\n", b" ",
                              b"x" * 997, b"y" * 998, b"z" * 999, b":"])

    @settings(max_examples=400, deadline=None)
    @given(st.lists(pieces, max_size=12))
    def same(parts):
        body = b"".join(parts)
        assert encode_body(body) == _encode_lines(body)

    same()
    for body in (b"", b".", b"\n", b"a", b"a\n", b".a\n.b\n..c", b"\n\n.\n", b"x" * 998 + b"\n"):
        assert encode_body(body) == _encode_lines(body), body
