"""Configuration reload (SIGHUP and smtpctl reload), against the running daemon:
listeners added and removed, tables re-read, queued mail untouched, and a broken
file (or an address that cannot be bound) refused with the old configuration kept."""
from __future__ import annotations

import os
import signal
import smtplib
import socket

from tests.conftest import free_port, wait_for
from tests.e2e.helpers import maildir_messages, send, userbase


def conf(base, port: int, users=("alice",), hostname: str | None = None, extra: str = "") -> str:
    host = f" hostname {hostname}" if hostname else ""
    return (f"listen on 127.0.0.1 port {port}{host}\n"
            f"table users {userbase(base, users)}\n"
            'action "local" maildir "~/Maildir" userbase <users>\n'
            'match from any for domain "example.test" action "local"\n' + extra)


def banner(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.settimeout(10)
        return s.recv(1024).decode()


def rcpt_code(port: int, rcpt: str) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.test")
        s.mail("sender@remote.test")
        return s.rcpt(rcpt)[0]


def without_runtime(lines: list[str]) -> list[list[str]]:
    """show queue lines without the runtime field, which moves with the clock."""
    return [line.split("|")[:12] + line.split("|")[13:] for line in lines]


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        return False
    except ConnectionRefusedError:
        return True


def free_privileged_port() -> int:
    for port in range(987, 700, -1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise AssertionError("no free port below 1024")


def test_reload_switches_listeners_and_tables_and_leaves_the_queue_alone(make_daemon, tmp_path):
    base = tmp_path / "d"
    p1, p2 = free_port(), free_port()
    d = make_daemon(conf(base, p1)).start("-P", "mda")
    send(p1, "sender@remote.test", ["alice@example.test"])
    queued = wait_for(lambda: d.queue_lines(), 20, "the message in the queue")
    assert rcpt_code(p1, "carol@example.test") == 550           # not in the table yet

    low = free_privileged_port() if os.geteuid() == 0 else None
    extra = f"listen on 127.0.0.1 port {low}\n" if low else ""
    d.config.write_text(conf(base, p2, users=("alice", "carol"), hostname="reloaded.test", extra=extra))
    res = d.smtpctl("reload")
    assert res.stdout.strip() == "command succeeded"
    log = d.wait_log("configuration reloaded")
    assert f"added 127.0.0.1:{p2}" in log and f"removed 127.0.0.1:{p1}" in log, log

    assert refused(p1)                                            # removed: nobody listens
    assert banner(p2).startswith("220 reloaded.test ESMTP")       # added, with its options
    if low:                                                       # bound by the parent as root,
        assert banner(low).startswith("220 ")                     # served by pony (_smtpd)
    assert rcpt_code(p2, "carol@example.test") == 250             # lka's tables re-read
    assert without_runtime(d.queue_lines()) == without_runtime(queued)   # queue untouched
    d.smtpctl("resume", "mda")
    wait_for(lambda: maildir_messages(base, "alice"), 20, "delivery of the queued message")
    assert not d.queue_lines()


def test_a_broken_reload_keeps_the_running_configuration(make_daemon, tmp_path):
    base = tmp_path / "d"
    port = free_port()
    d = make_daemon(conf(base, port, hostname="first.test")).start()
    good = d.config.read_text()

    d.config.write_text(good + "match from any for any actoin \"local\"\n")
    res = d.smtpctl("reload", check=False)
    assert res.returncode == 1
    assert res.stdout.startswith(f"command failed: {d.config}:5: "), res.stdout
    assert "reload failed, keeping the current configuration" in d.wait_log("reload failed")

    # An address that cannot be bound fails the reload as a whole, before any change.
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    other = free_port()
    d.config.write_text(conf(base, other) + f"listen on 127.0.0.1 port {busy.getsockname()[1]}\n")
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: d.log_since_start().count("reload failed") == 2, 20, "the second failure")
    assert "Address already in use" in d.log_since_start()
    busy.close()
    assert refused(other)                                         # nothing was half-applied
    assert banner(port).startswith("220 first.test ESMTP")        # still the first config
    send(port, "sender@remote.test", ["alice@example.test"])
    wait_for(lambda: maildir_messages(base, "alice"), 20, "mail still flows")
    assert d.proc.poll() is None


def test_sighup_reload_is_logged_and_keeps_serving(make_daemon, tmp_path):
    base = tmp_path / "d"
    port = free_port()
    d = make_daemon(conf(base, port)).start()
    pids = d.children()
    d.proc.send_signal(signal.SIGHUP)
    log = d.wait_log("configuration reloaded")
    assert "reloading configuration from" in log and "(SIGHUP)" in log
    assert d.children() == pids                                   # no process restarted
    assert banner(port).startswith("220 ")
