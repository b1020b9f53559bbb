"""Local delivery as the target user, run by the parent (the only process that
can change uid).

The parent forks a delivery worker per user (uid, gid): the worker drops to that
user at once and then writes the Maildir messages it is handed over a pipe, one at
a time, answering each with a status.  A worker serves one user only, for at most
MAX_DELIVERIES messages, and is sent away (its request pipe closed) once idle for
IDLE_SECONDS: bursts to one mailbox cost one fork, not one each.  Up to
WORKERS_PER_USER run side by side for one user, so one slow disk write does not
hold the others.

A worker only runs plain Python file code and leaves with ``os._exit``: it never
touches the parent's ZeroMQ context or event loop, which makes the fork safe.
Only the parent decides when a worker ends (by closing its pipe), so a request can
never race with a worker that is leaving.
"""
from __future__ import annotations

import asyncio
import logging
import os
import select
import signal
import struct

import msgspec

from common import privsep
from common.messages import MdaFork
from smtpd.maildir import MaildirError, deliver_maildir

log = logging.getLogger("smtpd")

EX_OK = 0
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_PERMFAIL = 65
DELIVERY_TIMEOUT = 300
IDLE_SECONDS = 2.0
MAX_DELIVERIES = 100
WORKERS_PER_USER = 4
_LEN = struct.Struct("!I")


class _Request(msgspec.Struct, array_like=True):
    method: str
    path: str
    junk: bool
    message: bytes


class _Reply(msgspec.Struct, array_like=True):
    code: int
    error: str


# -- the worker (forked child, runs as the user) -------------------------------------------

def _read_exact(fd: int, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _deliver_one(req: _Request) -> _Reply:
    if req.method != "maildir":
        return _Reply(EX_PERMFAIL, f"delivery method {req.method} not supported")
    try:
        deliver_maildir(req.path, req.message, junk=req.junk)
        return _Reply(EX_OK, "")
    except MaildirError as exc:
        return _Reply(EX_TEMPFAIL if exc.temporary else EX_PERMFAIL, str(exc.text)[:1000])
    except Exception as exc:  # anything else is a temporary failure, reported
        return _Reply(EX_TEMPFAIL, f"{type(exc).__name__}: {exc}"[:1000])


def _worker(uid: int, gid: int, parent_pid: int, rfd: int, wfd: int) -> int:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Nothing of the parent's (listeners, channels, pidfds) stays open in a
    # process that will run as a mail user.
    low, high = sorted((rfd, wfd))
    os.closerange(3, low)
    os.closerange(low + 1, high)
    os.closerange(high + 1, 65536)
    if privsep.privileged():
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    privsep.die_with_parent(parent_pid)
    decode, encode = msgspec.msgpack.Decoder(_Request).decode, msgspec.msgpack.Encoder().encode
    while True:
        head = _read_exact(rfd, _LEN.size)
        if head is None:
            return EX_OK                               # sent away by the parent
        body = _read_exact(rfd, _LEN.unpack(head)[0])
        if body is None:
            return EX_TEMPFAIL
        reply = encode(_deliver_one(decode(body)))
        _write_all(wfd, _LEN.pack(len(reply)) + reply)


# -- the parent's side ------------------------------------------------------------------

class _Worker:
    def __init__(self, key: tuple[int, int]) -> None:
        self.key = key
        req_r, self.req_w = os.pipe()
        self.rep_r, rep_w = os.pipe()
        parent_pid = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = EX_TEMPFAIL
            try:
                os.close(self.req_w)
                os.close(self.rep_r)
                code = _worker(key[0], key[1], parent_pid, req_r, rep_w)
            finally:
                os._exit(code)
        os.close(req_r)
        os.close(rep_w)
        os.set_blocking(self.req_w, False)
        os.set_blocking(self.rep_r, False)
        self.pid = pid
        self.served = 0
        self.busy = False
        self.idle_timer: asyncio.TimerHandle | None = None
        self.closed = False

    async def deliver(self, req: _Request) -> tuple[str, str]:
        loop = asyncio.get_running_loop()
        data = msgspec.msgpack.encode(req)
        try:
            await asyncio.wait_for(self._exchange(loop, _LEN.pack(len(data)) + data), DELIVERY_TIMEOUT)
        except TimeoutError:
            self.kill()
            return "tempfail", "terminated; timeout"
        except _WorkerGone:
            return "tempfail", self.reap()
        reply = msgspec.msgpack.decode(self._reply, type=_Reply)
        self.served += 1
        if reply.code == EX_OK:
            return "ok", ""
        if reply.code == EX_TEMPFAIL:
            return "tempfail", reply.error or "temporary failure"
        return "permfail", reply.error or f"exited with status {reply.code}"

    async def _exchange(self, loop, frame: bytes) -> None:
        view = memoryview(frame)
        while view:
            try:
                view = view[os.write(self.req_w, view):]
            except BlockingIOError:
                await _wait_fd(loop, self.req_w, writable=True)
            except BrokenPipeError:
                raise _WorkerGone from None
        buf = bytearray()
        need = _LEN.size
        while len(buf) < need:
            try:
                chunk = os.read(self.rep_r, 1 << 16)
            except BlockingIOError:
                await _wait_fd(loop, self.rep_r, writable=False)
                continue
            if not chunk:
                raise _WorkerGone
            buf += chunk
            if len(buf) >= _LEN.size:
                need = _LEN.size + _LEN.unpack_from(buf)[0]
        self._reply = bytes(buf[_LEN.size:need])

    def close(self) -> None:
        """Send the worker away: it exits when it reads the end of its pipe."""
        if self.closed:
            return
        self.closed = True
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        for fd in (self.req_w, self.rep_r):
            try:
                os.close(fd)
            except OSError:
                pass
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
        for fd in (self.req_w, self.rep_r):
            try:
                os.close(fd)
            except OSError:
                pass
        if os.WIFSIGNALED(status):
            return f"terminated; signal {os.WTERMSIG(status)}"
        return f"delivery process exited with status {os.WEXITSTATUS(status)}"


class _WorkerGone(Exception):
    pass


async def _wait_fd(loop, fd: int, writable: bool) -> None:
    fut = loop.create_future()
    add, remove = (loop.add_writer, loop.remove_writer) if writable else (loop.add_reader, loop.remove_reader)
    add(fd, lambda: fut.done() or fut.set_result(None))
    try:
        await fut
    finally:
        remove(fd)


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

    async def run(self, msg: MdaFork) -> tuple[str, str]:
        """Deliver; returns (status, error) with status "ok" | "tempfail" | "permfail"."""
        if privsep.privileged() and msg.uid == 0:
            return "permfail", "MDA not allowed to deliver to root"
        key = (msg.uid, msg.gid)
        worker = await self._acquire(key)
        try:
            return await worker.deliver(_Request(msg.method, msg.path, msg.junk, msg.message))
        finally:
            await self._release(key, worker)

    async def _acquire(self, key: tuple[int, int]) -> _Worker:
        cond = self.freed.setdefault(key, asyncio.Condition())
        async with cond:
            while True:
                pool = self.workers.setdefault(key, [])
                for worker in pool:
                    if not worker.busy and not worker.closed:
                        break
                else:
                    worker = None
                    if len(pool) < WORKERS_PER_USER:
                        worker = _Worker(key)
                        pool.append(worker)
                if worker is not None:
                    worker.busy = True
                    if worker.idle_timer is not None:
                        worker.idle_timer.cancel()
                        worker.idle_timer = None
                    return worker
                await cond.wait()

    async def _release(self, key: tuple[int, int], worker: _Worker) -> None:
        worker.busy = False
        if worker.closed or worker.served >= MAX_DELIVERIES:
            self._drop(key, worker)
        else:
            worker.idle_timer = asyncio.get_running_loop().call_later(
                IDLE_SECONDS, self._drop, key, worker)
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
