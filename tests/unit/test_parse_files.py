"""The files smtpd.conf names, checked as they are opened (smtpd/config_files.py):
regular files only, owner and modes, secrets, include loops; each error at the
FILE:LINE that names the file."""
from __future__ import annotations

import os
import pwd
import signal
import stat
from pathlib import Path

import pytest

from smtpd.config import ConfigError
from smtpd.config_files import file_problem
from smtpd.parse import Parser, check_secret_file, load_table_file, parse_config

RULES = "action a maildir\nmatch action a\n"


def write(path: Path, text: str, mode: int = 0o644) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def refusal(path: Path) -> str:
    with pytest.raises(ConfigError) as err:
        parse_config(path)
    return str(err.value)


@pytest.fixture
def bounded():
    """Fails a test that blocks (the old parser hung on a FIFO) instead of hanging."""
    def expire(signum, frame):
        raise TimeoutError("blocked on a file")
    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("mode", [0o666, 0o646, 0o664, 0o622])
def test_a_config_writable_by_others_is_refused(tmp_path, mode):
    conf = write(tmp_path / "smtpd.conf", RULES, mode)
    assert refusal(conf) == f"{conf}: group/world writeable (mode {mode:04o})"


@pytest.mark.parametrize("mode", [0o644, 0o600, 0o444, 0o640])
def test_a_config_only_its_owner_may_write_loads(tmp_path, mode):
    assert parse_config(write(tmp_path / "smtpd.conf", RULES, mode)).rules


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the file to another user")
def test_a_config_owned_by_another_user_is_refused(tmp_path):
    conf = write(tmp_path / "smtpd.conf", RULES)
    nobody = pwd.getpwnam("nobody").pw_uid
    os.chown(conf, nobody, -1)
    assert refusal(conf) == f"{conf}: owner not root or current user (uid {nobody})"


def test_owner_rule():
    def st(uid: int, mode: int = stat.S_IFREG | 0o644) -> os.stat_result:
        return os.stat_result((mode, 1, 1, 1, uid, 0, 0, 0, 0, 0))
    assert file_problem(st(0), False, 1000) is None                 # root's file
    assert file_problem(st(1000), False, 1000) is None              # smtpd's user's file
    assert file_problem(st(1001), False, 1000) == "owner not root or current user (uid 1001)"
    assert file_problem(st(0, stat.S_IFREG | 0o640), True, 1000) is None
    assert "readable/writeable" in file_problem(st(0, stat.S_IFREG | 0o604), True, 1000)


def test_a_fifo_directory_or_device_is_refused_at_once(tmp_path, bounded):
    fifo = tmp_path / "fifo.conf"
    os.mkfifo(fifo)
    assert refusal(fifo) == f"{fifo}: not a regular file (a FIFO)"
    assert refusal(tmp_path) == f"{tmp_path}: not a regular file (a directory)"
    conf = write(tmp_path / "smtpd.conf", f'include "{fifo}"\n' + RULES)
    assert refusal(conf) == f"{conf}:1: include {fifo}: not a regular file (a FIFO)"
    conf = write(tmp_path / "smtpd.conf", "table t file:/dev/null\n" + RULES)
    assert refusal(conf) == f"{conf}:1: table file /dev/null: not a regular file (a character device)"
    conf = write(tmp_path / "smtpd.conf", f"# the table\ntable t file:{fifo}\n" + RULES)
    assert refusal(conf) == f"{conf}:2: table file {fifo}: not a regular file (a FIFO)"


def test_includes_and_tables_writable_by_others_are_refused(tmp_path):
    inc = write(tmp_path / "inc.conf", RULES, 0o666)
    conf = write(tmp_path / "smtpd.conf", f'\ninclude "{inc}"\n')
    assert refusal(conf) == f"{conf}:2: include {inc}: group/world writeable (mode 0666)"
    aliases = write(tmp_path / "aliases", "root: alice\n", 0o662)
    conf = write(tmp_path / "smtpd.conf", f"table aliases file:{aliases}\n" + RULES)
    assert refusal(conf) == f"{conf}:1: table file {aliases}: group/world writeable (mode 0662)"


def test_an_include_loop_is_named_with_its_chain(tmp_path):
    a, b, c = (tmp_path / f"{n}.conf" for n in "abc")
    write(a, f'# a\ninclude "{b}"\n' + RULES)
    write(b, f'include "{c}"\n')
    write(c, f'\n\ninclude "{a}"\n')
    err = refusal(a)
    assert err == f"{c}:3: include loop: {a}:2 -> {b}:1 -> {c}:3 -> {a}"
    write(a, f'include "{a}"\n' + RULES)
    assert refusal(a) == f"{a}:1: include loop: {a}:1 -> {a}"
    # the same file by another name is the same file
    (tmp_path / "link.conf").symlink_to(a)
    write(a, f'include "{tmp_path / "link.conf"}"\n' + RULES)
    assert refusal(a) == f"{a}:1: include loop: {a}:1 -> {tmp_path / 'link.conf'}"


def test_a_file_included_twice_without_a_loop_is_fine(tmp_path):
    common = write(tmp_path / "common.conf", "table t { a }\n")
    one = write(tmp_path / "one.conf", f'include "{common}"\n')
    top = write(tmp_path / "smtpd.conf", f'include "{one}"\n' + RULES)
    assert parse_config(top).tables["t"].values == ["a"]
    # (a second include of common.conf would define table t twice: that is the table's error)
    write(top, f'include "{one}"\ninclude "{common}"\n' + RULES)
    assert refusal(top) == f'{common}:1: table "t" already defined'


def test_nesting_is_bounded(tmp_path):
    files = [tmp_path / f"n{i}.conf" for i in range(13)]
    for here, there in zip(files, files[1:]):
        write(here, f'include "{there}"\n')
    write(files[-1], RULES)
    err = refusal(files[0])
    # the top file and ten levels of includes are read; the eleventh level is refused
    assert err.startswith(f"{files[10]}:1: include: nested more than 10 deep: {files[0]}:1 -> ")
    assert err.endswith(f"{files[9]}:1 -> {files[10]}:1 -> {files[11]}")


@pytest.mark.parametrize("mode, ok", [(0o600, True), (0o640, True), (0o400, True), (0o740, True),
                                      (0o644, False), (0o660, False), (0o650, False), (0o604, False)])
def test_secret_files_are_at_most_0740(tmp_path, mode, ok):
    key = write(tmp_path / "server.key", "-----BEGIN PRIVATE KEY-----\n", mode)
    parser = Parser(str(tmp_path / "smtpd.conf"), None)
    parser.line = 7
    creds = write(tmp_path / "creds", "alice $2b$hash\n", mode)
    if ok:
        check_secret_file(str(key), parser)
        assert load_table_file(creds, parser, secret=True) == {"alice": "$2b$hash"}
        return
    with pytest.raises(ConfigError) as err:
        check_secret_file(str(key), parser)
    assert str(err.value) == (f"{tmp_path}/smtpd.conf:7: {key}: group/world readable/writeable "
                              f"(mode {mode:04o}): a file holding secrets must be at most 0740")
    with pytest.raises(ConfigError, match="a file holding secrets"):
        load_table_file(creds, parser, secret=True)
    if not mode & 0o022:                                # not a secret: others may read it
        assert load_table_file(creds, parser) == {"alice": "$2b$hash"}


def test_secret_file_missing_or_not_regular(tmp_path, bounded):
    parser = Parser(str(tmp_path / "smtpd.conf"), None)
    parser.line = 3
    with pytest.raises(ConfigError, match=r"smtpd.conf:3: .*/nokey: No such file or directory"):
        check_secret_file(tmp_path / "nokey", parser)
    os.mkfifo(tmp_path / "fifo.key", 0o600)
    with pytest.raises(ConfigError, match=r"fifo.key: not a regular file \(a FIFO\)"):
        check_secret_file(tmp_path / "fifo.key", parser)
