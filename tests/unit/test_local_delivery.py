"""The delivery workers: pony's pool (smtpd/mda_workers.py) with the parent's
WorkerProcesses (smtpd/local_delivery.py) called in process, as pony's requests
to the parent do.  One fork serves a burst for one user, a worker that dies
mid-delivery is a temporary failure, idle workers go away."""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
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


async def spawn_with_pair(parent: WorkerProcesses, uid: int, gid: int, kind: int) -> tuple[str, str, int]:
    a, b = socket.socketpair(socket.AF_UNIX, kind)
    try:
        return await parent.spawn(uid, gid, b)
    finally:
        a.close()
        b.close()


def test_the_parent_forks_no_worker_for_root_nor_for_a_socket_of_another_kind(monkeypatch):
    """What the parent checks of pony's MdaWorkerSpawn: uid 0 is refused (as root), only
    an AF_UNIX seqpacket socket goes to a process that runs as a mail user, and the
    number of workers is bounded."""
    monkeypatch.setattr(local_delivery, "MAX_WORKERS", 1)

    async def go():
        parent = WorkerProcesses()
        try:
            root = None
            if os.getuid() == 0:
                root = await spawn_with_pair(parent, 0, 0, socket.SOCK_SEQPACKET)
            stream = await spawn_with_pair(parent, UID, GID, socket.SOCK_STREAM)
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            first = await parent.spawn(UID, GID, b)
            second = await spawn_with_pair(parent, UID, GID, socket.SOCK_SEQPACKET)
            b.close()
            a.close()                               # the worker reads the end and exits
            ended = await parent.exit_text(first[2])
            return root, stream, first, second, ended, dict(parent.running)
        finally:
            parent.close()

    root, stream, first, second, ended, running = asyncio.run(go())
    if os.getuid() == 0:
        assert root == ("permfail", "MDA not allowed to deliver to root", 0)
    assert stream == ("tempfail", "not a delivery socket", 0)
    assert first[:2] == ("ok", "") and first[2] > 0
    assert second == ("tempfail", "too many delivery processes", 0)
    assert ended == "delivery process exited with status 0" and running == {}


def test_the_parent_kills_only_a_worker_of_its_own():
    """MdaWorkerKill with a pid the parent did not fork does nothing."""
    other = subprocess.Popen(["sleep", "30"])

    async def go():
        parent = WorkerProcesses()
        try:
            await parent.kill(other.pid)
            await asyncio.sleep(0.1)
            return other.poll()
        finally:
            parent.close()
    try:
        assert asyncio.run(go()) is None
    finally:
        other.kill()
        other.wait()


def test_past_the_pool_bound_the_idle_worker_used_longest_ago_makes_room(mailroot, monkeypatch):
    """Three users, a pool bound of two workers: the third user's worker is started
    after the first user's, idle the longest, is sent away (and exits)."""
    monkeypatch.setattr(mda_workers, "MAX_WORKERS", 2)
    ids = [(65534 - n, 65534 - n) for n in range(3)] if os.getuid() == 0 else [(UID, GID + n) for n in range(3)]

    async def go():
        pool, parent = new_pool()
        try:
            results, pids = [], []
            for n, (uid, gid) in enumerate(ids):
                req, _, _, fd = order(mailroot / f"user{n}" / "Maildir", n)
                results.append(await run_one(pool, req, uid, gid, fd))
                pids.append(pool.workers[(uid, gid)][0].pid)
            keys = sorted(pool.workers)
            first_ended = await parent.exit_text(pids[0])
            return results, keys, first_ended, pids[1] in parent.running, pids[2] in parent.running
        finally:
            pool.close()
            parent.close()

    results, keys, first_ended, second_alive, third_alive = asyncio.run(go())
    assert results == [("ok", "")] * 3
    assert keys == sorted(ids[1:])
    assert first_ended == "delivery process exited with status 0" and second_alive and third_alive
