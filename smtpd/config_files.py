"""The files a configuration names (smtpd.conf, its includes, table files, pki keys),
opened and checked before a byte of them is used (OpenSMTPD's parse.y pushfile and
check_file_secrecy, ssl.c ssl_load_file and ssl_load_key).

Every such file is opened without blocking (a FIFO or a terminal given as a file
must not hang the daemon) and checked on the open descriptor (what is read is what
was checked):

- a regular file, else refused whatever it is (FIFO, directory, device, socket);
- owned by root or by the user smtpd runs as: anyone else could change how root
  delivers mail (OpenSMTPD's "owner not root or current user");
- not writable by group or others, for the same reason.  OpenSMTPD 7 checks neither
  of these two for smtpd.conf and its tables; its parser once did, and still has the
  function;
- a file holding secrets (a pki key, a credentials table) is also readable by no one
  but its owner and group: mode at most 0740, as check_file_secrecy and ssl_load_key
  require ("group/world readable/writeable").

The reasons are plain text; the parser adds which file and line named the file.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

SECRET_MODE_MAX = 0o740
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
_READ_CHUNK = 1 << 20


class FileRefused(Exception):
    """Why a file the configuration names is not used (a check, or the OS's refusal)."""


def file_problem(st: os.stat_result, secret: bool, uid: int) -> str | None:
    """What is wrong with a file of this stat for smtpd running as ``uid``, or None."""
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a file")
        return f"not a regular file ({kind})"
    if st.st_uid not in (0, uid):
        return f"owner not root or current user (uid {st.st_uid})"
    mode = stat.S_IMODE(st.st_mode)
    if secret and mode & (stat.S_IWGRP | stat.S_IXGRP | stat.S_IRWXO):
        return (f"group/world readable/writeable (mode {mode:04o}): a file holding secrets "
                f"must be at most {SECRET_MODE_MAX:04o}")
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"group/world writeable (mode {mode:04o})"
    return None


def open_regular(path: Path) -> tuple[int, os.stat_result]:
    """A descriptor of ``path`` and its stat, opened without blocking (a FIFO must be
    refused, not wait for a writer) and refused unless it is a regular file.  The one
    way a file the configuration names is opened (here, and smtpd/tls.py for pki and
    ca files); FileRefused says why not."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise FileRefused(exc.strerror or str(exc)) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a file")
        raise FileRefused(f"not a regular file ({kind})")
    return fd, st


def _open_checked(path: Path, secret: bool) -> tuple[int, os.stat_result]:
    """A descriptor of ``path`` that passed the checks."""
    fd, st = open_regular(path)
    try:
        problem = file_problem(st, secret, os.getuid())
        if problem:
            raise FileRefused(problem)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def read_checked(path: Path, secret: bool = False) -> tuple[str, tuple[int, int]]:
    """The text of ``path`` (bytes that are not UTF-8 replaced) and its (device, inode),
    which names the file whatever path led to it.  Raises FileRefused."""
    fd, st = _open_checked(path, secret)
    try:
        chunks = []
        while chunk := os.read(fd, _READ_CHUNK):
            chunks.append(chunk)
    except OSError as exc:
        raise FileRefused(exc.strerror or str(exc)) from None
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8", "replace"), (st.st_dev, st.st_ino)


def check_file(path: Path, secret: bool = False) -> None:
    """The checks alone, for a file another layer reads (a pki key: the TLS library)."""
    fd, _st = _open_checked(path, secret)
    os.close(fd)
