"""The delivery workers: pony's pool (smtpd/mda_workers.py) with the parent's
WorkerProcesses (smtpd/local_delivery.py) called in process, as pony's requests
to the parent do.  One fork serves a burst for one user, a worker that dies
mid-delivery is a temporary failure, idle workers go away."""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest

from smtpd import delivery_mbox, local_delivery, mda_workers
from smtpd.local_delivery import Request, WorkerProcesses
from smtpd.mda_workers import DeliveryPool
from tests.unit.delivery_helpers import message_fd

UID = os.getuid() if os.getuid() else 65534
GID = os.getgid() if os.getuid() else 65534


def order(path, n: int, **kw) -> tuple[Request, int, int, int]:
    """(request, uid, gid, descriptor) as pony hands them to the pool."""
    req = Request(kw.get("method", "maildir"), str(path), False, b"Delivered-To: x@example.test\n",
                  "s@example.test", "x@example.test", "x@example.test", "nobody", "/", "", "x@example.test")
    return req, UID, GID, message_fd(f"Subject: {n}\n\nbody {n}\n".encode())


async def run_one(pool: DeliveryPool, req, uid, gid, fd) -> tuple[str, str]:
    try:
        return await pool.run(req, uid, gid, fd)
    finally:
        os.close(fd)


def new_pool() -> tuple[DeliveryPool, WorkerProcesses]:
    parent = WorkerProcesses()
    return DeliveryPool(parent), parent


@pytest.fixture
def mailroot(tmp_path):
    """A folder the delivery user can write: as root the worker runs as nobody, who
    cannot reach pytest's 0700 temporary tree."""
    if os.getuid() != 0:
        yield tmp_path
        return
    root = Path(tempfile.mkdtemp(prefix="pysmtpd-lda-"))
    os.chmod(root, 0o777)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_burst_for_one_user_is_served_by_one_worker(mailroot, monkeypatch):
    monkeypatch.setattr(mda_workers, "IDLE_SECONDS", 0.2)
    box = mailroot / "Maildir"

    async def go():
        pool, parent = new_pool()
        results = [await run_one(pool, *order(box, n)) for n in range(5)]
        workers = [w for ws in pool.workers.values() for w in ws]
        pids = {w.pid for w in workers}
        served = sum(w.served for w in workers)
        await asyncio.sleep(0.5)                  # idle: sent away
        left = dict(pool.workers)
        pool.close()
        parent.close()
        return results, pids, served, left

    results, pids, served, left = asyncio.run(go())
    assert results == [("ok", "")] * 5
    assert len(pids) == 1 and served == 5 and left == {}
    bodies = sorted(p.read_bytes() for p in (box / "new").iterdir())
    assert bodies == sorted(f"Delivered-To: x@example.test\nSubject: {n}\n\nbody {n}\n".encode() for n in range(5))
    for pid in pids:                               # the worker is gone, and reaped
        try:
            os.kill(pid, 0)
            alive = open(f"/proc/{pid}/stat").read().split(")")[1].split()[0] != "Z"
        except (ProcessLookupError, FileNotFoundError):
            alive = False
        assert not alive


def test_a_worker_killed_mid_delivery_is_a_tempfail_and_replaced(mailroot, monkeypatch):
    box = mailroot / "Maildir"
    real = mda_workers._Worker.deliver

    async def deliver_then_die(self, req, fd):
        os.kill(self.pid, signal.SIGKILL)
        return await real(self, req, fd)

    async def go():
        pool, parent = new_pool()
        monkeypatch.setattr(mda_workers._Worker, "deliver", deliver_then_die)
        first = await run_one(pool, *order(box, 1))
        monkeypatch.setattr(mda_workers._Worker, "deliver", real)
        second = await run_one(pool, *order(box, 2))
        pool.close()
        parent.close()
        return first, second

    first, second = asyncio.run(go())
    assert first[0] == "tempfail" and "signal 9" in first[1]
    assert second == ("ok", "")


def test_unsupported_method_is_a_permanent_failure(tmp_path):
    async def go():
        pool, parent = new_pool()
        try:
            return await run_one(pool, *order(tmp_path / "M", 1, method="smoke-signals"))
        finally:
            pool.close()
            parent.close()
    status, error = asyncio.run(go())
    assert status == "permfail" and "smoke-signals" in error


def test_every_method_through_the_worker(mailroot):
    """mbox (mailbox made by the pool, as root), /file, an mda command and maildir,
    each from a descriptor, as the user."""
    async def go():
        pool, parent = new_pool()
        try:
            results = [await run_one(pool, *order(mailroot / "Maildir", 1))]
            # the mailbox is the parent's to make, as root (Parent._prepare_mbox)
            delivery_mbox.prepare_mailbox(str(mailroot), "nobody", UID, GID)
            results.append(await run_one(pool, *order(mailroot / "nobody", 2, method="mbox")))
            results.append(await run_one(pool, *order(mailroot / "copy.mbox", 3, method="file")))
            results.append(await run_one(pool, *order(
                f'cat > {mailroot}/piped; echo "$USER $RECIPIENT" >> {mailroot}/piped', 4, method="mda")))
            return results
        finally:
            pool.close()
            parent.close()
    assert asyncio.run(go()) == [("ok", "")] * 4
    assert (mailroot / "nobody").read_bytes().startswith(b"From s@example.test ")
    assert b"Subject: 2\n\nbody 2\n\n" in (mailroot / "nobody").read_bytes()
    assert (mailroot / "copy.mbox").read_bytes().endswith(b"Subject: 3\n\nbody 3\n\n")
    assert (mailroot / "piped").read_bytes() == \
        b"Delivered-To: x@example.test\nSubject: 4\n\nbody 4\nnobody x@example.test\n"
    if os.getuid() == 0:
        assert (mailroot / "nobody").stat().st_uid == 65534


def test_a_stuck_worker_is_killed_at_the_deadline_and_replaced(mailroot, monkeypatch):
    """A delivery that does not finish: the request ends as a tempfail at the deadline,
    the worker is killed (and reaped), the next request gets a fresh worker."""
    monkeypatch.setattr(mda_workers, "DELIVERY_TIMEOUT", 0.5)
    pids = []
    real = mda_workers._Worker.deliver

    async def deliver(self, req, fd):
        pids.append(self.pid)
        return await real(self, req, fd)

    monkeypatch.setattr(mda_workers._Worker, "deliver", deliver)

    async def go():
        pool, parent = new_pool()
        real_one = local_delivery._deliver_one
        try:
            # the worker forked for the first request is stuck (killed, so nothing lingers)
            monkeypatch.setattr(local_delivery, "_deliver_one", lambda req, fd: time.sleep(30))
            first = await run_one(pool, *order(mailroot / "Maildir", 1))
            monkeypatch.setattr(local_delivery, "_deliver_one", real_one)
            second = await run_one(pool, *order(mailroot / "Maildir", 2))
            await asyncio.sleep(0.3)                # the killed one is reaped meanwhile
            return first, second
        finally:
            pool.close()
            parent.close()

    first, second = asyncio.run(go())
    assert first == ("tempfail", "terminated; timeout")
    assert second == ("ok", "")
    assert len(pids) == 2 and pids[0] != pids[1]
    assert not os.path.exists(f"/proc/{pids[0]}")


def test_requests_beyond_the_workers_per_user_wait_their_turn(mailroot, monkeypatch):
    """More requests at once than WORKERS_PER_USER: every one is delivered, by at most
    that many workers, and none is lost while waiting."""
    monkeypatch.setattr(mda_workers, "WORKERS_PER_USER", 2)
    box = mailroot / "Maildir"

    async def go():
        pool, parent = new_pool()
        pids = set()
        real = mda_workers._Worker.deliver

        async def deliver(self, req, fd):
            pids.add(self.pid)
            return await real(self, req, fd)

        monkeypatch.setattr(mda_workers._Worker, "deliver", deliver)
        try:
            results = await asyncio.gather(*(run_one(pool, *order(box, n)) for n in range(9)))
            return results, pids, dict(pool.waiting), dict(pool.freed)
        finally:
            pool.close()
            parent.close()

    results, pids, waiting, freed = asyncio.run(go())
    assert results == [("ok", "")] * 9
    assert len(pids) == 2 and waiting == {} and freed == {}     # nothing kept per user once idle
    assert len(list((box / "new").iterdir())) == 9
