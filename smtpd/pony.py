"""The pony process (``smtpd: pony``): SMTP in, MTA out, MDA dispatch.

It owns the listening sockets handed down by the parent and serves them with its
own SMTP sessions (smtp_session driving the sans-I/O core smtp_proto), within the
session limits; the queue sends it envelopes to deliver locally (mda) or to relay
(mta).  It never touches the spool: bodies travel over the channel
to and from the queue.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import resource
import socket

from common import privsep
from common.ipc import PeerTimeout
from common.messages import (
    CtlMtaBlock, CtlReply, CtlRequest, FilterSmtpDataOut, SchedEnvelopeWithdraw, MtaDnsLookup, MtaDnsReply,
    PonyEnqueue, PonyEnqueueReply, QueueDeliver,
    QueueTransfer, SmtpMessageCreateReply, SmtpMessageRollback,
)
from smtpd import enqueue, fdpass, listeners
from smtpd.ttl_cache import TtlCache
from smtpd.mda import Mda
from smtpd.mta import Mta
from smtpd.smtp_session import Session

from smtpd import proxy_v2, tls

log = logging.getLogger("smtpd")

RDNS_TIMEOUT = 10.0
RDNS_CACHE_TTL = 30.0     # seconds a client's PTR name is kept (docs/smtp.md)
# Descriptors kept from the SMTP sessions' share (the channels, the logs, TLS files).
SESSION_FD_RESERVE = 32


def sessions_descriptors_allow() -> int:
    """The sessions pony's descriptor limit allows, as OpenSMTPD's smtp.c counts them:
    half the descriptors (the other half for the MTA's connections and the files
    delivery passes), less a reserve.  Past it a client is refused (421) rather than
    left in the backlog while accept() fails with EMFILE."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    return max(1, soft // 2 - SESSION_FD_RESERVE)


class Listening:
    """One listening socket and the listener (config line) it serves.  The listener
    is looked up at each connection, so a reload that changes its options applies
    to the next session."""
    __slots__ = ("sock", "listener", "server")

    def __init__(self, sock: socket.socket, listener) -> None:
        self.sock = sock
        self.listener = listener
        self.server: asyncio.AbstractServer | None = None

    @property
    def key(self) -> tuple:
        return (self.sock.family, *self.sock.getsockname()[:2])


class Prepared:
    def __init__(self, listening: list[Listening], fd_channel: socket.socket | None,
                 tls_contexts: dict[int, object] | None = None,
                 client_tls: dict | None = None) -> None:
        self.listening = listening
        self.fd_channel = fd_channel
        self.tls_contexts = tls_contexts or {}
        self.client_tls = client_tls or {}       # relay actions' contexts (tls.client_contexts)


def tls_contexts(config, files=None) -> dict[int, object]:
    """{id(listener): SSLContext} of the listeners with TLS: built while pony can still
    read the key files (prepare, as root), or from their contents (a reload)."""
    return {id(listener): tls.server_context(config, listener, files=files)
            for listener in config.listeners if listener.tls}


def prepare(opts, config) -> Prepared:
    """The inherited listening sockets, with the listener each belongs to, and the
    parent's fd channel (new listening sockets at a reload: smtpd/fdpass.py)."""
    out = []
    for item in filter(None, opts.listen_fds.split(",")):
        fd, index = (int(x) for x in item.split(":"))
        out.append(Listening(socket.socket(fileno=fd), config.listeners[index]))
    channel = socket.socket(fileno=opts.fd_channel) if opts.fd_channel >= 0 else None
    if tls is not None and privsep.chroot_dir("pony", opts.rundir, opts.spool) == opts.rundir:
        tls.scratch_dir = "/" + tls.SCRATCH_DIR_NAME     # as seen from the chroot
    return Prepared(out, channel, tls_contexts(config), tls.client_contexts(config))


class Process:
    def __init__(self, ctx) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.mesh = ctx.mesh
        self.listening: list[Listening] = ctx.prepared.listening
        self.fd_receiver = fdpass.Receiver(ctx.prepared.fd_channel) if ctx.prepared.fd_channel else None
        self.smtp_paused = "smtp" in ctx.opts.pause
        self.mta = Mta(self)
        self.mda = Mda(self)
        self.tasks: set[asyncio.Task] = set()
        self.sessions: dict[str, int] = {}      # client address -> open sessions
        self.filtered: dict[int, object] = {}  # session id -> its SessionFilters (smtpd/smtp_filters.py)
        self.sessions_open = 0
        self.sessions_fd_limit = sessions_descriptors_allow()
        self.auth_failures: dict[str, int] = {}  # client address -> failed AUTH (smtp_session)
        self.rdns_cache = TtlCache(RDNS_CACHE_TTL)   # client address -> its PTR name
        self.rdns_lookups: dict[str, asyncio.Task] = {}   # client address -> its lookup under way
        self.message_reserve = enqueue.MessageReserve(self)   # msgids ahead of MAIL FROM
        self._tls_contexts: dict[int, object] = ctx.prepared.tls_contexts
        self._reload_tls_contexts: dict[int, object] = {}   # of the pending reload
        self.client_tls: dict = ctx.prepared.client_tls     # smtpd/mta_session.py reads it
        self._reload_client_tls: dict = {}

    async def start(self) -> None:
        if self.fd_receiver is not None:
            self.fd_receiver.start()
        self.mda.start()

    async def on_conf_end(self) -> None:
        if not self.smtp_paused:
            await self._listen()

    async def stop(self) -> None:
        if self.fd_receiver is not None:
            self.fd_receiver.stop()
        self.mda.stop()
        await self._unlisten()
        for task in list(self.tasks):
            task.cancel()

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # -- listeners -----------------------------------------------------------------------

    async def _listen(self) -> None:
        for entry in self.listening:
            await self._serve(entry)

    async def _serve(self, entry: Listening) -> None:
        if entry.server is not None:
            return
        loop = asyncio.get_running_loop()
        # A dup, so that closing the server on `pause smtp` keeps the socket itself.
        dup = socket.socket(fileno=os.dup(entry.sock.fileno()))
        context = None
        if getattr(entry.listener, "tls", "") == "smtps":
            context = self.tls_context(entry.listener)
            if context is None:       # never plain text where TLS was asked for
                log.error("warn: smtp: no TLS context for the smtps listener %s port %d: not served",
                          entry.listener.address, entry.listener.port)
                dup.close()
                return
        entry.server = await loop.create_server(
            lambda: Session(self, entry.listener), sock=dup, backlog=listeners.BACKLOG, ssl=context)

    async def _unlisten(self) -> None:
        for entry in self.listening:
            if entry.server is not None:
                entry.server.close()
                entry.server = None

    # -- configuration reload (smtpd/reload.py) ---------------------------------------------

    async def prepare_config(self, config, msg) -> list[Listening]:
        """The sockets the parent passed for this reload, each with its new listener."""
        if self.fd_receiver is None:
            raise RuntimeError("no fd channel from the parent")
        socks = await self.fd_receiver.wait(msg.generation, timeout=5.0)
        try:
            if len(socks) != len(msg.listeners):
                raise RuntimeError(f"got {len(socks)} listening sockets, expected {len(msg.listeners)}")
            # From the key files' contents the parent read (pony, chrooted and
            # unprivileged, cannot read them): a key that does not load refuses the
            # reload here, so the current certificates stay in service.
            self._reload_tls_contexts = tls_contexts(config, files=msg.tls_files)
            self._reload_client_tls = tls.client_contexts(config, files=msg.tls_files)
        except Exception:
            for sock in socks:
                sock.close()
            raise
        return [Listening(sock, config.listeners[index]) for sock, index in zip(socks, msg.listeners)]

    async def apply_config(self, config, new: list[Listening]) -> None:
        """Switch to the new configuration: listeners that stay keep their socket and
        server (a connection waiting in the backlog is served), removed ones stop
        accepting (their sessions go on), added ones start unless smtp is paused.
        The TLS contexts prepare_config built take over: a new STARTTLS uses them, and
        smtps listeners that stay get a new server (an asyncio server keeps the
        context it was made with; the socket and its backlog are kept)."""
        self.config = self.mta.config = self.mda.config = config
        self.mda.users.clear()                  # users looked up under the old tables
        previous, contexts = self._tls_contexts, self._reload_tls_contexts
        self._tls_contexts, self._reload_tls_contexts = contexts, {}
        self.client_tls, self._reload_client_tls = self._reload_client_tls, {}
        current = {entry.key: entry for entry in self.listening}
        wanted = {entry.key: entry for entry in new}
        for key, entry in current.items():
            if key not in wanted:
                if entry.server is not None:
                    entry.server.close()
                entry.sock.close()
                # its open sessions (they hold the old listener) may still STARTTLS
                if id(entry.listener) in previous:
                    contexts[id(entry.listener)] = previous[id(entry.listener)]
        result = []
        for key, entry in wanted.items():
            old = current.get(key)
            if old is not None:
                smtps = "smtps" in (getattr(old.listener, "tls", ""), getattr(entry.listener, "tls", ""))
                if id(entry.listener) in contexts:      # open sessions STARTTLS with the new one
                    contexts[id(old.listener)] = contexts[id(entry.listener)]
                old.listener = entry.listener
                entry.sock.close()            # the same socket as the one we hold
                if smtps and old.server is not None:
                    old.server.close()        # served again below, with the new context
                    old.server = None
                result.append(old)
            else:
                result.append(entry)
        self.listening = result
        if not self.smtp_paused:
            await self._listen()

    def abort_config(self, new: list[Listening]) -> None:
        self._reload_tls_contexts = {}
        self._reload_client_tls = {}
        for entry in new:
            entry.sock.close()

    # -- sessions ---------------------------------------------------------------------------

    def admit(self, session) -> str:
        """Count a new session in, or say why it is refused (the session limits)."""
        config, ip = self.config, session.peer_ip
        limit = min(config.smtp_max_sessions, self.sessions_fd_limit)
        if self.sessions_open >= limit:
            return f"session limit reached ({limit})"
        proxied = bool(getattr(session.listener, "proxy_v2", False))   # counted at its header
        if not proxied and self.sessions.get(ip, 0) >= config.smtp_max_sessions_per_address:
            return f"session limit per address reached ({config.smtp_max_sessions_per_address})"
        self.sessions_open += 1
        self.sessions[ip] = self.sessions.get(ip, 0) + 1
        return ""

    def readdress(self, session, ip: str) -> str:
        """A PROXY header gave the session's real client address: count it there (a
        load balancer's own address is not a client's share)."""
        if self.sessions.get(ip, 0) >= self.config.smtp_max_sessions_per_address:
            return f"session limit per address reached ({self.config.smtp_max_sessions_per_address})"
        self._uncount(session.peer_ip)
        session.peer_ip = ip
        self.sessions[ip] = self.sessions.get(ip, 0) + 1
        return ""

    def _uncount(self, ip: str) -> None:
        left = self.sessions.get(ip, 1) - 1
        if left > 0:
            self.sessions[ip] = left
        else:
            self.sessions.pop(ip, None)

    def release(self, session) -> None:
        self.sessions_open -= 1
        self._uncount(session.peer_ip)

    def tls_context(self, listener):
        """The listener's server SSLContext (smtpd/tls.py), None without TLS."""
        return self._tls_contexts.get(id(listener))

    def tls_log_text(self, ssl_object) -> str:
        """What follows ``smtp tls ciphers=`` (version:cipher:bits, as OpenSMTPD)."""
        return tls.tls_log_text(ssl_object)

    def tls_received_clause(self, ssl_object) -> str:
        """The TLS part of the Received header, as OpenSMTPD: version:cipher:bits:verified."""
        if ssl_object is None:
            return ""
        return tls.received_clause(ssl_object).strip().strip("()")

    def proxy_parser(self):
        return proxy_v2.parse

    def is_local_listener(self, listener) -> bool:
        try:
            return ipaddress.ip_address(listener.address).is_loopback
        except ValueError:
            return listener.address in ("localhost", "lo", "lo0")

    async def reverse_dns(self, ip: str) -> str:
        if ip == "local":
            return "localhost"
        name = self.rdns_cache.get(ip)
        if name is not None:
            return name
        # Sessions from one address that open while its lookup is out share it: a
        # burst of connections asks lka (and the resolver) once, not once each.
        lookup = self.rdns_lookups.get(ip)
        if lookup is None:
            lookup = self.spawn(self._lookup_ptr(ip))
            self.rdns_lookups[ip] = lookup
            lookup.add_done_callback(lambda _task, ip=ip: self.rdns_lookups.pop(ip, None))
        return await asyncio.shield(lookup)

    async def _lookup_ptr(self, ip: str) -> str:
        try:
            reply = await self.mesh.request(
                "lka", MtaDnsLookup(reqid=self.ctx.new_id(), kind="ptr", name=ip), (MtaDnsReply,),
                timeout=RDNS_TIMEOUT)
        except PeerTimeout:
            return "<unknown>"
        if reply.status == "tempfail":
            return "<unknown>"
        name = reply.hosts[0][1] if reply.status == "ok" and reply.hosts else "<unknown>"
        self.rdns_cache.put(ip, name)
        return name

    async def _enqueue(self, peer: str, req: PonyEnqueue) -> None:
        """An internal injection (bounce, offline file): the steps of a local session."""
        try:
            reply = await enqueue.run(self, req)
        except Exception as exc:
            log.exception("warn: pony: internal enqueue failed")
            reply = PonyEnqueueReply(reqid=req.reqid, status="tempfail", text=f"451 4.3.0 {exc}")
        await self.mesh.send(peer, reply)

    # -- messages --------------------------------------------------------------------------

    async def handle(self, peer: str, msg) -> None:
        match msg:
            case SmtpMessageCreateReply(ok=True, msgid=msgid, more=more):
                # nobody waits for it any more (the session gave up): no orphan in incoming/
                for late in (msgid, *more):
                    log.info("smtp: late message %08x from the queue, rolled back", late)
                    await self.mesh.send("queue", SmtpMessageRollback(msgid=late))
            case SmtpMessageCreateReply():
                pass
            case QueueTransfer(envelope=env):
                self.mta.add(env)
            case QueueDeliver(envelope=env, fd_key=fd_key):
                self.mda.add(env, fd_key)
            case PonyEnqueue():
                self.spawn(self._enqueue(peer, msg))
            case FilterSmtpDataOut():
                filters = self.filtered.get(msg.session)
                if filters is not None:
                    filters.data_received(msg.chunk, msg.done, msg.failed)
            case CtlRequest(command="pause smtp"):
                ok = not self.smtp_paused
                if ok:
                    self.smtp_paused = True
                    await self._unlisten()
                    log.info("smtp: pausing listening sockets")
                await self.mesh.send(peer, CtlReply(reqid=msg.reqid, ok=ok))
            case CtlRequest(command="resume smtp"):
                ok = self.smtp_paused
                if ok:
                    self.smtp_paused = False
                    await self._listen()
                    log.info("smtp: resuming listening sockets")
                await self.mesh.send(peer, CtlReply(reqid=msg.reqid, ok=ok))
            case SchedEnvelopeWithdraw(evpid=evpid):
                self.mta.withdraw(evpid)
            case CtlMtaBlock() | CtlRequest(command="resume route" | "show routes" | "show hosts" |
                                            "show relays" | "show hoststats" | "show mta paused"):
                await self.mesh.send(peer, self.mta.control(msg))
            case _:
                log.warning("warn: pony: unexpected %s from %s", type(msg).__name__, peer)
