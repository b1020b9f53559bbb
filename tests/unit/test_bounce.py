"""The DSN builder (smtpd/bounce.py), checked by parsing its output with the stdlib."""
from __future__ import annotations

import email
import email.policy

import pytest

from smtpd.bounce import (
    DELAYED, DELIVERED, FAILED, RELAYED, Recipient, Report, build_report, duration_words,
    header_block, status_of,
)

ORIGINAL = (b"Received: from client.test (localhost [127.0.0.1])\n\tby mx.test (pysmtpd)\n"
            b"From: alice@example.test\nTo: x@remote.test\nSubject: hello there\n\n"
            b"body line 1\nbody line 2\n")
NOW = 1_800_000_000


def report(kind=FAILED, **kw) -> Report:
    base = dict(kind=kind, smtpname="mx.test", to="alice@example.test", arrival=NOW - 3600,
                original=ORIGINAL, recipients=[
                    Recipient(dest="x@remote.test", esc_class=5, esc_code=11,
                              errorline="550 5.1.1 No such user", orcpt="rfc822;X@remote.test"),
                    Recipient(dest="y@remote.test", esc_class=5, esc_code=11,
                              errorline="550 5.1.1 Unknown")])
    base.update(kw)
    return Report(**base)


def parse(data: bytes):
    return email.message_from_bytes(data, policy=email.policy.default)


def dsn_groups(msg):
    """The message/delivery-status part as a list of field groups (per-message first)."""
    part = msg.get_payload()[1]
    assert part.get_content_type() == "message/delivery-status"
    return [dict(g.items()) for g in part.get_payload()]


def test_failed_report_structure():
    data = build_report(report(), now=NOW, unique="0123456789abcdef")
    msg = parse(data)
    assert msg["From"] == "Mailer Daemon <MAILER-DAEMON@mx.test>"
    assert msg["To"] == "alice@example.test"
    assert msg["Subject"] == "Delivery status notification: failed"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Message-ID"] == "<0123456789abcdef.bounce@mx.test>"
    assert msg["Date"]
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = msg.get_payload()
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    text = parts[0].get_content()
    assert "x@remote.test: 550 5.1.1 No such user" in text
    assert "y@remote.test: 550 5.1.1 Unknown" in text
    groups = dsn_groups(msg)
    assert groups[0]["Reporting-MTA"] == "dns; mx.test"
    assert "Arrival-Date" in groups[0] and "Original-Envelope-Id" not in groups[0]
    assert len(groups) == 3                       # both recipients in ONE report
    first, second = groups[1], groups[2]
    assert first["Original-Recipient"] == "rfc822;X@remote.test"
    assert first["Final-Recipient"] == "rfc822;x@remote.test"
    assert first["Action"] == "failed" and first["Status"] == "5.1.1"
    assert first["Diagnostic-Code"] == "smtp; 550 5.1.1 No such user"
    assert "Original-Recipient" not in second
    headers = parts[2].get_payload() if parts[2].is_multipart() else parts[2].get_content()
    assert "Subject: hello there" in str(headers)
    assert "body line 1" not in data.decode()


def test_ret_full_attaches_the_whole_message_for_failures_only():
    msg = parse(build_report(report(ret="FULL", envid="ENV-42"), now=NOW, unique="u1"))
    parts = msg.get_payload()
    assert parts[2].get_content_type() == "message/rfc822"
    inner = parts[2].get_payload()[0]
    assert inner["Subject"] == "hello there"
    assert "body line 2" in inner.get_content()
    assert dsn_groups(msg)[0]["Original-Envelope-Id"] == "ENV-42"
    # a success notice never carries the body, whatever RET says
    ok = parse(build_report(report(kind=DELIVERED, ret="FULL"), now=NOW, unique="u2"))
    assert ok.get_payload()[2].get_content_type() == "text/rfc822-headers"


@pytest.mark.parametrize("kind,action,status", [
    (DELAYED, "delayed", "4.4.1"), (DELIVERED, "delivered", "2.0.0"), (RELAYED, "relayed", "2.0.0")])
def test_other_kinds(kind, action, status):
    rcpts = [Recipient(dest="x@remote.test", esc_class=4 if kind == DELAYED else 0,
                       esc_code=41 if kind == DELAYED else 0,
                       errorline="Connection refused" if kind == DELAYED else "")]
    msg = parse(build_report(report(kind=kind, recipients=rcpts, delay=7200, ttl=4 * 86400),
                             now=NOW, unique="u3"))
    assert msg["Subject"] == f"Delivery status notification: {kind}"
    rcpt = dsn_groups(msg)[1]
    assert rcpt["Action"] == action and rcpt["Status"] == status
    assert ("Diagnostic-Code" in rcpt) == (kind == DELAYED)
    if kind == DELAYED:
        text = msg.get_payload()[0].get_content()
        assert "2 hours" in text and "4 days" in text


def test_status_codes():
    assert status_of(FAILED, 5, 47) == "5.4.7"
    assert status_of(FAILED, 0, 0) == "5.0.0"
    assert status_of(FAILED, 4, 46) == "5.4.6"       # a loop recorded with class 4 still fails
    assert status_of(DELAYED, 4, 0) == "4.0.0"
    assert status_of(DELIVERED, 0, 0) == "2.0.0"


def test_helpers():
    assert duration_words(1) == "1 second"
    assert duration_words(7200) == "2 hours"
    assert duration_words(86400) == "1 day"
    assert duration_words(90) == "1 minute"
    assert header_block(b"A: 1\nB: 2\n\nbody\n") == b"A: 1\nB: 2\n"
    assert header_block(b"A: 1\n") == b"A: 1\n"


def test_hostile_error_lines_stay_on_one_line():
    rcpts = [Recipient(dest="x@remote.test", esc_class=5, esc_code=0,
                       errorline="550 bad\r\nInjected: header")]
    data = build_report(report(recipients=rcpts), now=NOW, unique="u4")
    msg = parse(data)
    assert "Injected" not in msg
    assert dsn_groups(msg)[1]["Diagnostic-Code"] == "smtp; 550 bad Injected: header"


def test_unknown_kind_refused():
    with pytest.raises(ValueError):
        build_report(report(kind="bogus"), now=NOW, unique="u5")
