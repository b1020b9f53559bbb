"""mailq with the daemon down (smtpctl/mailq.py): the spool's envelopes, listed as
OpenSMTPD's smtpctl lists them offline."""
from __future__ import annotations

from common import envelope as envcodec
from smtpctl import format as fmt
from smtpctl.mailq import envelope_files, offline_fields


def put(queue, evpid: int, **fields) -> None:
    directory = queue / f"{evpid >> 56:02x}" / f"{evpid >> 32:08x}"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{evpid:016x}").write_bytes(envcodec.dump(envcodec.Envelope(**fields)))
    (directory / "message").write_bytes(b"Subject: s\n\nx\n")


def test_envelopes_in_order_and_only_theirs(tmp_path):
    queue = tmp_path / "queue"
    put(queue, 0xBB00000100000002, sender="a@x", rcpt="b@y", dest="b@y", ctime=100, ttl=50)
    put(queue, 0x1200000300000001, sender="", rcpt="c@y", dest="c@y", ctime=7, type="mda",
        errorline="421 busy")
    put(queue, 0xBB00000100000001, sender="a@x", rcpt="d@y", dest="d@y", ctime=100)
    (queue / "zz").mkdir()                          # not a bucket
    (queue / "12" / "12000003" / "notes").write_text("x")
    assert [e for e, _ in envelope_files(queue)] == [0x1200000300000001, 0xBB00000100000001, 0xBB00000100000002]
    assert [e for e, _ in envelope_files(queue, 0xBB000001)] == [0xBB00000100000001, 0xBB00000100000002]
    assert list(envelope_files(queue, 0x12345678)) == []


def test_offline_line():
    env = envcodec.Envelope(sender="", rcpt="c@y", dest="c@y", ctime=7, ttl=3, type="mda", retry=2,
                            last_try=9, errorline="421 busy\r")
    line = fmt.format_queue_line(offline_fields(0x1200000300000001, env))
    assert line == "1200000300000001|local|mda||@|c@y|c@y|7|10|9|2|offline||421 busy\\^M"
