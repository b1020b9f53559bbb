"""The parent's reading of the files a recipient's expansion needs: a user's
~/.forward and the :include: files an aliases table names (OpenSMTPD's smtpd.c
parent_forward_open and util.c secure_file).

lka runs unprivileged and cannot enter users' homes; the parent, root, reads the
file for it, with OpenSMTPD's checks, and answers with the text (at most a few KiB)
and a status the expansion maps to its replies (smtpd/expand.py):

- ``absent``: there is no such file (ENOENT, also for a missing home);
- ``tempfail``: try later (a sticky home, out of descriptors, an I/O error, a
  .forward over the size limit);
- ``permfail``: a symbolic link, not a regular file, a file or directory others may
  write or that someone else owns, any other error;
- ``ok``: the text.

Blocking file system calls (a home on NFS): the parent runs these in a thread,
unless the home is on a local disk file system (``on_local_fs``, by statfs's type:
ext4, xfs, btrfs, tmpfs, overlayfs...), where the calls take microseconds and a thread's
wake-ups cost more than the read (issue 12: about 0.2 ms of the parent's CPU per
local message).  The parent learns that of a home in the thread, the first time,
and keeps it a minute (smtpd/parent.py).
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat

from smtpd.config_files import file_problem
from smtpd.expand import MAX_FORWARD_SIZE

log = logging.getLogger("smtpd")

MAX_INCLUDE_SIZE = 1 << 20     # an :include: list of addresses; OpenSMTPD has no bound
_TEMPORARY_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.EIO, errno.EAGAIN)

# statfs f_type of file systems on local disks or memory (linux/magic.h): what is
# not here (nfs, cifs, fuse, autofs...) may wait on a network
LOCAL_FS_TYPES = frozenset({
    0xEF53,         # ext2, ext3, ext4
    0x58465342,     # xfs
    0x9123683E,     # btrfs
    0x01021994,     # tmpfs
    0x2FC12FC1,     # zfs
    0xF2F52010,     # f2fs
    0x3153464A,     # jfs
    0x52654973,     # reiserfs
    0x794C7630,     # overlayfs (a container's root: its upper layer is a local disk)
})


class _StatFs(ctypes.Structure):
    # struct statfs begins with f_type (__fsword_t: a long); the rest is not read
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 120)]


_libc = ctypes.CDLL(None, use_errno=True)


def on_local_fs(path: str) -> bool:
    """``path`` is on a local disk file system (False when statfs fails)."""
    buf = _StatFs()
    if _libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        return False
    return (buf.f_type & 0xFFFFFFFF) in LOCAL_FS_TYPES


def read_forward_learning_fs(user: str, home: str, uid: int) -> tuple[str, str, bool]:
    """read_forward, and whether ``home`` is on a local file system (in the thread:
    statfs may wait on a network as much as the read)."""
    return (*read_forward(user, home, uid), on_local_fs(home))


def read_forward(user: str, home: str, uid: int) -> tuple[str, str]:
    """(status, text) of ``home``/.forward for ``user`` (uid ``uid``)."""
    path = os.path.join(home, ".forward")
    try:
        st = os.stat(home)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return "absent", ""
        log.warning("warn: smtpd: parent_forward_open: %s: %s", home, exc.strerror)
        return "permfail", ""
    if st.st_mode & stat.S_ISVTX:
        log.warning("warn: smtpd: parent_forward_open: %s is sticky", home)
        return "tempfail", ""
    return _read_secure(path, home, uid, MAX_FORWARD_SIZE, "parent_forward_open")


def read_include(path: str) -> tuple[str, str]:
    """(status, text) of an :include: file named in a table: owned by root or the user
    smtpd runs as, as the configuration's own files."""
    if not os.path.isabs(path):
        return "permfail", ""
    return _read_secure(path, "/", os.getuid(), MAX_INCLUDE_SIZE, "include")


def _read_secure(path: str, top: str, uid: int, max_size: int, who: str) -> tuple[str, str]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return "absent", ""
        if exc.errno in _TEMPORARY_ERRNOS:
            return "tempfail", ""
        if exc.errno == errno.ELOOP:
            log.warning("warn: smtpd: %s: %s: cannot follow symbolic links", who, path)
        else:
            log.warning("warn: smtpd: %s: %s: %s", who, path, exc.strerror)
        return "permfail", ""
    try:
        problem = file_problem(os.fstat(fd), secret=False, uid=uid) or _directory_problem(path, top, uid)
        if problem:
            log.warning("warn: smtpd: %s: insecure file: %s", path, problem)
            return "permfail", ""
        if os.fstat(fd).st_size >= max_size:
            log.info("info: %s exceeds max size", path)
            return "tempfail", ""
        data = os.read(fd, max_size)
    except OSError as exc:
        log.warning("warn: smtpd: %s: %s: %s", who, path, exc.strerror)
        return ("tempfail" if exc.errno in _TEMPORARY_ERRNOS else "permfail"), ""
    finally:
        os.close(fd)
    return "ok", data.decode("utf-8", "replace")


def _directory_problem(path: str, top: str, uid: int) -> str | None:
    """secure_file's walk: each directory from the file's up to ``top`` (or /) is owned
    by root or the user and not writable by group or others (unless sticky, where
    others cannot replace what they do not own: /tmp, which secure_file refuses)."""
    here = os.path.realpath(path)
    top = os.path.realpath(top)
    for _ in range(256):
        parent = os.path.dirname(here)
        st = os.stat(parent)
        if st.st_uid not in (0, uid):
            return f"directory {parent} owned by uid {st.st_uid}"
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
            return f"directory {parent} writable by group or others"
        if parent in (top, "/") or parent == here:
            return None
        here = parent
    return "path too deep"
