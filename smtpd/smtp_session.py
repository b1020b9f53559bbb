"""Inbound SMTP sessions: the asyncio driver of the protocol core (OpenSMTPD's smtp_session.c, its I/O half).

``Session`` is an ``asyncio.Protocol``: bytes from the socket go into the sans-I/O
core (smtpd/smtp_proto.py), whose replies go back to the socket; the core's events
are answered here by asking the other processes (lka for recipients, senders and
credentials, the queue for messages).  The body streams to the queue in chunks as
it arrives; nothing here holds a whole message.

Every 4xx/5xx reply is logged as OpenSMTPD's ``failed-command`` line.  An internal
fault (an exception here, a peer process that does not answer) becomes a temporary
reply, ``451 4.3.0`` in a transaction or ``421 4.3.0`` (which ends the session), with
a log line naming the cause; never a 5xx.  A session that ends with a transaction
open rolls its message back, so nothing stays in the spool's incoming/.
"""
from __future__ import annotations

import asyncio
import logging
import time

from common import messages, stat
from common.envelope import Envelope
from common.ipc import PeerTimeout
from common.messages import SmtpMessageData, SmtpMessageRollback
from common.trace import FLAGS, SESSION, trace
from common.vis import COMMAND, log_text as vis
from smtpd import enqueue, smtp_proto
from smtpd.lka_filter import RESPONSE_PHASE
from smtpd.smtp_filters import FilterFailed, SessionFilters
from smtpd.smtp_proto import (
    NEED_DATA, PAUSED, AuthCredentials, Command, ConnectionClosed, DataChunk, DataEnd, DataStart,
    Helo, MailFrom, Phase, ProxyReceived, RcptTo, ServerConnection, Settings, StartTls,
)

log = logging.getLogger("smtpd")


INPUT_HIGH_WATER = 512 * 1024    # unprocessed input above which the socket stops being read
AUTH_FAIL_DELAY_MAX = 5.0        # seconds: a failed AUTH waits 1 s per failure of its client, up to this
R_TOO_MANY = "421 4.7.0 Too many sessions, try again later"
# Body bytes gathered before they go to the queue: a small message (and its Received
# line) leaves in one SmtpMessageData, in the same frame as its commit (common/ipc.py).
BODY_BATCH = 64 * 1024
# End of DATA (the final dot received) to its reply written: a pysmtpd addition to
# OpenSMTPD's keys (smtp.commit.latency.count, .p50_ms, .p90_ms, .p99_ms, .max_ms).
COMMIT_LATENCY = stat.histogram("smtp.commit.latency")


class Session(asyncio.Protocol):
    """One inbound connection, from accept to close."""

    def __init__(self, pony, listener) -> None:
        self.pony = pony
        self.config = pony.config
        self.listener = listener
        self.session_id = pony.ctx.new_id()
        self.transport: asyncio.Transport | None = None
        self.peer_ip = ""
        self.rdns = ""
        self.conn: ServerConnection | None = None
        self.msgid = 0
        self.envelopes: list[tuple[int, str]] = []   # (evpid, rcpt) of the transaction
        self.dsn = ("", "")                          # RET, ENVID of the transaction
        self.data_size = 0
        self._body: list[bytes] = []                 # body bytes not yet sent to the queue
        self._body_size = 0
        self.ssl_object = None
        self._wake = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._reading_paused = False
        self._last_input = 0.0
        self._data_end_at = 0.0           # when the final dot of the message being answered came
        self._lost = False
        self._counted = False
        self._task: asyncio.Task | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._waiting_client = False
        self._end_reason = ""
        # filters (docs/filters.md): the chain of the listener, the junk marks it gave
        self.filters: SessionFilters | None = None
        self.junk = False
        self.tx_junk = False
        self._event = None                # the event being answered (for tx-* reports)
        self._pump: asyncio.Task | None = None

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if peer else "local"
        self.ssl_object = transport.get_extra_info("ssl_object")
        self._last_input = time.monotonic()
        refused = self.pony.admit(self)
        if refused:
            log.warning("warn: smtp: %016x: refusing %s: %s", self.session_id, self.peer_ip, refused)
            transport.write(R_TOO_MANY.encode() + b"\r\n")
            transport.close()
            return
        self._counted = True
        stat.increment("smtp.session")
        stat.increment("smtp.session." + ("local" if not peer else "inet6" if ":" in self.peer_ip else "inet4"))
        if FLAGS.smtp:
            lis = self.listener
            trace("smtp: %016x: connected to listener %s port %d [hostname=%s, tag=%s]",
                  self.session_id, lis.address, lis.port, lis.hostname or "-", lis.tag or "-")
        self.conn = ServerConnection(self._settings(), on_reply=self._on_reply, on_command=self._on_command)
        self._task = self.pony.spawn(self._run())

    def data_received(self, data: bytes) -> None:
        if FLAGS.io:
            trace("smtp: %016x: IO_DATAIN %d bytes", self.session_id, len(data))
        self._last_input = time.monotonic()
        if self.conn is None:
            return
        self.conn.receive_data(data)
        if len(self.conn._in) > INPUT_HIGH_WATER and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake.set()

    def eof_received(self):
        if self.conn is not None:
            self.conn.receive_data(b"")
        self._wake.set()
        return True          # half-closed: the replies to what came before still go out

    def connection_lost(self, exc) -> None:
        self._lost = True
        if self.conn is not None:
            self.conn.receive_data(b"")
        self._wake.set()
        self._writable.set()

    def pause_writing(self) -> None:
        self._writable.clear()      # the client does not read its replies: stop reading it

    def resume_writing(self) -> None:
        self._writable.set()

    # -- the session ---------------------------------------------------------------------

    def _settings(self) -> Settings:
        lis, config = self.listener, self.config
        has_tls = self.pony.tls_context(lis) is not None
        return Settings(
            hostname=self.name, max_message_size=config.max_message_size,
            max_rcpt=config.smtp_max_rcpt, max_mails=config.smtp_max_mails,
            dsn=not lis.no_dsn,
            starttls=has_tls and lis.tls in ("starttls", "require"),
            tls_require=lis.tls == "require", smtps=self.ssl_object is not None,
            auth=lis.auth, proxy_v2=lis.proxy_v2,
            proxy_parser=self.pony.proxy_parser(), peer=self.peer_ip)

    @property
    def name(self) -> str:
        return self.listener.hostname or self.config.hostname

    async def _run(self) -> None:
        SESSION.set(self.session_id)     # names this session in `trace mproc` lines
        conn = self.conn
        reason = "disconnect"
        try:
            if not conn.settings.proxy_v2:
                await self._connected()
            self._arm_timer()
            reason = await self._serve(conn)
        except Exception as exc:          # a bug of ours: a temporary failure, never a 5xx
            log.exception("warn: smtp: %016x: internal error: %s", self.session_id, exc)
            await self._rollback()
            if not self._lost:
                conn.shutdown(smtp_proto.R_TEMPFAIL)
                self._flush()
        finally:
            await self._rollback()
            self._end(reason)

    async def _connected(self) -> None:
        self.rdns = await self.pony.reverse_dns(self.peer_ip)
        log.info("%016x smtp connected address=%s host=%s", self.session_id, self.peer_ip, self.rdns)
        if self.ssl_object is not None:
            self._log_tls()
        if self.listener.filter and not await self._filter_connect():
            self._flush()
            return
        self.conn.greet()
        self._report("link-greeting", self.name)
        self._flush()

    # -- filters (smtpd/smtp_filters.py, docs/filters.md) ---------------------------------

    def _report(self, event: str, *params: str) -> None:
        if self.filters is not None:
            self.filters.report(time.time(), event, *params)

    async def _filter_connect(self) -> bool:
        """Begin the session at lka and ask the connect phase; False: it was refused."""
        filters = SessionFilters(self, self.listener.filter)
        self.filters = filters
        self.pony.filtered[self.session_id] = filters
        peer = self.transport.get_extra_info("peername")
        local = self.transport.get_extra_info("sockname")
        # OpenSMTPD's ss_to_text: IPv6 in brackets; ADDRESS:PORT in link-connect
        src = f"{_text_addr(peer[0])}:{peer[1]}" if peer else "unix:local"
        dest = f"{_text_addr(local[0])}:{local[1]}" if isinstance(local, tuple) else "unix:local"
        if self.peer_ip != (peer[0] if peer else "local"):
            src = f"{_text_addr(self.peer_ip)}:0"          # the PROXY header's client
        try:
            ok = await filters.begin(self.rdns, src, dest, time.time())
            if not ok:
                raise FilterFailed(f"filter {self.listener.filter}: not running")
            if filters.wants("connect"):
                decision, param = await filters.ask("connect", _text_addr(self.peer_ip), time.time())
                self._filter_response("connect", decision, param)
                if decision in ("reject", "disconnect"):
                    self.conn.shutdown(param)
                    return False
                if decision == "junk":
                    self.junk = True
        except PeerTimeout as exc:
            log.warning("warn: smtp: %016x: internal error, temporary failure: %s", self.session_id, exc)
            self.conn.shutdown(smtp_proto.R_TEMPFAIL)
            return False
        return True

    def _filter_response(self, phase: str, decision: str, param: str | None) -> None:
        shown = RESPONSE_PHASE.get(phase, phase)
        if param is None or decision in ("proceed", "junk"):
            self._report("filter-response", shown, decision)
        else:
            self._report("filter-response", shown, decision, param)

    async def _filter_phase(self, conn: ServerConnection, event) -> bool:
        """Ask the chain about the event's phase; False when it answered the event itself."""
        filters = self.filters
        phase = event.phase.value
        if not filters.wants(phase):
            await filters.flush()
            return True
        if phase == "mail-from":
            self.tx_junk = False             # a new transaction: only its own junk marks count
        param = {Helo: lambda e: e.name, MailFrom: lambda e: e.sender, RcptTo: lambda e: e.rcpt,
                 AuthCredentials: lambda e: e.mechanism}.get(type(event), lambda e: "")(event)
        decision, text = await filters.ask(phase, param, time.time())
        self._filter_response(phase, decision, text)
        if decision == "junk":
            if phase in ("helo", "ehlo", "starttls", "auth"):
                self.junk = True
            else:
                self.tx_junk = True
        elif decision == "reject":
            if phase == "commit":
                await self._rollback()
            conn.refuse(text)
            return False
        elif decision == "disconnect":
            await self._rollback()
            conn.shutdown(text)
            return False
        elif decision == "rewrite" and text is not None:
            return self._rewrite(conn, event, text)
        return True

    def _rewrite(self, conn: ServerConnection, event, text: str) -> bool:
        """A filter's new parameter for the command, checked as the client's would be."""
        if isinstance(event, Helo):
            event.name = text
        elif isinstance(event, (MailFrom, RcptTo)):
            mail = isinstance(event, MailFrom)
            address, _ = smtp_proto.parse_path(text if text.startswith("<") else f"<{text}>",
                                               domain=self.name, mailfrom=mail)
            if address is None:
                conn.refuse(smtp_proto.R_SENDER_SYNTAX if mail else smtp_proto.R_RCPT_SYNTAX)
                return False
            if mail:
                event.sender = address
            else:
                event.rcpt = address
        return True

    async def _pump_filtered(self, msgid: int) -> bool:
        """What the data-line filters write goes to the queue; False if one failed."""
        while True:
            chunk, done, failed = await self.filters.data_out.get()
            if failed:
                return False
            if chunk:
                self.data_size += len(chunk)
                await self.pony.mesh.send("queue", SmtpMessageData(msgid=msgid, chunk=chunk))
            if done:
                return True

    async def _serve(self, conn: ServerConnection) -> str:
        while True:
            if not self._writable.is_set():
                await self._writable.wait()      # a client that does not read its replies
            event = conn.next_event()
            if event is NEED_DATA:
                self._flush()
                if self._lost:
                    return "disconnect"
                await self._wait_input()
                continue
            if event is PAUSED:
                self._flush()
                if conn.closing:
                    self._close()
                    return "quit" if conn.state is smtp_proto.State.QUIT and not self._lost else "disconnect"
                raise RuntimeError(f"core paused in state {conn.state} with nothing to answer")
            if isinstance(event, ConnectionClosed):
                self._flush()
                self._close()
                if event.reason == "proxy-error":
                    log.info('%016x smtp event=closed address=%s reason="protocol error (%s)"',
                             self.session_id, self.peer_ip, vis_command(event.detail))
                return event.reason
            try:
                if isinstance(event, DataChunk):
                    await self._data_chunk(event)
                else:
                    if isinstance(event, DataEnd):
                        # the bytes holding the dot came with the last input read
                        self._data_end_at = self._last_input
                    await self._answer(conn, event)
            except Exception as exc:       # our fault, or a peer that did not answer
                cause = str(exc) if isinstance(exc, PeerTimeout) else f"{type(exc).__name__}: {exc}"
                log.warning("warn: smtp: %016x: internal error, temporary failure: %s", self.session_id, cause)
                if not isinstance(exc, PeerTimeout):
                    log.debug("traceback", exc_info=True)
                await self._rollback()
                conn.internal_error()

    async def _answer(self, conn: ServerConnection, event) -> None:
        """One wait point of the core.  Filters hook in here, before the work: a
        rejecting filter answers ``conn.refuse(reply)`` instead (the commit phase is
        asked in _data_end, once the data-line filters have written the body)."""
        self._event = event
        try:
            if (self.filters is not None and not isinstance(event, (ProxyReceived, DataEnd))
                    and not await self._filter_phase(conn, event)):
                return
            await self._work(conn, event)
        finally:
            self._event = None

    async def _work(self, conn: ServerConnection, event) -> None:
        match event:
            case ProxyReceived(header=header):
                if not header.local and header.src is not None:
                    refused = self.pony.readdress(self, header.src[0])
                    if refused:
                        log.warning("warn: smtp: %016x: refusing %s: %s", self.session_id, header.src[0], refused)
                        conn.shutdown(R_TOO_MANY)
                        return
                    conn.settings.peer = self.peer_ip
                await self._connected()
            case Helo():
                conn.accept()
            case MailFrom():
                await self._mail(conn, event)
            case RcptTo():
                await self._rcpt(conn, event)
            case DataStart():
                await self._data_start(conn)
            case DataEnd():
                await self._data_end(conn, event)
            case StartTls():
                await self._starttls(conn)
            case AuthCredentials():
                await self._auth(conn, event)
            case Command(phase=Phase.RSET):
                await self._rollback()
                conn.accept()
            case Command(phase=Phase.QUIT):
                conn.accept()
            case Command():
                conn.accept()

    async def _mail(self, conn: ServerConnection, event: MailFrom) -> None:
        senders = self.listener.senders
        if senders and conn.authenticated:
            check = getattr(messages, "SmtpCheckSender", None)
            reply = await self.pony.mesh.request("lka", check(
                reqid=self.pony.ctx.new_id(), session=self.session_id, table=senders,
                user=conn.username, sender=event.sender), (messages.SmtpCheckSenderReply,))
            if getattr(reply, "result", "") == "tempfail":
                conn.refuse("421 4.3.0 Temporary Error")
                return
            if not reply.ok:
                conn.refuse("530 Sender rejected")
                return
        msgid = await enqueue.create_message(self.pony)
        if not msgid:
            conn.refuse(smtp_proto.R_TEMPFAIL)
            return
        if self._lost:                      # the client left while the queue was busy
            await self.pony.mesh.send("queue", SmtpMessageRollback(msgid=msgid))
            conn.refuse(smtp_proto.R_TEMPFAIL)
            return
        self.msgid = msgid
        self.envelopes = []
        self.dsn = (event.dsn_ret, event.dsn_envid)
        self._report("tx-begin", f"{msgid:08x}")
        conn.accept()

    async def _rcpt(self, conn: ServerConnection, event: RcptTo) -> None:
        env = Envelope(
            smtpname=self.name, helo=conn.helo, hostname=self.rdns,
            sockaddr=_sockaddr_text(self.peer_ip), sender=conn.tx.sender, rcpt=event.rcpt,
            dest=event.rcpt, tag=self.listener.tag or "", ctime=int(time.time()),
            dsn_notify=event.dsn_notify, dsn_orcpt=event.dsn_orcpt, dsn_ret=self.dsn[0],
            dsn_envid=self.dsn[1])
        if conn.authenticated and hasattr(env, "username"):
            env.username = conn.username
        refused, evpids = await enqueue.expand_rcpt(
            self.pony, self.msgid, env, rdns=self.rdns,
            local_listener=self.pony.is_local_listener(self.listener), tls=conn.secure,
            auth_user=conn.username if conn.authenticated else "")
        if refused:
            conn.refuse(refused)
            return
        self.envelopes.extend((evpid, event.rcpt) for evpid in evpids)
        for evpid in evpids:
            self._report("tx-envelope", f"{self.msgid:08x}", f"{evpid:016x}")
        conn.accept()

    async def _data_start(self, conn: ServerConnection) -> None:
        lis = self.listener
        received = enqueue.received_line(
            helo=conn.helo or self.peer_ip, rdns=self.rdns, ip=self.peer_ip, name=self.name,
            esmtp=conn.extended, msgid=self.msgid, rcpts=conn.tx.rcpts, secure=conn.secure,
            user=conn.username if conn.authenticated else "",
            tls_clause=self.pony.tls_received_clause(self.ssl_object) if conn.secure else "",
            mask_src=lis.mask_src,
            received_auth=lis.received_auth)
        if self.junk or self.tx_junk:
            received = b"X-Spam: Yes\n" + received      # as OpenSMTPD, before the Received line
        self._report("tx-data", f"{self.msgid:08x}", "ok")
        if self.filters is not None and self.filters.wants_data:
            self.data_size = 0
            await self.filters.data(received, first=True)
            self._pump = asyncio.ensure_future(self._pump_filtered(self.msgid))
            conn.accept()
            return
        self.data_size = len(received)
        self._body = [received]
        self._body_size = len(received)
        conn.accept()

    async def _data_chunk(self, event: DataChunk) -> None:
        if self._pump is not None:
            await self.filters.data(event.data)
            return
        self.data_size += len(event.data)
        if self.msgid:
            self._body.append(event.data)
            self._body_size += len(event.data)
            if self._body_size >= BODY_BATCH:
                await self._send_body()

    async def _send_body(self) -> None:
        """What was gathered of the body goes to the queue; awaits only when the
        queue's pipe is full (the client waits with us)."""
        body = self._body
        if not body:
            return
        chunk = body[0] if len(body) == 1 else b"".join(body)
        self._body = []
        self._body_size = 0
        await self.pony.mesh.send("queue", SmtpMessageData(msgid=self.msgid, chunk=chunk))

    async def _data_end(self, conn: ServerConnection, event: DataEnd) -> None:
        if FLAGS.smtp:
            trace("smtp: %016x: <<< [EOM]", self.session_id)
        pump, self._pump = self._pump, None
        if pump is not None:
            # the final dot goes to the filters even when the message is refused (as
            # OpenSMTPD's smtp_tx_filtered_dataline): their stream ends either way
            await self.filters.data(b"", last=True)
            if event.error or not self.msgid:
                pump.cancel()
            else:
                try:
                    async with asyncio.timeout(self.filters.timeout):
                        written = await pump
                except TimeoutError:
                    written = False
                if not written:
                    raise FilterFailed(f"filter {self.filters.name}: data-line filter failed")
        if event.error or not self.msgid:
            self._body, self._body_size = [], 0
        else:
            await self._send_body()          # before the commit phase: a filter may reject
        if self.filters is not None and not event.error and self.msgid:
            if not await self._filter_phase(conn, event):
                return
        msgid, self.msgid = self.msgid, 0
        self.tx_junk = False                 # the transaction ends here, whatever its outcome
        if event.error or not msgid:
            if msgid:
                await self.pony.mesh.send("queue", SmtpMessageRollback(msgid=msgid))
            if event.error == "loop":
                log.warning("warn: loop detected")
            conn.refuse({"size": smtp_proto.R_TOO_BIG, "loop": smtp_proto.R_LOOP}.get(
                event.error, smtp_proto.R_TX_TEMPFAIL))
            return
        failed = await enqueue.commit_message(self.pony, msgid)
        if failed:
            conn.refuse(failed if failed[:3] != "421" else smtp_proto.R_TX_TEMPFAIL)
            return
        nrcpt = len(conn.tx.rcpts)
        sender = conn.tx.sender
        self._report("tx-commit", f"{msgid:08x}", str(self.data_size))
        conn.accept(msgid=msgid)
        # As OpenSMTPD: the message line, then one line per envelope, once committed.
        log.info("%016x smtp message msgid=%08x size=%d nrcpt=%d proto=%s",
                 self.session_id, msgid, self.data_size, nrcpt, "ESMTP" if conn.extended else "SMTP")
        for evpid, rcpt in self.envelopes:
            log.info("%016x smtp envelope evpid=%016x from=<%s> to=<%s>",
                     self.session_id, evpid, vis(sender), vis(rcpt))
        self.envelopes = []

    async def _starttls(self, conn: ServerConnection) -> None:
        context = self.pony.tls_context(self.listener)
        self.transport.pause_reading()       # the next bytes are the TLS handshake's
        conn.accept()                        # 220, and the clear-text pipeline dropped
        self._flush()
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(self.transport, self, context, server_side=True)
        except (OSError, ValueError, ConnectionError) as exc:
            # a failed handshake (a scanner, clear text after 220): the end, as OpenSMTPD's io-error
            self._end_reason = f'"io-error: {vis_command(str(exc) or type(exc).__name__)}"'
            self._lost = True
            self.transport.abort()
            conn.shutdown(smtp_proto.R_TEMPFAIL)     # never written: the core just ends
            return
        self.transport = transport
        self.ssl_object = transport.get_extra_info("ssl_object")
        conn.tls_established()
        self._log_tls()
        self._report("link-tls", self.pony.tls_log_text(self.ssl_object))

    def _log_tls(self) -> None:
        text = self.pony.tls_log_text(self.ssl_object)
        log.info("%016x smtp tls ciphers=%s", self.session_id, text)

    async def _auth(self, conn: ServerConnection, event: AuthCredentials) -> None:
        request = getattr(messages, "SmtpAuthenticate", None)
        if request is None:
            result = "tempfail"
        else:
            reply = await self.pony.mesh.request("lka", request(
                reqid=self.pony.ctx.new_id(), session=self.session_id,
                table=self.listener.auth_table, user=event.user,
                password=event.password), (messages.SmtpAuthenticateReply,))
            result = reply.result
        log_authentication(self.session_id, event.user, result)
        self._report("link-auth", {"ok": "pass", "permfail": "fail"}.get(result, "error"), event.user)
        failures = self.pony.auth_failures
        if result == "ok":
            failures.pop(self.peer_ip, None)
            conn.accept()
        elif result == "permfail":
            # per client address, across its sessions: a guesser gains nothing by reconnecting
            if len(failures) >= 10000:
                failures.clear()            # bounded memory; a flood of addresses forgets
            failures[self.peer_ip] = failures.get(self.peer_ip, 0) + 1
            await asyncio.sleep(min(AUTH_FAIL_DELAY_MAX, float(failures[self.peer_ip])))
            conn.refuse(smtp_proto.R_AUTH_FAILED)
        else:
            conn.refuse(smtp_proto.R_TEMPFAIL)

    # -- I/O helpers ---------------------------------------------------------------------

    async def _wait_input(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()
        self._waiting_client = True
        try:
            await self._wake.wait()
        finally:
            self._waiting_client = False
        self._wake.clear()

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self._lost and self.transport is not None:
            if FLAGS.io:
                trace("smtp: %016x: IO_DATAOUT %d bytes", self.session_id, len(data))
            if self._data_end_at:       # the reply to a final dot: timed as it is handed over
                COMMIT_LATENCY.observe(time.monotonic() - self._data_end_at)
                self._data_end_at = 0.0
            self.transport.write(data)

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _arm_timer(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._timeout(), self._check_timeout)

    def _timeout(self) -> float:
        body = self.conn is not None and self.conn.state is smtp_proto.State.BODY
        return float(self.config.smtp_data_timeout if body else self.config.smtp_command_timeout)

    def _check_timeout(self) -> None:
        """Timeouts count from the last bytes received, and only while the session
        waits for the client (a slow sender still sending DATA is never cut)."""
        self._timer = None
        if self._lost:
            return
        idle = time.monotonic() - self._last_input
        limit = self._timeout()
        if self._waiting_client and idle >= limit:
            self._end_reason = "timeout"
            self._report("timeout")
            self._lost = True
            self.transport.abort()
            self._wake.set()
            return
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(max(0.5, limit - idle), self._check_timeout)

    async def _rollback(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            self._pump = None
            if not self._lost:
                await self.filters.data(b"", last=True)     # end the filters' stream
        self.tx_junk = False
        self._body, self._body_size = [], 0
        if self.msgid:
            msgid, self.msgid = self.msgid, 0
            self._report("tx-rollback", f"{msgid:08x}")
            await self.pony.mesh.send("queue", SmtpMessageRollback(msgid=msgid))

    def _end(self, reason: str) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._close()
        # after bad input OpenSMTPD's session has entered its QUIT state: it says reason=quit
        shown = "quit" if reason == "bad-input" else reason
        log.info("%016x smtp disconnected reason=%s", self.session_id, self._end_reason or shown)
        if self.filters is not None:
            self.pony.filtered.pop(self.session_id, None)
            self.pony.spawn(self.filters.end())
        if self._counted:
            self._counted = False
            self.pony.release(self)
            stat.decrement("smtp.session")

    def _report_reply(self, reply: str) -> None:
        """protocol-server, and the tx-* events whose result is the reply (report_smtp.c)."""
        for line in reply.split("\r\n"):
            self._report("protocol-server", line)
        event = self._event
        if isinstance(event, MailFrom):
            self._report("tx-mail", f"{self.msgid:08x}", _tx_result(reply), event.sender)
        elif isinstance(event, RcptTo):
            self._report("tx-rcpt", f"{self.msgid:08x}", _tx_result(reply), event.rcpt)
        elif isinstance(event, Helo) and reply[:1] == "2":
            self._report("link-identify", "EHLO" if event.extended else "HELO", event.name)
        elif isinstance(event, Command) and event.phase is Phase.RSET:
            self._report("tx-reset", f"{self.msgid:08x}" if self.msgid else "")

    # -- logging -------------------------------------------------------------------------

    def _on_command(self, conn: ServerConnection, line: str) -> None:
        if FLAGS.smtp:
            trace("smtp: %016x: <<< %s", self.session_id, line[:1000])
        if self.filters is not None:
            self._report("protocol-client", line)

    def _on_reply(self, conn: ServerConnection, command: str, reply: str) -> None:
        if FLAGS.smtp:
            for line in reply.split("\r\n"):
                trace("smtp: %016x: >>> %s", self.session_id, line)
        if self.filters is not None:
            self._report_reply(reply)
        if reply[:1] in ("4", "5"):
            if command == "" and reply in (smtp_proto.R_LINE_TOO_LONG, smtp_proto.R_COMMAND_TOO_LONG):
                log.info('%016x smtp bad-input result="%s"', self.session_id, reply)
            else:
                log.info('%016x smtp failed-command command="%s" result="%s"',
                         self.session_id, vis_command(command), reply)


def _tx_result(reply: str) -> str:
    return "ok" if reply[:1] == "2" else "permfail" if reply[:1] == "5" else "tempfail"


def vis_command(command: str) -> str:
    """A command line in a log line, as OpenSMTPD's failed-command line shows it:
    strnvis(VIS_SAFE|VIS_CSTYLE) (common.vis.COMMAND: CR as \\r, ESC as \\^[)."""
    return vis(command, COMMAND)


def log_authentication(session_id: int, user: str, result: str) -> None:
    """OpenSMTPD's AUTH outcome line (``result`` ok, permfail or tempfail), which ban
    tools key on."""
    log.info("%016x smtp authentication user=%s result=%s", session_id, vis(user), result)


def _text_addr(ip: str) -> str:
    """An address as OpenSMTPD's ss_to_text writes it in filter lines: IPv6 in brackets."""
    return f"[{ip}]" if ":" in ip else ip


def _sockaddr_text(ip: str) -> str:
    if ip == "local":
        return "local"
    return f"[{ip}]" if ":" in ip else ip
