"""The steps of an inbound transaction, shared by SMTP sessions and internal enqueue.

An SMTP session (smtp_session) and an internal injection (a bounce from the queue,
an offline/ file from the parent: ``PonyEnqueue``) store a message the same way:
create it at the queue, expand each recipient through lka (which submits the
envelopes to the queue), stream the data, commit.  OpenSMTPD injects bounces through
a local SMTP session on a socketpair; pysmtpd calls the same steps directly, so a
bounce is matched by the rules as mail ``from local`` and delivered like any other.
"""
from __future__ import annotations

import collections
import email.utils
import logging
import time

from common.envelope import Envelope
from common.ipc import PeerTimeout
from common.messages import (
    PonyEnqueue, PonyEnqueueReply, QueueEnvelopeCommitReply, SmtpExpandRcpt, SmtpExpandRcptReply,
    SmtpMessageCommit, SmtpMessageCommitReply, SmtpMessageCreate, SmtpMessageCreateReply,
    SmtpMessageData, SmtpMessageRollback,
)
from smtpd.mailbox import valid_mailbox

log = logging.getLogger("smtpd")

CHUNK = 256 * 1024
COMMIT_TIMEOUT = 120.0
MAX_HOPS_COUNT = 100         # OpenSMTPD's limit on Received: headers
LOOP_REPLY = "500 5.4.6 Routing loop detected: Loop detected"
TEMPFAIL_REPLY = "451 4.3.0 Temporary failure"


RESERVE = 8                  # message ids pony holds ahead of MAIL FROM
RESERVE_PAUSE = 1.0          # seconds without refills after the queue refused one


async def create_message(pony) -> int:
    """A new message at the queue: its msgid, 0 when the queue cannot take one (the
    cause is logged).  Taken from pony's reserve when it has one (MessageReserve)."""
    msgid = pony.message_reserve.take()
    if msgid:
        return msgid
    msgids = await ask_messages(pony, 1)
    return msgids[0] if msgids else 0


async def ask_messages(pony, count: int) -> list[int]:
    """One SmtpMessageCreate round trip for ``count`` ids: those the queue gave (it
    may give fewer), none when it refused.  A reply that comes after we gave up is
    rolled back by pony."""
    try:
        reply = await pony.mesh.request(
            "queue", SmtpMessageCreate(reqid=pony.ctx.new_id(), count=count), (SmtpMessageCreateReply,))
    except PeerTimeout as exc:
        log.warning("warn: smtp: cannot create a message: %s", exc)
        return []
    if not reply.ok:
        log.warning("warn: smtp: cannot create a message: the queue refused it")
        return []
    return [reply.msgid, *reply.more]


class MessageReserve:
    """A few message ids taken from the queue before a transaction needs one, so
    that MAIL FROM is answered without waiting for the queue: under load that round
    trip was milliseconds of each message's way.  The ids come several at a time
    (one round trip once the reserve is down to half), so the reserve costs about
    one request and reply per RESERVE / 2 messages.  An id costs nothing on disk
    (the queue makes ``incoming/<msgid>/`` with the message's first envelope) and
    only an entry in the queue's memory; one still held when the daemon stops leaves
    nothing behind.  The reserve fills only once used (an idle daemon holds none)
    and pauses for RESERVE_PAUSE after the queue refused one (the session's own
    request then says why, as before)."""

    def __init__(self, pony, clock=time.monotonic) -> None:
        self.pony = pony
        self.clock = clock
        self.ids: collections.deque[int] = collections.deque()
        self.asked = 0               # ids asked for and not answered yet
        self.paused_until = 0.0

    def take(self) -> int:
        """A reserved msgid, or 0 (none left: the caller asks the queue itself)."""
        msgid = self.ids.popleft() if self.ids else 0
        held = len(self.ids) + self.asked
        if held <= RESERVE // 2 and self.clock() >= self.paused_until:
            count = RESERVE - held
            self.asked += count
            self.pony.spawn(self._fill(count))
        return msgid

    async def _fill(self, count: int) -> None:
        try:
            msgids = await ask_messages(self.pony, count)
        finally:
            self.asked -= count
        self.ids.extend(msgids)
        if not msgids:
            self.paused_until = self.clock() + RESERVE_PAUSE


async def expand_rcpt(pony, msgid: int, env: Envelope, *, rdns: str,
                      local_listener: bool, tls: bool = False, auth_user: str = "") -> tuple[str, list[int]]:
    """Match and expand one recipient; lka submits its envelopes to the queue.
    ("", evpids) when accepted, else (the SMTP reply to give, [])."""
    # the authenticated user, for `match auth` rules (a field of issue 8's contract)
    extra = {"auth_user": auth_user} if auth_user else {}
    try:
        reply = await pony.mesh.request(
            "lka", SmtpExpandRcpt(reqid=pony.ctx.new_id(), msgid=msgid, envelope=env, rdns=rdns,
                                  local_listener=local_listener, tls=tls, **extra),
            (SmtpExpandRcptReply, QueueEnvelopeCommitReply))
    except PeerTimeout as exc:
        log.warning("warn: smtp: recipient expansion failed: %s", exc)
        reply = None
    if isinstance(reply, SmtpExpandRcptReply):
        return f"{reply.code} {reply.text}", []
    if reply is not None and not reply.ok and reply.disk_full:
        return "452 4.3.1 Insufficient system storage", []
    if reply is None or not reply.ok:
        return TEMPFAIL_REPLY, []
    return "", list(reply.evpids)


async def store_message(pony, msgid: int, data: bytes) -> str:
    """Stream the message to the queue and commit it: "" once it is on disk, else the
    SMTP reply to give (the message is rolled back)."""
    for start in range(0, len(data), CHUNK):
        await pony.mesh.send("queue", SmtpMessageData(msgid=msgid, chunk=data[start:start + CHUNK]))
    return await commit_message(pony, msgid)


async def commit_message(pony, msgid: int) -> str:
    """Commit a message whose data went to the queue: "" once it is on disk, else the
    SMTP reply to give (the message is rolled back)."""
    send = pony.mesh.send
    try:
        reply = await pony.mesh.request(
            "queue", SmtpMessageCommit(reqid=pony.ctx.new_id(), msgid=msgid),
            (SmtpMessageCommitReply,), timeout=COMMIT_TIMEOUT)
    except PeerTimeout as exc:
        log.warning("warn: smtp: commit of %08x failed: %s", msgid, exc)
        reply = None
    if reply is None:
        await send("queue", SmtpMessageRollback(msgid=msgid))
        return TEMPFAIL_REPLY
    return "" if reply.ok else f"{reply.code} {reply.text}"


async def rollback(pony, msgid: int) -> None:
    await pony.mesh.send("queue", SmtpMessageRollback(msgid=msgid))


def count_received(message: bytes) -> int:
    """``Received:`` fields in the header section (LF or CRLF endings)."""
    count = 0
    for line in message.split(b"\n"):
        if not line or line == b"\r":
            break
        if line[:9].lower() == b"received:":
            count += 1
    return count


def received_line(*, helo: str, rdns: str, ip: str, name: str, esmtp: bool, msgid: int,
                  rcpts: list[str], secure: bool = False, user: str = "", tls_clause: str = "",
                  mask_src: bool = False, received_auth: bool = False) -> bytes:
    """The Received: field pony prepends to every message it stores, as OpenSMTPD's
    smtp_message_begin() writes it: ``with ESMTPSA`` for TLS and AUTH, the TLS
    details in parentheses (``tls_clause``), the client part left out on a
    ``mask-src`` listener, ``auth=yes user=...`` with ``received-auth``."""
    proto = ("ESMTP" if esmtp else "SMTP") + ("S" if secure else "") + ("A" if user else "")
    lines = [] if mask_src else [f"Received: from {helo} ({rdns} [{ip}])"]
    by = f"by {name} (pysmtpd) with {proto} id {msgid:08x}"
    if secure and tls_clause:
        by += f" ({tls_clause})"
        if received_auth:
            by += f" auth={'yes' if user else 'no'}" + (f" user={user}" if user else "")
    lines.append(f"\t{by}" if lines else f"Received: {by}")
    date = email.utils.format_datetime(email.utils.localtime())
    if len(rcpts) == 1:
        lines.append(f"\tfor <{rcpts[0]}>;")
    else:
        lines[-1] += ";"
    lines.append(f"\t{date}")
    return ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")


def _status_of(reply: str) -> str:
    return "permfail" if reply[:1] == "5" else "tempfail"


def _missing_headers(data: bytes, name: str) -> bytes:
    """Date and Message-ID for a message that lacks them (as a local listener adds them)."""
    head = data.split(b"\n\n", 1)[0].lower()
    fields = {line.split(b":", 1)[0].strip() for line in head.split(b"\n") if b":" in line
              and not line[:1].isspace()}
    extra = []
    if b"date" not in fields:
        extra.append(f"Date: {email.utils.format_datetime(email.utils.localtime())}\n")
    if b"message-id" not in fields:
        extra.append(f"Message-ID: <{time.time_ns():x}.{id(data):x}@{name}>\n")
    return "".join(extra).encode()


async def run(pony, req: PonyEnqueue) -> PonyEnqueueReply:
    """Carry out one internal injection (a task of its own in pony)."""
    config = pony.config
    name = config.hostname
    data = req.data.replace(b"\r\n", b"\n")
    if count_received(data) >= MAX_HOPS_COUNT:
        return PonyEnqueueReply(reqid=req.reqid, status="permfail", text=LOOP_REPLY)
    if not req.recipients:
        return PonyEnqueueReply(reqid=req.reqid, status="permfail", text="554 5.5.1 No recipient")
    if req.sender and not valid_mailbox(req.sender):
        return PonyEnqueueReply(reqid=req.reqid, status="permfail",
                                text="553 5.1.0 Sender address syntax error")
    for rcpt in req.recipients:
        if not valid_mailbox(rcpt):
            return PonyEnqueueReply(reqid=req.reqid, status="permfail",
                                    text=f"501 5.1.3 Recipient address syntax error: <{rcpt}>")
    msgid = await create_message(pony)
    if not msgid:
        return PonyEnqueueReply(reqid=req.reqid, status="tempfail", text="421 4.3.0 Temporary failure")
    session = pony.ctx.new_id()
    envelopes: list[tuple[int, str]] = []
    for rcpt in req.recipients:
        env = Envelope(smtpname=name, helo=name, hostname="localhost", sockaddr="local",
                       sender=req.sender, rcpt=rcpt, dest=rcpt, ctime=int(time.time()),
                       flags=["bounce"] if req.bounce else [], dsn_notify=req.dsn_notify,
                       dsn_ret=req.dsn_ret, dsn_envid=req.dsn_envid)
        refused, evpids = await expand_rcpt(pony, msgid, env, rdns="localhost", local_listener=True)
        if refused:
            await rollback(pony, msgid)
            log.info("%016x %s enqueue failed rcpt=<%s> result=\"%s\"", session, req.origin or "internal",
                     rcpt, refused)
            return PonyEnqueueReply(reqid=req.reqid, status=_status_of(refused), text=refused)
        envelopes.extend((evpid, rcpt) for evpid in evpids)
    if not req.bounce:
        data = _missing_headers(data, name) + data
    message = received_line(helo=name, rdns="localhost", ip="local", name=name, esmtp=True,
                            msgid=msgid, rcpts=req.recipients) + data
    failed = await store_message(pony, msgid, message)
    if failed:
        return PonyEnqueueReply(reqid=req.reqid, status=_status_of(failed), text=failed)
    log.info("%016x smtp message msgid=%08x size=%d nrcpt=%d proto=ESMTP origin=%s%s", session, msgid,
             len(message), len(req.recipients), req.origin or "internal",
             f" uid={req.uid}" if req.uid >= 0 else "")
    for evpid, rcpt in envelopes:
        log.info("%016x smtp envelope evpid=%016x from=<%s> to=<%s>", session, evpid, req.sender, rcpt)
    return PonyEnqueueReply(reqid=req.reqid, status="ok", text=f"250 2.0.0 {msgid:08x} Message accepted for delivery",
                            msgid=msgid)
