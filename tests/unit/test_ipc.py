"""The channel layer on its own: two processes' meshes in one event loop, real
ZeroMQ ipc:// sockets, no daemon.  Order, back-pressure and request deadlines."""
from __future__ import annotations

import asyncio

import pytest

from common import ipc
from common.ipc import Mesh, PeerTimeout
from common.messages import (
    ConfReloadPrepare, CtlReply, CtlRequest, QueueMessageCommit, SmtpMessageData, decode, encode,
)


def rundir_for(tmp_path):
    for a, b in ipc.PAIRS:
        ipc.pair_dir(tmp_path, a, b).mkdir()
    return tmp_path


def opened(rundir, *names: str) -> list[Mesh]:
    meshes = [Mesh(name, rundir) for name in names]
    for mesh in meshes:
        mesh.open()
    return meshes


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_messages_sent_before_the_peer_connects_arrive_in_order(tmp_path):
    """The binding side may send before the other side exists (PAIR: EAGAIN);
    the outbox keeps them, in order, until it connects.  The first turn's messages
    are taken (one batch); the senders after it wait (back-pressure)."""
    rundir = rundir_for(tmp_path)

    async def main():
        got: list[int] = []
        done = asyncio.Event()
        queue = Mesh("queue", rundir)          # binds queue-scheduler
        queue.open()
        queue.start(lambda peer, msg: None)
        senders = [asyncio.create_task(queue.send("scheduler", QueueMessageCommit(msgid=i)))
                   for i in range(1, 26)]
        await asyncio.sleep(0.05)
        senders += [asyncio.create_task(queue.send("scheduler", QueueMessageCommit(msgid=i)))
                    for i in range(26, 51)]
        await asyncio.sleep(0.1)
        assert not any(t.done() for t in senders[25:]), "sent with no peer connected"

        def on_message(peer, msg):
            got.append(msg.msgid)
            if len(got) == 3050:
                done.set()

        scheduler = Mesh("scheduler", rundir)
        scheduler.open()
        scheduler.start(on_message)
        await asyncio.gather(*senders)
        # more than the default high-water mark (1000), sent without waiting for the reader
        for i in range(51, 3051):
            await queue.send("scheduler", QueueMessageCommit(msgid=i))
        await asyncio.wait_for(done.wait(), 30)
        queue.close()
        scheduler.close()
        return got

    assert run(main()) == list(range(1, 3051))


def test_request_gets_its_reply_and_a_silent_peer_times_out(tmp_path):
    rundir = rundir_for(tmp_path)

    async def main():
        control, scheduler = opened(rundir, "control", "scheduler")
        answered: list[int] = []

        async def on_request(peer, msg):
            if msg.command == "ping":
                answered.append(msg.reqid)
                await scheduler.send(peer, CtlReply(reqid=msg.reqid, ok=True, text="pong"))

        control.start(lambda peer, msg: None)
        scheduler.start(on_request)
        replies = await asyncio.gather(*(
            control.request("scheduler", CtlRequest(reqid=i, command="ping"), (CtlReply,), timeout=10)
            for i in range(1, 201)))
        assert [r.reqid for r in replies] == list(range(1, 201))
        assert all(r.text == "pong" for r in replies)
        with pytest.raises(PeerTimeout):
            await control.request("scheduler", CtlRequest(reqid=999, command="silence"),
                                  (CtlReply,), timeout=0.3)
        control.close()
        scheduler.close()

    run(main())


def test_a_request_whose_handler_raises_fails_at_once(tmp_path):
    """A peer whose handler raises says so (RequestFailed): the requester does not wait
    for its deadline (an SMTP client gets its 4xx at once, issue 8)."""
    rundir = rundir_for(tmp_path)

    async def main():
        control, scheduler = opened(rundir, "control", "scheduler")

        async def on_request(peer, msg):
            raise RuntimeError("handler bug")

        control.start(lambda peer, msg: None)
        scheduler.start(on_request)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(ipc.PeerFailed, match="scheduler failed: RuntimeError: handler bug"):
            await control.request("scheduler", CtlRequest(reqid=7, command="x"), (CtlReply,), timeout=20)
        assert loop.time() - started < 5
        control.close()
        scheduler.close()

    run(main())


def test_reload_prepare_shows_sizes_of_key_material_never_its_content():
    """Key material crosses the parent -> pony channel at a reload; whatever prints
    the message (a log line, a traceback's repr) sees the sizes only."""
    key = b"-----BEGIN PRIVATE KEY-----\nc2VjcmV0IGtleQ==\n-----END PRIVATE KEY-----\n"
    msg = ConfReloadPrepare(reqid=1, generation=2, config=b"model", listeners=[0],
                            tls_files={"/etc/ssl/private/mx.key": key})
    text = repr(msg)
    assert "c2VjcmV0IGtleQ" not in text and "PRIVATE" not in text and str(msg) == text
    assert f"'/etc/ssl/private/mx.key': {len(key)}" in text and "config=<5 bytes>" in text
    assert decode(encode(msg)).tls_files == {"/etc/ssl/private/mx.key": key}


def test_one_turns_messages_arrive_in_order_whatever_their_sizes(tmp_path):
    """Messages sent in one turn of the loop leave batched (small ones in one frame,
    large ones alone, a batch cut at BATCH_BYTES); the peer sees each once, in order,
    with replies matched to their requests."""
    rundir = rundir_for(tmp_path)
    sizes = [10, ipc.ALONE_BYTES, 3, 5, ipc.ALONE_BYTES * 2, 7] + [40_000] * 12 + [1] * 20

    async def main():
        queue, pony = opened(rundir, "queue", "pony")
        got: list[tuple[int, int]] = []
        done = asyncio.Event()

        async def on_message(peer, msg):
            got.append((msg.msgid, len(msg.chunk)))
            if len(got) == len(sizes):
                done.set()

        queue.start(on_message)
        pony.start(lambda peer, msg: None)
        for i, size in enumerate(sizes):        # no await yields: all in one turn
            await pony.send("queue", SmtpMessageData(msgid=i + 1, chunk=b"x" * size))
        await asyncio.wait_for(done.wait(), 30)
        queue.close()
        pony.close()
        return got

    assert run(main()) == [(i + 1, size) for i, size in enumerate(sizes)]


def test_frames_groups_small_messages_and_keeps_large_ones_apart():
    small = encode(QueueMessageCommit(msgid=1))
    large = encode(SmtpMessageData(msgid=2, chunk=b"b" * ipc.ALONE_BYTES))
    frames = ipc._frames([small, small, large, small])
    assert frames == [bytes([0x92]) + small + small, large, small]
    assert ipc._frames([small]) == [small]
    many = ipc._frames([small] * 20)
    assert len(many) == 1 and many[0][:3] == b"\xdc\x00\x14" and [decode(part) for part in ipc._split_batch(many[0])] == [QueueMessageCommit(msgid=1)] * 20


def test_send_nowait_keeps_the_order_and_send_pending_sends_within_the_turn(tmp_path):
    """send_nowait queues like send without waiting: behind what waits for a peer
    that cannot take it yet, in order.  send_pending sends this turn's messages
    without waiting for the turn to end (a commit's reply)."""
    rundir = rundir_for(tmp_path)

    async def main():
        got: list[int] = []
        done = asyncio.Event()

        def on_message(peer, msg):
            got.append(msg.msgid)
            if len(got) == 4:
                done.set()

        queue = Mesh("queue", rundir)           # binds queue-scheduler; nobody connected yet
        queue.open()
        queue.start(lambda peer, msg: None)
        queue.send_nowait("scheduler", QueueMessageCommit(msgid=1))
        queue.send_pending("scheduler")         # cannot leave: kept, first in line
        waiting = asyncio.create_task(queue.send("scheduler", QueueMessageCommit(msgid=2)))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        queue.send_nowait("scheduler", QueueMessageCommit(msgid=3))    # behind 2, not waiting
        scheduler = Mesh("scheduler", rundir)
        scheduler.open()
        await waiting                           # connected: the outbox drains
        queue.send_nowait("scheduler", QueueMessageCommit(msgid=4))
        queue.send_pending("scheduler")
        # already on its way, although this turn of the loop has not ended
        assert scheduler.socks["queue"].poll(5000)
        scheduler.start(on_message)
        await asyncio.wait_for(done.wait(), 10)
        queue.close()
        scheduler.close()
        return got

    assert run(main()) == [1, 2, 3, 4]
