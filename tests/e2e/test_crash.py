"""No loss, ever: the whole daemon killed with SIGKILL under load, and a full disk.

Every message carries a unique id in its Subject and Message-ID and a body whose
last line names it again, so that a delivered copy can be told whole or truncated.
"""
from __future__ import annotations

import os
import random
import re
import smtplib
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import free_port, wait_for
from tests.e2e.helpers import config, maildir_messages
from tests.e2e.sink import Sink

CLIENTS = 4
CYCLES = 10
MAX_MESSAGES = 4000          # bound on what the clients send over the whole test
BODY_LINES = 40


def message(ident: str) -> bytes:
    lines = [f"Subject: crash {ident}", f"Message-ID: <{ident}@crash.test>", ""]
    lines += [f"{ident} line {n:03d} " + "x" * 60 for n in range(BODY_LINES)]
    lines.append(f"END {ident}")
    return ("\r\n".join(lines) + "\r\n").encode()


IDENT = re.compile(rb"^Subject: crash (m\d+)\r?$", re.M)


def check_whole(data: bytes) -> str:
    """The id of a delivered message, after checking that none of it is missing."""
    found = IDENT.search(data)
    assert found, f"a delivered message without its Subject: {data[:200]!r}"
    ident = found.group(1).decode()
    body = data.replace(b"\r\n", b"\n")
    for n in range(BODY_LINES):
        assert f"{ident} line {n:03d} ".encode() + b"x" * 60 + b"\n" in body, \
            f"message {ident} delivered truncated (line {n} missing)"
    assert body.rstrip(b"\n").endswith(f"END {ident}".encode()), f"message {ident} delivered truncated"
    return ident


class Load:
    """CLIENTS threads sending one message per connection, for as long as ``running``;
    a message is acknowledged only when its DATA got a 250."""

    def __init__(self, port: int, rcpts: list[str]) -> None:
        self.port = port
        self.rcpts = rcpts
        self.running = threading.Event()
        self.lock = threading.Lock()
        self.counter = 0
        self.acked: set[str] = set()
        self.refused: dict[str, str] = {}
        self.last_error: dict[str, str] = {}     # thread name -> its last failure, for diagnosis
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(CLIENTS)]

    def start(self) -> None:
        self.running.set()
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.running.clear()
        for t in self.threads:
            t.join(30)

    def _next(self) -> str | None:
        with self.lock:
            if self.counter >= MAX_MESSAGES:
                return None
            self.counter += 1
            return f"m{self.counter}"

    def _client(self) -> None:
        while self.running.is_set():
            try:
                conn = smtplib.SMTP("127.0.0.1", self.port, timeout=5)
            except OSError as exc:
                # the daemon is down: no message was tried, none is used up (the bound
                # on messages must not run out while the daemon restarts)
                self.last_error[threading.current_thread().name] = f"{time.monotonic():.1f} {exc!r}"
                time.sleep(0.02)
                continue
            ident = self._next()
            if ident is None:
                conn.close()
                return
            rcpt = self.rcpts[int(ident[1:]) % len(self.rcpts)]
            try:
                with conn as s:
                    s.ehlo("client.test")
                    s.mail("sender@client.test")
                    code, text = s.rcpt(rcpt)
                    if code != 250:
                        raise smtplib.SMTPResponseException(code, text)
                    code, text = s.data(message(ident))
                if code == 250:
                    with self.lock:
                        self.acked.add(ident)
                else:
                    self.refused[ident] = f"{code} {text!r}"
            except (OSError, smtplib.SMTPException) as exc:
                self.refused[ident] = repr(exc)       # no 250: may arrive whole, or not at all
                self.last_error[threading.current_thread().name] = f"{time.monotonic():.1f} {exc!r}"
                time.sleep(0.02)                      # the daemon is down: do not spin


def test_kill_9_under_load_loses_nothing(make_daemon, tmp_path):
    rng = random.Random()
    sink_port, port = free_port(), free_port()
    sink = Sink(sink_port).start()
    d = make_daemon(config(tmp_path / "d", port, relay=f"smtp://127.0.0.1:{sink_port}"))
    load = Load(port, ["alice@example.test", "user@remote.test"])
    try:
        d.start()
        load.start()
        kills = 0
        for cycle in range(CYCLES):
            if cycle:
                d.start()
            # wait until this run accepted something, then a random moment more
            before = len(load.acked)
            try:
                wait_for(lambda: len(load.acked) > before, 30, f"a message accepted in cycle {cycle}")
            except AssertionError as exc:
                alive = [t.name for t in load.threads if t.is_alive()]
                raise AssertionError(f"{exc}; now {time.monotonic():.1f}, clients alive {alive}, "
                                     f"last errors {load.last_error}\n{d.log_since_start()[-3000:]}")
            time.sleep(rng.uniform(0.05, 0.8))
            d.kill_group()
            kills += 1
        load.stop()
        assert kills == CYCLES and len(load.acked) >= CYCLES
        d.start()

        def delivered() -> dict[str, int]:
            seen: dict[str, int] = {}
            datas = [t.data for t in sink.transactions] + maildir_messages(tmp_path / "d", "alice")
            for data in datas:
                ident = check_whole(data)
                seen[ident] = seen.get(ident, 0) + 1
            return seen

        def drained() -> bool:
            missing = load.acked - delivered().keys()
            if missing and rng.random() < 0.1:
                d.smtpctl("schedule", "all", check=False)    # anything that tempfailed meanwhile
            return not missing and not d.queue_lines()

        wait_for(drained, 40, "every acknowledged message to be delivered", interval=0.25)
        seen = delivered()
        assert load.acked <= seen.keys()
        assert seen.keys() <= load.acked | load.refused.keys(), "delivered a message never sent"
        # nothing half-received was kept: the spool's incoming areas hold nothing
        # but the messages of the current run (none: the load has stopped)
        assert os.listdir(d.spool / "incoming") == [] and os.listdir(d.spool / "temporary") == []
    finally:
        load.stop()
        sink.stop()


def _fill(path: Path, leave: int) -> None:
    """Fill the file system of ``path`` with one file, then free ``leave`` bytes."""
    with open(path, "wb") as f:
        chunk = b"\0" * 65536
        try:
            for _ in range(100_000):
                f.write(chunk)
                f.flush()
        except OSError:
            pass
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        f.truncate(max(0, size - leave))


def _send(port: int, data: bytes, rcpt: str = "alice@example.test") -> tuple[int, str]:
    """(code, text) of the first refusal, or of DATA."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.test")
        code, text = s.mail("sender@client.test")
        if code != 250:
            return code, text.decode()
        code, text = s.rcpt(rcpt)
        if code != 250:
            return code, text.decode()
        code, text = s.data(data)
        return code, text.decode()


@pytest.mark.skipif(os.geteuid() != 0, reason="a real full disk needs root to mount a small tmpfs")
def test_disk_full_is_a_temporary_failure_and_leaves_nothing(make_daemon, tmp_path):
    port = free_port()
    d = make_daemon(config(tmp_path / "d", port))
    d.spool.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0711", "tmpfs", str(d.spool)], check=True)
    try:
        d.start()
        assert _send(port, message("m1"))[0] == 250
        wait_for(lambda: len(maildir_messages(tmp_path / "d", "alice")) == 1, 20, "the first delivery")
        filler = d.spool / "filler"
        # room for the envelope, not for a 1 MB body: refused at the end of DATA
        _fill(filler, leave=64 * 1024)
        big = message("m2") + b"y" * 76 + b"\r\n" + (b"z" * 998 + b"\r\n") * 1024
        code, text = _send(port, big)
        assert code == 452 and "4.3.1" in text, (code, text)
        assert os.listdir(d.spool / "incoming") == [] and os.listdir(d.spool / "temporary") == []
        # no room at all: refused at the recipient, for the same reason
        _fill(filler, leave=0)
        code, text = _send(port, message("m3"))
        assert code == 452 and "4.3.1" in text, (code, text)
        # the session's message is rolled back when the client leaves
        wait_for(lambda: os.listdir(d.spool / "incoming") == [] and os.listdir(d.spool / "temporary") == [],
                 10, "the refused message to be rolled back")
        assert "commit of" in d.log_since_start() or "cannot write" in d.log_since_start()
        # space is back: the same daemon accepts and delivers again
        assert d.proc.poll() is None
        filler.unlink()
        assert _send(port, message("m4"))[0] == 250
        wait_for(lambda: len(maildir_messages(tmp_path / "d", "alice")) == 2, 20, "the delivery after")
        assert sorted(check_whole(m) for m in maildir_messages(tmp_path / "d", "alice")) == ["m1", "m4"]
        assert d.queue_lines() == []
    finally:
        d.stop()
        subprocess.run(["umount", "-l", str(d.spool)], check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="a real I/O error needs root to mount an ext4 image")
def test_io_error_is_a_temporary_failure_and_the_daemon_goes_on(make_daemon, tmp_path):
    """A real I/O error: ext4 on a loop device, told to fail (trigger_fs_error), turns
    read-only (errors=remount-ro), as it does on a failing disk."""
    port = free_port()
    d = make_daemon(config(tmp_path / "d", port))
    image = tmp_path / "spool.img"
    subprocess.run(["truncate", "-s", "64M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    d.spool.mkdir()
    subprocess.run(["mount", "-o", "loop,errors=remount-ro", str(image), str(d.spool)], check=True)
    try:
        device = Path(subprocess.run(["findmnt", "-n", "-o", "SOURCE", str(d.spool)], check=True,
                                     capture_output=True, text=True).stdout.strip()).name
        trigger = Path("/sys/fs/ext4") / device / "trigger_fs_error"
        if not trigger.exists():
            pytest.skip("this kernel's ext4 has no trigger_fs_error")
        d.start()
        assert _send(port, message("m1"))[0] == 250
        wait_for(lambda: len(maildir_messages(tmp_path / "d", "alice")) == 1, 20, "the first delivery")
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.ehlo("client.test")
            assert s.mail("sender@client.test")[0] == 250
            assert s.rcpt("alice@example.test")[0] == 250
            trigger.write_text("1\n")                  # the disk fails during the transaction
            code, text = s.data(message("m2"))
        assert code == 451 and b"4.3.0" in text, (code, text)
        # the daemon goes on: it answers, and refuses new mail temporarily
        code, _ = _send(port, message("m3"))
        assert 400 <= code < 500
        assert d.proc.poll() is None and "smtpd: queue" in d.children()
        d.smtpctl("show", "queue")
        assert [check_whole(m) for m in maildir_messages(tmp_path / "d", "alice")] == ["m1"]
    finally:
        d.stop()
        subprocess.run(["umount", "-l", str(d.spool)], check=False)
