"""Channels between pysmtpd's processes: ZeroMQ PAIR sockets over ipc://.

One channel per pair of processes that talk (OpenSMTPD's socketpair mesh), so
each pair keeps its own FIFO order (envelope submits before the commit).  The
runtime directory layout and permissions are decided by the parent
(``make_rundir``); this module only binds or connects.

ZeroMQ hides a dead peer, so nothing here waits forever: every request has a
deadline, and the parent watches its children's PIDs.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from pathlib import Path
from typing import Awaitable, Callable

import msgspec
import zmq

from common import messages, stat
from common.messages import Msg
from common.trace import FLAGS, SESSION, trace

log = logging.getLogger("smtpd")

PROCS = ("parent", "control", "lka", "queue", "scheduler", "pony")

# Who talks to whom; the first of each pair binds.  Same links as OpenSMTPD,
# except that the scheduler never talks to lka or pony (as there).
#
# The queue binds every channel it has: it is chrooted to the spool, where the
# runtime directory cannot be seen, and ZeroMQ resolves a connecting endpoint's path
# again at each (re)connection, whereas a bound socket needs its path only once,
# before the chroot.  Control, scheduler and pony are chrooted to the runtime
# directory itself, so the paths they connect to resolve there (docs/security.md).
PAIRS = (
    ("parent", "control"), ("parent", "lka"), ("queue", "parent"),
    ("parent", "scheduler"), ("parent", "pony"),
    ("control", "lka"), ("queue", "control"), ("control", "scheduler"), ("control", "pony"),
    ("queue", "lka"), ("lka", "pony"),
    ("queue", "scheduler"), ("queue", "pony"),
)

DEFAULT_TIMEOUT = 30.0
OUTBOX_RETRY = 0.005     # seconds between send retries while a peer cannot take more
# Messages sent to one peer in one turn of the event loop leave in one ZeroMQ frame
# (a msgpack array of the encoded messages): a frame costs a wake-up of the I/O
# threads at both ends and of the receiver's loop, much more than its bytes.
BATCH_BYTES = 256 * 1024  # a batch this large leaves at once (bounded memory, back-pressure)
ALONE_BYTES = 64 * 1024   # a message this large travels in a frame of its own, not copied
_split_batch = msgspec.msgpack.Decoder(list[msgspec.Raw]).decode


class PeerTimeout(Exception):
    """A peer did not answer in time; treat it as dead for this request."""


class PeerFailed(PeerTimeout):
    """A peer could not handle the request (its handler raised): it said so at once."""


def pair_dir(rundir: Path, a: str, b: str) -> Path:
    return rundir / f"{a}-{b}"


def endpoint(rundir: Path, a: str, b: str) -> str:
    return f"ipc://{pair_dir(rundir, a, b)}/sock"


# The run-time switches (smtpctl trace mproc/imsg, profile imsg), read on the hot path.
TRACE = FLAGS


class Mesh:
    """All channels of one process, and request/reply correlation by ``reqid``.

    The sockets are plain (synchronous) ZeroMQ sockets driven from the event loop
    through their ZMQ_FD: pyzmq's asyncio wrapper costs a future and a poller
    update per message, more than the send or receive itself.  ZMQ_FD is edge
    triggered: it fires when libzmq's internal state may have changed, and any
    operation on the socket may consume that edge.  Hence the two rules kept
    below: a readable socket is drained until EAGAIN, and after every send the
    socket's EVENTS are read again and a drain scheduled if input is waiting.

    Messages of one channel are handled in order by one consumer task per peer;
    a handler that must wait on another process spawns a task of its own.
    """

    def __init__(self, me: str, rundir: Path) -> None:
        self.me = me
        self.rundir = rundir
        self.ctx = zmq.Context()
        self.socks: dict[str, zmq.Socket] = {}
        self._waiting: dict[int, tuple[asyncio.Future, tuple[type, ...]]] = {}
        self._tasks: list[asyncio.Task] = []
        self._handler: Callable[[str, Msg], Awaitable[None] | None] | None = None
        self._inbox: dict[str, deque[tuple[Msg, int]]] = {}   # decoded, and its size: for the consumer
        self._busy: dict[str, bool] = {}             # its consumer is handling messages
        self._inbox_ready: dict[str, asyncio.Event] = {}
        self._outbox: dict[str, deque[tuple[bytes, asyncio.Future | None]]] = {}
        self._pending: dict[str, list[bytes]] = {}     # this turn's messages, per peer
        self._pending_bytes: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def open(self) -> None:
        self.bind()
        self.connect(self.rundir)

    def bind(self) -> None:
        """Bind the channels this process owns (before any chroot: a bound socket
        needs its path only now)."""
        old_umask = os.umask(0o007)   # the socket file must be group-writable (see parent)
        try:
            for a, b in PAIRS:
                if a == self.me:
                    self.socks[b] = self._socket()
                    self.socks[b].bind(endpoint(self.rundir, a, b))
        finally:
            os.umask(old_umask)

    def connect(self, rundir_view: Path) -> None:
        """Connect to the channels the peers bind, by their path as seen from this
        process's root (``/`` when chrooted to the runtime directory): ZeroMQ
        resolves it again at every reconnection."""
        for a, b in PAIRS:
            if b == self.me:
                self.socks[a] = self._socket()
                self.socks[a].connect(endpoint(rundir_view, a, b))

    def _socket(self) -> zmq.Socket:
        sock = self.ctx.socket(zmq.PAIR)
        sock.setsockopt(zmq.LINGER, 1000)
        return sock

    def start(self, handler: Callable[[str, Msg], Awaitable[None] | None]) -> None:
        self._handler = handler
        self._loop = loop = asyncio.get_running_loop()
        for peer, sock in self.socks.items():
            self._inbox[peer] = deque()
            self._busy[peer] = False
            self._inbox_ready[peer] = asyncio.Event()
            self._outbox[peer] = deque()
            self._pending[peer] = []
            self._pending_bytes[peer] = 0
            loop.add_reader(sock.getsockopt(zmq.FD), self._on_events, peer)
            self._tasks.append(asyncio.create_task(self._consume(peer), name=f"recv-{peer}"))
            loop.call_soon(self._on_events, peer)     # anything that came before start()

    async def send(self, peer: str, msg: Msg) -> None:
        """Queue ``msg`` for ``peer``; it leaves at the end of this turn of the event
        loop, in one frame with the other messages sent to that peer meanwhile (in
        order).  Awaits only while the peer cannot take more (back-pressure)."""
        data = self._encode(peer, msg)
        outbox = self._outbox[peer]
        if outbox:
            # The peer is not connected yet, or its pipe is full: wait our turn, in order.
            done = self._loop.create_future()
            outbox.append((data, done))
            await done
            return
        self._add_pending(peer, data)

    def send_nowait(self, peer: str, msg: Msg) -> None:
        """``send`` for a caller that does not wait: while the peer cannot take more,
        the message joins the others waiting for it, in order, and leaves when it can."""
        data = self._encode(peer, msg)
        outbox = self._outbox[peer]
        if outbox:
            outbox.append((data, None))
            return
        self._add_pending(peer, data)

    def send_pending(self, peer: str) -> None:
        """What this turn sent to ``peer`` leaves now, not at the end of the turn: for
        replies that someone is waiting for when the turn has more work to do."""
        self._send_pending(peer)

    def _encode(self, peer: str, msg: Msg) -> bytes:
        data = messages.encode(msg)
        if FLAGS.mproc:
            _trace_mproc(self.me, peer, msg, len(data))
        return data

    def _add_pending(self, peer: str, data: bytes) -> None:
        pending = self._pending[peer]
        pending.append(data)
        size = self._pending_bytes[peer] + len(data)
        self._pending_bytes[peer] = size
        if size >= BATCH_BYTES:
            self._send_pending(peer)
        elif len(pending) == 1:
            self._loop.call_soon(self._send_pending, peer)

    def _send_pending(self, peer: str) -> None:
        """Send the messages queued for ``peer`` in this turn, as few frames as can be."""
        pending = self._pending.get(peer)
        if not pending:
            return
        self._pending[peer] = []
        self._pending_bytes[peer] = 0
        sock, outbox = self.socks[peer], self._outbox[peer]
        for frame in _frames(pending):
            if outbox:
                outbox.append((frame, None))
                continue
            try:
                sock.send(frame, zmq.NOBLOCK, copy=len(frame) < ALONE_BYTES)
            except zmq.Again:
                outbox.append((frame, None))
                self._loop.call_later(OUTBOX_RETRY, self._flush, peer)
            except zmq.ZMQError as exc:       # the socket is closed: we are stopping
                log.warning("warn: %s: cannot send to %s: %s", self.me, peer, exc)
        self._recheck(peer)

    def _flush(self, peer: str) -> None:
        sock, outbox = self.socks[peer], self._outbox[peer]
        while outbox:
            data, done = outbox[0]
            try:
                sock.send(data, zmq.NOBLOCK, copy=len(data) < ALONE_BYTES)
            except zmq.Again:
                # Woken again by the socket's POLLOUT (_on_events), or by this timer
                # should an edge have been consumed elsewhere.
                self._loop.call_later(OUTBOX_RETRY, self._flush, peer)
                break
            except zmq.ZMQError as exc:
                outbox.popleft()
                if done is None:
                    log.warning("warn: %s: cannot send to %s: %s", self.me, peer, exc)
                elif not done.done():
                    done.set_exception(exc)
                continue
            outbox.popleft()
            if done is not None and not done.done():
                done.set_result(None)
        self._recheck(peer)

    def _recheck(self, peer: str) -> None:
        """After any operation on a socket: input it has not signalled yet gets drained."""
        if self.socks[peer].getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self._loop.call_soon(self._on_events, peer)

    def _on_events(self, peer: str) -> None:
        sock = self.socks.get(peer)
        if sock is None or sock.closed:
            return
        inbox = self._inbox[peer]
        # Replies to waiting requests are settled here when nothing of this channel is
        # queued before them (a task hop less per reply); anything else goes, in
        # order, to the channel's consumer task.
        settle = not inbox and not self._busy[peer]
        # EVENTS rather than recv until EAGAIN: an exception per wake-up costs more
        while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            try:
                frame = sock.recv(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                break
            for data in self._split(peer, frame):
                msg = self._decode(peer, data)
                if settle and self._settle(peer, msg):
                    continue
                settle = False
                inbox.append((msg, len(data)))
        if inbox:
            self._inbox_ready[peer].set()
        if self._outbox[peer] and sock.getsockopt(zmq.EVENTS) & zmq.POLLOUT:
            self._flush(peer)

    def _split(self, peer: str, frame: bytes) -> list:
        """The encoded messages of one frame: itself, or the parts of a batch."""
        if frame[0] & 0xF0 == 0x90 or frame[0] in (0xDC, 0xDD):      # a msgpack array: a batch
            try:
                return _split_batch(frame)
            except msgspec.DecodeError as exc:
                log.error("fatal: %s: bad batch from %s: %s", self.me, peer, exc)
                os._exit(1)
        return [frame]

    def _decode(self, peer: str, data) -> Msg:
        try:
            msg = messages.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            # A peer speaking outside the contract is a bug in pysmtpd: fail loudly.
            log.error("fatal: %s: bad message from %s: %s", self.me, peer, exc)
            os._exit(1)
        if FLAGS.imsg:
            trace("imsg: %s <- %s: %s (len=%d)%s", self.me, peer, messages.type_name(msg),
                  len(data), _ids(msg))
        return msg

    def _settle(self, peer: str, msg: Msg) -> bool:
        """A reply to a waiting request completes it; a failure nobody waits for any
        more is dropped.  False: the message is for the handler."""
        reqid = getattr(msg, "reqid", None)
        if reqid is None:
            return False
        waiting = self._waiting.get(reqid)
        if waiting is not None and isinstance(msg, messages.RequestFailed):
            if not waiting[0].done():
                waiting[0].set_exception(PeerFailed(f"{peer} failed: {msg.error}"))
            return True
        if waiting is not None and isinstance(msg, waiting[1]):
            if not waiting[0].done():
                waiting[0].set_result(msg)
            return True
        return isinstance(msg, messages.RequestFailed)     # its requester gave up already

    async def request(self, peer: str, msg: Msg, reply_types: tuple[type, ...],
                      timeout: float = DEFAULT_TIMEOUT) -> Msg:
        """Send ``msg`` and wait for a message of ``reply_types`` with the same reqid."""
        reqid = msg.reqid  # type: ignore[attr-defined]
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._waiting[reqid] = (fut, reply_types)
        try:
            if self._outbox[peer]:
                # the send itself may wait (back-pressure): the deadline covers it too
                async with asyncio.timeout(timeout):
                    await self.send(peer, msg)
                    return await fut
            # the common case: the send does not wait, and a plain timer on the reply
            # costs a fifth of asyncio.timeout's machinery
            await self.send(peer, msg)
            timer = loop.call_later(timeout, _expire, fut, peer, msg, timeout)
            try:
                return await fut
            finally:
                timer.cancel()
        except TimeoutError:
            raise PeerTimeout(_timeout_text(peer, msg, timeout)) from None
        finally:
            self._waiting.pop(reqid, None)

    async def _consume(self, peer: str) -> None:
        inbox, ready = self._inbox[peer], self._inbox_ready[peer]
        while True:
            await ready.wait()
            ready.clear()
            self._busy[peer] = True
            try:
                while inbox:
                    await self._dispatch(peer, *inbox.popleft())
            finally:
                self._busy[peer] = False

    async def _dispatch(self, peer: str, msg: Msg, size: int) -> None:
        if self._settle(peer, msg):
            return
        reqid = getattr(msg, "reqid", None)
        started = time.perf_counter_ns() if FLAGS.profile_imsg else 0
        try:
            result = self._handler(peer, msg)  # type: ignore[misc]
            if asyncio.iscoroutine(result):
                await result
        except Exception as exc:
            log.exception("%s: error handling %s from %s", self.me,
                          messages.type_name(msg), peer)
            if reqid is not None:
                # the requester learns it now rather than after its timeout
                try:
                    await self.send(peer, messages.RequestFailed(
                        reqid=reqid, error=f"{type(exc).__name__}: {exc}"[:200]))
                except Exception:
                    log.exception("%s: cannot report the failure to %s", self.me, peer)
        if started:
            self._profile(peer, msg, size, time.perf_counter_ns() - started)

    def _profile(self, peer: str, msg: Msg, size: int, elapsed_ns: int) -> None:
        """``profile imsg``: how long the handler of one message took (smtpd.c
        imsg_dispatch); with ``smtpd -T profstat`` also a ``profiling.imsg.*`` stat."""
        name = messages.type_name(msg)
        trace("profile-imsg: %s %s %s %d %d.%09d", self.me, peer, name, size,
              elapsed_ns // 1_000_000_000, elapsed_ns % 1_000_000_000)
        if FLAGS.profile_tostat and self.me != "control":
            stat.set(f"profiling.imsg.{self.me}.{peer}.{name}", elapsed_ns / 1e9)

    def close(self) -> None:
        for peer in self._pending:          # what was sent in this last turn still leaves
            if not self.socks[peer].closed:
                self._send_pending(peer)
        for task in self._tasks:
            task.cancel()
        for peer, sock in self.socks.items():
            if self._loop is not None and not sock.closed:
                try:
                    self._loop.remove_reader(sock.getsockopt(zmq.FD))
                except (zmq.ZMQError, ValueError, OSError):
                    pass
            sock.close(linger=200)
        self.ctx.term()


def _timeout_text(peer: str, msg: Msg, timeout: float) -> str:
    return f"{peer} did not answer {messages.type_name(msg)} in {timeout:g}s"


def _expire(fut: asyncio.Future, peer: str, msg: Msg, timeout: float) -> None:
    if not fut.done():
        fut.set_exception(PeerTimeout(_timeout_text(peer, msg, timeout)))


def _frames(pending: list[bytes]) -> list[bytes]:
    """The frames that carry ``pending`` in order: a lone or large message as it is,
    runs of small ones as a msgpack array of them (no message encodes to an array:
    each is a map, so the receiver tells the two apart by the first byte)."""
    if len(pending) == 1:
        return pending
    frames: list[bytes] = []
    run: list[bytes] = []
    size = 0
    for data in pending:
        if len(data) >= ALONE_BYTES or size + len(data) > BATCH_BYTES:
            frames.extend(_batch(run))
            run, size = [], 0
            if len(data) >= ALONE_BYTES:
                frames.append(data)
                continue
        run.append(data)
        size += len(data)
    frames.extend(_batch(run))
    return frames


def _batch(run: list[bytes]) -> list[bytes]:
    if len(run) <= 1:
        return run
    n = len(run)
    head = bytes((0x90 | n,)) if n < 16 else b"\xdc" + n.to_bytes(2, "big") if n < 65536 \
        else b"\xdd" + n.to_bytes(4, "big")
    return [head + b"".join(run)]


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
