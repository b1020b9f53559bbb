"""Maildir delivery and delivery headers (mirrors OpenSMTPD mail.maildir.c and parts of mda.c).

``deliver_maildir()`` is what the ``maildir [path] [junk]`` action runs as the recipient user;
``prepend_delivery_headers()`` and ``has_delivered_to_loop()`` are the per-delivery steps mda.c
performs before handing the message to any delivery method (internals §7.2).

Delivery protocol (the classic qmail/Maildir one, with the durability steps a careful MDA adds):

1. make sure ``<maildir>/{cur,new,tmp}`` exist (mode 0700, created when missing);
2. create ``tmp/<unique>`` with ``O_CREAT|O_EXCL|O_NOFOLLOW``, mode 0600, write every byte,
   ``fsync`` it, close it;
3. ``rename`` it to ``new/<unique>`` and ``fsync`` the ``new/`` directory.

Every directory is opened with ``O_NOFOLLOW|O_DIRECTORY`` and later steps work relative to those
descriptors, so a symlink swapped in for the maildir or one of its sub-directories is refused
instead of followed.

Error handling: every failure is raised as :class:`MaildirError` with ``temporary`` telling the
caller whether to tempfail (retry later) or permfail (bounce).  Out-of-space, quota, I/O and
resource-exhaustion errors are temporary; permission and path-shape errors (symlink, not a
directory, relative path, ``..``) are permanent; errnos we have no opinion about default to
temporary, since bouncing mail for an unknown transient condition loses it for good.  On failure
nothing is left in ``tmp/``; if the final directory ``fsync`` fails the file is also removed from
``new/`` so the retry cannot produce a duplicate.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "MaildirError",
    "deliver_maildir",
    "has_delivered_to_loop",
    "is_spam",
    "maildir_unique_name",
    "prepend_delivery_headers",
]

# Sub-folder receiving X-Spam mail with the "junk" option (Maildir++ folder name, mail.maildir.c).
JUNK_FOLDER = ".Junk"
# Mode of every directory and file we create: the mailbox is private to its owner.
DIR_MODE = 0o700
FILE_MODE = 0o600
# How many times to retry O_EXCL when a unique name collides (should never happen).
CREATE_ATTEMPTS = 5

# Errors worth retrying: the condition may clear by itself or by an admin freeing resources.
TEMPORARY_ERRNOS = frozenset(
    getattr(errno, name) for name in (
        "ENOSPC", "EDQUOT", "EIO", "EAGAIN", "EWOULDBLOCK", "EMFILE", "ENFILE", "ENOMEM",
        "EINTR", "EBUSY", "ESTALE", "ETIMEDOUT", "EROFS", "ENOENT", "EEXIST", "ENOBUFS",
    ) if hasattr(errno, name)
)
# Errors that will not go away without a configuration change: bounce.
PERMANENT_ERRNOS = frozenset(
    getattr(errno, name) for name in (
        "EACCES", "EPERM", "ENOTDIR", "ELOOP", "ENAMETOOLONG", "EISDIR", "EINVAL", "EXDEV",
        "EFBIG",
    ) if hasattr(errno, name)
)

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

_counter = itertools.count(1)
_counter_lock = threading.Lock()


class MaildirError(Exception):
    """A maildir delivery failed.

    Attributes:
        temporary: True to tempfail (retry later), False to permfail (bounce).
        text: human-readable reason, suitable for the delivery log / DSN.
        errno: the underlying errno, if the failure came from an OSError.
    """

    def __init__(self, temporary: bool, text: str, *, errno: int | None = None) -> None:
        super().__init__(text)
        self.temporary = temporary
        self.text = text
        self.errno = errno

    def __repr__(self) -> str:
        return f"MaildirError(temporary={self.temporary!r}, text={self.text!r})"


def _is_temporary(err: OSError) -> bool:
    if err.errno in PERMANENT_ERRNOS:
        return False
    return True  # TEMPORARY_ERRNOS and anything unknown


def _error(err: OSError, what: str) -> MaildirError:
    reason = os.strerror(err.errno) if err.errno is not None else str(err)
    return MaildirError(_is_temporary(err), f"{what}: {reason}", errno=err.errno)


# --- headers -------------------------------------------------------------------------------------

def _header_lines(message: bytes) -> Iterator[bytes]:
    """Yield the lines of the header block (without line endings), stopping at the first
    empty line; the body is never scanned or copied."""
    pos = 0
    end = len(message)
    while pos < end:
        nl = message.find(b"\n", pos)
        if nl < 0:
            nl = end
        line = message[pos:nl].removesuffix(b"\r")
        if not line:
            return
        yield line
        pos = nl + 1


def _header_fields(message: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Yield (name, value) for each field of the header block, unfolding continuation lines.

    Stops at the first empty line (end of headers); a line without a colon that is not a
    continuation also ends the block (it cannot be a header, so the body started).
    """
    name: bytes | None = None
    value: list[bytes] = []
    for line in _header_lines(message):
        if line[:1] in (b" ", b"\t"):
            if name is not None:
                value.append(line)
            continue
        if name is not None:
            yield name, b"".join(value)
            name = None
        colon = line.find(b":")
        if colon <= 0:
            return
        name, value = line[:colon], [line[colon + 1:]]
    if name is not None:
        yield name, b"".join(value)


def _decode(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")


def is_spam(message: bytes) -> bool:
    """True when the header block has ``X-Spam: yes`` (both parts case-insensitive)."""
    for name, value in _header_fields(message):
        if name.strip().lower() == b"x-spam" and value.strip().lower() == b"yes":
            return True
    return False


def has_delivered_to_loop(message: bytes, dest: str) -> bool:
    """Whether the message already went through a delivery to *dest* (mda.c loop check).

    Only the header block is scanned (up to the first empty line), so a quoted
    ``Delivered-To:`` line in the body does not count.  Values are compared case-insensitively
    after trimming whitespace; ``<dest>`` with angle brackets also matches.
    """
    want = dest.strip().lower()
    if not want:
        return False
    for name, value in _header_fields(message):
        if name.strip().lower() != b"delivered-to":
            continue
        got = _decode(value).strip()
        if got.startswith("<") and got.endswith(">"):
            got = got[1:-1].strip()
        if got.lower() == want:
            return True
    return False


def prepend_delivery_headers(message: bytes, *, sender: str, dest: str) -> bytes:
    """Prepend ``Return-Path: <sender>`` (non-empty sender only) and ``Delivered-To: dest``.

    The new lines use the message's own line ending (CRLF when its first line ends in CRLF,
    LF otherwise, LF being the Maildir and OpenSMTPD convention).

    Raises:
        ValueError: *sender* or *dest* contains CR, LF or NUL (header injection), or *dest* is
            empty.
    """
    for label, value in (("sender", sender), ("dest", dest)):
        if any(c in value for c in "\r\n\0"):
            raise ValueError(f"{label} contains a line break or NUL: {value!r}")
    if not dest:
        raise ValueError("dest must not be empty")
    first_nl = message.find(b"\n")
    eol = b"\r\n" if first_nl > 0 and message[first_nl - 1:first_nl] == b"\r" else b"\n"
    head = b""
    if sender:
        head += b"Return-Path: <" + sender.encode("utf-8") + b">" + eol
    head += b"Delivered-To: " + dest.encode("utf-8") + eol
    return head + message


# --- unique names --------------------------------------------------------------------------------

def _escaped_hostname() -> str:
    try:
        host = socket.gethostname()
    except OSError:
        host = ""
    host = host or "localhost"
    # Maildir spec: "/" and ":" cannot appear in the host part; escape them as octal.
    return host.replace("/", "\\057").replace(":", "\\072")


def maildir_unique_name(size: int | None = None) -> str:
    """Return a new ``<time>.M<usec>P<pid>Q<counter>.<host>[,S=<size>]`` name.

    The per-process counter makes names from rapid successive calls (even within the same
    microsecond, or from several threads) distinct; the pid separates processes.
    """
    with _counter_lock:
        n = next(_counter)
    now_ns = time.time_ns()
    sec, rem = divmod(now_ns, 1_000_000_000)
    name = f"{sec}.M{rem // 1000}P{os.getpid()}Q{n}.{_escaped_hostname()}"
    if size is not None:
        name += f",S={size}"
    return name


# --- delivery ------------------------------------------------------------------------------------

def _check_path(maildir: str | Path) -> str:
    try:
        path = os.fspath(maildir)
    except TypeError:
        raise MaildirError(False, f"invalid maildir path {maildir!r}") from None
    if not isinstance(path, str):
        raise MaildirError(False, f"invalid maildir path {path!r}")
    if not path or "\0" in path:
        raise MaildirError(False, f"invalid maildir path {path!r}")
    if not os.path.isabs(path):
        raise MaildirError(False, f"maildir path is not absolute: {path}")
    if ".." in path.split("/"):
        raise MaildirError(False, f"maildir path contains '..': {path}")
    return os.path.normpath(path)


def _makedirs(path: str) -> None:
    """mkdir -p with mode 0700 for every component we create (mail.maildir.c mkdirs)."""
    parts = path.split("/")
    for i in range(2, len(parts) + 1):
        prefix = "/".join(parts[:i])
        if not prefix:
            continue
        try:
            os.mkdir(prefix, DIR_MODE)
        except FileExistsError:
            pass


def _open_dir(name: str, display: str, *, dir_fd: int | None, create: bool) -> tuple[int, bool]:
    """Open a directory without following symlinks, creating it if allowed.

    Returns (fd, created).
    """
    created = False
    try:
        return os.open(name, _O_DIR, dir_fd=dir_fd), created
    except FileNotFoundError:
        if not create:
            raise MaildirError(True, f"{display}: does not exist", errno=errno.ENOENT) from None
    except OSError as err:
        raise _path_error(err, display, name, dir_fd) from None
    try:
        if dir_fd is None:
            _makedirs(name)
        else:
            try:
                os.mkdir(name, DIR_MODE, dir_fd=dir_fd)
            except FileExistsError:
                pass
        created = True
        return os.open(name, _O_DIR, dir_fd=dir_fd), created
    except OSError as err:
        raise _path_error(err, display, name, dir_fd) from None


def _path_error(err: OSError, display: str, name: str, dir_fd: int | None) -> MaildirError:
    if err.errno in (errno.ELOOP, errno.ENOTDIR):
        # Linux reports ENOTDIR, not ELOOP, for O_DIRECTORY|O_NOFOLLOW on a symlink.
        try:
            is_link = stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
        except OSError:
            is_link = False
        if is_link:
            return MaildirError(False, f"{display}: is a symbolic link, refusing to follow it",
                                errno=err.errno)
        if err.errno == errno.ELOOP:
            return MaildirError(False, f"{display}: too many levels of symbolic links",
                                errno=err.errno)
        return MaildirError(False, f"{display}: not a directory", errno=err.errno)
    return _error(err, display)


def _fsync_dir(fd: int, display: str) -> None:
    try:
        os.fsync(fd)
    except OSError as err:
        raise _error(err, f"{display}: fsync") from None


def _fsync_parent(path: str) -> None:
    """Best effort: persist the entry of a freshly created top-level maildir."""
    try:
        fd = os.open(os.path.dirname(path) or "/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _Maildir:
    """Open descriptors on one maildir (root, tmp/, new/); closes them on exit."""

    def __init__(self, path: str, *, parent_fd: int | None, name: str, create: bool) -> None:
        self.path = path
        self.fds: list[int] = []
        try:
            root, created = _open_dir(name, path, dir_fd=parent_fd, create=create)
            self.fds.append(root)
            self.root = root
            subs: dict[str, int] = {}
            for sub in ("cur", "new", "tmp"):
                fd, sub_created = _open_dir(sub, f"{path}/{sub}", dir_fd=root, create=create)
                self.fds.append(fd)
                subs[sub] = fd
                created |= sub_created
            self.new = subs["new"]
            self.tmp = subs["tmp"]
            if created:
                # Make the new directory entries durable before a message depends on them.
                _fsync_dir(root, path)
                if parent_fd is not None:
                    _fsync_dir(parent_fd, os.path.dirname(path))
                else:
                    _fsync_parent(path)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        while self.fds:
            try:
                os.close(self.fds.pop())
            except OSError:
                pass

    def __enter__(self) -> _Maildir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unlink_quietly(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


def _write_tmp(md: _Maildir, message: bytes) -> str:
    """Create, fill and fsync ``tmp/<unique>``; returns the unique name."""
    name = ""
    fd = -1
    for _ in range(CREATE_ATTEMPTS):
        name = maildir_unique_name(len(message))
        try:
            fd = os.open(name, _O_FILE, FILE_MODE, dir_fd=md.tmp)
            break
        except FileExistsError:
            continue
        except OSError as err:
            raise _error(err, f"{md.path}/tmp/{name}: create") from None
    else:
        raise MaildirError(True, f"{md.path}/tmp: could not create a unique file name",
                           errno=errno.EEXIST)

    try:
        if hasattr(message, "write_to"):     # a MessageBody: the queued file by descriptor
            message.write_to(fd)
        else:
            view = memoryview(message)
            while view:
                written = os.write(fd, view)
                if written <= 0:  # pragma: no cover - os.write raises instead
                    raise OSError(errno.EIO, "short write")
                view = view[written:]
        os.fsync(fd)
    except OSError as err:
        os.close(fd)
        _unlink_quietly(name, md.tmp)
        raise _error(err, f"{md.path}/tmp/{name}: write") from None
    except BaseException:
        os.close(fd)
        _unlink_quietly(name, md.tmp)
        raise
    try:
        os.close(fd)
    except OSError as err:  # NFS reports deferred write errors on close
        _unlink_quietly(name, md.tmp)
        raise _error(err, f"{md.path}/tmp/{name}: close") from None
    return name


def deliver_maildir(maildir: str | Path, message, *, junk: bool = False,
                    create: bool = True) -> str:
    """Deliver *message* into the Maildir at *maildir* and return the new file's path.

    Args:
        maildir: absolute path of the Maildir, already expanded (``~`` and format specifiers).
        message: the message bytes, or a smtpd.delivery_body.MessageBody (delivery
            headers, then the queued file by descriptor), written unchanged (LF line
            endings by Maildir convention; delivery headers already in front).
        junk: when True and the message headers carry ``X-Spam: yes``, deliver into the
            ``.Junk`` Maildir++ folder inside *maildir* instead.
        create: create missing directories (mode 0700); when False a missing directory is a
            temporary failure.

    Returns:
        The path of the delivered file, ``<maildir>[/.Junk]/new/<unique>``.

    Raises:
        MaildirError: on any failure; ``.temporary`` says whether to retry.

    Resource handling:
        Every descriptor opened here is closed before returning or raising.

    Error handling:
        A failure after ``tmp/<unique>`` was created unlinks it; a failure of the final
        directory fsync unlinks ``new/<unique>`` too, so a tempfail never leaves a copy behind.
    """
    path = _check_path(maildir)
    if not isinstance(message, (bytes, bytearray, memoryview)) and not hasattr(message, "head"):
        raise TypeError("message must be bytes or a MessageBody")

    with _Maildir(path, parent_fd=None, name=path, create=create) as root:
        if junk and is_spam(message.head() if hasattr(message, "head") else bytes(message)):
            with _Maildir(f"{path}/{JUNK_FOLDER}", parent_fd=root.root, name=JUNK_FOLDER,
                          create=create) as target:
                return _deliver_into(target, message)
        return _deliver_into(root, message)


def _deliver_into(md: _Maildir, message: bytes) -> str:
    name = _write_tmp(md, message)
    try:
        os.rename(name, name, src_dir_fd=md.tmp, dst_dir_fd=md.new)
    except OSError as err:
        _unlink_quietly(name, md.tmp)
        raise _error(err, f"{md.path}/new/{name}: rename") from None
    except BaseException:
        _unlink_quietly(name, md.tmp)
        raise
    try:
        os.fsync(md.new)
    except OSError as err:
        # The rename may not be durable: withdraw the message so the retry is the only copy.
        _unlink_quietly(name, md.new)
        raise _error(err, f"{md.path}/new: fsync") from None
    return f"{md.path}/new/{name}"
