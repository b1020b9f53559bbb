"""The MDA side of pony: local delivery of queued envelopes (mirrors the
dispatcher's part of OpenSMTPD's mda.c).

pony prepares everything that needs no privilege: the user's home from lka, the
message as a descriptor from the queue (with the order, or MdaMessageOpen), the
loop check on its header block, the delivery header lines, the expanded Maildir
path or mda command.  It then sends the request and the descriptor to a delivery
worker that runs as the user (smtpd/mda_workers.py: the parent forks workers at
pony's request, and is not on the path of a message); the worker reads the message,
pony never reads more than the headers.  docs/delivery.md.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

from common.vis import COMMAND, log_text
from common import stat
from common.durations import duration_to_text
from common.envelope import Envelope
from common.ipc import PeerTimeout
from common.messages import (
    DeliveryResult, MdaLookupUserinfo, MdaLookupUserinfoReply, MdaMboxPrepare, MdaMboxPrepared,
    MdaMessageOpen, MdaMessageOpened, MdaWorkerExit, MdaWorkerExitReply, MdaWorkerKill,
    MdaWorkerSpawn, MdaWorkerSpawned,
)
from smtpd import fd_channel
from smtpd.delivery_body import read_head
from smtpd.local_delivery import Request
from smtpd.mda_workers import DeliveryPool
from smtpd.maildir import has_delivered_to_loop, prepend_delivery_headers
from smtpd.mda_variables import FormatError, expand_format
from smtpd.ttl_cache import TtlCache

log = logging.getLogger("smtpd")

MAX_SESSIONS = 50
DEFAULT_MAILDIR = "~/Maildir"
FD_WAIT = 10.0          # a descriptor comes just before its message; this is a safety bound
# Pushed descriptors (QueueDeliver.fd_key) kept for envelopes waiting for a slot; past
# it one is closed at once and its delivery asks for the message when its turn comes.
MAX_PUSHED = 2 * MAX_SESSIONS
USER_CACHE_TTL = 5.0    # seconds a user's lookup (uid, gid, home) is kept (docs/delivery.md)

# OpenSMTPD's mda.* stats: envelopes in the MDA, waiting for a delivery slot
# (pending) or being delivered (running), and the users they are for.
_USERS = stat.Population("mda.user")


class Mda:
    def __init__(self, pony) -> None:
        self.pony = pony
        self.config = pony.config          # replaced at a reload (smtpd/reload.py)
        self.slots = asyncio.Semaphore(MAX_SESSIONS)
        # (table, user) -> lka's answer, for a burst of mail to one mailbox; forgotten
        # at a reload, which may change the tables (Process.apply_config)
        self.users = TtlCache(USER_CACHE_TTL)
        # evpid -> the message's descriptor the queue pushed with the order, until the
        # delivery takes it (_message_fd) or ends (_run): at most MAX_PUSHED
        self.pushed: dict[int, int] = {}
        fd = getattr(pony.ctx.opts, "queue_fd_channel", -1)
        self.message_fds = fd_channel.FdReceiver(socket.socket(fileno=fd)) if fd >= 0 else None
        self.workers = DeliveryPool(ParentSpawner(pony))

    def start(self) -> None:
        if self.message_fds is not None:
            self.message_fds.start()

    def stop(self) -> None:
        self.workers.close()
        if self.message_fds is not None:
            self.message_fds.stop()
        for fd in self.pushed.values():
            fd_channel.close_fd(fd)
        self.pushed.clear()

    def add(self, env: Envelope, fd_key: int = 0) -> None:
        if fd_key:
            self._keep_pushed(env.id, fd_key)
        stat.increment("mda.envelope")
        stat.increment("mda.pending")
        _USERS.add(env.mda_user)
        self.pony.spawn(self._run(env))

    def _keep_pushed(self, evpid: int, fd_key: int) -> None:
        """Take the descriptor pushed with the order out of the channel now (it came
        before the order, or was dropped: nothing to wait for), and keep it for the
        delivery if fewer than MAX_PUSHED are kept."""
        fd = self.message_fds.take_now(fd_key) if self.message_fds is not None else None
        if fd is None:
            return
        old = self.pushed.pop(evpid, None)
        if old is not None:             # the same envelope twice: one descriptor is enough
            fd_channel.close_fd(old)
        if len(self.pushed) >= MAX_PUSHED:
            fd_channel.close_fd(fd)
        else:
            self.pushed[evpid] = fd

    async def _run(self, env: Envelope) -> None:
        try:
            status, detail = await self._run_slot(env)
        finally:
            fd = self.pushed.pop(env.id, None)      # not taken: an early failure, a cancel
            if fd is not None:
                fd_channel.close_fd(fd)
            stat.decrement("mda.envelope")
            _USERS.discard(env.mda_user)
        await self._report(env, status, detail)

    async def _run_slot(self, env: Envelope) -> tuple[str, str]:
        pending = True
        try:
            async with self.slots:
                stat.decrement("mda.pending")
                pending = False
                stat.increment("mda.running")
                try:
                    return await self._deliver(env)
                except PeerTimeout as exc:
                    return "tempfail", f"Timeout: {exc}"
                except Exception as exc:
                    log.exception("warn: mda: delivery of %016x failed", env.id)
                    return "tempfail", f"Internal error: {exc}"
                finally:
                    stat.decrement("mda.running")
        finally:
            if pending:
                stat.decrement("mda.pending")

    async def _report(self, env: Envelope, status: str, detail: str) -> None:
        word = {"ok": "Ok", "tempfail": "TempFail", "permfail": "PermFail", "loop": "PermFail"}[status]
        # OpenSMTPD's mda_log: "rcpt=<...> " only when the envelope has an original
        # recipient (the mta line, by contrast, says rcpt=<-> when it equals dest).
        rcpt = f"rcpt=<{env.rcpt}> " if env.rcpt else ""
        log.info("%016x mda delivery evpid=%016x from=<%s> to=<%s> %suser=%s delay=%s "
                 "result=%s stat=%s", self.pony.ctx.new_id(), env.id, env.sender, env.dest,
                 rcpt, env.mda_user, duration_to_text(int(time.time()) - env.ctime), word, log_text(detail, COMMAND))
        await self.pony.mesh.send("queue", DeliveryResult(
            evpid=env.id, agent="mda", status=status, errorline=detail,
            esc_code=46 if status == "loop" else 30 if status != "ok" else 0, dsn_notify=env.dsn_notify))

    def _plan(self, env: Envelope, action, home: str, username: str) -> tuple[str, str]:
        """(method, target) of this envelope: what an alias or .forward asked for
        (mda_method, docs/expansion.md), else the action's method; templates expanded
        here with every envelope value sanitised (smtpd/mda_variables.py)."""
        def expand(template: str, mda: str | None = None) -> str:
            return expand_format(template, sender=env.sender, rcpt=env.rcpt, dest=env.dest,
                                 user=username, home=home, mda=mda,
                                 sub_addr_delim=self.config.sub_addr_delim)
        method = getattr(env, "mda_method", "")
        if method == "file":
            return "file", env.mda_file
        if method == "exec" or env.mda_exec:
            command = expand(env.mda_exec)
        elif action.method == "maildir":
            return "maildir", expand(action.target or DEFAULT_MAILDIR)
        elif action.method == "mbox":
            return "mbox", ""                   # the parent makes the path
        elif action.method == "lmtp":
            return "lmtp", action.target or ""
        elif action.method == "mda":
            command = expand(action.target or "")
        else:
            raise FormatError(f"delivery method {action.method} delivers nothing")
        if action.wrapper:
            wrapper = self.config.mda_wrappers.get(action.wrapper)
            if wrapper is None:
                raise FormatError(f"could not find wrapper {action.wrapper}")
            command = expand(wrapper, mda=command)
        return "mda", command

    async def _userinfo(self, table: str, username: str) -> MdaLookupUserinfoReply:
        """lka's answer for the user (kept USER_CACHE_TTL seconds when found)."""
        user = self.users.get((table, username))
        if user is None:
            user = await self.pony.mesh.request("lka", MdaLookupUserinfo(
                reqid=self.pony.ctx.new_id(), table=table, user=username), (MdaLookupUserinfoReply,))
            if user.status == "ok":
                self.users.put((table, username), user)
        return user

    async def _message_fd(self, env: Envelope) -> int | str:
        """The message's descriptor, now the caller's to close: the one the queue pushed
        with the order, else asked for (MdaMessageOpen, the way before issue 12, kept
        for a push that failed or was dropped); or why there is none."""
        fd = self.pushed.pop(env.id, None)
        if fd is not None:
            return fd
        reqid = fd_channel.request_key(self.pony.ctx.new_id())
        opened = await self.pony.mesh.request("queue", MdaMessageOpen(reqid=reqid, msgid=env.msgid),
                                              (MdaMessageOpened,))
        if not opened.ok:
            return f"Cannot read message: {opened.error}"
        try:
            return await self.message_fds.take(reqid, FD_WAIT)
        except TimeoutError:
            return "Cannot get the message descriptor"

    async def _deliver(self, env: Envelope) -> tuple[str, str]:
        action = self.config.actions.get(env.dispatcher)
        if action is None:
            return "tempfail", f"action {env.dispatcher!r} not found in the configuration"
        if self.message_fds is None:
            return "tempfail", "no descriptor channel from the queue"
        mesh, new_id = self.pony.mesh, self.pony.ctx.new_id
        username = action.user or env.mda_user
        user = await self._userinfo(action.userbase or "", username)
        if user.status == "notfound" and env.mda_method in ("exec", "file") and action.userbase:
            # an alias's |command or /file runs as smtpd's own user (docs/expansion.md),
            # a system account a userbase table does not list
            user = await self._userinfo("", username)
        if user.status == "notfound":
            return "permfail", "Permanent failure in user lookup"
        if user.status != "ok":
            return "tempfail", "Temporary failure in user lookup"
        try:
            method, target = self._plan(env, action, user.home, username)
        except FormatError as exc:
            return "permfail", f"Bad {action.method} template: {exc}"
        fd = await self._message_fd(env)
        if isinstance(fd, str):
            return "tempfail", fd
        try:
            head = read_head(fd)
            if has_delivered_to_loop(head, env.dest):
                return "loop", "Loop detected"
            try:
                prefix = prepend_delivery_headers(head, sender=env.sender, dest=env.dest)[:-len(head) or None]
            except ValueError as exc:
                return "permfail", f"Bad address: {exc}"
            if method == "mbox":
                prepared = await mesh.request("parent", MdaMboxPrepare(
                    reqid=new_id(), action=env.dispatcher, username=username, uid=user.uid, gid=user.gid),
                    (MdaMboxPrepared,))
                if prepared.status != "ok":
                    return prepared.status, prepared.error
                target = prepared.path
            request = Request(method, target, action.junk, prefix, env.sender, env.rcpt, env.dest,
                              username, user.home, env.mda_subaddress,
                              (env.rcpt or env.dest) if action.lmtp_rcpt_to else env.dest)
            status, error = await self.workers.run(request, user.uid, user.gid, fd)
        finally:
            os.close(fd)
        return status, "Delivered" if status == "ok" else error


class ParentSpawner:
    """The pool's way to the parent, which alone can fork a process that runs as a
    user (smtpd/mda_workers.py Spawner)."""

    def __init__(self, pony) -> None:
        self.pony = pony

    async def spawn(self, uid: int, gid: int, sock: socket.socket) -> tuple[str, str, int]:
        channel = self.pony.ctx.prepared.fd_channel
        if channel is None:
            return "tempfail", "no descriptor channel to the parent", 0
        key = self.pony.ctx.new_id()
        await fd_channel.send_fd(channel, key, sock.fileno())
        reply = await self.pony.mesh.request("parent", MdaWorkerSpawn(reqid=key, uid=uid, gid=gid),
                                              (MdaWorkerSpawned,))
        return reply.status, reply.error, reply.pid

    async def kill(self, pid: int) -> None:
        await self.pony.mesh.send("parent", MdaWorkerKill(pid=pid))

    async def exit_text(self, pid: int) -> str:
        reply = await self.pony.mesh.request("parent", MdaWorkerExit(reqid=self.pony.ctx.new_id(), pid=pid),
                                             (MdaWorkerExitReply,))
        return reply.text
