"""Outbound SMTP sessions (OpenSMTPD's mta_session.c): connect, TLS, and pump
bytes through the sans-I/O dialogue of smtpd/smtp_client.py.

One session greets once, then runs one transaction per message (all its
recipients for that relay), several messages per connection as OpenSMTPD's MTA
does; QUIT when the session is no longer wanted.  Classification: 2xx ok, 5xx
permanent, anything else temporary.

Interface with smtpd/mta.py (which picks relays, hosts and routes; keep it stable):

- ``await session_options(pony, action)`` -> ``SessionOptions``: how to talk to
  the action's relay (TLS mode from the relay URL's scheme and the action's
  ``tls [no-verify]``, the client TLS context, the AUTH credentials looked up in
  lka).  Raises ``RelayRefused(status, text)`` when the action cannot relay
  (``tls`` with ``smtp+notls://``, a label without ``auth``, unknown credentials).
  Hashable: part of the key under which idle connections wait for reuse.
- ``Connection(address, port, helo=, session=, options=, server_name=, source_address=)``:
  the ``server_name`` (MX or smarthost name) is the one TLS verifies and sends as SNI;
  ``source_address`` (`relay src`) the local address bound, None: the system's choice.
  An ``address`` starting with "/" is a UNIX socket (``lmtp=True`` for an LMTP server).
  ``options.schema`` is the scheme of the ``mta connecting address=`` log line.
- ``await open_and_send(conn, sender, rcpts, message, size, dsn)`` ->
  ``TransactionResult``: greets if not yet, runs one transaction; ``connected``
  False when the host could not be used at all (no connection, TLS required and
  failed, AUTH impossible): the caller tries the next host.
- ``conn.usable``, ``conn.transactions``, ``conn.txn_replies``, ``conn.reader``,
  ``await conn.close(quit=True)``.

An opportunistic STARTTLS whose handshake fails is retried in plain text on a new
connection (mta_session.c MTA_DOWNGRADE_PLAIN); a refused STARTTLS goes on in plain
text on the same one.  Log lines as OpenSMTPD 6.8: ``mta tls ciphers=`` and
``mta cert-check result="valid"|"unverified" fingerprint=`` after each handshake.
"""
from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass, field

from common import stat
from common.ipc import PeerTimeout
from common.messages import MtaCredentialsReply, MtaLookupCredentials
from common.trace import FLAGS, trace
from smtpd import tls as tls_files
from smtpd.relay_url import RelayUrl, RelayUrlError, parse_relay_url
from smtpd.smtp_client import (
    NEED_DATA, QUITTING, ClientSettings, Closed, ProtocolError, RcptResult, Ready, Reply, SessionFailed,
    SmtpClient, StartTls, Transaction, TransactionDone,
)

log = logging.getLogger("smtpd")

READ_SIZE = 65536
MAX_EVENTS = 100000          # bound of one wait for an event (each step reads or writes)

# Open outbound connections, and the distinct remote hosts (and routes: from our
# one default source to a host) they go to: OpenSMTPD's mta.session, mta.host, mta.route.
_HOSTS = stat.Population("mta.host")
_ROUTES = stat.Population("mta.route")

_SCHEMES = {"opportunistic": "smtp://", "required": "smtp+tls://", "smtps": "smtps://",
            "no": "smtp+notls://"}


class RelayRefused(Exception):
    """The action cannot relay as configured (mta.c's checks before a relay is made)."""

    def __init__(self, status: str, text: str) -> None:
        super().__init__(text)
        self.status, self.text = status, text


@dataclass(frozen=True)
class SessionOptions:
    tls: str = "no"                          # smtp_client TLS_MODES
    verify: bool = False                     # the certificate was checked (log: valid/unverified)
    context: ssl.SSLContext | None = None    # None: no TLS possible
    credentials: tuple[str, str] | None = field(default=None, repr=False)
    lmtp: bool = False

    @property
    def schema(self) -> str:
        return "lmtp://" if self.lmtp else _SCHEMES[self.tls]


def tls_policy(action, url: RelayUrl | None) -> tuple[str, bool]:
    """(TLS mode, verify) for a relay action and its URL (None: MX delivery), as
    mta.c mta_handle_envelope and mta_session.c mta_tls_init decide: the scheme sets
    the mode (smtp:// opportunistic), ``tls`` makes STARTTLS mandatory and verified
    (``no-verify``: not verified), smtp+tls:// and smtps:// are verified unless the
    action says ``tls no-verify``; opportunistic TLS takes any certificate."""
    scheme = url.scheme if url is not None else "smtp"
    mode = {"smtp": "opportunistic", "smtp+tls": "required", "smtp+notls": "no",
            "smtps": "smtps", "lmtp": "no"}[scheme]
    if action.tls_required:
        if mode == "no":
            raise RelayRefused("tempfail", "TLS required for relaying")
        if mode == "opportunistic":
            mode = "required"
        return mode, action.tls_verify
    return mode, mode in ("required", "smtps")


async def lookup_credentials(pony, table: str, label: str) -> tuple[str, str]:
    """The one place AUTH credentials are asked for (lka's ``credentials`` lookup)."""
    try:
        reply = await pony.mesh.request(
            "lka", MtaLookupCredentials(reqid=pony.ctx.new_id(), table=table, label=label),
            (MtaCredentialsReply,), timeout=60)
    except PeerTimeout:
        raise RelayRefused("tempfail", "Failed to retrieve secret") from None
    if reply.status != "ok":
        # mta.c mta_on_secret: "Failed to retrieve secret", the envelopes stay queued
        raise RelayRefused("tempfail", "Failed to retrieve secret")
    return reply.user, reply.password


async def session_options(pony, action, url: RelayUrl | None = None) -> SessionOptions:
    if url is None and action.host:
        try:
            url = parse_relay_url(action.host)
        except RelayUrlError:
            # mta.c mta_handle_envelope: the envelope stays queued (the configuration may be fixed)
            raise RelayRefused("tempfail", "Cannot parse smarthost") from None
    mode, verify = tls_policy(action, url)
    if url is not None and url.label and not action.auth_table:
        raise RelayRefused("tempfail", "No auth table for relaying")
    credentials = None
    if url is not None and url.label:
        credentials = await lookup_credentials(pony, action.auth_table, url.label)
    context = pony.client_tls.get((action.name, verify))
    if context is None and mode != "no":
        if mode != "opportunistic":
            raise RelayRefused("tempfail", "No TLS context for relaying")
        mode = "no"
    return SessionOptions(mode, verify, context, credentials, lmtp=url is not None and url.scheme == "lmtp")


@dataclass
class TransactionResult:
    results: list[RcptResult]
    relay: str
    connected: bool = True
    dsn: bool = False        # the server offered DSN and was given our DSN parameters


@dataclass
class DsnRequest:
    """The DSN parameters (RFC 3461) of one message: what the sender asked of us is
    passed on to a server that offers DSN."""
    mail: str = ""                                      # "RET=... ENVID=..."
    rcpts: list[str] = field(default_factory=list)      # "NOTIFY=... ORCPT=..." per recipient


def _shown(chunk: bytes) -> list[str]:
    """What ``trace mta`` shows of bytes sent: commands, never credentials nor bodies."""
    if chunk == b".\r\n" or chunk.endswith(b"\r\n.\r\n"):
        return [f"[...{len(chunk)} bytes...]"]
    shown = []
    for line in chunk.decode("utf-8", "replace").split("\r\n")[:-1]:
        verb = line.split(" ", 1)[0].upper()
        if verb == "AUTH" and line.upper().startswith("AUTH PLAIN "):
            line = "AUTH PLAIN ********"
        elif verb not in ("EHLO", "HELO", "LHLO", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA",
                          "RSET", "QUIT"):
            line = "********"            # AUTH LOGIN's user and password
        shown.append(line)
    return shown


class Connection:
    """One SMTP (or LMTP) client connection, reusable while it stays in a sane state."""

    def __init__(self, host: str, port: int, *, helo: str, lmtp: bool = False,
                 timeout: float = 300, connect_timeout: float = 30, session: int = 0,
                 options: SessionOptions | None = None, server_name: str | None = None,
                 source_address: str | None = None) -> None:
        self.host, self.port, self.helo = host, port, helo
        self.source_address = source_address     # `relay src`: the local address to bind
        self.options = options or SessionOptions(lmtp=lmtp)
        self.lmtp = lmtp or self.options.lmtp
        self.server_name = server_name or host
        self.session = session       # the id in log and trace lines
        self.counted = False         # open, and counted in mta.session
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self.relay = f"{host}:{port}"
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.client: SmtpClient | None = None
        self.extensions: dict[str, str] = {}
        self.usable = False          # greeted, and the last transaction ended cleanly
        self.failed = False          # a transaction broke on a network or protocol error
        self.transactions = 0
        self.txn_replies = 0         # reads with data in the current transaction (0: no reply)
        self.tls_text = ""           # VERSION:CIPHER:BITS once TLS is on

    # -- pumping ---------------------------------------------------------------------------

    def _write(self) -> bool:
        """Write what the dialogue has to send; True when the kernel did not take it
        all (a slow peer): the caller then waits, bounded, for room."""
        out = self.client.data_to_send()
        if not out:
            return False
        if FLAGS.mta:
            for line in _shown(out):
                trace("mta: %016x: >>> %s", self.session, line)
        if FLAGS.io:
            trace("mta: %016x: IO_DATAOUT %d bytes", self.session, len(out))
        self.writer.write(out)
        return self.writer.transport.get_write_buffer_size() > 0

    async def _next(self):
        """The dialogue's next event, reading and writing as it needs."""
        for _ in range(MAX_EVENTS):
            event = self.client.next_event()
            if self._write():
                await asyncio.wait_for(self.writer.drain(), self.timeout)
            if event is not NEED_DATA:
                return event
            data = await asyncio.wait_for(self.reader.read(READ_SIZE), self.timeout)
            if data:
                self.txn_replies += 1    # an end of file is not a reply (mta.py retries then)
            if FLAGS.io:
                trace("mta: %016x: IO_DATAIN %d bytes", self.session, len(data))
            if FLAGS.mta:
                if not data:
                    trace("mta: %016x: end-of-file", self.session)
                for line in data.decode("utf-8", "backslashreplace").splitlines()[:50]:
                    trace("mta: %016x: <<< %s", self.session, line[:1000])
            self.client.receive_data(data)
        raise ProtocolError("Remote host sent too much data")

    # -- the session -------------------------------------------------------------------------

    async def _connect(self, mode: str) -> str | None:
        """A connection (TLS from the start for smtps); an error text if none."""
        smtps = mode == "smtps"
        try:
            if self.host.startswith("/"):        # an LMTP server's UNIX socket
                connecting = asyncio.open_unix_connection(self.host)
            else:
                connecting = asyncio.open_connection(
                    self.host, self.port, ssl=self.options.context if smtps else None,
                    server_hostname=self.server_name if smtps else None,
                    local_addr=(self.source_address, 0) if self.source_address else None)
            self.reader, self.writer = await asyncio.wait_for(connecting, self.connect_timeout)
        except (OSError, TimeoutError) as exc:
            if FLAGS.mta:
                trace("mta: %016x: connection to %s failed: %s", self.session, self.relay, exc)
            if isinstance(exc, ssl.SSLError):
                return tls_error_text(exc)
            return "Connection timeout" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        if not self.counted:
            self.counted = True
            stat.increment("mta.session")
            _HOSTS.add(self.host)
            _ROUTES.add(("", self.host))
        if FLAGS.mta:
            trace("mta: %016x: connected to %s", self.session, self.relay)
        self.client = SmtpClient(ClientSettings(
            helo=self.helo, lmtp=self.lmtp, tls=mode, credentials=self.options.credentials))
        if smtps:
            self._tls_started()
        return None

    def _tls_started(self) -> None:
        """mta_session.c IO_TLSREADY and mta_tls_started: what the log shows of TLS."""
        ssl_object = self.writer.get_extra_info("ssl_object")
        self.tls_text = tls_files.tls_log_text(ssl_object)
        log.info("%016x mta tls ciphers=%s", self.session, self.tls_text)
        fingerprint = tls_files.peer_certificate_text(ssl_object)
        if fingerprint:
            log.info('%016x mta cert-check result="%s" fingerprint="%s"', self.session,
                     "valid" if self.options.verify else "unverified", fingerprint)
        else:
            log.info('%016x smtp cert-check result="no certificate presented"', self.session)

    async def _start_tls(self) -> str | None:
        try:
            await asyncio.wait_for(self.writer.start_tls(
                self.options.context, server_hostname=self.server_name), self.timeout)
        except (OSError, TimeoutError, ConnectionError) as exc:
            return tls_error_text(exc)
        self._tls_started()
        self.client.tls_started()
        return None

    async def open(self) -> Reply | str | None:
        """Connect and greet (STARTTLS and AUTH as the options say).  None when ready;
        a Reply when the server refused us (banner or EHLO/HELO); a string when this
        host could not be used (no connection, TLS or AUTH failed)."""
        mode = self.options.tls
        for attempt in range(2):
            error = await self._connect(mode)
            if error is not None:
                return error
            try:
                outcome = await self._greet()
            except (TimeoutError, ProtocolError, OSError, ConnectionError) as exc:
                return failure_text(exc)       # never greeted: the caller tries another host
            if outcome == "downgrade" and attempt == 0:
                log.info("smtp-out: Error on session %016x: opportunistic TLS failed, "
                         "downgrading to plain", self.session)
                await self.close(quit=False, uncount=False)
                mode = "no"
                log.info("%016x mta connecting address=%s%s:%d host=%s", self.session,
                         _SCHEMES["no"], self.host, self.port, self.server_name)
                continue
            return outcome if outcome != "downgrade" else "opportunistic TLS failed"
        return "opportunistic TLS failed"

    async def _greet(self) -> Reply | str | None:
        for _ in range(4):           # at most: TLS, then greeted again
            event = await self._next()
            if isinstance(event, StartTls):
                error = await self._start_tls()
                if error is None:
                    continue
                if self.client.settings.tls == "opportunistic":
                    return "downgrade"
                return error
            if isinstance(event, Ready):
                self.extensions = event.extensions
                self.usable = True
                return None
            if isinstance(event, SessionFailed):
                if self.client.state == QUITTING:
                    await self._drain_quit()
                if event.reply is not None and event.text == event.reply.text:
                    return event.reply            # banner or greeting refused
                return event.text
            raise ProtocolError(f"unexpected {type(event).__name__} while greeting")
        raise ProtocolError("greeting did not end")

    async def _drain_quit(self) -> None:
        try:
            await asyncio.wait_for(self._next(), 5)
        except (TimeoutError, ProtocolError, OSError, ConnectionError):
            pass

    async def transaction(self, mail_from: str, rcpts: list[str], message: bytes,
                          size_hint: int | None = None,
                          dsn: DsnRequest | None = None) -> TransactionResult:
        """MAIL, RCPT for each recipient, DATA.  Network errors propagate (the caller
        decides whether the message was sent at all); replies are per recipient."""
        self.usable = False
        self.transactions += 1
        self.txn_replies = 0
        self.client.send_mail(Transaction(
            mail_from, tuple(rcpts), message, mail_params=dsn.mail if dsn else "",
            rcpt_params=tuple(dsn.rcpts) if dsn else (), size=size_hint, dsn=dsn is not None))
        event = await self._next()
        if not isinstance(event, TransactionDone):
            raise ProtocolError(f"unexpected {type(event).__name__} in a transaction")
        self.usable = event.reusable
        return TransactionResult(list(event.results), self.relay, dsn=event.dsn)

    async def close(self, quit: bool = True, *, uncount: bool = True) -> None:
        if self.writer is None:
            return
        if quit and self.usable and self.client is not None:
            try:
                self.client.quit()
                for _ in range(3):
                    if isinstance(await asyncio.wait_for(self._next(), self.timeout), Closed):
                        break
            except (OSError, TimeoutError, ProtocolError, ConnectionError):
                pass
        self.usable = False
        self.writer.close()
        if uncount:
            self._uncount()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 5)
        except (OSError, TimeoutError, ConnectionError, ssl.SSLError):
            pass
        self.writer = None

    def _uncount(self) -> None:
        if self.counted:
            self.counted = False
            stat.decrement("mta.session")
            _HOSTS.discard(self.host)
            _ROUTES.discard(("", self.host))
            if FLAGS.mta:
                trace("mta: %016x: closed", self.session)


def tls_error_text(exc: BaseException) -> str:
    """Why a TLS handshake failed, for the delivery line (mta_session.c "IO Error: ...")."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"IO Error: certificate verify failed: {exc.verify_message}"
    if isinstance(exc, TimeoutError):
        return "IO Error: TLS handshake timeout"
    reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
    return f"IO Error: {reason or type(exc).__name__}"


def failure_text(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "Timeout"
    if isinstance(exc, ProtocolError):
        return str(exc)
    return getattr(exc, "strerror", None) or str(exc) or "Connection error"


async def send_message(host: str, port: int, *, helo: str, mail_from: str, rcpts: list[str],
                       message: bytes, timeout: float = 300, connect_timeout: float = 30,
                       size_hint: int | None = None, lmtp: bool = False) -> TransactionResult:
    """A whole session for one message: connect, greet, one transaction, QUIT."""
    conn = Connection(host, port, helo=helo, lmtp=lmtp, timeout=timeout, connect_timeout=connect_timeout)
    try:
        return await open_and_send(conn, mail_from, rcpts, message, size_hint)
    finally:
        await conn.close()


async def open_and_send(conn: Connection, mail_from: str, rcpts: list[str], message: bytes,
                        size_hint: int | None = None,
                        dsn: DsnRequest | None = None) -> TransactionResult:
    """Greet (if not yet) and run one transaction; every failure becomes per-recipient
    results, with ``connected`` False when the host could not be used at all."""
    try:
        if conn.writer is None:
            refused = await conn.open()
            if refused is not None:
                await conn.close(quit=False)
            if isinstance(refused, str):
                return TransactionResult([RcptResult(r, "tempfail", refused) for r in rcpts],
                                         conn.relay, False)
            if refused is not None:
                return TransactionResult([RcptResult(r, refused.status, refused.text) for r in rcpts],
                                         conn.relay)
        return await conn.transaction(mail_from, rcpts, message, size_hint, dsn)
    except (TimeoutError, ProtocolError, OSError, ConnectionError) as exc:
        conn.usable = False
        text = failure_text(exc)
        return TransactionResult([RcptResult(r, "tempfail", text) for r in rcpts], conn.relay)
