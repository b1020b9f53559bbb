"""Pure parts of the operations code: syslog(3) framing, the printable form of
untrusted log fields, sd_notify and LISTEN_FDS parsing (on real sockets)."""
from __future__ import annotations

import logging
import os
import socket
import time

import pytest

from common.log import syslog_line
from smtpd import sdnotify
from common.vis import log_text as vis
from smtpd.smtp_session import log_authentication


def test_syslog_line_is_glibc_syslog_format():
    now = time.mktime((2026, 3, 5, 9, 4, 7, 0, 0, -1))
    assert syslog_line(logging.INFO, "abc smtp connected", pid=42, now=now) == \
        b"<22>Mar  5 09:04:07 smtpd[42]: abc smtp connected"
    assert syslog_line(logging.WARNING, "warn: x", pid=1, now=now).startswith(b"<19>")  # LOG_ERR
    assert syslog_line(logging.ERROR, "x", pid=1, now=now).startswith(b"<19>")
    assert syslog_line(logging.DEBUG, "x", pid=1, now=now).startswith(b"<23>")
    assert syslog_line(logging.CRITICAL, "x", pid=1, now=now).startswith(b"<18>")
    assert len(syslog_line(logging.INFO, "x" * 20000, pid=1, now=now)) == 8000



def test_syslog_line_pid_and_stamp_are_current_after_a_fork_and_a_second():
    """The pid and the timestamp are cached (issue 12): a forked child still names
    itself, and the next second gets its own stamp."""
    now = time.mktime((2026, 3, 5, 9, 4, 7, 0, 0, -1))
    assert b" smtpd[%d]: " % os.getpid() in syslog_line(logging.INFO, "x", now=now)
    assert b"09:04:07" in syslog_line(logging.INFO, "x", now=now + 0.9)
    assert b"09:04:08" in syslog_line(logging.INFO, "x", now=now + 1.0)
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:
        os.write(writer, syslog_line(logging.INFO, "x", now=now))
        os._exit(0)
    os.close(writer)
    os.waitpid(child, 0)
    line = os.read(reader, 200)
    os.close(reader)
    assert b" smtpd[%d]: " % child in line

def test_vis_and_the_authentication_line(caplog):
    # strnvis(VIS_WHITE | VIS_SAFE), as smtp_session.c does for this line
    assert vis("a b\\c\t\xe9") == "a\\040b\\\\c\\^I\\M-C\\M-)"
    with caplog.at_level(logging.INFO, logger="smtpd"):
        log_authentication(0x1234, "bob smith", "permfail")
    assert caplog.messages == ["0000000000001234 smtp authentication user=bob\\040smith result=permfail"]


def test_notifier_path_and_abstract(tmp_path):
    path = str(tmp_path / "n.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    abstract.bind(f"\0pysmtpd-unit-{os.getpid()}")
    try:
        assert sdnotify.Notifier(path).ready("up")
        assert server.recv(100) == b"READY=1\nSTATUS=up"
        assert sdnotify.Notifier(f"@pysmtpd-unit-{os.getpid()}").stopping("bye")
        assert abstract.recv(100) == b"STOPPING=1\nSTATUS=bye"
        assert not sdnotify.Notifier("").ready("nobody listens")          # no socket: no-op
        missing = sdnotify.Notifier(str(tmp_path / "gone"))
        assert not missing.ready("x") and missing.failed == 1              # never raises
    finally:
        server.close()
        abstract.close()


def test_listen_fds_for_another_pid_or_none_are_ignored():
    env = {"LISTEN_FDS": "2", "LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDNAMES": "a:b"}
    assert sdnotify.inherited_sockets(env) == [] and env == {}
    assert sdnotify.inherited_sockets({}) == []
    with pytest.raises(sdnotify.ActivationError):
        sdnotify.inherited_sockets({"LISTEN_FDS": "x", "LISTEN_PID": "1"})


def test_listen_fds_taken_and_checked():
    saved = os.dup(3) if _fd_open(3) else None
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        os.dup2(s.fileno(), 3)
        env = {"LISTEN_FDS": "1", "LISTEN_PID": str(os.getpid()), "LISTEN_FDNAMES": "smtp"}
        got = sdnotify.inherited_sockets(env)
        assert len(got) == 1 and got[0].name == "smtp" and got[0].address()[1:] == s.getsockname()
        got[0].sock.detach()
        # not listening: refused with a reason systemd users understand
        u = socket.socket()
        os.dup2(u.fileno(), 3)
        with pytest.raises(sdnotify.ActivationError, match="not listening"):
            sdnotify.inherited_sockets({"LISTEN_FDS": "1", "LISTEN_PID": str(os.getpid())})
        u.close()
    finally:
        s.close()
        if saved is not None:
            os.dup2(saved, 3)
            os.close(saved)
        else:
            os.close(3)


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False
