"""The daemon as a whole: processes, privilege separation, signals, config checks."""
from __future__ import annotations

import os
import pwd
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, free_port, wait_for
from tests.e2e.helpers import config, maildir_messages, send, unprivileged_daemon

CHILDREN = ("control", "lka", "queue", "scheduler", "pony")


def proc_ids(pid: int) -> tuple[int, int, list[int]]:
    status = open(f"/proc/{pid}/status").read().splitlines()
    fields = {line.split(":")[0]: line.split(":", 1)[1].split() for line in status}
    return int(fields["Uid"][0]), int(fields["Gid"][0]), [int(g) for g in fields["Groups"]]


def test_all_processes_run_with_titles_and_sigterm_stops_them(make_daemon, tmp_path):
    d = make_daemon(config(tmp_path / "d", free_port())).start()
    titles = d.children()
    assert set(titles) == {"smtpd: [priv]", *(f"smtpd: {c}" for c in CHILDREN)}, titles
    start = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(5) == 0
    assert time.monotonic() - start < 5
    wait_for(lambda: not d.children(), 5, "every process to exit")
    assert "Exiting" in d.log()
    assert not d.socket.exists()


def test_a_killed_child_brings_the_daemon_down_with_a_log_line(make_daemon, tmp_path):
    d = make_daemon(config(tmp_path / "d", free_port())).start()
    queue_pid = d.children()["smtpd: queue"]
    os.kill(queue_pid, signal.SIGKILL)
    assert d.proc.wait(10) != 0
    wait_for(lambda: not d.children(), 5, "no orphan process")
    assert "lost child: queue terminated; signal 9" in d.log()


def test_smtpctl_stop(make_daemon, tmp_path):
    d = make_daemon(config(tmp_path / "d", free_port())).start()
    assert d.smtpctl("stop").stdout.strip() == "command succeeded"
    assert d.proc.wait(10) == 0
    wait_for(lambda: not d.children(), 5, "every process to exit")


def test_bad_config_is_reported_with_file_and_line(tmp_path):
    bad = tmp_path / "bad.conf"
    bad.write_text("listen on 127.0.0.1 port 2525\n\nmatch from any for any actoin \"x\"\n")
    res = subprocess.run([sys.executable, "-m", "smtpd", "-n", "-f", str(bad)], cwd=REPO,
                         capture_output=True, text=True, timeout=30)
    assert res.returncode != 0
    assert f"{bad}:3:" in res.stderr, res.stderr
    good = tmp_path / "good.conf"
    good.write_text(config(tmp_path, 2525))
    res = subprocess.run([sys.executable, "-m", "smtpd", "-n", "-f", str(good)], cwd=REPO,
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and "configuration OK" in res.stderr, res.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="privilege separation needs root; CI runs as root")
def test_privilege_separation_as_root(make_daemon, tmp_path):
    smtpd, smtpq = pwd.getpwnam("_smtpd"), pwd.getpwnam("_smtpq")
    port = free_port()
    base = tmp_path / "d"
    base.mkdir()
    d = make_daemon(config(base, port)).start()
    procs = d.children()
    assert proc_ids(procs["smtpd: [priv]"])[0] == 0
    for child in ("control", "lka", "scheduler", "pony"):
        assert proc_ids(procs[f"smtpd: {child}"]) == (smtpd.pw_uid, smtpd.pw_gid, []), child
    assert proc_ids(procs["smtpd: queue"]) == (smtpq.pw_uid, smtpq.pw_gid, [])
    st = os.stat(d.spool / "queue")
    assert (st.st_uid, st.st_mode & 0o777) == (smtpq.pw_uid, 0o700)
    # mail still flows, and the Maildir belongs to the user it was delivered for
    send(port, "a@remote.test", ["alice@example.test"])
    wait_for(lambda: maildir_messages(base, "alice"), 20, "delivery as the user")
    new = base / "home" / "alice" / "Maildir" / "new"
    owner = os.stat(next(new.iterdir())).st_uid
    assert owner == pwd.getpwnam("nobody").pw_uid


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start the daemon as another user")
def test_unprivileged_mode_as_a_normal_user(tmp_path):
    """Started by a normal user, the same processes run as that user, no dropping, and
    mail flows (tests/e2e/helpers.py unprivileged_daemon: nobody, through setpriv)."""
    nobody = pwd.getpwnam("nobody")
    with unprivileged_daemon(lambda base, port: config(base / "mail", port)) as (d, base, port):
        procs = d.children()
        assert set(procs) == {"smtpd: [priv]", *(f"smtpd: {c}" for c in CHILDREN)}, procs
        for title, pid in procs.items():
            assert proc_ids(pid) == (nobody.pw_uid, nobody.pw_gid, []), title
        assert (base / "spool" / "queue").stat().st_uid == nobody.pw_uid
        send(port, "a@remote.test", ["alice@example.test"])
        wait_for(lambda: maildir_messages(base / "mail", "alice"), 20, "delivery as the daemon's user")
        new = base / "mail" / "home" / "alice" / "Maildir" / "new"
        assert all(p.stat().st_uid == nobody.pw_uid for p in new.iterdir())
        assert d.smtpctl("show", "status").stdout.splitlines() == ["MDA running", "MTA running", "SMTP running"]
