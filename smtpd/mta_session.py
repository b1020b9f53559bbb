"""Outbound SMTP sessions: connect and greet once, then one transaction per message
(all its recipients for that relay), several messages per connection as
OpenSMTPD's MTA does; QUIT when the session is no longer wanted.

Replies are read one command at a time (no pipelining, as OpenSMTPD's MTA).
Classification: 2xx ok, 5xx permanent, anything else temporary.  A failure
before the banner leaves ``connected`` False so the caller can try another host.
STARTTLS and AUTH come with the TLS issue (a seam: ``_after_ehlo``).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from common import stat
from common.trace import FLAGS, trace

MAX_LINE = 4096

# Open outbound connections, and the distinct remote hosts (and routes: from our
# one default source to a host) they go to: OpenSMTPD's mta.session, mta.host, mta.route.
_HOSTS = stat.Population("mta.host")
_ROUTES = stat.Population("mta.route")


@dataclass
class RcptResult:
    rcpt: str
    status: str          # "ok" | "tempfail" | "permfail"
    reply: str


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


@dataclass
class Reply:
    code: int
    lines: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return f"{self.code} " + " ".join(self.lines)

    @property
    def status(self) -> str:
        return "ok" if 200 <= self.code < 300 else "permfail" if 500 <= self.code < 600 else "tempfail"


class ProtocolError(Exception):
    pass


def encode_data(message: bytes) -> bytes:
    """LF (or CRLF) stored text -> DATA payload: CRLF endings, dot-stuffing, final dot."""
    lines = message.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = [b"." + l if l.startswith(b".") else l for l in lines]
    return b"\r\n".join(out) + (b"\r\n" if out else b"") + b".\r\n"


async def read_reply(reader: asyncio.StreamReader, timeout: float, session: int = 0) -> Reply:
    lines: list[str] = []
    code = None
    for _ in range(1000):
        raw = await asyncio.wait_for(reader.readline(), timeout)
        if not raw:
            if FLAGS.mta:
                trace("mta: %016x: end-of-file", session)
            raise ConnectionError("Connection closed by remote host")
        if FLAGS.io:
            trace("mta: %016x: IO_DATAIN %d bytes", session, len(raw))
        if FLAGS.mta:
            trace("mta: %016x: <<< %s", session, raw[:1000].decode("utf-8", "backslashreplace").rstrip("\r\n"))
        if len(raw) > MAX_LINE:
            raise ProtocolError("Remote host sent too much data")
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if len(line) < 3 or not line[:3].isdigit() or (len(line) > 3 and line[3] not in " -"):
            raise ProtocolError("Bad response")
        if code is not None and int(line[:3]) != code:
            raise ProtocolError("Bad response")
        code = int(line[:3])
        lines.append(line[4:])
        if len(line) == 3 or line[3] == " ":
            return Reply(code, lines)
    raise ProtocolError("Remote host sent too much data")


class Connection:
    """One SMTP (or LMTP) client connection, reusable while it stays in a sane state."""

    def __init__(self, host: str, port: int, *, helo: str, lmtp: bool = False,
                 timeout: float = 300, connect_timeout: float = 30, session: int = 0) -> None:
        self.host, self.port, self.helo, self.lmtp = host, port, helo, lmtp
        self.session = session       # the id in log and trace lines
        self.counted = False         # open, and counted in mta.session
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self.relay = f"{host}:{port}"
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.extensions: dict[str, str] = {}
        self.usable = False          # greeted, and the last transaction ended cleanly
        self.transactions = 0
        self.txn_replies = 0         # replies read in the current transaction

    def _write(self, data: bytes, shown: str) -> None:
        if FLAGS.mta:
            trace("mta: %016x: >>> %s", self.session, shown)
        if FLAGS.io:
            trace("mta: %016x: IO_DATAOUT %d bytes", self.session, len(data))
        self.writer.write(data)

    async def _cmd(self, line: str) -> Reply:
        self._write(line.encode("utf-8", "surrogateescape") + b"\r\n", line)
        await asyncio.wait_for(self.writer.drain(), self.timeout)
        reply = await read_reply(self.reader, self.timeout, self.session)
        self.txn_replies += 1
        return reply

    async def open(self) -> Reply | str | None:
        """Connect and greet.  None when ready; a Reply when the server refused us
        (banner or EHLO/HELO); a string when no connection could be made."""
        try:
            self.reader, self.writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), self.connect_timeout)
        except (OSError, TimeoutError) as exc:
            if FLAGS.mta:
                trace("mta: %016x: connection to %s failed: %s", self.session, self.relay, exc)
            return "Connection timeout" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        self.counted = True
        stat.increment("mta.session")
        _HOSTS.add(self.host)
        _ROUTES.add(("", self.host))
        if FLAGS.mta:
            trace("mta: %016x: connected to %s", self.session, self.relay)
        try:
            banner = await read_reply(self.reader, self.timeout, self.session)
        except (TimeoutError, ProtocolError, OSError, ConnectionError) as exc:
            return failure_text(exc)       # never greeted: the caller tries another host
        if banner.status != "ok":
            return banner
        ehlo = await self._cmd(f"{'LHLO' if self.lmtp else 'EHLO'} {self.helo}")
        if ehlo.status == "permfail" and not self.lmtp:
            ehlo = await self._cmd(f"HELO {self.helo}")
        elif ehlo.status == "ok":
            for line in ehlo.lines[1:]:
                key, _, value = line.partition(" ")
                self.extensions[key.upper()] = value
        if ehlo.status != "ok":
            return ehlo
        self.usable = True
        return None

    async def transaction(self, mail_from: str, rcpts: list[str], message: bytes,
                          size_hint: int | None = None,
                          dsn: DsnRequest | None = None) -> TransactionResult:
        """MAIL, RCPT for each recipient, DATA.  Network errors propagate (the caller
        decides whether the message was sent at all); replies are per recipient."""
        self.usable = False
        self.transactions += 1
        self.txn_replies = 0
        final: dict[str, RcptResult] = {}

        with_dsn = dsn is not None and "DSN" in self.extensions

        def fail_rest(status: str, text: str) -> TransactionResult:
            for r in rcpts:
                final.setdefault(r, RcptResult(r, status, text))
            return TransactionResult([final[r] for r in rcpts], self.relay)

        mail = f"MAIL FROM:<{mail_from}>"
        if "SIZE" in self.extensions and size_hint:
            limit = self.extensions["SIZE"]
            if limit.isdigit() and int(limit) and size_hint > int(limit):
                self.usable = True
                return fail_rest("permfail", "message too large for peer")
            mail += f" SIZE={size_hint}"
        if with_dsn and dsn.mail:
            mail += f" {dsn.mail}"
        reply = await self._cmd(mail)
        if reply.status != "ok":
            result = fail_rest(reply.status, reply.text)
            self.usable = (await self._cmd("RSET")).status == "ok"
            return result
        accepted = []
        for i, r in enumerate(rcpts):
            params = dsn.rcpts[i] if with_dsn and i < len(dsn.rcpts) else ""
            reply = await self._cmd(f"RCPT TO:<{r}>" + (f" {params}" if params else ""))
            if reply.status == "ok":
                accepted.append(r)
            else:
                final[r] = RcptResult(r, reply.status, reply.text)
        if not accepted:
            self.usable = (await self._cmd("RSET")).status == "ok"
            return TransactionResult([final[r] for r in rcpts], self.relay)
        reply = await self._cmd("DATA")
        if reply.code != 354:
            return fail_rest(reply.status if reply.status != "ok" else "tempfail", reply.text)
        payload = encode_data(message)
        self._write(payload, f"[...{len(payload)} bytes...]")
        await asyncio.wait_for(self.writer.drain(), self.timeout)
        for r in (accepted if self.lmtp else accepted[:1]):
            reply = await read_reply(self.reader, self.timeout, self.session)
            for t in ([r] if self.lmtp else accepted):
                final[t] = RcptResult(t, reply.status, reply.text)
        self.usable = True
        return TransactionResult([final[r] for r in rcpts], self.relay, dsn=with_dsn)

    async def close(self, quit: bool = True) -> None:
        if self.writer is None:
            return
        if quit and self.usable:
            try:
                await self._cmd("QUIT")
            except (OSError, TimeoutError, ProtocolError, ConnectionError):
                pass
        self.usable = False
        self.writer.close()
        self._uncount()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 5)
        except (OSError, TimeoutError, ConnectionError):
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
    results, with ``connected`` False when the host could not be reached at all."""
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
