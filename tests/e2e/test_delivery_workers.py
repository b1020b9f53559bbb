"""pony's delivery workers against the real daemon (smtpd/mda_workers.py): the
parent forks them at pony's request and is off the path of each message, so what
it still decides is checked here: no worker for uid 0 (as root), and how a worker
that dies mid-delivery ended, which pony asks of it (docs/delivery.md)."""
from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.conftest import free_port, wait_for
from tests.e2e.helpers import send, userbase


def _processes() -> list[tuple[int, int, str]]:
    """(pid, ppid, argv as text) of every live process (an mda runs in a session of
    its own, out of the daemon's process group that Daemon.children reads)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if fields[0] == "Z":
                continue
            argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        out.append((int(entry.name), int(fields[1]), argv.strip()))
    return out


def test_a_worker_killed_mid_delivery_is_a_tempfail_with_its_signal(make_daemon, tmp_path):
    """An mda that does not return; its worker (a child of the parent, as the user) is
    killed: the delivery is a temporary failure saying so, the envelope stays queued,
    and the daemon goes on."""
    port = free_port()
    base = tmp_path / "d"
    conf = "\n".join([
        f"listen on 127.0.0.1 port {port}",
        f"table users {userbase(base)}",
        'action "local" mda "sleep 29.25" userbase <users>',
        'match from any for domain "example.test" action "local"',
    ]) + "\n"
    d = make_daemon(conf).start()
    sleepers: list[int] = []
    try:
        send(port, "s@remote.test", ["alice@example.test"], "Subject: stuck\n\nbody\n")
        parent = d.proc.pid

        def stuck_worker() -> int | None:
            procs = _processes()
            workers = [pid for pid, ppid, argv in procs if ppid == parent and argv.startswith("smtpd: [priv]")]
            for worker in workers:
                mine = [pid for pid, ppid, argv in procs if ppid == worker and "sleep 29.25" in argv]
                if mine:
                    sleepers.extend(mine)
                    return worker
            return None

        worker = wait_for(stuck_worker, 20, "the worker running the mda")
        os.kill(worker, signal.SIGKILL)
        d.wait_log("stat=terminated; signal 9")
        line = [l for l in d.log_since_start().splitlines() if "mda delivery" in l][-1]
        assert "result=TempFail" in line and "user=alice" in line, line
        assert len(d.queue_lines()) == 1                     # still queued, for a retry
        assert d.proc.poll() is None and d.smtpctl("show", "stats").returncode == 0
    finally:
        for pid in sleepers:                                 # the mda runs in a session of its own
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_no_worker_for_root(make_daemon, tmp_path):
    """A user base entry with uid 0: as root the parent forks no worker for it (a
    permanent failure, as OpenSMTPD); unprivileged there is no uid to change, and the
    message is delivered as the daemon's own user."""
    port = free_port()
    base = tmp_path / "d"
    users = userbase(base)
    home = (base / "home" / "alice").resolve()
    root_users = "{ " + f'toor = "0:0:{home}"' + " }"
    conf = "\n".join([
        f"listen on 127.0.0.1 port {port}",
        f"table users {users}",
        f"table rootusers {root_users}",
        'action "local" maildir "/nonexistent-for-root" userbase <rootusers>',
        'match from any for domain "example.test" action "local"',
    ]) + "\n"
    if os.getuid() != 0:
        conf = conf.replace('"/nonexistent-for-root"', f'"{home}/Maildir"')
    d = make_daemon(conf).start()
    send(port, "s@remote.test", ["toor@example.test"], "Subject: root\n\nbody\n")
    if os.getuid() == 0:
        d.wait_log("stat=MDA not allowed to deliver to root")
        line = [l for l in d.log_since_start().splitlines() if "mda delivery" in l][-1]
        assert "result=PermFail" in line and "user=toor" in line, line
        assert not Path("/nonexistent-for-root").exists()
    else:
        d.wait_log("result=Ok")
        assert len(list((home / "Maildir" / "new").iterdir())) == 1
