"""The spool on disk, in OpenSMTPD's layout (see docs/spool.md).

    <spool>/            0711
      incoming/<msgid>/         a message being received: its envelopes
      temporary/<msgid>         its body while DATA is received
      queue/<XX>/<msgid>/       committed: ``message`` and one file per envelope
      corrupt/<msgid>/          messages whose files could not be read
      purge/                    trash, emptied at start
      offline/                  sendmail drop box while the daemon is down

Durability: at commit the body and every envelope are fsync'd, the message
directory is fsync'd, renamed into queue/ (the commit point) and queue/<XX>/ is
fsync'd; only then may the client be told ``250``.  Envelope updates are written
to a temporary file, fsync'd and renamed over the old one.
"""
from __future__ import annotations

import errno
import os
import secrets
import shutil
from pathlib import Path

from common import envelope as envcodec
from common.envelope import Envelope, EnvelopeError
from common.ids import random_evpid, random_msgid

SUBDIRS = ("incoming", "temporary", "queue", "corrupt", "purge", "offline")


class SpoolError(Exception):
    def __init__(self, text: str, temporary: bool = True) -> None:
        super().__init__(text)
        self.temporary = temporary


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.incoming = self.root / "incoming"
        self.temporary = self.root / "temporary"
        self.queue = self.root / "queue"
        self.corrupt = self.root / "corrupt"
        self.purge = self.root / "purge"
        self.offline = self.root / "offline"

    # -- set-up (as root, before the privilege drop) ----------------------------------------

    def setup(self, uid: int, gid: int, privileged: bool) -> None:
        self.root.mkdir(mode=0o711, parents=True, exist_ok=True)
        for name in SUBDIRS:
            d = self.root / name
            d.mkdir(mode=0o700, exist_ok=True)
            if privileged:
                os.chown(d, uid, gid)
                os.chmod(d, 0o770 if name == "offline" else 0o700)
        if privileged:
            os.chown(self.root, 0, 0)
            os.chmod(self.root, 0o711)

    def purge_unfinished(self) -> None:
        """Half-received messages from a previous run are discarded (never acknowledged)."""
        for name in ("incoming", "temporary"):
            d = self.root / name
            if any(d.iterdir()):
                trash = self.purge / f"{name}.{secrets.token_hex(8)}"
                os.rename(d, trash)
                d.mkdir(mode=0o700)
        for entry in self.purge.iterdir():
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)

    # -- paths -------------------------------------------------------------------------------

    def message_dir(self, msgid: int) -> Path:
        return self.queue / f"{msgid >> 24:02x}" / f"{msgid:08x}"

    def envelope_path(self, evpid: int) -> Path:
        return self.message_dir(evpid >> 32) / f"{evpid:016x}"

    # -- receiving -----------------------------------------------------------------------------

    def create_message(self) -> int:
        for _ in range(100):
            msgid = random_msgid()
            if self.message_dir(msgid).exists():
                continue
            try:
                (self.incoming / f"{msgid:08x}").mkdir(mode=0o700)
            except FileExistsError:
                continue
            return msgid
        raise SpoolError("could not allocate a message id")

    def open_body(self, msgid: int):
        fd = os.open(self.temporary / f"{msgid:08x}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        return os.fdopen(fd, "wb", buffering=256 * 1024)

    def write_incoming_envelope(self, msgid: int, env: Envelope) -> int:
        """Write a new envelope of an uncommitted message (fsync'd at commit)."""
        data = None
        for _ in range(20):
            env.id = random_evpid(msgid)
            data = data or envcodec.dump(env)
            try:
                fd = os.open(self.incoming / f"{msgid:08x}" / f"{env.id:016x}",
                             os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue
            try:
                _write_all(fd, data)
            finally:
                os.close(fd)
            return env.id
        raise SpoolError("could not allocate an envelope id")

    def commit(self, msgid: int, body) -> None:
        """Make a fully received message durable and visible (blocking: run in a thread)."""
        name = f"{msgid:08x}"
        body.flush()
        os.fsync(body.fileno())
        body.close()
        inc = self.incoming / name
        os.rename(self.temporary / name, inc / "message")
        for entry in os.listdir(inc):
            if entry != "message":
                fd = os.open(inc / entry, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(inc)
        dest = self.message_dir(msgid)
        bucket = dest.parent
        if not bucket.exists():
            bucket.mkdir(mode=0o700, exist_ok=True)
            fsync_dir(self.queue)
        os.rename(inc, dest)
        fsync_dir(bucket)

    def rollback(self, msgid: int) -> None:
        name = f"{msgid:08x}"
        shutil.rmtree(self.incoming / name, ignore_errors=True)
        try:
            os.unlink(self.temporary / name)
        except FileNotFoundError:
            pass

    # -- queued messages -------------------------------------------------------------------

    def load_envelope(self, evpid: int) -> Envelope:
        with open(self.envelope_path(evpid), "rb") as f:
            data = f.read()
        return envcodec.load(data, evpid)

    def update_envelope(self, env: Envelope) -> None:
        """Atomic, durable rewrite (blocking: run in a thread)."""
        path = self.envelope_path(env.id)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _write_all(fd, envcodec.dump(env))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        fsync_dir(path.parent)

    def add_envelope(self, env: Envelope) -> int:
        """A new envelope for a committed message (a bounce: it shares the message file),
        durable before it is announced: written to a temporary name, fsync'd, renamed
        to a fresh evpid and the directory fsync'd (blocking: run in a thread).  The
        caller keeps another envelope of the message on disk meanwhile, so the message
        directory cannot go away under it."""
        msgdir = self.message_dir(env.id >> 32)
        msgid = env.id >> 32
        tmp = msgdir / f".new.{secrets.token_hex(6)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            for _ in range(20):
                env.id = random_evpid(msgid)
                if not (msgdir / f"{env.id:016x}").exists():
                    break
            else:
                raise SpoolError("could not allocate an envelope id")
            _write_all(fd, envcodec.dump(env))
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.rename(tmp, msgdir / f"{env.id:016x}")
        fsync_dir(msgdir)
        return env.id

    def delete_envelope(self, evpid: int) -> None:
        """Remove an envelope; the message goes with its last envelope."""
        path = self.envelope_path(evpid)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        msgdir = path.parent
        try:
            left = [n for n in os.listdir(msgdir) if n != "message"]
        except FileNotFoundError:
            return
        if not left:
            # the message file and its directory, without rmtree's directory walk
            try:
                os.unlink(msgdir / "message")
                os.rmdir(msgdir)
            except FileNotFoundError:
                pass
            except OSError:
                shutil.rmtree(msgdir, ignore_errors=True)

    def read_message(self, msgid: int) -> bytes:
        with open(self.message_dir(msgid) / "message", "rb") as f:
            return f.read()

    def move_to_corrupt(self, msgid: int) -> Path:
        src = self.message_dir(msgid)
        dest = self.corrupt / f"{msgid:08x}"
        if dest.exists():
            dest = self.corrupt / f"{msgid:08x}.{secrets.token_hex(4)}"
        os.rename(src, dest)
        return dest

    def walk(self):
        """Yield (msgid, [evpid...]) for every committed message, bucket by bucket."""
        for bucket in sorted(os.listdir(self.queue)):
            if len(bucket) != 2:
                continue
            for msgdir in sorted(os.listdir(self.queue / bucket)):
                if len(msgdir) != 8:
                    continue
                try:
                    msgid = int(msgdir, 16)
                    names = os.listdir(self.queue / bucket / msgdir)
                except (ValueError, OSError):
                    continue
                evpids = []
                for name in names:
                    if len(name) == 16:
                        try:
                            evpids.append(int(name, 16))
                        except ValueError:
                            pass
                yield msgid, sorted(evpids)


    # -- admin commands (smtpctl show envelope/message, discover, uncorrupt) -----------------

    def read_envelope_file(self, evpid: int) -> bytes:
        """The envelope file as it is on disk (show envelope)."""
        with open(self.envelope_path(evpid), "rb") as f:
            return f.read()

    def envelope_ids(self, msgid: int) -> list[int]:
        """The evpids whose files are in a queued message's directory (sorted);
        FileNotFoundError if the message is not in queue/."""
        return _evpids_in(self.message_dir(msgid), msgid)

    def corrupt_envelope_ids(self, path: Path, msgid: int) -> list[int]:
        """The evpids of a message moved to corrupt/ (``path``), [] if unreadable."""
        try:
            return _evpids_in(path, msgid)
        except OSError:
            return []

    def uncorrupt(self, msgid: int) -> None:
        """Move corrupt/<msgid> back to its place in queue/.  Raises SpoolError
        (with the reason an admin can act on) if it is not there or the place is taken."""
        src = self.corrupt / f"{msgid:08x}"
        if not src.is_dir():
            raise SpoolError(f"no message {msgid:08x} in corrupt/", temporary=False)
        dest = self.message_dir(msgid)
        if dest.exists():
            raise SpoolError(f"message {msgid:08x} is already in queue/", temporary=False)
        dest.parent.mkdir(mode=0o700, exist_ok=True)
        os.rename(src, dest)
        fsync_dir(dest.parent)
        fsync_dir(self.corrupt)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def is_disk_error(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS)


def _evpids_in(msgdir: Path, msgid: int) -> list[int]:
    """Envelope file names of a message directory: 16 hex digits whose upper half is
    the message's id (anything else there is not an envelope of it)."""
    evpids = []
    for name in os.listdir(msgdir):
        if len(name) != 16:
            continue
        try:
            evpid = int(name, 16)
        except ValueError:
            continue
        if evpid >> 32 == msgid and evpid & 0xFFFFFFFF:
            evpids.append(evpid)
    return sorted(evpids)
