"""Filter processes: started by the parent, spoken to and supervised by lka (the I/O half
of OpenSMTPD's lka_filter.c, and smtpd.c's fork_filter_processes).

The parent (root, or the daemon's user) starts each process as OpenSMTPD does,
``/bin/sh -c COMMAND`` with stdin and stdout one end of a socketpair and stderr a pipe,
as the proc's ``user`` (``group``, ``chroot``), else as ``_smtpd`` when root: never as
root.  It passes the two descriptors to lka over an AF_UNIX fd channel (``Spawner``).

lka (``Runtime``) writes the handshake, reads registrations, then carries requests and
answers between pony and the processes through the sans-I/O ``lka_filter.Engine``.
A process that exits, writes a line outside the protocol, or leaves a request
unanswered for ``smtp limit filter-timeout`` (60 s) is killed; the sessions it serves
get 421/451 4.3.0 (what was committed stays queued), and it is started again after 1,
2, 4... up to 60 s.  The daemon keeps serving: OpenSMTPD exits instead.  Its stderr is
logged line by line (``warn: filter NAME: ...``, escaped).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import pwd
import grp
import signal
import socket
import subprocess
import time

import msgspec

from common import privsep, stat
from common.messages import (
    FilterProcFork, FilterProcKill, FilterSmtpBegin, FilterSmtpBeginReply, FilterSmtpData,
    FilterSmtpDataOut, FilterSmtpEnd, FilterSmtpProtocol, FilterSmtpProtocolReply, FilterSmtpReport,
)
from common.trace import FLAGS, trace
from common.vis import COMMAND, log_text
from smtpd import lka_filter
from smtpd.filter_builtin import has_rdns
from smtpd.lka_filter import DataOut, Decision, Facts, ProtocolError, Write

log = logging.getLogger("smtpd")

BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0
STABLE_AFTER = 60.0          # a process that lived this long starts its backoff over
LINE_MAX = 65536             # a longer line from a filter is garbage
WRITE_BUFFER_MAX = 64 << 20  # a filter that does not read its input: killed as hung
FCRDNS_TIMEOUT = 5.0         # the forward lookup of a client's reverse name: longer is "fail"
# getaddrinfo failures that are not about DNS (the system's own): fcrdns "error"
_SYSTEM_FAILURES = {getattr(socket, name) for name in ("EAI_SYSTEM", "EAI_MEMORY") if hasattr(socket, name)}
START_WAIT = 20.0            # lka waits this long at start for every filter's register|ready


def make_channel() -> tuple[socket.socket, socket.socket]:
    """(the parent's end, lka's end)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def filters_changed(old, new) -> bool:
    """A reload that changes filters is refused: the processes are the ones started."""
    def key(c):
        # where a line is (lineno, file) is not what it says
        def plain(obj):
            return {k: v for k, v in msgspec.to_builtins(obj).items() if k not in ("lineno", "file")}
        return ({n: plain(p) for n, p in c.filter_procs.items()},
                {n: plain(f) for n, f in c.filters.items()}, c.filter_timeout)
    return key(old) != key(new)


# --- the parent's half -----------------------------------------------------------------------

def process_ids(proc) -> tuple[int, int, str, str]:
    """(uid, gid, home, user name) a filter process runs as; ValueError when that would
    be root or the user is unknown."""
    if not privsep.privileged():
        pw = pwd.getpwuid(os.getuid())
        if proc.user and proc.user != pw.pw_name:
            raise ValueError(f"user {proc.user} needs a daemon started as root")
        return os.getuid(), os.getgid(), pw.pw_dir, pw.pw_name
    try:
        pw = pwd.getpwnam(proc.user or privsep.SMTPD_USER)
    except KeyError:
        raise ValueError(f"unknown user {proc.user}") from None
    gid = pw.pw_gid
    if proc.group:
        try:
            gid = grp.getgrnam(proc.group).gr_gid
        except KeyError:
            raise ValueError(f"unknown group {proc.group}") from None
    if pw.pw_uid == 0 or gid == 0:
        raise ValueError("a filter never runs as root")
    return pw.pw_uid, gid, pw.pw_dir, pw.pw_name


def fcrdns_result(ip: str, lookup: list | BaseException) -> str:
    """The link-connect report's fcrdns word for the forward lookup's outcome: its
    getaddrinfo entries, or what it raised (see forward_confirmed).

    OpenSMTPD says "error" when getaddrinfo fails other than EAI_NODATA/EAI_NONAME
    (smtp_session.c smtp_getaddrinfo_cb), but its resolver, libasr, folds every DNS
    failure (SERVFAIL, no answer in time) into EAI_NODATA: what it reports then is
    "fail", as OpenSMTPD 6.8 does in tests/e2e/test_filters_builtin.py.  Its "error"
    comes from a name libasr will not ask about (hnok_lenient: EAI_FAIL) and from the
    system's own failures (EAI_SYSTEM, EAI_MEMORY); pysmtpd words them the same way."""
    if isinstance(lookup, socket.gaierror):
        return "error" if lookup.errno in _SYSTEM_FAILURES else "fail"
    if isinstance(lookup, asyncio.TimeoutError):
        return "fail"
    if isinstance(lookup, BaseException):     # UnicodeError: not a name; OSError: the system
        return "error"
    return "pass" if any(info[4][0] == ip for info in lookup) else "fail"


async def forward_confirmed(rdns: str, src: str) -> str:
    """Forward-confirmed reverse DNS, as the link-connect report words it (smtp_session.c
    smtp_getaddrinfo_cb, lka_filter.c lka_report_smtp_link_connect): "pass" when the name's
    addresses include the client's; "fail" when they do not, or the lookup found none or
    failed (fcrdns_result says why, as OpenSMTPD's resolver); "error" for a name that
    cannot be asked about, or a failure of the system.  A local client is "pass",
    as OpenSMTPD's local enqueue sets it; a client with no reverse name "fail", as
    getnameinfo's EAI_NONAME (libasr's answer to any PTR failure)."""
    if src.startswith("unix:"):
        return "pass"
    if not has_rdns(rdns):
        return "fail"
    ip = src.rsplit(":", 1)[0].strip("[]")
    # the hints of smtp_getaddrinfo_cb: the client's family, a stream socket
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        infos = await asyncio.wait_for(asyncio.get_running_loop().getaddrinfo(
            rdns, None, family=family, type=socket.SOCK_STREAM), FCRDNS_TIMEOUT)
    except (OSError, UnicodeError, asyncio.TimeoutError) as exc:
        return fcrdns_result(ip, exc)
    return fcrdns_result(ip, infos)


class Spawner:
    """The parent's side: start filter processes when lka asks, reap them, kill on request."""

    def __init__(self, config, channel: socket.socket) -> None:
        self.config = config
        self.channel = channel
        self.procs: dict[int, tuple[str, subprocess.Popen]] = {}

    def fork(self, msg: FilterProcFork) -> None:
        proc = self.config.filter_procs.get(msg.name)
        header = {"name": msg.name, "generation": msg.generation, "pid": 0, "error": ""}
        if proc is None:
            header["error"] = "no such processor"
            self.channel.send(json.dumps(header).encode())
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        err_r, err_w = os.pipe()
        try:
            uid, gid, home, user = process_ids(proc)
            root = privsep.privileged()
            chroot = proc.chroot if root else None

            def drop() -> None:
                # in the child, before exec: chroot first (it needs root), then the ids,
                # as smtpd.c's fork_filter_process
                if chroot:
                    os.chroot(chroot)
                    os.chdir("/")
                if root:
                    os.setgroups([])
                    os.setresgid(gid, gid, gid)
                    os.setresuid(uid, uid, uid)
            child = subprocess.Popen(
                ["/bin/sh", "-c", proc.command], stdin=theirs.fileno(), stdout=theirs.fileno(),
                stderr=err_w, close_fds=True, process_group=0,
                cwd=home if os.path.isdir(home) and not chroot else "/",
                env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin:/usr/local/bin", "HOME": home,
                     "USER": user, "LOGNAME": user, "SHELL": "/bin/sh"},
                preexec_fn=drop if (root or chroot) else None)
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            header["error"] = str(exc)
            log.warning("warn: filter %s: cannot start: %s", msg.name, exc)
            self.channel.send(json.dumps(header).encode())
            ours.close()
            os.close(err_r)
            return
        finally:
            theirs.close()
            os.close(err_w)
        header["pid"] = child.pid
        self.procs[child.pid] = (msg.name, child)
        socket.send_fds(self.channel, [json.dumps(header).encode()], [ours.fileno(), err_r])
        ours.close()
        os.close(err_r)
        pidfd = os.pidfd_open(child.pid)
        asyncio.get_running_loop().add_reader(pidfd, self._exited, child.pid, pidfd)

    def _exited(self, pid: int, pidfd: int) -> None:
        asyncio.get_running_loop().remove_reader(pidfd)
        os.close(pidfd)
        name, child = self.procs.pop(pid)
        status = child.wait()
        cause = f"terminated; signal {-status}" if status < 0 else f"exited {'okay' if status == 0 else 'abnormally'}"
        log.warning("warn: lost processor: %s %s", name, cause)

    def kill(self, msg: FilterProcKill) -> None:
        entry = self.procs.get(msg.pid)
        if entry is None or entry[0] != msg.name:
            return
        try:
            os.killpg(msg.pid, signal.SIGKILL)     # the shell and what it started
        except OSError:
            pass

    def stop(self) -> None:
        for pid in list(self.procs):
            try:
                os.killpg(pid, signal.SIGTERM)
            except OSError:
                pass


# --- lka's half ---------------------------------------------------------------------------------

class Proc:
    """One filter process as lka sees it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.generation = 0
        self.pid = 0
        self.sock: socket.socket | None = None
        self.err = -1
        self.inbuf = bytearray()
        self.errbuf = bytearray()
        self.outbuf = bytearray()
        self.started = 0.0
        self.last_read = 0.0
        self.waiting_since: float | None = None
        self.failures = 0
        self.restart: asyncio.TimerHandle | None = None
        self.ready = asyncio.Event()

    @property
    def running(self) -> bool:
        return self.sock is not None


class Runtime:
    """lka's filters: processes, sessions, and the bridge to pony's messages."""

    def __init__(self, ctx, channel: socket.socket | None, builtin=None) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.channel = channel
        self.engine = lka_filter.Engine(self.config, builtin)
        self.procs = {name: Proc(name) for name in self.config.filter_procs}
        self.waiting: dict[int, int] = {}          # session -> reqid of its pending protocol request
        self.data_partial: dict[int, bytes] = {}
        self.out_chunks: dict[int, list[str]] = {}
        self._check: asyncio.TimerHandle | None = None
        self._stopping = False
        self._tasks: set[asyncio.Task] = set()
        self._outbox: list = []              # to pony, in order, sent by one task
        self._sending = False
        for name in self.procs:
            stat.set(f"filter.{name}.running", 0)

    def _to_pony(self, msg) -> None:
        """Queue a message for pony; one sender task keeps them in order (no task per message)."""
        self._outbox.append(msg)
        if not self._sending:
            self._sending = True
            self._spawn(self._send_outbox())

    async def _send_outbox(self) -> None:
        try:
            while self._outbox:
                batch, self._outbox = self._outbox, []
                for msg in batch:
                    await self.ctx.mesh.send("pony", msg)
        finally:
            self._sending = False

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def status(self) -> dict[str, str]:
        """``smtpctl show status``: each process's state (docs/filters.md)."""
        out = {}
        for name, proc in self.procs.items():
            if proc.ready.is_set():
                state = "running"
            elif proc.sock is not None:
                state = "starting"
            elif proc.restart is not None:
                state = f"restarting (failures {proc.failures})"
            else:
                state = "stopped"
            out[name] = state
        return out

    async def start(self) -> None:
        """At conf_end: start every process and wait (bounded) for its register|ready."""
        if not self.procs or self.channel is None:
            return
        self.channel.setblocking(False)
        loop = asyncio.get_running_loop()
        loop.add_reader(self.channel.fileno(), self._channel_readable)
        for proc in self.procs.values():
            await self._fork(proc)
        try:
            async with asyncio.timeout(min(START_WAIT, float(self.config.filter_timeout))):
                for proc in self.procs.values():
                    await proc.ready.wait()
        except TimeoutError:
            late = [p.name for p in self.procs.values() if not p.ready.is_set()]
            log.warning("warn: filter: not ready after start: %s (their sessions get 421 until they are)",
                        ", ".join(late))
        self._check = loop.call_later(1.0, self._check_timeouts)

    def stop(self) -> None:
        self._stopping = True
        if self._check is not None:
            self._check.cancel()
        for proc in self.procs.values():
            if proc.restart is not None:
                proc.restart.cancel()
            self._close(proc)

    # -- processes ------------------------------------------------------------------------

    async def _fork(self, proc: Proc) -> None:
        proc.restart = None
        proc.generation += 1
        await self.ctx.mesh.send("parent", FilterProcFork(name=proc.name, generation=proc.generation))

    def _channel_readable(self) -> None:
        for _ in range(16):
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.channel, 4096, 2)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if not data:
                asyncio.get_running_loop().remove_reader(self.channel.fileno())
                return
            header = json.loads(data)
            proc = self.procs.get(header["name"])
            if proc is None or header["generation"] != proc.generation or len(fds) != 2:
                for fd in fds:
                    os.close(fd)
                if proc is not None and header.get("error"):
                    log.warning("warn: filter %s: cannot start: %s", proc.name, log_text(header["error"], COMMAND))
                    self._schedule_restart(proc)
                continue
            self._attach(proc, header["pid"], fds[0], fds[1])

    def _attach(self, proc: Proc, pid: int, sock_fd: int, err_fd: int) -> None:
        loop = asyncio.get_running_loop()
        proc.sock = socket.socket(fileno=sock_fd)
        proc.sock.setblocking(False)
        os.set_blocking(err_fd, False)
        proc.err, proc.pid = err_fd, pid
        proc.inbuf.clear(), proc.errbuf.clear(), proc.outbuf.clear()
        proc.started = proc.last_read = time.monotonic()
        proc.waiting_since = proc.started             # its register|ready is awaited
        self.engine.proc_started(proc.name, proc.generation)
        loop.add_reader(proc.sock.fileno(), self._readable, proc)
        loop.add_reader(err_fd, self._stderr, proc)
        state = self.engine.procs[proc.name]
        for line in lka_filter.handshake(state.version, self._version(), self.config.smtp_command_timeout,
                                         self.config.hostname):
            self._write(proc, line)
        self._drain(proc)
        log.info("info: filter %s: started, pid %d", proc.name, pid)
        stat.increment(f"filter.{proc.name}.starts")

    @staticmethod
    def _version() -> str:
        from smtpd.main import VERSION
        return VERSION

    def _close(self, proc: Proc) -> None:
        loop = asyncio.get_running_loop()
        if proc.sock is not None:
            try:
                loop.remove_reader(proc.sock.fileno())
                loop.remove_writer(proc.sock.fileno())
            except (ValueError, OSError):
                pass
            proc.sock.close()
            proc.sock = None
        if proc.err >= 0:
            try:
                loop.remove_reader(proc.err)
            except (ValueError, OSError):
                pass
            os.close(proc.err)
            proc.err = -1

    def _lost(self, proc: Proc, why: str, kill: bool) -> None:
        """The process failed: its sessions fail, it is killed if still there, and
        started again after its backoff."""
        if proc.sock is None:
            return
        log.warning("warn: filter %s: %s; restarting it", proc.name, why)
        stat.increment(f"filter.{proc.name}.failures")
        stat.set(f"filter.{proc.name}.running", 0)
        if kill and proc.pid:
            self._spawn(self.ctx.mesh.send("parent", FilterProcKill(name=proc.name, pid=proc.pid)))
        self._close(proc)
        proc.ready.clear()
        self.engine.proc_lost(proc.name)
        self._flush_engine()
        self._schedule_restart(proc)

    def _schedule_restart(self, proc: Proc) -> None:
        if self._stopping:
            return
        if proc.started and time.monotonic() - proc.started >= STABLE_AFTER:
            proc.failures = 0
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * (2 ** proc.failures))
        proc.failures += 1
        stat.increment(f"filter.{proc.name}.restarts")
        loop = asyncio.get_running_loop()
        proc.restart = loop.call_later(delay, lambda: self._spawn(self._fork(proc)))

    def _readable(self, proc: Proc) -> None:
        try:
            data = proc.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(proc, f"read error: {exc}", kill=True)
            return
        if not data:
            self._lost(proc, "exited (end of its output)", kill=True)
            return
        proc.last_read = time.monotonic()
        proc.inbuf += data
        try:
            self._lines(proc)
        finally:
            self._flush_engine()        # what this read produced, in one batch

    def _lines(self, proc: Proc) -> None:
        while True:
            nl = proc.inbuf.find(b"\n")
            if nl < 0:
                if len(proc.inbuf) > LINE_MAX:
                    self._lost(proc, "line too long", kill=True)
                return
            raw = bytes(proc.inbuf[:nl])
            del proc.inbuf[:nl + 1]
            line = raw.decode("utf-8", "surrogateescape")
            if FLAGS.filters:
                trace("filters: %s -> lka: %s", proc.name, log_text(line[:1000], COMMAND))
            try:
                self.engine.receive(proc.name, line)
            except ProtocolError as exc:
                stat.increment(f"filter.{proc.name}.protocol_errors")
                self._flush_engine()
                self._lost(proc, f"protocol error: {log_text(str(exc)[:300], COMMAND)}", kill=True)
                return
            if self.engine.procs[proc.name].ready and not proc.ready.is_set():
                proc.ready.set()
                proc.waiting_since = None
                stat.set(f"filter.{proc.name}.running", 1)
                log.info("info: filter %s: ready", proc.name)

    def _stderr(self, proc: Proc) -> None:
        try:
            data = os.read(proc.err, 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(proc.err)
            os.close(proc.err)
            proc.err = -1
            return
        proc.errbuf += data
        while (nl := proc.errbuf.find(b"\n")) >= 0 or len(proc.errbuf) > 4096:
            cut = nl if nl >= 0 else 4096
            line = bytes(proc.errbuf[:cut])
            del proc.errbuf[:cut + (1 if nl >= 0 else 0)]
            log.warning("warn: filter %s: %s", proc.name, log_text(line, COMMAND))

    def _write(self, proc: Proc, line: str) -> None:
        if proc.sock is None:
            return
        if FLAGS.filters:
            trace("filters: lka -> %s: %s", proc.name, log_text(line[:1000], COMMAND))
        proc.outbuf += line.encode("utf-8", "surrogateescape") + b"\n"

    def _drain(self, proc: Proc) -> None:
        """Write what is buffered (once per batch of lines, not per line)."""
        if proc.sock is None or not proc.outbuf:
            return
        if len(proc.outbuf) > WRITE_BUFFER_MAX:
            self._lost(proc, "does not read its input", kill=True)
            return
        loop = asyncio.get_running_loop()
        try:
            sent = proc.sock.send(proc.outbuf)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._lost(proc, f"write error: {exc}", kill=True)
            return
        del proc.outbuf[:sent]
        if proc.outbuf:
            loop.add_writer(proc.sock.fileno(), self._writable, proc)

    def _writable(self, proc: Proc) -> None:
        if proc.sock is None:
            return
        asyncio.get_running_loop().remove_writer(proc.sock.fileno())
        self._drain(proc)

    def _check_timeouts(self) -> None:
        """A process with work pending and silent for filter-timeout is hung."""
        now = time.monotonic()
        busy = self._busy_procs()
        for proc in self.procs.values():
            if proc.sock is None:
                continue
            if proc.name not in busy and proc.ready.is_set():
                proc.waiting_since = None
                continue
            if proc.waiting_since is None:
                proc.waiting_since = now
            since = max(proc.waiting_since, proc.last_read)
            if now - since >= self.config.filter_timeout:
                stat.increment(f"filter.{proc.name}.timeouts")
                self._lost(proc, f"no answer in {self.config.filter_timeout}s", kill=True)
        self._check = asyncio.get_running_loop().call_later(1.0, self._check_timeouts)

    def _busy_procs(self) -> set[str]:
        busy = set()
        for fs in self.engine.sessions.values():
            if fs.index >= 0 and fs.index < len(fs.entries) and fs.entries[fs.index].proc:
                busy.add(fs.entries[fs.index].proc)
            if fs.phase == "data-line" and not fs.data_done:
                busy.update(m.proc for m in fs.data_entries)
        return busy

    # -- engine output -> processes and pony ---------------------------------------------

    def _flush_engine(self) -> None:
        """The engine's output: lines to processes (written once per call), decisions and
        filtered body lines to pony (one message per session and call)."""
        written: set[str] = set()
        data: dict[int, DataOut] = {}
        for item in self.engine.take_output():
            if isinstance(item, Write):
                proc = self.procs[item.proc]
                if proc.waiting_since is None:
                    proc.waiting_since = time.monotonic()
                self._write(proc, item.line)
                written.add(item.proc)
                if item.line.startswith("filter|"):
                    stat.increment(f"filter.{item.proc}.requests", item.line.count("\n") + 1)
            elif isinstance(item, Decision):
                reqid = self.waiting.pop(item.session, None)
                if reqid is None:
                    continue
                fs = self.engine.sessions.get(item.session)
                if fs is not None:
                    stat.increment(f"filter.{fs.filter}.{item.decision}")
                self._to_pony(FilterSmtpProtocolReply(reqid=reqid, decision=item.decision, param=item.param))
            elif isinstance(item, DataOut):
                pending = data.get(item.session)
                if pending is None:
                    data[item.session] = DataOut(item.session, list(item.lines), item.done, item.failed)
                else:
                    pending.lines += item.lines
                    pending.done |= item.done
                    pending.failed |= item.failed
        for item in data.values():
            chunk = lka_filter.unstuff(item.lines[:-1] if item.done and item.lines else item.lines)
            self._to_pony(FilterSmtpDataOut(session=item.session, chunk=chunk, done=item.done,
                                            failed=item.failed))
        for name in written:
            self._drain(self.procs[name])

    # -- pony's messages ---------------------------------------------------------------------

    async def handle(self, peer: str, msg) -> bool:
        match msg:
            case FilterSmtpBegin():
                await self._begin(peer, msg)
            case FilterSmtpProtocol():
                self.waiting[msg.session] = msg.reqid
                self.engine.protocol(msg.session, msg.time, msg.phase, msg.param)
            case FilterSmtpReport():
                for ev in msg.events:
                    self.engine.report(msg.session, ev.time, ev.event, tuple(ev.params))
            case FilterSmtpData():
                self._data(msg)
            case FilterSmtpEnd():
                self.engine.report(msg.session, time.time(), "link-disconnect", ())
                self.engine.end(msg.session)
                self.waiting.pop(msg.session, None)
                self.data_partial.pop(msg.session, None)
            case _:
                return False
        self._flush_engine()
        return True

    async def _begin(self, peer: str, msg: FilterSmtpBegin) -> None:
        if msg.filter not in self.config.filters:
            await self.ctx.mesh.send(peer, FilterSmtpBeginReply(reqid=msg.reqid, phases=[], events=[], ok=False))
            return
        fcrdns = await forward_confirmed(msg.rdns, msg.src)
        ip = "local" if msg.src.startswith("unix:") else msg.src.rsplit(":", 1)[0].strip("[]")
        facts = Facts(rdns=msg.rdns, fcrdns=fcrdns == "pass", src=ip, dest=msg.dest)
        fs = self.engine.begin(msg.session, msg.filter, facts)
        phases, events = self.engine.registered(msg.filter)
        await self.ctx.mesh.send(peer, FilterSmtpBeginReply(
            reqid=msg.reqid, phases=sorted(phases), events=sorted(events), ok=not fs.broken))
        self.engine.report(msg.session, msg.time, "link-connect", (msg.rdns, fcrdns, msg.src, msg.dest))

    def _data(self, msg: FilterSmtpData) -> None:
        if msg.first:
            self.engine.data_begin(msg.session)
            self.data_partial[msg.session] = b""
        buf = self.data_partial.get(msg.session, b"") + msg.chunk
        lines = buf.split(b"\n")
        rest = lines.pop()
        if msg.last:
            if rest:
                lines.append(rest)
            rest = b""
            self.data_partial.pop(msg.session, None)
        else:
            self.data_partial[msg.session] = rest
        out = lka_filter.stuff(lines)
        if msg.last:
            out.append(".")
        if out:
            self.engine.data(msg.session, time.time(), out)
