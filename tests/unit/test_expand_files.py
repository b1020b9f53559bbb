"""Alias lines (smtpd/expand_parse.py) and the parent's checked reading of .forward and
:include: files (smtpd/forward.py), on real files."""
from __future__ import annotations

import os
import pwd
import threading

import pytest

from smtpd import forward
from smtpd.expand import MAX_FORWARD_SIZE
from smtpd.expand_parse import (
    ADDRESS, ERROR, FILENAME, FILTER, INCLUDE, USERNAME, LineError, Target, file_lines, parse_line, split_line,
)

# --- alias lines -------------------------------------------------------------------------


def test_items_split_on_commas_outside_quotes_and_escapes():
    assert split_line(' alice , "|cmd a, b", \'x,y\', c\\,d,, ') == ["alice", '"|cmd a, b"', "'x,y'", "c,d"]
    for bad in ('"open', "'open", "trailing\\"):
        with pytest.raises(LineError):
            split_line(bad)


def test_each_kind_of_target_in_opensmtpds_order():
    assert parse_line('error:550 No, :include:/etc/list, |/bin/cat -n, "|/bin/x y", /var/mail/f, '
                      'u.s-e_r+x, a!#b@ex-ample.test') == [
        Target(ERROR, "550 No"), Target(INCLUDE, "/etc/list"), Target(FILTER, "/bin/cat -n"),
        Target(FILTER, "/bin/x y"), Target(FILENAME, "/var/mail/f"), Target(USERNAME, "u.s-e_r+x"),
        Target(ADDRESS, "a!#b@ex-ample.test")]
    assert parse_line("include:/a, :INCLUDE:/b, :ERROR:421 4.0.0 x") == [
        Target(INCLUDE, "/a"), Target(INCLUDE, "/b"), Target(ERROR, "421 4.0.0 x")]
    assert parse_line("alice, :include:/etc/list", includes=False) == [Target(USERNAME, "alice")]


@pytest.mark.parametrize("item", [
    "error:650 x", "error:55 x", "error:550x", "error:550 ", ":include:relative", '"|no end',
    "a b", "@domain", "user@", "x@do;main", "us(er)@x.test", "ünïcode", "a;b",
])
def test_invalid_items_make_the_line_invalid(item):
    with pytest.raises(LineError):
        parse_line(f"alice, {item}")


def test_file_lines_comments_and_continuations():
    text = "# comment\nalice, \\\n bob\n\n  \ncarol # note\n\\#literal\n"
    assert file_lines(text) == ["alice,  bob", "carol ", "\\#literal"]


# --- reading .forward and :include: files ------------------------------------------------

def _home(tmp_path, mode=0o755):
    home = tmp_path / "home"
    home.mkdir()
    os.chmod(home, mode)
    return home


def test_a_forward_is_read_and_absent_is_absent(tmp_path):
    home = _home(tmp_path)
    assert forward.read_forward("u", str(home), os.getuid()) == ("absent", "")
    (home / ".forward").write_text("bob\n")
    os.chmod(home / ".forward", 0o644)
    assert forward.read_forward("u", str(home), os.getuid()) == ("ok", "bob\n")
    assert forward.read_forward("u", str(tmp_path / "no-such-home"), os.getuid()) == ("absent", "")


def test_a_symlinked_forward_is_refused(tmp_path):
    home = _home(tmp_path)
    target = tmp_path / "elsewhere"
    target.write_text("bob\n")
    (home / ".forward").symlink_to(target)
    assert forward.read_forward("u", str(home), os.getuid())[0] == "permfail"


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666])
def test_a_forward_others_may_write_is_refused(tmp_path, mode):
    home = _home(tmp_path)
    (home / ".forward").write_text("bob\n")
    os.chmod(home / ".forward", mode)
    assert forward.read_forward("u", str(home), os.getuid())[0] == "permfail"


def test_a_home_others_may_write_is_refused_and_a_sticky_one_waits(tmp_path):
    home = _home(tmp_path, 0o777)
    (home / ".forward").write_text("bob\n")
    os.chmod(home, 0o777)
    assert forward.read_forward("u", str(home), os.getuid())[0] == "permfail"
    os.chmod(home, 0o1777)
    assert forward.read_forward("u", str(home), os.getuid())[0] == "tempfail"


def test_a_forward_that_is_not_a_regular_file_is_refused_without_hanging(tmp_path):
    home = _home(tmp_path)
    os.mkfifo(home / ".forward", 0o600)
    result = []
    reader = threading.Thread(target=lambda: result.append(forward.read_forward("u", str(home), os.getuid())))
    reader.start()
    reader.join(10)
    assert not reader.is_alive() and result[0][0] == "permfail"
    os.unlink(home / ".forward")
    (home / ".forward").mkdir()
    assert forward.read_forward("u", str(home), os.getuid())[0] == "permfail"


def test_a_forward_over_the_size_limit_waits(tmp_path):
    home = _home(tmp_path)
    (home / ".forward").write_text("#" * MAX_FORWARD_SIZE)
    assert forward.read_forward("u", str(home), os.getuid())[0] == "tempfail"


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give files to another user")
def test_a_forward_someone_else_owns_is_refused_as_root(tmp_path):
    nobody = pwd.getpwnam("nobody")
    home = _home(tmp_path)
    os.chown(home, nobody.pw_uid, nobody.pw_gid)
    (home / ".forward").write_text("bob\n")
    os.chown(home / ".forward", nobody.pw_uid, nobody.pw_gid)
    assert forward.read_forward("nobody", str(home), nobody.pw_uid)[0] == "ok"
    os.chown(home / ".forward", 0, 0)                   # root may own it
    assert forward.read_forward("nobody", str(home), nobody.pw_uid)[0] == "ok"
    daemon = pwd.getpwnam("daemon")
    os.chown(home / ".forward", daemon.pw_uid, daemon.pw_gid)
    assert forward.read_forward("nobody", str(home), nobody.pw_uid)[0] == "permfail"
    os.chown(home / ".forward", nobody.pw_uid, nobody.pw_gid)
    os.chown(home, daemon.pw_uid, daemon.pw_gid)        # nor the home
    assert forward.read_forward("nobody", str(home), nobody.pw_uid)[0] == "permfail"


def test_an_include_file_is_read_with_the_same_checks(tmp_path):
    path = tmp_path / "list"
    path.write_text("alice\nbob\n")
    os.chmod(path, 0o644)
    assert forward.read_include(str(path)) == ("ok", "alice\nbob\n")
    os.chmod(path, 0o666)
    assert forward.read_include(str(path))[0] == "permfail"
    assert forward.read_include(str(tmp_path / "missing"))[0] == "absent"
    assert forward.read_include("relative/list")[0] == "permfail"
    (tmp_path / "link").symlink_to(path)
    assert forward.read_include(str(tmp_path / "link"))[0] == "permfail"


def test_a_home_on_a_local_disk_is_told_from_one_that_may_wait_on_a_network(tmp_path):
    """The parent reads a .forward on its loop only for a home on_local_fs says is on a
    local disk: statfs's type of the path, as stat(1) reports it, is in the list;
    /proc (not a disk) and a path that does not exist are not."""
    import subprocess
    kind = int(subprocess.run(["stat", "-f", "-c", "%t", str(tmp_path)], capture_output=True,
                              text=True, check=True).stdout, 16)
    assert forward.on_local_fs(str(tmp_path)) == (kind in forward.LOCAL_FS_TYPES)
    assert forward.on_local_fs("/proc") is False
    assert forward.on_local_fs(str(tmp_path / "missing")) is False
    status, text, local = forward.read_forward_learning_fs("u", str(tmp_path), os.getuid())
    assert (status, text, local) == ("absent", "", kind in forward.LOCAL_FS_TYPES)
