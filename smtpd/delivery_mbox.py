"""mbox delivery: the ``mbox`` action and ``/file`` aliases (mirrors OpenSMTPD's
mail.local.c, locking.c and mda_mbox.c).

OpenSMTPD runs ``mail.local -f sender user`` for ``mbox``; we write the mailbox
ourselves, in the user's delivery worker, doing what mail.local does:

- the mailbox ``<spool>/<user>`` is created by the parent, as root, before the
  worker gets the request (OpenSMTPD's mda_mbox_init: O_CREAT|O_EXCL, owned by the
  user, mode 0600), since a user cannot create files in a root-owned /var/mail;
- ``<spool>/<user>.lock`` is taken as a dot-lock (O_CREAT|O_EXCL, bounded retries),
  skipped when the spool is world-writable (mail.local, which may run as root,
  refuses such a spool outright) or when the user cannot write the spool (where
  mail.local would use its setgid lockspool helper): the fcntl lock below is then
  the only lock;
- the mailbox must be a regular file with one link and the same inode before and
  after opening (O_NOFOLLOW, no symlink or hard-link games), then is locked with
  fcntl (what mutt, procmail and dovecot take);
- the message is written after a ``From <sender> <ctime>`` line, lines starting
  with ``From `` after an empty line (or first) are quoted with ``>``, a blank line
  ends it; on any error the mailbox is truncated back to its previous size.

Delivery as the user (the worker has dropped to them) rather than as root means a
mailbox the user cannot write is refused rather than written through.
"""
from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from collections.abc import Iterable, Iterator

from smtpd.delivery_body import MessageBody

MBOX_SPOOL = "/var/mail"
LOCK_TRIES = 8                 # 0.1 s doubling: about 25 s before a tempfail
LOCK_FIRST_WAIT = 0.1
TEMPORARY = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EAGAIN, errno.EINTR,
                       errno.ENOMEM, errno.EMFILE, errno.ENFILE, errno.EBUSY, errno.ESTALE,
                       errno.ETIMEDOUT, errno.EROFS})


class DeliveryFailure(Exception):
    """A delivery that did not happen: ``temporary`` says whether to retry."""

    def __init__(self, temporary: bool, text: str) -> None:
        super().__init__(text)
        self.temporary = temporary
        self.text = text


def check_username(name: str) -> str:
    """A user name usable as a file name in the mail spool, or DeliveryFailure."""
    if not name or name in (".", "..") or "/" in name or "\0" in name or name.startswith("."):
        raise DeliveryFailure(False, f"user name {name!r} cannot name a mailbox")
    return name


def prepare_mailbox(spool: str, username: str, uid: int, gid: int) -> None:
    """The parent's part (root): create ``spool/username`` for the user if missing.
    Nothing is written in it; the directory is opened once and the file made
    relative to it, never following a symlink."""
    check_username(username)
    try:
        dfd = os.open(spool, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise DeliveryFailure(True, f"{spool}: {exc.strerror}") from None
    try:
        fd = os.open(username, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=dfd)
    except FileExistsError:
        return
    except OSError as exc:
        raise DeliveryFailure(exc.errno in TEMPORARY, f"{spool}/{username}: {exc.strerror}") from None
    finally:
        os.close(dfd)
    try:
        if os.geteuid() == 0:
            os.fchown(fd, uid, gid)
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def from_line(sender: str, now: float | None = None) -> bytes:
    """``From sender Thu Dec  3 04:00:00 2026``: mail.local's separator line."""
    who = sender or "MAILER-DAEMON"
    # The sender is an envelope address: no space or line break may split the line.
    who = "".join("_" if c.isspace() or ord(c) < 32 else c for c in who)
    return b"From " + who.encode("utf-8", "surrogateescape") + b" " + \
        time.asctime(time.localtime(now)).encode() + b"\n"


def quoted(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The message with ``>From `` quoting (mail.local's rule: a ``From `` line that
    starts the message or follows an empty line), ending in a newline and a blank line."""
    empty_before = True
    pending = b""
    for chunk in chunks:
        data = pending + chunk
        lines = data.split(b"\n")
        pending = lines.pop()
        out = []
        for line in lines:
            if line in (b"", b"\r"):
                empty_before = True
            else:
                if empty_before and line.startswith(b"From "):
                    out.append(b">")
                empty_before = False
            out.append(line)
            out.append(b"\n")
        if out:
            yield b"".join(out)
    if pending:
        if empty_before and pending.startswith(b"From "):
            pending = b">" + pending
        yield pending + b"\n"
    yield b"\n"


class _DotLock:
    def __init__(self, path: str) -> None:
        self.path = path + ".lock"
        self.held = False

    def acquire(self) -> None:
        parent = os.path.dirname(self.path) or "."
        try:
            st = os.stat(parent)
        except OSError as exc:
            raise DeliveryFailure(True, f"{parent}: {exc.strerror}") from None
        if st.st_mode & stat.S_IWOTH:
            return                   # no lock files in a world-writable spool (docs/delivery.md)
        wait = LOCK_FIRST_WAIT
        for attempt in range(LOCK_TRIES):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                os.close(fd)
                self.held = True
                return
            except FileExistsError:
                if attempt == LOCK_TRIES - 1:
                    raise DeliveryFailure(True, f"{self.path}: mailbox is locked") from None
                time.sleep(wait)
                wait *= 2
            except PermissionError:
                return               # the user cannot write the spool: fcntl alone
            except OSError as exc:
                raise DeliveryFailure(exc.errno in TEMPORARY, f"{self.path}: {exc.strerror}") from None

    def release(self) -> None:
        if self.held:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            self.held = False


def _open_mailbox(path: str) -> int:
    flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
    for _ in range(3):
        try:
            before = os.lstat(path)
        except FileNotFoundError:
            try:
                return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue                             # appeared meanwhile: look again
            except OSError as exc:
                raise DeliveryFailure(exc.errno in TEMPORARY, f"{path}: {exc.strerror}") from None
        except OSError as exc:
            raise DeliveryFailure(exc.errno in TEMPORARY, f"{path}: {exc.strerror}") from None
        if not stat.S_ISREG(before.st_mode) or before.st_nlink != 1:
            raise DeliveryFailure(False, f"{path}: linked or special file")
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            raise DeliveryFailure(exc.errno in TEMPORARY, f"{path}: {exc.strerror}") from None
        after = os.fstat(fd)
        if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino) or after.st_nlink != 1 \
                or not stat.S_ISREG(after.st_mode):
            os.close(fd)
            raise DeliveryFailure(False, f"{path}: changed after open")
        return fd
    raise DeliveryFailure(True, f"{path}: kept changing while being opened")


def _lock(fd: int, path: str) -> None:
    wait = LOCK_FIRST_WAIT
    for attempt in range(LOCK_TRIES):
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES) or attempt == LOCK_TRIES - 1:
                raise DeliveryFailure(True, f"{path}: cannot lock: {exc.strerror}") from None
            time.sleep(wait)
            wait *= 2


def append_mbox(path: str, body: MessageBody, sender: str, *, dotlock: bool = True) -> None:
    """Append the message to the mbox at ``path`` (absolute), as the current user."""
    if not os.path.isabs(path):
        raise DeliveryFailure(False, f"{path}: not an absolute path")
    lock = _DotLock(path)
    if dotlock:
        lock.acquire()
    try:
        fd = _open_mailbox(path)
        try:
            _lock(fd, path)
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                _write_all(fd, from_line(sender))
                for piece in quoted(body.chunks()):
                    _write_all(fd, piece)
                os.fsync(fd)
            except OSError as exc:
                try:
                    os.ftruncate(fd, start)
                except OSError:
                    pass
                raise DeliveryFailure(exc.errno in TEMPORARY or exc.errno is None,
                                      f"{path}: {exc.strerror or exc}") from None
        finally:
            os.close(fd)                     # releases the fcntl lock
    finally:
        lock.release()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
