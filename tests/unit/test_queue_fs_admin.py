"""The spool side of smtpctl's queue administration: envelope ids of a message,
corrupt/ and back (uncorrupt)."""
from __future__ import annotations

import os

import pytest

from common.envelope import Envelope
from smtpd.queue_fs import Spool, SpoolError


@pytest.fixture
def spool(tmp_path):
    s = Spool(tmp_path / "spool")
    s.setup(os.getuid(), os.getgid(), privileged=False)
    return s


def queued(spool, rcpts=("a@b.test", "c@d.test")):
    msgid = spool.create_message()
    evpids = [spool.write_incoming_envelope(msgid, Envelope(dispatcher="local", type="mda", rcpt=r, dest=r))
              for r in rcpts]
    body = spool.open_body(msgid)
    body.write(b"Subject: x\n\nhi\n")
    spool.commit(msgid, body)
    return msgid, sorted(evpids)


def test_envelope_ids_and_file_bytes(spool):
    msgid, evpids = queued(spool)
    d = spool.message_dir(msgid)
    (d / "notes.txt").write_text("not an envelope")
    (d / f"{(msgid ^ 1) << 32 | 5:016x}").write_text("another message's id")
    (d / f"{msgid << 32:016x}").write_text("a zero low half")
    assert spool.envelope_ids(msgid) == evpids
    assert spool.read_envelope_file(evpids[0]) == (d / f"{evpids[0]:016x}").read_bytes()
    assert spool.read_envelope_file(evpids[0]).startswith(b"version: 3\n")
    with pytest.raises(FileNotFoundError):
        spool.envelope_ids(msgid ^ 1)
    with pytest.raises(FileNotFoundError):
        spool.read_envelope_file(evpids[0] ^ 1)


def test_corrupt_and_back(spool):
    msgid, evpids = queued(spool)
    dest = spool.move_to_corrupt(msgid)
    assert dest == spool.corrupt / f"{msgid:08x}" and not spool.message_dir(msgid).exists()
    assert spool.corrupt_envelope_ids(dest, msgid) == evpids
    assert spool.corrupt_envelope_ids(spool.corrupt / "nothing", msgid) == []
    spool.uncorrupt(msgid)
    assert spool.envelope_ids(msgid) == evpids and spool.read_message(msgid) == b"Subject: x\n\nhi\n"
    assert os.listdir(spool.corrupt) == []
    with pytest.raises(SpoolError, match=f"no message {msgid:08x} in corrupt/"):
        spool.uncorrupt(msgid)


def test_uncorrupt_never_overwrites_a_queued_message(spool):
    msgid, evpids = queued(spool)
    spool.move_to_corrupt(msgid)
    (spool.message_dir(msgid)).mkdir(parents=True)      # something took its place meanwhile
    with pytest.raises(SpoolError, match="already in queue/"):
        spool.uncorrupt(msgid)
    assert spool.corrupt_envelope_ids(spool.corrupt / f"{msgid:08x}", msgid) == evpids


def test_uncorrupt_recreates_a_missing_bucket(spool):
    msgid, evpids = queued(spool)
    spool.move_to_corrupt(msgid)
    os.rmdir(spool.message_dir(msgid).parent)
    spool.uncorrupt(msgid)
    assert spool.envelope_ids(msgid) == evpids
