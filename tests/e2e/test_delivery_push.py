"""Local delivery with the message's descriptor pushed by the queue with its order
(issue 12, docs/delivery.md): Maildir delivery asks the queue nothing more
(`trace mproc` shows no mda_message_open), pony holds no descriptor after a burst,
and when more envelopes wait in pony than it keeps descriptors for, the rest are
delivered through the MdaMessageOpen fallback."""
from __future__ import annotations

import os
import smtplib

from smtpd.mda import MAX_PUSHED, MAX_SESSIONS
from tests.conftest import free_port, wait_for
from tests.e2e.helpers import config, maildir_messages, userbase
from tests.e2e.test_trace import mproc_lines

BURST = 200


def send_many(port: int, count: int, rcpt: str = "alice@example.test") -> None:
    """``count`` messages, up to 50 per session (the default limit is 100)."""
    sent = 0
    while sent < count:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.ehlo("client.test")
            for _ in range(min(50, count - sent)):
                s.sendmail("s@remote.test", [rcpt],
                           f"Subject: n{sent}\r\n\r\nmessage number {sent}\r\n".encode())
                sent += 1


def mproc_count(text: str, sender: str, receiver: str, name: str) -> int:
    """`trace mproc` lines of messages ``name`` from ``sender`` to ``receiver``."""
    return sum(1 for src, dst, _, kind, _ in mproc_lines(text) if (src, dst, kind) == (sender, receiver, name))


def pony_fds(d) -> int:
    return len(os.listdir(f"/proc/{d.children()['smtpd: pony']}/fd"))


def no_descriptor_left(d, before: int) -> None:
    """Every descriptor pushed to pony was closed: it holds no more than before the
    burst (given a moment: the last sessions' sockets may still be closing)."""
    wait_for(lambda: pony_fds(d) <= before, 10, f"pony back to at most {before} descriptors")


def delivered(d) -> int:
    return d.log_since_start().count("result=Ok")


def settle(d, count: int) -> None:
    wait_for(lambda: delivered(d) >= count, 60, f"{count} deliveries")
    wait_for(lambda: d.queue_lines() == [], 20, "the queue to be empty")


def test_maildir_delivery_uses_the_pushed_descriptor_and_leaks_none(make_daemon, tmp_path):
    port = free_port()
    base = tmp_path / "d"
    d = make_daemon(config(base, port)).start()
    send_many(port, 3)                                  # warm-up: workers, caches, sockets
    settle(d, 3)
    before = pony_fds(d)
    assert d.smtpctl("trace", "mproc").stdout == "command succeeded\n"
    start = len(d.log())
    send_many(port, BURST)
    settle(d, 3 + BURST)
    assert d.smtpctl("untrace", "mproc").stdout == "command succeeded\n"
    log = d.log()[start:]
    assert mproc_count(log, "queue", "pony", "queue_deliver") == BURST
    assert "mda_message_open" not in log                # the push, every time
    texts = maildir_messages(base, "alice")
    assert len(texts) == 3 + BURST
    joined = b"".join(texts)
    assert all(f"message number {n}\n".encode() in joined for n in range(BURST))
    assert all(t.startswith(b"Return-Path: <s@remote.test>\nDelivered-To: alice@example.test\n")
               for t in texts)
    no_descriptor_left(d, before)


def test_envelopes_past_the_kept_descriptors_fall_back_to_asking(make_daemon, tmp_path):
    """Deliveries held back by an mda command that waits for a gate file: every slot of
    pony's MDA is busy and more envelopes wait than MAX_PUSHED, so pony closes the
    extra pushed descriptors and those deliveries ask for the message when their turn
    comes (MdaMessageOpen).  All are delivered, and pony keeps no descriptor after."""
    port = free_port()
    base = tmp_path / "d"
    users = userbase(base)
    home = (base / "home" / "alice").resolve()
    out = home / "got"
    gate = home / "gate"
    # bounded wait (30 s) for the gate, then the message appended to one file
    command = f"i=0; while [ ! -e {gate} ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done; cat >> {out}"
    d = make_daemon("\n".join([
        f"listen on 127.0.0.1 port {port}",
        f"table users {users}",
        f'action "local" mda "{command}" userbase <users>',
        'match from any for domain "example.test" action "local"',
    ]) + "\n").start()
    gate.touch()
    send_many(port, 2)
    settle(d, 2)
    gate.unlink()
    before = pony_fds(d)
    assert d.smtpctl("trace", "mproc").stdout == "command succeeded\n"
    start = len(d.log())
    send_many(port, BURST)
    wait_for(lambda: mproc_count(d.log()[start:], "queue", "pony", "queue_deliver") >= BURST, 30,
             "every order in pony")
    gate.touch()
    settle(d, 2 + BURST)
    assert d.smtpctl("untrace", "mproc").stdout == "command succeeded\n"
    log = d.log()[start:]
    asked = mproc_count(log, "pony", "queue", "mda_message_open")
    # at most MAX_SESSIONS deliveries took their descriptor, MAX_PUSHED more were kept:
    # the others asked
    assert BURST - MAX_SESSIONS - MAX_PUSHED <= asked < BURST
    got = out.read_text()
    assert all(f"message number {n}\n" in got for n in range(BURST))
    assert got.count("Subject: n") == 2 + BURST
    no_descriptor_left(d, before)
