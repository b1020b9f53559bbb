"""The SMTP server protocol, sans I/O (the state machine of OpenSMTPD's smtp_session.c).

Rule 1: every state transition of an inbound session lives in this file, in
``_TRANSITIONS`` and the few methods that apply it.  Rule 2: nothing here does I/O,
reads a clock or talks to another process: the driver (smtpd/smtp_session.py) feeds
bytes in, takes bytes out, and answers the events that need the rest of the daemon.

Theory of operation (the shape of h11's ``Connection``)::

    conn = ServerConnection(settings, on_reply=...)
    conn.receive_data(bytes)        # b"" = the client closed its side
    event = conn.next_event()       # an Event, NEED_DATA, or PAUSED
    conn.accept(...) / conn.refuse(reply)   # the driver's answer to a wait point
    conn.data_to_send() -> bytes    # replies to write, in order

Commands are read one line at a time; each goes through the command table
(``COMMANDS``: verb, filter phase, check, proceed, as smtp_session.c's
``commands[]``).  The *check* refuses what the state or the syntax forbids, with
OpenSMTPD's reply, and never leaves the core.  A command that passes its check
becomes an event and the core **pauses** (``PAUSED``) until the driver answers it:

* ``Helo``, ``Ehlo``, ``Noop``, ``Rset``, ``Quit``, ``Help``, ``Wiz``: nothing to
  fetch; the driver answers ``accept()`` at once and the core writes the reply;
* ``MailFrom``: the driver asks lka (``senders``) and the queue (a new message);
* ``RcptTo``: lka matches the rules and expands (it submits envelopes to the queue);
* ``DataStart``: the driver gets the queue ready and writes the Received line;
* ``DataChunk`` (no answer) ... ``DataEnd``: the queue commits the message;
* ``AuthCredentials``: lka checks the credentials (``smtp authentication`` line);
* ``StartTls``: after ``accept()`` the core writes ``220`` and the driver upgrades
  the transport, then calls ``tls_established()``;
* ``ProxyReceived``: a PROXY v2 header was read (the real client address).

**Where filters plug in** (the next issue): every command event carries its
``phase`` (``Phase``, OpenSMTPD's FILTER_* names).  Between ``next_event()`` and
the driver's own work, a filter chain may be consulted for that phase; a filter
that rejects answers ``refuse(its reply)`` (or ``refuse("421 ...")`` to disconnect),
one that proceeds lets the driver go on exactly as without filters.  ``DataChunk``
events are where a data filter gets the message lines, and ``Phase.COMMIT`` (the
``DataEnd`` event) where it has the last word before the queue commits.  Nothing in
this module needs to change for that.

Pipelining: the client may send many commands at once; they are answered one by
one, in order, each after its wait point.  After STARTTLS anything already received
in clear text is discarded (CVE-2011-0411), and after AUTH's ``334`` the next line
is the client's response, not a command.

The message body: after ``354`` the bytes stream out as ``DataChunk`` events (line
endings as LF, dot-stuffing undone), the size limit counted as they pass; the body
ends only at ``<CRLF>.<CRLF>`` (a bare LF or CR never ends it: no SMTP smuggling).
A body over the limit, or one carrying too many ``Received:`` fields (a loop), is
read to its end and discarded, then ``DataEnd`` carries the error.
"""
from __future__ import annotations

import base64
import binascii
import enum
import re
from dataclasses import dataclass, field
from typing import Callable

from smtpd import dsn_params
from smtpd.mailbox import valid_mailbox

LINE_MAX = 65535                  # SMTP_LINE_MAX: a longer line ends the session
COMMAND_MAX = 2048                # smtp_session.c's cmd[LINE_MAX]: so does a longer command
PROXY_HEADER_MAX = 16 + 65535     # a PROXY v2 header cannot be longer
MAX_HOPS_COUNT = 100              # Received: fields in a message: more is a loop
CHUNK_MAX = 256 * 1024            # largest DataChunk the core hands out


class State(enum.Enum):
    """OpenSMTPD's STATE_* of a session (plus PROXY, before its header)."""
    PROXY = "proxy"               # waiting for the PROXY v2 header
    CONNECTED = "connected"       # waiting for the driver to greet (rDNS, limits)
    INIT = "init"                 # banner sent, no HELO/EHLO yet
    HELO = "helo"                 # identified; a transaction may open
    TLS = "tls"                   # 220 sent for STARTTLS, the handshake is the driver's
    AUTH_INIT = "auth_init"       # AUTH PLAIN: waiting for the client's response
    AUTH_USERNAME = "auth_username"
    AUTH_PASSWORD = "auth_password"
    BODY = "body"                 # between 354 and the final dot
    QUIT = "quit"                 # the last reply is queued: close after writing it
    CLOSED = "closed"             # the client went away


class Phase(enum.Enum):
    """Filter phases (OpenSMTPD's FILTER_*): where a filter may judge a command."""
    CONNECT = "connect"
    HELO = "helo"
    EHLO = "ehlo"
    STARTTLS = "starttls"
    AUTH = "auth"
    MAIL_FROM = "mail-from"
    RCPT_TO = "rcpt-to"
    DATA = "data"
    DATA_LINE = "data-line"
    RSET = "rset"
    QUIT = "quit"
    NOOP = "noop"
    HELP = "help"
    WIZ = "wiz"
    COMMIT = "commit"


# --- events ---------------------------------------------------------------------------

class _Sentinel:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = _Sentinel("NEED_DATA")     # feed receive_data()
PAUSED = _Sentinel("PAUSED")           # answer the last event first


@dataclass(slots=True)
class Event:
    """Base of what next_event() returns (never instantiated itself)."""


@dataclass(slots=True)
class Command(Event):
    """A command that passed its check; ``line`` is the whole line as received."""
    phase: Phase
    line: str
    arg: str | None


@dataclass(slots=True)
class Helo(Command):
    name: str = ""
    extended: bool = False


@dataclass(slots=True)
class MailFrom(Command):
    sender: str = ""                   # "" for the null sender
    dsn_ret: str = ""
    dsn_envid: str = ""
    body_7bit: bool = False


@dataclass(slots=True)
class RcptTo(Command):
    rcpt: str = ""
    dsn_notify: int = 0
    dsn_orcpt: str = ""


@dataclass(slots=True)
class DataStart(Command):
    pass


@dataclass(slots=True)
class StartTls(Command):
    pass


@dataclass(slots=True)
class AuthCredentials(Command):
    """The credentials the client gave (never log ``password``)."""
    mechanism: str = ""
    user: str = ""
    password: str = ""


@dataclass(slots=True)
class DataChunk(Event):
    data: bytes                        # unstuffed body bytes, LF line endings


@dataclass(slots=True)
class DataEnd(Event):
    """The final dot.  ``error``: "" (commit it), "size", "loop" or "internal"."""
    size: int
    error: str = ""
    phase: Phase = Phase.COMMIT


@dataclass(slots=True)
class ProxyReceived(Event):
    header: object                     # smtpd.proxy_v2.ProxyHeader


@dataclass(slots=True)
class ConnectionClosed(Event):
    """The session is over: ``reason`` "quit", "disconnect", "bad-input", "proxy-error"
    (``detail`` says what was wrong with the header)."""
    reason: str
    detail: str = ""


# --- replies (OpenSMTPD's texts, with RFC 3463 enhanced codes) ------------------------

R_NOT_ALLOWED = "503 5.5.1 Invalid command: Command not allowed at this point."
R_UNRECOGNIZED = "500 5.5.1 Invalid command: Command unrecognized"
R_NO_ARGS = "500 5.5.4 Invalid command arguments: command does not accept arguments."
R_ALREADY = "503 5.5.1 Invalid command: Already identified"
R_BAD_DOMAIN = "501 5.5.4 Invalid command arguments: Invalid domain name"
R_NOT_SUPPORTED = "503 5.5.1 Invalid command: Command not supported"
R_SENDER_SYNTAX = "553 5.1.0 Sender address syntax error"
R_RCPT_SYNTAX = "501 5.1.3 Recipient address syntax error"
R_NO_RCPT = "503 5.5.4 Invalid command arguments: No recipient specified"
R_TOO_MANY_RCPT = "451 4.5.3 Too many recipients: Too many recipients"
R_TOO_MANY_MAILS = "452 4.5.3 Too many recipients: Too many messages sent"
R_LINE_TOO_LONG = "500 5.0.0 Line too long"
R_COMMAND_TOO_LONG = "500 5.0.0 Command line too long"
R_TOO_BIG = "554 5.3.4 Message too big for system: Transaction failed, message too big"
R_LOOP = "500 5.4.6 Routing loop detected: Loop detected"
R_TEMPFAIL = "421 4.3.0 Temporary failure"
R_TX_TEMPFAIL = "451 4.3.0 Temporary failure"
R_AUTH_SYNTAX = "501 5.5.2 Syntax error: Syntax error"
R_AUTH_FAILED = "535 Authentication failed"
R_AUTH_OK = "235 2.0.0 Authentication succeeded"
R_RCPT_OK = "250 2.1.5 Destination address valid: Recipient ok"
R_OK = "250 2.0.0 Ok"
R_DATA = '354 Enter mail, end with "." on a line by itself'

# RFC 5321 4.2: Reply-code = %x32-35 %x30-35 %x30-39; text is printable ASCII, SP, HT.
REPLY_LINE = re.compile(rb"^[2-5][0-5][0-9]([ -][\t\x20-\x7e]*)?$")

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


def parse_path(arg: str, *, domain: str, mailfrom: bool) -> tuple[str | None, str]:
    """The address of ``<path> params`` (smtp_mailaddr): (address or None when the
    syntax is bad, the parameters).  The null path is "" (MAIL only); a source route
    is dropped; a bare local part gets ``domain``."""
    if not arg.startswith("<"):
        return None, ""
    end = arg.find(">")
    if end < 0:
        return None, ""
    address, params = arg[1:end], arg[end + 1:].lstrip(" ")
    if address.startswith("@") and ":" in address:      # <@a,@b:user@d>
        address = address.split(":", 1)[1]
    if not address:
        return ("" if mailfrom else None), params
    if "@" not in address:
        if not mailfrom and address.lower() == "postmaster":   # RFC 5321 4.5.1
            address = "postmaster"
        address = f"{address}@{domain}"
    return (address if valid_mailbox(address) else None), params


@dataclass(slots=True)
class Settings:
    """What the core needs to know of its listener and the daemon's limits."""
    hostname: str = "localhost"
    max_message_size: int = 35 * 1024 * 1024
    max_rcpt: int = 1000
    max_mails: int = 100
    dsn: bool = True                   # advertise DSN (a listener's no-dsn turns it off)
    starttls: bool = False             # STARTTLS offered
    tls_require: bool = False          # MAIL refused before STARTTLS
    smtps: bool = False                # TLS from the first byte (the session starts secure)
    auth: str = ""                     # "" none, "required", "optional"
    proxy_v2: bool = False
    proxy_parser: Callable[[bytes], object] | None = None   # smtpd.proxy_v2.parse
    peer: str = "local"                # the client address as shown in replies


@dataclass(slots=True)
class Transaction:
    sender: str = ""
    rcpts: list[str] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)


# --- the command table ----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Spec:
    verb: str
    phase: Phase
    check: Callable[["ServerConnection", str | None], str | None]   # reply when refused
    proceed: Callable[["ServerConnection", str, str | None], Event]


def _noparam(conn: "ServerConnection", arg: str | None) -> str | None:
    return R_NO_ARGS if arg is not None else None


def _check_helo(conn: "ServerConnection", arg: str | None, verb: str = "HELO") -> str | None:
    if conn.helo:
        return R_ALREADY
    if arg is None:
        return f"501 5.5.1 Invalid command: {verb} requires domain name"
    if not valid_helo(arg):
        return R_BAD_DOMAIN
    return None


def _check_ehlo(conn: "ServerConnection", arg: str | None) -> str | None:
    return _check_helo(conn, arg, "EHLO")


def _check_starttls(conn: "ServerConnection", arg: str | None) -> str | None:
    if not conn.helo or conn.tx is not None:
        return R_NOT_ALLOWED
    if not conn.settings.starttls:
        return R_NOT_SUPPORTED
    if conn.secure:
        return "503 5.5.1 Invalid command: Channel already secured"
    if arg is not None:
        return "501 5.5.4 Invalid command arguments: No parameters allowed"
    return None


def _check_auth(conn: "ServerConnection", arg: str | None) -> str | None:
    if not conn.helo or conn.tx is not None:
        return R_NOT_ALLOWED
    if conn.authenticated:
        return "503 5.5.1 Invalid command: Already authenticated"
    if not conn.advertise_auth():
        return R_NOT_SUPPORTED
    if arg is None:
        return "501 5.5.4 Invalid command arguments: No parameters given"
    return None


def _check_mail(conn: "ServerConnection", arg: str | None) -> str | None:
    if not conn.helo or conn.tx is not None:
        return R_NOT_ALLOWED
    if conn.settings.tls_require and not conn.secure:
        return "530 5.5.1 Invalid command: Must issue a STARTTLS command first"
    if conn.settings.auth == "required" and not conn.authenticated:
        return "530 5.5.1 Invalid command: Must issue an AUTH command first"
    if conn.mail_count >= conn.settings.max_mails:
        return R_TOO_MANY_MAILS
    return None


def _check_rcpt(conn: "ServerConnection", arg: str | None) -> str | None:
    if conn.tx is None:
        return R_NOT_ALLOWED
    if len(conn.tx.rcpts) >= conn.settings.max_rcpt:
        return R_TOO_MANY_RCPT
    return None


def _check_data(conn: "ServerConnection", arg: str | None) -> str | None:
    if arg is not None:
        return R_NO_ARGS
    if conn.tx is None:
        return R_NOT_ALLOWED
    if not conn.tx.rcpts:
        return R_NO_RCPT
    return None


def _check_rset(conn: "ServerConnection", arg: str | None) -> str | None:
    if arg is not None:
        return R_NO_ARGS
    return R_NOT_ALLOWED if not conn.helo else None


def _simple(phase: Phase) -> Callable:
    def proceed(conn: "ServerConnection", line: str, arg: str | None) -> Event:
        return Command(phase, line, arg)
    return proceed


def _proceed_helo(conn, line, arg):
    return Helo(Phase.HELO, line, arg, name=arg, extended=False)


def _proceed_ehlo(conn, line, arg):
    return Helo(Phase.EHLO, line, arg, name=arg, extended=True)


def _dsn_words(conn, params: str, dsn_keys: tuple[str, ...], ignored=lambda word: False,
               refusal: str = "503 5.5.4 Invalid command arguments: Unsupported option {}"):
    """The DSN parameters among ``params`` (only after EHLO, on a listener with DSN),
    or OpenSMTPD's refusal of the first parameter it does not take."""
    words = []
    for word in params.split(" "):
        if not word or ignored(word):
            continue
        if word.partition("=")[0].upper() in dsn_keys and conn.settings.dsn and conn.extended:
            words.append(word)
        else:
            return refusal.format(word)        # RCPT's has no enhanced code in 6.8
    return words


def _ignored_mail_param(word: str) -> bool:
    """Accepted and not acted upon, as OpenSMTPD: AUTH=, SIZE=, BODY=."""
    return word.partition("=")[0].upper() in ("AUTH", "SIZE") or word.upper() in ("BODY=8BITMIME", "BODY=7BIT")


def _proceed_mail(conn, line, arg):
    sender, params = parse_path(arg or "", domain=conn.settings.hostname, mailfrom=True)
    if sender is None:
        return R_SENDER_SYNTAX
    words = _dsn_words(conn, params, ("RET", "ENVID"), _ignored_mail_param)
    if isinstance(words, str):
        return words
    dsn = dsn_params.parse_mail_options(words)
    if isinstance(dsn, str):
        return dsn
    return MailFrom(Phase.MAIL_FROM, line, arg, sender=sender, dsn_ret=dsn[0], dsn_envid=dsn[1],
                    body_7bit="BODY=7BIT" in params.upper().split(" "))


def _proceed_rcpt(conn, line, arg):
    rcpt, params = parse_path(arg or "", domain=conn.settings.hostname, mailfrom=False)
    if rcpt is None:
        return R_RCPT_SYNTAX
    if rcpt.lower() in conn.tx.seen:
        return R_RCPT_OK              # the same recipient twice: one delivery (no new envelope)
    words = _dsn_words(conn, params, ("NOTIFY", "ORCPT"), refusal="503 Unsupported option {}")
    if isinstance(words, str):
        return words
    dsn = dsn_params.parse_rcpt_options(words)
    if isinstance(dsn, str):
        return dsn
    return RcptTo(Phase.RCPT_TO, line, arg, rcpt=rcpt, dsn_notify=dsn.notify, dsn_orcpt=dsn.orcpt)


def _proceed_data(conn, line, arg):
    return DataStart(Phase.DATA, line, arg)


def _proceed_starttls(conn, line, arg):
    return StartTls(Phase.STARTTLS, line, arg)


def _proceed_auth(conn, line, arg):
    method, _, rest = (arg or "").replace("\t", " ").partition(" ")
    rest = rest.strip(" ") or None
    method = method.upper()
    if method == "PLAIN":
        if rest is None:
            conn._enter(State.AUTH_INIT)
            conn._reply("334 ")
            return None
        conn._enter(State.AUTH_INIT)
        return conn._auth_plain(rest)
    if method == "LOGIN":
        conn._enter(State.AUTH_USERNAME)
        if rest is not None:
            return conn._auth_login(rest)
        conn._reply("334 VXNlcm5hbWU6")
        return None
    return f'504 5.7.4 Security features not supported: AUTH method "{method}" not supported'


COMMANDS: dict[str, Spec] = {spec.verb: spec for spec in (
    Spec("HELO", Phase.HELO, _check_helo, _proceed_helo),
    Spec("EHLO", Phase.EHLO, _check_ehlo, _proceed_ehlo),
    Spec("STARTTLS", Phase.STARTTLS, _check_starttls, _proceed_starttls),
    Spec("AUTH", Phase.AUTH, _check_auth, _proceed_auth),
    Spec("MAIL FROM", Phase.MAIL_FROM, _check_mail, _proceed_mail),
    Spec("RCPT TO", Phase.RCPT_TO, _check_rcpt, _proceed_rcpt),
    Spec("DATA", Phase.DATA, _check_data, _proceed_data),
    Spec("RSET", Phase.RSET, _check_rset, _simple(Phase.RSET)),
    Spec("QUIT", Phase.QUIT, _noparam, _simple(Phase.QUIT)),
    Spec("NOOP", Phase.NOOP, _noparam, _simple(Phase.NOOP)),
    Spec("HELP", Phase.HELP, _noparam, _simple(Phase.HELP)),
    Spec("WIZ", Phase.WIZ, _noparam, _simple(Phase.WIZ)),
)}

_AUTH_PROMPTS = {State.AUTH_INIT: "AUTH PLAIN (...)", State.AUTH_USERNAME: "AUTH LOGIN (username)",
                 State.AUTH_PASSWORD: "AUTH LOGIN (password)"}

# The state a command event leads to once the driver accepts it (refused: unchanged,
# but for the cases in ``ServerConnection.refuse``).  Anything not here keeps its state.
_TRANSITIONS: dict[Phase, State] = {
    Phase.HELO: State.HELO, Phase.EHLO: State.HELO, Phase.STARTTLS: State.TLS,
    Phase.DATA: State.BODY, Phase.QUIT: State.QUIT, Phase.COMMIT: State.HELO,
    Phase.AUTH: State.HELO,
}


class ServerConnection:
    """One inbound SMTP session's protocol state (see the module docstring)."""

    def __init__(self, settings: Settings,
                 on_reply: Callable[["ServerConnection", str, str], None] | None = None,
                 on_command: Callable[["ServerConnection", str], None] | None = None) -> None:
        self.settings = settings
        self.on_reply = on_reply       # (conn, command line, reply): logging, tracing
        self.on_command = on_command   # (conn, command line, credentials masked): tracing
        self.state = State.PROXY if settings.proxy_v2 else State.CONNECTED
        self.helo = ""
        self.extended = False
        self.secure = settings.smtps
        self.authenticated = False
        self.username = ""
        self.mail_count = 0
        self.tx: Transaction | None = None
        self.last_line = ""            # the command being answered (failed-command)
        self._in = bytearray()
        self._out: list[bytes] = []
        self._eof = False
        self._pending: Event | None = None
        self._queued: list[Event] = []
        self._start_body()             # the body reader's state, reset at each DATA

    # -- I/O boundary ------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes from the client; ``b""`` when it closed its side."""
        if data:
            if not self._eof:
                self._in += data
        else:
            self._eof = True

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    @property
    def closing(self) -> bool:
        """The driver closes the connection once data_to_send() is written."""
        return self.state in (State.QUIT, State.CLOSED)

    def next_event(self):
        if self._queued:
            return self._queued.pop(0)
        if self._pending is not None:
            return PAUSED
        while True:
            state = self.state
            if state is State.BODY:
                return self._body_event()
            if state in (State.QUIT, State.CLOSED, State.TLS, State.CONNECTED):
                if state is State.CONNECTED and self._eof:
                    return self._close("disconnect")
                return PAUSED if state is not State.CLOSED else NEED_DATA
            if state is State.PROXY:
                return self._proxy_event()
            line = self._take_line()
            if line is None:
                if self._eof:
                    return self._close("disconnect")
                return NEED_DATA
            if isinstance(line, Event):
                return line
            event = self._command(line)
            if event is not None:
                self._pending = event if isinstance(event, Command) else None
                return event

    # -- the driver's answers ------------------------------------------------------------

    def greet(self) -> None:
        """Send the banner (the driver has looked up what it needed: rDNS, limits)."""
        if self.state is not State.CONNECTED:
            raise RuntimeError(f"greet() in state {self.state}")
        self._enter(State.INIT)
        self._reply(f"220 {self.settings.hostname} ESMTP pysmtpd")

    def accept(self, *, msgid: int = 0) -> None:
        """The pending event succeeded: the core writes OpenSMTPD's reply to it."""
        event = self._take_pending()
        phase = event.phase
        s = self.settings
        if phase in (Phase.HELO, Phase.EHLO):
            self.helo, self.extended = event.name, event.extended
            greeting = f"{s.hostname} Hello {event.name} {_bracket(s.peer)}, pleased to meet you"
            if not event.extended:
                self._reply(f"250 {greeting}")
            else:
                lines = [greeting, "8BITMIME", "ENHANCEDSTATUSCODES", f"SIZE {s.max_message_size}"]
                if s.dsn:
                    lines.append("DSN")
                if s.starttls and not self.secure:
                    lines.append("STARTTLS")
                if self.advertise_auth():
                    lines.append("AUTH PLAIN LOGIN")
                lines += ["PIPELINING", "HELP"]
                self._reply("\r\n".join(f"250-{text}" for text in lines[:-1]) + f"\r\n250 {lines[-1]}")
        elif phase is Phase.MAIL_FROM:
            self.tx = Transaction(sender=event.sender)
            self._reply(R_OK)
        elif phase is Phase.RCPT_TO:
            self.tx.rcpts.append(event.rcpt)
            self.tx.seen.add(event.rcpt.lower())
            self._reply(R_RCPT_OK)
        elif phase is Phase.DATA:
            self._start_body()
            self._reply(R_DATA)
        elif phase is Phase.COMMIT:
            self.tx = None
            self.mail_count += 1
            self._reply(f"250 2.0.0 {msgid:08x} Message accepted for delivery")
        elif phase is Phase.STARTTLS:
            self._in.clear()           # pipelined in clear text: never a command after TLS
            self._reply("220 2.0.0 Ready to start TLS")
        elif phase is Phase.AUTH:
            self.authenticated = True
            self._reply(R_AUTH_OK)
        elif phase is Phase.RSET:
            self.tx = None
            self._reply("250 2.0.0 Reset state")
        elif phase is Phase.QUIT:
            self._reply("221 2.0.0 Bye")
        elif phase is Phase.NOOP:
            self._reply(R_OK)
        elif phase is Phase.HELP:
            self._reply("214-2.0.0 This is pysmtpd\r\n"
                        "214-2.0.0 To report bugs in the implementation, please see its issue tracker\r\n"
                        "214 2.0.0 End of HELP info")
        elif phase is Phase.WIZ:
            self._reply("500 5.5.1 Invalid command: this feature is not supported yet ;-)")
        if phase in _TRANSITIONS:
            self._enter(_TRANSITIONS[phase])

    def refuse(self, reply: str) -> None:
        """The pending event failed (the driver's or a filter's reply, 4xx/5xx).  A 421
        ends the session; a refused message or AUTH resets to HELO."""
        event = self._take_pending()
        if reply[:1] not in ("4", "5") or not reply_lines_valid(reply.encode("utf-8", "replace") + b"\r\n"):
            reply = R_TEMPFAIL          # a reply we would not dare send: a temporary failure
        if event.phase is Phase.COMMIT:
            self.tx = None
            self._enter(State.HELO)
        elif event.phase is Phase.AUTH:
            self._enter(State.HELO)
        self._reply(reply)
        if reply.startswith("421"):
            self._enter(State.QUIT)

    def internal_error(self) -> None:
        """Our own fault while answering the pending event (an exception, a peer that
        timed out): 451 inside a transaction, which is reset, else 421 and the end.
        In the body, the rest of it is read and discarded first."""
        if self.state is State.BODY and self._pending is None:
            self._body_error = self._body_error or "internal"
            return
        in_tx = self.tx is not None
        if self._pending is not None:
            self._pending = None
        if self.state is State.BODY:
            self._enter(State.HELO)
        if in_tx and self.state is not State.QUIT:
            self.tx = None
            if self.state in (State.TLS, State.AUTH_INIT, State.AUTH_USERNAME, State.AUTH_PASSWORD):
                self._enter(State.HELO)
            self._reply(R_TX_TEMPFAIL)
        else:
            self._reply(R_TEMPFAIL)
            self._enter(State.QUIT)

    def tls_established(self) -> None:
        """The STARTTLS handshake is done: the client starts over with EHLO."""
        if self.state is not State.TLS:
            raise RuntimeError(f"tls_established() in state {self.state}")
        self.secure = True
        self.helo = ""
        self._in.clear()
        self._enter(State.INIT)

    def shutdown(self, reply: str) -> None:
        """Say ``reply`` (a 421) and end the session whatever its state (timeouts,
        limits, the daemon stopping)."""
        self._pending = None
        self._reply(reply)
        self._enter(State.QUIT)

    def advertise_auth(self) -> bool:
        return bool(self.settings.auth) and self.secure and not self.authenticated

    def tempfail_reply(self) -> str:
        return R_TX_TEMPFAIL if self.tx is not None else R_TEMPFAIL

    # -- internals -----------------------------------------------------------------------

    def _take_pending(self) -> Event:
        event = self._pending
        if event is None:
            raise RuntimeError("no event is waiting for an answer")
        self._pending = None
        return event

    def _enter(self, state: State) -> None:
        self.state = state

    def _reply(self, text: str) -> None:
        if self.on_reply is not None:
            self.on_reply(self, self.last_line, text)
        self._out.append(text.encode("utf-8", "replace") + b"\r\n")

    def _close(self, reason: str) -> ConnectionClosed:
        self._pending = None
        self._enter(State.CLOSED)
        return ConnectionClosed(reason)

    def _proxy_event(self):
        parser = self.settings.proxy_parser
        try:
            header = parser(bytes(self._in)) if parser is not None else None
            if parser is None:
                raise ValueError("no PROXY parser")
        except Exception as exc:       # ProxyError, or anything a bad header provokes
            self._in.clear()
            closed = self._close("proxy-error")
            closed.detail = str(exc) or type(exc).__name__
            return closed
        if header is None:
            if self._eof or len(self._in) > PROXY_HEADER_MAX:
                closed = self._close("proxy-error" if self._in else "disconnect")
                closed.detail = "truncated header" if self._in else ""
                return closed
            return NEED_DATA
        del self._in[:header.consumed]
        self._enter(State.CONNECTED)
        return ProxyReceived(header)

    def _take_line(self):
        """The next command line without its CRLF (bytes -> str, undecodable bytes kept
        as surrogates), None when incomplete, or the closing event of a bad line."""
        buf = self._in
        end = buf.find(b"\n")
        if end < 0:
            if len(buf) >= LINE_MAX:
                return self._bad_input(R_LINE_TOO_LONG)
            return None
        if end >= LINE_MAX:
            return self._bad_input(R_LINE_TOO_LONG)
        raw = bytes(buf[:end])
        del buf[:end + 1]
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if len(raw) >= COMMAND_MAX:
            return self._bad_input(R_COMMAND_TOO_LONG)
        # a C string ends at its NUL: OpenSMTPD reads (and logs) the command up to there
        raw = raw.partition(b"\0")[0]
        return raw.decode("utf-8", "surrogateescape")

    def _bad_input(self, reply: str):
        self._in.clear()
        self.last_line = ""
        self._reply(reply)
        self._enter(State.QUIT)
        return ConnectionClosed("bad-input")

    def _command(self, line: str):
        state = self.state
        if state in _AUTH_PROMPTS:
            # a response to 334: credentials, never shown
            self.last_line = _AUTH_PROMPTS[state]
            if self.on_command is not None:
                self.on_command(self, "********")
            if state is State.AUTH_INIT:
                return self._auth_plain(line)
            return self._auth_login(line)
        self.last_line = line
        if line[:5].upper() == "AUTH ":
            words = line.split()
            self.last_line = " ".join(words[:2]) + (" (...)" if len(words) > 2 else "")
        if self.on_command is not None:
            self.on_command(self, self.last_line)
        head = line[:10].upper()
        if head.startswith("MAIL FROM:") or head.startswith("RCPT TO:"):
            verb, _, arg = line.partition(":")
            verb = verb.upper()
        else:
            verb, sep, arg = line.partition(" ")
            verb = verb.upper()
            if not sep:
                arg = None
        if arg is not None:
            arg = arg.lstrip(" \t\r\n\v\f")
        spec = COMMANDS.get(verb)
        if spec is None:
            self._reply(R_UNRECOGNIZED)
            return None
        refused = spec.check(self, arg)
        if refused is not None:
            self._reply(refused)
            return None
        event = spec.proceed(self, line, arg)
        if isinstance(event, str):
            self._reply(event)
            return None
        return event

    # AUTH (RFC 4954): PLAIN's one response, LOGIN's two
    def _auth_plain(self, response: str):
        try:
            decoded = base64.b64decode(response.encode("ascii"), validate=True)
            _authzid, user, password = decoded.split(b"\0")
            if not user or not password:
                raise ValueError
        except (ValueError, UnicodeEncodeError, binascii.Error):
            self._enter(State.HELO)
            self._reply(R_AUTH_SYNTAX)
            return None
        return self._credentials("PLAIN", user, password)

    def _auth_login(self, response: str):
        try:
            decoded = base64.b64decode(response.encode("ascii"), validate=True)
        except (ValueError, UnicodeEncodeError, binascii.Error):
            self._enter(State.HELO)
            self._reply(R_AUTH_SYNTAX)
            return None
        if self.state is State.AUTH_USERNAME:
            self.username = decoded.decode("utf-8", "surrogateescape")
            self._enter(State.AUTH_PASSWORD)
            self._reply("334 UGFzc3dvcmQ6")
            return None
        return self._credentials("LOGIN", self.username.encode("utf-8", "surrogateescape"), decoded)

    def _credentials(self, mechanism: str, user: bytes, password: bytes) -> AuthCredentials:
        self.username = user.decode("utf-8", "surrogateescape")
        self._enter(State.HELO)
        return AuthCredentials(Phase.AUTH, f"AUTH {mechanism}", None, mechanism=mechanism,
                               user=self.username,
                               password=password.decode("utf-8", "surrogateescape"))

    # the body
    def _start_body(self) -> None:
        self._at_line_start = True
        self._body_size = 0
        self._body_error = ""
        self._in_headers = True
        self._header_line = b""
        self._received = 0

    def _body_event(self):
        """The next DataChunk, DataEnd, or NEED_DATA (a discarded body yields none)."""
        while True:
            out, end_found = self._scan_body()
            chunk = None
            if out:
                self._account(out)
                if not self._body_error:
                    chunk = DataChunk(bytes(out).replace(b"\r\n", b"\n"))
            if end_found:
                end = DataEnd(self._body_size, self._body_error)
                self._pending = end
                # OpenSMTPD names the refused message by its command: failed-command command="DATA"
                self.last_line = "DATA"
                if chunk is not None:
                    self._queued.append(end)
                    return chunk
                return end
            if chunk is not None:
                return chunk
            if not out:
                return self._close("disconnect") if self._eof else NEED_DATA

    def _scan_body(self) -> tuple[bytearray, bool]:
        """Take body bytes from the input: (wire bytes with dot-stuffing undone, whether
        the end marker was reached).  A trailing CR or CRLF waits for the next byte."""
        buf = self._in
        n = len(buf)
        out = bytearray()
        pos = 0
        end_found = False
        while pos < n and len(out) < CHUNK_MAX:
            if self._at_line_start:
                if buf[pos] == 0x2E:                   # "."
                    following = buf[pos + 1:pos + 3]
                    if following == b"\r\n":
                        pos += 3
                        end_found = True
                        break
                    if n - pos < 3 and following in (b"", b"\r"):
                        break                          # "." or ".\r": wait for more
                    pos += 1                           # dot-stuffing undone
                self._at_line_start = False
                continue
            limit = min(n, pos + CHUNK_MAX)
            found = buf.find(b"\r\n.", pos, limit)
            if found >= 0:
                out += buf[pos:found + 2]
                pos = found + 2
                self._at_line_start = True
                continue
            take = limit
            if buf[take - 1] == 0x0D:
                take -= 1
            elif buf[take - 2:take] == b"\r\n":
                take -= 2
            if take <= pos:
                break                                  # only a CR or CRLF left: wait
            out += buf[pos:take]
            pos = take
        del buf[:pos]
        return out, end_found

    def _account(self, out: bytearray) -> None:
        """Size and loop accounting of body bytes (LF-normalised size, as OpenSMTPD)."""
        self._body_size += len(out) - out.count(b"\r\n")
        if self._body_size > self.settings.max_message_size and not self._body_error:
            self._body_error = "size"
        if self._in_headers:
            text = self._header_line + bytes(out)
            lines = text.split(b"\n")
            self._header_line = lines.pop()[:16]
            for line in lines:
                if line in (b"", b"\r"):
                    self._in_headers = False
                    break
                if line[:9].lower() == b"received:":
                    self._received += 1
            if self._received >= MAX_HOPS_COUNT and not self._body_error:
                self._body_error = "loop"


def _bracket(peer: str) -> str:
    """The client address in the HELO reply: IPv4 in brackets, IPv6 and "local" bare."""
    return peer if ":" in peer or peer == "local" else f"[{peer}]"


def reply_lines_valid(data: bytes) -> bool:
    """Whether ``data`` is a sequence of well-formed RFC 5321 reply lines, each
    multi-line reply with one code throughout."""
    if not data:
        return True
    if not data.endswith(b"\r\n"):
        return False
    code = None
    for line in data[:-2].split(b"\r\n"):
        if not REPLY_LINE.match(line):
            return False
        if code is not None and line[:3] != code:
            return False
        code = line[:3] if line[3:4] == b"-" else None
    return code is None
