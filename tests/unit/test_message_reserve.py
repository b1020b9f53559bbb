"""pony's reserve of message ids (smtpd/enqueue.py MessageReserve): several ids per
round trip to the queue, refilled at half, paused after a refusal."""
from __future__ import annotations

import asyncio

from common.messages import SmtpMessageCreate, SmtpMessageCreateReply
from smtpd import enqueue
from tests.unit.test_ttl_cache import Clock


class FakeQueue:
    """Stands in for the queue's channel: answers SmtpMessageCreate with fresh ids,
    or refuses while ``refuse`` is set, and records every request."""

    def __init__(self) -> None:
        self.requests: list[SmtpMessageCreate] = []
        self.next_id = 0x100
        self.refuse = False

    async def request(self, peer, msg, reply_types, timeout=None):
        assert peer == "queue" and SmtpMessageCreateReply in reply_types
        self.requests.append(msg)
        await asyncio.sleep(0)
        if self.refuse:
            return SmtpMessageCreateReply(reqid=msg.reqid, ok=False)
        ids = list(range(self.next_id, self.next_id + msg.count))
        self.next_id += msg.count
        return SmtpMessageCreateReply(reqid=msg.reqid, ok=True, msgid=ids[0], more=ids[1:])


class FakeCtx:
    def __init__(self) -> None:
        self.reqid = 0

    def new_id(self) -> int:
        self.reqid += 1
        return self.reqid


class FakePony:
    def __init__(self) -> None:
        self.mesh = FakeQueue()
        self.ctx = FakeCtx()
        self.tasks: list[asyncio.Task] = []

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self.tasks.append(task)
        return task

    async def settle(self) -> None:
        while self.tasks:
            await self.tasks.pop()


def test_reserve_takes_several_ids_per_request():
    async def scenario():
        pony = FakePony()
        reserve = enqueue.MessageReserve(pony, clock=Clock())
        pony.message_reserve = reserve
        first = await enqueue.create_message(pony)       # empty: asks for its own, and fills
        await pony.settle()
        assert first
        assert sorted(r.count for r in pony.mesh.requests) == [1, enqueue.RESERVE]
        taken = []
        for _ in range(40):           # sessions a little apart: each refill is answered
            taken.append(await enqueue.create_message(pony))
            await pony.settle()
        assert len(set(taken + [first])) == 41 and 0 not in taken
        # the reserve never ran dry, and asked once per RESERVE // 2 messages
        assert [r.count for r in pony.mesh.requests[2:]] == [enqueue.RESERVE // 2] * (40 // (enqueue.RESERVE // 2))
        assert all(r.count <= enqueue.RESERVE for r in pony.mesh.requests)
        assert len(reserve.ids) + reserve.asked <= enqueue.RESERVE
    asyncio.run(scenario())


def test_reserve_pauses_after_a_refusal():
    async def scenario():
        pony = FakePony()
        clock = Clock()
        reserve = enqueue.MessageReserve(pony, clock=clock)
        pony.message_reserve = reserve
        pony.mesh.refuse = True
        assert await enqueue.create_message(pony) == 0
        await pony.settle()
        asked = len(pony.mesh.requests)
        assert reserve.paused_until > clock.now
        # while paused, only the session's own request goes out
        assert await enqueue.create_message(pony) == 0
        await pony.settle()
        assert len(pony.mesh.requests) == asked + 1
        pony.mesh.refuse = False
        clock.now += enqueue.RESERVE_PAUSE
        assert await enqueue.create_message(pony)
        await pony.settle()
        assert len(reserve.ids) == enqueue.RESERVE
    asyncio.run(scenario())
