"""Local delivery as the target user, run by the parent (the only process that
can change uid); mirrors the mda part of OpenSMTPD's smtpd.c (forkmda).

The parent forks a delivery worker per user (uid, gid): the worker gives up every
privilege at once (no-new-privs, an empty capability bounding set, then the user's
ids) and then delivers the messages it is handed over an AF_UNIX seqpacket pair,
one at a time, answering each with a status.  Each request carries the message as
a descriptor the queue opened (SCM_RIGHTS; docs/delivery.md): the worker reads it,
the parent never does.  The methods are modules of their own: smtpd/maildir.py,
delivery_mbox.py (mbox and /file), delivery_mda.py (mda, wrapper, |command),
delivery_lmtp.py.  A worker serves one user only, for at most MAX_DELIVERIES
messages, and is sent away (its socket closed) once idle for IDLE_SECONDS: bursts
to one mailbox cost one fork, not one each.  Up to WORKERS_PER_USER run side by
side for one user, so one slow disk write does not hold the others.

A worker only runs plain Python file code (and, for an mda, fork+exec through
subprocess) and leaves with ``os._exit``: it never touches the parent's ZeroMQ
context or event loop, which makes the fork safe.  Only the parent decides when a
worker ends (by closing its socket), so a request can never race with a worker
that is leaving.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket

import msgspec

from common import privsep
from common.messages import MdaDeliver
from smtpd import delivery_lmtp, delivery_mbox, delivery_mda
from smtpd.delivery_body import MessageBody
from smtpd.maildir import MaildirError, deliver_maildir

log = logging.getLogger("smtpd")

EX_OK = 0
EX_TEMPFAIL = 75
DELIVERY_TIMEOUT = 330         # the mda's own limit is 300 s (delivery_mda.TIMEOUT)
IDLE_SECONDS = 2.0
MAX_DELIVERIES = 100
WORKERS_PER_USER = 4
MAX_FRAME = 1 << 16            # one request or reply per datagram: no body in it


class _Request(msgspec.Struct, array_like=True):
    method: str
    target: str
    junk: bool
    prefix: bytes
    sender: str
    rcpt: str
    dest: str
    username: str
    home: str
    subaddress: str
    lmtp_rcpt: str


class _Reply(msgspec.Struct, array_like=True):
    status: str          # "ok" | "tempfail" | "permfail"
    error: str


# -- the worker (forked child, runs as the user) -------------------------------------------

def _deliver_one(req: _Request, fd: int) -> _Reply:
    try:
        body = MessageBody(req.prefix, fd)
        if req.method == "maildir":
            deliver_maildir(req.target, body, junk=req.junk)
            return _Reply("ok", "")
        if req.method in ("mbox", "file"):
            delivery_mbox.append_mbox(req.target, body, req.sender, dotlock=req.method == "mbox")
            return _Reply("ok", "")
        if req.method == "mda":
            env = delivery_mda.environment(home=req.home, username=req.username, sender=req.sender,
                                           rcpt=req.rcpt, dest=req.dest, subaddress=req.subaddress)
            status, error = delivery_mda.run(req.target, body, env, req.home)
            return _Reply(status, error[:1000])
        if req.method == "lmtp":
            status, error = delivery_lmtp.deliver(req.target, body, req.sender, req.lmtp_rcpt or req.dest)
            return _Reply(status, error[:1000])
        return _Reply("permfail", f"delivery method {req.method} not supported")
    except MaildirError as exc:
        return _Reply("tempfail" if exc.temporary else "permfail", str(exc.text)[:1000])
    except delivery_mbox.DeliveryFailure as exc:
        return _Reply("tempfail" if exc.temporary else "permfail", exc.text[:1000])
    except Exception as exc:  # anything else is a temporary failure, reported
        return _Reply("tempfail", f"{type(exc).__name__}: {exc}"[:1000])
    finally:
        os.close(fd)


def _drop_to(uid: int, gid: int) -> None:
    """No-new-privs and an empty bounding set (while still root: CAP_SETPCAP), then the
    user's ids: nothing the worker runs (an mda) can gain a privilege back."""
    privsep.restrict()
    if privsep.privileged():
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        if os.getuid() != uid or os.geteuid() != uid or os.getgroups():
            raise privsep.PrivsepError("delivery worker: privilege drop failed")


def _worker(uid: int, gid: int, parent_pid: int, sock: socket.socket) -> int:
    # What was inherited stays untouched: a collection would write to (and so copy)
    # the parent's pages.  What the worker makes, a few objects per message, is freed
    # by reference counting, and it lives for at most MAX_DELIVERIES messages.
    gc.disable()
    gc.freeze()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)       # a pipe to an mda that left: EPIPE
    # Nothing of the parent's (listeners, channels, pidfds) stays open in a
    # process that will run as a mail user.
    keep = sock.fileno()
    os.closerange(3, keep)
    os.closerange(keep + 1, 65536)
    _drop_to(uid, gid)
    privsep.die_with_parent(parent_pid)
    decode, encode = msgspec.msgpack.Decoder(_Request).decode, msgspec.msgpack.Encoder().encode
    while True:
        data, fds, _flags, _addr = socket.recv_fds(sock, MAX_FRAME, 1)
        if not data:
            for fd in fds:
                os.close(fd)
            return EX_OK                               # sent away by the parent
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            reply = _Reply("tempfail", "request without its message")
        else:
            reply = _deliver_one(decode(data), fds[0])
        sock.sendall(encode(reply))


# -- the parent's side ------------------------------------------------------------------

class _Worker:
    """The parent's end of one worker.  Its socket stays registered with the loop for
    the worker's life, and a reply completes the one request in flight: no reader
    added and removed, no task or timeout context per message (the parent's CPU per
    local delivery, docs/architecture.md "Memory")."""

    def __init__(self, key: tuple[int, int]) -> None:
        self.key = key
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        parent_pid = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = EX_TEMPFAIL
            try:
                mine.close()
                code = _worker(key[0], key[1], parent_pid, theirs)
            finally:
                os._exit(code)
        theirs.close()
        mine.setblocking(False)
        self.sock = mine
        self.pid = pid
        self.served = 0
        self.busy = False
        self.idle_timer: asyncio.TimerHandle | None = None
        self.closed = False
        self.loop = asyncio.get_running_loop()
        self.waiter: asyncio.Future | None = None
        self.loop.add_reader(mine.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            reply = self.sock.recv(MAX_FRAME)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            reply = b""
        waiter, self.waiter = self.waiter, None
        if not reply:                                   # the worker is gone
            self._unregister()
            if waiter is not None and not waiter.done():
                waiter.set_exception(_WorkerGone())
        elif waiter is not None and not waiter.done():
            waiter.set_result(reply)
        # else: a reply nobody asked for (after a timeout): dropped with the worker

    def _unregister(self) -> None:
        if self.sock.fileno() != -1:                  # -1 once closed
            self.loop.remove_reader(self.sock.fileno())

    async def deliver(self, req: _Request, fd: int) -> tuple[str, str]:
        data = msgspec.msgpack.encode(req)
        if len(data) > MAX_FRAME:
            return "permfail", "delivery request too large"
        self.waiter = waiter = self.loop.create_future()
        expiry = self.loop.call_later(DELIVERY_TIMEOUT, _expire, waiter)
        try:
            await self._send(data, fd)
            reply = await waiter
        except TimeoutError:
            self.kill()
            return "tempfail", "terminated; timeout"
        except _WorkerGone:
            return "tempfail", self.reap()
        finally:
            expiry.cancel()
            self.waiter = None
        self.served += 1
        try:
            answer = msgspec.msgpack.decode(reply, type=_Reply)
        except msgspec.DecodeError:
            self.kill()
            return "tempfail", "unreadable answer from the delivery process"
        return answer.status, answer.error

    async def _send(self, frame: bytes, fd: int) -> None:
        while True:
            try:
                socket.send_fds(self.sock, [frame], [fd])
                return
            except BlockingIOError:                     # one request at a time: hardly ever
                await _writable(self.loop, self.sock.fileno(), self.waiter)
            except OSError:
                raise _WorkerGone from None

    def close(self) -> None:
        """Send the worker away: it exits when it reads the end of its pipe."""
        if self.closed:
            return
        self.closed = True
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        self._unregister()
        self.sock.close()
        _reap_later(self.pid)

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.close()

    def reap(self) -> str:
        """Why a worker that vanished mid-delivery ended."""
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            status = 0
        self.closed = True
        self._unregister()
        self.sock.close()
        if os.WIFSIGNALED(status):
            return f"terminated; signal {os.WTERMSIG(status)}"
        return f"delivery process exited with status {os.WEXITSTATUS(status)}"


class _WorkerGone(Exception):
    pass


def _expire(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


async def _writable(loop, fd: int, waiter: asyncio.Future | None) -> None:
    """Until ``fd`` can be written to, or ``waiter`` (the request's) ends first."""
    fut = loop.create_future()
    loop.add_writer(fd, lambda: fut.done() or fut.set_result(None))
    try:
        if waiter is None:
            await fut
        else:
            await asyncio.wait({fut, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if waiter.done():
                waiter.result()                         # raises the timeout or the worker's end
    finally:
        loop.remove_writer(fd)


def _reap_later(pid: int) -> None:
    """Collect an exiting worker without blocking the loop (bounded: 10 s, then kill)."""
    loop = asyncio.get_running_loop()

    def check(tries: int) -> None:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        if tries >= 100:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        loop.call_later(0.1, check, tries + 1)

    loop.call_later(0.01, check, 0)


class DeliveryPool:
    def __init__(self) -> None:
        self.workers: dict[tuple[int, int], list[_Worker]] = {}
        self.freed: dict[tuple[int, int], asyncio.Condition] = {}
        self.waiting: dict[tuple[int, int], int] = {}

    async def run(self, msg: MdaDeliver, fd: int, mbox_spool: str) -> tuple[str, str]:
        """Deliver the message open on ``fd`` (closed here); returns (status, error)
        with status "ok" | "tempfail" | "permfail"."""
        try:
            if privsep.privileged() and msg.uid == 0:
                return "permfail", "MDA not allowed to deliver to root"
            target = msg.target
            if msg.method == "mbox":
                # the parent makes the path (pony never names a file root creates)
                try:
                    delivery_mbox.prepare_mailbox(mbox_spool, msg.username, msg.uid, msg.gid)
                except delivery_mbox.DeliveryFailure as exc:
                    return ("tempfail" if exc.temporary else "permfail"), exc.text
                target = os.path.join(mbox_spool, msg.username)
            key = (msg.uid, msg.gid)
            worker = await self._acquire(key)
            try:
                return await worker.deliver(_Request(
                    msg.method, target, msg.junk, msg.prefix, msg.sender, msg.rcpt, msg.dest,
                    msg.username, msg.home, msg.subaddress, msg.lmtp_rcpt), fd)
            finally:
                await self._release(key, worker)
        finally:
            os.close(fd)

    def _idle_worker(self, key: tuple[int, int]) -> _Worker | None:
        pool = self.workers.setdefault(key, [])
        for worker in pool:
            if not worker.busy and not worker.closed:
                return worker
        if len(pool) < WORKERS_PER_USER:
            worker = _Worker(key)
            pool.append(worker)
            return worker
        return None

    async def _acquire(self, key: tuple[int, int]) -> _Worker:
        # The condition (a lock and a queue of waiters) only when others already wait:
        # they come first, in order.
        worker = self._idle_worker(key) if not self.waiting.get(key) else None
        if worker is None:
            cond = self.freed.setdefault(key, asyncio.Condition())
            self.waiting[key] = self.waiting.get(key, 0) + 1
            try:
                async with cond:
                    while (worker := self._idle_worker(key)) is None:
                        await cond.wait()
            finally:
                self.waiting[key] -= 1
                if not self.waiting[key]:
                    # the last waiter of this user: no condition kept per user ever seen
                    # (a release tests `waiting` before it takes the condition)
                    del self.waiting[key]
                    self.freed.pop(key, None)
        worker.busy = True
        if worker.idle_timer is not None:
            worker.idle_timer.cancel()
            worker.idle_timer = None
        return worker

    async def _release(self, key: tuple[int, int], worker: _Worker) -> None:
        worker.busy = False
        if worker.closed or worker.served >= MAX_DELIVERIES:
            self._drop(key, worker)
        else:
            worker.idle_timer = asyncio.get_running_loop().call_later(
                IDLE_SECONDS, self._drop, key, worker)
        if self.waiting.get(key):
            cond = self.freed[key]
            async with cond:
                cond.notify()

    def _drop(self, key: tuple[int, int], worker: _Worker) -> None:
        if worker.busy:
            return
        worker.close()
        pool = self.workers.get(key, [])
        if worker in pool:
            pool.remove(worker)
        if not pool:
            self.workers.pop(key, None)

    def close(self) -> None:
        for pool in self.workers.values():
            for worker in pool:
                worker.kill() if worker.busy else worker.close()
        self.workers.clear()
