"""The message descriptor the queue pushes with a local delivery's order (issue 12):
taken from a real queue -> pony seqpacket channel when the order comes, never waited
for, kept for at most MAX_PUSHED envelopes, closed on every path; and the fallback to
MdaMessageOpen when none was pushed (smtpd/mda.py, smtpd/fd_channel.py).

pony's Mda runs here with a stand-in for the rest of pony: it answers MdaMessageOpen
as the queue does (the descriptor over the channel first, then the reply) and records
what would go to the other processes."""
from __future__ import annotations

import asyncio
import os
import types

from common.envelope import Envelope
from common.messages import DeliveryResult, MdaMessageOpen, MdaMessageOpened
from smtpd import fd_channel, mda
from smtpd.mda import Mda
from tests.unit.delivery_helpers import message_fd


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class StandIn:
    """What Mda uses of pony: its configuration, ids, task spawning and the mesh.
    ``queue_end`` is the queue's end of the real descriptor channel."""

    def __init__(self, queue_end, pony_end, actions=None) -> None:
        self.queue_end = queue_end
        self.config = types.SimpleNamespace(actions=actions or {})
        counter = iter(range(1, 1 << 30))
        self.ctx = types.SimpleNamespace(opts=types.SimpleNamespace(queue_fd_channel=pony_end.detach()),
                                         new_id=lambda: next(counter))
        self.mesh = self
        self.requests: list = []
        self.sent: list = []
        self.tasks: set = set()

    def spawn(self, coro):
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def request(self, peer, msg, replies, timeout=None):
        self.requests.append(msg)
        assert isinstance(msg, MdaMessageOpen) and peer == "queue"
        fd = message_fd(b"Subject: asked for\n\nbody\n")
        try:
            await fd_channel.send_fd(self.queue_end, msg.reqid, fd)
        finally:
            os.close(fd)
        return MdaMessageOpened(reqid=msg.reqid, ok=True)

    async def send(self, peer, msg):
        self.sent.append((peer, msg))


def envelope(n: int) -> Envelope:
    return Envelope(id=(0x1234 << 32) | n, type="mda", dispatcher="local", mda_user="alice")


def push(queue_end, data: bytes, ident: int) -> int:
    """What the queue's _push_message does: the descriptor under a pushed key."""
    key = fd_channel.pushed_key(ident)
    fd = message_fd(data)
    try:
        fd_channel.send_fd_now(queue_end, key, fd)
    finally:
        os.close(fd)
    return key


def run(body):
    async def go():
        queue_end, pony_end = fd_channel.make_pair()
        pony = StandIn(queue_end, pony_end)
        m = Mda(pony)
        m.start()
        try:
            return await body(m, pony, queue_end)
        finally:
            m.stop()
            m.message_fds.channel.close()
            queue_end.close()
    return asyncio.run(go())


def test_pushed_and_request_keys_never_meet():
    for ident in (0, 1, (1 << 63) - 1, 1 << 63, (1 << 64) - 1, 0xDEADBEEF12345678):
        assert fd_channel.pushed_key(ident) >> 63 == 1
        assert fd_channel.request_key(ident) >> 63 == 0


def test_take_now_reads_the_channel_without_waiting():
    async def body(m, pony, queue_end):
        key = push(queue_end, b"pushed", 5)
        # taken at once: the loop never ran the channel's reader in between
        fd = m.message_fds.take_now(key)
        data = os.pread(fd, 10, 0)
        os.close(fd)
        missing = m.message_fds.take_now(fd_channel.pushed_key(6))
        return data, missing
    assert run(body) == (b"pushed", None)


def test_the_pushed_descriptor_is_used_without_asking_the_queue():
    async def body(m, pony, queue_end):
        env = envelope(1)
        m._keep_pushed(env.id, push(queue_end, b"Subject: pushed\n\n", 1))   # QueueDeliver's part
        fd = await m._message_fd(env)
        data = os.pread(fd, 100, 0)
        os.close(fd)
        return data, pony.requests, m.pushed
    assert run(body) == (b"Subject: pushed\n\n", [], {})


def test_without_a_pushed_descriptor_pony_asks_for_it():
    async def body(m, pony, queue_end):
        env = envelope(2)
        # a key the queue never sent under (its send failed, or the receiver dropped it)
        m._keep_pushed(env.id, fd_channel.pushed_key(99))
        before = asyncio.get_running_loop().time()
        fd = await m._message_fd(env)
        waited = asyncio.get_running_loop().time() - before
        data = os.pread(fd, 100, 0)
        os.close(fd)
        return data, [type(r) for r in pony.requests], pony.requests[0].reqid >> 63, waited < 1.0
    assert run(body) == (b"Subject: asked for\n\nbody\n", [MdaMessageOpen], 0, True)


def test_pushed_descriptors_kept_are_bounded_and_closed_on_every_path():
    """More orders than MAX_PUSHED: the extra descriptors are closed at once; the
    deliveries (here failing early: their action is gone) close the ones kept, and
    every envelope still gets its result."""
    async def body(m, pony, queue_end):
        await asyncio.sleep(0)
        baseline = open_fds()
        count = mda.MAX_PUSHED + 20
        for n in range(count):
            m.add(envelope(n), push(queue_end, b"x", n))
        kept = len(m.pushed)
        held = open_fds() - baseline
        for _ in range(200):                   # bounded: the deliveries fail at once
            if len([s for s in pony.sent if isinstance(s[1], DeliveryResult)]) == count:
                break
            await asyncio.sleep(0.01)
        results = {s[1].status for s in pony.sent}
        return kept, held, len(pony.sent), results, m.pushed, open_fds() - baseline
    kept, held, sent, results, pushed, leaked = run(body)
    assert (kept, held) == (mda.MAX_PUSHED, mda.MAX_PUSHED)
    assert (sent, results, pushed, leaked) == (mda.MAX_PUSHED + 20, {"tempfail"}, {}, 0)


def test_the_same_envelope_twice_keeps_one_descriptor():
    async def body(m, pony, queue_end):
        await asyncio.sleep(0)
        baseline = open_fds()
        env = envelope(3)
        m.add(env, push(queue_end, b"first", 1))
        m.add(env, push(queue_end, b"second", 2))
        kept = open_fds() - baseline
        for _ in range(200):                   # bounded: both fail at once (no action)
            if len(pony.sent) == 2:
                break
            await asyncio.sleep(0.01)
        return kept, len(pony.sent), open_fds() - baseline, m.pushed
    assert run(body) == (1, 2, 0, {})


def test_stop_closes_what_is_kept():
    async def body(m, pony, queue_end):
        await asyncio.sleep(0)
        baseline = open_fds()
        m._keep_pushed(4, push(queue_end, b"x", 4))
        m._keep_pushed(5, push(queue_end, b"y", 5))
        extra = open_fds() - baseline
        m.stop()
        return extra, open_fds() - baseline
    assert run(body) == (2, 0)
