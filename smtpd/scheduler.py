"""The scheduler process: decides when each envelope is tried.

It never touches disk or network: the queue tells it about envelopes, it tells
the queue what to deliver, relay, expire or remove, and when a delay notice is
due.  The model itself lives in scheduler_ram (pure); this module is its event
loop, message handling, smtpctl commands and stats (docs/queue.md, "Scheduler").
"""
from __future__ import annotations

import asyncio
import logging
import time

from common import stat
from common.trace import FLAGS, trace
from common.messages import (
    CtlReply, CtlRequest, QueueDeliveryLoop, QueueDeliveryOk, QueueDeliveryPermfail,
    QueueDeliveryTempfail, QueueEnvelopeAck, QueueEnvelopeRemove, QueueEnvelopeSubmit,
    QueueEnvelopeSubmitBatch, QueueHoldqHold, QueueHoldqRelease, QueueListEntry,
    QueueMessageCommit, QueueMessageRollback, SchedEnvelopeBounce, SchedEnvelopeWithdraw,
    SchedListReply,
)
from common.messages import QueueCommitBatch, QueueDeliveredBatch, SchedOrders  # issue 12: batches
from smtpd.scheduler_ram import RamQueue

log = logging.getLogger("smtpd")

MAX_SCHEDULE = 100          # actions per batch (OpenSMTPD: 10; we batch ZeroMQ sends)
# Gauges of the model kept as OpenSMTPD's stats: held envelopes, hold queues.
_GAUGES = (("scheduler.ramqueue.hold", lambda rq: len(rq.held_in)),
           ("scheduler.ramqueue.holdq", lambda rq: len(rq.holdqs)),
           ("scheduler.ramqueue.hold-overflow", lambda rq: rq.hold_overflow))


def prepare(opts, config):
    return None


def now() -> int:
    return int(time.time())


def _target(ident: int) -> str:
    """How a smtpctl id argument reads in a trace line."""
    if ident == 0:
        return "all"
    return f"msg:{ident:08x}" if ident <= 0xFFFFFFFF else f"evp:{ident:016x}"


class Process:
    def __init__(self, ctx) -> None:
        self.ctx = ctx
        self.ramqueue = RamQueue(warn_intervals=ctx.config.bounce_warn_interval)
        self.gauges = {key: 0 for key, _ in _GAUGES}
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
                _count_order(action)
            if actions:
                # one message for the pass: the queue is woken once, not once per order
                await self.ctx.mesh.send("queue", SchedOrders(
                    orders=[(action.kind, action.evpid) for action in actions]))
                self._sync_gauges()
                await asyncio.sleep(0)
                continue
            wakeup = self.ramqueue.next_wakeup()
            timeout = None if wakeup is None else max(0.0, wakeup - time.time())
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), timeout)
            except TimeoutError:
                pass

    def _sync_gauges(self) -> None:
        for key, value_of in _GAUGES:
            value = value_of(self.ramqueue)
            delta = value - self.gauges[key]
            if delta > 0:
                stat.increment(key, delta)
            elif delta < 0:
                stat.decrement(key, -delta)
            self.gauges[key] = value

    async def handle(self, peer: str, msg) -> None:
        rq = self.ramqueue
        match msg:
            case QueueEnvelopeSubmit(entry=e):
                self._stage(e)
            case QueueEnvelopeSubmitBatch(entries=entries):
                # the spool's content at start: whole messages, committed at once
                for e in entries:
                    rq.stage(e.evpid, e.type, e.ctime, e.expire, e.retry, e.last_bounce)
                n, when = 0, now()
                for msgid in dict.fromkeys(e.evpid >> 32 for e in entries):
                    n += rq.commit(msgid, when)
                stat.increment("scheduler.envelope", n)
                self.wake.set()
            case QueueMessageCommit(msgid=msgid):
                self._commit(msgid)
                self.wake.set()
            case QueueCommitBatch(entries=entries):
                # a group commit's messages, each staged and committed as if its envelopes
                # and its commit had come one message each (same traces, same counters)
                for i, e in enumerate(entries):
                    self._stage(e)
                    if i + 1 == len(entries) or entries[i + 1].evpid >> 32 != e.evpid >> 32:
                        self._commit(e.evpid >> 32)
                self.wake.set()
            case QueueMessageRollback(msgid=msgid):
                if FLAGS.scheduler:
                    trace("scheduler: aborting msg:%08x", msgid)
                stat.decrement("scheduler.envelope.incoming", rq.staged_count(msgid))
                rq.rollback(msgid)
            case QueueDeliveryOk(evpid=evpid) | QueueDeliveryPermfail(evpid=evpid) | QueueDeliveryLoop(evpid=evpid):
                result = _RESULT[type(msg)]
                if FLAGS.scheduler:
                    trace("scheduler: deleting evp:%016x (%s)", evpid, result)
                self._forget(evpid, result)
            case QueueDeliveredBatch(evpids=evpids):
                for evpid in evpids:
                    if FLAGS.scheduler:
                        trace("scheduler: deleting evp:%016x (ok)", evpid)
                    self._forget(evpid, "ok")
            case QueueDeliveryTempfail(entry=e):
                if FLAGS.scheduler:
                    trace("scheduler: updating evp:%016x", e.evpid)
                if rq.state_of(e.evpid) == "inflight":
                    stat.increment("scheduler.delivery.tempfail")
                    stat.decrement("scheduler.envelope.inflight")
                rq.warn_intervals = self.ctx.config.bounce_warn_interval     # a reload may change it
                delay = rq.tempfail(e.evpid, e.retry, now(), e.last_bounce)
                if delay:
                    if FLAGS.scheduler:
                        trace("scheduler: evp:%016x delay notice due (%ds)", e.evpid, delay)
                    await self.ctx.mesh.send("queue", SchedEnvelopeBounce(evpid=e.evpid, delay=delay))
                self.wake.set()
            case QueueHoldqHold(evpid=evpid, holdq=holdq):
                if FLAGS.scheduler:
                    trace("scheduler: holding evp:%016x on %016x", evpid, holdq)
                if rq.state_of(evpid) == "inflight":
                    stat.decrement("scheduler.envelope.inflight")
                rq.hold(evpid, holdq, now())
                self._sync_gauges()
                self.wake.set()
            case QueueHoldqRelease(holdq=holdq, n=n):
                count = rq.release(holdq, n, now())
                if FLAGS.scheduler:
                    trace("scheduler: releasing %d on holdq (%016x)", count, holdq)
                self._sync_gauges()
                self.wake.set()
            case QueueEnvelopeAck(evpid=evpid):
                if FLAGS.scheduler:
                    trace("scheduler: queue ack removal of evp:%016x", evpid)
                if rq.removed_done(evpid):
                    stat.decrement("scheduler.envelope.inflight")
            case QueueEnvelopeRemove(evpid=evpid):
                # its message went to corrupt/: forgotten, not counted as a delivery
                self._forget(evpid, None)
            case CtlRequest():
                await self._control(peer, msg)
            case _:
                log.warning("warn: scheduler: unexpected %s from %s", type(msg).__name__, peer)

    def _stage(self, e) -> None:
        if FLAGS.scheduler:
            trace("scheduler: inserting evp:%016x", e.evpid)
        stat.increment("scheduler.envelope.incoming")
        self.ramqueue.stage(e.evpid, e.type, e.ctime, e.expire, e.retry, e.last_bounce)

    def _commit(self, msgid: int) -> None:
        rq = self.ramqueue
        if FLAGS.scheduler:
            trace("scheduler: committing msg:%08x", msgid)
        stat.decrement("scheduler.envelope.incoming", rq.staged_count(msgid))
        stat.increment("scheduler.envelope", rq.commit(msgid, now()))

    def _forget(self, evpid: int, result: str | None) -> None:
        """The envelope is gone (delivered, failed, looped: ``result``; or moved to
        corrupt/: None, not a delivery); the counters follow the state it was in."""
        rq = self.ramqueue
        state = rq.state_of(evpid)
        if state is not None:
            if result:
                stat.increment(f"scheduler.delivery.{result}")
            stat.decrement("scheduler.envelope")
            if state == "inflight":
                stat.decrement("scheduler.envelope.inflight")
        limited = rq.inflight >= rq.max_inflight
        rq.delivered(evpid)
        self._sync_gauges()
        if limited or rq.removals:
            # a try held back by max-inflight may start now; otherwise an envelope gone
            # makes nothing due earlier, and the scheduler sleeps on (one pass saved
            # per delivery)
            self.wake.set()

    async def _control(self, peer: str, req: CtlRequest) -> None:
        rq = self.ramqueue
        cmd = req.command
        count = 0
        if cmd == "list":
            listing = rq.listing(req.after, req.limit, now())
            entries = [QueueListEntry(evpid=e, runstate=s, runtime=t, suspended=susp, held=held)
                       for e, s, t, susp, held in listing.rows]
            await self.ctx.mesh.send("queue", SchedListReply(reqid=req.reqid, entries=entries,
                                                             more=listing.more, last=listing.last))
            return
        if cmd in ("pause mta", "pause mda"):
            if FLAGS.scheduler:
                trace("scheduler: pausing %s", cmd.split()[1])
            rq.pause(cmd.split()[1])
        elif cmd in ("resume mta", "resume mda"):
            if FLAGS.scheduler:
                trace("scheduler: resuming %s", cmd.split()[1])
            rq.resume(cmd.split()[1], now())
        elif cmd in ("schedule", "remove", "pause envelope", "resume envelope"):
            if FLAGS.scheduler:
                trace("scheduler: %s %s", cmd, _target(req.id))
            if cmd == "schedule":
                count = rq.schedule(req.id, now())
            elif cmd == "remove":
                count = rq.remove(req.id)
            elif cmd == "pause envelope":
                count = rq.suspend(req.id)
            else:
                count = rq.resume_envelopes(req.id, now())
            if cmd in ("remove", "pause envelope"):
                for evpid in rq.inflight_ids(req.id):      # the MTA gives back those not sent yet
                    await self.ctx.mesh.send("queue", SchedEnvelopeWithdraw(evpid=evpid))
            self._sync_gauges()
        else:
            await self.ctx.mesh.send(peer, CtlReply(reqid=req.reqid, ok=False, text=f"unknown command {cmd}"))
            return
        self.wake.set()
        await self.ctx.mesh.send(peer, CtlReply(reqid=req.reqid, ok=True, count=count))


_RESULT = {QueueDeliveryOk: "ok", QueueDeliveryPermfail: "permfail", QueueDeliveryLoop: "loop"}


def _count_order(action) -> None:
    """The scheduler.envelope.* counters of one order to the queue (scheduler.c
    scheduler_process_batch); an expired envelope is forgotten at once (no ack)."""
    kind = action.kind
    if FLAGS.debug:
        log.debug("debug: scheduler: evp:%016x %s", action.evpid, {"remove": "removed", "expire": "expired"}.get(
            kind, f"scheduled ({action.agent})"))
    if kind in ("remove", "expire"):
        stat.decrement("scheduler.envelope")
        stat.increment("scheduler.envelope.removed" if kind == "remove" else "scheduler.envelope.expired")
    if kind != "expire":
        stat.increment("scheduler.envelope.inflight")
