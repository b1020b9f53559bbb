"""Shared fixtures: the real daemon, booted on loopback with a private spool."""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BOOT_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Daemon:
    """One smtpd instance (parent and children) in its own process group."""

    def __init__(self, base: Path, config_text: str, extra_args: list[str] | None = None,
                 prefix: list[str] | None = None) -> None:
        self.base = base
        self.prefix = prefix or []          # e.g. setpriv ... to start it as another user
        self.config = base / "smtpd.conf"
        self.config.write_text(config_text)
        self.spool = base / "spool"
        self.socket = base / "ctl.sock"
        self.logfile = base / "smtpd.log"
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen | None = None

    def command(self, *args: str) -> list[str]:
        return [*self.prefix, sys.executable, "-m", "smtpd", "-d", "-f", str(self.config),
                "--spool", str(self.spool), "--socket", str(self.socket), *args]

    def start(self, *args: str, wait: bool = True) -> "Daemon":
        self._log = open(self.logfile, "ab")
        self.log_offset = self.logfile.stat().st_size
        self.proc = subprocess.Popen(self.command(*self.extra_args, *args), cwd=REPO,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        if wait:
            wait_for(lambda: "ready:" in self.log_since_start() or self.proc.poll() is not None,
                     BOOT_TIMEOUT, "smtpd to be ready")
            assert self.proc.poll() is None, f"smtpd exited at start:\n{self.log()}"
        return self

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def log_since_start(self) -> str:
        return self.log()[self.log_offset:]

    def wait_log(self, text: str, timeout: float = 20.0) -> str:
        wait_for(lambda: text in self.log_since_start(), timeout, f"log line {text!r}")
        return self.log_since_start()

    @property
    def pgid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def children(self) -> dict[str, int]:
        """{title: pid} of every live process in the daemon's process group (a zombie,
        already dead and waiting for its new parent to reap it, is not counted)."""
        out = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                fields = stat.rsplit(")", 1)[1].split()
                if int(fields[2]) != self.pgid or fields[0] == "Z":
                    continue
                title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode()
            except (OSError, ValueError, IndexError):
                continue
            out[title] = int(entry.name)
        return out

    def smtpctl(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        res = subprocess.run([sys.executable, "-m", "smtpctl", "--socket", str(self.socket), *args],
                             cwd=REPO, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"smtpctl {' '.join(args)} failed ({res.returncode}): {res.stderr}{res.stdout}")
        return res

    def queue_lines(self) -> list[str]:
        return [l for l in self.smtpctl("show", "queue").stdout.splitlines() if l]

    def stop(self, timeout: float = 5.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is not None:
            # The parent is gone (a test that expected it to fail): its children may still
            # be on their way out, and a test must not leave one behind.
            self.kill_group()
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill_group()

    def kill_group(self) -> None:
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc is not None:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        wait_for(lambda: not self.children(), 5, "the process group to be gone")


PRIVSEP_USERS = ("_smtpd", "_smtpq")


@pytest.fixture(scope="session", autouse=True)
def privsep_users():
    """As root the daemon drops to _smtpd/_smtpq and refuses to start without them: create
    them once for the session (the documented useradd step), as a fresh CI machine lacks them."""
    if os.geteuid() != 0:
        return
    for user in PRIVSEP_USERS:
        try:
            pwd.getpwnam(user)
        except KeyError:
            subprocess.run(["useradd", "-r", "-M", "-d", "/var/empty", "-s", "/usr/sbin/nologin", user],
                           check=True)


@pytest.fixture
def make_daemon(tmp_path):
    started: list[Daemon] = []

    def make(config_text: str, extra_args: list[str] | None = None, subdir: str = "d") -> Daemon:
        base = tmp_path / subdir
        base.mkdir(exist_ok=True)
        d = Daemon(base, config_text, extra_args)
        started.append(d)
        return d

    yield make
    for d in started:
        d.stop()
        assert not d.children(), "processes left behind"
        homes = d.base / "home"
        if homes.is_symlink():              # see tests/e2e/helpers.py userbase()
            shutil.rmtree(homes.resolve(), ignore_errors=True)
