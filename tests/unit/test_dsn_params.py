"""RFC 3461 parameters (smtpd/dsn_params.py) and the bounce rules of the queue
(smtpd/queue_bounce.py), without processes."""
from __future__ import annotations

import pytest

from common.envelope import DSN_DELAY, DSN_FAILURE, DSN_NEVER, DSN_SUCCESS, Envelope
from smtpd.dsn_params import (
    RcptDsn, mail_params, parse_mail_options, parse_rcpt_options, rcpt_params, split_dsn,
    valid_xtext, xtext_decode,
)
from smtpd.queue_bounce import BOUNCE_TTL, bounce_envelope, skip_reason


def test_split_keeps_case_and_other_parameters():
    assert split_dsn(" SIZE=10 ret=hdrs ENVID=Ab+2Bc BODY=8BITMIME") == (
        "SIZE=10 BODY=8BITMIME", ["ret=hdrs", "ENVID=Ab+2Bc"])


def test_mail_options():
    assert parse_mail_options(["ret=full", "ENVID=Ab+2Bc"]) == ("FULL", "Ab+2Bc")
    assert parse_mail_options([]) == ("", "")
    for bad in (["RET=ALL"], ["RET=FULL", "RET=HDRS"], ["ENVID=a=b"], ["ENVID=" + "x" * 101], ["ENVID="]):
        assert parse_mail_options(bad).startswith("501 5.5.4 "), bad


def test_rcpt_options():
    assert parse_rcpt_options(["NOTIFY=success,Delay", "ORCPT=RFC822;a+2Bb@c.test"]) == RcptDsn(
        DSN_SUCCESS | DSN_DELAY, "rfc822;a+2Bb@c.test")
    assert parse_rcpt_options(["NOTIFY=NEVER"]).notify == DSN_NEVER
    for bad in (["NOTIFY=NEVER,FAILURE"], ["NOTIFY=SOMETIMES"], ["NOTIFY="], ["ORCPT=rfc822"],
                ["ORCPT=rfc822;a b"], ["NOTIFY=FAILURE", "NOTIFY=DELAY"]):
        assert parse_rcpt_options(bad).startswith("501 5.5.4 "), bad


def test_written_back_for_the_next_hop():
    assert mail_params("HDRS", "E+2B1") == "RET=HDRS ENVID=E+2B1"
    assert mail_params("", "") == ""
    assert rcpt_params(DSN_SUCCESS | DSN_FAILURE, "rfc822;x@y") == "NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x@y"
    assert rcpt_params(DSN_NEVER, "") == "NOTIFY=NEVER"
    assert rcpt_params(0, "") == ""


def test_xtext():
    assert valid_xtext("a+2Bb") and not valid_xtext("a+2bb") and not valid_xtext("a b")
    assert xtext_decode("a+2Bb+3D") == "a+b="


def env(**kw) -> Envelope:
    base = dict(id=0x1234567800000001, dispatcher="local", type="mda", sender="s@example.test",
                rcpt="r@example.test", dest="r@example.test", ctime=100, retry=3, mda_user="r")
    base.update(kw)
    return Envelope(**base)


@pytest.mark.parametrize("kw,kind,why", [
    ({}, "failed", ""),
    ({}, "delayed", ""),
    ({}, "delivered", "no NOTIFY=SUCCESS"),
    ({"dsn_notify": DSN_SUCCESS}, "delivered", ""),
    ({"dsn_notify": DSN_SUCCESS}, "failed", "NOTIFY without failed"),
    ({"dsn_notify": DSN_FAILURE}, "delayed", "NOTIFY without delayed"),
    ({"dsn_notify": DSN_NEVER}, "failed", "NOTIFY=NEVER"),
    ({"sender": ""}, "failed", "no return path"),
    ({"type": "bounce"}, "failed", "double bounce"),
    ({"flags": ["bounce"]}, "failed", "double bounce"),
])
def test_when_a_notice_goes_out(kw, kind, why):
    assert skip_reason(env(**kw), kind) == why


def test_bounce_envelope_is_a_fresh_copy_in_the_same_message():
    orig = env(errorline="old", flags=["internal"])
    b = bounce_envelope(orig, "failed", now=500, errorline="550 no", esc_class=5, esc_code=11, ttl=3600)
    assert b.msgid == orig.msgid and b.type == "bounce" and b.bounce_type == "failed"
    assert (b.ctime, b.ttl, b.retry, b.bounce_ttl, b.bounce_delay) == (500, BOUNCE_TTL, 0, 3600, 0)
    assert (b.errorline, b.esc_class, b.esc_code) == ("550 no", 5, 11)
    assert (orig.type, orig.errorline, orig.retry) == ("mda", "old", 3)      # untouched
    assert bounce_envelope(orig, "delayed", now=1, errorline="", esc_class=4, esc_code=0,
                           delay=7200).bounce_delay == 7200
