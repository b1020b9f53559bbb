import os
import pwd
import shutil
import tempfile
from pathlib import Path

import pytest

from common.envelope import Envelope
from smtpd.queue_fs import Spool


@pytest.fixture
def spool(tmp_path):
    s = Spool(tmp_path / "spool")
    s.setup(os.getuid(), os.getgid(), privileged=False)
    return s


def receive(spool, rcpts=("a@b.test",), body=b"Subject: x\n\nhi\n"):
    msgid = spool.create_message()
    evpids = [spool.write_incoming_envelope(msgid, Envelope(dispatcher="local", type="mda", rcpt=r, dest=r))
              for r in rcpts]
    f = spool.open_body(msgid)
    f.write(body)
    return msgid, evpids, f


def test_commit_moves_the_message_into_its_bucket(spool):
    msgid, evpids, f = receive(spool, ("a@b.test", "c@d.test"))
    assert all(e >> 32 == msgid for e in evpids) and len(set(evpids)) == 2
    spool.commit(msgid, f)
    d = spool.message_dir(msgid)
    assert d.parent.name == f"{msgid >> 24:02x}" and d.name == f"{msgid:08x}"
    assert sorted(os.listdir(d)) == sorted(["message"] + [f"{e:016x}" for e in evpids])
    assert spool.read_message(msgid) == b"Subject: x\n\nhi\n"
    assert os.listdir(spool.incoming) == [] and os.listdir(spool.temporary) == []
    assert list(spool.walk()) == [(msgid, sorted(evpids))]
    assert spool.load_envelope(evpids[0]).rcpt in ("a@b.test", "c@d.test")


def test_rollback_leaves_nothing(spool):
    msgid, _, f = receive(spool)
    f.close()
    spool.rollback(msgid)
    assert os.listdir(spool.incoming) == [] and os.listdir(spool.temporary) == []
    assert list(spool.walk()) == []


def test_unfinished_messages_are_purged_at_start(spool):
    msgid, _, f = receive(spool)
    f.close()
    spool.purge_unfinished()
    assert os.listdir(spool.incoming) == [] and os.listdir(spool.temporary) == []
    assert os.listdir(spool.purge) == []


def test_update_and_delete_envelopes(spool):
    msgid, evpids, f = receive(spool, ("a@b.test", "c@d.test"))
    spool.commit(msgid, f)
    env = spool.load_envelope(evpids[0])
    env.retry, env.errorline = 3, "421 4.0.0 later"
    spool.update_envelope(env)
    assert spool.load_envelope(evpids[0]).retry == 3
    assert [n for n in os.listdir(spool.message_dir(msgid)) if n.startswith(".")] == []
    assert os.listdir(spool.incoming) == []          # its temporary copy was renamed away
    spool.delete_envelope(evpids[0])
    assert spool.message_dir(msgid).exists()
    spool.delete_envelope(evpids[1])
    assert not spool.message_dir(msgid).exists()        # the message goes with its last envelope


def test_corrupt_message_is_moved_aside(spool):
    msgid, evpids, f = receive(spool)
    spool.commit(msgid, f)
    spool.envelope_path(evpids[0]).write_bytes(b"garbage")
    dest = spool.move_to_corrupt(msgid)
    assert dest.parent == spool.corrupt and (dest / "message").exists()
    assert list(spool.walk()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to set the spool up as the daemon does")
def test_purge_needs_no_right_on_the_spool_top_directory(tmp_path):
    # As root the top directory belongs to root (0711) and the queue runs as _smtpq:
    # debris of a crash must be purged with rights on incoming/, temporary/, purge/ only.
    nobody = pwd.getpwnam("nobody")
    top = Path(tempfile.mkdtemp(prefix="pysmtpd-spool-"))
    try:
        os.chmod(top, 0o711)
        spool = Spool(top / "spool")
        spool.setup(nobody.pw_uid, nobody.pw_gid, privileged=True)
        pid = os.fork()
        if pid == 0:                                  # the queue's view of it
            code = 1
            try:
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
                receive(spool)[2].close()
                spool.purge_unfinished()
                code = 0
            finally:
                os._exit(code)
        assert os.waitpid(pid, 0)[1] == 0, "purge failed as the spool's owner"
        assert os.listdir(spool.incoming) == [] and os.listdir(spool.temporary) == []
        assert os.listdir(spool.purge) == []
    finally:
        shutil.rmtree(top)


def test_group_commit_commits_each_message_or_reports_its_error(spool):
    good = [receive(spool, (f"r{i}@b.test",), body=f"Subject: {i}\n\nbody {i}\n".encode()) for i in range(3)]
    lost_msgid, _, lost_body = receive(spool)
    os.unlink(spool.temporary / f"{lost_msgid:08x}")        # its body is gone: it cannot commit
    batch = [(m, f) for m, _, f in good[:2]] + [(lost_msgid, lost_body)] + [(good[2][0], good[2][2])]
    results = spool.commit_batch(batch)
    assert [r is None for r in results] == [True, True, False, True]
    assert isinstance(results[2], FileNotFoundError)
    for i, (msgid, evpids, _) in enumerate(good):
        assert spool.read_message(msgid) == f"Subject: {i}\n\nbody {i}\n".encode()
        assert spool.load_envelope(evpids[0]).rcpt == f"r{i}@b.test"
    assert sorted(m for m, _ in spool.walk()) == sorted(m for m, _, _ in good)
    # the failed one is left for the caller's rollback, which removes all of it
    spool.rollback(lost_msgid)
    assert os.listdir(spool.incoming) == [] and os.listdir(spool.temporary) == []


def test_a_body_that_cannot_be_flushed_fails_its_commit_and_is_closed(spool):
    msgid, _, body = receive(spool)
    real = body.raw
    os.close(real.fileno())            # a write error at flush time (EBADF: no real disk to fill here)
    results = spool.commit_batch([(msgid, body)])
    assert isinstance(results[0], OSError) and body.closed
    spool.rollback(msgid)
    assert os.listdir(spool.incoming) == [] and os.listdir(spool.temporary) == []


def test_load_envelope_mtime_is_the_file_s(spool):
    msgid, evpids, f = receive(spool)
    spool.commit(msgid, f)
    env, mtime = spool.load_envelope_mtime(evpids[0])
    assert env.id == evpids[0] and mtime == os.stat(spool.envelope_path(evpids[0])).st_mtime
    assert spool.envelope_file(evpids[0]) == str(spool.envelope_path(evpids[0]))


def test_the_listing_cache_follows_every_change_of_an_envelope(spool):
    msgid, evpids, f = receive(spool, ("a@b.test", "c@d.test"))
    spool.commit(msgid, f)
    first = spool.load_envelope(evpids[0])                # read from disk: remembered
    assert evpids[0] in spool.listing
    listed = spool.listed_envelope(evpids[0])
    assert (listed.rcpt, listed.dispatcher, listed.ctime, listed.flags) == \
        (first.rcpt, first.dispatcher, first.ctime, first.flags)
    first.retry, first.errorline, first.last_try = 2, "421 later", 1700000000
    spool.update_envelope(first)
    listed = spool.listed_envelope(evpids[0])
    assert (listed.retry, listed.errorline, listed.last_try) == (2, "421 later", 1700000000)
    assert spool.listed_envelope(evpids[1]).rcpt in ("a@b.test", "c@d.test")   # not cached: disk
    spool.delete_envelope(evpids[0])
    assert evpids[0] not in spool.listing
    spool.load_envelope(evpids[1])
    spool.move_to_corrupt(msgid)
    assert evpids[1] not in spool.listing
    with pytest.raises(FileNotFoundError):
        spool.listed_envelope(evpids[1])


def test_group_commit_without_syncfs_fsyncs_each_file(spool, monkeypatch):
    # the path taken on kernels whose syncfs does not report I/O errors (Linux < 5.8)
    import smtpd.queue_fs as queue_fs
    monkeypatch.setattr(queue_fs, "_syncfs", None)
    received = [receive(spool, (f"r{i}@b.test",)) for i in range(3)]
    assert spool.commit_batch([(m, f) for m, _, f in received]) == [None, None, None]
    assert sorted(m for m, _ in spool.walk()) == sorted(m for m, _, _ in received)
    assert os.listdir(spool.incoming) == [] and os.listdir(spool.temporary) == []
