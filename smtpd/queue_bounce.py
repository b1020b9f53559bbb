"""Bounces inside the queue process: creating bounce envelopes, and sending the notices.

Creation (OpenSMTPD's ``queue_bounce``): on a permanent failure, a loop, an expiry,
a due delay notice or a success the sender asked to hear about, the original
envelope is copied into a new envelope of type ``bounce`` in the SAME message (it
shares the message file), written durably and handed to the scheduler like any
new envelope.  Never for a message from <> (nothing to send it to), never for a
bounce envelope itself, never when the sender said NOTIFY=NEVER.

Delivery (OpenSMTPD's bounce.c): when the scheduler orders a bounce envelope, the
queue waits a moment for the other bounce envelopes of that message and builds ONE
report for all of them (smtpd/bounce.py), then asks pony to inject it from <> to
the original sender (``PonyEnqueue``): accepted -> the bounce envelopes are done;
refused for now -> retried on the scheduler's 10 s schedule; refused for good ->
dropped and logged (a bounce never bounces).
"""
from __future__ import annotations

import asyncio
import logging
import os
import time

from common.vis import COMMAND, log_text
from common import stat
from common.envelope import DSN_DELAY, DSN_FAILURE, DSN_NEVER, DSN_SUCCESS, Envelope, EnvelopeError
from common.ipc import PeerTimeout
from common.trace import FLAGS, trace
from common.messages import (
    PonyEnqueue, PonyEnqueueReply, QueueDeliveryOk, QueueDeliveryPermfail, QueueDeliveryTempfail,
    QueueEnvelopeSubmit, QueueMessageCommit,
)
from smtpd import bounce
from smtpd.queue_fs import SpoolError

log = logging.getLogger("smtpd")

BOUNCE_TTL = 7 * 86400       # the ttl field of a bounce envelope, as OpenSMTPD
GROUP_DELAY = 1.0            # seconds a report waits for more recipients of the message
INJECT_TIMEOUT = 300.0
MAX_RUNNING = 2              # notices being injected at once (OpenSMTPD's BOUNCE_MAXRUN)

_NOTIFY_BIT = {bounce.FAILED: DSN_FAILURE, bounce.DELAYED: DSN_DELAY,
               bounce.DELIVERED: DSN_SUCCESS, bounce.RELAYED: DSN_SUCCESS}


def skip_reason(env: Envelope, kind: str) -> str:
    """Why no notice of this kind goes out for this envelope ("" when one does)."""
    if env.type == "bounce" or "bounce" in env.flags:
        return "double bounce"
    if not env.sender:
        return "no return path"
    if env.dsn_notify & DSN_NEVER:
        return "NOTIFY=NEVER"
    # An explicit NOTIFY list without this kind (RFC 3461 s4.1); without NOTIFY the
    # default is failures and delays, never successes.
    if env.dsn_notify and not env.dsn_notify & _NOTIFY_BIT[kind]:
        return f"NOTIFY without {kind}"
    if not env.dsn_notify and kind in (bounce.DELIVERED, bounce.RELAYED):
        return "no NOTIFY=SUCCESS"
    return ""


def bounce_envelope(env: Envelope, kind: str, *, now: int, errorline: str, esc_class: int,
                    esc_code: int, delay: int = 0, ttl: int = 0) -> Envelope:
    """The bounce envelope for ``env`` (a copy, in the same message)."""
    out = Envelope(**{f: getattr(env, f) for f in env.__struct_fields__})
    out.type = "bounce"
    out.bounce_type = kind
    out.ctime = now
    out.ttl = BOUNCE_TTL
    out.retry = 0
    out.last_try = 0
    out.last_bounce = 0
    out.errorline = errorline[:1000]
    out.esc_class, out.esc_code = esc_class, esc_code
    out.bounce_delay = delay if kind == bounce.DELAYED else 0
    out.bounce_ttl = ttl
    out.flags = list(env.flags)
    return out


class Bouncer:
    """The queue's bounce side; ``queue`` is the queue Process (spool, mesh, config)."""

    def __init__(self, queue) -> None:
        self.queue = queue
        self.groups: dict[tuple, list[Envelope]] = {}
        self.running = asyncio.Semaphore(MAX_RUNNING)

    # -- creation ---------------------------------------------------------------------------

    async def create(self, env: Envelope, kind: str, *, errorline: str, esc_class: int,
                     esc_code: int, delay: int = 0) -> bool:
        """Write and schedule a bounce envelope for ``env`` (which must still be on disk).
        False when none is due or it could not be written (logged)."""
        why = skip_reason(env, kind)
        if why:
            log.debug("debug: queue: no %s notice for %016x: %s", kind, env.id, why)
            return False
        ttl = self.queue.expire_of(env) - env.ctime
        new = bounce_envelope(env, kind, now=int(time.time()), errorline=errorline,
                              esc_class=esc_class, esc_code=esc_code, delay=delay, ttl=ttl)
        try:
            evpid = await asyncio.to_thread(self.queue.spool.add_envelope, new)
        except (OSError, SpoolError, EnvelopeError) as exc:
            log.error("warn: queue: cannot create a %s bounce for %016x: %s", kind, env.id, exc)
            return False
        stat.increment("queue.bounce")
        log.info("queue: bounce evpid=%016x for evpid=%016x type=%s to=<%s>", evpid, env.id, kind,
                 env.sender)
        send = self.queue.ctx.mesh.send
        await send("scheduler", QueueEnvelopeSubmit(entry=self.queue.entry_of(new)))
        await send("scheduler", QueueMessageCommit(msgid=evpid >> 32))
        return True

    # -- delivery ---------------------------------------------------------------------------

    def add(self, env: Envelope) -> None:
        """A bounce envelope the scheduler wants delivered: grouped per report."""
        key = (env.msgid, env.sender, env.bounce_type, env.smtpname, env.bounce_delay)
        stat.increment("bounce.envelope")
        if FLAGS.bounce:
            trace("bounce: adding evp:%016x (%s) to the report of msg:%08x", env.id,
                  env.bounce_type, env.msgid)
        group = self.groups.get(key)
        if group is None:
            stat.increment("bounce.message")
            self.groups[key] = [env]
            asyncio.get_running_loop().call_later(GROUP_DELAY, self._flush, key)
        else:
            group.append(env)

    def _flush(self, key: tuple) -> None:
        group = self.groups.pop(key, [])
        if group:
            self.queue._spawn(self._send_one(group))

    async def _send_one(self, group: list[Envelope]) -> None:
        async with self.running:
            await self._send(group)

    async def _send(self, group: list[Envelope]) -> None:
        first = group[0]
        spool = self.queue.spool
        try:
            original = await asyncio.to_thread(spool.read_message, first.msgid)
            arrival = int(os.stat(spool.message_dir(first.msgid) / "message").st_mtime)
        except OSError as exc:
            await self._result(group, "tempfail", f"Cannot read message: {exc}")
            return
        report = bounce.Report(
            kind=first.bounce_type or bounce.FAILED, smtpname=first.smtpname or self.queue.config.hostname,
            to=first.sender, arrival=arrival, original=original, envid=first.dsn_envid,
            ret=first.dsn_ret, delay=first.bounce_delay, ttl=first.bounce_ttl,
            recipients=[bounce.Recipient(dest=e.dest, orcpt=e.dsn_orcpt, esc_class=e.esc_class,
                                         esc_code=e.esc_code, errorline=e.errorline) for e in group])
        data = bounce.build_report(report, now=time.time(), unique=f"{first.id:016x}")
        if FLAGS.bounce:
            trace("bounce: msg:%08x: sending a %s notice to <%s> for %d recipient(s), %d bytes",
                  first.msgid, report.kind, first.sender, len(group), len(data))
        req = PonyEnqueue(reqid=self.queue.ctx.new_id(), sender="", recipients=[first.sender],
                          data=data, bounce=True, origin="bounce")
        try:
            reply = await self.queue.ctx.mesh.request("pony", req, (PonyEnqueueReply,),
                                                      timeout=INJECT_TIMEOUT)
        except PeerTimeout:
            reply = PonyEnqueueReply(reqid=req.reqid, status="tempfail", text="421 4.4.2 Timeout")
        await self._result(group, reply.status, reply.text)

    async def _result(self, group: list[Envelope], status: str, text: str) -> None:
        send = self.queue.ctx.mesh.send
        spool = self.queue.spool
        word = {"ok": "Ok", "tempfail": "TempFail"}.get(status, "PermFail")
        stat.decrement("bounce.message")
        stat.decrement("bounce.envelope", len(group))
        for env in group:
            log.info("%016x bounce delivery evpid=%016x from=<> to=<%s> type=%s result=%s stat=%s",
                     env.id, env.id, env.sender, env.bounce_type, word, log_text(text, COMMAND))
        if status == "ok" or status == "permfail":
            if status == "permfail":
                log.warning("warn: queue: bounce to <%s> refused, dropped: %s", group[0].sender, log_text(text, COMMAND))
            for env in group:
                self.queue.remover.remove(env.id)
                reply = QueueDeliveryOk if status == "ok" else QueueDeliveryPermfail
                await send("scheduler", reply(evpid=env.id))
            return
        for env in group:
            try:
                env.retry += 1
                env.last_try = int(time.time())     # errorline stays: it is the report's content
                await asyncio.to_thread(spool.update_envelope, env)
                await send("scheduler", QueueDeliveryTempfail(entry=self.queue.entry_of(env)))
            except (OSError, EnvelopeError) as exc:
                log.error("warn: queue: cannot update bounce envelope %016x: %s", env.id, exc)
                await send("scheduler", QueueDeliveryPermfail(evpid=env.id))
