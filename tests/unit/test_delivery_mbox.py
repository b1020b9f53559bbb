"""mbox writing as mail.local does it: From_ line, >From quoting, locks, refusals."""
from __future__ import annotations

import fcntl
import os
import time

import pytest

from smtpd import delivery_mbox
from tests.unit.delivery_helpers import body
from smtpd.delivery_mbox import DeliveryFailure, append_mbox, from_line, prepare_mailbox, quoted


def test_quoting_follows_mail_local():
    text = b"From first\nSubject: x\n\nFrom here\nnot From\nFrom again\n\n\nFrom last"
    out = b"".join(quoted([text[:7], text[7:20], text[20:]]))       # split mid-line on purpose
    assert out == (b">From first\nSubject: x\n\n>From here\nnot From\nFrom again\n\n\n>From last\n\n")


def test_from_line_is_one_line_whatever_the_sender():
    assert from_line("", 0).startswith(b"From MAILER-DAEMON ")
    line = from_line("a b\r\nc@x", 0)
    assert line.count(b"\n") == 1 and line.startswith(b"From a_b__c@x ")


def test_append_twice_with_dot_lock_released(tmp_path):
    box = tmp_path / "alice"
    append_mbox(str(box), body(b"Subject: 1\n\nFrom me\n", b"Delivered-To: a@x\n"), "s@x")
    append_mbox(str(box), body(b"Subject: 2\n\nno newline at end"), "")
    text = box.read_bytes()
    assert text.startswith(b"From s@x ")
    assert b"Delivered-To: a@x\nSubject: 1\n\n>From me\n\nFrom MAILER-DAEMON " in text
    assert text.endswith(b"Subject: 2\n\nno newline at end\n\n")
    assert not (tmp_path / "alice.lock").exists()
    assert box.stat().st_mode & 0o777 == 0o600


def test_a_held_dot_lock_is_a_tempfail(tmp_path, monkeypatch):
    monkeypatch.setattr(delivery_mbox, "LOCK_TRIES", 2)
    monkeypatch.setattr(delivery_mbox, "LOCK_FIRST_WAIT", 0.01)
    (tmp_path / "alice.lock").write_text("")
    with pytest.raises(DeliveryFailure) as err:
        append_mbox(str(tmp_path / "alice"), body(b"x\n"), "s@x")
    assert err.value.temporary and "locked" in err.value.text
    assert (tmp_path / "alice.lock").exists()            # someone else's: left alone


def test_a_held_fcntl_lock_is_a_tempfail(tmp_path, monkeypatch):
    monkeypatch.setattr(delivery_mbox, "LOCK_TRIES", 2)
    monkeypatch.setattr(delivery_mbox, "LOCK_FIRST_WAIT", 0.01)
    box = tmp_path / "alice"
    box.write_bytes(b"")
    os.chmod(box, 0o600)
    pid = os.fork()
    if pid == 0:                                 # another process holds the lock
        fd = os.open(box, os.O_WRONLY)
        fcntl.lockf(fd, fcntl.LOCK_EX)
        time.sleep(2)
        os._exit(0)
    try:
        time.sleep(0.3)
        with pytest.raises(DeliveryFailure) as err:
            append_mbox(str(box), body(b"x\n"), "s@x")
        assert err.value.temporary and "lock" in err.value.text
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    assert box.read_bytes() == b""


def test_symlink_and_hard_link_refused(tmp_path):
    target = tmp_path / "target"
    target.write_bytes(b"")
    (tmp_path / "sym").symlink_to(target)
    os.link(target, tmp_path / "hard")
    for name in ("sym", "hard"):
        with pytest.raises(DeliveryFailure) as err:
            append_mbox(str(tmp_path / name), body(b"x\n"), "s@x", dotlock=False)
        assert not err.value.temporary
    assert target.read_bytes() == b""


def test_prepare_mailbox_creates_once_and_refuses_bad_names(tmp_path):
    prepare_mailbox(str(tmp_path), "alice", os.getuid(), os.getgid())
    (tmp_path / "alice").write_bytes(b"kept")
    prepare_mailbox(str(tmp_path), "alice", os.getuid(), os.getgid())
    assert (tmp_path / "alice").read_bytes() == b"kept"
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    prepare_mailbox(str(tmp_path), "link", 0, 0)             # exists (as a link): not followed
    assert not (tmp_path / "elsewhere").exists()
    for bad in ("", "..", "a/b", ".hidden"):
        with pytest.raises(DeliveryFailure):
            prepare_mailbox(str(tmp_path), bad, 0, 0)


def test_write_error_truncates_back(tmp_path, monkeypatch):
    box = tmp_path / "alice"
    append_mbox(str(box), body(b"first\n"), "s@x")
    before = box.read_bytes()
    real = delivery_mbox._write_all
    calls = []

    def failing(fd, data):
        calls.append(data)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(fd, data)
    monkeypatch.setattr(delivery_mbox, "_write_all", failing)
    with pytest.raises(DeliveryFailure) as err:
        append_mbox(str(box), body(b"second\n"), "s@x")
    assert err.value.temporary
    assert box.read_bytes() == before
