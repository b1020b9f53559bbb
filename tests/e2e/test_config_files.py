"""The files a configuration names, checked by the real smtpd (smtpd -n, start and
reload): a FIFO refused at once, a config others may write or own refused, an
include loop named with its chain (smtpd/config_files.py, smtpd/parse.py)."""
from __future__ import annotations

import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port
from tests.e2e.helpers import config

RULES = 'action "local" maildir\nmatch from any for domain "example.test" action "local"\n'


def check(path: Path) -> subprocess.CompletedProcess:
    """smtpd -n on ``path``, bounded: a parser that blocks on the file fails the test."""
    return subprocess.run([sys.executable, "-m", "smtpd", "-n", "-f", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=30)


def write(path: Path, text: str, mode: int = 0o644) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_smtpd_n_refuses_what_it_must_and_says_where(tmp_path):
    good = write(tmp_path / "good.conf", RULES)
    res = check(good)
    assert (res.returncode, res.stderr) == (0, "configuration OK\n")

    fifo = tmp_path / "fifo.conf"
    os.mkfifo(fifo)
    res = check(fifo)                       # hung before: it waited for a writer
    assert (res.returncode, res.stderr) == (1, f"smtpd: {fifo}: not a regular file (a FIFO)\n")
    res = check(tmp_path)
    assert (res.returncode, res.stderr) == (1, f"smtpd: {tmp_path}: not a regular file (a directory)\n")

    shared = write(tmp_path / "shared.conf", RULES, 0o666)
    res = check(shared)
    assert (res.returncode, res.stderr) == (1, f"smtpd: {shared}: group/world writeable (mode 0666)\n")

    a, b = tmp_path / "a.conf", tmp_path / "b.conf"
    write(a, f'include "{b}"\n' + RULES)
    write(b, f'# b\ninclude "{a}"\n')
    res = check(a)
    assert (res.returncode, res.stderr) == (1, f"smtpd: {b}:2: include loop: {a}:1 -> {b}:2 -> {a}\n")

    table = write(tmp_path / "table.conf", f"table aliases file:{fifo}\n" + RULES)
    res = check(table)
    assert (res.returncode, res.stderr) == (
        1, f"smtpd: {table}:1: table file {fifo}: not a regular file (a FIFO)\n")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the file to another user")
def test_a_config_owned_by_another_user_is_refused(tmp_path):
    conf = write(tmp_path / "smtpd.conf", RULES)
    nobody = pwd.getpwnam("nobody").pw_uid
    os.chown(conf, nobody, -1)
    res = check(conf)
    assert (res.returncode, res.stderr) == (
        1, f"smtpd: {conf}: owner not root or current user (uid {nobody})\n")


def test_the_daemon_neither_starts_nor_reloads_with_a_config_others_may_write(make_daemon, tmp_path):
    d = make_daemon(config(tmp_path / "d", free_port()))
    d.config.chmod(0o666)
    d.start(wait=False)
    assert d.proc.wait(30) != 0
    assert f"{d.config}: group/world writeable (mode 0666)" in d.log_since_start()

    d.config.chmod(0o644)
    d.start()
    d.config.chmod(0o664)
    res = d.smtpctl("reload", check=False)
    assert (res.returncode, res.stdout) == (
        1, f"command failed: {d.config}: group/world writeable (mode 0664)\n")
    assert "reload failed, keeping the current configuration" in d.wait_log("reload failed")
    assert d.proc.poll() is None
    assert d.smtpctl("show", "status").returncode == 0
