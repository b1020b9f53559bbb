"""The parent -> pony fd channel: listening sockets handed over at a reload.

At start pony inherits the listening sockets (pass_fds).  A reload may add
listeners, and only the parent can bind them (ports < 1024 need root; pony has
dropped privileges), so the parent passes them as SCM_RIGHTS over an AF_UNIX
SOCK_SEQPACKET socketpair made before pony was started (pony keeps its end).
ZeroMQ cannot carry descriptors; this side channel carries nothing else.

Each datagram is ``generation, offset, total`` (three big-endian u64/u32/u32)
with up to FDS_PER_DATAGRAM descriptors; the listener each socket serves is in
the conf_reload_prepare message of the same generation (common/messages.py).
"""
from __future__ import annotations

import asyncio
import socket
import struct

HEADER = struct.Struct("!QII")
FDS_PER_DATAGRAM = 200           # the kernel's limit is SCM_MAX_FD = 253


def make_channel() -> tuple[socket.socket, socket.socket]:
    """(the parent's end, pony's end); pony's end is made inheritable by the caller."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def send_sockets(channel: socket.socket, generation: int, socks: list[socket.socket]) -> None:
    fds = [s.fileno() for s in socks]
    total = len(fds)
    if not fds:
        channel.send(HEADER.pack(generation, 0, 0))
        return
    for offset in range(0, total, FDS_PER_DATAGRAM):
        chunk = fds[offset:offset + FDS_PER_DATAGRAM]
        socket.send_fds(channel, [HEADER.pack(generation, offset, total)], chunk)


class Receiver:
    """pony's end: gathers each generation's sockets as they arrive."""

    def __init__(self, channel: socket.socket) -> None:
        self.channel = channel
        self.channel.setblocking(False)
        self.pending: dict[int, dict[int, socket.socket]] = {}
        self.totals: dict[int, int] = {}
        self.arrived = asyncio.Event()

    def start(self) -> None:
        asyncio.get_running_loop().add_reader(self.channel.fileno(), self._readable)

    def stop(self) -> None:
        try:
            asyncio.get_running_loop().remove_reader(self.channel.fileno())
        except (RuntimeError, ValueError):
            pass

    def _readable(self) -> None:
        for _ in range(64):                       # bounded: at most 64 datagrams per wake-up
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.channel, HEADER.size, FDS_PER_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.stop()
                return
            if not data:                          # the parent is gone
                self.stop()
                return
            generation, offset, total = HEADER.unpack(data[:HEADER.size])
            got = self.pending.setdefault(generation, {})
            for i, fd in enumerate(fds):
                got[offset + i] = socket.socket(fileno=fd)
            self.totals[generation] = total
            self.arrived.set()

    def _complete(self, generation: int) -> bool:
        return generation in self.totals and len(self.pending.get(generation, {})) >= self.totals[generation]

    async def wait(self, generation: int, timeout: float) -> list[socket.socket]:
        """The sockets of ``generation`` in order; TimeoutError if they do not all come.
        Older generations still held (an aborted reload) are closed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._complete(generation):
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"sockets of reload {generation} did not arrive")
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), remaining)
            except TimeoutError:
                pass
        for old in [g for g in self.pending if g < generation]:
            self.discard(old)
        got = self.pending.pop(generation, {})
        self.totals.pop(generation, None)
        return [got[i] for i in sorted(got)]

    def discard(self, generation: int) -> None:
        for sock in self.pending.pop(generation, {}).values():
            sock.close()
        self.totals.pop(generation, None)
