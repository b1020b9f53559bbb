"""sendmail's command line and message handling (common/submission.py), and what the
client writes to offline/ as the parent reads it back (smtpd/offline.py)."""
from __future__ import annotations

import os
import pwd
import stat

import pytest

from common import submission
from common.submission import UsageError, parse_args
from smtpctl import sendmail
from smtpd.offline import OfflineError, read_file


def test_options_as_enqueue_getopt():
    opts = parse_args(["-t", "-i", "-f", "<me@x.test>", "-F", "Me Myself", "-N", "SUCCESS,FAILURE",
                       "-R", "HDRS", "-V", "env1", "-oi", "-oem", "-L", "tag", "-v", "a@x.test"])
    assert opts.by_headers and opts.verbose and opts.sender == "<me@x.test>"
    assert opts.fullname == "Me Myself" and opts.dsn_notify == "SUCCESS,FAILURE"
    assert (opts.dsn_ret, opts.dsn_envid, opts.recipients) == ("HDRS", "env1", ["a@x.test"])
    # glued values, grouped flags, options after recipients (glibc permutes), --
    opts = parse_args(["a@x.test", "-ti", "-fme", "--", "-b@x.test"])
    assert opts.by_headers and opts.sender == "me" and opts.recipients == ["a@x.test", "-b@x.test"]
    assert parse_args(["-tf", "x@y"]).sender == "x@y"
    assert [parse_args([f"-b{m}"]).mode for m in "spimd"] == ["smtp", "mailq", "newaliases", "deliver", "deliver"]
    assert parse_args(["-q"]).queue_run and parse_args(["-E", "-J"]).recipients == []


def test_bad_options():
    with pytest.raises(UsageError, match="invalid option -- 'k'"):
        parse_args(["-k"])
    with pytest.raises(UsageError, match="requires an argument -- 'f'"):
        parse_args(["-f"])
    with pytest.raises(UsageError, match="leading <"):
        submission.qualify("<a@b", "mx.test")


def test_recipients_from_headers_and_bcc_removed():
    message = (b"From: me@x.test\nTo: A <a@x.test>, b@x.test\nCc: \"Doe, J\" <c@x.test>\n"
               b"Bcc: hidden@x.test,\n  also@x.test\nSubject: s\n\nbody\nBcc: body@x.test\n")
    rcpts, out = submission.header_recipients(message)
    assert rcpts == ["a@x.test", "b@x.test", "c@x.test", "hidden@x.test", "also@x.test"]
    assert b"hidden" not in out and b"also@x.test" not in out and out.endswith(b"\n\nbody\nBcc: body@x.test\n")
    assert out.startswith(b"From: me@x.test\nTo: A <a@x.test>, b@x.test\nCc: ")
    assert submission.split_recipients(["a@x, b@x", "c"]) == ["a@x", "b@x", "c"]


def test_headers_completed_as_enqueue_does():
    assert submission.complete_headers(b"Subject: s\n\nbody\n", "u@mx.test", "U Ser") == \
        b"From: U Ser <u@mx.test>\nSubject: s\n\nbody\n"
    assert submission.complete_headers(b"From: other@x\n\nbody\n", "u@mx.test", "U") == b"From: other@x\n\nbody\n"
    # no header at all: all of it is body, after an empty line
    assert submission.complete_headers(b"just text\nmore\n", "u@mx.test", "") == \
        b"From: <u@mx.test>\n\njust text\nmore\n"
    assert submission.complete_headers(b"Hello: world\n", "u@mx.test", "") == b"From: <u@mx.test>\n\nHello: world\n"
    assert submission.drop_envelope_lines(b"From u Thu Dec  3\nReturn-Path: <x>\nSubject: s\n\nFrom me\n") == \
        b"Subject: s\n\nFrom me\n"
    assert submission.gecos_name("& Doe,Room 1,,", "jane") == "Jane Doe"
    assert submission.gecos_name("", "jane") == ""
    # a full name cannot add a header field
    assert submission.from_header("u@x", "Evil\nBcc: x@y") == b'From: "Evil Bcc: x@y" <u@x>\n'


def test_prepare_needs_a_recipient():
    with pytest.raises(sendmail.SendmailError, match="no recipients") as exc:
        sendmail.prepare(parse_args(["-t"]), b"Subject: s\r\n\r\nbody\r\n")
    assert exc.value.status == sendmail.EX_SOFTWARE
    rcpts, message = sendmail.prepare(parse_args(["-t", "x@y"]), b"To: a@b\r\nBcc: c@d\r\n\r\nbody\r\n")
    assert rcpts == ["x@y", "a@b", "c@d"] and message == b"To: a@b\n\nbody\n"


def test_offline_file_written_and_read_back(tmp_path):
    (tmp_path / "offline").mkdir()
    message = b"To: a@x.test\nBcc: b@x.test\nSubject: s\n\nbody\n"
    path = sendmail.write_offline(tmp_path, ["-t", "-F", "Full Name", "c@x.test"], message, now=1700000000)
    st = path.lstat()
    assert path.name.startswith("1700000000.") and len(path.name) == 21
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid()
    assert path.read_bytes() == b"-t|-F|Full Name|c@x.test\n" + message
    msg = read_file(path, "mx.test", 10_000)
    login = pwd.getpwuid(os.getuid()).pw_name
    assert msg.sender == f"{login}@mx.test" and msg.uid == os.getuid()
    assert msg.recipients == ["c@x.test", "a@x.test", "b@x.test"]
    assert msg.data == b"From: Full Name <" + f"{login}@mx.test".encode() + b">\nTo: a@x.test\nSubject: s\n\nbody\n"
    with pytest.raises(sendmail.SendmailError, match="illegal character"):
        sendmail.write_offline(tmp_path, ["-f", "a|b"], message)


def test_offline_dsn_options_checked(tmp_path):
    (tmp_path / "offline").mkdir()
    path = sendmail.write_offline(tmp_path, ["-N", "SUCCESS", "-R", "hdrs", "-V", "id+2B1", "a@x"], b"\nx\n")
    assert read_file(path, "mx.test", 10_000).dsn == {"dsn_ret": "HDRS", "dsn_envid": "id+2B1", "dsn_notify": 1}
    bad = sendmail.write_offline(tmp_path, ["-N", "SOMETIMES", "a@x"], b"\nx\n")
    with pytest.raises(OfflineError, match="501 5.5.4"):
        read_file(bad, "mx.test", 10_000)
