"""The control process: the control socket smtpctl talks to.

It identifies each client by SO_PEERCRED, accepts only well-formed frames of the
contract (a bad client is dropped, never fatal), forwards each command to the
process that knows, and streams the answers back.  It keeps the pause flags that
`show status` reports.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct

from common.control_wire import WireError, frame, read_frame
from common.ipc import PeerTimeout
from common.messages import (
    PROTOCOL_VERSION, ClientEnd, ClientQueueBatch, ClientRequest, ClientResult, CtlListReply,
    CtlReply, CtlRequest,
)

log = logging.getLogger("smtpd")

LIST_BATCH = 256
CLIENT_TIMEOUT = 30.0


class Prepared:
    def __init__(self, sock: socket.socket, admin_uid: int) -> None:
        self.sock = sock
        self.admin_uid = admin_uid


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
    return Prepared(sock, os.getuid())


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

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._client, sock=self.prepared.sock)

    async def on_conf_end(self) -> None:
        pass

    async def stop(self) -> None:
        if self.server:
            self.server.close()

    async def handle(self, peer: str, msg) -> None:
        log.warning("warn: control: unexpected %s from %s", type(msg).__name__, peer)

    def _may(self, uid: int) -> bool:
        return uid in (0, self.prepared.admin_uid)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            uid = peer_uid(writer)
            req = await asyncio.wait_for(read_frame(reader), CLIENT_TIMEOUT)
            if not isinstance(req, ClientRequest):
                raise WireError("not a request")
            if req.version != PROTOCOL_VERSION:
                writer.write(frame(ClientResult(ok=False, text="incompatible smtpctl and smtpd")))
            elif not self._may(uid):
                writer.write(frame(ClientResult(ok=False, text="permission denied: need root privileges")))
            else:
                await self._command(req, writer)
            await writer.drain()
        except (WireError, asyncio.IncompleteReadError, TimeoutError, ConnectionError) as exc:
            log.info("control: dropping client: %s", exc)
        except PeerTimeout as exc:
            writer.write(frame(ClientResult(ok=False, text=str(exc))))
        finally:
            writer.close()

    async def _ask(self, peer: str, command: str, ident: int = 0) -> CtlReply:
        return await self.ctx.mesh.request(
            peer, CtlRequest(reqid=self.ctx.new_id(), command=command, id=ident), (CtlReply,))

    async def _command(self, req: ClientRequest, writer: asyncio.StreamWriter) -> None:
        cmd, args = req.command, req.args
        out = writer.write
        if cmd == "show status":
            out(frame(ClientResult(ok=True, data=dict(self.paused))))
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
        elif cmd in ("schedule", "remove"):
            reply = await self._ask("scheduler", cmd, int(args.get("id", 0)))
            out(frame(ClientResult(ok=reply.ok, text=reply.text, count=reply.count)))
        elif cmd == "show queue":
            await self._show_queue(writer)
        elif cmd == "stop":
            reply = await self._ask("parent", "stop")
            out(frame(ClientResult(ok=reply.ok)))
        elif cmd == "reload":
            reply = await self._ask("parent", "reload")
            out(frame(ClientResult(ok=reply.ok, text=reply.text)))
        else:
            out(frame(ClientResult(ok=False, text=f"command not supported yet: {cmd}")))

    async def _show_queue(self, writer: asyncio.StreamWriter) -> None:
        after = 0
        for _ in range(1_000_000):          # bounded: at most 256M envelopes
            reply = await self.ctx.mesh.request(
                "scheduler", CtlRequest(reqid=self.ctx.new_id(), command="list", after=after,
                                        limit=LIST_BATCH), (CtlListReply,))
            if reply.entries:
                writer.write(frame(ClientQueueBatch(entries=reply.entries)))
                await writer.drain()
            if not reply.more:
                break
            after = reply.last
        writer.write(frame(ClientEnd()))
