"""The control process: the control socket smtpctl talks to.

It identifies each client by SO_PEERCRED, accepts only well-formed frames of the
contract (a bad client is dropped, never fatal), forwards each command to the
process that knows, and streams the answers back.  It keeps the pause flags that
`show status` reports, the trace and profile masks (control_trace), gathers the
counters of every process (stat_backend) and serves them to Prometheus if asked
(metrics).

Permissions, as OpenSMTPD's control.c: every command needs root (here: root, or the
user the daemon runs as when started unprivileged); any other user gets
``need root privileges``.  Any user may submit mail (``enqueue``, the sendmail path,
OpenSMTPD's SMTP session request): UNPRIVILEGED_COMMANDS.
A client connection may carry several requests (``monitor`` asks once a second).

What a client makes control log (refusals, dropped connections, the per-uid cap) is
limited per uid (ClientLogLimiter): any local user may connect, and without a limit
one user could fill the disk with warnings; OpenSMTPD has no such limit.  Text from
a client is escaped (common/vis.py) before it is logged.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import socket
import struct
import time

from common import stat
from common.control_wire import PERMISSION_DENIED, WireError, frame, read_frame
from common.ipc import PeerTimeout
from common.messages import (
    PROTOCOL_VERSION, ClientContent, ClientEnd, ClientQueueBatch, ClientRequest, ClientResult,
    CtlContentReply, CtlEnqueue, CtlLinesReply, CtlListReply, CtlMtaBlock, CtlReply, CtlRequest,
    CtlUpdateTable, PonyEnqueueReply,
)
from common.vis import COMMAND, log_text
from smtpd import control_trace, metrics
from smtpd.stat_backend import Stats

log = logging.getLogger("smtpd")

LIST_BATCH = 1024
CONTENT_CHUNK = 1024 * 1024         # show message: frames of at most this many bytes
# Envelope commands carried out by the scheduler / by the queue (id: 0 = all, a value
# <= 0xffffffff = every envelope of that message, else one envelope).
SCHEDULER_ID_COMMANDS = frozenset({"schedule", "remove", "pause envelope", "resume envelope"})
QUEUE_ID_COMMANDS = frozenset({"discover", "uncorrupt"})
QUEUE_FILE_COMMANDS = frozenset({"show envelope", "show message"})
# The MTA's routing state, kept by pony (smtpd/mta.py)
MTA_COMMANDS = frozenset({"show routes", "show hosts", "show relays", "show hoststats",
                          "show mta paused", "resume route", "pause mta from", "resume mta from"})
CLIENT_TIMEOUT = 30.0
# OpenSMTPD's CONTROL_MAXCONN_PER_CLIENT: connections one uid may hold at once.
MAX_CONNECTIONS_PER_UID = 32
# "enqueue": sendmail's submission, open to every local user as OpenSMTPD's
# IMSG_CTL_SMTP_SESSION (the sender's identity is the client's uid: _enqueue).
UNPRIVILEGED_COMMANDS: frozenset[str] = frozenset({"enqueue"})
ENQUEUE_TIMEOUT = 330.0         # the parent gives pony 300 s (smtpd/offline.py)
ENQUEUE_FIELDS = ("sender", "fullname", "dsn_notify", "dsn_ret", "dsn_envid")
ENQUEUE_FIELD_SIZE = 1000       # characters of an address, a full name, a DSN option
# Messages one uid may be submitting at once: control holds each whole (up to
# `smtp max-message-size`) before the parent takes it, so 32 connections of 35 MB
# each would be a local user's way to take a gigabyte; sendmail submits one at a time.
ENQUEUE_MAX_PER_UID = 4
# Lines about one uid's clients logged per interval; the rest are counted and
# summed up in one line when the interval ends.  20: smtpctl run by hand, or a
# script's few mistakes, are all logged; a flood is cut after a screenful.
CLIENT_LOG_BURST = 20
CLIENT_LOG_INTERVAL = 60.0
COMMAND_LOG_SIZE = 81           # a refused command's name, escaped, in at most 80 characters


class ClientLogLimiter:
    """Which lines about a uid's control clients reach the log: the first ``burst`` of
    each interval of ``interval`` seconds (from that uid's first line), then none until
    it ends; the lines left out are then summed up in one.  Sans-I/O: the caller
    passes the (monotonic) time."""

    def __init__(self, burst: int = CLIENT_LOG_BURST, interval: float = CLIENT_LOG_INTERVAL) -> None:
        self.burst = burst
        self.interval = interval
        self.windows: dict[int, list] = {}      # uid -> [start, lines logged, lines left out]

    def allow(self, uid: int, now: float) -> tuple[bool, tuple[int, float] | None]:
        """Whether this line is logged, and (lines left out, seconds) of this uid's
        interval that has just ended, to be logged first."""
        ended = None
        window = self.windows.get(uid)
        if window is not None and now - window[0] >= self.interval:
            if window[2]:
                ended = (window[2], now - window[0])
            window = None
        if window is None:
            window = self.windows[uid] = [now, 0, 0]
        if window[1] < self.burst:
            window[1] += 1
            return True, ended
        window[2] += 1
        return False, ended

    def summaries(self, now: float, every: bool = False) -> list[tuple[int, int, float]]:
        """(uid, lines left out, seconds) of each interval that has ended, or of every
        interval (``every``: at stop); those intervals are forgotten."""
        out = []
        for uid, (start, _logged, left_out) in list(self.windows.items()):
            if every or now - start >= self.interval:
                del self.windows[uid]
                if left_out:
                    out.append((uid, left_out, now - start))
        return out


class Prepared:
    def __init__(self, sock: socket.socket, admin_uid: int,
                 metrics_sock: socket.socket | None = None) -> None:
        self.sock = sock
        self.admin_uid = admin_uid
        self.metrics_sock = metrics_sock


def prepare(opts, config) -> Prepared:
    """Bind the control socket while still privileged (as OpenSMTPD, mode 0666:
    access is decided per command from the client's credentials)."""
    path = opts.socket
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o111)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o666)
    sock.listen(64)
    metrics_sock = None
    if config.metrics_address is not None:
        metrics_sock = metrics.bind(config.metrics_address, config.metrics_port)
    return Prepared(sock, os.getuid(), metrics_sock)


def peer_uid(writer: asyncio.StreamWriter) -> int:
    sock = writer.get_extra_info("socket")
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


class Process:
    def __init__(self, ctx) -> None:
        self.ctx = ctx
        self.prepared: Prepared = ctx.prepared
        self.server: asyncio.AbstractServer | None = None
        self.paused = {"mda": False, "mta": False, "smtp": False}
        for agent in ctx.opts.pause:
            self.paused[agent] = True
        self.connections: dict[int, int] = {}      # uid -> open control connections
        self.enqueuing: dict[int, int] = {}        # uid -> messages being submitted
        self.switches = control_trace.Switches(ctx)
        self.stats = Stats(ctx)
        self.metrics: metrics.Endpoint | None = None
        self.client_log = ClientLogLimiter()
        self.summarizer: asyncio.Task | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._client, sock=self.prepared.sock)
        self.summarizer = asyncio.create_task(self._summarize())
        if self.prepared.metrics_sock is not None:
            self.metrics = metrics.Endpoint(self.prepared.metrics_sock, self.stats.gather)
            await self.metrics.start()

    async def on_conf_end(self) -> None:
        pass

    async def stop(self) -> None:
        if self.server:
            self.server.close()
        if self.metrics:
            self.metrics.close()
        if self.summarizer:
            self.summarizer.cancel()
        for uid, left_out, seconds in self.client_log.summaries(time.monotonic(), every=True):
            self._log_left_out(uid, left_out, seconds)

    async def handle(self, peer: str, msg) -> None:
        log.warning("warn: control: unexpected %s from %s", type(msg).__name__, peer)

    def prepare_config(self, config, msg) -> None:
        """A reload (smtpd/reload.py) cannot move the metrics endpoint: its socket was
        bound before the privilege drop.  Refused, so the change is not silently lost."""
        old = (self.ctx.config.metrics_address, self.ctx.config.metrics_port)
        if (config.metrics_address, config.metrics_port) != old:
            raise ValueError("a change to \"metrics listen on\" needs a restart")

    def _client_log(self, uid: int, level: int, fmt: str, *args) -> None:
        """A line about a client of ``uid``, if that uid's share of the log allows it."""
        allowed, ended = self.client_log.allow(uid, time.monotonic())
        if ended:
            self._log_left_out(uid, *ended)
        if allowed:
            log.log(level, fmt, *args)

    @staticmethod
    def _log_left_out(uid: int, left_out: int, seconds: float) -> None:
        log.warning("warn: control: %d more line%s about clients of uid %d left out of the log "
                    "in %ds", left_out, "" if left_out == 1 else "s", uid, round(seconds))

    async def _summarize(self) -> None:
        """A uid whose clients went quiet gets its summary within an interval."""
        while True:
            await asyncio.sleep(self.client_log.interval)
            for uid, left_out, seconds in self.client_log.summaries(time.monotonic()):
                self._log_left_out(uid, left_out, seconds)

    def _may(self, uid: int, command: str) -> bool:
        return uid in (0, self.prepared.admin_uid) or command in UNPRIVILEGED_COMMANDS

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            uid = peer_uid(writer)
        except OSError as exc:
            log.warning("warn: control: no credentials for a client: %s", exc)
            writer.close()
            return
        if self.connections.get(uid, 0) >= MAX_CONNECTIONS_PER_UID:
            self._client_log(uid, logging.WARNING,
                             "warn: too many connections to control socket from user with uid %d", uid)
            writer.close()
            return
        self.connections[uid] = self.connections.get(uid, 0) + 1
        stat.increment("control.session")
        try:
            await self._serve_client(uid, reader, writer)
        except Exception:
            log.exception("warn: control: error serving a client of uid %d", uid)
        finally:
            stat.decrement("control.session")
            self.connections[uid] -= 1
            if not self.connections[uid]:
                del self.connections[uid]
            writer.close()

    async def _serve_client(self, uid: int, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        # Requests one after the other until the client closes (each read bounded by
        # CLIENT_TIMEOUT); a malformed frame drops this client only.
        while True:
            try:
                req = await asyncio.wait_for(read_frame(reader), CLIENT_TIMEOUT)
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    self._client_log(uid, logging.INFO, "control: dropping client of uid %d: "
                                     "truncated frame", uid)
                return
            except (WireError, TimeoutError, ConnectionError) as exc:
                self._client_log(uid, logging.INFO, "control: dropping client of uid %d: %s",
                                 uid, log_text(str(exc) or type(exc).__name__, COMMAND))
                return
            try:
                if not isinstance(req, ClientRequest):
                    raise WireError("not a request")
                if req.version != PROTOCOL_VERSION:
                    writer.write(frame(ClientResult(ok=False, text="incompatible smtpctl and smtpd")))
                    await writer.drain()
                    return
                if not self._may(uid, req.command):
                    self._client_log(uid, logging.WARNING,
                                     "warn: control: %s refused to uid %d: need root privileges",
                                     log_text(req.command, COMMAND, COMMAND_LOG_SIZE), uid)
                    writer.write(frame(ClientResult(ok=False, text=PERMISSION_DENIED)))
                elif req.command == "enqueue":
                    await self._enqueue(uid, req, reader, writer)
                    await writer.drain()
                    return
                else:
                    await self._command(req, writer)
                await writer.drain()
            except PeerTimeout as exc:
                writer.write(frame(ClientResult(ok=False, text=str(exc))))
            except (WireError, ConnectionError) as exc:
                self._client_log(uid, logging.INFO, "control: dropping client of uid %d: %s",
                                 uid, log_text(str(exc) or type(exc).__name__, COMMAND))
                return

    async def _enqueue(self, uid: int, req: ClientRequest, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        """sendmail: the request (recipients, -f, -F, DSN options), then the message in
        ClientContent frames ended by ClientEnd, which goes to the parent with the
        client's uid (SO_PEERCRED); the parent decides the sender and has pony store
        it.  One message per connection.  Refused while ``pause smtp`` holds, as
        OpenSMTPD's control refuses the session."""
        def refuse(text: str) -> None:
            writer.write(frame(ClientResult(ok=False, text=text)))
        args = req.args
        rcpts = args.get("recipients")
        fields = {name: args.get(name, "") for name in ENQUEUE_FIELDS}
        if (not isinstance(rcpts, list) or not all(isinstance(r, str) and len(r) <= ENQUEUE_FIELD_SIZE
                                                   for r in rcpts)
                or not all(isinstance(v, str) and len(v) <= ENQUEUE_FIELD_SIZE for v in fields.values())):
            return refuse("malformed enqueue request")
        if len(rcpts) > self.ctx.config.smtp_max_rcpt:
            return refuse("452 4.5.3 Too many recipients")
        if self.paused["smtp"]:
            return refuse("server disallowed submission request")
        if self.enqueuing.get(uid, 0) >= ENQUEUE_MAX_PER_UID:
            self._client_log(uid, logging.WARNING, "warn: control: uid %d submits more than %d "
                             "messages at once", uid, ENQUEUE_MAX_PER_UID)
            return refuse("451 4.7.0 Too many messages submitted at once, try again")
        self.enqueuing[uid] = self.enqueuing.get(uid, 0) + 1
        try:
            await self._enqueue_message(uid, rcpts, fields, reader, writer)
        finally:
            self.enqueuing[uid] -= 1
            if not self.enqueuing[uid]:
                del self.enqueuing[uid]

    async def _enqueue_message(self, uid: int, rcpts: list[str], fields: dict, reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter) -> None:
        limit = self.ctx.config.max_message_size
        data = bytearray()
        while True:
            try:
                piece = await asyncio.wait_for(read_frame(reader), CLIENT_TIMEOUT)
            except (TimeoutError, asyncio.IncompleteReadError) as exc:
                raise WireError(f"message not received: {type(exc).__name__}") from None
            if isinstance(piece, ClientEnd):
                break
            if not isinstance(piece, ClientContent):
                raise WireError("not message content")
            data += piece.data
            if len(data) > limit:
                writer.write(frame(ClientResult(ok=False, text="552 5.3.4 Message too big")))
                return
        try:
            reply = await self.ctx.mesh.request(
                "parent", CtlEnqueue(reqid=self.ctx.new_id(), uid=uid, recipients=rcpts, data=bytes(data),
                                     **fields), (PonyEnqueueReply,), timeout=ENQUEUE_TIMEOUT)
        except PeerTimeout as exc:
            log.warning("warn: control: enqueue for uid %d failed: %s", uid, exc)
            reply = PonyEnqueueReply(reqid=0, status="tempfail", text="451 4.3.0 Temporary failure")
        writer.write(frame(ClientResult(ok=reply.status == "ok", text=reply.text,
                                        data={"status": reply.status, "msgid": reply.msgid})))

    async def _ask(self, peer: str, command: str, ident: int = 0) -> CtlReply:
        return await self.ctx.mesh.request(
            peer, CtlRequest(reqid=self.ctx.new_id(), command=command, id=ident), (CtlReply,))

    async def _show_file(self, command: str, ident: int, writer: asyncio.StreamWriter) -> None:
        """show envelope / show message: the queue reads the file (smtpctl has no access to
        the spool); its bytes are streamed in ClientContent frames ended by ClientEnd."""
        reply = await self.ctx.mesh.request(
            "queue", CtlRequest(reqid=self.ctx.new_id(), command=command, id=ident),
            (CtlContentReply,))
        if not reply.ok:
            writer.write(frame(ClientResult(ok=False, text=reply.error)))
            return
        data = memoryview(reply.data)
        for start in range(0, len(data), CONTENT_CHUNK):
            writer.write(frame(ClientContent(data=bytes(data[start:start + CONTENT_CHUNK]))))
            await writer.drain()
        writer.write(frame(ClientEnd()))

    async def _command(self, req: ClientRequest, writer: asyncio.StreamWriter) -> None:
        cmd, args = req.command, req.args
        out = writer.write
        if cmd == "show status":
            status = dict(self.paused)
            if self.ctx.config.filter_procs:
                # each filter process's state, from lka which runs them (docs/filters.md)
                try:
                    reply = await self._ask("lka", "show filters")
                    status["filters"] = json.loads(reply.text or "{}")
                except (PeerTimeout, ValueError):
                    status["filters"] = {name: "unknown" for name in self.ctx.config.filter_procs}
            out(frame(ClientResult(ok=True, data=status)))
        elif cmd in ("pause mda", "pause mta", "pause smtp", "resume mda", "resume mta", "resume smtp"):
            verb, agent = cmd.split()
            want = verb == "pause"
            if self.paused[agent] == want:
                out(frame(ClientResult(ok=False, text=f"{agent} is already {'paused' if want else 'running'}")))
                return
            reply = await self._ask("pony" if agent == "smtp" else "scheduler", cmd)
            if reply.ok:
                self.paused[agent] = want
                log.info("control: %s %s", "paused" if want else "resumed", agent)
            out(frame(ClientResult(ok=reply.ok, text=reply.text)))
        elif cmd in SCHEDULER_ID_COMMANDS or cmd in QUEUE_ID_COMMANDS or cmd in QUEUE_FILE_COMMANDS:
            ident = _ident(args)
            if ident is None or (ident == 0 and cmd not in SCHEDULER_ID_COMMANDS):
                out(frame(ClientResult(ok=False, text="invalid message or envelope id")))
            elif cmd in QUEUE_FILE_COMMANDS:
                await self._show_file(cmd, ident, writer)
            else:
                reply = await self._ask("scheduler" if cmd in SCHEDULER_ID_COMMANDS else "queue",
                                        cmd, ident)
                out(frame(ClientResult(ok=reply.ok, text=reply.text, count=reply.count)))
        elif cmd == "show queue":
            msgid = _ident(args)
            if msgid is None or msgid > 0xFFFFFFFF:
                out(frame(ClientResult(ok=False, text="invalid message id")))
            else:
                await self._show_queue(writer, msgid)
        elif cmd in control_trace.COMMANDS:
            out(frame(await self.switches.command(cmd, args)))
        elif cmd in ("show stats", "monitor"):
            out(frame(await self.stats.answer(cmd)))
        elif cmd == "stop":
            reply = await self._ask("parent", "stop")
            out(frame(ClientResult(ok=reply.ok)))
        elif cmd == "reload":
            reply = await self._ask("parent", "reload")
            out(frame(ClientResult(ok=reply.ok, text=reply.text)))
        elif cmd in MTA_COMMANDS:
            await self._mta_command(cmd, args, writer)
        elif cmd == "update table":
            name = args.get("name")
            if not isinstance(name, str) or not name or len(name) >= 1024:
                out(frame(ClientResult(ok=False, text="invalid table name")))
                return
            # lka holds every table (the others ask it), so it alone reloads
            reply = await self.ctx.mesh.request(
                "lka", CtlUpdateTable(reqid=self.ctx.new_id(), name=name), (CtlReply,))
            out(frame(ClientResult(ok=reply.ok, text=reply.text)))
        else:
            out(frame(ClientResult(ok=False, text=f"command not supported yet: {cmd}")))

    async def _mta_command(self, cmd: str, args: dict, writer: asyncio.StreamWriter) -> None:
        """The MTA's routing state (pony keeps it): show routes|hosts|relays|hoststats and
        show mta paused answer lines; resume route, pause|resume mta from ADDR for DOMAIN."""
        reqid = self.ctx.new_id()
        if cmd in ("pause mta from", "resume mta from"):
            source, domain = args.get("source"), args.get("domain")
            try:
                source = str(ipaddress.ip_address(source)) if isinstance(source, str) else None
            except ValueError:
                source = None
            if source is None or not isinstance(domain, str) or not 0 < len(domain) < 256:
                writer.write(frame(ClientResult(ok=False, text="invalid source address or domain")))
                return
            msg = CtlMtaBlock(reqid=reqid, block=cmd.startswith("pause"), source=source, domain=domain)
        elif cmd == "resume route":
            ident = args.get("id", 0)
            if not isinstance(ident, int) or not 0 <= ident < 1 << 64:
                writer.write(frame(ClientResult(ok=False, text="invalid route id")))
                return
            msg = CtlRequest(reqid=reqid, command=cmd, id=ident)
        else:
            msg = CtlRequest(reqid=reqid, command=cmd)
        reply = await self.ctx.mesh.request("pony", msg, (CtlReply, CtlLinesReply))
        if isinstance(reply, CtlLinesReply):
            writer.write(frame(ClientResult(ok=True, data={"lines": reply.lines})))
        else:
            writer.write(frame(ClientResult(ok=reply.ok, text=reply.text)))

    async def _show_queue(self, writer: asyncio.StreamWriter, msgid: int = 0) -> None:
        """Every envelope, or only those of ``msgid`` (show queue MSGID): evpids sort by
        message, so that listing starts at the message's first possible evpid and stops
        past its last."""
        def ask(after: int) -> asyncio.Task:
            return asyncio.ensure_future(self.ctx.mesh.request(
                "scheduler", CtlRequest(reqid=self.ctx.new_id(), command="list", after=after,
                                        limit=LIST_BATCH), (CtlListReply,)))
        # one batch ahead: the scheduler and the queue prepare the next batch while
        # this one goes to the client (a 100,000-envelope listing, bench/bench_scale.py)
        pending = ask(msgid << 32)
        try:
            for _ in range(1_000_000):          # bounded: at most 256M envelopes
                reply = await pending
                done = not reply.more or (msgid and reply.last >> 32 != msgid)
                pending = None if done else ask(reply.last)
                entries = reply.entries
                if msgid:
                    entries = [e for e in entries if e.evpid >> 32 == msgid]
                if entries:
                    writer.write(frame(ClientQueueBatch(entries=entries)))
                    await writer.drain()
                if pending is None:
                    break
        finally:
            if pending is not None:
                pending.cancel()
        writer.write(frame(ClientEnd()))


def _ident(args: dict) -> int | None:
    """The ``id`` argument of a request: 0 (all) .. 2**64-1, else None."""
    ident = args.get("id", 0)
    if isinstance(ident, bool) or not isinstance(ident, int) or not 0 <= ident < 1 << 64:
        return None
    return ident
