"""pony's delivery workers: the sockets of the processes that deliver as each user
(a pysmtpd design; OpenSMTPD's parent forks one mda child per delivery and pony
streams the message into its pipe, mda.c and smtpd.c forkmda).

pony keeps a pool per user (uid, gid).  A new worker costs one request to the
parent: pony makes an AF_UNIX seqpacket pair, sends one end over the pony -> parent
descriptor channel, and the parent forks a worker that serves it as the user
(smtpd/local_delivery.py).  From then on pony sends each request, with the message's
descriptor, straight to the worker and reads its answer on the same socket: the
parent is not on the path of a message (issue 12: relaying each one through the
parent cost it about 0.3 ms of CPU per Maildir message; docs/delivery.md).

A worker serves one user only, for at most MAX_DELIVERIES messages, and is sent
away (its socket closed) once idle for IDLE_SECONDS: bursts to one mailbox cost one
fork, not one each.  Up to WORKERS_PER_USER run side by side for one user, so one
slow disk write does not hold the others, and at most MAX_WORKERS for every user
together (the idle one used longest ago makes room).  Only pony decides when a
worker ends, by closing its socket; a worker past its deadline is killed by the
parent at pony's request (MdaWorkerKill).

``spawner`` is what stands between the pool and the parent: in pony the requests
to the parent (smtpd/mda.py), in the unit tests the parent's own
local_delivery.WorkerProcesses, called in process.
"""
from __future__ import annotations

import asyncio
import socket
from typing import Protocol

import msgspec

from smtpd.local_delivery import MAX_FRAME, Reply, Request

DELIVERY_TIMEOUT = 330         # the mda's own limit is 300 s (delivery_mda.TIMEOUT)
IDLE_SECONDS = 2.0
MAX_DELIVERIES = 100
WORKERS_PER_USER = 4
# Above the deliveries pony runs at once (mda.MAX_SESSIONS, 50), so that at this
# bound an idle worker is always there to make room; below the parent's own bound.
MAX_WORKERS = 64


class Spawner(Protocol):
    async def spawn(self, uid: int, gid: int, sock: socket.socket) -> tuple[str, str, int]: ...
    async def kill(self, pid: int) -> None: ...
    async def exit_text(self, pid: int) -> str: ...


class _WorkerGone(Exception):
    pass


class _PoolClosed(Exception):
    pass


class _Worker:
    """pony's end of one worker.  Its socket stays registered with the loop for the
    worker's life, and a reply completes the one request in flight: no reader added
    and removed, no task or timeout context per message."""

    def __init__(self, key: tuple[int, int], spawner: Spawner) -> None:
        self.key = key
        self.spawner = spawner
        self.sock: socket.socket | None = None
        self.pid = 0                    # 0 until the parent has forked it
        self.served = 0
        self.busy = False
        self.idle_timer: asyncio.TimerHandle | None = None
        self.closed = False
        self.loop = asyncio.get_running_loop()
        self.waiter: asyncio.Future | None = None

    async def start(self) -> tuple[str, str]:
        """Have the parent fork the worker; (status, error)."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            status, error, pid = await self.spawner.spawn(self.key[0], self.key[1], theirs)
        except BaseException:
            mine.close()
            self.closed = True
            raise
        finally:
            theirs.close()              # the worker has its own copy now
        if status != "ok" or self.closed:
            mine.close()
            self.closed = True
            return (status, error) if status != "ok" else ("tempfail", "delivery pool closed")
        mine.setblocking(False)
        self.sock, self.pid = mine, pid
        self.loop.add_reader(mine.fileno(), self._readable)
        return "ok", ""

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
            self.closed = True
        elif waiter is not None and not waiter.done():
            waiter.set_result(reply)
        # else: a reply nobody asked for (after a timeout): dropped with the worker

    def _unregister(self) -> None:
        if self.sock is not None and self.sock.fileno() != -1:       # -1 once closed
            self.loop.remove_reader(self.sock.fileno())

    async def deliver(self, req: Request, fd: int) -> tuple[str, str]:
        data = msgspec.msgpack.encode(req)
        if len(data) > MAX_FRAME:
            return "permfail", "delivery request too large"
        self.waiter = waiter = self.loop.create_future()
        expiry = self.loop.call_later(DELIVERY_TIMEOUT, _expire, waiter)
        try:
            await self._send(data, fd)
            reply = await waiter
        except TimeoutError:
            await self.kill()
            return "tempfail", "terminated; timeout"
        except _WorkerGone:
            self.close()
            return "tempfail", await self.spawner.exit_text(self.pid)
        except _PoolClosed:
            return "tempfail", "delivery interrupted: pony is stopping"
        finally:
            expiry.cancel()
            self.waiter = None
        self.served += 1
        try:
            answer = msgspec.msgpack.decode(reply, type=Reply)
        except msgspec.DecodeError:
            await self.kill()
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
        """Send the worker away: it exits when it reads the end of its socket (the
        parent reaps it)."""
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(_PoolClosed())   # pony is stopping
        if self.sock is not None:
            self._unregister()
            self.sock.close()

    async def kill(self) -> None:
        self.close()
        if self.pid:
            await self.spawner.kill(self.pid)


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


class DeliveryPool:
    def __init__(self, spawner: Spawner) -> None:
        self.spawner = spawner
        self.workers: dict[tuple[int, int], list[_Worker]] = {}
        self.freed: dict[tuple[int, int], asyncio.Condition] = {}
        self.waiting: dict[tuple[int, int], int] = {}

    async def run(self, req: Request, uid: int, gid: int, fd: int) -> tuple[str, str]:
        """Deliver the message open on ``fd`` (the caller's: it stays open) as (uid,
        gid); returns (status, error) with status "ok" | "tempfail" | "permfail"."""
        key = (uid, gid)
        worker = await self._acquire(key)
        try:
            if not worker.pid:
                status, error = await worker.start()
                if status != "ok":
                    return status, error
            return await worker.deliver(req, fd)
        finally:
            await self._release(key, worker)

    def _idle_worker(self, key: tuple[int, int]) -> _Worker | None:
        pool = self.workers.setdefault(key, [])
        for worker in pool:
            if not worker.busy and not worker.closed:
                return worker
        if len(pool) < WORKERS_PER_USER:
            if sum(map(len, self.workers.values())) >= MAX_WORKERS:
                self._make_room()
            worker = _Worker(key, self.spawner)         # started by run(), outside any lock
            pool.append(worker)
            return worker
        return None

    def _make_room(self) -> None:
        """Send away the idle worker (of any user) whose idle timer ends first."""
        idle = [w for pool in self.workers.values() for w in pool if not w.busy and w.idle_timer]
        if idle:
            oldest = min(idle, key=lambda w: w.idle_timer.when())
            self._drop(oldest.key, oldest)

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
        """Every worker sent away; a busy one ends when its delivery does (the parent
        kills what is left when it stops)."""
        for pool in self.workers.values():
            for worker in pool:
                worker.close()
        self.workers.clear()
