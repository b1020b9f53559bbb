"""The outbound SMTP and LMTP client dialogue, sans-I/O (OpenSMTPD's mta_session.c
states and replies, without its sockets, TLS library or clock).

h11's pattern: the caller feeds the bytes it read with ``receive_data`` (``b""`` at
end of file), takes events from ``next_event`` until it returns ``NEED_DATA``,
and writes what ``data_to_send`` returns after each call.  Nothing here reads a
socket, starts TLS or looks at a clock: the driver (smtpd/mta_session.py for
relaying, the LMTP delivery method for ``lmtp``) does, and keeps the timeouts.

API (stable; other modules build on it)::

    client = SmtpClient(ClientSettings(helo="mx.example.org", tls="opportunistic",
                                       credentials=("user", "secret")))
    client.receive_data(data)          # b"" = the peer closed the connection
    event = client.next_event()        # an Event, or NEED_DATA
    out = client.data_to_send()        # bytes to write (may be b"")
    client.tls_started()               # after StartTls: the driver wrapped the transport
    client.send_mail(Transaction(...)) # when the session is ready (after Ready/TransactionDone)
    client.quit()

Events, in the order a session sees them:

- ``StartTls``: the server answered 220 to STARTTLS; wrap the connection in TLS
  now, then call ``tls_started()`` (EHLO is sent again, as RFC 3207 asks).
- ``Ready``: greeted (EHLO/HELO or LHLO), TLS and AUTH done as configured: a
  transaction may start.  ``extensions`` holds what the last EHLO offered.
- ``SessionFailed``: the session cannot be used (banner or greeting refused,
  TLS required but not offered or refused, AUTH refused or impossible); its
  ``status`` is "tempfail" or "permfail" for the messages that were to be sent,
  ``text`` says why (OpenSMTPD's wording).  QUIT is queued when the peer is
  still talking to us.
- ``TransactionDone``: one result per recipient, in the order given (LMTP: the
  reply to the end of data for that recipient); the session is ready again (the
  core sent RSET itself after a refused MAIL or when no recipient was taken) or,
  if ``reusable`` is False, should be quit.
- ``Closed``: the reply to QUIT came, or the peer closed after QUIT.

Errors: ``RemoteProtocolError`` (the peer broke the protocol: a malformed or
over-long reply, data after STARTTLS's reply, end of file in the middle of the
dialogue) from ``next_event``; ``LocalProtocolError`` when the caller asks for
something the state does not allow.  After either the connection is unusable.

What goes out (``encode_body``): the queued message's lines, however they end
(CRLF, a bare LF or a bare CR), are sent CRLF-terminated and dot-stuffed, so no
byte sequence in a body can end DATA early at the next hop; a line longer than
998 octets is folded (docs/mta.md says why).

PIPELINING (RFC 2920): when an SMTP server offers it, MAIL, every RCPT and DATA go
in one write (as Postfix does); the message itself only after the 354, and only when
a recipient was taken: a server that answers 354 although it took none (or after a
refused MAIL) gets an empty message (the lone ``.``) and RSET (RFC 2920 3.1).  Each
recipient's result is its RCPT reply, or the reply to the end of data.  LMTP sends
DATA once the RCPT replies are read.
"""
from __future__ import annotations

import base64
from collections import deque
from dataclasses import dataclass

MAX_REPLY_LINE = 4096       # a longer reply line ends the session (OpenSMTPD: LINE_MAX)
MAX_REPLY_LINES = 1000
MAX_TEXT_LINE = 998         # RFC 5321 4.5.3.1.6: octets of a text line, without CRLF

TLS_MODES = ("no", "opportunistic", "required", "smtps")


class ProtocolError(Exception):
    """Base of the client core's errors; the connection is unusable after one."""


class LocalProtocolError(ProtocolError):
    """The caller asked for something the session's state does not allow."""


class RemoteProtocolError(ProtocolError):
    """The server broke the protocol."""


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


@dataclass(frozen=True)
class Reply:
    code: int
    lines: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        return f"{self.code} " + " ".join(self.lines)

    @property
    def status(self) -> str:
        """2xx ok, 5xx permanent, anything else temporary (as mta_session.c)."""
        return "ok" if 200 <= self.code < 300 else "permfail" if 500 <= self.code < 600 else "tempfail"


# --- events -----------------------------------------------------------------------------------

class Event:
    __slots__ = ()


@dataclass(frozen=True)
class StartTls(Event):
    pass


@dataclass(frozen=True)
class Ready(Event):
    extensions: dict[str, str]


@dataclass(frozen=True)
class SessionFailed(Event):
    status: str                  # "tempfail" | "permfail"
    text: str
    reply: Reply | None = None


@dataclass(frozen=True)
class RcptResult:
    rcpt: str
    status: str                  # "ok" | "tempfail" | "permfail"
    reply: str


@dataclass(frozen=True)
class TransactionDone(Event):
    results: tuple[RcptResult, ...]
    reusable: bool = True
    dsn: bool = False            # the server offered DSN and was given the DSN parameters


@dataclass(frozen=True)
class Closed(Event):
    pass


# --- what the caller gives ---------------------------------------------------------------------

@dataclass(frozen=True)
class ClientSettings:
    helo: str
    lmtp: bool = False
    # "no" (smtp+notls, lmtp), "opportunistic" (smtp: STARTTLS when offered),
    # "required" (smtp+tls, ``tls``), "smtps" (TLS from the first byte: the driver wraps first)
    tls: str = "opportunistic"
    credentials: tuple[str, str] | None = None     # (user, password) for AUTH PLAIN / LOGIN

    def __post_init__(self) -> None:
        if self.tls not in TLS_MODES:
            raise ValueError(f"tls must be one of {TLS_MODES}")


@dataclass(frozen=True)
class Transaction:
    mail_from: str                                   # without brackets
    rcpts: tuple[str, ...]
    body: bytes                                      # the message as queued
    mail_params: str = ""                            # e.g. "RET=HDRS ENVID=x" (DSN)
    rcpt_params: tuple[str, ...] = ()                # per recipient, e.g. "NOTIFY=NEVER"
    size: int | None = None                          # SIZE= when the server offers SIZE
    dsn: bool = False                                # send the DSN parameters if DSN is offered


# --- the body --------------------------------------------------------------------------------

def _split_lines(body: bytes) -> list[bytes]:
    """The lines of ``body``, each line ending at CRLF, LF or a bare CR."""
    lines = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return lines


def _fold(line: bytes, header: bool) -> list[bytes]:
    """``line`` in pieces of at most MAX_TEXT_LINE octets, cut before a UTF-8
    continuation byte where possible; a header's pieces after the first start with
    a space so they stay one folded header (RFC 5322 2.2.3)."""
    pieces = []
    prefix = b""
    while len(prefix) + len(line) > MAX_TEXT_LINE:
        cut = MAX_TEXT_LINE - len(prefix)
        for back in range(4):
            if not 0x80 <= line[cut - back] <= 0xBF:
                cut -= back
                break
        pieces.append(prefix + line[:cut])
        line = line[cut:]
        prefix = b" " if header else b""
    pieces.append(prefix + line)
    return pieces


def encode_body(body: bytes) -> bytes:
    """The DATA payload of a queued message: CRLF line ends whatever the stored ones
    (a bare CR is a line end too), lines over 998 octets folded, dot-stuffing, and
    the final ``.CRLF``."""
    if b"\r" not in body and max(map(len, body.split(b"\n"))) <= MAX_TEXT_LINE:
        # The queue's own form (LF line ends, smtp_proto), no line to fold: the same
        # bytes as line by line (tests/unit/test_smtp_client.py checks), at C speed.
        out = body.replace(b"\n", b"\r\n")
        if b"\n." in body:
            out = out.replace(b"\r\n.", b"\r\n..")
        if body[:1] == b".":
            out = b"." + out
        if body and body[-1:] != b"\n":
            out += b"\r\n"
        return out + b".\r\n"
    return _encode_lines(body)


def _encode_lines(body: bytes) -> bytes:
    """encode_body, line by line: any line end, folding."""
    out: list[bytes] = []
    in_header = True
    for line in _split_lines(body):
        if in_header and line == b"":
            in_header = False
        pieces = _fold(line, in_header) if len(line) > MAX_TEXT_LINE else [line]
        out.extend(b"." + p if p.startswith(b".") else p for p in pieces)
    return b"".join(p + b"\r\n" for p in out) + b".\r\n"


# --- the state machine --------------------------------------------------------------------------

# What a reply answers: the command it follows, in the order they were sent.
_BANNER, _EHLO, _HELO, _STARTTLS, _AUTH_PLAIN, _AUTH_LOGIN, _AUTH_USER, _AUTH_PASS = (
    "banner", "ehlo", "helo", "starttls", "auth-plain", "auth-login", "auth-user", "auth-pass")
_MAIL, _RCPT, _DATA, _BODY, _RSET, _QUIT = "mail", "rcpt", "data", "body", "rset", "quit"
_NO_BODY = "no-body"        # the reply to the lone "." sent after an unwanted 354

# States: the session's phase; replies are routed by what they answer, not by state.
GREETING, TLS_HANDSHAKE, READY, TRANSACTION, QUITTING, CLOSED, FAILED = (
    "greeting", "tls-handshake", "ready", "transaction", "quitting", "closed", "failed")


class SmtpClient:
    """One client session.  ``state`` is one of GREETING, TLS_HANDSHAKE, READY,
    TRANSACTION, QUITTING, CLOSED, FAILED."""

    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings
        self.state = GREETING
        self.tls_active = settings.tls == "smtps"
        self.extensions: dict[str, str] = {}
        self.authenticated_as: str | None = None
        self._inbuf = bytearray()
        self._eof = False
        self._out = bytearray()
        self._events: deque[Event] = deque()
        self._expect: deque[str] = deque([_BANNER])
        self._reply_lines: list[str] = []
        self._tried_helo = False
        # the current transaction
        self._txn: Transaction | None = None
        self._mail_reply: Reply | None = None
        self._rcpt_replies: list[Reply] = []
        self._accepted: list[int] = []
        self._results: dict[int, RcptResult] = {}
        self._with_dsn = False
        self._data_sent = False     # DATA went with MAIL and RCPT (PIPELINING)

    # -- I/O boundary ------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes read from the peer; ``b""`` when it closed the connection."""
        if not data:
            self._eof = True
        else:
            self._inbuf += data

    def data_to_send(self) -> bytes:
        if not self._out:
            return b""
        out, self._out = bytes(self._out), bytearray()
        return out

    def next_event(self) -> Event | _NeedData:
        while not self._events:
            if self.state in (CLOSED, FAILED) and not self._expect:
                return NEED_DATA
            reply = self._next_reply()
            if reply is None:
                if self._eof:
                    return self._end_of_file()
                return NEED_DATA
            if not self._expect:
                self._fail_protocol("Unexpected reply from remote host")
            self._dispatch(self._expect.popleft(), reply)
        return self._events.popleft()

    # -- commands the caller gives -------------------------------------------------------------

    def tls_started(self) -> None:
        """The transport is now TLS: greet again (RFC 3207 4.2: forget what was offered)."""
        if self.state != TLS_HANDSHAKE:
            raise LocalProtocolError(f"tls_started in state {self.state}")
        self.tls_active = True
        self.extensions = {}
        self.state = GREETING
        self._hello()

    def send_mail(self, txn: Transaction) -> None:
        """Start a transaction (state READY); its TransactionDone comes later."""
        if self.state != READY:
            raise LocalProtocolError(f"send_mail in state {self.state}")
        if not txn.rcpts:
            raise LocalProtocolError("a transaction needs recipients")
        self.state = TRANSACTION
        self._txn = txn
        self._mail_reply, self._rcpt_replies, self._accepted, self._results = None, [], [], {}
        self._with_dsn = txn.dsn and "DSN" in self.extensions
        limit = self.extensions.get("SIZE", "")
        if txn.size and limit.isdigit() and int(limit) and txn.size > int(limit):
            self._finish(tuple(RcptResult(r, "permfail", "message too large for peer") for r in txn.rcpts))
            return
        mail = f"MAIL FROM:<{txn.mail_from}>"
        if txn.size and "SIZE" in self.extensions:
            mail += f" SIZE={txn.size}"
        if self._with_dsn and txn.mail_params:
            mail += f" {txn.mail_params}"
        self._command(mail, _MAIL)
        self._data_sent = False
        if "PIPELINING" in self.extensions:
            for i in range(len(txn.rcpts)):
                self._send_rcpt(i)
            if not self.settings.lmtp:
                self._data_sent = True
                self._command("DATA", _DATA)

    def quit(self) -> None:
        if self.state in (CLOSED, QUITTING):
            return
        if self.state == TRANSACTION or self._expect:
            # a reply is still due: the session cannot be quit cleanly, just dropped
            self.state = CLOSED
            self._expect.clear()
            self._events.append(Closed())
            return
        self.state = QUITTING
        self._command("QUIT", _QUIT)

    # -- inside ------------------------------------------------------------------------------

    def _command(self, line: str, expect: str) -> None:
        self._out += line.encode("utf-8", "surrogateescape") + b"\r\n"
        self._expect.append(expect)

    def _next_reply(self) -> Reply | None:
        """One whole (possibly multi-line) reply from the buffer, or None."""
        while True:
            end = self._inbuf.find(b"\n")
            if end < 0:
                if len(self._inbuf) > MAX_REPLY_LINE:
                    self._fail_protocol("Remote host sent too much data")
                return None
            if end > MAX_REPLY_LINE:
                self._fail_protocol("Remote host sent too much data")
            raw = bytes(self._inbuf[:end + 1])
            del self._inbuf[:end + 1]
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if len(line) < 3 or not line[:3].isdigit() or (len(line) > 3 and line[3] not in " -"):
                self._fail_protocol("Bad response")
            if self._reply_lines and line[:3] != self._reply_lines[0][:3]:
                self._fail_protocol("Bad response")
            self._reply_lines.append(line)
            if len(self._reply_lines) > MAX_REPLY_LINES:
                self._fail_protocol("Remote host sent too much data")
            if len(line) == 3 or line[3] == " ":
                lines, self._reply_lines = self._reply_lines, []
                return Reply(int(line[:3]), tuple(l[4:] for l in lines))

    def _fail_protocol(self, text: str):
        self.state = FAILED
        self._expect.clear()
        raise RemoteProtocolError(text)

    def _end_of_file(self) -> Event | _NeedData:
        if self.state == QUITTING:
            self.state = CLOSED
            self._expect.clear()
            return Closed()
        if self.state in (CLOSED, FAILED):
            return NEED_DATA
        self._fail_protocol("Connection closed by remote host")

    def _failed(self, status: str, text: str, reply: Reply | None = None, quit: bool = True) -> None:
        self._events.append(SessionFailed(status, text, reply))
        if quit and not self._expect:
            self.state = QUITTING
            self._command("QUIT", _QUIT)
        else:
            self.state = FAILED
            self._expect.clear()

    def _hello(self) -> None:
        verb = "LHLO" if self.settings.lmtp else "EHLO"
        self._command(f"{verb} {self.settings.helo}", _EHLO)

    def _dispatch(self, what: str, reply: Reply) -> None:
        handler = getattr(self, "_on_" + what.replace("-", "_"))
        handler(reply)

    def _on_banner(self, reply: Reply) -> None:
        if reply.status != "ok":
            self._failed(reply.status, reply.text, reply)
            return
        self._hello()

    def _on_ehlo(self, reply: Reply) -> None:
        if reply.status == "permfail" and not self.settings.lmtp and not self._tried_helo:
            self._tried_helo = True
            self._command(f"HELO {self.settings.helo}", _HELO)
            return
        if reply.status != "ok":
            self._failed(reply.status, reply.text, reply)
            return
        self.extensions = {}
        for line in reply.lines[1:]:
            key, _, value = line.partition(" ")
            self.extensions[key.upper()] = value
        self._after_hello()

    def _on_helo(self, reply: Reply) -> None:
        if reply.status != "ok":
            self._failed(reply.status, reply.text, reply)
            return
        self.extensions = {}
        self._after_hello()

    def _after_hello(self) -> None:
        """mta_session.c MTA_STARTTLS then MTA_AUTH then MTA_READY."""
        mode = self.settings.tls
        if not self.tls_active and mode in ("opportunistic", "required"):
            if "STARTTLS" in self.extensions:
                self._command("STARTTLS", _STARTTLS)
                return
            if mode == "required":
                self._failed("tempfail", "TLS required but not supported by remote host")
                return
        self._authenticate()

    def _on_starttls(self, reply: Reply) -> None:
        if reply.code != 220:
            if self.settings.tls == "required":
                self._failed("tempfail", f"STARTTLS rejected: {reply.text}", reply)
            else:
                self._authenticate()        # opportunistic: go on in plain text
            return
        if self._inbuf or self._reply_lines:
            # bytes sent before the TLS handshake would be read as if they came through
            # it (the STARTTLS injection of CVE-2011-0411, seen from the client side)
            self._fail_protocol("Unexpected data after STARTTLS reply")
        self.state = TLS_HANDSHAKE
        self._events.append(StartTls())

    def _authenticate(self) -> None:
        creds = self.settings.credentials
        if creds is None:
            self._ready()
            return
        if not self.tls_active:
            self._failed("tempfail", "Refuse to AUTH over insecure channel")
            return
        if "AUTH" not in self.extensions:
            self._failed("tempfail", "AUTH not advertised")
            return
        mechanisms = self.extensions["AUTH"].upper().split()
        user, password = creds
        if "PLAIN" in mechanisms:
            token = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode()).decode()
            self._out += f"AUTH PLAIN {token}\r\n".encode()
            self._expect.append(_AUTH_PLAIN)
        elif "LOGIN" in mechanisms:
            self._command("AUTH LOGIN", _AUTH_LOGIN)
        else:
            self._failed("tempfail", "no supported AUTH method")

    def _auth_step(self, reply: Reply, want: int, then: str | None, secret: str | None) -> None:
        if reply.code != want:
            self._failed("tempfail", f"AUTH rejected: {reply.text}", reply)
            return
        if then is None:
            self.authenticated_as = self.settings.credentials[0]
            self._ready()
            return
        self._out += base64.b64encode(secret.encode()) + b"\r\n"
        self._expect.append(then)

    def _on_auth_plain(self, reply: Reply) -> None:
        self._auth_step(reply, 235, None, None)

    def _on_auth_login(self, reply: Reply) -> None:
        self._auth_step(reply, 334, _AUTH_USER, self.settings.credentials[0])

    def _on_auth_user(self, reply: Reply) -> None:
        self._auth_step(reply, 334, _AUTH_PASS, self.settings.credentials[1])

    def _on_auth_pass(self, reply: Reply) -> None:
        self._auth_step(reply, 235, None, None)

    def _ready(self) -> None:
        self.state = READY
        self._events.append(Ready(dict(self.extensions)))

    # -- the transaction ----------------------------------------------------------------------

    def _send_rcpt(self, i: int) -> None:
        txn = self._txn
        params = txn.rcpt_params[i] if self._with_dsn and i < len(txn.rcpt_params) else ""
        self._command(f"RCPT TO:<{txn.rcpts[i]}>" + (f" {params}" if params else ""), _RCPT)

    def _on_mail(self, reply: Reply) -> None:
        self._mail_reply = reply
        if reply.status != "ok":
            for i, r in enumerate(self._txn.rcpts):
                self._results[i] = RcptResult(r, reply.status, reply.text)
            if "PIPELINING" not in self.extensions:
                self._command("RSET", _RSET)
            return                      # pipelined: RSET once the RCPT replies are read
        if "PIPELINING" not in self.extensions:
            self._send_rcpt(0)

    def _on_rcpt(self, reply: Reply) -> None:
        txn = self._txn
        i = len(self._rcpt_replies)
        self._rcpt_replies.append(reply)
        if self._mail_reply.status == "ok":
            if reply.status == "ok":
                self._accepted.append(i)
            else:
                self._results[i] = RcptResult(txn.rcpts[i], reply.status, reply.text)
        if len(self._rcpt_replies) < len(txn.rcpts):
            if "PIPELINING" not in self.extensions:
                self._send_rcpt(i + 1)
            return
        if self._data_sent:
            return                      # DATA's reply comes next
        if self._mail_reply.status != "ok" or not self._accepted:
            self._command("RSET", _RSET)
            return
        self._command("DATA", _DATA)

    def _on_data(self, reply: Reply) -> None:
        txn = self._txn
        if self._mail_reply.status != "ok" or not self._accepted:
            # pipelined DATA, and nobody to send the message to: the results are
            # MAIL's or RCPT's replies; a 354 is answered by an empty message
            if reply.code == 354:
                self._out += b".\r\n"
                self._expect.append(_NO_BODY)
            else:
                self._command("RSET", _RSET)
            return
        if reply.code != 354:
            status = reply.status if reply.status != "ok" else "tempfail"
            for i in self._accepted:
                self._results[i] = RcptResult(txn.rcpts[i], status, reply.text)
            self._command("RSET", _RSET)
            return
        self._out += encode_body(txn.body)
        # SMTP: one reply for the message; LMTP: one per accepted recipient (RFC 2033 4.2)
        for _ in (self._accepted if self.settings.lmtp else self._accepted[:1]):
            self._expect.append(_BODY)

    def _on_body(self, reply: Reply) -> None:
        txn = self._txn
        pending = [i for i in self._accepted if i not in self._results]
        targets = pending[:1] if self.settings.lmtp else pending
        for i in targets:
            self._results[i] = RcptResult(txn.rcpts[i], reply.status, reply.text)
        if len(self._results) == len(txn.rcpts):
            self._finish(tuple(self._results[i] for i in range(len(txn.rcpts))), dsn=self._with_dsn)

    def _on_no_body(self, reply: Reply) -> None:
        self._command("RSET", _RSET)

    def _on_rset(self, reply: Reply) -> None:
        results = tuple(self._results[i] for i in range(len(self._txn.rcpts)))
        self._finish(results, reusable=reply.status == "ok")

    def _finish(self, results: tuple[RcptResult, ...], *, reusable: bool = True, dsn: bool = False) -> None:
        self._txn = None
        self.state = READY if reusable else FAILED
        self._events.append(TransactionDone(results, reusable, dsn))

    def _on_quit(self, reply: Reply) -> None:
        self.state = CLOSED
        self._events.append(Closed())
