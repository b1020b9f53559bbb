"""Tables in the running daemon (smtpd/table/): db files made by our makemap and by
OpenSMTPD's, ``smtpctl update table``, newaliases, and external table programs in
Python and shell speaking protocol 0.1, including ones that crash or hang.

As root, lka runs as _smtpd and opens db files and starts table programs after its
privilege drop: their directory is one smtpd's user may enter (``shared``), as a
real /etc/mail is.
"""
from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import smtplib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, wait_for
from tests.e2e.helpers import maildir_messages, userbase
from tests.oracle import opensmtpd as oracle
from tests.table_programs import python_for_tables, write_programs


@pytest.fixture
def shared():
    """A directory smtpd's user can read (pytest's own is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="pysmtpd-tables-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def tool(directory: Path, name: str) -> Path:
    """smtpctl under the name ``name`` (makemap, newaliases): its argv[0] decides."""
    path = directory / name
    path.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(REPO)!r})\n"
                    "from smtpctl.main import main\nmain()\n")
    path.chmod(0o755)
    return path


def run(*argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=60, **kw)


def rcpt(port: int, address: str) -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
        s.ehlo("client.test")
        s.mail("sender@client.test")
        code, text = s.rcpt(address)
        return code, text.decode()


def send(port: int, address: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
        s.sendmail("sender@client.test", [address], b"Subject: t\r\n\r\nhello\r\n")


def conf(base: Path, port: int, tables: str, rule: str = 'match from any for domain "example.test" action "local"') -> str:
    return (f"listen on 127.0.0.1 port {port}\n"
            f"table users {userbase(base)}\n{tables}\n"
            'action "local" maildir "~/Maildir" userbase <users> alias <aliases>\n'
            f"{rule}\n")


def program_uids(pgid: int, names: tuple[str, ...]) -> dict[int, int]:
    """{pid: real uid} of the daemon's processes whose command line names one of ``names``."""
    out = {}
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or os.getpgid(int(entry.name)) != pgid:
                continue
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            if any(name in cmdline for name in names):
                status = (entry / "status").read_text()
                out[int(entry.name)] = int(status.split("Uid:")[1].split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return out


def count(base: Path, user: str) -> int:
    return len(maildir_messages(base, user))


def test_db_aliases_from_makemap_reopened_when_rebuilt(make_daemon, tmp_path, shared):
    makemap = tool(tmp_path, "makemap")
    source = shared / "aliases"
    source.write_text("team: alice, bob\n")
    res = run(makemap, "-t", "aliases", source)
    assert res.returncode == 0, res.stderr
    port = free_port()
    base = tmp_path / "d"
    d = make_daemon(conf(base, port, f"table aliases db:{shared}/aliases.db")).start()
    send(port, "team@example.test")
    wait_for(lambda: count(base, "alice") == 1 and count(base, "bob") == 1, 20, "team delivered")
    source.write_text("team: bob\n")
    assert run(makemap, "-t", "aliases", source).returncode == 0
    send(port, "team@example.test")                 # lka reopens the replaced file
    wait_for(lambda: count(base, "bob") == 2, 20, "second delivery to bob")
    assert count(base, "alice") == 1
    assert rcpt(port, "nobody@example.test")[0] == 550
    assert d.smtpctl("update", "table", "aliases").stdout.strip() == "command succeeded"
    d.wait_log('Table "aliases" successfully updated')


def test_update_table_rereads_a_file_table(make_daemon, tmp_path, shared):
    aliases = shared / "aliases"
    aliases.write_text("postmaster: alice\n")
    aliases.chmod(0o644)
    port = free_port()
    d = make_daemon(conf(tmp_path / "d", port, f"table aliases file:{aliases}")).start()
    assert rcpt(port, "newcomer@example.test")[0] == 550
    aliases.write_text("postmaster: alice\nnewcomer: bob\n")
    assert rcpt(port, "newcomer@example.test")[0] == 550        # not read until told
    assert d.smtpctl("update", "table", "aliases").stdout.strip() == "command succeeded"
    d.wait_log('Table "aliases" successfully updated')
    assert rcpt(port, "newcomer@example.test")[0] == 250
    res = d.smtpctl("update", "table", "nosuch", check=False)
    assert (res.returncode, res.stdout.strip()) == (1, "command failed")
    d.wait_log('Lookup table not found: "nosuch"')
    aliases.write_text("postmaster: alice\nbroken\n")            # malformed: the old contents stay
    res = d.smtpctl("update", "table", "aliases", check=False)
    assert (res.returncode, res.stdout.strip()) == (1, "command failed")
    assert rcpt(port, "newcomer@example.test")[0] == 250


def test_proc_tables_in_python_and_shell_and_their_failures(make_daemon, tmp_path, shared):
    py, sh = write_programs(shared)
    (shared / "data").write_text("alias team alice, bob\nalias crash x\nalias hang x\n")
    (shared / "domains").write_text("example.test\n")
    for f in ("data", "domains"):
        (shared / f).chmod(0o644)
    port = free_port()
    base = tmp_path / "d"
    tables = (f'table aliases "proc-exec:{python_for_tables()} {py} {shared}/data"\n'
              f'table doms "proc-exec:{sh} {shared}/domains"')
    d = make_daemon(conf(base, port, tables, 'match from any for domain <doms> action "local"')).start()
    send(port, "team@example.test")
    wait_for(lambda: count(base, "alice") == 1 and count(base, "bob") == 1, 20, "team delivered")
    assert rcpt(port, "x@elsewhere.test")[0] == 550              # the shell table: not listed
    # lka started the programs after its privilege drop: they run as smtpd's user
    programs = program_uids(d.pgid, ("table-py.py", "table-sh"))
    assert len(programs) == 2, programs
    expected = pwd.getpwnam("_smtpd").pw_uid if os.geteuid() == 0 else os.getuid()
    assert set(programs.values()) == {expected}, programs

    def answered(address: str) -> bool:
        return rcpt(port, address)[0] == 250

    for bad in ("crash", "hang"):
        started = time.monotonic()
        code, text = rcpt(port, f"{bad}@example.test")
        # an alias lookup that fails: OpenSMTPD's 424 (lka_session.c), temporary, never 5xx
        assert code == 424 and "4.2.4" in text, (bad, code, text)
        if bad == "hang":
            assert time.monotonic() - started >= 5                  # waited for the program
        wait_for(lambda: answered("team@example.test"), 20, f"the table program back after {bad}")
    assert d.proc.poll() is None
    log = d.log_since_start()
    assert "table-proc: aliases" in log
    assert d.smtpctl("update", "table", "doms").stdout.strip() == "command succeeded"


def test_a_list_for_aliases_is_refused_at_start(tmp_path):
    (tmp_path / "aliases").write_text("alice\nbob\n")
    config = tmp_path / "smtpd.conf"
    config.write_text(conf(tmp_path, free_port(), f"table aliases file:{tmp_path}/aliases"))
    res = run(sys.executable, "-m", "smtpd", "-n", "-f", config, cwd=REPO)
    assert res.returncode != 0
    assert f'smtpd: {config}:4: table "aliases" may not be used for alias lookups' in res.stdout + res.stderr


def test_newaliases_rebuilds_the_db_and_tells_smtpd(make_daemon, tmp_path, shared):
    newaliases = tool(tmp_path, "newaliases")
    makemap = tool(tmp_path, "makemap")
    source = shared / "aliases"
    source.write_text("postmaster: alice\n")
    assert run(makemap, "-t", "aliases", source).returncode == 0
    port = free_port()
    d = make_daemon(conf(tmp_path / "d", port, f"table aliases db:{source}.db")).start()
    assert rcpt(port, "helpdesk@example.test")[0] == 550
    source.write_text("postmaster: alice\nhelpdesk: bob, alice\n")
    env = dict(os.environ, SMTPD_SOCKET=str(d.socket))
    res = run(newaliases, "-f", d.config, env=env)
    if os.geteuid() != 0:                                   # newaliases(8) is root's
        assert (res.returncode, res.stderr.strip()) == (1, "newaliases: need root privileges")
        return
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"{source}: 2 aliases"
    d.wait_log('Table "aliases" successfully updated')      # smtpd was told
    assert rcpt(port, "helpdesk@example.test")[0] == 250


def test_db_files_are_shared_with_opensmtpd_makemap(make_daemon, tmp_path, shared):
    """OpenSMTPD's own makemap (Debian's package, unpacked) writes a db our daemon reads,
    and reads the one ours writes."""
    try:
        root = oracle.fetch()
        if os.geteuid() != 0:
            raise oracle.Unavailable("OpenSMTPD's smtpctl must run setgid opensmtpq: needs root")
        oracle.ensure_users()
    except oracle.Unavailable as exc:
        oracle.unavailable(str(exc))
    theirs = tmp_path / "os"
    theirs.mkdir()
    (theirs / "makemap").symlink_to(root / "usr/sbin/smtpctl")   # their smtpctl, by that name
    gid = grp.getgrnam("opensmtpq").gr_gid                       # it checks its egid
    source = shared / "aliases"
    source.write_text("team: alice, bob\n# a comment\nPostmaster: alice\n")
    res = run(theirs / "makemap", "-t", "aliases", source, group=gid)
    assert res.returncode == 0, res.stderr
    port = free_port()
    base = tmp_path / "d"
    make_daemon(conf(base, port, f"table aliases db:{source}.db")).start()
    send(port, "team@example.test")
    wait_for(lambda: count(base, "alice") == 1 and count(base, "bob") == 1, 20, "team delivered")
    assert rcpt(port, "POSTMASTER@example.test")[0] == 250
    ours = tmp_path / "ours"
    assert run(tool(tmp_path, "makemap"), "-o", ours, source).returncode == 0
    res = run(theirs / "makemap", "-U", ours, group=gid)
    assert res.returncode == 0, res.stderr
    assert sorted(res.stdout.splitlines()) == ["postmaster\talice", "team\talice, bob"]


def test_debian_table_passwd_as_userbase(make_daemon, tmp_path, shared):
    """Debian 12's opensmtpd-extras table-passwd (OpenSMTPD 6's imsg protocol), unpacked
    and unchanged, answers the daemon's userbase lookups."""
    from tests.table_programs import fetch_extras
    try:
        extras = fetch_extras()
    except oracle.Unavailable as exc:
        oracle.unavailable(str(exc))
    program = shared / "table-passwd"
    shutil.copy(extras / "usr/libexec/opensmtpd/table-passwd", program)   # where _smtpd may run it
    program.chmod(0o755)
    base = tmp_path / "d"
    users = dict(re.findall(r'(\w+) = "([^"]+)"', userbase(base)))          # uid:gid:home
    passwd = shared / "passwd"
    passwd.write_text("".join(f"{name}:x:{info.split(':')[0]}:{info.split(':')[1]}::"
                              f"{info.split(':', 2)[2]}:/bin/sh\n" for name, info in users.items()))
    passwd.chmod(0o644)
    port = free_port()
    d = make_daemon(f"listen on 127.0.0.1 port {port}\n"
                    f'table passwd "proc-exec:{program} {passwd}"\n'
                    'action "local" maildir "~/Maildir" userbase <passwd>\n'
                    'match from any for domain "example.test" action "local"\n').start()
    send(port, "alice@example.test")
    wait_for(lambda: count(base, "alice") == 1, 20, "delivery through table-passwd")
    assert rcpt(port, "mallory@example.test")[0] == 550
    assert d.smtpctl("update", "table", "passwd").stdout.strip() == "command succeeded"
