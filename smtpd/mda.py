"""The MDA side of pony: local delivery of queued envelopes.

pony prepares everything that needs no privilege (the user's home from lka, the
message from the queue, the loop check, the delivery headers, the expanded
Maildir path) and asks the parent to write it as the user.
"""
from __future__ import annotations

import asyncio
import logging
import time

from common.vis import COMMAND, log_text
from common import stat
from common.durations import duration_to_text
from common.envelope import Envelope
from common.ipc import PeerTimeout
from common.messages import (
    DeliveryResult, MdaDone, MdaFork, MdaLookupUserinfo, MdaLookupUserinfoReply,
    MessageContent, MessageOpen,
)
from smtpd.maildir import has_delivered_to_loop, prepend_delivery_headers
from smtpd.mda_variables import FormatError, expand_format

log = logging.getLogger("smtpd")

MAX_SESSIONS = 50
DEFAULT_MAILDIR = "~/Maildir"

# OpenSMTPD's mda.* stats: envelopes in the MDA, waiting for a delivery slot
# (pending) or being delivered (running), and the users they are for.
_USERS = stat.Population("mda.user")


class Mda:
    def __init__(self, pony) -> None:
        self.pony = pony
        self.config = pony.config
        self.slots = asyncio.Semaphore(MAX_SESSIONS)

    def add(self, env: Envelope) -> None:
        stat.increment("mda.envelope")
        stat.increment("mda.pending")
        _USERS.add(env.mda_user)
        self.pony.spawn(self._run(env))

    async def _run(self, env: Envelope) -> None:
        try:
            status, detail = await self._run_slot(env)
        finally:
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

    async def _deliver(self, env: Envelope) -> tuple[str, str]:
        action = self.config.actions.get(env.dispatcher)
        if action is None:
            return "tempfail", f"action {env.dispatcher!r} not found in the configuration"
        if env.mda_method:
            # |command and /path targets of aliases and .forward files (docs/expansion.md)
            return "tempfail", f"delivery to an alias {env.mda_method} target is not supported yet"
        if action.method != "maildir":
            return "tempfail", f"delivery method {action.method} is not supported yet"
        mesh, new_id = self.pony.mesh, self.pony.ctx.new_id
        user = await mesh.request("lka", MdaLookupUserinfo(
            reqid=new_id(), table=action.userbase or "", user=env.mda_user), (MdaLookupUserinfoReply,))
        if user.status == "notfound":
            return "permfail", "Permanent failure in user lookup"
        if user.status != "ok":
            return "tempfail", "Temporary failure in user lookup"
        content = await mesh.request("queue", MessageOpen(reqid=new_id(), msgid=env.msgid), (MessageContent,))
        if not content.ok:
            return "tempfail", f"Cannot read message: {content.error}"
        if has_delivered_to_loop(content.data, env.dest):
            return "loop", "Loop detected"
        try:
            path = expand_format(action.target or DEFAULT_MAILDIR, sender=env.sender, rcpt=env.rcpt,
                                 dest=env.dest, user=env.mda_user, home=user.home,
                                 sub_addr_delim=self.config.sub_addr_delim)
        except FormatError as exc:
            return "permfail", f"Bad maildir path: {exc}"
        message = prepend_delivery_headers(content.data, sender=env.sender, dest=env.dest)
        done = await mesh.request("parent", MdaFork(
            reqid=new_id(), evpid=env.id, method="maildir", path=path, junk=action.junk,
            uid=user.uid, gid=user.gid, home=user.home, message=message), (MdaDone,), timeout=330)
        return done.status, "Delivered" if done.status == "ok" else done.error
