"""Messages local users submit with sendmail: left in <spool>/offline/ while the
daemon was down, or handed over through control while it runs (enqueue_for_client).

When sendmail(8) cannot reach the daemon it writes ``offline/<time>.<random>``: one
line with its arguments joined by ``|``, then the message (OpenSMTPD's format).  At
start the parent (root: it can read every user's file) reads each one and has pony
enqueue it through the internal enqueue path (``PonyEnqueue``), as a local session
of the file's owner; the file is removed once the message is queued, and kept (and
logged) when it cannot be.

Trust: offline/ is root's, mode 01777 (users create their own files, none can remove
or rename another's); a file is opened with O_NOFOLLOW and must be a regular file
with one link; the sender is the ``-f``/``-r`` argument, as sendmail allows any user
to give one, else the file OWNER's login name at the server's hostname.  Nothing
else in the file names a user.  Through control, the uid is the connection's
(SO_PEERCRED) and the same rule applies (docs/sendmail.md).
"""
from __future__ import annotations

import asyncio
import logging
import os
import pwd
import stat as statmod
from dataclasses import dataclass, field
from pathlib import Path

from common import submission
from common.ipc import PeerFailed, PeerTimeout
from common.messages import CtlEnqueue, PonyEnqueue, PonyEnqueueReply
from smtpd import dsn_params

log = logging.getLogger("smtpd")

START_DELAY = 1.0                # OpenSMTPD scans offline/ one second after start
ENQUEUE_TIMEOUT = 300.0


class OfflineError(Exception):
    pass


@dataclass
class OfflineMessage:
    sender: str
    recipients: list[str] = field(default_factory=list)
    data: bytes = b""
    uid: int = -1
    dsn: dict = field(default_factory=dict)


def qualify(addr: str, hostname: str) -> str:
    try:
        return submission.qualify(addr, hostname)
    except submission.UsageError as exc:
        raise OfflineError(str(exc)) from None


def local_user(uid: int) -> pwd.struct_passwd:
    """The passwd entry of a submitting uid (the sender's identity: SO_PEERCRED, or an
    offline file's owner; never a name the client gives)."""
    try:
        return pwd.getpwuid(uid)
    except KeyError:
        raise OfflineError(f"uid {uid} has no login name") from None


def dsn_fields(notify: str, ret: str, envid: str) -> dict:
    """PonyEnqueue's DSN fields from sendmail's -N, -R, -V (checked as the SMTP DSN
    parameters are: a bad one refuses the message)."""
    out: dict = {}
    if ret or envid:
        parsed = dsn_params.parse_mail_options(
            ([f"RET={ret}"] if ret else []) + ([f"ENVID={envid}"] if envid else []))
        if isinstance(parsed, str):
            raise OfflineError(parsed)
        out["dsn_ret"], out["dsn_envid"] = parsed
    if notify:
        rcpt = dsn_params.parse_rcpt_options([f"NOTIFY={notify}"])
        if isinstance(rcpt, str):
            raise OfflineError(rcpt)
        out["dsn_notify"] = rcpt.notify
    return out


def build_message(user: pwd.struct_passwd, hostname: str, sender: str, fullname: str,
                  recipients: list[str], data: bytes, dsn: dict) -> OfflineMessage:
    """What a local user submits, ready for pony: the sender is ``-f`` when given (as
    sendmail allows any user), else the user's login name at ``hostname``; a message
    without From: gets one, with ``-F`` or the GECOS full name."""
    envelope_sender = qualify(sender, hostname) if sender else f"{user.pw_name}@{hostname}"
    if not recipients:
        raise OfflineError("no recipient")
    name = fullname or (submission.gecos_name(user.pw_gecos, user.pw_name) if not sender else "")
    data = submission.complete_headers(submission.drop_envelope_lines(submission.normalize(data)),
                                       envelope_sender, name)
    return OfflineMessage(sender=envelope_sender, uid=user.pw_uid, dsn=dsn, data=data,
                          recipients=[qualify(r, hostname) for r in recipients])


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
        user = local_user(st.st_uid)
        with os.fdopen(os.dup(fd), "rb") as f:
            content = f.read()
    finally:
        os.close(fd)
    first, nl, message = content.replace(b"\r\n", b"\n").partition(b"\n")
    if not nl:
        raise OfflineError("no argument line")
    try:
        opts = submission.parse_args(first.decode("utf-8").split("|"))
    except UnicodeDecodeError:
        raise OfflineError("argument line is not UTF-8") from None
    except submission.UsageError as exc:
        raise OfflineError(str(exc)) from None
    rcpts = submission.split_recipients(opts.recipients)
    if opts.by_headers:
        found, message = submission.header_recipients(message)
        rcpts += found
    return build_message(user, hostname, opts.sender, opts.fullname, rcpts, message,
                         dsn_fields(opts.dsn_notify, opts.dsn_ret, opts.dsn_envid))


async def _enqueue(mesh, new_id, msg: OfflineMessage, origin: str) -> PonyEnqueueReply:
    req = PonyEnqueue(reqid=new_id(), sender=msg.sender, recipients=msg.recipients,
                      data=msg.data, origin=origin, uid=msg.uid, **msg.dsn)
    try:
        return await mesh.request("pony", req, (PonyEnqueueReply,), timeout=ENQUEUE_TIMEOUT)
    except (PeerTimeout, PeerFailed) as exc:
        log.warning("warn: smtpd: %s enqueue failed: %s", origin, exc)
        return PonyEnqueueReply(reqid=req.reqid, status="tempfail", text="451 4.3.0 Temporary failure")


async def enqueue_for_client(mesh, new_id, req: CtlEnqueue, hostname: str) -> PonyEnqueueReply:
    """A message a local user submits with sendmail while the daemon runs (control's
    ``enqueue`` request): the same checks and steps as an offline file, the uid from
    control's SO_PEERCRED.  The reply carries control's reqid."""
    try:
        msg = build_message(local_user(req.uid), hostname, req.sender, req.fullname,
                            req.recipients, req.data,
                            dsn_fields(req.dsn_notify, req.dsn_ret, req.dsn_envid))
    except OfflineError as exc:
        text = str(exc)
        return PonyEnqueueReply(reqid=req.reqid, status="permfail",
                                text=text if text[:1].isdigit() else f"550 5.5.1 {text}")
    reply = await _enqueue(mesh, new_id, msg, "sendmail")
    return PonyEnqueueReply(reqid=req.reqid, status=reply.status, text=reply.text, msgid=reply.msgid)


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
        reply = await _enqueue(mesh, new_id, msg, "offline")
        if reply.status != "ok":
            log.warning("warn: smtpd: couldn't enqueue offline message %s; %s", path, reply.text)
            continue
        path.unlink(missing_ok=True)
        log.info("smtpd: offline message %s enqueued as %08x", path.name, reply.msgid)
