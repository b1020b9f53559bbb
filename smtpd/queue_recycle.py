"""The spool's pool of recycled inodes: the files and directories of delivered
messages, kept in ``purge/`` and renamed into place for new messages instead of
being unlinked and created again (a pysmtpd addition; docs/spool.md, "Recycled
inodes").

Why: a message costs the spool three inodes (its ``incoming/<msgid>`` directory,
its body, one envelope per recipient) that are freed again once it is delivered.
Freeing and allocating inodes and blocks is the expensive half of a spool's metadata
work, and on ext4 without a journal it is far worse: the allocator skips every inode
freed in the last 60 to 300 seconds (``recently_deleted`` in fs/ext4/ialloc.c),
reading its inode table entry each time, so under a steady flow of mail each new
file costs hundreds of microseconds of kernel time, for the spool and for every
other writer in the same block groups (the Maildirs of local users).  A rename
touches two directory entries and no inode.

A recycled file keeps its blocks: the next message is written over them from the
start and the file is cut to the new length (``open_file`` tells the caller the old
one), so a steady flow of similar messages allocates and frees no block either
(truncating to zero, then growing again, cost as much as the inode did, and an
``O_TRUNC`` file is written back by ext4 when it is closed).  Until then the file
holds the delivered message, in the queue's own ``purge/`` (mode 0700), as
``queue/`` held it; files over MAX_SIZE are not kept.  A directory is recycled only
once nothing is left in it, and only what the queue made itself is recycled (its
owner, modes 0600 and 0700, one link): anything else is removed as before.

An entry that cannot be renamed into place is dropped and the caller creates a fresh
one, so the pool can only save work, never refuse any.  A name is taken with
``renameat2(..., RENAME_NOREPLACE)``: like ``O_EXCL`` or ``mkdir``, it fails with
EEXIST instead of replacing what is there.  ``purge/`` is emptied at start, pool and
all.

Thread-safe as the queue uses it: its event loop recycles (removals) and takes (new
messages), and so does update_envelope on its threads (a deque's append and popleft
are atomic; a name is unique per process).
"""
from __future__ import annotations

import collections
import ctypes
import errno
import itertools
import os
import stat

_libc = ctypes.CDLL(None, use_errno=True)     # loaded before any chroot
_renameat2 = getattr(_libc, "renameat2", None)
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2

MAX_FILES = 2048      # files kept (a message uses 1 + one per recipient)
MAX_DIRS = 1024       # empty directories kept (one per message)
MAX_SIZE = 256 * 1024  # bytes: a bigger file is unlinked, not kept
SMALL = 4096           # bytes: one block; envelopes are smaller, most bodies bigger


def _renameat2_call(src: str, dst: str, flags: int) -> int:
    """renameat2(2): 0, or the errno."""
    if _renameat2(_AT_FDCWD, src.encode(), _AT_FDCWD, dst.encode(), flags) != 0:
        return ctypes.get_errno()
    return 0


def rename_noreplace(src: str, dst: str) -> None:
    """rename(2) that fails with FileExistsError when ``dst`` exists."""
    err = _renameat2_call(src, dst, _RENAME_NOREPLACE)
    if err:
        raise OSError(err, os.strerror(err), dst)


def rename_exchange(a: str, b: str) -> bool:
    """Swap the names ``a`` and ``b`` atomically (renameat2 RENAME_EXCHANGE); False
    where the file system or the C library cannot (the caller renames instead)."""
    if _renameat2 is None:
        return False
    err = _renameat2_call(a, b, _RENAME_EXCHANGE)
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    if err:
        raise OSError(err, os.strerror(err), b)
    return True


class InodePool:
    def __init__(self, purge: str) -> None:
        # (name, size), by size: one block or less (envelopes), more (bodies).  An
        # envelope written over a body's file would free its blocks when cut to
        # length, and a body over an envelope's allocate them: each file goes back
        # to the kind it came from whenever the pool has one.
        self.small: collections.deque[tuple[str, int]] = collections.deque()
        self.large: collections.deque[tuple[str, int]] = collections.deque()
        self.dirs: collections.deque[str] = collections.deque()
        self._names = itertools.count()
        self._prefix = f"{purge}/free.{os.getpid()}."
        # Without renameat2 (an old C library) a name could be replaced: no pool.
        self.enabled = _renameat2 is not None
        self.reused = 0        # for the tests and `smtpd -v` debugging

    @property
    def files(self) -> list[tuple[str, int]]:
        """Every pooled file, (name, size)."""
        return [*self.small, *self.large]

    def clear(self) -> None:
        """Forget the pool (``purge/`` is being emptied)."""
        self.small.clear()
        self.large.clear()
        self.dirs.clear()

    # -- giving back (the queue's remover; update_envelope's thread) -------------------------------

    def recycle_file(self, path: str) -> bool:
        """Move ``path`` into the pool; False (nothing done) when the pool is full or
        off, or the file is too big or not one the queue made: the caller unlinks it."""
        if not self.enabled or len(self.small) + len(self.large) >= MAX_FILES:
            return False
        st = os.lstat(path)
        if st.st_size > MAX_SIZE or not _ours(st, stat.S_ISREG, 0o600):
            return False
        (self.small if st.st_size <= SMALL else self.large).append((self._park(path), st.st_size))
        return True

    def recycle_dir(self, path: str) -> bool:
        """Move the directory ``path`` into the pool; False when the pool is full or off
        (the caller removes it).  The caller recycles only a directory it has just
        emptied itself: a rename does not check that."""
        if not self.enabled or len(self.dirs) >= MAX_DIRS or not _ours(os.lstat(path), stat.S_ISDIR, 0o700):
            return False
        self.dirs.append(self._park(path))
        return True

    def _park(self, path: str) -> str:
        """Rename ``path`` to a fresh name in the pool; that name."""
        name = f"{self._prefix}{next(self._names)}"
        os.rename(path, name)
        return name

    # -- taking (the event loop; update_envelope's thread) ------------------------------------------

    def take_dir(self, dst: str) -> bool:
        """Rename a pooled directory to ``dst``: True if done; False if the pool had
        none that could be used (the caller makes one).  FileExistsError if ``dst``
        exists (as mkdir)."""
        while self.dirs:
            name = self.dirs.popleft()
            try:
                rename_noreplace(name, dst)
            except FileExistsError:
                self.dirs.appendleft(name)
                raise
            except OSError:
                remove_quietly(name, os.rmdir)
                continue
            self.reused += 1
            return True
        return False

    def open_file(self, dst: str, size: int | None = None) -> tuple[int, int] | None:
        """A pooled file renamed to ``dst`` and opened for writing at its start, and
        its size: the caller writes its content over the old one, then cuts the file
        to its length if it is shorter (``os.ftruncate``).  ``size``: what the caller
        will write, None when it does not know yet (a message body: a large file is
        taken first).  None if the pool had none that could be used.
        FileExistsError if ``dst`` exists, FileNotFoundError if its directory does
        not (the entry stays in the pool), as
        ``os.open(dst, O_WRONLY | O_CREAT | O_EXCL, 0o600)``."""
        first, second = ((self.small, self.large) if size is not None and size <= SMALL
                         else (self.large, self.small))
        while first or second:
            files = first or second
            entry = files.popleft()
            name, old_size = entry
            try:
                rename_noreplace(name, dst)
            except FileExistsError:
                files.appendleft(entry)
                raise
            except FileNotFoundError:
                if os.path.lexists(name):           # dst's directory is missing: say so
                    files.appendleft(entry)
                    raise
                continue
            except OSError:
                remove_quietly(name, os.unlink)
                continue
            try:
                fd = os.open(dst, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                remove_quietly(dst, os.unlink)
                continue
            self.reused += 1
            return fd, old_size
        return None


def _ours(st: os.stat_result, is_type, mode: int) -> bool:
    """Made by the queue as the queue makes it: never pass on a file put in the
    spool by hand (another owner, other modes, a second link) for another's mail."""
    return (is_type(st.st_mode) and st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == mode
            and (st.st_nlink == 1 or not stat.S_ISREG(st.st_mode)))


def remove_quietly(path: str, remove=os.unlink) -> None:
    try:
        remove(path)
    except OSError:
        pass            # gone already, or left for the purge at the next start
