"""The queue's side of the pushed message descriptor (issue 12): a local delivery's
order goes with the message's descriptor, sent first over a real queue -> pony
channel; when the message cannot be opened (a missing body goes to corrupt/) or the
channel is full, the order goes at once without one (smtpd/queue.py _push_message).
The queue runs over a real spool; the other processes are a recorder of what is sent."""
from __future__ import annotations

import asyncio
import os
import types

import pytest

from common.messages import QueueDeliver, QueueEnvelopeRemove, QueueTransfer
from smtpd import fd_channel, queue
from smtpd.queue_fs import Spool
from tests.unit.test_queue_fs import receive


class Recorder:
    def __init__(self) -> None:
        self.sent: list = []

    async def send(self, peer, msg) -> None:
        self.sent.append((peer, msg))


@pytest.fixture
def spool(tmp_path):
    s = Spool(tmp_path / "spool")
    s.setup(os.getuid(), os.getgid(), privileged=False)
    return s


def run(spool, body):
    async def go():
        queue_end, pony_end = fd_channel.make_pair()
        counter = iter(range(1, 1 << 30))
        ctx = types.SimpleNamespace(prepared=spool, config=types.SimpleNamespace(), mesh=Recorder(),
                                    opts=types.SimpleNamespace(queue_fd_channel=queue_end.detach()),
                                    new_id=lambda: next(counter))
        proc = queue.Process(ctx)
        receiver = fd_channel.FdReceiver(pony_end)
        receiver.start()
        try:
            return await body(proc, ctx.mesh.sent, receiver)
        finally:
            receiver.stop()
            pony_end.close()
            proc.delivery_fds.close()
    return asyncio.run(go())


def committed(spool, body=b"Subject: x\n\nhi\n", rcpts=("a@b.test",)):
    msgid, evpids, f = receive(spool, rcpts, body)
    spool.commit(msgid, f)
    return msgid, evpids


def test_a_local_order_goes_with_its_message(spool):
    msgid, (evpid,) = committed(spool, b"Subject: pushed\n\nbody\n")

    async def body(proc, sent, receiver):
        await proc._dispatch(evpid, transfer=False)
        (peer, order), = sent
        fd = receiver.take_now(order.fd_key)
        data = os.pread(fd, 100, 0)
        os.close(fd)
        return peer, type(order), order.envelope.id, order.fd_key >> 63, data
    assert run(spool, body) == ("pony", QueueDeliver, evpid, 1, b"Subject: pushed\n\nbody\n")


def test_a_relay_order_goes_without(spool):
    msgid, (evpid,) = committed(spool)

    async def body(proc, sent, receiver):
        await proc._dispatch(evpid, transfer=True)
        (peer, order), = sent
        return type(order), receiver.take_now(fd_channel.pushed_key(1))
    assert run(spool, body) == (QueueTransfer, None)


def test_a_missing_body_sends_the_message_to_corrupt_and_the_order_without(spool):
    msgid, (evpid,) = committed(spool)
    os.unlink(spool.message_dir(msgid) / "message")

    async def body(proc, sent, receiver):
        await proc._dispatch(evpid, transfer=False)
        return [(peer, type(m), getattr(m, "fd_key", None)) for peer, m in sent], proc.corrupted
    sent, corrupted = run(spool, body)
    assert sent == [("scheduler", QueueEnvelopeRemove, None), ("pony", QueueDeliver, 0)]
    assert corrupted == {msgid}


def test_a_full_channel_is_not_waited_for(spool):
    msgid, (evpid,) = committed(spool)

    async def body(proc, sent, receiver):
        receiver.stop()                         # nobody reads: fill the channel
        fd = os.open(os.devnull, os.O_RDONLY)
        try:
            for n in range(100_000):            # bounded: a socket buffer holds far fewer
                try:
                    fd_channel.send_fd_now(proc.delivery_fds, fd_channel.pushed_key(n), fd)
                except BlockingIOError:
                    break
            else:
                raise AssertionError("the channel never filled")
        finally:
            os.close(fd)
        loop = asyncio.get_running_loop()
        start = loop.time()
        await proc._dispatch(evpid, transfer=False)
        (peer, order), = sent
        return type(order), order.fd_key, loop.time() - start < 0.5
    assert run(spool, body) == (QueueDeliver, 0, True)
