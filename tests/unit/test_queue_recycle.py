"""The spool's pool of recycled inodes (smtpd/queue_recycle.py): delivered messages'
files and directories become the next messages' without new inodes."""
import os
import stat

import pytest

from common.envelope import Envelope
from smtpd import queue_fs, queue_recycle
from smtpd.queue_recycle import InodePool, rename_noreplace
from tests.unit.test_queue_fs import receive, spool  # noqa: F401 (spool: the fixture)


def deliver_one(spool, rcpts=("a@b.test",), body=b"Subject: x\n\nsecret\n"):
    msgid, evpids, f = receive(spool, rcpts, body)
    spool.commit(msgid, f)
    return msgid, evpids


def inodes(spool, msgid):
    d = spool.message_dir(msgid)
    return {os.stat(d).st_ino} | {os.stat(d / n).st_ino for n in os.listdir(d)}


def test_a_delivered_message_s_inodes_carry_the_next_message(spool):
    first, evpids = deliver_one(spool, ("a@b.test", "c@d.test"))
    used = inodes(spool, first)
    assert len(used) == 4                                   # directory, message, two envelopes
    for evpid in evpids:
        spool.delete_envelope(evpid)
    assert not spool.message_dir(first).exists()
    # the pool is in purge/: the emptied directory, and the files as they were
    pooled = [os.path.join(spool.purge, n) for n in os.listdir(spool.purge)]
    assert len(pooled) == 4
    assert sum(os.path.isdir(p) and os.listdir(p) == [] for p in pooled) == 1
    second, evpids2 = deliver_one(spool, ("e@f.test", "g@h.test"), body=b"Subject: y\n\nnew\n")
    assert inodes(spool, second) == used                    # no inode made, none freed
    assert spool.read_message(second) == b"Subject: y\n\nnew\n"
    assert {spool.load_envelope(e).rcpt for e in evpids2} == {"e@f.test", "g@h.test"}
    assert os.listdir(spool.purge) == [] and spool.pool.reused == 4
    d = spool.message_dir(second)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert all(stat.S_IMODE(os.stat(d / n).st_mode) == 0o600 for n in os.listdir(d))


def test_a_longer_message_before_a_shorter_one_leaves_nothing_of_the_first(spool):
    long_rcpt = "a-very-long-local-part-" + "x" * 200 + "@example.test"
    first, evpids = deliver_one(spool, (long_rcpt,), body=b"Subject: long\n\n" + b"x" * 100_000 + b"\n")
    spool.delete_envelope(evpids[0])
    assert sorted(size for _, size in spool.pool.files)[-1] > 100_000     # kept with its blocks
    second, evpids2 = deliver_one(spool, ("b@c.test",), body=b"Subject: short\n\nok\n")
    assert spool.pool.reused == 3
    assert spool.read_message(second) == b"Subject: short\n\nok\n"
    assert spool.load_envelope(evpids2[0]).rcpt == "b@c.test"
    assert spool.read_envelope_file(evpids2[0]).count(b"rcpt:") == 1
    # and a longer one after a shorter one
    spool.delete_envelope(evpids2[0])
    third, evpids3 = deliver_one(spool, (long_rcpt,), body=b"Subject: long again\n\n" + b"y" * 50_000 + b"\n")
    assert spool.read_message(third) == b"Subject: long again\n\n" + b"y" * 50_000 + b"\n"
    assert spool.load_envelope(evpids3[0]).rcpt == long_rcpt


def test_a_file_too_big_to_keep_is_unlinked(spool):
    msgid, evpids = deliver_one(spool, body=b"Subject: big\n\n" + b"z" * (queue_recycle.MAX_SIZE + 1))
    spool.delete_envelope(evpids[0])
    assert [size for _, size in spool.pool.files] == [os.path.getsize(spool.pool.files[0][0])]
    assert all(size <= queue_recycle.MAX_SIZE for _, size in spool.pool.files) and len(spool.pool.files) == 1


def test_the_pool_is_emptied_with_purge_at_start(spool):
    _, evpids = deliver_one(spool)
    spool.delete_envelope(evpids[0])
    assert os.listdir(spool.purge)
    spool.purge_unfinished()
    assert os.listdir(spool.purge) == [] and not spool.pool.files and not spool.pool.dirs
    msgid, _ = deliver_one(spool)                            # created afresh
    assert spool.pool.reused == 0 and spool.read_message(msgid)


def test_a_full_pool_unlinks_as_before(spool, monkeypatch):
    monkeypatch.setattr(queue_recycle, "MAX_FILES", 1)
    monkeypatch.setattr(queue_recycle, "MAX_DIRS", 0)
    msgid, evpids = deliver_one(spool, ("a@b.test", "c@d.test"))
    for evpid in evpids:
        spool.delete_envelope(evpid)
    assert not spool.message_dir(msgid).exists()
    assert len(os.listdir(spool.purge)) == 1 and len(spool.pool.files) == 1 and not spool.pool.dirs


def test_files_not_made_by_the_queue_are_never_recycled(spool):
    msgid, evpids = deliver_one(spool)
    d = spool.message_dir(msgid)
    # an admin's hand: a world-readable extra envelope, and a second link to the message
    extra = (evpids[0] & ~0xFFFFFFFF) | 0x1234
    (d / f"{extra:016x}").write_bytes(b"x")
    os.chmod(d / f"{extra:016x}", 0o644)
    os.link(d / "message", spool.root / "a-second-link")
    foreign = {os.stat(d / "message").st_ino, os.stat(d / f"{extra:016x}").st_ino}
    spool.delete_envelope(evpids[0])
    spool.delete_envelope(extra)
    assert not d.exists()
    # the message kept its content for the other link and neither file went to the
    # pool (the queue's own envelope did)
    assert (spool.root / "a-second-link").read_bytes() == b"Subject: x\n\nsecret\n"
    assert len(spool.pool.files) == 1 and len(spool.pool.dirs) == 1
    assert os.stat(spool.pool.files[0][0]).st_ino not in foreign


def test_a_directory_with_something_else_in_it_is_removed_not_recycled(spool):
    msgid, evpids = deliver_one(spool)
    d = spool.message_dir(msgid)
    (d / "notes.txt").write_text("by hand")
    spool.delete_envelope(evpids[0])
    assert not d.exists() and not spool.pool.dirs


def test_taking_a_name_that_exists_fails_as_o_excl_and_keeps_the_entry(tmp_path):
    pool = InodePool(str(tmp_path))
    (tmp_path / "f").write_bytes(b"old")
    os.chmod(tmp_path / "f", 0o600)
    assert pool.recycle_file(str(tmp_path / "f"))
    (tmp_path / "taken").write_bytes(b"keep me")
    with pytest.raises(FileExistsError):
        pool.open_file(str(tmp_path / "taken"))
    assert (tmp_path / "taken").read_bytes() == b"keep me" and len(pool.files) == 1
    os.mkdir(tmp_path / "d", 0o700)
    os.mkdir(tmp_path / "emptydir", 0o700)
    assert pool.recycle_dir(str(tmp_path / "d"))
    with pytest.raises(FileExistsError):            # rename(2) would replace an empty directory
        pool.take_dir(str(tmp_path / "emptydir"))
    assert len(pool.dirs) == 1
    fd, size = pool.open_file(str(tmp_path / "new"))
    assert size == 3                                # "old": the caller writes over it
    os.write(fd, b"n")
    os.ftruncate(fd, 1)
    os.close(fd)
    assert (tmp_path / "new").read_bytes() == b"n" and not pool.files


def test_an_entry_gone_from_the_pool_falls_back_to_a_new_file(tmp_path):
    pool = InodePool(str(tmp_path))
    (tmp_path / "f").write_bytes(b"")
    os.chmod(tmp_path / "f", 0o600)
    assert pool.recycle_file(str(tmp_path / "f"))
    os.unlink(pool.files[0][0])
    assert pool.open_file(str(tmp_path / "new")) is None and not pool.files


def test_rename_noreplace(tmp_path):
    (tmp_path / "a").write_bytes(b"a")
    (tmp_path / "b").write_bytes(b"b")
    with pytest.raises(FileExistsError):
        rename_noreplace(str(tmp_path / "a"), str(tmp_path / "b"))
    rename_noreplace(str(tmp_path / "a"), str(tmp_path / "c"))
    assert (tmp_path / "c").read_bytes() == b"a" and (tmp_path / "b").read_bytes() == b"b"


def test_a_missing_destination_directory_keeps_the_entry(tmp_path):
    pool = InodePool(str(tmp_path))
    (tmp_path / "f").write_bytes(b"")
    os.chmod(tmp_path / "f", 0o600)
    assert pool.recycle_file(str(tmp_path / "f"))
    with pytest.raises(FileNotFoundError):
        pool.open_file(str(tmp_path / "no-such-dir" / "x"))
    assert len(pool.files) == 1 and os.path.exists(pool.files[0][0])


def test_an_id_handed_out_costs_nothing_on_disk_until_its_first_envelope(spool, monkeypatch):
    msgid = spool.create_message()
    assert os.listdir(spool.incoming) == []
    # an id given out and not yet on disk is not given again
    ids = iter([msgid, msgid, msgid ^ 1])
    monkeypatch.setattr(queue_fs, "random_msgid", lambda: next(ids))
    assert spool.create_message(in_use={msgid}) == msgid ^ 1
    spool.write_incoming_envelope(msgid, Envelope(dispatcher="local", type="mda", rcpt="a@b.test", dest="a@b.test"))
    assert os.listdir(spool.incoming) == [f"{msgid:08x}"]
    spool.rollback(msgid)
    assert os.listdir(spool.incoming) == []


def test_an_envelope_update_swaps_in_the_new_version_and_recycles_the_old(spool):
    msgid, evpids = deliver_one(spool)
    path = spool.envelope_file(evpids[0])
    old_inode = os.stat(path).st_ino
    env = spool.load_envelope(evpids[0])
    env.retry, env.errorline = 2, "421 4.0.0 try again later"
    spool.update_envelope(env)
    assert spool.load_envelope(evpids[0]).errorline == "421 4.0.0 try again later"
    assert os.stat(path).st_ino != old_inode
    assert [os.stat(name).st_ino for name, _ in spool.pool.files] == [old_inode]
    assert os.listdir(spool.incoming) == []
    # the next update takes the old version's inode from the pool: none made, none freed
    env.retry = 3
    spool.update_envelope(env)
    assert os.stat(path).st_ino == old_inode and spool.load_envelope(evpids[0]).retry == 3
    assert os.listdir(spool.incoming) == []


def test_an_update_of_an_envelope_that_is_gone_writes_it_as_before(spool):
    msgid, evpids = deliver_one(spool, ("a@b.test", "c@d.test"))
    env = spool.load_envelope(evpids[0])
    os.unlink(spool.envelope_file(evpids[0]))
    env.retry = 5
    spool.update_envelope(env)
    assert spool.load_envelope(evpids[0]).retry == 5 and os.listdir(spool.incoming) == []


def taken_size(pool, dst, size):
    fd, old_size = pool.open_file(str(dst), size)
    os.close(fd)
    return old_size


def test_an_envelope_takes_a_small_file_and_a_body_a_large_one(tmp_path):
    """Each file goes back to its kind: an envelope written over a body's file would
    free blocks when cut to length, a body over an envelope's allocate them."""
    pool = InodePool(str(tmp_path))
    for name, size in (("body1", 6000), ("env1", 700), ("body2", 9000), ("env2", 650)):
        (tmp_path / name).write_bytes(b"x" * size)
        os.chmod(tmp_path / name, 0o600)
        assert pool.recycle_file(str(tmp_path / name))
    assert [s for _, s in pool.small] == [700, 650] and [s for _, s in pool.large] == [6000, 9000]
    assert taken_size(pool, tmp_path / "e1", 800) == 700
    assert taken_size(pool, tmp_path / "b1", None) == 6000          # size unknown: a body
    assert taken_size(pool, tmp_path / "b2", 5000) == 9000
    assert taken_size(pool, tmp_path / "e2", 800) == 650
    # one kind used up: the other serves rather than a new inode
    (tmp_path / "body3").write_bytes(b"x" * 7000)
    os.chmod(tmp_path / "body3", 0o600)
    assert pool.recycle_file(str(tmp_path / "body3"))
    assert taken_size(pool, tmp_path / "e3", 800) == 7000
    assert pool.open_file(str(tmp_path / "e4"), 800) is None and not pool.files
