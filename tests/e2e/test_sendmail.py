"""sendmail(8) and mailq end to end, as the programs that use them run them: cron-style
(a system user, no tty, no HOME, a minimal environment), s-nail, ``-bs``; the daemon
up (control's enqueue request) and down (offline/, then delivered at start); and two
users who must not be able to pass for each other.

Users run commands through setpriv.  The interpreter lives under /root here (pyenv),
which only root may enter: a Python command gets CAP_DAC_READ_SEARCH as an ambient
capability to read it, as tests/e2e/test_daemon.py does; it grants reading and
searching only, never writing, unlinking, renaming or the sticky bit (CAP_FOWNER).
The attempts to forge another user's file are made with coreutils, without it.
"""
from __future__ import annotations

import os
import pwd
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import Daemon, free_port, wait_for
from tests.e2e.helpers import config, maildir_messages, remove_test_tree

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creates system users and runs as them")

SMTPCTL = Path(sys.executable).parent / "smtpctl"       # the console script of this checkout
USERS = {"pysm-cron": "Cron Job,,,", "pysm-other": "& Other,Room 2,,"}
NO_SUCH_PORT = 9                                           # discard: nothing listens on loopback


@pytest.fixture(scope="module")
def users():
    made = []
    for name, gecos in USERS.items():
        subprocess.run(["userdel", name], capture_output=True)
        subprocess.run(["useradd", "-r", "-M", "-U", "-d", "/nonexistent", "-s", "/usr/sbin/nologin",
                        "-c", gecos, name], check=True)
        made.append(name)
    yield {name: pwd.getpwnam(name) for name in made}
    for name in made:
        subprocess.run(["userdel", name], check=True)


@pytest.fixture
def site():
    """A directory every user may traverse (pytest's own is 0700): the daemon's base,
    and bin/ with sendmail, send-mail, mailq, newaliases linked to smtpctl."""
    base = Path(tempfile.mkdtemp(prefix="pysmtpd-sendmail-"))
    os.chmod(base, 0o711)
    binary = base / "bin"
    binary.mkdir(mode=0o755)
    for name in ("sendmail", "send-mail", "mailq", "newaliases"):
        (binary / name).symlink_to(SMTPCTL)
    daemons: list[Daemon] = []
    yield base, daemons
    for d in daemons:
        d.stop()
        assert not d.children(), "processes left behind"
    remove_test_tree(base)


def daemon(site, relay: str | None = None) -> Daemon:
    base, daemons = site
    d = Daemon(base, config(base / "mail", free_port(), relay=relay))
    daemons.append(d)
    return d


def env_for(d: Daemon, **extra: str) -> dict[str, str]:
    """cron's environment, about: no HOME, no tty; where the daemon is."""
    env = {"PATH": "/usr/bin:/bin", "SHELL": "/bin/sh", "SMTPD_SOCKET": str(d.socket),
           "SMTPD_SPOOL": str(d.spool)}
    env.update(extra)
    return env


def as_user(pw, argv: list[str], env: dict, data: bytes = b"", python: bool = True) -> subprocess.CompletedProcess:
    caps = ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"] if python else []
    return subprocess.run(["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups",
                           *caps, "--", *argv], input=data, env=env, capture_output=True, cwd="/",
                          timeout=60, start_new_session=True)


def delivered(d: Daemon, user: str, count: int = 1) -> list[bytes]:
    base = d.base / "mail"
    return wait_for(lambda: len(maildir_messages(base, user)) >= count and maildir_messages(base, user),
                    30, f"{count} message(s) for {user}")


def test_cron_style_sendmail_t(site, users):
    """`echo ... | sendmail -t` as a system user: exit 0, silent, delivered to To and
    Bcc, Bcc removed, the envelope sender the invoking user whatever LOGNAME says."""
    d = daemon(site).start()
    cron = users["pysm-cron"]
    res = as_user(cron, [str(site[0] / "bin" / "sendmail"), "-t"],
                  env_for(d, LOGNAME="root", USER="root"),
                  b"To: alice@example.test\nBcc: bob@example.test\nSubject: Cron <pysm-cron@host> job\n\n"
                  b"output of the job\n")
    assert (res.returncode, res.stdout, res.stderr) == (0, b"", b"")
    for user in ("alice", "bob"):
        text = delivered(d, user)[0].decode()
        assert text.startswith("Return-Path: <pysm-cron@"), text
        assert "\nFrom: Cron Job <pysm-cron@" in text and "\nDate: " in text and "\nMessage-ID: <" in text
        assert "Bcc" not in text and "output of the job" in text
    log = d.log_since_start()
    assert f"origin=sendmail uid={cron.pw_uid}" in log
    assert "from=<root@" not in log


def test_sendmail_f_is_allowed_and_logged_with_the_real_uid(site, users):
    d = daemon(site).start()
    other = users["pysm-other"]
    res = as_user(other, [str(site[0] / "bin" / "send-mail"), "-f", "boss@example.test", "-F", "The Boss",
                          "alice@example.test"], env_for(d), b"Subject: from -f\n\nhello\n")
    assert res.returncode == 0, res.stderr
    text = delivered(d, "alice")[0].decode()
    assert text.startswith("Return-Path: <boss@example.test>") and "\nFrom: The Boss <boss@example.test>" in text
    assert f"origin=sendmail uid={other.pw_uid}" in d.log_since_start()


def test_s_nail_sends_through_our_sendmail(site, users):
    d = daemon(site).start()
    other = users["pysm-other"]
    res = as_user(other, ["s-nail", "-:/", "-S", f"mta={site[0] / 'bin' / 'sendmail'}", "-S", "sendwait",
                          "-s", "report from s-nail", "alice@example.test"],
                  env_for(d), b"the body s-nail sends\n")
    assert res.returncode == 0, res.stderr
    text = delivered(d, "alice")[0].decode()
    assert text.startswith("Return-Path: <pysm-other@")
    assert "\nSubject: report from s-nail" in text and "the body s-nail sends" in text
    # s-nail leaves From: to sendmail: the GECOS name, "&" being the login capitalised
    assert "\nFrom: Pysm-other Other <pysm-other@" in text and "\nUser-Agent: s-nail" in text, text


def test_refusals_reach_the_user(site, users):
    d = daemon(site).start()
    cron = users["pysm-cron"]
    sendmail = str(site[0] / "bin" / "sendmail")
    res = as_user(cron, [sendmail, "-t"], env_for(d), b"Subject: nobody to send to\n\nx\n")
    assert res.returncode == 70 and b"sendmail: no recipients" in res.stderr
    res = as_user(cron, [sendmail, "nobody@elsewhere.test"], env_for(d), b"Subject: s\n\nx\n")
    assert res.returncode == 70 and b"command failed: 550 5.7.1" in res.stderr, res.stderr
    res = as_user(cron, [sendmail, "-N", "SOMETIMES", "alice@example.test"], env_for(d), b"\nx\n")
    assert res.returncode == 70 and b"501 5.5.4" in res.stderr, res.stderr
    d.smtpctl("pause", "smtp")
    res = as_user(cron, [sendmail, "alice@example.test"], env_for(d), b"\nx\n")
    assert res.returncode == 70 and b"server disallowed submission request" in res.stderr
    d.smtpctl("resume", "smtp")
    # newaliases by its name, and as sendmail -bi: the tables' command (smtpctl/mapfiles.py)
    for argv in (["newaliases", "-f", "/nonexistent/smtpd.conf"], ["sendmail", "-bi", "-f", "/x"]):
        res = as_user(cron, [str(site[0] / "bin" / argv[0]), *argv[1:]], env_for(d))
        assert res.returncode == 1 and res.stderr.startswith(b"newaliases: "), (argv, res.stderr)
    assert d.proc.poll() is None


def test_sendmail_bs_speaks_smtp(site, users):
    d = daemon(site).start()
    cron = users["pysm-cron"]
    res = as_user(cron, [str(site[0] / "bin" / "sendmail"), "-bs"], env_for(d),
                  b"EHLO me\r\nMAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
                  b"Subject: over -bs\r\n\r\n..dot\r\n.\r\nQUIT\r\n")
    assert res.returncode == 0
    replies = [line[:3] for line in res.stdout.decode().splitlines()]
    assert replies[0] == "220" and replies[-4:] == ["250", "354", "250", "221"], res.stdout
    text = delivered(d, "alice")[0].decode()
    assert text.startswith("Return-Path: <pysm-cron@") and text.endswith("\n.dot\n")


def test_offline_when_down_then_delivered_and_not_forgeable(site, users):
    """Daemon down: sendmail exits 0 and leaves a file owned by its user in offline/
    (root's, 01777); another user can neither read, change, remove nor rename it, nor
    make the daemon take a file of theirs for it; at start it is delivered, sender the
    user who ran sendmail."""
    d = daemon(site).start()
    d.stop()                                # the spool exists, the daemon is down
    offline = d.spool / "offline"
    st = offline.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o1777)
    cron, other = users["pysm-cron"], users["pysm-other"]
    res = as_user(cron, [str(site[0] / "bin" / "sendmail"), "-t"], env_for(d),
                  b"To: alice@example.test\nBcc: bob@example.test\nSubject: while down\n\nkept for later\n")
    assert (res.returncode, res.stderr) == (0, b"")
    (path,) = offline.iterdir()
    st = path.lstat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode), st.st_nlink) == (cron.pw_uid, 0o600, 1)
    before = path.read_bytes()
    assert before.startswith(b"-t\nTo: alice@example.test\n")
    # the other user, with the shell's tools only
    for argv in (["cat", str(path)], ["rm", "-f", str(path)], ["mv", str(path), str(offline / "mine")],
                 ["sh", "-c", f"echo To: other@example.test >> {path}"], ["touch", str(path)]):
        res = as_user(other, argv, env_for(d), python=False)
        assert res.returncode != 0, (argv, res)
    # a hard link to it: refused by the kernel where fs.protected_hardlinks is on (the
    # default); where it is off the daemon refuses any file with two links
    # (tests/unit/test_offline.py), which holds the message back but never misattributes it
    if Path("/proc/sys/fs/protected_hardlinks").read_text().strip() == "1":
        res = as_user(other, ["ln", str(path), str(offline / "hardlink")], env_for(d), python=False)
        assert res.returncode != 0, res
    assert path.read_bytes() == before and path.lstat().st_uid == cron.pw_uid
    # what the other user can do: a symlink to it, and a file of their own
    res = as_user(other, ["ln", "-s", str(path), str(offline / "1.SYMLINKED")], env_for(d), python=False)
    assert res.returncode == 0
    res = as_user(other, [str(site[0] / "bin" / "sendmail"), "bob@example.test"], env_for(d),
                  b"Subject: other's own\n\nx\n")
    assert res.returncode == 0
    d.start()
    alice = delivered(d, "alice")[0].decode()
    assert alice.startswith("Return-Path: <pysm-cron@") and "Subject: while down" in alice
    bob = sorted(m.decode() for m in delivered(d, "bob", 2))
    assert {m.split("\n", 1)[0].split("@")[0] for m in bob} == {"Return-Path: <pysm-cron", "Return-Path: <pysm-other"}
    assert all("Bcc" not in m for m in bob)
    wait_for(lambda: not path.exists(), 10, "the enqueued file to be removed")
    assert (offline / "1.SYMLINKED").is_symlink(), "a symlink is refused and left"
    assert "1.SYMLINKED; symbolic link" in d.log_since_start()
    assert len(maildir_messages(d.base / "mail", "alice")) == 1, "the symlink did not deliver twice"


def test_mailq_reads_the_spool_when_the_daemon_is_down(site, users):
    d = daemon(site, relay=f"smtp://127.0.0.1:{NO_SUCH_PORT}").start()
    cron = users["pysm-cron"]
    res = as_user(cron, [str(site[0] / "bin" / "sendmail"), "far@remote.test"], env_for(d), b"Subject: s\n\nx\n")
    assert res.returncode == 0, res.stderr
    online = wait_for(lambda: d.queue_lines(), 20, "the envelope in the queue")
    env = {**os.environ, "SMTPD_SOCKET": str(d.socket), "SMTPD_SPOOL": str(d.spool)}
    as_bp = subprocess.run([str(site[0] / "bin" / "sendmail"), "-bp"], env=env, capture_output=True, text=True)
    assert as_bp.returncode == 0, as_bp.stderr
    # the same line, but for the seconds left before the next try, which run on
    assert [line.split("|")[:12] for line in as_bp.stdout.splitlines()] == [online[0].split("|")[:12]]
    d.stop()
    res = subprocess.run([str(site[0] / "bin" / "mailq")], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    (line,) = res.stdout.splitlines()
    fields, online_fields = line.split("|"), online[0].split("|")
    assert fields[:8] == online_fields[:8]           # evpid, src, agent, flags, sender, rcpt, dest, ctime
    assert fields[4].startswith("pysm-cron@") and fields[11:13] == ["offline", ""]
    res = as_user(cron, [str(site[0] / "bin" / "mailq")], env_for(d))
    assert res.returncode == 1 and b"need root privileges" in res.stderr


def test_control_checks_what_a_client_submits(site, users):
    """The enqueue request as any client may send it: malformed fields, a message over
    smtp max-message-size, more messages at once than a uid may submit; each refused
    alone, the daemon goes on."""
    from common.control_wire import frame, recv_frame
    from common.messages import PROTOCOL_VERSION, ClientContent, ClientEnd, ClientRequest
    from smtpctl.client import Connection
    base, daemons = site
    d = Daemon(base, config(base / "mail", free_port(), extra="smtp max-message-size 10K"))
    daemons.append(d)
    d.start()

    def submit(args: dict, data: bytes = b"Subject: s\n\nx\n", end: bool = True) -> Connection:
        conn = Connection(str(d.socket))
        conn.sock.sendall(frame(ClientRequest(version=PROTOCOL_VERSION, command="enqueue", args=args)))
        try:
            for start in range(0, len(data), 60_000):
                conn.sock.sendall(frame(ClientContent(data=data[start:start + 60_000])))
            if end:
                conn.sock.sendall(frame(ClientEnd()))
        except (BrokenPipeError, ConnectionResetError):
            pass            # control refused the request and closed: its answer is waiting
        return conn

    def result(conn: Connection):
        with conn:
            return recv_frame(conn.sock)

    assert result(submit({"recipients": "alice@example.test"})).text == "malformed enqueue request"
    assert result(submit({"recipients": ["alice@example.test"], "sender": 7})).text == "malformed enqueue request"
    assert result(submit({"recipients": ["a" * 2000]})).text == "malformed enqueue request"
    big = result(submit({"recipients": ["alice@example.test"]}, b"Subject: s\n\n" + b"x" * 20_000))
    assert (big.ok, big.text) == (False, "552 5.3.4 Message too big")
    # four messages being sent (no end yet) by one uid: a fifth is refused for now
    pending = [submit({"recipients": ["alice@example.test"]}, end=False) for _ in range(4)]
    fifth = result(submit({"recipients": ["alice@example.test"]}))
    assert fifth.text.startswith("451 4.7.0 Too many messages submitted at once")
    for conn in pending:
        conn.sock.sendall(frame(ClientEnd()))
        reply = result(conn)
        assert reply.ok and reply.text.endswith("Message accepted for delivery"), reply
    ok = result(submit({"recipients": ["bob@example.test"], "sender": "me@example.test"}))
    assert ok.ok and ok.data["msgid"] > 0
    assert len(delivered(d, "alice", 4)) == 4 and delivered(d, "bob")
    assert d.proc.poll() is None
