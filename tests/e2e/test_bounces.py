"""Bounces end to end: permanent failures, expiry, loops and offline enqueue, with the
notice checked where the sender reads it (a local Maildir)."""
from __future__ import annotations

import os
import pwd
import smtplib
from pathlib import Path


from tests.conftest import free_port, wait_for
from tests.e2e.helpers import config, maildir_messages, send
from tests.e2e.dsn_report import one_notice, report_groups
from tests.e2e.sink import Sink


def test_refused_recipients_bounce_in_one_report(make_daemon, tmp_path):
    sink_port, port = free_port(), free_port()
    sink = Sink(sink_port).start()
    sink.handler.reject_rcpt = {"x@remote.test": "550 5.1.1 No such user here",
                                "y@remote.test": "550 5.1.1 Unknown mailbox"}
    try:
        d = make_daemon(config(tmp_path / "d", port, relay=f"smtp://127.0.0.1:{sink_port}")).start()
        send(port, "alice@example.test", ["x@remote.test", "y@remote.test"],
             "Subject: will bounce\nFrom: alice@example.test\n\nbody text\n")
        msg = one_notice(tmp_path / "d", "alice")
        assert msg["Delivered-To"] == "alice@example.test"
        assert msg["From"].addresses[0].addr_spec.startswith("MAILER-DAEMON@")
        assert msg["To"] == "alice@example.test"
        assert msg["Subject"] == "Delivery status notification: failed"
        assert msg["Auto-Submitted"] == "auto-replied"
        groups = report_groups(msg)
        assert groups[0]["Reporting-MTA"].startswith("dns; ")
        rcpts = {g["Final-Recipient"]: g for g in groups[1:]}
        assert set(rcpts) == {"rfc822;x@remote.test", "rfc822;y@remote.test"}
        assert all(g["Action"] == "failed" and g["Status"] == "5.1.1" for g in rcpts.values())
        assert "No such user here" in rcpts["rfc822;x@remote.test"]["Diagnostic-Code"]
        headers = msg.get_payload()[2]
        assert headers.get_content_type() == "text/rfc822-headers"
        assert "Subject: will bounce" in headers.as_string()
        assert "body text" not in msg.as_string()
        log = d.wait_log("bounce delivery evpid=")
        assert "result=Ok" in log
        wait_for(lambda: d.queue_lines() == [], 20, "the queue to be empty")
        assert len(sink.transactions) == 0
        stats = d.smtpctl("show", "stats").stdout
        assert "queue.bounce=2" in stats      # one bounce envelope per recipient
    finally:
        sink.stop()


def test_null_sender_failure_never_bounces(make_daemon, tmp_path):
    sink_port, port = free_port(), free_port()
    sink = Sink(sink_port).start()
    sink.handler.reject_rcpt = {"x@remote.test": "550 5.1.1 No such user here"}
    try:
        d = make_daemon(config(tmp_path / "d", port, relay=f"smtp://127.0.0.1:{sink_port}")).start()
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.ehlo("client.test")
            assert s.mail("<>")[0] == 250
            assert s.rcpt("x@remote.test")[0] == 250
            assert s.data(b"Subject: a bounce itself\r\n\r\nbody\r\n")[0] == 250
        d.wait_log('result="PermFail"')
        wait_for(lambda: d.queue_lines() == [], 20, "the queue to be empty")
        assert "queue: bounce evpid=" not in d.log_since_start()
        assert maildir_messages(tmp_path / "d", "alice") == []
    finally:
        sink.stop()


def test_expired_envelope_bounces(make_daemon, tmp_path):
    dead, port = free_port(), free_port()
    conf = config(tmp_path / "d", port).replace(
        'action "local"', f'action "outbound" relay host "smtp://127.0.0.1:{dead}" ttl 3s\naction "local"', 1)
    conf += 'match from local for any action "outbound"\n'
    d = make_daemon(conf).start()
    send(port, "alice@example.test", ["far@remote.test"], "Subject: never arrives\n\nbody\n")
    msg = one_notice(tmp_path / "d", "alice")
    assert msg["Subject"] == "Delivery status notification: failed"
    rcpt = report_groups(msg)[1]
    assert rcpt["Final-Recipient"] == "rfc822;far@remote.test"
    assert rcpt["Status"] == "5.4.7"
    assert "Envelope expired" in rcpt["Diagnostic-Code"]
    log = d.log_since_start()
    assert "Expire for " in log and "stat=Envelope expired" in log
    wait_for(lambda: d.queue_lines() == [], 20, "the queue to be empty")


def test_too_many_received_headers_refused(make_daemon, tmp_path):
    port = free_port()
    d = make_daemon(config(tmp_path / "d", port)).start()
    hops = "".join(f"Received: from hop{i}.test by hop{i + 1}.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
                   for i in range(100))
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.test")
        s.mail("bob@example.test")
        s.rcpt("alice@example.test")
        code, text = s.data((hops + "Subject: looping\r\n\r\nbody\r\n").encode())
    assert (code, text) == (500, b"5.4.6 Routing loop detected: Loop detected")
    # 99 hops still pass
    send(port, "bob@example.test", ["alice@example.test"],
         "".join(f"Received: from hop{i}.test; x\n" for i in range(99)) + "Subject: ok\n\nbody\n")
    wait_for(lambda: maildir_messages(tmp_path / "d", "alice"), 20, "the 99-hop message")
    assert "queue: bounce" not in d.log_since_start()


def test_delivered_to_loop_bounces_with_loop_report(make_daemon, tmp_path):
    port = free_port()
    d = make_daemon(config(tmp_path / "d", port)).start()
    send(port, "bob@example.test", ["alice@example.test"],
         "Delivered-To: alice@example.test\nSubject: seen before\n\nbody\n")
    msg = one_notice(tmp_path / "d", "bob")
    assert maildir_messages(tmp_path / "d", "alice") == []
    rcpt = report_groups(msg)[1]
    assert rcpt["Final-Recipient"] == "rfc822;alice@example.test"
    assert rcpt["Action"] == "failed" and rcpt["Status"] == "5.4.6"
    assert "Loop detected" in rcpt["Diagnostic-Code"]
    assert "result=PermFail stat=Loop detected" in d.log_since_start()
    wait_for(lambda: d.queue_lines() == [], 20, "the queue to be empty")


def test_bounce_to_unknown_local_sender_is_dropped(make_daemon, tmp_path):
    """A notice that cannot be delivered is dropped and logged, never bounced."""
    sink_port, port = free_port(), free_port()
    sink = Sink(sink_port).start()
    sink.handler.reject_rcpt = {"x@remote.test": "550 5.1.1 No such user here"}
    try:
        d = make_daemon(config(tmp_path / "d", port, relay=f"smtp://127.0.0.1:{sink_port}")).start()
        send(port, "nobody-here@example.test", ["x@remote.test"], "Subject: s\n\nbody\n")
        log = d.wait_log("bounce to <nobody-here@example.test> refused, dropped", timeout=30)
        assert "550 5.1.1 Invalid recipient" in log
        wait_for(lambda: d.queue_lines() == [], 20, "the queue to be empty")
        assert log.count("queue: bounce evpid=") == 1
    finally:
        sink.stop()


def _offline_file(spool: Path, name: str, argv: list[str], message: str, owner: str) -> Path:
    offline = spool / "offline"
    offline.mkdir(parents=True, exist_ok=True)
    path = offline / name
    path.write_text("|".join(argv) + "\n" + message)
    os.chmod(path, 0o600)
    if os.getuid() == 0:
        pw = pwd.getpwnam(owner)
        os.chown(path, pw.pw_uid, pw.pw_gid)
    return path


def test_offline_file_enqueued_at_start(make_daemon, tmp_path):
    port = free_port()
    d = make_daemon(config(tmp_path / "d", port))
    owner = "nobody" if os.getuid() == 0 else pwd.getpwuid(os.getuid()).pw_name
    good = _offline_file(d.spool, "1700000000.AAAAAAAAAA", ["-f", "bob@example.test", "--", "alice@example.test"],
                         "Subject: written while down\n\nfrom the offline queue\n", owner)
    headers_t = _offline_file(d.spool, "1700000001.BBBBBBBBBB", ["-t", "-oi"],
                              "To: Alice <alice@example.test>\nSubject: by headers\n\nbody\n", owner)
    bad = _offline_file(d.spool, "1700000002.CCCCCCCCCC", ["-f", "bob@example.test"],
                        "Subject: no recipient\n\nbody\n", owner)
    link = d.spool / "offline" / "1700000003.DDDDDDDDDD"
    link.symlink_to(good)
    d.start()
    msgs = wait_for(lambda: len(maildir_messages(tmp_path / "d", "alice")) >= 2 and
                    maildir_messages(tmp_path / "d", "alice"), 30, "the offline messages")
    assert len(msgs) == 2
    texts = sorted(m.decode() for m in msgs)
    by_subject = {("written" if "written while down" in t else "headers"): t for t in texts}
    assert by_subject["written"].startswith("Return-Path: <bob@example.test>\n")
    assert "from the offline queue" in by_subject["written"]
    host_sender = f"Return-Path: <{owner}@"
    assert by_subject["headers"].startswith(host_sender)
    wait_for(lambda: not good.exists() and not headers_t.exists(), 10, "the enqueued files to be removed")
    assert bad.exists(), "a file that cannot be enqueued is kept"
    assert link.is_symlink(), "a symlink is never followed nor removed"
    log = d.log_since_start()
    assert "couldn't enqueue offline message" in log and "CCCCCCCCCC" in log
    assert "DDDDDDDDDD" in log


def test_delay_notice_while_the_relay_is_down(make_daemon, tmp_path):
    dead, port = free_port(), free_port()
    d = make_daemon(config(tmp_path / "d", port, relay=f"smtp://127.0.0.1:{dead}",
                           extra="bounce warn-interval 2s")).start()
    send(port, "alice@example.test", ["far@remote.test"], "Subject: slow one\n\nbody\n")
    msg = one_notice(tmp_path / "d", "alice")
    assert msg["Subject"] == "Delivery status notification: delayed"
    rcpt = report_groups(msg)[1]
    assert rcpt["Final-Recipient"] == "rfc822;far@remote.test"
    assert rcpt["Action"] == "delayed" and rcpt["Status"].startswith("4.")
    assert "2 seconds" in msg.get_payload()[0].get_content()
    # the original stays queued, and remembers that this interval was notified
    lines = wait_for(lambda: len(d.queue_lines()) == 1 and d.queue_lines(), 20,
                     "only the original left in the queue")
    assert "far@remote.test" in lines[0]
    envs = wait_for(lambda: [p for p in (d.spool / "queue").glob("*/*/*") if p.name != "message"],
                    10, "the original envelope")
    assert len(envs) == 1
    fields = dict(line.split(": ", 1) for line in envs[0].read_text().splitlines())
    assert int(fields["last-bounce"]) == int(fields["ctime"]) + 2
