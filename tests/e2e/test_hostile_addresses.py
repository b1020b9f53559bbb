"""Hostile addresses never reach a shell (the CVE-2020-7247 class).

Senders and recipients carrying ``;``, ``$(...)``, backticks, ``&``, ``|`` and
quotes (as far as the SMTP parser lets them in: quoted local parts, and the atext
characters RFC 5321 allows unquoted) go through every local delivery method; each
payload would create a marker file if a shell ran it.  The marker directory is
writable by the delivery user, so a payload that ran would leave its marker: the
control test with ``%{rcpt:raw}`` (the administrator's explicit opt-out) shows it
does.  Line breaks never get into an envelope: the SMTP parser refuses them.
"""
from __future__ import annotations

import os
import shutil
import smtplib
import socket
import tempfile
from pathlib import Path

import pytest

from tests.conftest import free_port, wait_for
from tests.e2e.helpers import userbase
from tests.e2e.test_delivery_methods import LmtpServer, owned_dir


@pytest.fixture
def marks():
    """A directory anyone can create files in: the delivery user could leave a marker."""
    root = Path(tempfile.mkdtemp(prefix="pysmtpd-marks-"))
    os.chmod(root, 0o1777)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def senders(m: Path) -> list[str]:
    return [
        f'"x;touch {m}/s1"@remote.test',
        f'"$(touch {m}/s2)"@remote.test',
        f'"`touch {m}/s3`"@remote.test',
        f"`touch${{IFS}}{m}/s4`@remote.test",
        f'"x\'; touch {m}/s5; echo \'"@remote.test',
        f'"x\\"; touch {m}/s6; echo \\""@remote.test',
        f"x|touch${{IFS}}{m}/s7@remote.test",
    ]


def recipients(m: Path) -> list[str]:
    return [
        f'"y;touch {m}/r1"@example.test',
        f'"$(touch {m}/r2)"@example.test',
        f"`touch${{IFS}}{m}/r3`@example.test",
        f"y&touch${{IFS}}{m}/r4@example.test",
        f'"y\'; touch {m}/r5; echo \'"@example.test',
        f"alice+|touch${{IFS}}{m}/r6@example.test",
    ]


def conf(base: Path, port: int, action: str, extra: str = "") -> str:
    users = userbase(base)
    return "\n".join([
        f"listen on 127.0.0.1 port {port}",
        f"table users {users}",
        # every example.test address reaches alice, through an address of another
        # domain whose action has no virtual table (%{rcpt} keeps the hostile one)
        'table catchall { "@" = "alice@direct.test" }',
        extra,
        f'action "entry" {action} virtual <catchall> userbase <users>',
        f'action "local" {action} userbase <users>',
        'match from any for domain "example.test" action "entry"',
        'match from any for domain "direct.test" action "local"',
    ]) + "\n"


def send_all(port: int, marks: Path) -> int:
    """Every hostile sender to every hostile recipient; the number of envelopes taken."""
    taken = 0
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.test")
        for sender in senders(marks):
            code, text = s.mail(sender)
            assert code == 250, (sender, code, text)
            rcpts = 0
            for rcpt in recipients(marks):
                code, text = s.rcpt(rcpt)
                assert code == 250, (rcpt, code, text)
                rcpts += 1
            code, text = s.data(b"Subject: hostile\r\n\r\nFrom the other side\r\n")
            assert code == 250, (code, text)
            taken += rcpts
    return taken


def deliver_all(make_daemon, tmp_path, marks, action: str, extra: str = "") -> object:
    port = free_port()
    d = make_daemon(conf(tmp_path / "d", port, action, extra)).start()
    n = send_all(port, marks)
    wait_for(lambda: d.log_since_start().count("mda delivery") >= n, 60, f"{n} deliveries")
    log = d.log_since_start()
    assert log.count("result=Ok") == n, log[-3000:]
    assert sorted(os.listdir(marks)) == [], "a hostile address ran as a command"
    return d


def home(tmp_path: Path) -> Path:
    return (tmp_path / "d" / "home" / "alice").resolve()


def test_mda_command_with_every_variable(make_daemon, tmp_path, marks):
    # every expansion, and the environment used unquoted (word splitting, no parsing)
    cmd = ("cat >/dev/null; echo %{sender} %{rcpt} %{dest} %{sender.user} %{rcpt.user} %{mbox.from} "
           "$SENDER $RECIPIENT $ORIGINAL_RECIPIENT $LOCAL $EXTENSION >> $HOME/seen")
    deliver_all(make_daemon, tmp_path, marks, f"mda '{cmd}'")
    seen = (home(tmp_path) / "seen").read_text()
    # the environment carries the addresses as they are (data, not code)
    assert f'"$(touch {marks}/s2)"@remote.test' in seen
    assert f"`touch${{IFS}}{marks}/r3`@example.test" in seen


def test_mda_wrapper_with_variables(make_daemon, tmp_path, marks):
    wrapper = 'mda wrapper "w" "echo %{sender} %{rcpt} >> $HOME/wrapped; %{mda}"'
    deliver_all(make_daemon, tmp_path, marks, "mda 'cat > /dev/null; echo %{rcpt.user}' wrapper w", extra=wrapper)
    assert (home(tmp_path) / "wrapped").read_text().count("\n") == len(senders(marks)) * len(recipients(marks))


def test_maildir_path_with_variables(make_daemon, tmp_path, marks):
    deliver_all(make_daemon, tmp_path, marks, 'maildir "~/Maildir/%{sender.user}"')
    folders = os.listdir(home(tmp_path) / "Maildir")
    assert all("/" not in f and not f.startswith(".") for f in folders)
    assert len(folders) == len(senders(marks))


def test_mbox(make_daemon, tmp_path, marks):
    userbase(tmp_path / "d")                        # the home first: the spool is in it
    spool = owned_dir(home(tmp_path) / "mail", home(tmp_path))
    deliver_all(make_daemon, tmp_path, marks, f'mbox "{spool}"')
    box = (spool / "alice").read_text()
    assert box.count("\nFrom ") + box.startswith("From ") == len(senders(marks)) * len(recipients(marks))
    # the From_ line keeps one line per message whatever the sender holds
    assert all(line.count(" ") >= 5 for line in box.splitlines() if line.startswith("From "))


def test_lmtp(make_daemon, tmp_path, marks):
    port = free_port()
    server = LmtpServer(socket.create_server(("127.0.0.1", port)))
    try:
        deliver_all(make_daemon, tmp_path, marks, f'lmtp "127.0.0.1:{port}" rcpt-to')
        got = sorted({r for _, rcpts, _ in server.messages for r in rcpts})
        assert got == sorted(set(recipients(marks)))          # the addresses, intact
    finally:
        server.stop()


def test_control_raw_expansion_does_run(make_daemon, tmp_path, marks):
    """The marker directory catches a payload that runs: ``:raw`` (an administrator's
    explicit choice) puts the recipient into the command unescaped, and it runs."""
    port = free_port()
    d = make_daemon(conf(tmp_path / "d", port, "mda 'cat >/dev/null; echo %{rcpt:raw}'")).start()
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.test")
        assert s.mail("a@remote.test")[0] == 250
        assert s.rcpt(f"`touch${{IFS}}{marks}/control`@example.test")[0] == 250
        assert s.data(b"Subject: control\r\n\r\nx\r\n")[0] == 250
    wait_for(lambda: (marks / "control").exists(), 30, "the control payload to run")
    d.wait_log("result=Ok")


@pytest.mark.parametrize("line", [
    b"MAIL FROM:<\"a\rtouch x\"@remote.test>",
    b"MAIL FROM:<a\x00b@remote.test>",
    b"MAIL FROM:<\"a\x1b\"@remote.test>",
])
def test_line_breaks_and_controls_are_refused(make_daemon, tmp_path, marks, line):
    port = free_port()
    d = make_daemon(conf(tmp_path / "d", port, "mda 'cat >/dev/null'")).start()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        f = s.makefile("rb")
        assert f.readline().startswith(b"220")
        s.sendall(b"EHLO client.test\r\n")
        while not f.readline().startswith(b"250 "):
            pass
        s.sendall(line + b"\r\n")
        reply = f.readline()
        assert reply[:1] == b"5", reply
        s.sendall(b"MAIL FROM:<ok@remote.test>\r\nRCPT TO:<\"b\nc\"@example.test>\r\n")
        assert f.readline().startswith(b"250")
        assert f.readline()[:1] == b"5"
    assert d.proc.poll() is None and d.queue_lines() == []
    assert os.listdir(marks) == []
