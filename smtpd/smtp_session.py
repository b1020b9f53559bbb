"""Inbound SMTP sessions: aiosmtpd does the wire protocol, this module the policy.

``Session`` adapts aiosmtpd's SMTP protocol to OpenSMTPD's behaviour (replies
with enhanced status codes, log lines, session ids); ``Handler`` carries each
command to the other processes: MAIL creates a message in the queue, RCPT asks
lka (which submits the envelopes to the queue), DATA streams the body to the
queue and answers 250 only once the queue has committed it to disk.

aiosmtpd only ends DATA on <CRLF>.<CRLF>, so a bare LF or CR never does (no SMTP
smuggling); it reads commands line by line, so pipelined clients work, and we
advertise PIPELINING (OpenSMTPD refuses it; RFC 2920 clients expect it).
"""
from __future__ import annotations

import logging
import re
import time

from aiosmtpd.smtp import SMTP, syntax

from common import stat
from common.envelope import Envelope
from common.trace import FLAGS, SESSION, trace
from common.vis import log_text as vis
from common.messages import SmtpMessageRollback
from smtpd import dsn_params, enqueue
from smtpd.mailbox import valid_mailbox

log = logging.getLogger("smtpd")


# aiosmtpd's own replies, said the way OpenSMTPD says them.
_REWRITE = {
    "503 Error: need MAIL command": "503 5.5.1 Invalid command: Command not allowed at this point.",
    "503 Error: need RCPT command": "503 5.5.1 Invalid command: Command not allowed at this point.",
    "503 Error: nested MAIL command": "503 5.5.1 Invalid command: Command not allowed at this point.",
    "503 Error: send HELO first": "503 5.5.1 Invalid command: Command not allowed at this point.",
    "503 Error: send EHLO first": "503 5.5.1 Invalid command: Command not allowed at this point.",
    "552 Error: Too much mail data":
        "554 5.3.4 Message too big for system: Transaction failed, message too big",
    "354 End data with <CR><LF>.<CR><LF>": '354 Enter mail, end with "." on a line by itself',
    "552 Error: message size exceeds fixed maximum message size":
        "552 5.3.4 Message too big for system: Message size exceeds fixed maximum message size",
    "221 Bye": "221 2.0.0 Bye",
    "250 OK": "250 2.0.0 Ok",
    "500 Command line too long": "500 5.5.1 Line too long",
    "500 Line too long (see RFC5321 4.5.3.1.6)": "500 5.5.1 Line too long",
}
_UNRECOGNIZED = re.compile(r'^500 Error: command ".*" not recognized$')
_HAS_ESC = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}( |$)")
_ESC_CLASS = {"2": "2.0.0", "3": "", "4": "4.0.0", "5": "5.5.1"}



_HELO_LABEL = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")
_ADDRESS_LITERAL = re.compile(r"^\[[0-9A-Fa-f:.IPv]+\]$")


def valid_helo(name: str) -> bool:
    """A HELO/EHLO argument: a host name (underscores tolerated, as real clients send
    them) or an address literal; nothing with spaces or control characters."""
    if len(name) > 255:
        return False
    if name.startswith("["):
        return bool(_ADDRESS_LITERAL.match(name))
    labels = name[:-1].split(".") if name.endswith(".") else name.split(".")
    return all(_HELO_LABEL.match(label) for label in labels)


def with_esc(status: str) -> str:
    """Every reply carries an enhanced status code (RFC 2034)."""
    status = _REWRITE.get(status, status)
    if _UNRECOGNIZED.match(status):
        return "500 5.5.1 Invalid command: Command unrecognized"
    if len(status) < 4 or _HAS_ESC.match(status) or status[0] == "3" or status.startswith("220 "):
        return status
    code, sep, text = status[:3], status[3:4], status[4:]
    if sep not in (" ", "-") or not code.isdigit() or sep == "-":
        return status
    esc = _ESC_CLASS.get(code[0], "")
    return f"{code} {esc} {text}" if esc else status


class Session(SMTP):
    """One inbound connection."""

    # RFC 5321 says 1000; real mail breaks it, and OpenSMTPD accepts lines up to 64 KiB.
    line_length_limit = 65535

    def __init__(self, handler, *, pony, listener, **kwargs) -> None:
        super().__init__(handler, **kwargs)
        self.pony = pony
        self.listener = listener
        self.session_id = pony.ctx.new_id()
        self.msgid = 0
        self.rcpt_count = 0
        self.envelopes: list[tuple[int, str]] = []     # (evpid, rcpt) of the transaction
        self.peer_ip = ""
        self.rdns = ""
        self.quit = False
        self._greeting_reply = False
        self._held_lines: list[str] = []
        self.sender = ""          # MAIL FROM of the transaction, "" for the null sender
        self.dsn_ret = ""         # RET= and ENVID= of the transaction (RFC 3461)
        self.dsn_options: list[str] = []   # DSN parameters of the command being handled
        self.dsn_envid = ""
        self._in_data = False            # between 354 and the final dot (for trace smtp)
        self._trace_partial = b""

    def _getaddr(self, arg: str):
        """The path exactly as sent: aiosmtpd's RFC 5322 parser would quote a
        malformed ``<bad address>`` into a valid-looking local part, and the
        mailbox check (valid_mailbox) must judge what the client wrote."""
        arg = arg.strip()
        if not arg:
            return "", ""
        if arg.startswith("<"):
            end = arg.find(">")
            if end < 0:
                return None, None
            # The null path stays "<>": aiosmtpd takes an empty address for a syntax error.
            return arg[1:end] or "<>", arg[end + 1:].lstrip()
        address, _, rest = arg.partition(" ")
        return address, rest.lstrip()

    def _take_dsn(self, arg: str | None) -> str | None:
        """Keep the DSN parameters of MAIL/RCPT aside, as sent (aiosmtpd refuses
        parameters it does not know, and upper-cases the rest)."""
        self.dsn_options = []
        if not arg or not self.session.extended_smtp:
            return arg
        end = arg.find(">")
        if end < 0:
            return arg
        params, self.dsn_options = dsn_params.split_dsn(arg[end + 1:])
        return arg[:end + 1] + (" " + params if params else "")

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg):
        await super().smtp_MAIL(self._take_dsn(arg))

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg):
        await super().smtp_RCPT(self._take_dsn(arg))

    async def push(self, status):
        # RFC 2034 s4: every reply carries an enhanced code, but for the greeting and
        # the replies to HELO and EHLO (OpenSMTPD's "250 HELP" has none either).
        if isinstance(status, str) and not self._greeting_reply:
            status = with_esc(status)
        elif isinstance(status, str) and status[3:4] == "-":
            # A multi-line EHLO reply goes out in one write: each send() on loopback
            # costs as much as the rest of the line's handling.
            if FLAGS.smtp:
                trace("smtp: %016x: >>> %s", self.session_id, status)
            self._held_lines.append(status)
            return
        if status[:3] == "354":
            self._in_data = True
        if FLAGS.smtp:
            trace("smtp: %016x: >>> %s", self.session_id, status)
        if self._held_lines:
            status = "\r\n".join([*self._held_lines, status])
            self._held_lines = []
        if FLAGS.io:
            trace("smtp: %016x: IO_DATAOUT %d bytes", self.session_id, len(status) + 2)
        await super().push(status)

    def data_received(self, data: bytes) -> None:
        if FLAGS.smtp or FLAGS.io:
            self._trace_input(data)
        super().data_received(data)

    def _trace_input(self, data: bytes) -> None:
        """``trace io``: every read; ``trace smtp``: every command line (``<<< ...``),
        and for the message itself only its size (its content stays out of the log)."""
        if FLAGS.io:
            trace("smtp: %016x: IO_DATAIN %d bytes", self.session_id, len(data))
        if not FLAGS.smtp:
            self._trace_partial = b""
            return
        lines = (self._trace_partial + data).split(b"\n")
        self._trace_partial = lines.pop()[-1024:]
        for raw in lines:
            line = raw.rstrip(b"\r")
            if self._in_data:
                if line == b".":
                    self._in_data = False
                    trace("smtp: %016x: <<< [EOM]", self.session_id)
                continue
            text = line[:1000].decode("utf-8", "backslashreplace")
            if text[:5].upper() == "AUTH ":          # never the credentials
                text = " ".join(text.split()[:2]) + " ..."
            trace("smtp: %016x: <<< %s", self.session_id, text)

    async def smtp_HELO(self, hostname: str):
        if await self._bad_helo("HELO", hostname):
            return
        self._greeting_reply = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._greeting_reply = False

    async def smtp_EHLO(self, hostname: str):
        if await self._bad_helo("EHLO", hostname):
            return
        self._greeting_reply = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._greeting_reply = False

    async def smtp_AUTH(self, arg: str):
        # No listener offers AUTH yet (it comes with the AUTH issue): answer as
        # OpenSMTPD does on a listener without "auth", and log it as it does, so that
        # ban tools catch credential scanners.  An initial response is not logged.
        words = (arg or "").split()
        shown = "AUTH" + (f" {words[0]}" if words else "") + (" (...)" if len(words) > 1 else "")
        if not self.session.host_name or self.msgid:
            await self.push(self.failed(shown, "503 5.5.1 Invalid command: Command not allowed at this point."))
        else:
            await self.push(self.failed(shown, "503 5.5.1 Invalid command: Command not supported"))

    async def _bad_helo(self, verb: str, hostname: str) -> bool:
        """OpenSMTPD's checks: a name is required and must be a domain or address literal
        (it goes into the Received header and the envelope)."""
        if not hostname:
            await self.push(f"501 5.5.1 Invalid command: {verb} requires domain name")
            return True
        if not valid_helo(hostname):
            await self.push("501 5.5.4 Invalid command arguments: Invalid domain name")
            return True
        return False

    async def smtp_HELP(self, arg: str):
        await self.push("214- This is pysmtpd")
        await self.push("214- To report bugs in the implementation, please see its issue tracker")
        await self.push("214 2.0.0 End of HELP info")

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if peer else "local"
        self.pony.sessions_open += 1
        stat.increment("smtp.session")
        stat.increment("smtp.session." + ("local" if not peer else "inet6" if ":" in self.peer_ip else "inet4"))
        if FLAGS.smtp:
            lis = self.listener
            trace("smtp: %016x: connected to listener %s port %d [hostname=%s, tag=%s]",
                  self.session_id, lis.address, lis.port, lis.hostname or "-", lis.tag or "-")

    async def _handle_client(self) -> None:
        SESSION.set(self.session_id)     # names this session in `trace mproc` lines
        self.rdns = await self.pony.reverse_dns(self.peer_ip)
        log.info("%016x smtp connected address=%s host=%s", self.session_id, self.peer_ip, self.rdns)
        await super()._handle_client()

    def connection_lost(self, exc) -> None:
        reason = "quit" if self.quit else "disconnect"
        log.info("%016x smtp disconnected reason=%s", self.session_id, reason)
        self.pony.sessions_open -= 1
        stat.decrement("smtp.session")
        if self.msgid:
            self.pony.spawn(self.pony.mesh.send("queue", SmtpMessageRollback(msgid=self.msgid)))
            self.msgid = 0
        super().connection_lost(exc)

    def failed(self, command: str, result: str) -> str:
        log.info('%016x smtp failed-command command="%s" result="%s"', self.session_id, command, result)
        return result


def log_authentication(session_id: int, user: str, result: str) -> None:
    """OpenSMTPD's AUTH outcome line (``result`` ok, permfail or tempfail), which ban
    tools key on.  To be called by the AUTH implementation (a later issue)."""
    log.info("%016x smtp authentication user=%s result=%s", session_id, vis(user), result)


class Handler:
    def __init__(self, pony) -> None:
        self.pony = pony
        self.config = pony.config

    def name(self, server: Session) -> str:
        return server.listener.hostname or self.config.hostname

    def greeting(self, server: Session, helo: str) -> str:
        return f"{self.name(server)} Hello {helo} [{server.peer_ip}], pleased to meet you"

    async def handle_HELO(self, server: Session, session, envelope, hostname: str) -> str:
        session.host_name = hostname
        return f"250 {self.greeting(server, hostname)}"

    async def handle_EHLO(self, server: Session, session, envelope, hostname: str, responses) -> list[str]:
        session.host_name = hostname
        return [f"250-{self.greeting(server, hostname)}", "250-8BITMIME",
                "250-ENHANCEDSTATUSCODES", f"250-SIZE {self.config.max_message_size}",
                "250-DSN", "250-PIPELINING", "250 HELP"]

    async def handle_NOOP(self, server, session, envelope, arg) -> str:
        return "250 2.0.0 Ok"

    async def handle_QUIT(self, server: Session, session, envelope) -> str:
        server.quit = True
        return "221 2.0.0 Bye"

    async def handle_RSET(self, server: Session, session, envelope) -> str:
        await self._rollback(server)
        return "250 2.0.0 Reset state"

    async def handle_VRFY(self, server, session, envelope, address) -> str:
        return "252 2.5.2 Cannot VRFY user; try RCPT to attempt delivery"

    async def _rollback(self, server: Session) -> None:
        if server.msgid:
            await self.pony.mesh.send("queue", SmtpMessageRollback(msgid=server.msgid))
            server.msgid = 0
        server.rcpt_count = 0

    async def handle_MAIL(self, server: Session, session, envelope, address: str, options) -> str:
        if server.msgid:
            # aiosmtpd's own nested-MAIL check misses a transaction from the null sender.
            return "503 5.5.1 Invalid command: Command not allowed at this point."
        if address == "<>":
            address = ""
        if address.startswith("@") and ":" in address:       # source route: <@a,@b:user@d>
            address = address.split(":", 1)[1]
        if address and "@" not in address:
            address = f"{address}@{self.name(server)}"
        if address and not valid_mailbox(address):
            return server.failed(f"MAIL FROM:<{address}>", "553 5.1.0 Sender address syntax error")
        mail_dsn = dsn_params.parse_mail_options(server.dsn_options)
        if isinstance(mail_dsn, str):
            return server.failed(f"MAIL FROM:<{address}>", mail_dsn)
        msgid = await enqueue.create_message(self.pony)
        if not msgid:
            return server.failed("MAIL", "421 4.3.0 Temporary failure")
        server.msgid = msgid
        server.dsn_ret, server.dsn_envid = mail_dsn
        server.rcpt_count = 0
        server.envelopes = []
        server.sender = address
        envelope.mail_from = address or "<>"     # aiosmtpd takes an empty one for "no MAIL yet"
        envelope.mail_options.extend(options)
        return "250 2.0.0 Ok"

    async def handle_RCPT(self, server: Session, session, envelope, address: str, options) -> str:
        if not server.msgid:
            return "503 5.5.1 Invalid command: Command not allowed at this point."
        if address.lower() == "postmaster":        # RFC 5321 4.5.1: must be accepted bare
            address = f"postmaster@{self.name(server)}"
        if not valid_mailbox(address):
            return server.failed(f"RCPT TO:<{address}>", "501 5.1.3 Recipient address syntax error")
        if server.rcpt_count >= self.config.smtp_max_rcpt:
            return "451 4.5.3 Too many recipients: Too many recipients"
        dsn = dsn_params.parse_rcpt_options(server.dsn_options)
        if isinstance(dsn, str):
            return server.failed(f"RCPT TO:<{address}>", dsn)
        env = Envelope(
            smtpname=self.name(server), helo=session.host_name or "", hostname=server.rdns,
            sockaddr=_sockaddr_text(server.peer_ip), sender=server.sender, rcpt=address,
            dest=address, tag=server.listener.tag or "", ctime=int(time.time()),
            dsn_notify=dsn.notify, dsn_orcpt=dsn.orcpt, dsn_ret=server.dsn_ret,
            dsn_envid=server.dsn_envid)
        refused, evpids = await enqueue.expand_rcpt(
            self.pony, server.msgid, env, rdns=server.rdns,
            local_listener=self.pony.is_local_listener(server.listener))
        if refused:
            return server.failed(f"RCPT TO:<{address}>", refused)
        server.envelopes.extend((evpid, address) for evpid in evpids)
        server.rcpt_count += 1
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Destination address valid: Recipient ok"

    async def handle_DATA(self, server: Session, session, envelope) -> str:
        msgid = server.msgid
        content: bytes = envelope.original_content or b""
        body = content.replace(b"\r\n", b"\n")
        if enqueue.count_received(body) >= enqueue.MAX_HOPS_COUNT:
            log.warning("warn: loop detected")
            await self._rollback(server)
            return server.failed("DATA", enqueue.LOOP_REPLY)
        data = self._received(server, session, envelope, msgid) + body
        failed = await enqueue.store_message(self.pony, msgid, data)
        server.msgid = 0
        server.rcpt_count = 0
        if failed:
            return server.failed("DATA", failed)
        proto = "ESMTP" if session.extended_smtp else "SMTP"
        # As OpenSMTPD: the message line, then one line per envelope, once committed.
        log.info("%016x smtp message msgid=%08x size=%d nrcpt=%d proto=%s",
                 server.session_id, msgid, len(data), len(envelope.rcpt_tos), proto)
        for evpid, rcpt in server.envelopes:
            log.info("%016x smtp envelope evpid=%016x from=<%s> to=<%s>",
                     server.session_id, evpid, server.sender, rcpt)
        return f"250 2.0.0 {msgid:08x} Message accepted for delivery"

    def _received(self, server: Session, session, envelope, msgid: int) -> bytes:
        return enqueue.received_line(
            helo=session.host_name or server.peer_ip, rdns=server.rdns, ip=server.peer_ip,
            name=self.name(server), esmtp=session.extended_smtp, msgid=msgid,
            rcpts=envelope.rcpt_tos)


def _sockaddr_text(ip: str) -> str:
    if ip == "local":
        return "local"
    return f"[{ip}]" if ":" in ip else ip
