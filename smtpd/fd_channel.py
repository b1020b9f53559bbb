"""Descriptors passed by key between processes: the message bodies of local delivery.

OpenSMTPD hands a delivery its message as a file descriptor: the queue opens the
message and passes the descriptor to the dispatcher (IMSG_MDA_OPEN_MESSAGE), which
streams it to the mda child.  ZeroMQ cannot carry descriptors, so each hop that
needs one has an AF_UNIX SOCK_SEQPACKET socketpair made by the parent before its
children start (docs/delivery.md):

- queue -> pony: the queue's end is given to the queue, pony's to pony;
- pony -> parent: the pair smtpd/fdpass.py made for listening sockets, used in the
  other direction (a seqpacket pair carries each direction separately, so pony's
  listener Receiver never sees these datagrams).

Each datagram is one 8-byte key (the reqid of the ZeroMQ request it belongs to) and
one descriptor.  The sender sends the descriptor first and its ZeroMQ message after;
the receiver's ``take(key)`` waits (bounded) for a descriptor that may still be on
its way.  A descriptor nobody takes is closed after ORPHAN_SECONDS, and at most
MAX_PENDING are held: a confused or hostile peer cannot make the receiver run out
of descriptors.

The queue also pushes a local delivery's message with its order (QueueDeliver),
under a key of its own choosing: such keys have the top bit set (``pushed_key``),
the reqids pony waits for by ``take`` have it clear (``request_key``), so a pushed
descriptor can never be handed to a request for another message.  A pushed one is
taken with ``take_now``, which never waits: a unix socket's send has put the
datagram in the receiver's queue before the sender's ZeroMQ message leaves, so
when the order is handled its descriptor is there, or was dropped (docs/delivery.md).
"""
from __future__ import annotations

import array
import asyncio
import os
import socket
import struct

KEY = struct.Struct("!Q")
MAX_PENDING = 256
READ_BATCH = 64           # datagrams read per wake-up
ORPHAN_SECONDS = 60.0
_PUSHED = 1 << 63


def pushed_key(ident: int) -> int:
    """A key for a descriptor sent with an order rather than asked for."""
    return ident | _PUSHED


def request_key(ident: int) -> int:
    """A key (and reqid) for a descriptor asked for by a request: never a pushed key."""
    return ident & ~_PUSHED


def make_pair() -> tuple[socket.socket, socket.socket]:
    """A fresh channel: (one end, the other end)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


async def send_fd(channel: socket.socket, key: int, fd: int) -> None:
    """Send ``fd`` under ``key`` (the caller keeps its own copy and closes it)."""
    for _ in range(1000):                         # bounded: about 10 s of a full channel
        try:
            send_fd_now(channel, key, fd)
            return
        except (BlockingIOError, InterruptedError):
            await asyncio.sleep(0.01)
    raise TimeoutError("descriptor channel full")


def send_fd_now(channel: socket.socket, key: int, fd: int) -> None:
    """Send ``fd`` under ``key`` without waiting: BlockingIOError when the channel is
    full, another OSError when it cannot carry it (closed, too many in flight)."""
    channel.sendmsg([KEY.pack(key)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))],
                    socket.MSG_DONTWAIT)         # (socket.send_fds drops its flags)


class FdReceiver:
    """One end of a channel: descriptors kept by key until taken.  A taker waits on a
    future of its own key (no wake-up of every waiter at each arrival)."""

    def __init__(self, channel: socket.socket) -> None:
        self.channel = channel            # left blocking: it may be shared (MSG_DONTWAIT here)
        self.pending: dict[int, tuple[int, float]] = {}      # key -> (fd, arrival time)
        self.waiters: dict[int, asyncio.Future] = {}
        self.running = False

    def start(self) -> None:
        asyncio.get_running_loop().add_reader(self.channel.fileno(), self._readable)
        self.running = True

    def stop(self) -> None:
        if self.running:
            self.running = False
            try:
                asyncio.get_running_loop().remove_reader(self.channel.fileno())
            except (RuntimeError, ValueError):
                pass
        for fd, _ in self.pending.values():
            close_fd(fd)
        self.pending.clear()
        for waiter in self.waiters.values():
            if not waiter.done():
                waiter.set_exception(TimeoutError("descriptor channel closed"))
        self.waiters.clear()

    def _readable(self) -> bool:
        """Read what has come (at most READ_BATCH datagrams); True if there may be more."""
        now = asyncio.get_running_loop().time()
        more = True
        for _ in range(READ_BATCH):                   # bounded per wake-up
            try:
                data, fds, _flags, _addr = _recv_fds(self.channel, KEY.size, 4, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                more = False
                break
            except OSError:
                self.stop()
                return False
            if not data and not fds:                  # the other side is gone
                self.stop()
                return False
            if len(data) != KEY.size or len(fds) != 1:
                for fd in fds:                        # not ours to keep
                    close_fd(fd)
                continue
            key = KEY.unpack(data)[0]
            waiter = self.waiters.pop(key, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(fds[0])
                continue
            old = self.pending.pop(key, None)
            if old is not None:
                close_fd(old[0])
            self.pending[key] = (fds[0], now)
        self._expire(now)
        return more

    def _expire(self, now: float) -> None:
        for key, (fd, when) in list(self.pending.items()):
            if now - when > ORPHAN_SECONDS or len(self.pending) > MAX_PENDING:
                del self.pending[key]
                close_fd(fd)

    def take_now(self, key: int) -> int | None:
        """The descriptor sent under ``key`` (now the caller's to close) if it has come,
        reading what the channel holds (bounded); None if it is not there: never sent,
        or dropped (MAX_PENDING, ORPHAN_SECONDS, channel closed)."""
        for _ in range(MAX_PENDING // READ_BATCH + 1):
            if key in self.pending or not self.running:
                break
            if not self._readable():
                break
        entry = self.pending.pop(key, None)
        return None if entry is None else entry[0]

    async def take(self, key: int, timeout: float) -> int:
        """The descriptor sent under ``key`` (now the caller's to close); TimeoutError
        if it does not come in ``timeout`` seconds."""
        if key in self.pending:
            return self.pending.pop(key)[0]
        if not self.running:
            raise TimeoutError(f"descriptor {key:016x}: channel closed")
        waiter = asyncio.get_running_loop().create_future()
        self.waiters[key] = waiter
        try:
            return await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            raise TimeoutError(f"descriptor {key:016x} did not arrive") from None
        finally:
            if self.waiters.get(key) is waiter:
                del self.waiters[key]


def _recv_fds(sock: socket.socket, bufsize: int, maxfds: int, flags: int):
    """socket.recv_fds with its flags honoured (Python 3.12.1's drops them, and the
    MSG_DONTWAIT here is what keeps a shared, blocking socket from blocking)."""
    fds = array.array("i")
    msg, ancdata, msg_flags, addr = sock.recvmsg(bufsize, socket.CMSG_LEN(maxfds * fds.itemsize), flags)
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - (len(data) % fds.itemsize)])
    return msg, list(fds), msg_flags, addr


def close_fd(fd: int) -> None:
    """Close a descriptor this side holds, whatever became of it."""
    try:
        os.close(fd)
    except OSError:
        pass
