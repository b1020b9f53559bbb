"""The scheduler process: decides when each envelope is tried.

It never touches disk or network: the queue tells it about envelopes, it tells
the queue what to deliver, relay, expire or remove.  The model itself lives in
scheduler_ram (pure); this module is its event loop and message handling.
"""
from __future__ import annotations

import asyncio
import logging
import time

from common import stat
from common.trace import FLAGS, trace
from common.messages import (
    CtlReply, CtlRequest, QueueDeliveryLoop, QueueDeliveryOk, QueueDeliveryPermfail,
    QueueDeliveryTempfail, QueueEnvelopeAck, QueueEnvelopeSubmit, QueueEnvelopeSubmitBatch,
    QueueListEntry,
    QueueMessageCommit, QueueMessageRollback, SchedEnvelopeDeliver, SchedEnvelopeExpire,
    SchedEnvelopeRemove, SchedEnvelopeTransfer, SchedListReply,
)
from smtpd.scheduler_ram import RamQueue

log = logging.getLogger("smtpd")

MAX_SCHEDULE = 100          # actions per batch (OpenSMTPD: 10; we batch ZeroMQ sends)
_ORDERS = {"deliver": SchedEnvelopeDeliver, "transfer": SchedEnvelopeTransfer,
           "expire": SchedEnvelopeExpire, "remove": SchedEnvelopeRemove}


def prepare(opts, config):
    return None


def now() -> int:
    return int(time.time())


class Process:
    def __init__(self, ctx) -> None:
        self.ctx = ctx
        self.ramqueue = RamQueue()
        self.wake = asyncio.Event()
        self.task: asyncio.Task | None = None
        for agent in ctx.opts.pause:
            if agent in ("mta", "mda"):
                self.ramqueue.pause(agent)

    async def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def on_conf_end(self) -> None:
        self.wake.set()

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()

    async def _run(self) -> None:
        while True:
            actions = self.ramqueue.next_batch(now(), MAX_SCHEDULE)
            for action in actions:
                _count_order(action.kind, action.evpid)
                await self.ctx.mesh.send("queue", _ORDERS[action.kind](evpid=action.evpid))
            if actions:
                await asyncio.sleep(0)
                continue
            wakeup = self.ramqueue.next_wakeup()
            timeout = None if wakeup is None else max(0.0, wakeup - time.time())
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), timeout)
            except TimeoutError:
                pass

    async def handle(self, peer: str, msg) -> None:
        rq = self.ramqueue
        match msg:
            case QueueEnvelopeSubmit(entry=e):
                if FLAGS.scheduler:
                    trace("scheduler: inserting evp:%016x", e.evpid)
                stat.increment("scheduler.envelope.incoming")
                rq.stage(e.evpid, e.type, e.ctime, e.expire, e.retry)
            case QueueEnvelopeSubmitBatch(entries=entries):
                # the spool's content at start: whole messages, committed at once
                for e in entries:
                    rq.stage(e.evpid, e.type, e.ctime, e.expire, e.retry)
                n, when = 0, now()
                for msgid in dict.fromkeys(e.evpid >> 32 for e in entries):
                    n += rq.commit(msgid, when)
                stat.increment("scheduler.envelope", n)
                self.wake.set()
            case QueueMessageCommit(msgid=msgid):
                if FLAGS.scheduler:
                    trace("scheduler: committing msg:%08x", msgid)
                n = rq.commit(msgid, now())
                stat.decrement("scheduler.envelope.incoming", n)
                stat.increment("scheduler.envelope", n)
                self.wake.set()
            case QueueMessageRollback(msgid=msgid):
                if FLAGS.scheduler:
                    trace("scheduler: aborting msg:%08x", msgid)
                stat.decrement("scheduler.envelope.incoming", len(rq.staged.get(msgid, ())))
                rq.rollback(msgid)
            case QueueDeliveryOk(evpid=evpid) | QueueDeliveryPermfail(evpid=evpid) | QueueDeliveryLoop(evpid=evpid):
                result = _RESULT[type(msg)]
                if FLAGS.scheduler:
                    trace("scheduler: deleting evp:%016x (%s)", evpid, result)
                if evpid in rq.items:
                    stat.increment(f"scheduler.delivery.{result}")
                    stat.decrement("scheduler.envelope.inflight")
                    stat.decrement("scheduler.envelope")
                rq.delivered(evpid)
                self.wake.set()
            case QueueDeliveryTempfail(entry=e):
                if FLAGS.scheduler:
                    trace("scheduler: updating evp:%016x", e.evpid)
                if e.evpid in rq.items:
                    stat.increment("scheduler.delivery.tempfail")
                    stat.decrement("scheduler.envelope.inflight")
                rq.tempfail(e.evpid, e.retry, now())
                self.wake.set()
            case QueueEnvelopeAck(evpid=evpid):
                if FLAGS.scheduler:
                    trace("scheduler: queue ack removal of evp:%016x", evpid)
                if evpid in rq.items:
                    stat.decrement("scheduler.envelope.inflight")
                rq.removed_done(evpid)
            case CtlRequest():
                await self._control(peer, msg)
            case _:
                log.warning("warn: scheduler: unexpected %s from %s", type(msg).__name__, peer)

    async def _control(self, peer: str, req: CtlRequest) -> None:
        rq = self.ramqueue
        cmd = req.command
        count = 0
        if cmd == "list":
            rows = rq.listing(req.after, req.limit, now())
            entries = [QueueListEntry(evpid=e, runstate=s, runtime=t) for e, s, t in rows]
            more = len(rows) == req.limit
            last = rows[-1][0] if rows else req.after
            await self.ctx.mesh.send("queue", SchedListReply(reqid=req.reqid, entries=entries,
                                                             more=more, last=last))
            return
        if cmd in ("pause mta", "pause mda"):
            if FLAGS.scheduler:
                trace("scheduler: pausing %s", cmd.split()[1])
            rq.pause(cmd.split()[1])
        elif cmd in ("resume mta", "resume mda"):
            if FLAGS.scheduler:
                trace("scheduler: resuming %s", cmd.split()[1])
            rq.resume(cmd.split()[1], now())
        elif cmd == "schedule":
            count = rq.schedule(req.id, now())
        elif cmd == "remove":
            count = rq.remove(req.id)
        else:
            await self.ctx.mesh.send(peer, CtlReply(reqid=req.reqid, ok=False, text=f"unknown command {cmd}"))
            return
        self.wake.set()
        await self.ctx.mesh.send(peer, CtlReply(reqid=req.reqid, ok=True, count=count))


_RESULT = {QueueDeliveryOk: "ok", QueueDeliveryPermfail: "permfail", QueueDeliveryLoop: "loop"}


def _count_order(kind: str, evpid: int) -> None:
    """The scheduler.envelope.* counters of one order to the queue (scheduler.c
    scheduler_process_batch); an expired envelope is forgotten at once (no ack)."""
    if FLAGS.debug:
        log.debug("debug: scheduler: evp:%016x %s", evpid, {"remove": "removed", "expire": "expired"}.get(
            kind, f"scheduled ({'mta' if kind == 'transfer' else 'mda'})"))
    if kind in ("remove", "expire"):
        stat.decrement("scheduler.envelope")
        stat.increment("scheduler.envelope.removed" if kind == "remove" else "scheduler.envelope.expired")
    if kind != "expire":
        stat.increment("scheduler.envelope.inflight")
