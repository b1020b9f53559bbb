"""Recipient expansion against the real daemon: an aliases file with user lists,
:include:, |command, /file and error: targets, users' ~/.forward files read by the
parent with its checks, forward-only, loops, and hostile recipients (docs/expansion.md).

The daemon starts with local delivery paused (-P mda), so the envelopes expansion
queued can be read with `smtpctl show envelope` before mail is delivered to the
users' Maildirs."""
from __future__ import annotations

import os
import pwd
import shutil
import smtplib
import tempfile
import time
from pathlib import Path

from smtpd.lka import FORWARD_CACHE_TTL

from tests.conftest import free_port, wait_for
from tests.e2e.helpers import maildir_messages, userbase

USERS = ("alice", "bob", "carol", "dave", "eve")


def _mail_owner() -> tuple[int, int]:
    """The ids the test users map to (tests/e2e/helpers.py userbase)."""
    if os.getuid() == 0:
        nobody = pwd.getpwnam("nobody")
        return nobody.pw_uid, nobody.pw_gid
    return os.getuid(), os.getgid()


def _alias_runner() -> str:
    """Who runs commands and writes files named in aliases tables: smtpd's unprivileged user."""
    return "_smtpd" if os.getuid() == 0 else pwd.getpwuid(os.getuid()).pw_name


def _write(path: Path, text: str, mode: int = 0o644, owner: tuple[int, int] | None = None) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    if owner is not None and os.getuid() == 0:
        os.chown(path, *owner)
    return path


def _setup(tmp_path: Path, port: int) -> str:
    base = tmp_path / "d"
    users = userbase(base, USERS)
    include = _write(tmp_path / "staff.list", "# the staff\ncarol\nalice\n")
    aliases = _write(tmp_path / "aliases", f"""
team: alice, bob
staff: :include:{include}
bugs: "|/bin/true tracker"
archive: {tmp_path}/archive.mbox
gone: error:550 5.1.1 This address is gone
busy: error:450 4.2.1 Try again later
loop1: loop2@example.test
loop2: loop1@example.test
""")
    home = base / "home"
    owner = _mail_owner()
    _write(home / "bob" / ".forward", "carol, bob\n", owner=owner)
    _write(home / "dave" / ".forward", "|/bin/true vacation\n", owner=owner)
    _write(home / "eve" / ".forward", "carol\n", mode=0o666, owner=owner)      # others may write it
    return "\n".join([
        f"listen on 127.0.0.1 port {port}",
        f"table users {users}",
        f"table aliases file:{aliases}",
        'action "local" maildir "~/Maildir" alias <aliases> userbase <users>',
        'action "fwdonly" forward-only userbase <users>',
        'match from any for domain "example.test" action "local"',
        'match from any for domain "fwd.test" action "fwdonly"',
    ]) + "\n"


def _rcpt_replies(port: int, rcpts: list[str]) -> dict[str, tuple[int, str]]:
    """RCPT each address in one transaction and send the message if any was accepted."""
    replies = {}
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.test")
        assert s.mail("sender@remote.test")[0] == 250
        for rcpt in rcpts:
            code, text = s.rcpt(rcpt)
            replies[rcpt] = (code, text.decode())
        if any(code == 250 for code, _ in replies.values()):
            code, text = s.data(b"Subject: expansion\r\n\r\nhello\r\n")
            assert code == 250, (code, text)
    return replies


def _envelopes(d) -> list[dict[str, str]]:
    found = []
    for line in d.queue_lines():
        text = d.smtpctl("show", "envelope", line.split("|")[0]).stdout
        found.append(dict(l.split(": ", 1) for l in text.splitlines() if ": " in l))
    return found


def test_aliases_includes_commands_files_errors_and_forward_files(make_daemon, tmp_path):
    port = free_port()
    d = make_daemon(_setup(tmp_path, port), extra_args=["-P", "mda"]).start()

    replies = _rcpt_replies(port, [
        "team@example.test", "staff@example.test", "bugs@example.test", "archive@example.test",
        "bob@example.test", "dave@example.test", "gone@example.test", "busy@example.test",
        "loop1@example.test", "eve@example.test", "alice@fwd.test",
    ])
    accepted = {r for r, (code, _) in replies.items() if code == 250}
    assert accepted == {"team@example.test", "staff@example.test", "bugs@example.test",
                        "archive@example.test", "bob@example.test", "dave@example.test"}, replies
    assert replies["gone@example.test"] == (550, "5.1.1 This address is gone: <gone@example.test>")
    assert replies["busy@example.test"] == (450, "4.2.1 Try again later: <busy@example.test>")
    assert replies["loop1@example.test"] == (
        524, "5.2.4 Mailing list expansion problem: <loop1@example.test>")
    # eve's .forward may be written by others: not used, and not silently skipped either
    assert replies["eve@example.test"] == (524, "5.2.4 Mailing list expansion problem: <eve@example.test>")
    assert replies["alice@fwd.test"] == (424, "4.2.4 Mailing list expansion problem: <alice@fwd.test>")
    assert "insecure file" in d.log_since_start() and "eve/.forward" in d.log_since_start()

    envs = _envelopes(d)
    users = sorted((e["rcpt"], e.get("mda-user"), e.get("mda-method", "")) for e in envs)
    assert users == sorted([
        ("team@example.test", "alice", ""), ("team@example.test", "bob", ""),
        ("team@example.test", "carol", ""),                # through bob's .forward
        ("staff@example.test", "carol", ""), ("staff@example.test", "alice", ""),
        ("bugs@example.test", _alias_runner(), "exec"), ("archive@example.test", _alias_runner(), "file"),
        ("bob@example.test", "carol", ""), ("bob@example.test", "bob", ""),
        ("dave@example.test", "dave", "exec"),
    ])
    by_method = {(e["rcpt"], e.get("mda-method", "")): e for e in envs}
    assert by_method[("bugs@example.test", "exec")]["mda-exec"] == "/bin/true tracker"
    assert by_method[("dave@example.test", "exec")]["mda-exec"] == "/bin/true vacation"
    assert by_method[("archive@example.test", "file")]["mda-file"] == f"{tmp_path}/archive.mbox"
    assert all(e["type"] == "mda" and e["dispatcher"] == "local" for e in envs)

    # the users' envelopes are delivered once local delivery resumes
    d.smtpctl("resume", "mda")
    base = tmp_path / "d"
    # alice: team, staff; bob: team and bob, each through his .forward; carol: staff, bob's .forward twice
    expected = {"alice": 2, "bob": 2, "carol": 3}
    for user, count in expected.items():
        wait_for(lambda u=user, c=count: len(maildir_messages(base, u)) == c, 30, f"{user}'s mail")
    assert maildir_messages(base, "dave") == [] and maildir_messages(base, "eve") == []

    # The same recipients again: the parent read each home's .forward in a thread the
    # first time, found the home on a local disk, and now reads it on its own loop
    # (smtpd/forward.py on_local_fs): the same answers, the same checks.
    assert _rcpt_replies(port, list(replies)) == replies
    assert d.log_since_start().count("eve/.forward: insecure file") == 2

    # lka keeps a .forward it was given for FORWARD_CACHE_TTL seconds (a refused one,
    # as eve's above, is asked again each time): bob's, made insecure now, is still
    # used until then, and refused after.
    os.chmod(base / "home" / "bob" / ".forward", 0o666)
    assert _rcpt_replies(port, ["bob@example.test"])["bob@example.test"][0] == 250
    time.sleep(FORWARD_CACHE_TTL + 0.5)
    assert _rcpt_replies(port, ["bob@example.test"])["bob@example.test"] == (
        524, "5.2.4 Mailing list expansion problem: <bob@example.test>")


def test_hostile_recipients_are_refused_before_any_envelope(make_daemon, tmp_path):
    port = free_port()
    d = make_daemon(_setup(tmp_path, port), extra_args=["-P", "mda"]).start()
    hostile = ["`touch /tmp/pysmtpd-pwned`@example.test", "$(reboot)@example.test",
               "a;reboot@example.test", '"|touch /tmp/pysmtpd-pwned"@example.test',
               "|/bin/sh@example.test", '"/etc/passwd"@example.test']
    replies = _rcpt_replies(port, hostile)
    for rcpt in hostile:
        assert replies[rcpt][0] in (550, 501, 553), (rcpt, replies[rcpt])
    assert d.queue_lines() == []
    assert not Path("/tmp/pysmtpd-pwned").exists()


def test_an_alias_table_program_is_awaited_and_its_failure_is_424(make_daemon, tmp_path):
    """Aliases from a table program (smtpd/table/proc.py): the expansion waits for its
    answers; a program that dies on a lookup fails the recipient temporarily."""
    from tests.table_programs import python_for_tables, write_programs
    shared = Path(tempfile.mkdtemp(prefix="pysmtpd-aliases-"))     # reachable by smtpd's user
    try:
        os.chmod(shared, 0o755)
        program, _ = write_programs(shared)
        data = _write(shared / "aliases.data", "alias team alice, |/bin/true from-proc\n")
        port = free_port()
        base = tmp_path / "d"
        conf = "\n".join([
            f"listen on 127.0.0.1 port {port}",
            f"table users {userbase(base, USERS)}",
            f'table aliases "proc-exec:{python_for_tables()} {program} {data}"',
            'action "local" maildir "~/Maildir" alias <aliases> userbase <users>',
            'match from any for domain "example.test" action "local"',
        ]) + "\n"
        d = make_daemon(conf, extra_args=["-P", "mda"]).start()
        replies = _rcpt_replies(port, ["team@example.test", "crash@example.test"])
        assert replies["team@example.test"][0] == 250, replies
        assert replies["crash@example.test"] == (
            424, "4.2.4 Mailing list expansion problem: <crash@example.test>")
        envs = {(e.get("mda-user"), e.get("mda-method", ""), e.get("mda-exec", "")) for e in _envelopes(d)}
        assert envs == {(_alias_runner(), "exec", "/bin/true from-proc"), ("alice", "", "")}
    finally:
        shutil.rmtree(shared, ignore_errors=True)
