"""The spool on disk, in OpenSMTPD's layout (see docs/spool.md).

    <spool>/            0711
      incoming/<msgid>/         a message being received: its envelopes
      temporary/<msgid>         its body while DATA is received
      queue/<XX>/<msgid>/       committed: ``message`` and one file per envelope
      corrupt/<msgid>/          messages whose files could not be read
      purge/                    trash, emptied at start
      offline/                  sendmail drop box while the daemon is down (root, 01777)

Durability (group commit): the messages whose DATA ended meanwhile are committed
together.  Their bodies are renamed into incoming/<msgid>/, one syncfs(2) makes
every body, envelope and directory entry durable, each incoming/<msgid>/ is
renamed into queue/<XX>/ (the commit point) and a second syncfs makes the
renames durable; only then may their clients be told ``250``.  Envelope updates
are written to a temporary file, fsync'd and renamed over the old one.
"""
from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
from pathlib import Path

import msgspec

from common import envelope as envcodec
from common.envelope import Envelope
from common.ids import random_evpid, random_msgid
from smtpd.queue_recycle import InodePool, remove_quietly, rename_exchange

def _kernel_reports_syncfs_errors() -> bool:
    """syncfs(2) returns writeback errors only since Linux 5.8; before, it returned 0
    after an I/O error, and a commit could be acknowledged that is not on disk."""
    try:
        major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    except ValueError:
        return False
    return os.uname().sysname == "Linux" and (major, minor) >= (5, 8)


_libc = ctypes.CDLL(None, use_errno=True)     # loaded before any chroot
_syncfs = getattr(_libc, "syncfs", None) if _kernel_reports_syncfs_errors() else None

# What `show queue` prints of an envelope, and the action (for its expiry).
LISTED = ("dispatcher", "type", "sockaddr", "sender", "rcpt", "dest", "ctime", "last_try",
          "retry", "flags", "errorline")
LISTING_CACHE_MAX = 250_000       # entries (about 240 bytes each in RSS): 60 MB at most

_pack = msgspec.msgpack.Encoder().encode
_unpack = msgspec.msgpack.Decoder(tuple).decode

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
        self._sync_fd = -1
        # The same directories as plain strings for the per-message paths: pathlib
        # costs microseconds per join, about 100 us of a message's way (issue 12).
        self._queue_str = str(self.queue)
        self._incoming_str = str(self.incoming)
        self._temporary_str = str(self.temporary)
        # delivered messages' files and directories, for new ones (queue_recycle.py)
        self.pool = InodePool(str(self.purge))
        # evpid -> LISTED fields of the envelope as last read or written, packed: `show
        # queue` of 100,000 envelopes without reading and parsing 100,000 files (read +
        # parse is ~17 us each, the cache ~2 us). Filled by every load; kept exact by
        # update_envelope, delete_envelope and move_to_corrupt, the only ways an
        # envelope of queue/ changes; an envelope not in it is read from disk.
        self.listing: dict[int, bytes] = {}

    # -- set-up (as root, before the privilege drop) ----------------------------------------

    def setup(self, uid: int, gid: int, privileged: bool) -> None:
        self.root.mkdir(mode=0o711, parents=True, exist_ok=True)
        for name in SUBDIRS:
            d = self.root / name
            d.mkdir(mode=0o700, exist_ok=True)
            if privileged and name == "offline":
                # sendmail's drop box (smtpd/offline.py): every user may create a file
                # there, owned by them; the sticky bit keeps them from removing or
                # renaming another's.  OpenSMTPD's is 0770 _smtpq with a setgid
                # smtpctl, which a Python program cannot be.
                os.chown(d, 0, 0)
                os.chmod(d, 0o1777)
            elif privileged:
                os.chown(d, uid, gid)
                os.chmod(d, 0o700)
        if privileged:
            os.chown(self.root, 0, 0)
            os.chmod(self.root, 0o711)

    def purge_unfinished(self) -> None:
        """Half-received messages from a previous run are discarded (never acknowledged).
        Each is renamed into purge/ (atomic: a crash meanwhile leaves it in one place or
        the other) and purge/ is emptied.  Entry by entry, as the spool's top directory
        belongs to root and the queue (_smtpq) may not rename incoming/ itself."""
        for name in ("incoming", "temporary"):
            d = self.root / name
            for entry in os.listdir(d):
                os.rename(d / entry, self.purge / f"{name}.{entry}.{secrets.token_hex(4)}")
        self.pool.clear()
        for entry in self.purge.iterdir():
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)

    # -- paths -------------------------------------------------------------------------------

    def message_dir(self, msgid: int) -> Path:
        return self.queue / f"{msgid >> 24:02x}" / f"{msgid:08x}"

    def envelope_path(self, evpid: int) -> Path:
        return self.message_dir(evpid >> 32) / f"{evpid:016x}"

    def _msgdir(self, msgid: int) -> str:
        """message_dir as a plain string."""
        return f"{self._queue_str}/{msgid >> 24:02x}/{msgid:08x}"

    # -- receiving -----------------------------------------------------------------------------

    def create_message(self, in_use=()) -> int:
        """A fresh message id: used neither in queue/ nor in incoming/, nor among
        ``in_use`` (the ids the queue has given out and not yet committed or rolled
        back).  Nothing is written: ``incoming/<msgid>/`` is made with the message's
        first envelope (write_incoming_envelope), so an id handed out ahead of need
        (pony's reserve, smtpd/enqueue.py) costs nothing on disk."""
        for _ in range(100):
            msgid = random_msgid()
            if (msgid in in_use or os.path.exists(self._msgdir(msgid))
                    or os.path.exists(f"{self._incoming_str}/{msgid:08x}")):
                continue
            return msgid
        raise SpoolError("could not allocate a message id")

    def _make_incoming(self, msgid: int) -> None:
        path = f"{self._incoming_str}/{msgid:08x}"
        if not self.pool.take_dir(path):
            os.mkdir(path, 0o700)

    def open_body(self, msgid: int):
        fd, old_size = self._create(f"{self._temporary_str}/{msgid:08x}")
        body = os.fdopen(fd, "wb", buffering=256 * 1024)
        body.recycled_size = old_size       # cut to the new length at commit
        return body

    def _create(self, path: str, size: int | None = None) -> tuple[int, int]:
        """A new file opened for writing, and the size of what is in it already: from
        the pool (the caller writes over it and cuts it to its own length; ``size``,
        what it will write, picks a file of about that size), else created empty.
        O_EXCL either way: FileExistsError if ``path`` exists."""
        taken = self.pool.open_file(path, size)
        if taken is None:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), 0
        return taken

    def write_incoming_envelope(self, msgid: int, env: Envelope) -> int:
        """Write a new envelope of an uncommitted message (fsync'd at commit)."""
        data = None
        for _ in range(20):
            env.id = random_evpid(msgid)
            data = data or envcodec.dump(env)
            path = f"{self._incoming_str}/{msgid:08x}/{env.id:016x}"
            try:
                try:
                    fd, old_size = self._create(path, len(data))
                except FileNotFoundError:           # the message's first envelope
                    self._make_incoming(msgid)
                    fd, old_size = self._create(path, len(data))
            except FileExistsError:
                continue
            try:
                _write_over(fd, data, old_size)
            finally:
                os.close(fd)
            return env.id
        raise SpoolError("could not allocate an envelope id")

    def commit(self, msgid: int, body) -> None:
        """Make one fully received message durable and visible (blocking)."""
        error = self.commit_batch([(msgid, body)])[0]
        if error is not None:
            raise error

    def commit_batch(self, batch) -> list[OSError | None]:
        """Make fully received messages durable and visible, sharing the syncs between
        them (blocking: called on the queue's event loop, docs/spool.md).  ``batch`` is [(msgid, body)];
        the result has, for each, None (committed: it may be acknowledged) or the
        error (nothing of it is in queue/; the caller rolls it back)."""
        results: list[OSError | None] = [None] * len(batch)
        staged = []
        incoming, temporary = self._incoming_str, self._temporary_str
        for i, (msgid, body) in enumerate(batch):
            name = f"{msgid:08x}"
            try:
                try:
                    body.flush()
                    if getattr(body, "recycled_size", 0) > body.tell():   # a recycled file's old tail
                        os.ftruncate(body.fileno(), body.tell())
                finally:
                    close_quietly(body)
                os.rename(f"{temporary}/{name}", f"{incoming}/{name}/message")
                staged.append(i)
            except OSError as exc:
                results[i] = exc
        if not staged:
            return results
        try:
            # bodies, envelopes and the incoming/ entries, of the whole batch at once
            self.sync([f"{incoming}/{batch[i][0]:08x}" for i in staged])
        except OSError as exc:
            for i in staged:
                results[i] = exc
            return results
        moved = []
        buckets: set[str] = set()
        new_buckets = False
        for i in staged:
            msgid = batch[i][0]
            bucket = f"{self._queue_str}/{msgid >> 24:02x}"
            try:
                if bucket not in buckets and not os.path.isdir(bucket):
                    try:
                        os.mkdir(bucket, 0o700)
                    except FileExistsError:
                        pass
                    new_buckets = True
                buckets.add(bucket)
                os.rename(f"{incoming}/{msgid:08x}", f"{bucket}/{msgid:08x}")   # the commit point
                moved.append(i)
            except OSError as exc:
                results[i] = exc
        if not moved:
            return results
        try:
            self.sync(sorted(buckets) + ([self._queue_str] if new_buckets else []), dirs_only=True)
        except OSError as exc:
            # not known durable: take them back out of queue/ so that the caller's
            # rollback removes them (a crash meanwhile may still deliver them whole)
            for i in moved:
                msgid = batch[i][0]
                results[i] = exc
                try:
                    os.rename(self._msgdir(msgid), f"{incoming}/{msgid:08x}")
                except OSError:
                    pass
        return results

    def sync(self, dirs, dirs_only: bool = False) -> None:
        """Make everything written to the spool's file system durable: one syncfs(2)
        whatever the number of files (its descriptor stays open, so a writeback error
        since the previous call is reported).  Where syncfs is missing or reports no
        errors (Linux < 5.8): fsync of each file in ``dirs`` (unless ``dirs_only``) and
        of each directory."""
        if _syncfs is not None:
            if self._sync_fd < 0:
                self._sync_fd = os.open(self.queue, os.O_RDONLY | os.O_DIRECTORY)
            if _syncfs(self._sync_fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
            return
        for d in dirs:
            if not dirs_only:
                for name in os.listdir(d):
                    fd = os.open(os.path.join(d, name), os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
            fsync_dir(d)

    def rollback(self, msgid: int) -> None:
        name = f"{msgid:08x}"
        shutil.rmtree(self.incoming / name, ignore_errors=True)
        try:
            os.unlink(self.temporary / name)
        except FileNotFoundError:
            pass

    # -- queued messages -------------------------------------------------------------------

    def envelope_file(self, evpid: int) -> str:
        """envelope_path as a plain string: pathlib costs microseconds per call, and a
        big queue's start and `show queue` read 100,000 envelopes."""
        msgid = evpid >> 32
        return f"{self._queue_str}/{msgid >> 24:02x}/{msgid:08x}/{evpid:016x}"

    def load_envelope(self, evpid: int) -> Envelope:
        return self.load_envelope_mtime(evpid)[0]

    def _remember(self, env: Envelope) -> None:
        if env.id in self.listing or len(self.listing) < LISTING_CACHE_MAX:
            self.listing[env.id] = _pack(tuple(getattr(env, f) for f in LISTED))

    def listed_envelope(self, evpid: int) -> Envelope:
        """The envelope with at least its LISTED fields (the others may be defaults):
        what `show queue` needs, from the cache when it can."""
        packed = self.listing.get(evpid)
        if packed is None:
            return self.load_envelope(evpid)
        return Envelope(id=evpid, **dict(zip(LISTED, _unpack(packed))))

    def load_envelope_mtime(self, evpid: int) -> tuple[Envelope, float]:
        """An envelope and the mtime of its file, with one open."""
        fd = os.open(self.envelope_file(evpid), os.O_RDONLY)
        try:
            mtime = os.fstat(fd).st_mtime
            chunks = []
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
        finally:
            os.close(fd)
        env = envcodec.load(b"".join(chunks), evpid)
        self._remember(env)
        return env, mtime

    def update_envelope(self, env: Envelope) -> None:
        """Atomic, durable rewrite (blocking: run in a thread).  The new version is
        written in incoming/ (as OpenSMTPD's incoming/envelope.tmp; one name per writer,
        as several run at once), so a crash leaves nothing in the message's directory
        and the purge at start removes it.  It takes the envelope's name by an atomic
        exchange where the file system can (the old version, then at the temporary
        name, goes to the pool of recycled inodes: a retry of many envelopes frees and
        makes no inode), else by a rename over it."""
        path = self.envelope_file(env.id)
        tmp = f"{self._incoming_str}/envelope.{env.id:016x}.{secrets.token_hex(4)}.tmp"
        data = envcodec.dump(env)
        fd, old_size = self._create(tmp, len(data))
        try:
            _write_over(fd, data, old_size)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            remove_quietly(tmp)
            raise
        os.close(fd)
        try:
            exchanged = rename_exchange(tmp, path)
        except FileNotFoundError:                # no old version: as a rename (as before)
            exchanged = False
        if exchanged:
            try:
                self._remove_file(tmp)           # the old version
            except OSError:
                pass                             # left for the purge at start
        else:
            os.rename(tmp, path)
        self._remember(env)
        fsync_dir(os.path.dirname(path))

    def add_envelope(self, env: Envelope) -> int:
        """A new envelope for a committed message (a bounce: it shares the message file),
        durable before it is announced: written to a temporary name, fsync'd, renamed
        to a fresh evpid and the directory fsync'd (blocking: run in a thread).  The
        caller keeps another envelope of the message on disk meanwhile, so the message
        directory cannot go away under it."""
        msgdir = self.message_dir(env.id >> 32)
        msgid = env.id >> 32
        # written in incoming/ as update_envelope does: a crash leaves nothing in msgdir
        tmp = self.incoming / f"envelope.new.{secrets.token_hex(6)}.tmp"
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
        self._remember(env)
        fsync_dir(msgdir)
        return env.id

    def delete_envelope(self, evpid: int) -> None:
        """Remove an envelope; the message goes with its last envelope.  Their files
        and directory go to the pool of recycled inodes while it has room (out of
        queue/: a removal all the same), else they are unlinked."""
        msgdir = self._msgdir(evpid >> 32)
        self.listing.pop(evpid, None)
        try:
            self._remove_file(f"{msgdir}/{evpid:016x}")
        except FileNotFoundError:
            pass
        try:
            names = os.listdir(msgdir)
        except FileNotFoundError:
            return
        if any(len(n) == 16 for n in names):           # envelopes left: the message stays
            return
        # the message file and its directory, without rmtree's directory walk; the
        # directory is recycled only if nothing else (put there by hand) is in it
        try:
            if "message" in names:
                self._remove_file(f"{msgdir}/message")
            if names not in ([], ["message"]) or not self._recycle_dir(msgdir):
                os.rmdir(msgdir)
        except FileNotFoundError:
            pass
        except OSError:
            shutil.rmtree(msgdir, ignore_errors=True)

    def _remove_file(self, path: str) -> None:
        try:
            recycled = self.pool.recycle_file(path)
        except FileNotFoundError:
            raise
        except OSError:
            recycled = False
        if not recycled:
            os.unlink(path)

    def _recycle_dir(self, path: str) -> bool:
        try:
            return self.pool.recycle_dir(path)
        except FileNotFoundError:
            raise
        except OSError:
            return False

    def open_message(self, msgid: int) -> int:
        """A read-only descriptor of the message, for a local delivery (docs/delivery.md):
        relative to the spool, never through a symbolic link."""
        return os.open(f"{self._msgdir(msgid)}/message",
                       os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY)

    def read_message(self, msgid: int) -> bytes:
        with open(f"{self._msgdir(msgid)}/message", "rb") as f:
            return f.read()

    def move_to_corrupt(self, msgid: int) -> Path:
        src = self.message_dir(msgid)
        try:
            for name in os.listdir(src):
                if len(name) == 16:
                    self.listing.pop(int(name, 16), None)
        except (OSError, ValueError):
            pass
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


def close_quietly(f) -> None:
    """Close a buffered file whose flush may fail (disk full): the descriptor is
    closed all the same, and the error was (or will be) reported by the caller."""
    try:
        f.close()
    except OSError:
        pass


def _write_over(fd: int, data: bytes, old_size: int) -> None:
    """``data`` from the start of a file ``_create`` gave, cut to its length when the
    file (a recycled one) held more."""
    _write_all(fd, data)
    if old_size > len(data):
        os.ftruncate(fd, len(data))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def is_disk_full(exc: OSError) -> bool:
    """No room (452 4.3.1 Insufficient system storage); any other error, an I/O error
    included, is a plain temporary failure (451 4.3.0)."""
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


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
