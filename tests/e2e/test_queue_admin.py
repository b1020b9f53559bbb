"""Queue administration with smtpctl against the real daemon: show envelope/message,
pause/resume envelope, schedule, remove, discover, uncorrupt, and corrupt spool files
(moved to corrupt/, logged once, the rest of the queue carries on)."""
from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, wait_for
from tests.e2e.helpers import config, maildir_messages, send
from tests.e2e.test_stats import _as_user, _smtpctl_runs


def _queued(d) -> dict[str, list[str]]:
    """{evpid: show queue fields} of what the daemon lists."""
    return {line.split("|")[0]: line.split("|") for line in d.queue_lines()}


def _msgdir(d, msgid: str) -> Path:
    return d.spool / "queue" / msgid[:2] / msgid


def _send_and_wait(d, port: int, rcpts: list[str], n_before: int) -> list[str]:
    """Send one message; returns the evpids it added to show queue."""
    before = set(_queued(d))
    send(port, "sender@remote.test", rcpts)
    wait_for(lambda: len(_queued(d)) == n_before + len(rcpts), 20, "the envelopes to be listed")
    return sorted(set(_queued(d)) - before)


def _out(d, *words: str) -> str:
    return d.smtpctl(*words).stdout


def _stats(d) -> dict[str, str]:
    return dict(line.split("=", 1) for line in _out(d, "show", "stats").splitlines())


def _scheduler_counts(d) -> tuple[str, str, str]:
    s = _stats(d)
    return (s.get("scheduler.envelope", "0"), s.get("scheduler.envelope.incoming", "0"),
            s.get("scheduler.envelope.inflight", "0"))      # a counter never moved is not listed


def test_show_pause_resume_schedule_remove(make_daemon, tmp_path):
    sockdir = Path(tempfile.mkdtemp(prefix="pysmtpd-ctl-"))
    try:
        os.chmod(sockdir, 0o711)        # reachable by nobody, for the refusal at the end
        port = free_port()
        d = make_daemon(config(tmp_path / "d", port), extra_args=["-P", "mda"])
        d.socket = sockdir / "ctl.sock"
        d.start()
        m1 = _send_and_wait(d, port, ["alice@example.test", "bob@example.test"], 0)
        m2 = _send_and_wait(d, port, ["bob@example.test"], 2)
        msg1, msg2 = m1[0][:8], m2[0][:8]
        assert {e[:8] for e in m1} == {msg1} and msg1 != msg2

        # show envelope / show message: the files as they are in the spool
        env_file = (_msgdir(d, msg1) / m1[0]).read_bytes()
        res = d.smtpctl("show", "envelope", m1[0])
        assert res.stdout.encode() == env_file and res.stdout.startswith("version: 3\n")
        body = (_msgdir(d, msg1) / "message").read_bytes()
        assert b"Subject: test" in body
        assert _out(d, "show", "message", msg1).encode() == body
        assert _out(d, "sh", "mes", m1[1]).encode() == body          # an evpid names its message
        unknown = msg2 + "0badf00d"
        res = d.smtpctl("show", "envelope", unknown, check=False)
        assert (res.returncode, res.stdout, res.stderr) == (
            1, "", "smtpctl: fopen: No such file or directory\n")
        res = d.smtpctl("show", "message", "0badf00d", check=False)
        assert (res.returncode, res.stderr) == (1, "smtpctl: fopen: No such file or directory\n")

        # bad ids: a clear error, exit 1, nothing sent
        for words, text in ((["show", "envelope", msg1], "invalid envelope id"),
                            (["remove", "xyz"], "invalid message or envelope id"),
                            (["schedule", "0000000000000000"], "invalid message or envelope id"),
                            (["pause", "envelope", "12345"], "invalid message or envelope id"),
                            (["uncorrupt", m1[0]], "invalid message id"),
                            (["show", "queue", "abc"], "invalid message id")):
            res = d.smtpctl(*words, check=False)
            assert res.returncode == 1 and res.stderr.startswith(f"smtpctl: {text}: "), (words, res)

        # pause envelope: the suspend flag in show queue (text and JSON)
        assert _out(d, "pause", "envelope", msg1) == "2 envelopes paused\n"
        assert _out(d, "pause", "envelope", msg1) == "0 envelope paused\n"     # already paused
        q = _queued(d)
        assert [q[e][3] for e in m1] == ["suspend", "suspend"] and q[m2[0]][3] == ""
        rows = {r["evpid"]: r for r in map(json.loads, _out(d, "show", "queue", "--json").splitlines())}
        assert set(rows) == set(q)
        assert rows[m1[0]]["flags"] == ["suspend"] and rows[m2[0]]["flags"] == []
        assert rows[m2[0]]["runstate"] == "pending" and rows[m2[0]]["rcpt"] == "bob@example.test"
        assert _out(d, "pause", "envelope", "all") == "1 envelope paused\n"
        assert _out(d, "resume", "envelope", m1[0]) == "1 envelope resumed\n"
        q = _queued(d)
        assert q[m1[0]][3] == "" and q[m1[1]][3] == "suspend" and q[m2[0]][3] == "suspend"
        assert _out(d, "resume", "envelope", "all") == "2 envelopes resumed\n"
        assert _out(d, "resume", "envelope", "all") == "0 envelope resumed\n"
        assert all(f[3] == "" for f in _queued(d).values())

        # show queue MSGID: only that message's envelopes
        assert sorted(l.split("|")[0] for l in _out(d, "show", "queue", msg1).splitlines()) == m1
        assert [l.split("|")[0] for l in _out(d, "show", "queue", msg2).splitlines()] == m2
        assert _out(d, "show", "queue", "0badf00d") == ""

        # schedule: counts by msgid, evpid and all, plural only above one
        assert _out(d, "schedule", msg1) == "2 envelopes scheduled\n"
        assert _out(d, "schedule", m2[0]) == "1 envelope scheduled\n"
        assert _out(d, "schedule", unknown) == "0 envelope scheduled\n"
        assert _out(d, "schedule", "all") == "3 envelopes scheduled\n"

        # remove: by evpid, by msgid, unknown; the rest is delivered once mda resumes
        assert _out(d, "remove", m1[0]) == "1 envelope removed\n"
        assert _out(d, "remove", unknown) == "0 envelope removed\n"
        assert _out(d, "remove", msg2) == "1 envelope removed\n"
        wait_for(lambda: list(_queued(d)) == [m1[1]], 20, "the removals")
        assert not (_msgdir(d, msg1) / m1[0]).exists() and not _msgdir(d, msg2).exists()
        log = d.log_since_start()
        assert f"Remove for {m1[0]}" in log and "stat=Removed by administrator" in log

        # another user may not read the spool through control
        nobody = pwd.getpwnam("nobody")
        commands = [["show", "message", msg1], ["show", "envelope", m1[1]],
                    ["pause", "envelope", "all"], ["discover", msg1], ["uncorrupt", msg1]]
        results = _as_user(nobody.pw_uid, nobody.pw_gid, _smtpctl_runs(str(d.socket), commands))
        for words, code, out, err in results:
            assert (code, out, err) == (1, "", "smtpctl: need root privileges\n"), words
        assert f"show message refused to uid {nobody.pw_uid}" in d.log_since_start()

        kept = _queued(d)[m1[1]][5].split("@")[0]
        gone = {"alice": "bob", "bob": "alice"}[kept]
        assert _out(d, "resume", "mda") == "command succeeded\n"
        wait_for(lambda: maildir_messages(tmp_path / "d", kept), 20, "the kept envelope's delivery")
        wait_for(lambda: d.queue_lines() == [], 20, "the queue to drain")
        assert len(maildir_messages(tmp_path / "d", kept)) == 1
        assert maildir_messages(tmp_path / "d", gone) == []           # removed, never delivered

        # a message of several MB comes through in pieces, byte for byte
        assert _out(d, "pause", "mda") == "command succeeded\n"
        big_body = "Subject: big\n\n" + "".join(f"line {i:07d} {'x' * 60}\n" for i in range(45000))
        send(port, "sender@remote.test", ["alice@example.test"], big_body)
        (big,) = wait_for(lambda: list(_queued(d)), 20, "the big message to be listed")
        big_file = (_msgdir(d, big[:8]) / "message").read_bytes()
        assert len(big_file) > 3 * 1024 * 1024
        res = subprocess.run([sys.executable, "-m", "smtpctl", "--socket", str(d.socket), "show",
                              "message", big], cwd=REPO, capture_output=True, timeout=60)
        assert res.returncode == 0 and res.stdout == big_file
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)


def _copy_envelope(src: Path, dest: Path, old_user: str, new_user: str) -> None:
    """An envelope put into the spool by hand: same owner and mode as the queue's own."""
    text = src.read_text().replace(f"{old_user}@", f"{new_user}@").replace(
        f"mda-user: {old_user}", f"mda-user: {new_user}")
    dest.write_text(text)
    st = src.stat()
    os.chown(dest, st.st_uid, st.st_gid)
    os.chmod(dest, 0o600)


def test_discover_envelopes_put_into_the_queue_by_hand(make_daemon, tmp_path):
    port = free_port()
    d = make_daemon(config(tmp_path / "d", port), extra_args=["-P", "mda"]).start()
    (evpid,) = _send_and_wait(d, port, ["alice@example.test"], 0)
    msgid = evpid[:8]
    new = msgid + "0000beef"
    _copy_envelope(_msgdir(d, msgid) / evpid, _msgdir(d, msgid) / new, "alice", "bob")
    assert list(_queued(d)) == [evpid]                     # the scheduler does not know it
    assert _out(d, "discover", new) == "1 envelope discovered\n"
    q = wait_for(lambda: len(_queued(d)) == 2 and _queued(d), 20, "the discovered envelope")
    assert q[new][5] == "bob@example.test" and q[new][11] == "pending"
    # the whole message: both loaded, known ones ignored by the scheduler
    assert _out(d, "discover", msgid) == "2 envelopes discovered\n"
    assert _out(d, "discover", "0badf00d") == "0 envelopes discovered\n"
    assert _out(d, "discover", msgid + "00000001") == "0 envelopes discovered\n"
    assert sorted(_queued(d)) == sorted([evpid, new])
    assert _scheduler_counts(d) == ("2", "0", "0")       # the known ones were not counted again
    assert _out(d, "resume", "mda") == "command succeeded\n"
    wait_for(lambda: maildir_messages(tmp_path / "d", "alice") and maildir_messages(tmp_path / "d", "bob"),
             20, "both deliveries")
    wait_for(lambda: d.queue_lines() == [], 20, "the queue to drain")
    assert len(maildir_messages(tmp_path / "d", "alice")) == 1
    assert len(maildir_messages(tmp_path / "d", "bob")) == 1
    assert not _msgdir(d, msgid).exists()


def test_corrupt_envelope_at_start_then_uncorrupt(make_daemon, tmp_path):
    port = free_port()
    d = make_daemon(config(tmp_path / "d", port), extra_args=["-P", "mda"]).start()
    (bad,) = _send_and_wait(d, port, ["alice@example.test"], 0)
    (good,) = _send_and_wait(d, port, ["bob@example.test"], 1)
    d.stop()
    msgid = bad[:8]
    path = _msgdir(d, msgid) / bad
    original = path.read_bytes()
    path.write_bytes(b"this is not an envelope\n\xff\n")

    d.extra_args = []                                    # mda running this time
    d.start()
    log = d.wait_log(f"corrupt message {msgid} moved to corrupt/{msgid}")
    wait_for(lambda: maildir_messages(tmp_path / "d", "bob"), 20, "the other message's delivery")
    wait_for(lambda: d.queue_lines() == [], 20, "the queue to be listed empty")
    moved = d.spool / "corrupt" / msgid
    assert sorted(p.name for p in moved.iterdir()) == sorted([bad, "message"])
    assert not _msgdir(d, msgid).exists()
    assert maildir_messages(tmp_path / "d", "alice") == []
    assert _out(d, "schedule", "all") == "0 envelope scheduled\n"
    assert d.log_since_start().count(f"corrupt message {msgid}") == 1, log
    assert f"envelope {bad}: not UTF-8" in log

    # uncorrupt while still broken: back to corrupt/, refused
    res = d.smtpctl("uncorrupt", msgid, check=False)
    assert res.returncode == 1 and res.stdout.startswith(f"command failed: message {msgid} is corrupt"), res
    assert moved.is_dir() and not _msgdir(d, msgid).exists()
    # fixed by the admin: back in the queue and delivered
    (moved / bad).write_bytes(original)
    assert _out(d, "uncorrupt", msgid) == "command succeeded\n"
    wait_for(lambda: maildir_messages(tmp_path / "d", "alice"), 20, "delivery after uncorrupt")
    wait_for(lambda: d.queue_lines() == [], 20, "the queue to drain")
    assert not moved.exists()
    res = d.smtpctl("uncorrupt", msgid, check=False)
    assert (res.returncode, res.stdout) == (1, f"command failed: no message {msgid} in corrupt/\n")
    assert len(maildir_messages(tmp_path / "d", "bob")) == 1
    assert d.log_since_start().count("moved to corrupt/") == 2      # at start, at the refused uncorrupt
    assert d.proc.poll() is None and good


def test_corrupt_files_found_at_delivery_time(make_daemon, tmp_path):
    port = free_port()
    d = make_daemon(config(tmp_path / "d", port), extra_args=["-P", "mda"]).start()
    no_body = _send_and_wait(d, port, ["alice@example.test", "bob@example.test"], 0)
    (bad_env,) = _send_and_wait(d, port, ["alice@example.test"], 2)
    (good,) = _send_and_wait(d, port, ["bob@example.test"], 3)
    msg_nobody, msg_badenv = no_body[0][:8], bad_env[:8]
    os.rename(_msgdir(d, msg_nobody) / "message", tmp_path / "message.saved")
    (_msgdir(d, msg_badenv) / bad_env).write_bytes(b"version: 3\ngarbage\n")

    assert _out(d, "resume", "mda") == "command succeeded\n"
    wait_for(lambda: maildir_messages(tmp_path / "d", "bob"), 20, "the good message's delivery")
    wait_for(lambda: d.queue_lines() == [], 20, "the queue to be listed empty")
    log = d.wait_log(f"corrupt message {msg_badenv} moved to corrupt/{msg_badenv}")
    log = d.wait_log(f"corrupt message {msg_nobody} moved to corrupt/{msg_nobody}")
    for msgid in (msg_nobody, msg_badenv):
        assert log.count(f"corrupt message {msgid}") == 1, log
        assert (d.spool / "corrupt" / msgid).is_dir() and not _msgdir(d, msgid).exists()
    assert sorted(p.name for p in (d.spool / "corrupt" / msg_nobody).iterdir()) == no_body
    # forgotten by the scheduler (in flight or not), without counting a delivery
    wait_for(lambda: _scheduler_counts(d) == ("0", "0", "0"), 20, "the scheduler's counters")
    assert _stats(d).get("scheduler.delivery.permfail", "0") == "0"
    assert maildir_messages(tmp_path / "d", "alice") == []
    assert len(maildir_messages(tmp_path / "d", "bob")) == 1
    assert d.proc.poll() is None and good


@pytest.mark.parametrize("words", [["show", "envelope", "0123456789abcdef"], ["uncorrupt", "01234567"]])
def test_daemon_not_running(tmp_path, words):
    res = subprocess.run([sys.executable, "-m", "smtpctl", "--socket", str(tmp_path / "none.sock"), *words],
                         cwd=REPO, capture_output=True, text=True, timeout=30)
    assert (res.returncode, res.stderr) == (1, "smtpctl: smtpd doesn't seem to be running\n")
