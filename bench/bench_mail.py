#!/usr/bin/env python3
"""End-to-end mail benchmark of pysmtpd.

Boots the real daemon (every process, in its own process group, with a temporary
spool, on a free 127.0.0.1 port), sends N messages of SIZE bytes over S concurrent
SMTP sessions, and measures:

* accepted msg/s: first connect -> last ``250`` to the end of DATA;
* delivered msg/s: first connect -> last message seen by the relay sink
  (``--mode relay``) or in the Maildir's ``new/`` (``--mode maildir``);
* peak RSS and peak PSS summed over every process of the daemon's process group
  (parent, children and the short-lived delivery processes): RSS from
  /proc/PID/statm every 200 ms, PSS from /proc/PID/smaps_rollup every second and at
  each new RSS high (Pss: shared pages divided among the processes that map them, so
  the sum is the memory the daemon really holds; RSS counts the interpreter's shared
  pages once per process; bench/meters.py says why this often and no more);
* CPU per message (``cpu_ms_per_message``, per process title; ``daemon_cpu_ms_per_message``
  summed): utime + stime of the process group, delivery workers included through
  the cutime/cstime of the process that reaped them, from just before the load to
  the moment the group's CPU settles after the last delivery, over the accepted
  messages.  ``cpu_ms_per_message_with_startup`` is the older figure: each process's
  whole life up to its last sample, start-up included.  The row "bench client (this
  script)" is this process (the asyncio client, when it is the load, and the
  meters); ``bench_cpu_share`` is its share of the machine's CPUs over the load,
  ``steal_share`` the share of the machine's CPU time a hypervisor took meanwhile
  (/proc/stat: on a shared VM, a run that lost some is slower for that alone);
* the daemon's own commit latency (``smtpctl show stats``: ``smtp.commit.latency.*``,
  null where this pysmtpd does not report it);
* commit latency (asyncio client only): per message, from sending the final
  ``.`` of DATA to reading its ``250`` (p50/p90/p99/max).  smtp-source does not
  report it: with ``--client smtp-source`` it is not measured (null in the JSON).

The load generator is a small asyncio SMTP client (``--client asyncio``, default:
it pipelines MAIL/RCPT/DATA when PIPELINING is advertised) or Postfix's smtp-source
(``--client smtp-source``).  The relay sink is Postfix's smtp-sink when
``bench/get-postfix-tools.sh`` can fetch it, else an aiosmtpd sink in a separate
process (``--sink auto|postfix|aiosmtpd``).

Bounded: after ``--timeout`` seconds (default 600) it stops waiting and reports what
it got.  It always stops every process it started (by PID and process group) and
removes its temporary directory (unless ``--keep``).  Works unprivileged and as root
(then the Maildir user is ``nobody`` and the spool is made reachable for the
daemon's users).

    python bench/bench_mail.py --mode relay -n 2000 -s 10 --size 5120

Prints a one-line summary, then one JSON line.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import platform
import resource
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(BENCH) not in sys.path:           # imported from elsewhere: meters.py is beside it
    sys.path.insert(0, str(BENCH))

from meters import (  # noqa: E402  (bench/ is not a package)
    PSS_EVERY, RSS_INTERVAL, Counter, LoadCpu, MaildirWatch, MemoryMeter, cmdline_title,
    cpu_ticks_by_title, latency_line, parse_stats, per_message, server_commit_latency, stat_fields)
POSTFIX_DIR = BENCH / ".postfix"
SENDER = "bench@local.test"
RELAY_RCPT = "user@remote.test"
MAILDIR_USER = "alice"
MAILDIR_RCPT = "alice@example.test"
BOOT_TIMEOUT = 60.0


class BenchError(Exception):
    pass


class Interrupted(BaseException):
    """SIGTERM/SIGINT: unwind through every ``finally`` so cleanup runs."""


# --------------------------------------------------------------------------- helpers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, deadline: float, interval: float = 0.05) -> bool:
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def pgrp_members(pgid: int) -> list[tuple[int, str, list[bytes]]]:
    """(pid, title, stat fields) of every process whose process group is ``pgid``,
    zombies included (their title is "")."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = stat_fields(int(entry.name))
        try:
            if fields is None or int(fields[2]) != pgid:
                continue
        except (ValueError, IndexError):
            continue
        title = "" if fields[0] == b"Z" else cmdline_title(int(entry.name))
        if title is not None:
            out.append((int(entry.name), title, fields))
    return out


def pgrp_pids(pgid: int) -> list[tuple[int, str]]:
    """(pid, title) of every live process whose process group is ``pgid``."""
    return [(pid, title) for pid, title, fields in pgrp_members(pgid) if fields[0] != b"Z"]


def group_cpu_seconds(pgid: int, reaped: bool = False) -> float:
    """User + system CPU time of the live processes of group ``pgid`` (delivery
    children that already exited are not counted: held runs have none); with
    ``reaped``, also that of the children they waited for (the parent's delivery
    workers, gone after their idle time)."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            if int(fields[2]) == pgid:
                total += int(fields[11]) + int(fields[12])       # utime, stime (ticks)
                if reaped:
                    total += int(fields[13]) + int(fields[14])   # cutime, cstime
        except (OSError, ValueError, IndexError):
            continue
    return total / os.sysconf("SC_CLK_TCK")


def vmrss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def percentiles_ms(seconds: list[float]) -> dict[str, float | int] | None:
    """count, p50, p90, p99 and max of durations given in seconds, in milliseconds
    (nearest rank); None when there are none."""
    if not seconds:
        return None
    ordered = sorted(seconds)
    last = len(ordered) - 1

    def rank(q: float) -> float:
        return round(1000 * ordered[min(last, max(0, -(-len(ordered) * q // 100) - 1))], 2)
    return {"count": len(ordered), "p50": rank(50), "p90": rank(90), "p99": rank(99),
            "max": round(1000 * ordered[-1], 2)}


def cpu_ticks(pid: int) -> int | None:
    """utime + stime of a process, in clock ticks (None once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return None


def cpu_seconds_by_title(samples: dict[int, tuple[str, int]]) -> dict[str, float]:
    """CPU seconds per process title (short-lived processes count up to their last sample)."""
    hz = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for title, ticks in samples.values():
        out[title] = out.get(title, 0.0) + ticks / hz
    return {t: round(v, 2) for t, v in sorted(out.items())}


def kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_process_group(proc: subprocess.Popen | None, grace: float = 5.0) -> None:
    """SIGTERM the leader, wait, then SIGKILL the whole group and reap."""
    if proc is None:
        return
    pgid = proc.pid
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    kill_group(pgid, signal.SIGKILL)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass
    wait_until(lambda: not pgrp_pids(pgid), time.monotonic() + 5)


# --------------------------------------------------------------------------- RSS sampling

class RssSampler(MemoryMeter):
    """Peak RSS and PSS summed over the process group (meters.MemoryMeter: RSS every
    200 ms, PSS every second and at each new RSS high), and the CPU ticks each process
    had when last seen (its whole life: ``cpu_seconds_by_title``)."""

    def __init__(self, pgid: int, interval: float = RSS_INTERVAL, pss_every: int = PSS_EVERY) -> None:
        super().__init__(lambda: pgrp_pids(pgid), interval, pss_every, name="rss-sampler")
        self.pgid = pgid
        self.cpu_ticks: dict[int, tuple[str, int]] = {}   # pid -> (title, utime+stime last seen)

    def observe(self, procs: list[tuple[int, str]]) -> None:
        for pid, title in procs:
            ticks = cpu_ticks(pid)
            if ticks is not None:
                self.cpu_ticks[pid] = (title, ticks)


# --------------------------------------------------------------------------- sinks

class PostfixSink:
    """Postfix's smtp-sink; its ``-c`` counters (``... mesg=N\\r``) are read as they come."""

    name = "postfix smtp-sink"

    def __init__(self, tools: Path, port: int, logdir: Path) -> None:
        self.tools = tools
        self.port = port
        self.counter = Counter()
        self.proc: subprocess.Popen | None = None
        self.errlog = open(logdir / "sink.err", "wb")

    def start(self) -> None:
        env = dict(os.environ, LD_LIBRARY_PATH=str(self.tools / "usr/lib/postfix"))
        cmd = [str(self.tools / "usr/sbin/smtp-sink"), "-c", "-m", "1024"]
        if os.getuid() == 0:
            cmd += ["-u", "nobody"]          # smtp-sink refuses to run as root
        cmd += [f"127.0.0.1:{self.port}", "1024"]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=self.errlog,
                                     start_new_session=True)
        threading.Thread(target=self._read, daemon=True, name="sink-reader").start()
        if not wait_until(self._listening, time.monotonic() + 10):
            raise BenchError("smtp-sink did not start listening")

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise BenchError(f"smtp-sink exited ({self.proc.returncode})")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.recv(512)
                s.sendall(b"QUIT\r\n")
            return True
        except OSError:
            return False

    def _read(self) -> None:
        buf = b""
        stream = self.proc.stdout
        while True:
            chunk = stream.read1(65536)
            if not chunk:
                return
            now = time.monotonic()
            buf += chunk
            *records, buf = buf.replace(b"\n", b"\r").split(b"\r")
            for rec in reversed(records):
                idx = rec.rfind(b"mesg=")
                if idx >= 0:
                    try:
                        self.counter.set(int(rec[idx + 5:].split()[0]), now)
                    except (ValueError, IndexError):
                        continue
                    break

    def stop(self) -> None:
        stop_process_group(self.proc, grace=2)
        self.errlog.close()


SINK_SERVER = r'''
import asyncio, sys, time
from aiosmtpd.smtp import SMTP

count = 0
class Handler:
    async def handle_DATA(self, server, session, envelope):
        global count
        count += 1
        sys.stdout.write(f"{count} {time.monotonic()!r}\n")
        sys.stdout.flush()
        return "250 2.0.0 Ok: queued"

async def main(port):
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(lambda: SMTP(Handler(), hostname="sink.test"),
                                   "127.0.0.1", port, backlog=1024)
    sys.stdout.write("ready\n"); sys.stdout.flush()
    await srv.serve_forever()

asyncio.run(main(int(sys.argv[1])))
'''


class AiosmtpdSink:
    """An aiosmtpd sink in its own process; it prints ``COUNT MONOTONIC`` per message
    (CLOCK_MONOTONIC is system-wide, so its times compare with ours)."""

    name = "aiosmtpd sink"

    def __init__(self, port: int, logdir: Path) -> None:
        self.port = port
        self.counter = Counter()
        self.proc: subprocess.Popen | None = None
        self.ready = threading.Event()
        self.errlog = open(logdir / "sink.err", "wb")

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", SINK_SERVER, str(self.port)],
                                     stdout=subprocess.PIPE, stderr=self.errlog,
                                     start_new_session=True)
        threading.Thread(target=self._read, daemon=True, name="sink-reader").start()
        deadline = time.monotonic() + 20
        while not self.ready.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError("aiosmtpd sink did not start")

    def _read(self) -> None:
        for line in self.proc.stdout:
            parts = line.split()
            if parts == [b"ready"]:
                self.ready.set()
            elif len(parts) == 2:
                try:
                    self.counter.set(int(parts[0]), float(parts[1]))
                except ValueError:
                    pass

    def stop(self) -> None:
        stop_process_group(self.proc, grace=2)
        self.errlog.close()


# --------------------------------------------------------------------------- load

def make_message(size: int, rcpt: str) -> bytes:
    """A message of ``size`` bytes (CRLF lines, nothing to dot-stuff), with a
    fixed-width message number ``00000000`` that each send replaces."""
    head = (f"From: <{SENDER}>\r\nTo: <{rcpt}>\r\nSubject: bench message 00000000\r\n"
            f"Message-ID: <bench.00000000.{os.getpid()}@local.test>\r\n\r\n").encode()
    line = (b"abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
            b"0123456789abcdef" + b"\r\n")                     # 80 bytes
    body = bytearray(head)
    while size - len(body) - len(line) >= 3:
        body += line
    rest = size - len(body)
    body += b"x" * max(1, rest - 2) + b"\r\n"
    return bytes(body)


def numbered(template: bytes, i: int) -> bytes:
    num = b"%08d" % i
    return (template.replace(b"bench message 00000000", b"bench message " + num, 1)
            .replace(b"<bench.00000000.", b"<bench." + num + b".", 1))


class LoadStats:
    def __init__(self) -> None:
        self.first_connect: float | None = None
        self.last_accept: float | None = None
        self.accepted = 0
        self.failed = 0
        self.errors: dict[str, int] = {}
        self.connections = 0
        self.commit_seconds: list[float] = []    # final "." of DATA -> its 250, per message
        self.connect_seconds: list[float] = []   # connect -> the EHLO's 250, per connection

    def error(self, what: str) -> None:
        self.failed += 1
        what = what[:120]
        self.errors[what] = self.errors.get(what, 0) + 1


class SmtpError(Exception):
    pass


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, list[bytes]]:
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise SmtpError("connection closed by the server")
        lines.append(line.rstrip(b"\r\n"))
        if len(line) < 4 or line[3:4] != b"-":
            try:
                return int(line[:3]), lines
            except ValueError:
                raise SmtpError(f"bad reply {line!r}") from None


async def open_session(port: int, stats: LoadStats, host: str = "127.0.0.1"):
    """Connect, read the banner, EHLO: (reader, writer, whether PIPELINING is
    advertised); the time it took is appended to ``stats.connect_seconds``."""
    t0 = time.monotonic()
    if stats.first_connect is None:
        stats.first_connect = t0
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
    stats.connections += 1
    try:
        code, lines = await read_reply(reader)
        if code != 220:
            raise SmtpError(f"banner {lines[-1].decode(errors='replace')}")
        writer.write(b"EHLO client.bench.test\r\n")
        code, lines = await read_reply(reader)
        if code != 250:
            raise SmtpError(f"EHLO {lines[-1].decode(errors='replace')}")
    except BaseException:
        await close_writer(writer)
        raise
    stats.connect_seconds.append(time.monotonic() - t0)
    return reader, writer, any(l[4:].upper().startswith(b"PIPELINING") for l in lines)


async def send_message(reader, writer, body: bytes, rcpt: str, pipelining: bool,
                       stats: LoadStats) -> bool:
    """One transaction (MAIL, RCPT, DATA, the body, the final ``.``); the commit (the
    ``.`` to its reply) is timed into ``stats.commit_seconds``.  A refusal is counted
    in ``stats`` and leaves the session ready for the next transaction."""
    cmds = [f"MAIL FROM:<{SENDER}> SIZE={len(body)}\r\n".encode(),
            f"RCPT TO:<{rcpt}>\r\n".encode(), b"DATA\r\n"]
    if pipelining:
        writer.write(b"".join(cmds))
        replies = [await read_reply(reader) for _ in cmds]
    else:
        replies = []
        for c in cmds:
            writer.write(c)
            replies.append(await read_reply(reader))
            if replies[-1][0] >= 400:
                break
    codes = [r[0] for r in replies]
    if codes[:2] != [250, 250] or len(codes) < 3 or codes[2] != 354:
        stats.error(f"envelope refused: {[r[1][-1].decode(errors='replace') for r in replies]}")
        if len(codes) == 3 and codes[2] == 354:
            writer.write(b".\r\n")      # finish the transaction
            await read_reply(reader)
        writer.write(b"RSET\r\n")
        await read_reply(reader)
        return False
    writer.write(body)
    await writer.drain()
    t0 = time.monotonic()
    writer.write(b".\r\n")
    code, lines = await read_reply(reader)
    now = time.monotonic()
    if code == 250:
        stats.commit_seconds.append(now - t0)
        stats.accepted += 1
        stats.last_accept = now
        return True
    stats.error(f"DATA {lines[-1].decode(errors='replace')}")
    return False


async def quit_session(reader, writer) -> None:
    writer.write(b"QUIT\r\n")
    try:
        await asyncio.wait_for(read_reply(reader), 10)
    except (SmtpError, OSError, asyncio.TimeoutError):
        pass


async def close_writer(writer) -> None:
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass


async def asyncio_load(port: int, n: int, sessions: int, size: int, rcpt: str,
                       per_session: int, pipelining: bool, stats: LoadStats) -> None:
    template = make_message(size, rcpt)
    next_index = iter(range(n))
    lock_free_take = next_index.__next__        # single-threaded event loop: no lock needed

    def take() -> int | None:
        try:
            return lock_free_take()
        except StopIteration:
            return None

    async def one_connection(first: int) -> int | None:
        """Sends up to ``per_session`` messages on one connection starting with message
        ``first``; returns the next message index to send, or None."""
        reader, writer, can_pipeline = await open_session(port, stats)
        i: int | None = first
        try:
            sent_here = 0
            while i is not None:
                await send_message(reader, writer, numbered(template, i), rcpt,
                                   pipelining and can_pipeline, stats)
                sent_here += 1
                i = take()
                if sent_here >= per_session:
                    break
            await quit_session(reader, writer)
            return i
        finally:
            await close_writer(writer)

    async def worker() -> None:
        i = take()
        while i is not None:
            try:
                i = await one_connection(i)
            except (OSError, SmtpError, asyncio.IncompleteReadError) as exc:
                stats.error(f"{type(exc).__name__}: {exc}")
                i = take()

    await asyncio.gather(*(worker() for _ in range(sessions)))


def smtp_source_load(tools: Path, port: int, n: int, sessions: int, size: int, rcpt: str,
                     per_session: int, stats: LoadStats, deadline: float, logdir: Path) -> None:
    """Postfix's smtp-source; its ``-c`` counter gives the time of each accepted message.
    ``-l`` is the payload length, not counting its few header lines."""
    env = dict(os.environ, LD_LIBRARY_PATH=str(tools / "usr/lib/postfix"))
    cmd = [str(tools / "usr/sbin/smtp-source"), "-c", "-s", str(sessions), "-m", str(n),
           "-l", str(size), "-f", SENDER, "-t", rcpt, "-M", "client.bench.test"]
    if per_session > 1:
        cmd.append("-d")
    cmd.append(f"127.0.0.1:{port}")
    with open(logdir / "smtp-source.err", "wb") as err:
        stats.first_connect = time.monotonic()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err,
                                start_new_session=True)
        try:
            buf = b""
            done = threading.Event()

            def reader() -> None:
                nonlocal buf
                while True:
                    chunk = proc.stdout.read1(65536)
                    if not chunk:
                        done.set()
                        return
                    now = time.monotonic()
                    buf += chunk
                    *records, buf = buf.replace(b"\n", b"\r").split(b"\r")
                    for rec in reversed(records):
                        if rec.strip().isdigit():
                            count = int(rec)
                            if count > stats.accepted:
                                stats.accepted = count
                                stats.last_accept = now
                            break

            threading.Thread(target=reader, daemon=True).start()
            while not done.wait(0.1):
                if time.monotonic() > deadline:
                    raise asyncio.TimeoutError()
            proc.wait(5)
            if proc.returncode != 0:
                stats.error(f"smtp-source exit {proc.returncode}: "
                            + (logdir / "smtp-source.err").read_text(errors="replace")[-200:])
        finally:
            stop_process_group(proc, grace=1)
    stats.connections = n if per_session <= 1 else sessions


# --------------------------------------------------------------------------- daemon

# ``--filter passthrough``: a proc-exec filter registered on every phase (data-line
# included) and every report event, that lets everything through unchanged: what the
# filter protocol itself costs (docs/filters.md).  Run by the system's Python 3, which
# the filter's user (_smtpd when root) can execute.
PASSTHROUGH_FILTER = r"""
import sys
PHASES = ("connect", "helo", "ehlo", "starttls", "auth", "mail-from", "rcpt-to", "data",
          "data-line", "rset", "quit", "noop", "help", "wiz", "commit")
out = sys.stdout
for line in sys.stdin:
    if line.startswith("filter|"):
        f = line.rstrip("\n").split("|", 7)
        if f[4] == "data-line":
            out.write("filter-dataline|%s|%s|%s\n" % (f[5], f[6], f[7]))
        else:
            out.write("filter-result|%s|%s|proceed\n" % (f[5], f[6]))
        out.flush()
    elif line == "config|ready\n":
        for phase in PHASES:
            out.write("register|filter|smtp-in|%s\n" % phase)
        out.write("register|report|smtp-in|*\nregister|ready\n")
        out.flush()
"""


def filter_lines(base: Path, kind: str) -> list[str]:
    if kind == "none":
        return []
    path = base / "passthrough.py"
    path.write_text(PASSTHROUGH_FILTER)
    os.chmod(base, 0o755)
    os.chmod(path, 0o644)
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    return [f'filter bench proc-exec "{python} {path}"']


def build_config(base: Path, port: int, mode: str, sink_port: int,
                 filter_kind: str = "none", extra: tuple[str, ...] = ()) -> tuple[str, Path]:
    """The configuration and the Maildir new/ directory that the run fills; ``extra``:
    more lines for its head (``smtp limit ...``)."""
    uid, gid = os.getuid(), os.getgid()
    if uid == 0:
        nobody = pwd.getpwnam("nobody")
        uid, gid = nobody.pw_uid, nobody.pw_gid
    home = base / "home" / MAILDIR_USER
    home.mkdir(parents=True)
    os.chmod(base / "home", 0o711)
    if os.getuid() == 0:
        os.chown(home, uid, gid)
    filters = filter_lines(base, filter_kind)
    lines = [
        "# pysmtpd benchmark configuration (bench/bench_mail.py)",
        *extra,
        *filters,
        f"listen on 127.0.0.1 port {port}" + (" filter bench" if filters else ""),
        f'table users {{ {MAILDIR_USER} = "{uid}:{gid}:{home}" }}',
        f'action "outbound" relay host "smtp://127.0.0.1:{sink_port}"',
        'action "local" maildir "~/Maildir" userbase <users>',
        'match from any for domain "example.test" action "local"',
        'match from local for any action "outbound"',
    ]
    return "\n".join(lines) + "\n", home / "Maildir" / "new"


class Destination:
    """Where the run's mail goes and what counts it: the relay sink (``relay``), or a
    watch on the Maildir's new/ (``maildir``)."""

    def __init__(self, mode: str, tools: Path | None, base: Path, sink_port: int,
                 new_dir: Path) -> None:
        self.sink = self.watch = None
        if mode == "relay":
            self.sink = PostfixSink(tools, sink_port, base) if tools is not None \
                else AiosmtpdSink(sink_port, base)
            self.sink.start()
            self.counter, self.name, self.rcpt = self.sink.counter, self.sink.name, RELAY_RCPT
        else:
            self.watch = MaildirWatch(new_dir)
            self.watch.start()
            self.counter, self.name, self.rcpt = self.watch.counter, "maildir new/", MAILDIR_RCPT
        self.check: dict = {}         # the watch's final check, once stopped

    def stop(self) -> None:
        for thing in (self.watch, self.sink):
            if thing is not None:
                thing.stop()
        if self.watch is not None:
            self.check = self.watch.final_check()   # before the Maildir is removed


class DaemonRun:
    def __init__(self, base: Path, config_text: str) -> None:
        self.base = base
        self.config = base / "smtpd.conf"
        self.config.write_text(config_text)
        self.spool = base / "spool"
        self.socket = base / "ctl.sock"
        self.logfile = base / "smtpd.log"
        self.proc: subprocess.Popen | None = None

    def start(self, *extra: str) -> None:
        cmd = [sys.executable, "-m", "smtpd", "-d", "-f", str(self.config),
               "--spool", str(self.spool), "--socket", str(self.socket), *extra]
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + BOOT_TIMEOUT
        ok = wait_until(lambda: "ready:" in self.log() or self.proc.poll() is not None, deadline)
        if not ok or self.proc.poll() is not None:
            raise BenchError(f"smtpd did not start:\n{self.log_tail()}")

    def log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def smtpctl(self, *args: str) -> str:
        res = subprocess.run([sys.executable, "-m", "smtpctl", "--socket", str(self.socket), *args],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            raise BenchError(f"smtpctl {' '.join(args)}: {res.stdout}{res.stderr}")
        return res.stdout

    def show_stats(self) -> dict[str, str]:
        """``smtpctl show stats`` of this daemon, key -> value."""
        return parse_stats(self.smtpctl("show", "stats"))

    def stop(self) -> None:
        stop_process_group(self.proc, grace=5)


# --------------------------------------------------------------------------- main

def get_postfix_tools(quiet: bool) -> Path | None:
    if (POSTFIX_DIR / "usr/sbin/smtp-sink").exists() and (POSTFIX_DIR / "usr/sbin/smtp-source").exists():
        return POSTFIX_DIR
    try:
        res = subprocess.run(["sh", str(BENCH / "get-postfix-tools.sh"), str(POSTFIX_DIR)],
                             capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode != 0:
        if not quiet:
            print(f"bench: Postfix tools unavailable: {res.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    return POSTFIX_DIR


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, default=2000, help="messages to send (default 2000)")
    p.add_argument("-s", type=int, default=10, help="concurrent SMTP sessions (default 10)")
    p.add_argument("--size", type=int, default=5120, help="message size in bytes (default 5120)")
    p.add_argument("--mode", choices=["relay", "maildir"], default="relay")
    p.add_argument("--per-session", type=int, default=1, metavar="K",
                   help="messages per SMTP connection (default 1, as smtp-source)")
    p.add_argument("--client", choices=["asyncio", "smtp-source"], default="asyncio",
                   help="load generator (default: the asyncio client of this script)")
    p.add_argument("--no-pipelining", action="store_true",
                   help="asyncio client: one command per round trip")
    p.add_argument("--sink", choices=["auto", "postfix", "aiosmtpd"], default="auto",
                   help="relay sink (auto: Postfix smtp-sink if it can be had)")
    p.add_argument("--timeout", type=float, default=600.0, help="global timeout in seconds")
    p.add_argument("--hold", action="store_true",
                   help="start with delivery paused (-P mta|mda): accepted msg/s is the SMTP side "
                        "alone; delivered msg/s is the drain after `smtpctl resume`")
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary directory (config, spool, logs, Maildir)")
    p.add_argument("--label", default="", help="free text copied into the JSON line")
    p.add_argument("--filter", choices=["none", "passthrough"], default="none",
                   help="passthrough: a proc-exec filter on every phase, data-line and report event")
    p.add_argument("--trace", action="append", default=[], metavar="WORD",
                   help="start smtpd with -T WORD (tracing on; see bench/bench_trace.py)")
    args = p.parse_args(argv)
    if args.n < 1 or args.s < 1 or args.size < 64 or args.per_session < 1:
        p.error("-n, -s and --per-session must be >= 1, --size >= 64")
    return args


def rate(count: int, start: float | None, end: float | None) -> float | None:
    if not count or start is None or end is None or end <= start:
        return None
    return count / (end - start)


RUNS_DIR = "pysmtpd-bench-runs"


def run_dir(prefix: str) -> Path:
    """A fresh directory for one run (config, spool, Maildir, logs), mode 0711 (as
    root, the daemon's users and the Maildir user go through it).

    Runs are made inside one parent marked as a top of a directory hierarchy
    (``chattr +T``, best effort): on ext4 each run's directory is then placed, like a
    top-level one, in a block group of its own choosing (the Orlov allocator) instead
    of next to the previous runs'.  Without it, a run inherits the inodes the previous
    run freed (its cleanup, Postfix's queue), and on ext4 without a journal every file
    it creates pays for them (the allocator skips inodes freed in the last 60-300 s:
    docs/spool.md, "Recycled inodes"), so the second daemon of a pair was measured on
    a file system made slower by the first."""
    parent = Path(tempfile.gettempdir()) / RUNS_DIR
    if not parent.is_dir():
        parent.mkdir(mode=0o711, exist_ok=True)
        subprocess.run(["chattr", "+T", str(parent)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)
    os.chmod(parent, 0o711)
    base = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(base, 0o711)
    return base


def run(args: argparse.Namespace) -> dict:
    t_start = time.monotonic()
    deadline = t_start + args.timeout
    base = run_dir("pysmtpd-bench-")
    result: dict = {
        "bench": "mail", "mode": args.mode, "n": args.n, "sessions": args.s, "size": args.size,
        "per_session": args.per_session, "client": args.client, "label": args.label,
        "filter": args.filter,
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "nproc": os.cpu_count(), "python": platform.python_version(),
        "uid": os.getuid(), "timed_out": False, "error": None, "hold": args.hold,
        "trace": args.trace,
    }
    agent = "mta" if args.mode == "relay" else "mda"
    t_resume: float | None = None
    daemon: DaemonRun | None = None
    dest: Destination | None = None
    sampler: RssSampler | None = None
    stats = LoadStats()
    counter: Counter | None = None
    load_cpu: LoadCpu | None = None
    try:
        need_postfix = args.client == "smtp-source" or (args.mode == "relay" and args.sink != "aiosmtpd")
        tools = get_postfix_tools(quiet=args.sink == "auto" and args.client == "asyncio") \
            if need_postfix else None
        if tools is None and (args.client == "smtp-source" or args.sink == "postfix"):
            raise BenchError("Postfix tools required but bench/get-postfix-tools.sh failed")
        port, sink_port = free_port(), free_port()
        config_text, new_dir = build_config(base, port, args.mode, sink_port, args.filter)
        dest = Destination(args.mode, tools, base, sink_port, new_dir)
        counter, rcpt, result["sink"] = dest.counter, dest.rcpt, dest.name
        daemon = DaemonRun(base, config_text)
        daemon.start(*(["-P", agent] if args.hold else []), *(a for w in args.trace for a in ("-T", w)))
        result["boot_seconds"] = round(time.monotonic() - t_start, 2)
        sampler = RssSampler(daemon.proc.pid)
        result["idle_rss_mib"] = round(sampler.sample(pss=True) / 1024, 1)
        result["idle_pss_mib"] = round(sampler.last_pss_kib / 1024, 1)
        result["processes"] = len(pgrp_pids(daemon.proc.pid))
        sampler.start()
        cpu_before = group_cpu_seconds(daemon.proc.pid)
        pgid = daemon.proc.pid
        load_cpu = LoadCpu(lambda: cpu_ticks_by_title(pgrp_members(pgid)), BENCH_CLIENT)

        # Load.
        try:
            if args.client == "asyncio":
                async def go():
                    await asyncio.wait_for(
                        asyncio_load(port, args.n, args.s, args.size, rcpt, args.per_session,
                                     not args.no_pipelining, stats),
                        max(1.0, deadline - time.monotonic()))
                asyncio.run(go())
            else:
                smtp_source_load(tools, port, args.n, args.s, args.size, rcpt, args.per_session,
                                 stats, deadline, base)
        except asyncio.TimeoutError:
            result["timed_out"] = True
        # The daemon's CPU for the load (with --hold: the SMTP side alone, nothing delivered).
        result["cpu_seconds_load"] = round(group_cpu_seconds(daemon.proc.pid) - cpu_before, 3)
        if args.hold:
            cpu_resume = group_cpu_seconds(daemon.proc.pid, reaped=True)
            t_resume = time.monotonic()
            daemon.smtpctl("resume", agent)
        # Delivery: wait for every accepted message (or the deadline, or a dead daemon).
        target = stats.accepted
        if target:
            wait_until(lambda: counter.count >= target or not daemon.alive(), deadline, 0.02)
            if counter.count < target and not daemon.alive():
                result["error"] = f"smtpd exited ({daemon.proc.returncode}) during the run"
            elif counter.count < target:
                result["timed_out"] = True
            if args.hold and counter.count:
                # The daemon's CPU for delivery alone (workers included), per message.
                spent = group_cpu_seconds(daemon.proc.pid, reaped=True) - cpu_resume
                result["cpu_seconds_delivery"] = round(spent, 3)
                result["cpu_ms_per_delivery"] = round(1000 * spent / counter.count, 2)
        # The load's CPU: until the daemon's CPU settles after the last delivery.
        load_cpu.finish(min(deadline, time.monotonic() + 5))
        if target:
            # Duplicates show up as more than accepted: look a moment longer.
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        result["server_commit_latency_ms"] = daemon_commit_latency(daemon, result)
    except BenchError as exc:
        result["error"] = str(exc)
    finally:
        stop_run(result, sampler, daemon, dest, base, args.keep)
        result["total_seconds"] = round(time.monotonic() - t_start, 2)

    t0 = stats.first_connect
    result.update({
        "accepted": stats.accepted, "failed": stats.failed, "connections": stats.connections,
        "errors": dict(sorted(stats.errors.items(), key=lambda kv: -kv[1])[:5]),
        "accept_seconds": round(stats.last_accept - t0, 3) if t0 and stats.last_accept else None,
        "accepted_per_s": _r(rate(stats.accepted, t0, stats.last_accept)),
        # smtp-source reports no per-message timing: null, and said so in the summary
        "commit_latency_ms": percentiles_ms(stats.commit_seconds),
        "connect_latency_ms": percentiles_ms(stats.connect_seconds),
    })
    if counter is not None:
        result.update(delivery_results(counter, stats.accepted, t_resume or t0))
    if dest is not None:
        result.update(dest.check)
    if sampler is not None:
        result.update(memory_results(sampler))
        # The old figure: each process's whole life (start-up included) up to its last
        # sample, and this script's since it started.
        by_title = cpu_seconds_by_title(sampler.cpu_ticks)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        by_title[BENCH_CLIENT] = round(usage.ru_utime + usage.ru_stime, 2)
        result["cpu_seconds_by_process_with_startup"] = by_title
        if stats.accepted:
            result["cpu_ms_per_message_with_startup"] = per_message(by_title, stats.accepted)
    if load_cpu is not None and load_cpu.by_title is not None:
        result.update(load_cpu.results(stats.accepted))
    return result


BENCH_CLIENT = "bench client (this script)"


def daemon_commit_latency(daemon: "DaemonRun", result: dict) -> dict:
    """The daemon's own commit latency from its ``smtpctl show stats`` (each figure
    None when this pysmtpd does not report it); an smtpctl failure is noted, not fatal."""
    try:
        stats = daemon.show_stats()
    except (BenchError, OSError, subprocess.TimeoutExpired) as exc:
        result["show_stats_error"] = str(exc)[:200]
        stats = {}
    return server_commit_latency(stats)


def stop_run(result: dict, sampler: RssSampler | None, daemon: DaemonRun | None,
             dest: Destination | None, base: Path, keep: bool) -> None:
    """Stop what a run started (None: never was), noting in ``result`` how the daemon
    ended and its warnings (the log's tail after a failure); remove ``base`` unless kept."""
    try:
        if sampler is not None:
            sampler.stop()
        if daemon is not None:
            result["daemon_alive_at_end"] = daemon.alive()
            log = daemon.log()
            result["log_warnings"] = sum(1 for line in log.splitlines()
                                         if "warn" in line.lower() or "error" in line.lower())
            if result.get("error") or result.get("timed_out") or result.get("failed"):
                result["log_tail"] = daemon.log_tail(15)
            daemon.stop()
    finally:
        if dest is not None:
            dest.stop()
        if keep:
            result["kept"] = str(base)
        else:
            shutil.rmtree(base, ignore_errors=True)


def delivery_results(counter: Counter, accepted: int, t0: float | None) -> dict:
    """What was delivered (counted by ``counter``) of ``accepted`` messages, from ``t0``."""
    delivered = counter.count
    last = counter.time_of(min(delivered, accepted) or delivered) if delivered else None
    return {
        "delivered": delivered,
        "duplicates": max(0, delivered - accepted),
        "deliver_seconds": round(last - t0, 3) if t0 and last else None,
        "delivered_per_s": _r(rate(min(delivered, accepted or delivered), t0, last)),
    }


def memory_results(sampler: RssSampler) -> dict:
    """Peak RSS and PSS of the daemon's processes, in all and per process title."""
    return {
        "peak_rss_mib": round(sampler.peak_kib / 1024, 1),
        "peak_rss_processes": sampler.peak_procs,
        "max_processes": sampler.max_procs,
        "peak_rss_by_process_mib": {t: round(k / 1024, 1) for t, k in sorted(sampler.peak_by_title.items())},
        "peak_pss_mib": round(sampler.peak_pss_kib / 1024, 1),
        "pss_samples": sampler.pss_samples, "pss_samples_at_rss_highs": sampler.pss_triggered,
        "peak_pss_by_process_mib": {t: round(k / 1024, 1)
                                    for t, k in sorted(sampler.peak_pss_by_title.items())},
    }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def _total(ms_by_title: dict | None) -> float | None:
    """The daemon's part of a per-title figure (this script's own row left out)."""
    if not ms_by_title:
        return None
    return round(sum(v for t, v in ms_by_title.items() if t != BENCH_CLIENT), 2)


def _pct(share: float | None) -> float | None:
    return None if share is None else round(100 * share, 1)


def latency_text(lat: dict | None, client: str = "asyncio") -> str:
    if lat is None:
        why = " (smtp-source does not report it)" if client == "smtp-source" else ""
        return f"commit latency not measured{why}"
    return (f"commit latency ms p50 {lat['p50']} p90 {lat['p90']} p99 {lat['p99']}"
            f" max {lat['max']} (n={lat['count']})")


def summary(r: dict) -> str:
    def f(x, unit=""):
        return "n/a" if x is None else f"{x}{unit}"
    s = (f"{r['mode']}{' (held, then resumed)' if r.get('hold') else ''}: n={r['n']} s={r['sessions']} size={r['size']} client={r['client']}"
         f" sink={r.get('sink', '?')}: accepted {r['accepted']}/{r['n']} at {f(r['accepted_per_s'])} msg/s"
         f" ({f(r['accept_seconds'], ' s')}), delivered {r.get('delivered', 0)}"
         f" at {f(r.get('delivered_per_s'))} msg/s ({f(r.get('deliver_seconds'), ' s')}),"
         f" peak RSS {f(r.get('peak_rss_mib'), ' MiB')}, peak PSS {f(r.get('peak_pss_mib'), ' MiB')}"
         f" (idle {f(r.get('idle_pss_mib'), ' MiB')}), {latency_text(r.get('commit_latency_ms'), r['client'])}"
         f"; server-side commit latency {latency_line(r.get('server_commit_latency_ms'))};"
         f" daemon CPU {f(r.get('daemon_cpu_ms_per_message'), ' ms')} per message (load alone;"
         f" {f(_total(r.get('cpu_ms_per_message_with_startup')), ' ms')} with start-up),"
         f" this script {f(_pct(r.get('bench_cpu_share')), ' %')} of the CPUs,"
         f" {f(_pct(r.get('steal_share')), ' %')} stolen by the hypervisor")
    if r["failed"]:
        s += f", {r['failed']} failed"
    return s + summary_alarms(r)


def summary_alarms(r: dict) -> str:
    """What must not go unnoticed at the end of a summary line."""
    s = ""
    if r.get("duplicates"):
        s += f", {r['duplicates']} DUPLICATES"
    if r["timed_out"]:
        s += ", TIMED OUT"
    if r["error"]:
        s += f", ERROR: {r['error'].splitlines()[0]}"
    return s


def run_and_print(run_fn, summary_fn, args, expected: int) -> int:
    """Run a bench (stopping what it started on SIGTERM/SIGINT), print its summary and
    its JSON line; 0 if every one of ``expected`` messages was accepted and delivered."""
    def interrupted(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    try:
        result = run_fn(args)
    except Interrupted as exc:
        print(f"bench: interrupted ({exc}); everything started was stopped", file=sys.stderr)
        return 130
    print(summary_fn(result), flush=True)
    print(json.dumps(result, sort_keys=False), flush=True)
    if result.get("log_tail") and (result["error"] or result.get("failed")):
        print(result["log_tail"], file=sys.stderr)
    ok = (not result["error"] and not result["timed_out"] and not result.get("failed")
          and result["accepted"] == expected and result.get("delivered", 0) == expected)
    return 0 if ok else 1


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_and_print(run, summary, args, args.n)


if __name__ == "__main__":
    sys.exit(main())
