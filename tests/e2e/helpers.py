"""Configurations and mail helpers for the end-to-end tests."""
from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import smtplib
import tempfile
from pathlib import Path


def userbase(base: Path, users=("alice", "bob")) -> str:
    """An inline userbase table: the test users live under ``base`` and map to the
    current uid/gid (unprivileged) or to nobody's ids when the daemon runs as root."""
    uid, gid = os.getuid(), os.getgid()
    base.mkdir(parents=True, exist_ok=True)
    homes = base / "home"
    if uid == 0:
        # Delivery runs as the user: the homes must be reachable by nobody, which
        # pytest's private temporary directory is not.
        nobody = pwd.getpwnam("nobody")
        uid, gid = nobody.pw_uid, nobody.pw_gid
        if not homes.exists():
            real = Path(tempfile.mkdtemp(prefix="pysmtpd-homes-"))
            os.chmod(real, 0o711)
            homes.symlink_to(real)
    entries = []
    for user in users:
        home = homes / user
        home.mkdir(parents=True, exist_ok=True)
        os.chown(home, uid, gid) if os.getuid() == 0 else None
        entries.append(f'{user} = "{uid}:{gid}:{home.resolve()}"')
    return "{ " + ", ".join(entries) + " }"


def config(base: Path, port: int, *, relay: str | None = None, extra: str = "",
           relay_rule: str = "match from local for any action \"outbound\"") -> str:
    lines = [
        "# pysmtpd end-to-end test configuration",
        f"listen on 127.0.0.1 port {port}",
        f"table users {userbase(base)}",
        'action "local" maildir "~/Maildir" userbase <users>',
        'match from any for domain "example.test" action "local"',
    ]
    if relay:
        lines.insert(3, f'action "outbound" relay host "{relay}"')
        lines.append(relay_rule)
    if extra:
        lines.append(extra)
    return "\n".join(lines) + "\n"


def maildir_messages(base: Path, user: str) -> list[bytes]:
    new = base / "home" / user / "Maildir" / "new"
    if not new.is_dir():
        return []
    return [p.read_bytes() for p in sorted(new.iterdir())]


def send(port: int, sender: str, rcpts: list[str], body: str = "Subject: test\n\nhello\n") -> str:
    """Send one message; returns the DATA reply text (raises on refusal)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.test")
        code, text = s.mail(sender)
        assert code == 250, (code, text)
        for rcpt in rcpts:
            code, text = s.rcpt(rcpt)
            assert code == 250, (rcpt, code, text)
        # smtplib sends bytes as they are: give it CRLF lines, as a real client does.
        code, text = s.data(body.replace("\n", "\r\n").encode())
        assert code == 250, (code, text)
        return text.decode()


def remove_test_tree(base: Path) -> None:
    """A test's directory made outside pytest's (for other users to reach), with the
    homes userbase() made for it when the daemon ran as root."""
    homes = base / "mail" / "home"
    if homes.is_symlink():
        shutil.rmtree(homes.resolve(), ignore_errors=True)
    shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def unprivileged_daemon(make_config):
    """A daemon started by a normal user (nobody, through setpriv), in a directory of its
    own: yields (daemon, base, port); stopped and removed after.  The one capability it
    keeps (CAP_DAC_READ_SEARCH, ambient) only lets it read the interpreter, which lives
    under /root here, and changes no code path (pysmtpd decides on the effective uid).
    ``make_config(base, port)`` gives the configuration's text."""
    from tests.conftest import Daemon, free_port
    nobody = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="pysmtpd-unpriv-"))
    d = None
    try:
        os.chown(base, nobody.pw_uid, nobody.pw_gid)
        port = free_port()
        d = Daemon(base, make_config(base, port), prefix=[
            "setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups",
            "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"])
        d.start()
        yield d, base, port
    finally:
        if d is not None:
            d.stop()
            assert not d.children(), "processes left behind"
        remove_test_tree(base)
