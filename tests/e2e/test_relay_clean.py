"""What the MTA sends is clean (issue 10 point 8): the next hop sees CRLF line ends
only, dot-stuffed lines and no line over 998 octets, whatever the queued body holds;
checked on the exact bytes a raw sink reads off the wire."""
from __future__ import annotations

import smtplib

from tests.conftest import free_port, wait_for
from tests.e2e.helpers import config
from tests.e2e.raw_sink import RawSink


def _send_raw(port: int, body: bytes) -> None:
    """smtplib sends a bytes body as it is (it stuffs dots after LF only)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.test")
        assert s.mail("alice@example.test")[0] == 250
        assert s.rcpt("carol@remote.test")[0] == 250
        code, text = s.data(body)
        assert code == 250, (code, text)


def _relayed(make_daemon, tmp_path, body: bytes) -> bytes:
    port, sink_port = free_port(), free_port()
    sink = RawSink(sink_port).start()
    try:
        make_daemon(config(tmp_path / "d", port, relay=f"smtp://127.0.0.1:{sink_port}")).start()
        _send_raw(port, body)
        wait_for(lambda: sink.recorded, 30, "the relayed message")
        return sink.recorded[0]
    finally:
        sink.stop()


def _lines(data: bytes) -> list[bytes]:
    assert data.endswith(b"\r\n.\r\n")
    # every CR is followed by LF and every LF preceded by CR: no bare line end anywhere
    assert data.count(b"\r") == data.count(b"\n") == data.count(b"\r\n")
    return data[:-len(b".\r\n")].split(b"\r\n")[:-1]


def test_bare_cr_cannot_end_data_early_at_the_next_hop(make_daemon, tmp_path):
    # a server ending DATA at <CR>.<CR> would read the rest as a new transaction
    body = (b"Subject: smuggle\r\n\r\nline\r.\rMAIL FROM:<evil@attacker.test>\r\n"
            b"bare\nfeed\r\n.leading dot\r\n")
    data = _relayed(make_daemon, tmp_path, body)
    lines = _lines(data)
    tail = lines[lines.index(b"line"):]
    assert tail == [b"line", b"..", b"MAIL FROM:<evil@attacker.test>", b"bare", b"feed",
                    b"..leading dot"]


def test_long_lines_are_folded_to_998_octets(make_daemon, tmp_path):
    long_header = b"X-Long: " + b"h" * 1500
    long_body = b"b" * 2100
    data = _relayed(make_daemon, tmp_path,
                    b"Subject: long\r\n" + long_header + b"\r\n\r\n" + long_body + b"\r\nend\r\n")
    lines = _lines(data)
    assert max(len(line) for line in lines) <= 998
    start = next(i for i, l in enumerate(lines) if l.startswith(b"X-Long: "))
    folded = [lines[start]]
    for line in lines[start + 1:]:
        if not line.startswith(b" "):
            break
        folded.append(line[1:])                 # a header continuation starts with a space
    assert b"".join(folded) == long_header
    blank = lines.index(b"")
    assert b"".join(lines[blank + 1:-1]) == long_body and lines[-1] == b"end"
