"""A remote server's reply text reaches our log lines escaped (strnvis, OpenSMTPD's
failed-command flags): an MX cannot write terminal escapes or forge lines in our log."""
from __future__ import annotations

import smtplib

from tests.conftest import free_port
from tests.e2e.helpers import config
from tests.e2e.sink import Sink


def test_remote_reply_text_is_escaped_in_delivery_lines(make_daemon, tmp_path):
    sink_port, port = free_port(), free_port()
    sink = Sink(sink_port).start()
    sink.handler.reject_rcpt = {"x@remote.test": "550 5.1.1 No such \x1b[31muser\x07 here"}
    try:
        d = make_daemon(config(tmp_path / "d", port, relay=f"smtp://127.0.0.1:{sink_port}")).start()
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.ehlo("client.test")
            assert s.mail("<>")[0] == 250           # the null sender: no bounce to wait for
            assert s.rcpt("x@remote.test")[0] == 250
            assert s.data(b"Subject: escapes\r\n\r\nbody\r\n")[0] == 250
        log = d.wait_log('result="PermFail"')
        line = next(l for l in log.splitlines() if "mta delivery" in l and "PermFail" in l)
        assert "\x1b" not in log and "\x07" not in log
        assert r"No such \^[[31muser\a here" in line, line
    finally:
        sink.stop()
