"""The queue process: the only one that reads or writes the spool.

It creates messages for pony, stores the envelopes lka expands, commits them
durably, feeds the scheduler, hands envelopes and bodies to pony for delivery,
and applies delivery results to disk.  The group commit runs on the event loop
(Committer: why, there); other blocking disk work (envelope rewrites, removals)
runs in worker threads.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

from common.vis import COMMAND, log_text
from common import privsep
from common.durations import duration_to_text
from common.envelope import DSN_SUCCESS, EnvelopeError
from common.ids import MSGID_MAX
from common.messages import (
    CtlContentReply, CtlListReply, CtlReply, CtlRequest, DeliveryResult, MessageContent,
    MessageOpen, QueueDeliver, QueueDeliveryLoop, QueueDeliveryOk, QueueDeliveryPermfail,
    QueueDeliveryTempfail, QueueEnvelopeAck, QueueEnvelopeCommitReply, QueueEnvelopeSubmit,
    QueueEnvelopeRemove, QueueEnvelopeSubmitBatch, QueueMessageCommit,
    QueueTransfer,
    SchedEntry, SchedEnvelopeBounce, SchedEnvelopeDeliver, SchedEnvelopeExpire, SchedEnvelopeRemove,
    SchedEnvelopeTransfer, SchedListReply, SmtpMessageCommit, SmtpMessageCommitReply,
    SmtpMessageCreate, SmtpMessageCreateReply, SmtpMessageData, SmtpMessageRollback,
)
from common.messages import MtaHoldqRelease, QueueHoldqHold, QueueHoldqRelease  # hold queues
from common.messages import MdaMessageOpen, MdaMessageOpened  # bodies by descriptor
from smtpd import fd_channel
from common.messages import SchedEnvelopeWithdraw  # issue 10: withdrawn from the MTA
from common.messages import LkaEnvelopesSubmit, QueueCommitBatch, QueueDeliveredBatch, SchedOrders  # issue 12
from smtpd import bounce
from smtpd.queue_bounce import Bouncer
from smtpd.queue_fs import Spool, SpoolError, close_quietly, is_disk_full

log = logging.getLogger("smtpd")

MAX_CREATE = 64        # message ids one SmtpMessageCreate can ask for (pony's reserve)


def prepare(opts, config) -> Spool:
    """Create the spool and move into it while still root: from then on every path is
    relative to it, so the queue needs no access to the directories above (and a chroot
    into the spool, as OpenSMTPD does, changes nothing)."""
    spool = Spool(opts.spool)
    ids = privsep.ids_for("queue")
    spool.setup(ids.uid, ids.gid, privsep.privileged())
    os.chdir(spool.root)
    return Spool(".")


class Incoming:
    """A message being received: its open body and the envelopes written so far."""
    __slots__ = ("body", "entries", "failed", "disk_full")

    def __init__(self) -> None:
        self.body = None
        self.entries: list[SchedEntry] = []
        self.failed: str = ""
        self.disk_full = False


class Committer:
    """Group commit: every message whose DATA ended in one turn of the event loop is
    committed together at the start of the next turn (Spool.commit_batch), so that
    concurrent messages share the syncs; those whose end of DATA comes while a batch
    is being synced wait in their channel and make the next batch.  The batch's
    outcome goes out in one call, ``done([(item, error or None)...])``, as soon as
    the batch is durable: nobody is answered before.

    On the event loop, not in a thread: the batch blocks the loop for its two
    syncfs (about 1-2 ms; the messages that come meanwhile are the next batch).  A
    committer thread did the same work in 2-3 times as long under load (issue 12,
    docs/performance.md): each of a batch's system calls (per message a flush, a
    close, two renames; then the syncs) gave up the GIL, and taking it back from a
    busy event loop costs up to the 5 ms switch interval, plus the thread's own
    wake-up; the commit latency's p99 was twice what it is without."""

    MAX_BATCH = 128

    def __init__(self, spool: Spool, done) -> None:
        self.spool = spool
        self.done = done
        self.pending: list[tuple[object, int, object]] = []

    def commit(self, item, msgid: int, body) -> None:
        if not self.pending:
            asyncio.get_running_loop().call_soon(self._run)
        self.pending.append((item, msgid, body))

    def _run(self) -> None:
        batch, self.pending = self.pending[:self.MAX_BATCH], self.pending[self.MAX_BATCH:]
        if self.pending:                    # more than a batch: the rest in the next turn
            asyncio.get_running_loop().call_soon(self._run)
        try:
            results = self.spool.commit_batch([(msgid, body) for _, msgid, body in batch])
        except Exception as exc:            # a bug: fail the batch, never acknowledge it
            results = [exc] * len(batch)
        self.done([(item, result) for (item, _, _), result in zip(batch, results)])


class Remover:
    """Removal of delivered (or failed, expired, removed) envelopes, in order
    (Spool.delete_envelope: the envelope, and the message with its last envelope), on
    the event loop, the removals asked within BATCH_DELAY together.  A removal is
    renames into the pool of recycled inodes (smtpd/queue_recycle.py), work of the
    size of the group commit's, which runs on the loop too; it ran on a thread of its
    own when it was unlinks, and waking that thread (and handing it the GIL) for each
    batch cost more than the renames (issue 12).

    A removal is not durable and need not be (a crash before it delivers again, as
    OpenSMTPD, docs/spool.md); ``run`` does every removal asked so far (discover,
    uncorrupt, stop: they must see the spool as the scheduler does).  ``before`` runs
    first in each batch: the queue tells the scheduler of the batch's deliveries there,
    so that it hears before their envelopes go."""

    BATCH_DELAY = 0.01      # seconds; what a crash may deliver twice grows by this at most

    def __init__(self, spool: Spool, before=lambda: None) -> None:
        self.spool = spool
        self.before = before
        self.batch: list[int] = []
        self.timer: asyncio.TimerHandle | None = None

    def remove(self, evpid: int) -> None:
        if self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(self.BATCH_DELAY, self.run)
        self.batch.append(evpid)

    def run(self) -> None:
        """The removals asked so far, now."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.before()
        batch, self.batch = self.batch, []
        for evpid in batch:
            try:
                self.spool.delete_envelope(evpid)
            except Exception:           # a bug: the envelope stays, and is said so
                log.exception("warn: queue: cannot remove envelope %016x", evpid)


class Committing:
    """A message in the committer's hands: whom to answer, and what to announce."""
    __slots__ = ("peer", "reqid", "msgid", "inc")

    def __init__(self, peer: str, reqid: int, msgid: int, inc: Incoming) -> None:
        self.peer, self.reqid, self.msgid, self.inc = peer, reqid, msgid, inc


class Process:
    def __init__(self, ctx) -> None:
        self.ctx = ctx
        self.spool: Spool = ctx.prepared
        self.config = ctx.config
        self.incoming: dict[int, Incoming] = {}
        self.committing: set[int] = set()      # msgids in the committer's hands
        self.committer = Committer(self.spool, self._committed)
        self.delivered: list[int] = []        # ok results the scheduler is told of next
        self.remover = Remover(self.spool, before=self._report_delivered)
        # the queue's end of the queue -> pony descriptor channel (smtpd/fd_channel.py)
        fd = getattr(ctx.opts, "queue_fd_channel", -1)
        self.delivery_fds = socket.socket(fileno=fd) if fd >= 0 else None
        self.tasks: set[asyncio.Task] = set()
        self.started = time.time()
        # Messages moved to corrupt/ by this run: later orders and results for their
        # envelopes are dropped quietly (the move was logged once, the scheduler told).
        self.corrupted: set[int] = set()
        self.bouncer = Bouncer(self)

    async def start(self) -> None:
        await asyncio.to_thread(self.spool.purge_unfinished)

    async def on_conf_end(self) -> None:
        self._spawn(self._load_queue())

    async def stop(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        # removals asked for are done: a restart would deliver them again
        self.remover.run()

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception():
            log.error("warn: queue: %r", task.exception(), exc_info=task.exception())

    def expire_of(self, env) -> int:
        if env.type == "bounce":          # bounces expire with the queue ttl (OpenSMTPD)
            return env.ctime + self.config.queue_ttl
        action = self.config.actions.get(env.dispatcher)
        ttl = action.ttl if action is not None and action.ttl else self.config.queue_ttl
        return env.ctime + ttl

    def entry_of(self, env) -> SchedEntry:
        return SchedEntry(evpid=env.id, type=env.type, ctime=env.ctime,
                          expire=self.expire_of(env), retry=env.retry, last_bounce=env.last_bounce)

    # -- start-up: feed the scheduler with what the spool holds ------------------------------

    LOAD_BATCH = 1024        # envelopes per QueueEnvelopeSubmitBatch

    async def _load_queue(self) -> None:
        """Every envelope of queue/ to the scheduler, whole messages in batches, the
        loop given back between batches (SMTP sessions are served meanwhile)."""
        count = 0
        batch: list[SchedEntry] = []
        send = self.ctx.mesh.send
        for msgid, evpids in self.spool.walk():
            # Every envelope of a message is read before any goes to the scheduler, so a
            # corrupt one sends the whole message to corrupt/ with nothing half-submitted.
            entries = []
            corrupt = ""
            for evpid in evpids:
                try:
                    env, mtime = self.spool.load_envelope_mtime(evpid)
                except FileNotFoundError:
                    continue
                except (OSError, EnvelopeError) as exc:
                    corrupt = f"envelope {evpid:016x}: {exc}"
                    break
                if mtime > self.started:
                    continue      # written by this run: the scheduler has it already
                entries.append(self.entry_of(env))
            if corrupt:
                await self._corrupt(msgid, corrupt)
                continue
            batch += entries
            if len(batch) >= self.LOAD_BATCH:
                await send("scheduler", QueueEnvelopeSubmitBatch(entries=batch))
                count += len(batch)
                batch = []
                await asyncio.sleep(0)
        if batch:
            await send("scheduler", QueueEnvelopeSubmitBatch(entries=batch))
            count += len(batch)
        log.debug("debug: queue: done loading queue into scheduler (%d envelopes)", count)

    async def _corrupt(self, msgid: int, why: str) -> None:
        """Move a message whose envelope or body cannot be read to corrupt/ (whole
        directory), log it once, and make the scheduler forget its envelopes; the rest
        of the queue carries on.  ``smtpctl uncorrupt`` brings it back."""
        if msgid in self.corrupted:
            return            # already moved (or could not be) and logged
        self.corrupted.add(msgid)
        try:
            dest = self.spool.move_to_corrupt(msgid)
        except OSError as exc:
            # Left in place (retried at the next start); out of the scheduler meanwhile.
            log.error("warn: queue: corrupt message %08x (%s), and could not move it to "
                      "corrupt/: %s", msgid, why, exc)
            try:
                evpids = self.spool.envelope_ids(msgid)
            except OSError:
                evpids = []
        else:
            log.error("warn: queue: corrupt message %08x moved to %s: %s", msgid, dest, why)
            evpids = self.spool.corrupt_envelope_ids(dest, msgid)
        for evpid in evpids:
            await self.ctx.mesh.send("scheduler", QueueEnvelopeRemove(evpid=evpid))

    # -- messages --------------------------------------------------------------------------

    async def handle(self, peer: str, msg) -> None:
        send = self.ctx.mesh.send
        match msg:
            case SmtpMessageCreate(reqid=reqid, count=count):
                msgids = []
                try:
                    for _ in range(max(1, min(count, MAX_CREATE))):
                        msgid = self.spool.create_message(self.incoming)
                        self.incoming[msgid] = Incoming()
                        msgids.append(msgid)
                except (OSError, SpoolError) as exc:
                    log.error("warn: queue: cannot create message: %s", exc)
                if msgids:
                    await send(peer, SmtpMessageCreateReply(reqid=reqid, ok=True, msgid=msgids[0],
                                                            more=msgids[1:]))
                else:
                    await send(peer, SmtpMessageCreateReply(reqid=reqid, ok=False))
            case LkaEnvelopesSubmit(reqid=reqid, msgid=msgid, envelopes=envs):
                self._envelopes_submit(reqid, msgid, envs)
            case SmtpMessageData(msgid=msgid, chunk=chunk):
                self._append(msgid, chunk)
            case SmtpMessageCommit(reqid=reqid, msgid=msgid):
                self._commit(peer, reqid, msgid)
            case SmtpMessageRollback(msgid=msgid):
                self._rollback(msgid)
            case SchedOrders(orders=orders):
                for kind, evpid in orders:
                    await self._order(kind, evpid)
            case SchedEnvelopeDeliver(evpid=evpid):
                await self._order("deliver", evpid)
            case SchedEnvelopeTransfer(evpid=evpid):
                await self._order("transfer", evpid)
            case SchedEnvelopeRemove(evpid=evpid):
                await self._order("remove", evpid)
            case SchedEnvelopeExpire(evpid=evpid):
                await self._order("expire", evpid)
            case SchedEnvelopeWithdraw():
                await send("pony", msg)
            case SchedEnvelopeBounce(evpid=evpid, delay=delay):
                self._spawn(self._delay_notice(evpid, delay))
            case MessageOpen(reqid=reqid, msgid=msgid):
                try:
                    data = self.spool.read_message(msgid)   # small, page-cached: no thread hop
                    await send(peer, MessageContent(reqid=reqid, ok=True, data=data))
                except OSError as exc:
                    if self.spool.message_dir(msgid).is_dir():
                        # queued, but its body is missing or unreadable
                        await self._corrupt(msgid, f"message: {exc.strerror or exc}")
                    await send(peer, MessageContent(reqid=reqid, ok=False, error=str(exc)))
            case MdaMessageOpen(reqid=reqid, msgid=msgid):
                await self._open_for_delivery(peer, reqid, msgid)
            case DeliveryResult(status="hold", evpid=evpid, holdq=holdq):
                # nothing to write: no try is counted (docs/queue.md, hold queues)
                await send("scheduler", QueueHoldqHold(evpid=evpid, holdq=holdq))
            case DeliveryResult(status="ok", evpid=evpid) if not self._wants_success_notice(msg):
                # the common case, with nothing to await on disk: no task of its own
                self._delivered(evpid)
            case DeliveryResult():
                self._spawn(self._delivery_result(msg))
            case MtaHoldqRelease(holdq=holdq, n=n):
                await send("scheduler", QueueHoldqRelease(holdq=holdq, n=n))
            case SchedListReply():
                await self._describe(msg)
            case CtlRequest():
                await self._admin(peer, msg)
            case _:
                log.warning("warn: queue: unexpected %s from %s", type(msg).__name__, peer)

    def _delivered(self, evpid: int) -> None:
        """A delivery succeeded: the envelope goes, and the scheduler hears of every
        success of the remover's batch in one message, first."""
        self.delivered.append(evpid)
        self.remover.remove(evpid)

    def _report_delivered(self) -> None:
        """The remover's ``before``: the scheduler's message is queued before the
        batch's envelopes go."""
        evpids, self.delivered = self.delivered, []
        if evpids:
            self.ctx.mesh.send_nowait("scheduler", QueueDeliveredBatch(evpids=evpids))

    async def _order(self, kind: str, evpid: int) -> None:
        """One of the scheduler's orders (scheduler.c's IMSG_SCHED_ENVELOPE_*)."""
        if kind == "deliver" or kind == "transfer":
            await self._dispatch(evpid, kind == "transfer")
        elif kind == "remove":
            self._remove(evpid, "Remove", "Removed by administrator")
            await self.ctx.mesh.send("scheduler", QueueEnvelopeAck(evpid=evpid))
        elif kind == "expire":
            self._spawn(self._expire(evpid))
        else:
            log.warning("warn: queue: unknown order %r from the scheduler", kind)

    async def _open_for_delivery(self, peer: str, reqid: int, msgid: int) -> None:
        """A local delivery's body: the message opened read-only here (relative to the
        spool, chroot or not) and its descriptor sent to pony, which passes it on to the
        parent and the delivery worker (docs/delivery.md).  The queue reads nothing."""
        channel = self.delivery_fds
        if channel is None:
            await self.ctx.mesh.send(peer, MdaMessageOpened(reqid=reqid, ok=False, error="no descriptor channel"))
            return
        try:
            fd = await self._open_message(msgid)
        except OSError as exc:
            await self.ctx.mesh.send(peer, MdaMessageOpened(reqid=reqid, ok=False, error=str(exc)))
            return
        try:
            await fd_channel.send_fd(channel, reqid, fd)
        except (OSError, TimeoutError) as exc:
            await self.ctx.mesh.send(peer, MdaMessageOpened(reqid=reqid, ok=False, error=f"cannot pass the message: {exc}"))
            return
        finally:
            os.close(fd)
        await self.ctx.mesh.send(peer, MdaMessageOpened(reqid=reqid, ok=True))

    async def _open_message(self, msgid: int) -> int:
        """The message opened read-only for a local delivery; OSError if it cannot be,
        and then a queued message whose body is missing or unreadable goes to corrupt/."""
        try:
            return self.spool.open_message(msgid)
        except OSError as exc:
            if self.spool.message_dir(msgid).is_dir():
                await self._corrupt(msgid, f"message: {exc.strerror or exc}")
            raise

    def _envelopes_submit(self, reqid: int, msgid: int, envs) -> None:
        """One RCPT's envelopes written to incoming/; pony hears once, with their ids.
        A failure fails the whole message (its commit answers 451 or 452)."""
        inc = self.incoming.get(msgid)
        evpids = []
        if inc is not None and not inc.failed:
            for env in envs:
                try:
                    evpids.append(self.spool.write_incoming_envelope(msgid, env))
                except (OSError, SpoolError) as exc:
                    inc.failed = str(exc)
                    inc.disk_full = isinstance(exc, OSError) and is_disk_full(exc)
                    log.error("warn: queue: cannot write envelope of %08x: %s", msgid, exc)
                    break
                inc.entries.append(self.entry_of(env))
        ok = inc is not None and not inc.failed
        self.ctx.mesh.send_nowait("pony", QueueEnvelopeCommitReply(
            reqid=reqid, ok=ok, evpids=evpids if ok else [],
            disk_full=inc is not None and inc.disk_full))

    def _append(self, msgid: int, chunk: bytes) -> None:
        inc = self.incoming.get(msgid)
        if inc is None or inc.failed:
            return
        try:
            if inc.body is None:
                inc.body = self.spool.open_body(msgid)
            inc.body.write(chunk)
        except OSError as exc:
            inc.failed = str(exc)
            inc.disk_full = is_disk_full(exc)
            log.error("warn: queue: cannot write message %08x: %s", msgid, exc)

    def _commit(self, peer: str, reqid: int, msgid: int) -> None:
        """End of DATA: the message goes to the committer (group commit); _committed
        answers once its batch is durable."""
        inc = self.incoming.pop(msgid, None)
        error = "unknown message" if inc is None else inc.failed or ("no envelope" if not inc.entries else "")
        disk_full = inc is not None and inc.disk_full
        if not error:
            try:
                if inc.body is None:
                    inc.body = self.spool.open_body(msgid)
            except OSError as exc:
                error, disk_full = exc.strerror or str(exc), is_disk_full(exc)
        if error:
            self._spawn(self._commit_failed(Committing(peer, reqid, msgid, inc), error, disk_full))
            return
        self.committing.add(msgid)
        self.committer.commit(Committing(peer, reqid, msgid, inc), msgid, inc.body)

    def _committed(self, batch: list[tuple[Committing, BaseException | None]]) -> None:
        """A group commit is over (called by the committer, on the event loop)."""
        done = []
        for item, failure in batch:
            self.committing.discard(item.msgid)
            if failure is None:
                done.append(item)
            else:
                self._spawn(self._commit_failed(
                    item, getattr(failure, "strerror", None) or str(failure),
                    isinstance(failure, OSError) and is_disk_full(failure)))
        if done:
            self._announce(done)

    def _announce(self, done: list[Committing]) -> None:
        """Durable messages: the scheduler learns of the whole batch in one message
        (before any client is answered), then each client gets its 250.  They leave
        now rather than at the end of this turn of the loop (a turn that may go on
        with other work): each message waits for its reply."""
        mesh = self.ctx.mesh
        mesh.send_nowait("scheduler", QueueCommitBatch(entries=[e for item in done for e in item.inc.entries]))
        mesh.send_pending("scheduler")
        peers = set()
        for item in done:
            mesh.send_nowait(item.peer, SmtpMessageCommitReply(reqid=item.reqid, ok=True))
            peers.add(item.peer)
        for peer in peers:
            mesh.send_pending(peer)

    async def _commit_failed(self, item: Committing, error: str, disk_full: bool) -> None:
        inc = item.inc
        log.error("warn: queue: commit of %08x failed: %s", item.msgid, error)
        if inc is not None and inc.body is not None and not inc.body.closed:
            close_quietly(inc.body)
        await asyncio.to_thread(self.spool.rollback, item.msgid)
        await self.ctx.mesh.send(item.peer, SmtpMessageCommitReply(
            reqid=item.reqid, ok=False, code=452 if disk_full else 451,
            text="4.3.1 Insufficient system storage" if disk_full else "4.3.0 Temporary failure"))

    def _rollback(self, msgid: int) -> None:
        if msgid in self.committing:
            # pony gave up waiting (timeout): the commit finishes or fails on its own;
            # removing its files under the committer would leave a partial message.
            return
        inc = self.incoming.pop(msgid, None)
        if inc is not None and inc.body is not None:
            close_quietly(inc.body)
        self.spool.rollback(msgid)

    # -- delivery ----------------------------------------------------------------------------

    async def _dispatch(self, evpid: int, transfer: bool) -> None:
        try:
            env = self.spool.load_envelope(evpid)
        except (OSError, EnvelopeError) as exc:
            if not isinstance(exc, FileNotFoundError):
                await self._corrupt(evpid >> 32, f"envelope {evpid:016x}: {exc}")
            elif evpid >> 32 not in self.corrupted:
                log.error("warn: queue: envelope %016x vanished from the spool", evpid)
                await self.ctx.mesh.send("scheduler", QueueDeliveryPermfail(evpid=evpid))
            return
        if env.type == "bounce":
            self.bouncer.add(env)
            return
        env.last_try = int(time.time())
        if transfer:
            order = QueueTransfer(envelope=env)
        else:
            key = await self._push_message(env) if env.type == "mda" else 0
            order = QueueDeliver(envelope=env, fd_key=key)
        await self.ctx.mesh.send("pony", order)

    async def _push_message(self, env) -> int:
        """A local delivery's message, opened and sent to pony ahead of its order (no
        MdaMessageOpen round trip, issue 12): the key it went under, or 0 if it could
        not go (pony then asks for it, and meets the same failure, as before).  Never
        waits for a full channel: the order goes without it (docs/delivery.md)."""
        channel = self.delivery_fds
        if channel is None:
            return 0
        try:
            fd = await self._open_message(env.msgid)
        except OSError:
            return 0
        key = fd_channel.pushed_key(self.ctx.new_id())
        try:
            fd_channel.send_fd_now(channel, key, fd)
        except OSError as exc:
            if not isinstance(exc, BlockingIOError):
                log.warning("warn: queue: cannot pass message %08x to pony: %s", env.msgid, exc)
            return 0
        finally:
            os.close(fd)
        return key

    @staticmethod
    def _wants_success_notice(res: DeliveryResult) -> bool:
        """A DSN success notice is due (NOTIFY=SUCCESS), unless the relay's own server
        promised to send it."""
        return bool(res.dsn_notify & DSN_SUCCESS) and not (res.agent == "mta" and res.remote_dsn)

    async def _delivery_result(self, res: DeliveryResult) -> None:
        send = self.ctx.mesh.send
        # Removal needs no fsync (a crash at worst redelivers): the remover does it,
        # in a batch, after the scheduler has been told.
        if res.status == "ok":
            if self._wants_success_notice(res):
                env = self._load_quiet(res.evpid)
                if env is not None:
                    kind = bounce.RELAYED if res.agent == "mta" else bounce.DELIVERED
                    # mda's "Delivered" says nothing the Action does not; a relay's reply does
                    await self.bouncer.create(env, kind, esc_class=2, esc_code=0,
                                              errorline=res.errorline if res.agent == "mta" else "")
            self.remover.remove(res.evpid)
            await send("scheduler", QueueDeliveryOk(evpid=res.evpid))
            return
        if res.status in ("permfail", "loop"):
            env = self._load_quiet(res.evpid)
            if env is not None:
                if res.status == "loop":      # as OpenSMTPD: class 4, code 46, "Loop detected"
                    errorline, esc_class, esc_code = "Loop detected", 4, 46
                else:
                    errorline, esc_class, esc_code = res.errorline, 5, res.esc_code
                await self.bouncer.create(env, bounce.FAILED, errorline=errorline,
                                          esc_class=esc_class, esc_code=esc_code)
            self.remover.remove(res.evpid)
            reply = QueueDeliveryLoop if res.status == "loop" else QueueDeliveryPermfail
            await send("scheduler", reply(evpid=res.evpid))
            return
        try:
            env = self.spool.load_envelope(res.evpid)
            env.retry += 1
            env.last_try = int(time.time())
            env.errorline = res.errorline[:1000]
            env.esc_class = 4
            env.esc_code = res.esc_code
            await asyncio.to_thread(self.spool.update_envelope, env)
            await send("scheduler", QueueDeliveryTempfail(entry=self.entry_of(env)))
        except (OSError, EnvelopeError) as exc:
            if isinstance(exc, FileNotFoundError) and res.evpid >> 32 in self.corrupted:
                return        # moved to corrupt/ while in flight: the scheduler forgot it
            log.error("warn: queue: cannot update envelope %016x: %s", res.evpid, exc)
            await send("scheduler", QueueDeliveryPermfail(evpid=res.evpid))

    def _load_quiet(self, evpid: int):
        """The envelope on disk, or None (logged) when it cannot be read."""
        try:
            return self.spool.load_envelope(evpid)
        except (OSError, EnvelopeError) as exc:
            log.error("warn: queue: cannot load envelope %016x: %s", evpid, exc)
            return None

    async def _expire(self, evpid: int) -> None:
        """Expired: a failed bounce ("Envelope expired", 5.4.7), then the envelope goes."""
        env = self._load_quiet(evpid)
        if env is not None:
            await self.bouncer.create(env, bounce.FAILED, errorline="Envelope expired",
                                      esc_class=5, esc_code=47)
        self._remove(evpid, "Expire", "Envelope expired")

    async def _delay_notice(self, evpid: int, delay: int) -> None:
        """A delay notice is due: a delayed bounce envelope, and last-bounce recorded on
        the original (fsync'd) so that this interval is not notified again."""
        env = self._load_quiet(evpid)
        if env is None or env.type == "bounce":
            return
        await self.bouncer.create(env, bounce.DELAYED, errorline=env.errorline, esc_class=4,
                                  esc_code=env.esc_code, delay=delay)
        env.last_bounce = env.ctime + delay
        try:
            await asyncio.to_thread(self.spool.update_envelope, env)
        except (OSError, EnvelopeError) as exc:
            log.error("warn: queue: cannot update envelope %016x: %s", evpid, exc)

    def _remove(self, evpid: int, event: str, stat: str) -> None:
        try:
            env = self.spool.load_envelope(evpid)
            delay = duration_to_text(int(time.time()) - env.ctime)
            log.info("%s: %s for %016x: from=<%s>, to=<%s>, rcpt=<%s>, delay=%s, stat=%s",
                     "relay" if env.type == "mta" else "delivery", event, evpid, env.sender,
                     env.dest, env.rcpt or "-", delay, log_text(stat, COMMAND))
        except (OSError, EnvelopeError):
            pass
        self.remover.remove(evpid)

    # -- smtpctl show queue ------------------------------------------------------------------

    async def _describe(self, batch: SchedListReply) -> None:
        entries = []
        for entry in batch.entries:
            try:
                entry.envelope = self.spool.listed_envelope(entry.evpid)
                entry.expire = self.expire_of(entry.envelope)
            except (OSError, EnvelopeError):
                continue
            entries.append(entry)
        await self.ctx.mesh.send("control", CtlListReply(reqid=batch.reqid, entries=entries,
                                                         more=batch.more, last=batch.last))

    # -- admin commands (smtpctl show envelope/message, discover, uncorrupt) ----------------

    async def _admin(self, peer: str, req: CtlRequest) -> None:
        cmd, ident = req.command, req.id
        if cmd in ("show envelope", "show message"):
            reply = await self._show_file(req.reqid, cmd, ident)
        elif cmd == "discover":
            reply = await self._discover(req.reqid, ident)
        elif cmd == "uncorrupt":
            reply = await self._uncorrupt(req.reqid, ident)
        else:
            reply = CtlReply(reqid=req.reqid, ok=False, text=f"unknown command {cmd}")
        await self.ctx.mesh.send(peer, reply)

    async def _show_file(self, reqid: int, cmd: str, ident: int) -> CtlContentReply:
        """The file as it is on disk: an envelope (evpid), or the message of a msgid/evpid."""
        try:
            if cmd == "show envelope":
                if ident <= MSGID_MAX:
                    return CtlContentReply(reqid=reqid, ok=False, error="not an envelope id")
                data = self.spool.read_envelope_file(ident)
            else:
                msgid = ident if ident <= MSGID_MAX else ident >> 32
                data = await asyncio.to_thread(self.spool.read_message, msgid)
        except OSError as exc:
            return CtlContentReply(reqid=reqid, ok=False, error=exc.strerror or str(exc))
        return CtlContentReply(reqid=reqid, ok=True, data=data)

    async def _discover(self, reqid: int, ident: int) -> CtlReply:
        """Envelopes put into queue/ by hand (one evpid, or every envelope of a msgid) go
        to the scheduler, which ignores those it already knows.  The count is of envelopes
        loaded, as OpenSMTPD's; a message that cannot be read goes to corrupt/."""
        msgid = ident if ident <= MSGID_MAX else ident >> 32
        self.remover.run()      # envelopes already removed are not found again
        try:
            evpids = self.spool.envelope_ids(msgid) if ident <= MSGID_MAX else [ident]
        except FileNotFoundError:
            log.warning("warn: queue: discover: no message %08x in the queue", msgid)
            return CtlReply(reqid=reqid, ok=True, count=0)
        except OSError as exc:
            return CtlReply(reqid=reqid, ok=False, text=f"cannot read message {msgid:08x}: {exc}")
        envs = []
        for evpid in evpids:
            try:
                envs.append(self.spool.load_envelope(evpid))
            except FileNotFoundError:
                log.warning("warn: queue: discover: failed to load envelope %016x", evpid)
            except (OSError, EnvelopeError) as exc:
                return await self._discovered_corrupt(reqid, msgid, f"envelope {evpid:016x}: {exc}")
        if envs:
            try:
                with open(self.spool.message_dir(msgid) / "message", "rb"):
                    pass
            except OSError as exc:
                return await self._discovered_corrupt(reqid, msgid, f"message: {exc.strerror or exc}")
        send = self.ctx.mesh.send
        for env in envs:
            await send("scheduler", QueueEnvelopeSubmit(entry=self.entry_of(env)))
        if envs:
            self.corrupted.discard(msgid)   # back in the queue (by hand or uncorrupt)
            await send("scheduler", QueueMessageCommit(msgid=msgid))
            log.info("queue: discovered %d envelope%s of message %08x", len(envs),
                     "" if len(envs) == 1 else "s", msgid)
        return CtlReply(reqid=reqid, ok=True, count=len(envs))

    async def _discovered_corrupt(self, reqid: int, msgid: int, why: str) -> CtlReply:
        self.corrupted.discard(msgid)       # put back by the admin: a new finding
        await self._corrupt(msgid, why)
        return CtlReply(reqid=reqid, ok=False,
                        text=f"message {msgid:08x} is corrupt, moved to corrupt/: {why}")

    async def _uncorrupt(self, reqid: int, msgid: int) -> CtlReply:
        """corrupt/<msgid> back into queue/ (after the admin fixed it), then discovered."""
        if not 0 < msgid <= MSGID_MAX:
            return CtlReply(reqid=reqid, ok=False, text="not a message id")
        self.remover.run()
        try:
            self.spool.uncorrupt(msgid)
        except SpoolError as exc:
            return CtlReply(reqid=reqid, ok=False, text=str(exc))
        except OSError as exc:
            return CtlReply(reqid=reqid, ok=False,
                            text=f"cannot move message {msgid:08x} back: {exc.strerror or exc}")
        self.corrupted.discard(msgid)
        log.info("queue: message %08x moved back from corrupt/ to the queue", msgid)
        return await self._discover(reqid, msgid)
