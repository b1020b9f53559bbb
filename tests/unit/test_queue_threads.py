"""The queue's group committer and remover over a real spool: the committer reports
a whole batch in one call, the remover removes in order, in batches, on the event
loop, and ``run`` does every removal asked before it."""
import asyncio
import os

import pytest

from smtpd.queue import Committer, Remover
from smtpd.queue_fs import Spool
from tests.unit.test_queue_fs import receive


@pytest.fixture
def spool(tmp_path):
    s = Spool(tmp_path / "spool")
    s.setup(os.getuid(), os.getgid(), privileged=False)
    return s


def test_remover_removes_in_order_and_the_message_goes_with_its_last_envelope(spool):
    one, one_evpids, f = receive(spool, ("a@b.test", "c@d.test"))
    spool.commit(one, f)
    two, two_evpids, f = receive(spool)
    spool.commit(two, f)

    async def go():
        # ``before`` runs first in each batch (the scheduler's notice), files still there
        seen_before = []
        remover = Remover(spool, before=lambda: seen_before.append(spool.message_dir(two).exists()))
        remover.remove(one_evpids[0])
        remover.remove(two_evpids[0])
        assert spool.message_dir(two).exists()          # batched: not before BATCH_DELAY
        await asyncio.sleep(Remover.BATCH_DELAY * 5)
        # the first message keeps its body for its other envelope; the second is gone
        assert sorted(os.listdir(spool.message_dir(one))) == sorted(["message", f"{one_evpids[1]:016x}"])
        assert not spool.message_dir(two).exists() and seen_before == [True]
        remover.remove(one_evpids[1])
        remover.remove(one_evpids[1])       # twice (removed while in flight): harmless
        remover.run()                                   # at once (discover, stop)
        assert not spool.message_dir(one).exists() and remover.timer is None
        assert len(seen_before) == 2
        assert list(spool.walk()) == []

    asyncio.run(go())


def test_remover_run_without_any_removal_does_nothing(spool):
    remover = Remover(spool)
    remover.run()
    assert remover.batch == [] and remover.timer is None


def test_committer_answers_a_batch_in_one_call(spool):
    async def go():
        batches = []
        done = asyncio.Event()

        def on_batch(batch):
            batches.append(batch)
            if sum(len(b) for b in batches) == 3:
                done.set()

        committer = Committer(spool, on_batch)
        msgids = []
        for _ in range(3):
            msgid, _, f = receive(spool)
            msgids.append(msgid)
            committer.commit(("item", msgid), msgid, f)
        await asyncio.wait_for(done.wait(), 10)
        results = [entry for batch in batches for entry in batch]
        assert [item for item, _ in results] == [("item", m) for m in msgids]
        assert all(error is None for _, error in results)
        assert len(batches) == 1            # committed in one turn: one batch, one pair of syncs
        assert sorted(m for m, _ in spool.walk()) == sorted(msgids)

    asyncio.run(go())
