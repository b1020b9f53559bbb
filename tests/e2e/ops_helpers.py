"""Test doubles of what surrounds the daemon in production, all real sockets:
systemd's notification socket, a syslog daemon's /dev/log, systemd's socket
activation.  Each listener drains its socket in a thread (a syslog socket left
unread would make the daemon wait), bounded in time, and is closed by the test."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.conftest import REPO, Daemon, wait_for

# glibc syslog(3) over /dev/log: "<PRI>Mmm dd hh:mm:ss smtpd[pid]: message"
SYSLOG_LINE = re.compile(r"^<(\d+)>([A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d) smtpd\[(\d+)\]: (.*)$", re.S)


class DatagramListener:
    """An AF_UNIX datagram socket (a path, or "@name": abstract) read by a thread."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.2)
        self.datagrams: list[bytes] = []
        self.lock = threading.Lock()
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 600          # bounded, whatever the test does
        while self.running and time.monotonic() < deadline:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self.lock:
                self.datagrams.append(data)

    def snapshot(self) -> list[bytes]:
        with self.lock:
            return list(self.datagrams)

    def close(self) -> None:
        self.running = False
        self.thread.join(5)
        self.sock.close()
        if not self.address.startswith("@"):
            try:
                os.unlink(self.address)
            except FileNotFoundError:
                pass


class NotifySocket(DatagramListener):
    """systemd's side of sd_notify: every datagram as a dict of its KEY=VALUE lines."""

    def messages(self) -> list[dict[str, str]]:
        out = []
        for data in self.snapshot():
            out.append(dict(line.split("=", 1) for line in data.decode().split("\n") if "=" in line))
        return out

    def wait(self, key: str, value: str = "1", after: int = 0, timeout: float = 30.0) -> int:
        """Index of the first message from ``after`` on that has KEY=value."""
        def found():
            for i, msg in enumerate(self.messages()[after:], after):
                if msg.get(key) == value:
                    return i + 1
            return 0
        return wait_for(found, timeout, f"{key}={value} on the notify socket") - 1


class SyslogSocket(DatagramListener):
    """A syslog daemon's /dev/log: parsed (priority, timestamp, pid, message) records."""

    def records(self) -> list[tuple[int, str, int, str]]:
        out = []
        for data in self.snapshot():
            m = SYSLOG_LINE.match(data.decode("utf-8", "replace"))
            assert m, f"not a syslog(3) line: {data!r}"
            out.append((int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)))
        return out

    def messages(self) -> list[str]:
        return [r[3] for r in self.records()]

    def wait(self, text: str, timeout: float = 20.0) -> str:
        return wait_for(lambda: next((m for m in self.messages() if text in m), None),
                        timeout, f"syslog line with {text!r}")

    def as_log_file(self, hostname: str = "mail") -> str:
        """The lines as rsyslog writes them to /var/log/maillog (its traditional
        file format: "TIMESTAMP HOSTNAME TAG MSG")."""
        return "".join(f"{stamp} {hostname} smtpd[{pid}]: {msg}\n" for _, stamp, pid, msg in self.records())


class OpsDaemon(Daemon):
    """A Daemon started as systemd would: chosen flags (-F, -d), extra environment,
    optional sockets passed as fd 3, 4... with LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES."""

    def __init__(self, base: Path, config_text: str, flags: tuple[str, ...] = ("-d",),
                 env: dict[str, str] | None = None, activation: list[socket.socket] | None = None,
                 fdnames: str = "", prefix: tuple[str, ...] = ()) -> None:
        super().__init__(base, config_text)
        self.prefix = prefix
        self.flags = flags
        self.env = env or {}
        self.activation = activation or []
        self.fdnames = fdnames

    def command(self, *args: str) -> list[str]:
        return [*self.prefix, sys.executable, "-m", "smtpd", *self.flags, "-f", str(self.config),
                "--spool", str(self.spool), "--socket", str(self.socket), *args]

    def start(self, *args: str, wait: bool = True, ready=None) -> "OpsDaemon":
        """``ready``: a callable that returns True once the daemon is up (default:
        its "ready:" log line on stderr)."""
        env = dict(os.environ, **self.env)
        cmd = self.command(*args)
        pass_fds: tuple[int, ...] = ()
        if self.activation:
            # As systemd does: the sockets become fds 3, 4, ... of the daemon, and
            # LISTEN_PID names the daemon itself (the wrapper execs it, keeping its pid).
            fds = [s.fileno() for s in self.activation]
            wrapper = ("import os, sys\n"
                       "fds = [int(x) for x in sys.argv[1].split(',')]\n"
                       "moved = [os.dup(fd) for fd in fds]\n"
                       "for i, fd in enumerate(moved):\n"
                       "    os.dup2(fd, 3 + i)\n"
                       "    os.set_inheritable(3 + i, True)\n"
                       "for fd in set(fds + moved) - set(range(3, 3 + len(fds))):\n"
                       "    os.close(fd)\n"
                       "os.environ['LISTEN_PID'] = str(os.getpid())\n"
                       "os.execv(sys.argv[2], sys.argv[2:])\n")
            cmd = [sys.executable, "-c", wrapper, ",".join(map(str, fds)), *cmd]
            env.update(LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=self.fdnames)
            pass_fds = tuple(fds)
        self._log = open(self.logfile, "ab")
        self.log_offset = self.logfile.stat().st_size
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=env, pass_fds=pass_fds)
        if wait:
            check = ready or (lambda: "ready:" in self.log_since_start())
            wait_for(lambda: check() or self.proc.poll() is not None, 30, "smtpd to be ready")
            assert self.proc.poll() is None, f"smtpd exited at start:\n{self.log()}"
        return self


def ops_daemon_factory(tmp_path, started: list):
    def make(config_text: str, subdir: str = "d", **kwargs) -> OpsDaemon:
        base = tmp_path / subdir
        base.mkdir(exist_ok=True)
        d = OpsDaemon(base, config_text, **kwargs)
        started.append(d)
        return d
    return make
