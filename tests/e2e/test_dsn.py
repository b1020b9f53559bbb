"""The SMTP DSN extension (RFC 3461) end to end: advertised, parameters checked,
stored, honoured (NEVER, SUCCESS), passed on to a next hop that offers DSN."""
from __future__ import annotations

import smtplib
from pathlib import Path

import pytest

from tests.conftest import free_port, wait_for
from tests.e2e.helpers import config, maildir_messages
from tests.e2e.dsn_report import parse, report_groups
from tests.e2e.sink import Sink


def transaction(port: int, sender: str, rcpts: list[tuple[str, list[str]]], mail_options=(),
                body: bytes = b"Subject: dsn test\r\n\r\nbody\r\n") -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.test")
        assert s.has_extn("dsn")
        code, text = s.mail(sender, list(mail_options))
        assert code == 250, (code, text)
        for rcpt, options in rcpts:
            code, text = s.rcpt(rcpt, options)
            assert code == 250, (rcpt, code, text)
        assert s.data(body)[0] == 250


def spool_envelopes(spool: Path) -> list[str]:
    return [p.read_text() for p in (spool / "queue").glob("*/*/*") if p.name != "message"]


@pytest.mark.parametrize("command,reply", [
    ("MAIL FROM:<a@example.test> RET=SOME", "501 5.5.4"),
    ("MAIL FROM:<a@example.test> ENVID=bad=value", "501 5.5.4"),
    ("RCPT TO:<alice@example.test> NOTIFY=SOMETIMES", "501 5.5.4"),
    ("RCPT TO:<alice@example.test> NOTIFY=NEVER,SUCCESS", "501 5.5.4"),
    ("RCPT TO:<alice@example.test> ORCPT=no-semicolon", "501 5.5.4"),
])
def test_bad_dsn_parameters_refused(make_daemon, tmp_path, command, reply):
    port = free_port()
    make_daemon(config(tmp_path / "d", port)).start()
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.test")
        if command.startswith("RCPT"):
            assert s.mail("bob@example.test")[0] == 250
        code, text = s.docmd(command)
        assert f"{code} {text.decode()}".startswith(reply), (code, text)
        # the session goes on
        assert s.docmd("RSET")[0] == 250


def test_notify_never_suppresses_the_bounce(make_daemon, tmp_path):
    sink_port, port = free_port(), free_port()
    sink = Sink(sink_port).start()
    sink.handler.reject_rcpt = {"x@remote.test": "550 5.1.1 No such user here"}
    try:
        d = make_daemon(config(tmp_path / "d", port, relay=f"smtp://127.0.0.1:{sink_port}")).start()
        transaction(port, "alice@example.test", [("x@remote.test", ["NOTIFY=NEVER"])])
        d.wait_log('result="PermFail"')
        wait_for(lambda: d.queue_lines() == [], 20, "the queue to be empty")
        assert "queue: bounce evpid=" not in d.log_since_start()
        assert maildir_messages(tmp_path / "d", "alice") == []
    finally:
        sink.stop()


def test_notify_success_on_local_delivery(make_daemon, tmp_path):
    port = free_port()
    d = make_daemon(config(tmp_path / "d", port)).start()
    transaction(port, "bob@example.test",
                [("alice@example.test", ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;Alice+2Bx@example.test"])],
                mail_options=["RET=HDRS", "ENVID=QQ-123"])
    delivered = wait_for(lambda: maildir_messages(tmp_path / "d", "alice"), 20, "the delivery")
    assert b"Subject: dsn test" in delivered[0]
    notices = wait_for(lambda: maildir_messages(tmp_path / "d", "bob"), 20, "the success notice")
    msg = parse(notices[0])
    assert msg["Subject"] == "Delivery status notification: delivered"
    groups = report_groups(msg)
    assert groups[0]["Original-Envelope-Id"] == "QQ-123"
    assert groups[1]["Original-Recipient"] == "rfc822;Alice+2Bx@example.test"
    assert groups[1]["Final-Recipient"] == "rfc822;alice@example.test"
    assert groups[1]["Action"] == "delivered" and groups[1]["Status"].startswith("2.")
    wait_for(lambda: d.queue_lines() == [], 20, "the queue to be empty")
    # the notice itself asks for nothing: exactly one message for bob
    assert len(maildir_messages(tmp_path / "d", "bob")) == 1


def test_dsn_parameters_stored_in_the_envelope(make_daemon, tmp_path):
    port = free_port()
    d = make_daemon(config(tmp_path / "d", port), extra_args=["-P", "mda"]).start()
    transaction(port, "bob@example.test",
                [("alice@example.test", ["NOTIFY=FAILURE,DELAY", "ORCPT=rfc822;alice@example.test"])],
                mail_options=["RET=FULL", "ENVID=abc+2Bdef"])
    envs = wait_for(lambda: spool_envelopes(d.spool), 10, "the envelope on disk")
    text = envs[0]
    assert "dsn-notify: 6\n" in text
    assert "dsn-ret: FULL\n" in text and "dsn-envid: abc+2Bdef\n" in text
    assert "dsn-orcpt: rfc822;alice@example.test\n" in text


def test_relay_with_dsn_passes_parameters_on(make_daemon, tmp_path):
    sink_port, port = free_port(), free_port()
    sink = Sink(sink_port, dsn=True).start()
    try:
        d = make_daemon(config(tmp_path / "d", port, relay=f"smtp://127.0.0.1:{sink_port}")).start()
        transaction(port, "alice@example.test",
                    [("x@remote.test", ["NOTIFY=SUCCESS", "ORCPT=rfc822;X@remote.test"]),
                     ("y@remote.test", [])], mail_options=["RET=HDRS", "ENVID=E1"])
        t = wait_for(lambda: sink.transactions, 20, "the relayed message")[0]
        assert t.dsn_params == ["RET=HDRS", "ENVID=E1", "NOTIFY=SUCCESS", "ORCPT=rfc822;X@remote.test"]
        d.wait_log('result="Ok"')
        wait_for(lambda: d.queue_lines() == [], 20, "the queue to be empty")
        # the next hop notifies: no "relayed" notice from us
        assert "queue: bounce evpid=" not in d.log_since_start()
    finally:
        sink.stop()


def test_relay_without_dsn_sends_a_relayed_notice(make_daemon, tmp_path):
    sink_port, port = free_port(), free_port()
    sink = Sink(sink_port).start()
    try:
        d = make_daemon(config(tmp_path / "d", port, relay=f"smtp://127.0.0.1:{sink_port}")).start()
        transaction(port, "alice@example.test", [("x@remote.test", ["NOTIFY=SUCCESS"])])
        t = wait_for(lambda: sink.transactions, 20, "the relayed message")[0]
        assert t.dsn_params == []
        notices = wait_for(lambda: maildir_messages(tmp_path / "d", "alice"), 20, "the relayed notice")
        msg = parse(notices[0])
        assert msg["Subject"] == "Delivery status notification: relayed"
        rcpt = report_groups(msg)[1]
        assert rcpt["Action"] == "relayed" and rcpt["Final-Recipient"] == "rfc822;x@remote.test"
    finally:
        sink.stop()


def test_ret_full_failure_returns_the_whole_message(make_daemon, tmp_path):
    sink_port, port = free_port(), free_port()
    sink = Sink(sink_port).start()
    sink.handler.reject_rcpt = {"x@remote.test": "550 5.1.1 No such user here"}
    try:
        d = make_daemon(config(tmp_path / "d", port, relay=f"smtp://127.0.0.1:{sink_port}")).start()
        transaction(port, "alice@example.test", [("x@remote.test", ["NOTIFY=FAILURE"])],
                    mail_options=["RET=FULL", "ENVID=full-1"],
                    body=b"Subject: keep all of me\r\n\r\nthe whole body\r\n")
        notices = wait_for(lambda: maildir_messages(tmp_path / "d", "alice"), 30, "the failure notice")
        msg = parse(notices[0])
        assert msg["Subject"] == "Delivery status notification: failed"
        assert report_groups(msg)[0]["Original-Envelope-Id"] == "full-1"
        returned = msg.get_payload()[2]
        assert returned.get_content_type() == "message/rfc822"
        inner = returned.get_payload()[0]
        assert inner["Subject"] == "keep all of me"
        assert "the whole body" in inner.get_content()
    finally:
        sink.stop()
