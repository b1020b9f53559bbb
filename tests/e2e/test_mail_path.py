"""The mail path end to end: SMTP in, durable queue, Maildir and relay out."""
from __future__ import annotations

import smtplib
import subprocess
import time

from tests.conftest import free_port, wait_for
from tests.e2e.helpers import config, maildir_messages, send
from tests.e2e.sink import Sink


def test_maildir_delivery(make_daemon, tmp_path):
    port = free_port()
    d = make_daemon(config(tmp_path / "d", port)).start()
    reply = send(port, "sender@remote.test", ["alice@example.test"],
                 "Subject: hello alice\nFrom: sender@remote.test\n\nline one\n.leading dot\n")
    assert reply.startswith("2.0.0 ") and reply.endswith("Message accepted for delivery")
    msgid = reply.split()[1]
    msgs = wait_for(lambda: maildir_messages(tmp_path / "d", "alice"), 20, "maildir delivery")
    assert len(msgs) == 1
    text = msgs[0].decode()
    assert text.startswith("Return-Path: <sender@remote.test>\nDelivered-To: alice@example.test\n")
    assert f"with ESMTP id {msgid}" in text and "for <alice@example.test>;" in text
    assert text.endswith("Subject: hello alice\nFrom: sender@remote.test\n\nline one\n.leading dot\n")
    log = d.wait_log("result=Ok")
    assert f"smtp message msgid={msgid} " in log
    assert "mda delivery evpid=" in log and "to=<alice@example.test>" in log
    assert "smtp connected address=127.0.0.1" in log
    wait_for(lambda: d.queue_lines() == [], 10, "the queue to be empty")


def test_relay_to_sink_one_transaction_for_all_recipients(make_daemon, tmp_path):
    sink_port, port = free_port(), free_port()
    sink = Sink(sink_port).start()
    try:
        d = make_daemon(config(tmp_path / "d", port, relay=f"smtp://127.0.0.1:{sink_port}")).start()
        res = subprocess.run(
            ["swaks", "--server", "127.0.0.1", "--port", str(port), "--from", "me@local.test",
             "--to", "x@remote.test,y@other.test", "--header", "Subject: via swaks",
             "--body", "relay me"], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "250 2.0.0" in res.stdout and "Message accepted for delivery" in res.stdout
        wait_for(lambda: sink.transactions, 20, "the sink to receive the message")
        time.sleep(0.5)
        assert len(sink.transactions) == 1
        t = sink.transactions[0]
        assert t.mail_from == "me@local.test"
        assert sorted(t.rcpt_tos) == ["x@remote.test", "y@other.test"]
        assert b"Subject: via swaks" in t.data and b"relay me" in t.data
        assert t.data.count(b"Received: from") >= 1
        log = d.wait_log('result="Ok"')
        assert log.count("mta delivery evpid=") == 2
        wait_for(lambda: d.queue_lines() == [], 10, "the queue to be empty")
    finally:
        sink.stop()


def test_sink_down_then_schedule_all_delivers_once(make_daemon, tmp_path):
    sink_port, port = free_port(), free_port()
    d = make_daemon(config(tmp_path / "d", port, relay=f"smtp://127.0.0.1:{sink_port}")).start()
    send(port, "me@local.test", ["far@remote.test"])
    d.wait_log('result="TempFail"')
    lines = d.queue_lines()
    assert len(lines) == 1
    fields = lines[0].split("|")
    assert fields[2] == "mta" and fields[4] == "me@local.test" and fields[5] == "far@remote.test"
    assert fields[10] == "1" and fields[11] == "pending" and int(fields[12]) > 0
    assert fields[13]                      # the error of the failed attempt
    sink = Sink(sink_port).start()
    try:
        out = d.smtpctl("schedule", "all").stdout
        assert out.strip() == "1 envelope scheduled"
        wait_for(lambda: sink.transactions, 20, "delivery after schedule all")
        wait_for(lambda: d.queue_lines() == [], 10, "the queue to be empty")
        time.sleep(1)
        assert len(sink.transactions) == 1
    finally:
        sink.stop()


def test_relay_connection_is_reused_and_a_dropped_one_replaced(make_daemon, tmp_path):
    sink_port, port = free_port(), free_port()
    sink = Sink(sink_port).start()
    try:
        d = make_daemon(config(tmp_path / "d", port, relay=f"smtp://127.0.0.1:{sink_port}")).start()
        for n in range(3):
            send(port, "me@local.test", [f"r{n}@remote.test"])
            wait_for(lambda: len(sink.transactions) == n + 1, 20, f"delivery of message {n}")
        # three messages in a row to one relay: one SMTP connection
        assert len({t.peer for t in sink.transactions}) == 1
        # the relay restarts while our connection is idle: the next message opens a new one
        sink.stop()
        sink.start()
        send(port, "me@local.test", ["r3@remote.test"])
        wait_for(lambda: len(sink.transactions) == 4, 20, "delivery after the relay restarted")
        wait_for(lambda: d.queue_lines() == [], 10, "the queue to be empty")
        assert [t.rcpt_tos for t in sink.transactions] == [[f"r{n}@remote.test"] for n in range(4)]
        assert 'result="TempFail"' not in d.log_since_start()
    finally:
        sink.stop()


def test_unknown_local_user_and_relay_denied_get_550(make_daemon, tmp_path):
    port = free_port()
    make_daemon(config(tmp_path / "d", port)).start()
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.test")
        assert s.mail("a@remote.test")[0] == 250
        code, text = s.rcpt("nobody-here@example.test")
        assert code == 550 and text.startswith(b"5.1.1 "), text
        code, text = s.rcpt("someone@elsewhere.test")      # no rule relays anywhere
        assert code == 550 and text.startswith(b"5.7.1 "), text
        code, _ = s.rcpt("bob@example.test")
        assert code == 250


def test_relay_is_denied_to_a_client_outside_the_allowed_sources(make_daemon, tmp_path):
    sink_port, port = free_port(), free_port()
    conf = config(tmp_path / "d", port, relay=f"smtp://127.0.0.1:{sink_port}",
                  relay_rule='match from src { 192.0.2.0/24 } for any action "outbound"')
    make_daemon(conf).start()
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.test")
        s.mail("a@remote.test")
        code, text = s.rcpt("victim@elsewhere.test")
        assert code == 550, text


def test_kill9_after_250_loses_nothing(make_daemon, tmp_path):
    sink_port, port = free_port(), free_port()
    d = make_daemon(config(tmp_path / "d", port, relay=f"smtp://127.0.0.1:{sink_port}"))
    d.start("-P", "mta")                           # accept, but do not relay yet
    reply = send(port, "me@local.test", ["far@remote.test", "alice@example.test"])
    msgid = reply.split()[1]
    d.kill_group()                                 # kill -9 of every process, right after 250
    assert d.proc.returncode is not None
    sink = Sink(sink_port).start()
    try:
        d.start()
        wait_for(lambda: sink.transactions, 20, "delivery after restart")
        wait_for(lambda: maildir_messages(tmp_path / "d", "alice"), 20, "local delivery after restart")
        wait_for(lambda: d.queue_lines() == [], 10, "the queue to be empty")
        assert len(sink.transactions) == 1
        assert f"id {msgid}".encode() in sink.transactions[0].data
    finally:
        sink.stop()


def test_pause_and_resume_mta(make_daemon, tmp_path):
    sink_port, port = free_port(), free_port()
    sink = Sink(sink_port).start()
    try:
        d = make_daemon(config(tmp_path / "d", port, relay=f"smtp://127.0.0.1:{sink_port}")).start()
        assert d.smtpctl("pause", "mta").stdout.strip() == "command succeeded"
        assert "MTA paused" in d.smtpctl("show", "status").stdout
        send(port, "me@local.test", ["held@remote.test"])
        time.sleep(2)
        assert sink.transactions == []
        assert len(d.queue_lines()) == 1
        assert d.smtpctl("resume", "mta").stdout.strip() == "command succeeded"
        wait_for(lambda: sink.transactions, 20, "delivery after resume mta")
        assert "MTA running" in d.smtpctl("show", "status").stdout
    finally:
        sink.stop()
