"""The daemon under systemd's protocols, played by the test with real sockets:
sd_notify readiness (READY=1 only once every process is up and the listeners
accept), STATUS=, RELOADING=1, STOPPING=1, the watchdog (WATCHDOG_USEC), the unit's
ExecReload, and socket activation (LISTEN_FDS)."""
from __future__ import annotations

import os
import pwd
import signal
import smtplib
import socket
import subprocess
import sys
import time
import uuid

import pytest

from tests.conftest import REPO, free_port, wait_for
from tests.e2e.helpers import config, maildir_messages, send
from tests.e2e.ops_helpers import NotifySocket

CHILDREN = ("control", "lka", "queue", "scheduler", "pony")


def banner(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.settimeout(10)
        return s.recv(1024).decode()


def test_ready_only_when_every_process_runs_and_smtp_answers(ops_daemon, notify_socket, tmp_path):
    port = free_port()
    d = ops_daemon(config(tmp_path / "d", port), flags=("-F",),
                   env={"NOTIFY_SOCKET": notify_socket.address,
                        "SMTPD_SYSLOG_SOCKET": str(tmp_path / "no-syslog-here")})
    d.start(wait=False)
    ready = notify_socket.wait("READY")
    # At the moment READY=1 arrives, the six processes exist and SMTP is served.
    titles = d.children()
    assert set(titles) == {"smtpd: [priv]", *(f"smtpd: {c}" for c in CHILDREN)}, titles
    assert banner(port).startswith("220 ")
    messages = notify_socket.messages()
    assert all("READY" not in m for m in messages[:ready]), messages
    statuses = [m["STATUS"] for m in messages[:ready + 1] if "STATUS" in m]
    assert statuses[0] == "starting processes" and "5 processes" in statuses[-1], statuses
    assert "1 listening socket(s)" in messages[ready]["STATUS"]
    # Children do not inherit the notification socket (only the main process may talk).
    for name in CHILDREN:
        env = open(f"/proc/{titles[f'smtpd: {name}']}/environ", "rb").read()
        assert b"NOTIFY_SOCKET" not in env, name

    # Reload: RELOADING=1 (with MONOTONIC_USEC, as Type=notify-reload wants), then READY=1.
    after = len(notify_socket.messages())
    d.proc.send_signal(signal.SIGHUP)
    reloading = notify_socket.wait("RELOADING", after=after)
    assert int(notify_socket.messages()[reloading]["MONOTONIC_USEC"]) > 0
    notify_socket.wait("READY", after=reloading)

    # Stop: STOPPING=1 before the processes go.
    after = len(notify_socket.messages())
    d.proc.send_signal(signal.SIGTERM)
    notify_socket.wait("STOPPING", after=after)
    assert d.proc.wait(10) == 0


def test_watchdog_pings_only_while_every_child_answers(ops_daemon, notify_socket, tmp_path):
    """WATCHDOG=1 every half WATCHDOG_USEC while each child answers the parent within a
    quarter of it; a stopped child (as a hung one) stops the pings, which resume once it
    answers again."""
    d = ops_daemon(config(tmp_path / "d", free_port()),
                   env={"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "2000000"})
    d.start()

    def pings() -> int:
        return sum(1 for m in notify_socket.messages() if m.get("WATCHDOG") == "1")

    wait_for(lambda: pings() >= 3, 20, "three watchdog pings")
    assert "watchdog: 2s (a ping every 1s while every process answers)" in d.log_since_start()
    children = d.children()
    for name in CHILDREN:           # the variable is the parent's only
        env = open(f"/proc/{children[f'smtpd: {name}']}/environ", "rb").read()
        assert b"WATCHDOG_USEC" not in env, name
    lka = children["smtpd: lka"]
    os.kill(lka, signal.SIGSTOP)
    try:
        d.wait_log("watchdog: no answer from lka in 0.5s")
        time.sleep(0.6)             # a round that began before the stop has ended
        stopped_at = pings()
        time.sleep(3.5)             # three rounds and more
        assert pings() == stopped_at
        assert d.proc.poll() is None
    finally:
        os.kill(lka, signal.SIGCONT)
    wait_for(lambda: pings() >= stopped_at + 2, 20, "the pings to resume")
    d.wait_log("watchdog: every process answers again")
    assert "unexpected StatReply" not in d.log_since_start()   # late answers are dropped quietly


def test_watchdog_of_another_process_is_not_ours(ops_daemon, notify_socket, tmp_path):
    d = ops_daemon(config(tmp_path / "d", free_port()),
                   env={"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "200000",
                        "WATCHDOG_PID": "1"})
    d.start()
    notify_socket.wait("READY")
    time.sleep(1.0)                 # ten periods, had it been on
    assert not [m for m in notify_socket.messages() if "WATCHDOG" in m]
    assert "watchdog" not in d.log_since_start()


def unit_exec_reload() -> list[str]:
    unit = (REPO / "systemd" / "smtpd.service").read_text()
    return next(l for l in unit.splitlines() if l.startswith("ExecReload=")).split("=", 1)[1].split()


def test_the_units_reload_fails_on_a_refused_configuration(ops_daemon, tmp_path):
    """ExecReload= is what `systemctl reload smtpd` runs: its exit status is the verdict
    systemctl reports.  A refused file: non-zero, with the reason; the daemon goes on."""
    command = unit_exec_reload()
    assert command == ["/usr/sbin/smtpctl", "reload"]
    port = free_port()
    d = ops_daemon(config(tmp_path / "d", port))
    d.start()

    def exec_reload() -> subprocess.CompletedProcess:
        # The unit's command line, with this checkout's smtpctl and the test's socket.
        return subprocess.run([sys.executable, "-m", "smtpctl", "--socket", str(d.socket), *command[1:]],
                              cwd=REPO, capture_output=True, text=True, timeout=60)

    good = d.config.read_text()
    d.config.write_text(good + "listen on 127.0.0.1 port nonsense\n")
    res = exec_reload()
    assert res.returncode == 1, res.stdout + res.stderr
    assert res.stdout.startswith("command failed: ") and f"{d.config}:" in res.stdout, res.stdout
    assert banner(port).startswith("220 ")
    d.config.write_text(good)
    res = exec_reload()
    assert (res.returncode, res.stdout) == (0, "command succeeded\n"), res.stdout + res.stderr


def test_abstract_notify_socket_and_smtp_paused(ops_daemon, tmp_path):
    """"@name" is an abstract socket; with -P smtp READY still comes (paused on purpose)."""
    notify = NotifySocket(f"@pysmtpd-test-{uuid.uuid4().hex}")
    try:
        port = free_port()
        d = ops_daemon(config(tmp_path / "d", port), env={"NOTIFY_SOCKET": notify.address})
        d.start("-P", "smtp", wait=False)
        ready = notify.wait("READY")
        assert "smtp paused" in notify.messages()[ready]["STATUS"]
    finally:
        notify.close()


def test_socket_activation_serves_the_socket_systemd_passed(ops_daemon, notify_socket, tmp_path):
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen(16)
    port = listening.getsockname()[1]
    d = ops_daemon(config(tmp_path / "d", port), activation=[listening], fdnames="smtp",
                   env={"NOTIFY_SOCKET": notify_socket.address})
    d.start(wait=False)
    # A client that connects before the daemon is ready waits in the backlog and is
    # served: what socket activation is for.
    early = socket.create_connection(("127.0.0.1", port), timeout=30)
    listening.close()                      # from now on only the daemon holds the socket
    early.settimeout(30)
    assert early.recv(1024).startswith(b"220 ")
    early.close()
    notify_socket.wait("READY")
    log = d.wait_log("ready:")
    assert f"1 listening socket(s) from systemd: 127.0.0.1:{port}" in log
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        assert s.ehlo("client.test")[0] == 250
    # The variables are not inherited by the children (they would take fd 3 too).
    for name, pid in d.children().items():
        if name == "smtpd: [priv]":
            continue                       # /proc shows its initial environment
        env = open(f"/proc/{pid}/environ", "rb").read()
        assert b"LISTEN_FDS" not in env and b"LISTEN_PID" not in env, name


def test_socket_activation_with_a_socket_no_listener_wants_is_refused(ops_daemon, tmp_path):
    stray = socket.socket()
    stray.bind(("127.0.0.1", 0))
    stray.listen(1)
    d = ops_daemon(config(tmp_path / "d", free_port()), activation=[stray])
    d.start(wait=False)
    assert d.proc.wait(30) == 78                        # EX_CONFIG: no restart loop
    stray.close()
    assert f"match no listener of {d.config}: 127.0.0.1:" in d.log()
    wait_for(lambda: not d.children(), 5, "no process left")


def unit_capabilities() -> list[str]:
    unit = (REPO / "systemd" / "smtpd.service").read_text()
    line = next(l for l in unit.splitlines() if l.startswith("CapabilityBoundingSet="))
    return line.split("=", 1)[1].split()


def confined(caps: list[str]) -> tuple[str, ...]:
    """What smtpd.service imposes that can be imposed outside systemd: its capability
    bounding set, NoNewPrivileges= and UMask=."""
    bounding = "-all," + ",".join("+" + c.removeprefix("CAP_").lower() for c in caps)
    return ("sh", "-c", 'umask 077; exec "$@"', "sh",
            "setpriv", "--nnp", "--inh-caps=-all", f"--bounding-set={bounding}", "--")


@pytest.mark.skipif(os.geteuid() != 0, reason="capabilities matter to root only; CI runs as root")
def test_privilege_separation_works_within_the_units_capabilities(ops_daemon, tmp_path):
    caps = unit_capabilities()
    assert "CAP_SETUID" in caps and "CAP_SYS_ADMIN" not in caps
    base = tmp_path / "d"
    port = free_port()
    d = ops_daemon(config(base, port), prefix=confined(caps))
    d.start()
    pony = d.children()["smtpd: pony"]
    status = open(f"/proc/{d.proc.pid}/status").read()
    assert "NoNewPrivs:\t1" in status
    bnd = int(next(l for l in status.splitlines() if l.startswith("CapBnd:")).split()[1], 16)
    assert bnd == sum(1 << CAP_NUMBERS[c] for c in caps)
    assert os.stat(f"/proc/{pony}").st_uid == pwd.getpwnam("_smtpd").pw_uid
    send(port, "sender@remote.test", ["alice@example.test"])
    wait_for(lambda: maildir_messages(base, "alice"), 20, "delivery as the user")
    assert d.smtpctl("reload").stdout.strip() == "command succeeded"


@pytest.mark.skipif(os.geteuid() != 0, reason="capabilities matter to root only; CI runs as root")
def test_without_cap_setuid_the_children_cannot_drop_privileges(ops_daemon, tmp_path):
    """The control: the confinement above is real (a capability less and it fails)."""
    caps = [c for c in unit_capabilities() if c != "CAP_SETUID"]
    d = ops_daemon(config(tmp_path / "d", free_port()), prefix=confined(caps))
    d.start(wait=False)
    assert d.proc.wait(30) != 0
    assert "Operation not permitted" in d.log()


CAP_NUMBERS = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_FOWNER": 3,
               "CAP_FSETID": 4, "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_SETPCAP": 8,
               "CAP_NET_BIND_SERVICE": 10, "CAP_SYS_CHROOT": 18}
