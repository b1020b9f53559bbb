"""The daemon under systemd's protocols, played by the test with real sockets:
sd_notify readiness (READY=1 only once every process is up and the listeners
accept), STATUS=, RELOADING=1, STOPPING=1, and socket activation (LISTEN_FDS)."""
from __future__ import annotations

import os
import pwd
import signal
import smtplib
import socket
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
