"""The pony process (``smtpd: pony``): SMTP in, MTA out, MDA dispatch.

It owns the listening sockets handed down by the parent and serves them with
aiosmtpd (smtp_session); the queue sends it envelopes to deliver locally (mda)
or to relay (mta).  It never touches the spool: bodies travel over the channel
to and from the queue.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket

from common.ipc import PeerTimeout
from common.messages import (
    CtlReply, CtlRequest, MtaDnsLookup, MtaDnsReply, QueueDeliver, QueueEnvelopeSubmitReply,
    QueueTransfer,
)
from smtpd.mda import Mda
from smtpd.mta import Mta
from smtpd.smtp_session import Handler, Session

log = logging.getLogger("smtpd")

RDNS_TIMEOUT = 10.0


def prepare(opts, config):
    """The inherited listening sockets, with the listener each belongs to."""
    out = []
    for item in filter(None, opts.listen_fds.split(",")):
        fd, index = (int(x) for x in item.split(":"))
        out.append((socket.socket(fileno=fd), config.listeners[index]))
    return out


class Process:
    def __init__(self, ctx) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.mesh = ctx.mesh
        self.listening: list[tuple[socket.socket, object]] = ctx.prepared
        self.servers: list[asyncio.AbstractServer] = []
        self.smtp_paused = "smtp" in ctx.opts.pause
        self.handler = Handler(self)
        self.mta = Mta(self)
        self.mda = Mda(self)
        self.tasks: set[asyncio.Task] = set()
        self.evpids: dict[int, list[int]] = {}   # RCPT reqid -> evpids the queue wrote
        self.sessions_open = 0

    async def start(self) -> None:
        pass

    async def on_conf_end(self) -> None:
        if not self.smtp_paused:
            await self._listen()

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
        for task in list(self.tasks):
            task.cancel()

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # -- listeners -----------------------------------------------------------------------

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        for sock, listener in self.listening:
            # A dup, so that closing the server on `pause smtp` keeps the socket itself.
            dup = socket.socket(fileno=os.dup(sock.fileno()))
            server = await loop.create_server(
                lambda listener=listener: Session(
                    self.handler, pony=self, listener=listener,
                    data_size_limit=self.config.max_message_size,
                    hostname=listener.hostname or self.config.hostname, ident="ESMTP pysmtpd",
                    timeout=300, loop=loop),
                sock=dup, backlog=512)
            self.servers.append(server)

    async def _unlisten(self) -> None:
        for server in self.servers:
            server.close()
        self.servers = []

    def is_local_listener(self, listener) -> bool:
        try:
            return ipaddress.ip_address(listener.address).is_loopback
        except ValueError:
            return listener.address in ("localhost", "lo", "lo0")

    async def reverse_dns(self, ip: str) -> str:
        if ip == "local":
            return "localhost"
        try:
            reply = await self.mesh.request(
                "lka", MtaDnsLookup(reqid=self.ctx.new_id(), kind="ptr", name=ip), (MtaDnsReply,),
                timeout=RDNS_TIMEOUT)
        except PeerTimeout:
            return "<unknown>"
        return reply.hosts[0][1] if reply.status == "ok" and reply.hosts else "<unknown>"

    # -- messages --------------------------------------------------------------------------

    async def handle(self, peer: str, msg) -> None:
        match msg:
            case QueueEnvelopeSubmitReply(reqid=reqid, evpid=evpid):
                if reqid in self.evpids and msg.ok:
                    self.evpids[reqid].append(evpid)
            case QueueTransfer(envelope=env):
                self.mta.add(env)
            case QueueDeliver(envelope=env):
                self.mda.add(env)
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
            case _:
                log.warning("warn: pony: unexpected %s from %s", type(msg).__name__, peer)
