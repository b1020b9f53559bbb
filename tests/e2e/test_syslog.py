"""Logging to syslog as OpenSMTPD does, checked as the lines reach a syslog socket
(the test plays /dev/log): glibc's syslog(3) framing, the mail facility, and
OpenSMTPD's line formats for connections, failed commands (AUTH on a listener
without auth, rejected recipients), messages and deliveries (local and relayed).

The expected formats are OpenSMTPD's log_info() format strings (smtp_session.c,
mda.c mda_log, mta.c mta_log) written as regular expressions."""
from __future__ import annotations

import re
import signal
import smtplib

from tests.conftest import free_port, wait_for
from tests.e2e.helpers import config, maildir_messages, send
from tests.e2e.sink import Sink

SID = r"(?P<sid>[0-9a-f]{16})"
OPENSMTPD = {
    "connected": rf"^{SID} smtp connected address=(?P<address>\S+) host=(?P<host>\S+)$",
    "failed-command": rf'^{SID} smtp failed-command command="(?P<command>[^"]*)" result="(?P<result>[^"]*)"$',
    "message": rf"^{SID} smtp message msgid=[0-9a-f]{{8}} size=\d+ nrcpt=\d+ proto=(ESMTP|SMTP)$",
    "envelope": rf"^{SID} smtp envelope evpid=[0-9a-f]{{16}} from=<[^>]*> to=<[^>]*>$",
    "disconnected": rf'^{SID} smtp disconnected reason=(quit|timeout|disconnect|"io-error: [^"]*")$',
    "mda": rf"^{SID} mda delivery evpid=[0-9a-f]{{16}} from=<[^>]*> to=<[^>]*> (rcpt=<[^>]*> )?"
           r"user=\S+ delay=\S+ result=(?P<result>Ok|TempFail|PermFail) stat=.*$",
    "mta": rf'^{SID} mta delivery evpid=[0-9a-f]{{16}} from=<[^>]*> to=<[^>]*> rcpt=<[^>]*> '
           r'source="[^"]*" relay="[^"]*" delay=\S+ result="(?P<result>Ok|TempFail|PermFail)" stat="[^"]*"$',
}
LOG_MAIL_INFO, LOG_MAIL_ERR = 2 * 8 + 6, 2 * 8 + 3


def matching(syslog, kind: str) -> list[re.Match]:
    pattern = re.compile(OPENSMTPD[kind])
    return [m for m in map(pattern.match, syslog.messages()) if m]


def test_opensmtpd_log_lines_reach_syslog(ops_daemon, syslog_socket, tmp_path):
    sink_port, port = free_port(), free_port()
    sink = Sink(sink_port).start()
    try:
        # Only me@local.test may relay: anything else for a remote domain is refused.
        relay_rule = 'match from local mail-from "me@local.test" for any action "outbound"'
        d = ops_daemon(config(tmp_path / "d", port, relay=f"smtp://127.0.0.1:{sink_port}",
                              relay_rule=relay_rule),
                       flags=("-F", "--syslog-socket", syslog_socket.address))
        d.start(ready=lambda: any("ready:" in m for m in syslog_socket.messages()))
        assert "ready:" not in d.log()                    # -F: nothing on stderr

        # A credential scanner on a listener without AUTH, then a relay attempt.
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.ehlo("scanner.test")
            assert s.docmd("AUTH", "LOGIN")[0] == 503
            assert s.docmd("AUTH", "PLAIN AGFsaWNlAHNlY3JldA==")[0] == 503
            s.mail("spam@remote.test")
            assert s.rcpt("victim@elsewhere.test")[0] == 550
        send(port, "sender@remote.test", ["alice@example.test"])            # local delivery
        send(port, "me@local.test", ["x@remote.test"])                      # relayed to the sink
        wait_for(lambda: maildir_messages(tmp_path / "d", "alice") and sink.transactions, 20,
                 "both deliveries")
        syslog_socket.wait('result="Ok"')
        syslog_socket.wait("result=Ok ")

        connected = matching(syslog_socket, "connected")
        assert connected and all(m["address"] == "127.0.0.1" for m in connected)
        scanner = connected[0]["sid"]
        failed = {m["command"]: m["result"] for m in matching(syslog_socket, "failed-command")
                  if m["sid"] == scanner}
        assert failed == {
            "AUTH LOGIN": "503 5.5.1 Invalid command: Command not supported",
            "AUTH PLAIN (...)": "503 5.5.1 Invalid command: Command not supported",
            # the command line as received (smtplib sends "rcpt TO:"), as OpenSMTPD logs it
            "rcpt TO:<victim@elsewhere.test>": "550 5.7.1 Invalid recipient: <victim@elsewhere.test>",
        }, failed
        assert "AGFsaWNlAHNlY3JldA" not in "\n".join(syslog_socket.messages())   # no credentials
        assert any(m["sid"] == scanner for m in matching(syslog_socket, "disconnected"))
        assert len(matching(syslog_socket, "message")) == 2
        assert len(matching(syslog_socket, "envelope")) == 2
        assert [m["result"] for m in matching(syslog_socket, "mda")] == ["Ok"]
        assert [m["result"] for m in matching(syslog_socket, "mta")] == ["Ok"]
        # The smtp lines of one message: message first, then its envelope (as OpenSMTPD).
        lines = syslog_socket.messages()
        first_message = next(i for i, m in enumerate(lines) if " smtp message " in m)
        assert " smtp envelope " in lines[first_message + 1]

        # Priorities: mail.info for those, mail.err for warnings (a failed reload).
        records = syslog_socket.records()
        assert {p for p, _, _, m in records if " smtp " in m or " delivery " in m} == {LOG_MAIL_INFO}
        d.config.write_text(d.config.read_text() + "bogus line\n")
        d.proc.send_signal(signal.SIGHUP)
        syslog_socket.wait("reload failed")
        failure = [r for r in syslog_socket.records() if "reload failed" in r[3]]
        assert failure[0][0] == LOG_MAIL_ERR
        # Every process logs under its own pid, as smtpd[pid] (LOG_PID).
        pids = {pid for _, _, pid, _ in syslog_socket.records()}
        assert {d.proc.pid, d.children()["smtpd: pony"]} <= pids
    finally:
        sink.stop()
