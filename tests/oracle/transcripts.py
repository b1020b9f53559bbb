"""SMTP transcripts played against any server, and the runner that records its answers.

A transcript is what a client sends, step by step; the runner plays it against an address and
records every reply (code, enhanced code, text lines), whether the server closed the
connection after its last reply, and the server's log lines of the session (connected,
failed-command, authentication, tls, disconnected). The same transcripts are played against the
real OpenSMTPD (tests/oracle/opensmtpd.py) and pysmtpd; tests/e2e/test_fidelity.py compares.

The servers are configured alike (tests/oracle/environment.py): four listeners, named here
``plain`` (no TLS, no AUTH), ``starttls`` (STARTTLS offered, AUTH required after it),
``require`` (tls-require) and ``smtps`` (TLS from the first byte, AUTH optional).
"""
from __future__ import annotations

import base64
import re
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Callable

REPLY_TIMEOUT = 5.0
CLOSE_TIMEOUT = 2.0
LOG_TIMEOUT = 3.0

USER, PASSWORD = "alice", "alice-secret"
DOMAIN = "example.test"


@dataclass(frozen=True)
class Step:
    """Bytes sent as they are, then ``replies`` replies read; ``tls``: handshake after a 220."""
    send: bytes
    replies: int = 1
    tls: bool = False
    label: str = ""                 # how the step is shown when ``send`` is unwieldy

    def shown(self) -> str:
        if self.label:
            return self.label
        text = self.send.decode("utf-8", "backslashreplace").replace("\r\n", "\\r\\n")
        return "".join(f"\\x{ord(c):02x}" if ord(c) < 32 and c != "\n" else c for c in text).replace("\n", "\\n")


@dataclass(frozen=True)
class Transcript:
    name: str
    about: str
    steps: tuple[Step, ...]
    listener: str = "plain"


def cmd(line: str, replies: int = 1, tls: bool = False) -> Step:
    return Step(line.encode() + b"\r\n", replies, tls)


def plain_auth(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


EHLO = cmd("EHLO client.test")
MAIL = cmd("MAIL FROM:<sender@client.test>")
RCPT = cmd(f"RCPT TO:<{USER}@{DOMAIN}>")
QUIT = cmd("QUIT")
RSET = cmd("RSET")
STARTTLS = cmd("STARTTLS", tls=True)
MESSAGE = Step(b"Subject: fidelity\r\n\r\nhello\r\n.\r\n", label="<message>\\r\\n.\\r\\n")
BIG_MESSAGE = Step(b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 40 + b".\r\n",
                   label="<40 KB message>\\r\\n.\\r\\n")
AUTH_OK = cmd(f"AUTH PLAIN {plain_auth(USER, PASSWORD)}")
TLS_EHLO = (EHLO, STARTTLS, EHLO)


def t(name: str, about: str, *steps: Step, listener: str = "plain") -> Transcript:
    return Transcript(name, about, tuple(steps), listener)


TRANSCRIPTS: tuple[Transcript, ...] = (
    t("greeting", "connect and quit", QUIT),
    t("quit-with-argument", "QUIT takes no argument", EHLO, cmd("QUIT now")),
    # EHLO / HELO
    t("ehlo", "EHLO and the extensions advertised", EHLO, QUIT),
    t("helo", "HELO", cmd("HELO client.test"), MAIL, QUIT),
    t("ehlo-address-literal", "EHLO with an address literal", cmd("EHLO [127.0.0.1]"), QUIT),
    t("ehlo-missing-argument", "EHLO and HELO without a name", cmd("EHLO"), cmd("HELO"), QUIT),
    t("ehlo-invalid", "EHLO and HELO with names that are not domains",
      cmd("EHLO bad..name"), cmd("EHLO -dash.test"), cmd("EHLO a b"), cmd("HELO bad..name"), QUIT),
    t("ehlo-twice", "a second EHLO in a session", EHLO, cmd("EHLO again.test"), MAIL, QUIT),
    t("ehlo-lowercase", "commands are case-insensitive", cmd("ehlo client.test"),
      cmd("mail from:<sender@client.test>"), QUIT),
    # MAIL FROM
    t("mail-before-ehlo", "MAIL before any EHLO/HELO", MAIL, QUIT),
    t("mail-valid", "MAIL FROM a plain address", EHLO, MAIL, QUIT),
    t("mail-bogus", "MAIL FROM without brackets or domain", EHLO, cmd("MAIL FROM:bogus"),
      cmd("MAIL FROM:<bogus>"), RSET, cmd("MAIL FROM:<a@b@c.test>"), RSET,
      cmd("MAIL FROM:<a b@c.test>"), QUIT),
    t("mail-null", "the null reverse-path", EHLO, cmd("MAIL FROM:<>"), QUIT),
    t("mail-malformed", "MAIL without FROM:, without argument",
      EHLO, cmd("MAIL"), cmd("MAIL TO:<a@b.test>"), cmd("MAIL FROM <a@b.test>"),
      cmd("MAIL FROM: <sender@client.test>"), QUIT),
    t("mail-size", "SIZE valid, too big, malformed", EHLO,
      cmd("MAIL FROM:<sender@client.test> SIZE=1000"), RSET,
      cmd("MAIL FROM:<sender@client.test> SIZE=100000000"), RSET,
      cmd("MAIL FROM:<sender@client.test> SIZE=abc"), RSET,
      cmd("MAIL FROM:<sender@client.test> SIZE="), RSET,
      cmd("MAIL FROM:<sender@client.test> SIZE=-1"), RSET,
      cmd("MAIL FROM:<sender@client.test> SIZE=99999999999999999999999"), QUIT),
    t("mail-smtputf8", "SMTPUTF8 and UTF-8 addresses", EHLO,
      cmd("MAIL FROM:<sender@client.test> SMTPUTF8"), RSET,
      cmd("MAIL FROM:<s\u00e9nder@client.test> SMTPUTF8"), RSET,
      cmd("MAIL FROM:<s\u00e9nder@client.test>"), QUIT),
    t("mail-body", "BODY=8BITMIME, 7BIT, BINARYMIME", EHLO,
      cmd("MAIL FROM:<sender@client.test> BODY=8BITMIME"), RSET,
      cmd("MAIL FROM:<sender@client.test> BODY=7BIT"), RSET,
      cmd("MAIL FROM:<sender@client.test> BODY=BINARYMIME"),
      cmd("MAIL FROM:<sender@client.test> BODY=junk"), QUIT),
    t("mail-unknown-parameter", "an unknown MAIL parameter", EHLO,
      cmd("MAIL FROM:<sender@client.test> FOO=bar"), QUIT),
    t("mail-dsn-parameters", "RET and ENVID", EHLO,
      cmd("MAIL FROM:<sender@client.test> RET=HDRS ENVID=abc"), QUIT),
    t("mail-nested", "MAIL inside a transaction", EHLO, MAIL, MAIL, QUIT),
    # RCPT TO
    t("rcpt-accepted", "a local recipient", EHLO, MAIL, RCPT, QUIT),
    t("rcpt-unknown-user", "a local domain, an unknown user", EHLO, MAIL,
      cmd(f"RCPT TO:<nobody-here@{DOMAIN}>"), QUIT),
    t("rcpt-relay-denied", "a remote domain, no relay rule", EHLO, MAIL,
      cmd("RCPT TO:<someone@elsewhere.test>"), QUIT),
    t("rcpt-too-many", "over smtp limit max-rcpt (2)", EHLO, MAIL, RCPT,
      cmd(f"RCPT TO:<bob@{DOMAIN}>"), cmd(f"RCPT TO:<carol@{DOMAIN}>"), QUIT),
    t("rcpt-malformed", "RCPT arguments that are not paths", EHLO, MAIL,
      cmd("RCPT TO:bogus"), cmd("RCPT TO:<>"), cmd(f"RCPT TO <{USER}@{DOMAIN}>"), cmd("RCPT"),
      cmd(f"RCPT TO:<{USER}@{DOMAIN}> FOO=bar"), QUIT),
    t("rcpt-dsn-parameters", "NOTIFY and ORCPT", EHLO, MAIL,
      cmd(f"RCPT TO:<{USER}@{DOMAIN}> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;{USER}@{DOMAIN}"), QUIT),
    t("rcpt-before-mail", "RCPT outside a transaction", EHLO, RCPT, QUIT),
    # DATA
    t("data-before-rcpt", "DATA before MAIL and before RCPT", EHLO, cmd("DATA"), MAIL,
      cmd("DATA"), QUIT),
    t("data-accepted", "a whole transaction", EHLO, MAIL, RCPT, cmd("DATA"), MESSAGE, QUIT),
    t("data-too-big", "a message over max-message-size, then a new transaction", EHLO, MAIL,
      RCPT, cmd("DATA"), BIG_MESSAGE, MAIL, QUIT),
    t("data-with-argument", "DATA takes no argument", EHLO, MAIL, RCPT, cmd("DATA now"), QUIT),
    # RSET NOOP VRFY EXPN HELP
    t("rset", "RSET ends the transaction", EHLO, MAIL, RSET, RCPT, MAIL, cmd("RSET now"),
      QUIT),
    t("rset-before-ehlo", "RSET before EHLO", RSET, QUIT),
    t("noop", "NOOP with and without argument", cmd("NOOP"), EHLO, cmd("NOOP"), cmd("NOOP x"), QUIT),
    t("vrfy", "VRFY", EHLO, cmd(f"VRFY {USER}"), cmd("VRFY"), QUIT),
    t("expn", "EXPN", EHLO, cmd(f"EXPN {USER}"), cmd("EXPN"), QUIT),
    t("help", "HELP", cmd("HELP"), EHLO, cmd("HELP MAIL"), QUIT),
    # unknown, out of order, limits
    t("unknown-command", "commands the server does not know", EHLO, cmd("FOO"), cmd("FOO bar"),
      cmd(""), cmd("TURN"), cmd("BDAT 10 LAST"), QUIT),
    t("line-too-long", "a command line of 5000 bytes",
      EHLO, Step(b"NOOP " + b"x" * 5000 + b"\r\n", label="NOOP <5000 x>"), cmd("NOOP")),
    t("line-very-long", "a command line of 70000 bytes",
      EHLO, Step(b"NOOP " + b"x" * 70000 + b"\r\n", label="NOOP <70000 x>"), cmd("NOOP")),
    t("pipelining", "a whole transaction in one write", EHLO,
      Step(b"MAIL FROM:<sender@client.test>\r\nRCPT TO:<alice@example.test>\r\n"
           b"RCPT TO:<nobody-here@example.test>\r\nDATA\r\n", replies=4),
      MESSAGE, QUIT),
    t("pipelining-before-ehlo", "commands pipelined with EHLO",
      Step(b"EHLO client.test\r\nMAIL FROM:<sender@client.test>\r\nNOOP\r\n", replies=3), QUIT),
    t("bare-lf", "a command ended by LF alone", Step(b"EHLO client.test\n"), QUIT),
    t("nul-in-command", "a NUL byte in a command", EHLO,
      Step(b"MAIL FROM:<send\x00er@client.test>\r\n"), QUIT),
    # TLS and AUTH where not configured
    t("starttls-not-offered", "STARTTLS on a listener without TLS", EHLO, cmd("STARTTLS"), QUIT),
    t("auth-not-offered", "AUTH on a listener without AUTH", EHLO, AUTH_OK, QUIT),
    # STARTTLS listener (tls, auth required)
    t("starttls-ehlo", "EHLO before and after STARTTLS", *TLS_EHLO, QUIT, listener="starttls"),
    t("starttls-with-argument", "STARTTLS takes no argument", EHLO, cmd("STARTTLS now"), QUIT,
      listener="starttls"),
    t("starttls-before-ehlo", "STARTTLS before EHLO", cmd("STARTTLS"), QUIT,
      listener="starttls"),
    t("starttls-twice", "STARTTLS inside TLS", *TLS_EHLO, cmd("STARTTLS"), QUIT,
      listener="starttls"),
    t("starttls-pipelined", "a command pipelined after STARTTLS must be discarded", EHLO,
      Step(b"STARTTLS\r\nNOOP\r\n", tls=True), EHLO, QUIT, listener="starttls"),
    t("auth-before-tls", "AUTH before STARTTLS", EHLO, AUTH_OK, cmd("AUTH LOGIN"), QUIT,
      listener="starttls"),
    t("mail-before-auth", "MAIL on an auth listener without AUTH", *TLS_EHLO, MAIL, QUIT,
      listener="starttls"),
    t("auth-plain-ok", "AUTH PLAIN with the right password", *TLS_EHLO, AUTH_OK, MAIL, RCPT, QUIT,
      listener="starttls"),
    t("auth-plain-bad", "AUTH PLAIN with a wrong password", *TLS_EHLO,
      cmd(f"AUTH PLAIN {plain_auth(USER, 'wrong')}"), MAIL, QUIT, listener="starttls"),
    t("auth-plain-unknown-user", "AUTH PLAIN for a user not in the table", *TLS_EHLO,
      cmd(f"AUTH PLAIN {plain_auth('mallory', PASSWORD)}"), QUIT, listener="starttls"),
    t("auth-plain-challenge", "AUTH PLAIN without initial response", *TLS_EHLO,
      cmd("AUTH PLAIN"), cmd(plain_auth(USER, PASSWORD)), QUIT, listener="starttls"),
    t("auth-login-ok", "AUTH LOGIN with the right password", *TLS_EHLO, cmd("AUTH LOGIN"),
      cmd(b64(USER)), cmd(b64(PASSWORD)), MAIL, QUIT, listener="starttls"),
    t("auth-login-bad", "AUTH LOGIN with a wrong password", *TLS_EHLO, cmd("AUTH LOGIN"),
      cmd(b64(USER)), cmd(b64("wrong")), QUIT, listener="starttls"),
    t("auth-cancelled", "a client that cancels AUTH with *", *TLS_EHLO, cmd("AUTH LOGIN"),
      cmd("*"), QUIT, listener="starttls"),
    t("auth-bad-base64", "AUTH with a response that is not base64", *TLS_EHLO,
      cmd("AUTH PLAIN !!!"), QUIT, listener="starttls"),
    t("auth-unknown-mechanism", "AUTH with a mechanism not offered", *TLS_EHLO,
      cmd("AUTH CRAM-MD5"), cmd("AUTH"), QUIT, listener="starttls"),
    t("auth-twice", "AUTH after a successful AUTH", *TLS_EHLO, AUTH_OK, AUTH_OK, QUIT,
      listener="starttls"),
    t("auth-in-transaction", "AUTH inside a transaction", *TLS_EHLO, AUTH_OK, MAIL, AUTH_OK, QUIT,
      listener="starttls"),
    # tls-require listener
    t("require-mail-before-tls", "MAIL before STARTTLS where TLS is required", EHLO, MAIL,
      cmd("HELP"), QUIT, listener="require"),
    t("require-after-tls", "a transaction after STARTTLS where TLS is required", *TLS_EHLO, MAIL,
      RCPT, QUIT, listener="require"),
    # smtps listener (auth-optional)
    t("smtps-ehlo", "EHLO over SMTPS", EHLO, cmd("STARTTLS"), QUIT, listener="smtps"),
    t("smtps-auth", "AUTH over SMTPS, then a transaction", EHLO, AUTH_OK, MAIL, RCPT, QUIT,
      listener="smtps"),
    t("smtps-without-auth", "a transaction without AUTH where AUTH is optional", EHLO, MAIL, RCPT,
      QUIT, listener="smtps"),
)

BY_NAME = {tr.name: tr for tr in TRANSCRIPTS}
assert len(BY_NAME) == len(TRANSCRIPTS), "transcript names must be unique"


# --- the runner ---------------------------------------------------------------------------

_REPLY_LINE = re.compile(rb"^(\d{3})([ -])(.*)$", re.S)
_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})(?: |$)")


@dataclass
class Reply:
    code: int
    enhanced: str                   # "" when the reply has none
    lines: list[str]                # text of each line, without code and enhanced code

    def as_json(self) -> dict:
        return {"code": self.code, "enhanced": self.enhanced, "lines": self.lines}

    def shown(self) -> list[str]:
        out = []
        for i, text in enumerate(self.lines):
            sep = " " if i == len(self.lines) - 1 else "-"
            enh = f"{self.enhanced} " if self.enhanced else ""
            out.append(f"{self.code}{sep}{enh}{text}".rstrip())
        return out


@dataclass
class Exchange:
    sent: str                       # "" for the greeting
    replies: list[Reply] = field(default_factory=list)
    event: str = ""                 # "timeout", "closed", "tls ok", "tls failed: ..." when one happened

    def as_json(self) -> dict:
        out = {"sent": self.sent, "replies": [r.as_json() for r in self.replies]}
        if self.event:
            out["event"] = self.event
        return out


@dataclass
class Result:
    name: str
    listener: str
    exchanges: list[Exchange]
    end: str                        # "closed" or "open" after a final 221/421; "" otherwise
    log: list[str]

    def as_json(self) -> dict:
        return {"name": self.name, "listener": self.listener,
                "exchanges": [e.as_json() for e in self.exchanges], "end": self.end, "log": self.log}

    @classmethod
    def from_json(cls, data: dict) -> "Result":
        exchanges = [Exchange(e["sent"], [Reply(r["code"], r["enhanced"], r["lines"]) for r in e["replies"]],
                              e.get("event", "")) for e in data["exchanges"]]
        return cls(data["name"], data["listener"], exchanges, data["end"], data["log"])


class _Conn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def line(self, deadline: float) -> bytes | None:
        """One CRLF-ended line, or None at EOF/timeout (``self.eof`` tells which)."""
        self.eof = False
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except (socket.timeout, TimeoutError):
                return None
            except (ConnectionError, ssl.SSLError, OSError):
                data = b""
            if not data:
                self.eof = True
                return None
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return line.rstrip(b"\r")

    def reply(self) -> Reply | str:
        """A whole (multi-line) reply, or "timeout"/"closed"/"garbage: ..."."""
        deadline = time.monotonic() + REPLY_TIMEOUT
        code, enhanced, lines = None, "", []
        while True:
            raw = self.line(deadline)
            if raw is None:
                return "closed" if self.eof else "timeout"
            m = _REPLY_LINE.match(raw)
            if not m:
                return f"garbage: {raw[:80]!r}"
            text = m.group(3).decode("utf-8", "backslashreplace")
            code = int(m.group(1))
            if not lines:
                em = _ENHANCED.match(text)
                enhanced = em.group(1) if em else ""
            if enhanced and text.startswith(enhanced):
                text = text[len(enhanced):].lstrip(" ")
            lines.append(text)
            if m.group(2) == b" ":
                return Reply(code, enhanced, lines)


def tls_client_context(cafile: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cafile)
    return ctx


def play(transcript: Transcript, port: int, *, cafile: str, hostname: str,
         log_source: Callable[[], str], tls_at_connect: bool = False) -> Result:
    """Play one transcript against 127.0.0.1:port; ``log_source`` returns the server's whole log
    so far (its new lines, cut at this session's disconnection, become ``Result.log``)."""
    log_start = len(log_source())
    ctx = tls_client_context(cafile)
    raw = socket.create_connection(("127.0.0.1", port), timeout=REPLY_TIMEOUT)
    sock: socket.socket = raw
    exchanges: list[Exchange] = []
    end = ""
    try:
        first = Exchange("")
        exchanges.append(first)
        stopped = False
        if tls_at_connect:
            try:
                sock = ctx.wrap_socket(raw, server_hostname=hostname)
            except (ssl.SSLError, OSError) as exc:
                first.event = f"tls failed: {type(exc).__name__}"
                stopped = True
        conn = _Conn(sock)
        if not stopped:
            stopped = _read_replies(conn, first, 1)
        for step in transcript.steps:
            if stopped:
                break
            ex = Exchange(step.shown())
            exchanges.append(ex)
            try:
                sock.sendall(step.send)
            except OSError:
                # The server closed first: a reset here or EOF at the next read, by timing.
                ex.event = "closed"
                stopped = True
                break
            stopped = _read_replies(conn, ex, step.replies)
            if step.tls and not stopped and ex.replies and ex.replies[-1].code == 220:
                # Whatever the server sent after its 220 in clear was already read and is lost,
                # as a real client's would be; the handshake follows on the raw socket.
                if conn.buf:
                    ex.event = f"clear text after 220: {conn.buf[:80]!r}; "
                try:
                    sock = ctx.wrap_socket(sock, server_hostname=hostname)
                    conn = _Conn(sock)
                    ex.event += "tls ok"
                except (ssl.SSLError, OSError) as exc:
                    ex.event += f"tls failed: {type(exc).__name__}"
                    stopped = True
        last = next((r for e in reversed(exchanges) for r in reversed(e.replies)), None)
        if last is not None and last.code in (221, 421) and not stopped:
            end = "closed" if _closed(conn) else "open"
        elif last is not None and last.code in (221, 421):
            end = "closed"
    finally:
        sock.close()
    return Result(transcript.name, transcript.listener, exchanges, end,
                  session_log(log_source, log_start))


def _read_replies(conn: _Conn, ex: Exchange, count: int) -> bool:
    """Read ``count`` replies into ``ex``; True when the session cannot go on."""
    for _ in range(count):
        got = conn.reply()
        if isinstance(got, str):
            ex.event = got
            return True
        ex.replies.append(got)
    return False


def _closed(conn: _Conn) -> bool:
    deadline = time.monotonic() + CLOSE_TIMEOUT
    while True:
        raw = conn.line(deadline)
        if raw is None:
            return conn.eof


# --- log lines ----------------------------------------------------------------------------

_LOG_LINE = re.compile(r"\b([0-9a-f]{16}) (smtp \S.*)$")


def session_log(log_source: Callable[[], str], start: int) -> list[str]:
    """The smtp lines logged since ``start``, up to the (first) session's disconnection, with
    the session id replaced by <id>; waits for that line a bounded time."""
    deadline = time.monotonic() + LOG_TIMEOUT
    while True:
        lines = []
        session = None
        for raw in log_source()[start:].splitlines():
            m = _LOG_LINE.search(raw)
            if not m:
                continue
            if session is None:
                if not m.group(2).startswith("smtp connected"):
                    continue
                session = m.group(1)
            if m.group(1) != session:
                continue
            lines.append(m.group(2))
            if m.group(2).startswith("smtp disconnected"):
                return lines
        if time.monotonic() > deadline:
            return lines + ["<no disconnected line>"]
        time.sleep(0.02)


def play_all(ports: dict[str, int], *, cafile: str, hostname: str,
             log_source: Callable[[], str]) -> dict[str, Result]:
    """Every transcript, in order, against the listeners ``ports`` (by listener name)."""
    return {tr.name: play(tr, ports[tr.listener], cafile=cafile, hostname=hostname,
                          log_source=log_source, tls_at_connect=tr.listener == "smtps")
            for tr in TRANSCRIPTS}
