"""Offline enqueue: messages left in <spool>/offline/ while the daemon was down.

When sendmail(8) cannot reach the daemon it writes ``offline/<time>.<random>``: one
line with its arguments joined by ``|``, then the message (OpenSMTPD's format).  At
start the parent (root: it can read every user's file) reads each one and has pony
enqueue it through the internal enqueue path (``PonyEnqueue``), as a local session
of the file's owner; the file is removed once the message is queued, and kept (and
logged) when it cannot be.

Trust: a file is opened with O_NOFOLLOW and must be a regular file with one link;
the sender is the ``-f``/``-r`` argument, as sendmail allows any user to give one,
else the file OWNER's login name at the server's hostname.  Nothing else in the
file names a user.
"""
from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import pwd
import stat as statmod
from dataclasses import dataclass, field
from pathlib import Path

from common.ipc import PeerTimeout
from common.messages import PonyEnqueue, PonyEnqueueReply

log = logging.getLogger("smtpd")

START_DELAY = 1.0                # OpenSMTPD scans offline/ one second after start
ENQUEUE_TIMEOUT = 300.0
# sendmail options that take a value (the value may be glued: -fuser or -f user).
_WITH_VALUE = set("BCFNORVXfhLpr")


class OfflineError(Exception):
    pass


@dataclass
class OfflineMessage:
    sender: str
    recipients: list[str] = field(default_factory=list)
    data: bytes = b""


def parse_args(args: list[str]) -> tuple[str, bool, list[str]]:
    """(sender from -f/-r, -t given, recipient arguments) of a sendmail command line."""
    sender, by_headers, rcpts = "", False, []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            rcpts.extend(a for a in args[i:] if a)
            break
        if not arg.startswith("-") or arg == "-":
            if arg:
                rcpts.append(arg)
            continue
        flag = arg[1:2]
        if flag == "t":
            by_headers = True
        elif flag in _WITH_VALUE:
            value = arg[2:]
            if not value and i < len(args):
                value = args[i]
                i += 1
            if flag in "fr":
                sender = value
        elif flag == "o" and arg[2:3] in ("i", "m", "e"):
            pass        # -oi, -om, -oem...: no value of their own
        # -i, -v, -U, -S, -bm and the like change nothing here
    return sender, by_headers, rcpts


def qualify(addr: str, hostname: str) -> str:
    addr = addr.strip()
    if addr.startswith("<") and addr.endswith(">"):
        addr = addr[1:-1]
    return addr if "@" in addr or not addr else f"{addr}@{hostname}"


def _split_headers(message: bytes) -> tuple[bytes, bytes]:
    end = message.find(b"\n\n")
    return (message, b"") if end < 0 else (message[:end + 1], message[end + 1:])


def _header_recipients(head: bytes) -> tuple[list[str], bytes]:
    """Addresses of To/Cc/Bcc (sendmail -t), and the header without its Bcc fields."""
    fields: list[tuple[str, str]] = []
    kept: list[bytes] = []
    current = None
    for line in head.split(b"\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t") and current is not None:
            fields[-1] = (fields[-1][0], fields[-1][1] + " " + line.decode("utf-8", "replace").strip())
            if current != "bcc":
                kept.append(line)
            continue
        name, _, value = line.decode("utf-8", "replace").partition(":")
        current = name.strip().lower()
        fields.append((current, value.strip()))
        if current != "bcc":
            kept.append(line)
    values = [v for n, v in fields if n in ("to", "cc", "bcc")]
    addrs = [a for _, a in email.utils.getaddresses(values) if a]
    return addrs, b"\n".join(kept) + b"\n"


def read_file(path: Path, hostname: str, max_size: int) -> OfflineMessage | None:
    """The message of one offline file (None for an empty file, to be removed)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise OfflineError("symbolic link" if exc.errno == 40 else exc.strerror or str(exc)) from None
    try:
        st = os.fstat(fd)
        if not statmod.S_ISREG(st.st_mode):
            raise OfflineError("not a regular file")
        if st.st_nlink != 1:
            raise OfflineError("has hard links")
        if st.st_size == 0:
            return None
        if st.st_size > max_size + 65536:
            raise OfflineError("too large")
        try:
            owner = pwd.getpwuid(st.st_uid).pw_name
        except KeyError:
            raise OfflineError(f"owner uid {st.st_uid} has no login name") from None
        with os.fdopen(os.dup(fd), "rb") as f:
            content = f.read()
    finally:
        os.close(fd)
    first, nl, message = content.replace(b"\r\n", b"\n").partition(b"\n")
    if not nl:
        raise OfflineError("no argument line")
    try:
        args = first.decode("utf-8").split("|")
    except UnicodeDecodeError:
        raise OfflineError("argument line is not UTF-8") from None
    sender, by_headers, rcpts = parse_args(args)
    sender = qualify(sender, hostname) if sender else f"{owner}@{hostname}"
    head, body = _split_headers(message)
    if by_headers:
        found, head = _header_recipients(head)
        rcpts = rcpts + found
    if not rcpts:
        raise OfflineError("no recipient")
    if b"\nfrom:" not in b"\n" + head.lower():
        head = f"From: {sender}\n".encode() + head
    return OfflineMessage(sender=sender, recipients=[qualify(r, hostname) for r in rcpts],
                          data=head + body)


async def enqueue_all(mesh, new_id, spool: str, hostname: str, max_size: int) -> None:
    """Enqueue every file of offline/ (the parent runs this once, after start)."""
    directory = Path(spool) / "offline"
    await asyncio.sleep(START_DELAY)
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as exc:
        log.error("warn: smtpd: cannot read %s: %s", directory, exc)
        return
    for entry in entries:
        path = Path(entry.path)
        try:
            msg = await asyncio.to_thread(read_file, path, hostname, max_size)
        except OfflineError as exc:
            log.warning("warn: smtpd: couldn't enqueue offline message %s; %s", path, exc)
            continue
        if msg is None:
            path.unlink(missing_ok=True)
            continue
        req = PonyEnqueue(reqid=new_id(), sender=msg.sender, recipients=msg.recipients,
                          data=msg.data, origin="offline")
        try:
            reply = await mesh.request("pony", req, (PonyEnqueueReply,), timeout=ENQUEUE_TIMEOUT)
        except PeerTimeout:
            reply = PonyEnqueueReply(reqid=req.reqid, status="tempfail", text="timeout")
        if reply.status != "ok":
            log.warning("warn: smtpd: couldn't enqueue offline message %s; %s", path, reply.text)
            continue
        path.unlink(missing_ok=True)
        log.info("smtpd: offline message %s enqueued as %08x", path.name, reply.msgid)
