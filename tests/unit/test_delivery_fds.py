"""Message descriptors by key over a seqpacket pair (smtpd/fd_channel.py), and the
body read from one after the reader changed user (smtpd/delivery_body.py)."""
from __future__ import annotations

import asyncio
import os
import socket

import pytest

from smtpd import fd_channel
from smtpd.delivery_body import MessageBody, read_head
from tests.unit.delivery_helpers import message_fd as message


def test_descriptors_arrive_by_key_in_any_order():
    async def go():
        a, b = fd_channel.make_pair()
        receiver = fd_channel.FdReceiver(b)
        receiver.start()
        one, two = message(b"one"), message(b"two")
        await fd_channel.send_fd(a, 2, two)
        await fd_channel.send_fd(a, 1, one)
        os.close(one), os.close(two)
        got1 = await receiver.take(1, 2.0)
        got2 = await receiver.take(2, 2.0)
        texts = os.pread(got1, 10, 0), os.pread(got2, 10, 0)
        os.close(got1), os.close(got2)
        with pytest.raises(TimeoutError):
            await receiver.take(3, 0.1)
        receiver.stop()
        a.close(), b.close()
        return texts
    assert asyncio.run(go()) == (b"one", b"two")


def test_take_waits_for_a_descriptor_still_on_its_way():
    async def go():
        a, b = fd_channel.make_pair()
        receiver = fd_channel.FdReceiver(b)
        receiver.start()
        fd = message(b"late")

        async def later():
            await asyncio.sleep(0.2)
            await fd_channel.send_fd(a, 7, fd)
        task = asyncio.create_task(later())
        got = await receiver.take(7, 5.0)
        await task
        data = os.pread(got, 10, 0)
        os.close(got), os.close(fd)
        receiver.stop()
        a.close(), b.close()
        return data
    assert asyncio.run(go()) == b"late"


def test_orphans_and_junk_are_closed(monkeypatch):
    monkeypatch.setattr(fd_channel, "ORPHAN_SECONDS", 0.0)
    async def go():
        a, b = fd_channel.make_pair()
        receiver = fd_channel.FdReceiver(b)
        receiver.start()
        fd = message(b"x")
        await fd_channel.send_fd(a, 1, fd)
        socket.send_fds(a, [b"short"], [fd])           # malformed: closed, not kept
        await asyncio.sleep(0.1)
        await fd_channel.send_fd(a, 2, fd)             # its arrival expires key 1, not itself
        await asyncio.sleep(0.1)
        keys = sorted(receiver.pending)
        receiver.stop()
        os.close(fd)
        a.close(), b.close()
        return keys
    assert asyncio.run(go()) == [2]


def test_body_reads_by_offset_and_sendfile(tmp_path):
    fd = message(b"Subject: s\n\nbody\n" * 1000)
    os.lseek(fd, 5, os.SEEK_SET)                       # a shared offset moved elsewhere
    body = MessageBody(b"Delivered-To: a@x\n", fd)
    assert len(body) == 18 + 17000
    assert b"".join(body.chunks()) == b"Delivered-To: a@x\n" + b"Subject: s\n\nbody\n" * 1000
    out = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT, 0o600)
    body.write_to(out)
    os.close(out)
    assert (tmp_path / "out").read_bytes() == b"".join(body.chunks())
    assert read_head(fd).startswith(b"Subject: s\n\n")
    os.close(fd)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to change user")
def test_a_descriptor_opened_before_setuid_stays_readable(tmp_path):
    path = tmp_path / "message"
    path.write_bytes(b"secret to the user, readable through the descriptor")
    os.chmod(path, 0o600)
    fd = os.open(path, os.O_RDONLY)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.setresgid(65534, 65534, 65534)
        os.setresuid(65534, 65534, 65534)
        try:
            os.open(path, os.O_RDONLY)
            os.write(w, b"opened by path!")
        except PermissionError:
            os.write(w, os.pread(fd, 100, 0))
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    assert os.read(r, 200) == path.read_bytes()
    os.close(r), os.close(fd)
