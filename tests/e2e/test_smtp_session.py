"""Inbound SMTP against the real daemon, as issue 8 found it: what a new user tried and
what an abuser does (OpenSMTPD 6.8's replies, sessions that end cleanly, limits)."""
from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
from pathlib import Path

from smtpd.config import default_hostname
from tests.conftest import free_port, wait_for
from tests.e2e.helpers import config, maildir_messages
from tests.e2e.test_smtp_protocol import Client


def incoming(d) -> list[str]:
    path = Path(d.spool) / "incoming"
    return sorted(os.listdir(path)) if path.is_dir() else []


def closed(c: Client, timeout: float = 10) -> bool:
    """The server closed the connection (recv gives EOF) within ``timeout``."""
    c.sock.settimeout(timeout)
    try:
        while True:
            data = c.sock.recv(65536)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def greeted(make_daemon, tmp_path, extra: str = ""):
    """A daemon, and a client that has its banner and said EHLO: (daemon, client, port)."""
    port = free_port()
    d = make_daemon(config(tmp_path / "d", port, extra=extra)).start()
    c = Client(port)
    c.reply()
    c.cmd("EHLO client.test")
    return d, c, port


def transaction(c: Client, rcpt: str = "alice@example.test") -> None:
    assert c.cmd("MAIL FROM:<a@remote.test>")[0] == "250 2.0.0 Ok"
    assert c.cmd(f"RCPT TO:<{rcpt}>")[0].startswith("250 ")
    assert c.cmd("DATA")[0].startswith("354 ")


def test_replies_a_new_user_meets(make_daemon, tmp_path):
    """The banner names the host (getmailname()), VRFY and SMTPUTF8 as OpenSMTPD 6.8."""
    port = free_port()
    d = make_daemon(config(tmp_path / "d", port)).start()
    c = Client(port)
    banner = c.reply()[0]
    name = default_hostname()
    assert banner == f"220 {name} ESMTP pysmtpd"
    if socket.gethostname() not in ("", "localhost"):
        assert name != "localhost"
    c.cmd("EHLO client.test")
    assert c.cmd("VRFY root")[0] == "500 5.5.1 Invalid command: Command unrecognized"
    assert c.cmd("MAIL FROM:<a@remote.test> SMTPUTF8")[0] == \
        "503 5.5.4 Invalid command arguments: Unsupported option SMTPUTF8"
    assert c.cmd("MAIL FROM:bogus")[0] == "553 5.1.0 Sender address syntax error"
    assert c.cmd("DATA")[0] == "503 5.5.1 Invalid command: Command not allowed at this point."
    c.cmd("QUIT")
    log = d.wait_log('result="503 5.5.1 Invalid command: Command not allowed at this point."')
    for command in ("VRFY root", "MAIL FROM:<a@remote.test> SMTPUTF8", "MAIL FROM:bogus", "DATA"):
        assert f'failed-command command="{command}" result=' in log, command


def test_control_bytes_never_reach_the_log_raw(make_daemon, tmp_path):
    d, c, port = greeted(make_daemon, tmp_path)
    c.sock.sendall(b"MAIL FROM:<a\x1b[31m\rx\x00@remote.test>\r\n")
    assert c.reply()[0] == "553 5.1.0 Sender address syntax error"
    c.cmd("QUIT")
    log = d.wait_log("Sender address syntax error")
    line = next(l for l in log.splitlines() if "Sender address syntax error" in l)
    assert "\x1b" not in log and "\x00" not in log
    assert line.endswith(r'command="MAIL FROM:<a\^[[31m\rx" result="553 5.1.0 Sender address syntax error"'), line


def test_a_fault_of_the_queue_is_a_temporary_failure(make_daemon, tmp_path):
    """The queue cannot write a recipient's envelope (its incoming/ is gone): 451 4.3.0
    at once, the cause in the log, and the daemon goes on.  (MAIL FROM costs the spool
    nothing: the message's directory is made with its first envelope, docs/spool.md.)"""
    port = free_port()
    d = make_daemon(config(tmp_path / "d", port)).start()
    spool_incoming = Path(d.spool) / "incoming"
    aside = Path(d.spool) / "incoming.aside"
    c = Client(port)
    c.reply()
    c.cmd("EHLO client.test")
    spool_incoming.rename(aside)
    spool_incoming.write_text("not a directory\n")
    try:
        assert c.cmd("MAIL FROM:<a@remote.test>")[0] == "250 2.0.0 Ok"
        started = time.monotonic()
        assert c.cmd("RCPT TO:<alice@example.test>")[0] == "451 4.3.0 Temporary failure"
        assert time.monotonic() - started < 10
    finally:
        spool_incoming.unlink()
        aside.rename(spool_incoming)
    log = d.wait_log("cannot write envelope of")
    assert 'failed-command command="RCPT TO:<alice@example.test>" result="451 4.3.0 Temporary failure"' in log
    # the session and the daemon go on
    assert c.cmd("RSET")[0] == "250 2.0.0 Reset state"
    assert c.cmd("MAIL FROM:<a@remote.test>")[0] == "250 2.0.0 Ok"
    assert c.cmd("RCPT TO:<alice@example.test>")[0].startswith("250 ")


def test_refused_data_resets_and_aborted_sessions_leave_no_file(make_daemon, tmp_path):
    d, c, port = greeted(make_daemon, tmp_path, extra='smtp max-message-size 10K')
    transaction(c)
    c.sock.sendall(b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 20 + b".\r\n")
    assert c.reply()[0].startswith("554 5.3.4 ")
    wait_for(lambda: incoming(d) == [], 10, "the refused message gone from incoming/")
    transaction(c)              # no RSET needed
    # a session that gives up in the middle of its message
    c.sock.sendall(b"Subject: half\r\n\r\nsome of it\r\n")
    time.sleep(0.5)
    assert incoming(d) != []
    c.sock.close()
    wait_for(lambda: incoming(d) == [], 10, "the aborted message gone from incoming/")


def test_a_client_that_leaves_while_the_queue_is_stalled_leaves_nothing(make_daemon, tmp_path):
    port = free_port()
    d = make_daemon(config(tmp_path / "d", port)).start()
    queue = d.children()["smtpd: queue"]
    c = Client(port)
    c.reply()
    c.cmd("EHLO client.test")
    os.kill(queue, signal.SIGSTOP)
    try:
        c.sock.sendall(b"MAIL FROM:<a@remote.test>\r\n")
        time.sleep(0.5)
        c.sock.close()
        time.sleep(0.5)
    finally:
        os.kill(queue, signal.SIGCONT)
    d.wait_log("smtp disconnected")
    wait_for(lambda: incoming(d) == [], 15, "no message left in incoming/")
    time.sleep(1)
    assert incoming(d) == []


def test_identical_recipients_are_delivered_once(make_daemon, tmp_path):
    d, c, port = greeted(make_daemon, tmp_path)
    c.cmd("MAIL FROM:<a@remote.test>")
    c.sock.sendall(b"RCPT TO:<alice@example.test>\r\n" * 100)
    for _ in range(100):
        assert c.reply()[0] == "250 2.1.5 Destination address valid: Recipient ok"
    assert c.cmd("DATA")[0].startswith("354")
    c.sock.sendall(b"Subject: once\r\n\r\nhello\r\n.\r\n")
    assert c.reply()[0].startswith("250 2.0.0 ")
    c.cmd("QUIT")
    wait_for(lambda: maildir_messages(tmp_path / "d", "alice"), 20, "delivery")
    time.sleep(1)
    assert len(maildir_messages(tmp_path / "d", "alice")) == 1
    assert len(re.findall(r"smtp envelope evpid=", d.log())) == 1


def test_timeouts_count_from_the_last_bytes_received(make_daemon, tmp_path):
    port = free_port()
    d = make_daemon(config(tmp_path / "d", port,
                           extra="smtp limit command-timeout 2s data-timeout 2s")).start()
    # a slow sender still sending its message is not cut
    c = Client(port)
    c.reply()
    c.cmd("EHLO client.test")
    transaction(c)
    for i in range(5):
        c.sock.sendall(b"line %d\r\n" % i)
        time.sleep(1)
    c.sock.sendall(b".\r\n")
    assert c.reply()[0].startswith("250 2.0.0 ")
    # an idle one is
    idle = Client(port)
    idle.reply()
    started = time.monotonic()
    assert closed(idle, 10)
    assert 1.5 < time.monotonic() - started < 6
    d.wait_log("smtp disconnected reason=timeout")


def test_session_limits_refuse_with_421_and_close(make_daemon, tmp_path):
    port = free_port()
    d = make_daemon(config(tmp_path / "d", port, extra="smtp limit max-sessions-per-address 3")).start()
    held = [Client(port) for _ in range(3)]
    for c in held:
        assert c.reply()[0].startswith("220 ")
    extra = Client(port)
    assert extra.reply() == ["421 4.7.0 Too many sessions, try again later"]
    assert closed(extra)
    d.wait_log("session limit per address reached (3)")
    held[0].cmd("QUIT")
    wait_for(lambda: d.log().count("smtp disconnected") >= 1, 10, "a session ended")
    time.sleep(0.3)
    again = Client(port)
    assert again.reply()[0].startswith("220 ")


def rss_peak(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1)) * 1024


def test_twenty_30mb_messages_at_once_keep_pony_small(make_daemon, tmp_path):
    """The body streams to the queue as it comes: pony (and the parent) never hold
    whole messages, whatever their number."""
    port = free_port()
    d = make_daemon(config(tmp_path / "d", port)).start()
    assert d.smtpctl("pause", "mda").returncode == 0        # measure receiving only
    pony = d.children()["smtpd: pony"]
    line = b"z" * 998 + b"\r\n"
    body = b"Subject: big\r\n\r\n" + line * (30 * 1024 * 1024 // len(line)) + b".\r\n"
    results: list[str] = []

    def send_one() -> None:
        c = Client(port)
        c.sock.settimeout(300)
        c.reply()
        c.cmd("EHLO client.test")
        transaction(c)
        c.sock.sendall(body)
        results.append(c.reply()[0])
        c.cmd("QUIT")

    threads = [threading.Thread(target=send_one) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert len(results) == 20 and all(r.startswith("250 2.0.0 ") for r in results), results
    peak = rss_peak(pony)
    assert peak < 150 * 1024 * 1024, f"pony peaked at {peak // 2**20} MB"
    parent = rss_peak(d.proc.pid)
    print(f"peak RSS: pony {peak / 2**20:.0f} MB, parent {parent / 2**20:.0f} MB")
    assert parent < 150 * 1024 * 1024, f"the parent peaked at {parent // 2**20} MB"


def test_long_lines(make_daemon, tmp_path):
    """A 100 KB line in a message is content (the body streams); a 64 KiB command line
    ends the session, as OpenSMTPD, logged as bad input."""
    d, c, port = greeted(make_daemon, tmp_path)
    transaction(c)
    c.sock.sendall(b"Subject: long\r\n\r\n" + b"w" * 100_000 + b"\r\n.\r\n")
    assert c.reply()[0].startswith("250 2.0.0 ")
    assert c.cmd("MAIL FROM:<a@remote.test>")[0] == "250 2.0.0 Ok"
    c.sock.sendall(b"NOOP " + b"v" * 70_000 + b"\r\n")
    assert c.reply() == ["500 5.0.0 Line too long"]
    assert closed(c)
    d.wait_log('bad-input result="500 5.0.0 Line too long"')
    msgs = wait_for(lambda: maildir_messages(tmp_path / "d", "alice"), 20, "delivery")
    assert b"w" * 100_000 in msgs[0]
    wait_for(lambda: incoming(d) == [], 10, "the open transaction rolled back")
