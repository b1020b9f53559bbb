"""Hundreds of concurrent SMTP sessions against the real daemon (issue 12).

The client is bench/bench_sessions.py's (every session opened at once and held open
until all have sent their message).  Not timed: these check that nothing fails and
nothing is lost, and that pony's descriptor limit neither stalls sessions nor is
left at a low soft limit (systemd's 1024).
"""
from __future__ import annotations

import asyncio
import re
import shutil
import sys
from pathlib import Path

from tests.conftest import REPO, Daemon, free_port, wait_for
from tests.e2e.helpers import config, maildir_messages

sys.path.insert(0, str(REPO / "bench"))
from bench_sessions import Client  # noqa: E402  (bench/ is not a package)

PRLIMIT = shutil.which("prlimit") or "prlimit"      # util-linux: essential in Debian


def start(tmp_path: Path, port: int, nofile: str, extra: str = "") -> Daemon:
    """The daemon started under ``prlimit --nofile=SOFT:HARD``."""
    base = tmp_path / "d"
    base.mkdir()
    d = Daemon(base, config(base, port, extra=extra), prefix=[PRLIMIT, f"--nofile={nofile}"])
    return d.start()


def run_client(client: Client, timeout: float) -> None:
    asyncio.run(asyncio.wait_for(client.run(lambda c: None), timeout))


def stop(d: Daemon) -> None:
    d.stop()
    assert not d.children(), "processes left behind"
    homes = d.base / "home"
    if homes.is_symlink():              # see tests/e2e/helpers.py userbase()
        shutil.rmtree(homes.resolve(), ignore_errors=True)


def test_300_concurrent_sessions_all_delivered_with_a_low_soft_descriptor_limit(tmp_path):
    """300 sessions open at once, each sending one message: every one is accepted
    and delivered once.  The daemon starts with a soft limit of 256 descriptors
    (a hard one of 4096): pony raises it, or it could not hold 300 sockets."""
    sessions = 300
    port = free_port()
    d = start(tmp_path, port, "256:4096",
              extra=f"smtp limit max-sessions {sessions} max-sessions-per-address {sessions}")
    try:
        assert d.smtpctl("trace", "mproc").stdout == "command succeeded\n"
        client = Client(port, sessions, 1, 2048, "alice@example.test", spread=1.0, op_timeout=30)
        run_client(client, 60)
        assert client.stats.errors == {} and client.stats.failed == 0
        assert client.max_open == sessions          # all open at the same time
        assert client.stats.accepted == sessions
        wait_for(lambda: len(maildir_messages(d.base, "alice")) >= sessions, 30,
                 "every message in the Maildir")
        subjects = sorted(int(m) for body in maildir_messages(d.base, "alice")
                          for m in re.findall(rb"Subject: bench message (\d+)", body))
        assert subjects == list(range(sessions))    # each once
        wait_for(lambda: not d.queue_lines(), 10, "the queue to empty")
        assert "warn" not in d.log_since_start()
        assert d.log_since_start().count("smtp disconnected reason=quit") == sessions
        # the sessions opened together from one address shared one PTR lookup (the
        # next ones found its answer in pony's cache)
        lookups = [line for line in d.log_since_start().splitlines()
                   if line.startswith("mproc: pony -> lka") and " mta_dns_lookup " in line]
        assert len(lookups) == 1, lookups[:5]
        assert d.log_since_start().count("smtp connected address=127.0.0.1 host=localhost") == sessions
    finally:
        stop(d)


def test_sessions_past_the_descriptor_limit_are_refused_not_stalled(tmp_path):
    """With a hard limit of 256 descriptors pony admits 256 / 2 - 32 = 96 sessions
    whatever max-sessions says; the others get 421 at once (not a connection left
    in the backlog while accept() fails), and every admitted one is served."""
    port = free_port()
    d = start(tmp_path, port, "256:256",
              extra="smtp limit max-sessions 1000 max-sessions-per-address 1000")
    try:
        client = Client(port, 120, 1, 1024, "alice@example.test", spread=0.5, op_timeout=20)
        run_client(client, 40)
        refused = sum(n for what, n in client.stats.errors.items() if "421 4.7.0 Too many sessions" in what)
        assert client.timeouts == 0
        assert client.max_open == 96 and refused == 120 - 96, client.stats.errors
        assert client.stats.accepted == 96 and client.stats.failed == refused
        wait_for(lambda: len(maildir_messages(d.base, "alice")) >= 96, 30, "the admitted messages")
        assert "session limit reached (96)" in d.log_since_start()
    finally:
        stop(d)
