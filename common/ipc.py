"""Channels between pysmtpd's processes: ZeroMQ PAIR sockets over ipc://.

One channel per pair of processes that talk (OpenSMTPD's socketpair mesh), so
each pair keeps its own FIFO order (envelope submits before the commit).  The
runtime directory layout and permissions are decided by the parent
(``runtime_layout``); this module only binds or connects.

ZeroMQ hides a dead peer, so nothing here waits forever: every request has a
deadline, and the parent watches its children's PIDs.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Awaitable, Callable

import msgspec
import zmq
import zmq.asyncio

from common import messages, stat
from common.messages import Msg
from common.trace import FLAGS, SESSION, trace

log = logging.getLogger("smtpd")

PROCS = ("parent", "control", "lka", "queue", "scheduler", "pony")

# Who talks to whom; the first of each pair binds.  Same links as OpenSMTPD,
# except that the scheduler never talks to lka or pony (as there).
PAIRS = (
    ("parent", "control"), ("parent", "lka"), ("parent", "queue"),
    ("parent", "scheduler"), ("parent", "pony"),
    ("control", "lka"), ("control", "queue"), ("control", "scheduler"), ("control", "pony"),
    ("lka", "queue"), ("lka", "pony"),
    ("queue", "scheduler"), ("queue", "pony"),
)

DEFAULT_TIMEOUT = 30.0


class PeerTimeout(Exception):
    """A peer did not answer in time; treat it as dead for this request."""


def pair_dir(rundir: Path, a: str, b: str) -> Path:
    return rundir / f"{a}-{b}"


def endpoint(rundir: Path, a: str, b: str) -> str:
    return f"ipc://{pair_dir(rundir, a, b)}/sock"


# The run-time switches (smtpctl trace mproc/imsg, profile imsg), read on the hot path.
TRACE = FLAGS


class Mesh:
    """All channels of one process, and request/reply correlation by ``reqid``."""

    def __init__(self, me: str, rundir: Path) -> None:
        self.me = me
        self.rundir = rundir
        self.ctx = zmq.asyncio.Context()
        self.socks: dict[str, zmq.asyncio.Socket] = {}
        self._waiting: dict[int, tuple[asyncio.Future, tuple[type, ...]]] = {}
        self._tasks: list[asyncio.Task] = []
        self._handler: Callable[[str, Msg], Awaitable[None] | None] | None = None

    def open(self) -> None:
        old_umask = os.umask(0o007)   # the socket file must be group-writable (see parent)
        try:
            for a, b in PAIRS:
                if self.me not in (a, b):
                    continue
                peer = b if a == self.me else a
                sock = self.ctx.socket(zmq.PAIR)
                sock.setsockopt(zmq.LINGER, 1000)
                if a == self.me:
                    sock.bind(endpoint(self.rundir, a, b))
                else:
                    sock.connect(endpoint(self.rundir, a, b))
                self.socks[peer] = sock
        finally:
            os.umask(old_umask)

    def start(self, handler: Callable[[str, Msg], Awaitable[None] | None]) -> None:
        self._handler = handler
        for peer, sock in self.socks.items():
            self._tasks.append(asyncio.create_task(self._reader(peer, sock), name=f"recv-{peer}"))

    async def send(self, peer: str, msg: Msg) -> None:
        data = messages.encode(msg)
        if FLAGS.mproc:
            _trace_mproc(self.me, peer, msg, len(data))
        await self.socks[peer].send(data, copy=len(data) < 65536)

    async def request(self, peer: str, msg: Msg, reply_types: tuple[type, ...],
                      timeout: float = DEFAULT_TIMEOUT) -> Msg:
        """Send ``msg`` and wait for a message of ``reply_types`` with the same reqid."""
        reqid = msg.reqid  # type: ignore[attr-defined]
        fut = asyncio.get_running_loop().create_future()
        self._waiting[reqid] = (fut, reply_types)
        try:
            await self.send(peer, msg)
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise PeerTimeout(f"{peer} did not answer {messages.type_name(msg)} in {timeout:g}s") from None
        finally:
            self._waiting.pop(reqid, None)

    async def _reader(self, peer: str, sock: zmq.asyncio.Socket) -> None:
        while True:
            data = await sock.recv(copy=True)
            try:
                msg = messages.decode(data)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                # A peer speaking outside the contract is a bug in pysmtpd: fail loudly.
                log.error("fatal: %s: bad message from %s: %s", self.me, peer, exc)
                os._exit(1)
            if FLAGS.imsg:
                trace("imsg: %s <- %s: %s (len=%d)%s", self.me, peer, messages.type_name(msg),
                      len(data), _ids(msg))
            reqid = getattr(msg, "reqid", None)
            waiting = self._waiting.get(reqid) if reqid is not None else None
            if waiting is not None and isinstance(msg, waiting[1]):
                if not waiting[0].done():
                    waiting[0].set_result(msg)
                continue
            started = time.perf_counter_ns() if FLAGS.profile_imsg else 0
            try:
                result = self._handler(peer, msg)  # type: ignore[misc]
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                log.exception("%s: error handling %s from %s", self.me,
                              messages.type_name(msg), peer)
            if started:
                self._profile(peer, msg, len(data), time.perf_counter_ns() - started)

    def _profile(self, peer: str, msg: Msg, size: int, elapsed_ns: int) -> None:
        """``profile imsg``: how long the handler of one message took (smtpd.c
        imsg_dispatch); with ``smtpd -T profstat`` also a ``profiling.imsg.*`` stat."""
        name = messages.type_name(msg)
        trace("profile-imsg: %s %s %s %d %d.%09d", self.me, peer, name, size,
              elapsed_ns // 1_000_000_000, elapsed_ns % 1_000_000_000)
        if FLAGS.profile_tostat and self.me != "control":
            stat.set(f"profiling.imsg.{self.me}.{peer}.{name}", elapsed_ns / 1e9)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for sock in self.socks.values():
            sock.close(linger=200)
        self.ctx.term()


def _ids(msg: Msg) -> str:
    """" session=... reqid=... msgid=... evpid=...": the ids a message carries, and the
    SMTP/MTA session the sending task works for."""
    ids = messages.ids_of(msg)
    session = SESSION.get()
    if session:
        ids = f"session={session:016x} {ids}" if ids else f"session={session:016x}"
    return f" {ids}" if ids else ""


def _trace_mproc(me: str, peer: str, msg: Msg, size: int) -> None:
    """``trace mproc``: one line per message sent (mproc.c m_compose), with both ends."""
    trace("mproc: %s -> %s : %d %s%s", me, peer, size, messages.type_name(msg), _ids(msg))
