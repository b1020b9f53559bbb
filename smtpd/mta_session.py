"""One outbound SMTP session: connect, one transaction for all recipients, quit.

Replies are read one command at a time (no pipelining, as OpenSMTPD's MTA).
Classification: 2xx ok, 5xx permanent, anything else temporary.  A failure
before the banner leaves ``connected`` False so the caller can try another host.
STARTTLS and AUTH come with the TLS issue (a seam: ``_after_ehlo``).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

MAX_LINE = 4096


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


async def read_reply(reader: asyncio.StreamReader, timeout: float) -> Reply:
    lines: list[str] = []
    code = None
    for _ in range(1000):
        raw = await asyncio.wait_for(reader.readline(), timeout)
        if not raw:
            raise ConnectionError("Connection closed by remote host")
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


async def send_message(host: str, port: int, *, helo: str, mail_from: str, rcpts: list[str],
                       message: bytes, timeout: float = 300, connect_timeout: float = 30,
                       size_hint: int | None = None, lmtp: bool = False) -> TransactionResult:
    relay = f"{host}:{port}"
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), connect_timeout)
    except (OSError, TimeoutError) as exc:
        text = "Connection timeout" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        return TransactionResult([RcptResult(r, "tempfail", text) for r in rcpts], relay, False)
    final: dict[str, RcptResult] = {}

    def fail_rest(status: str, text: str) -> None:
        for r in rcpts:
            final.setdefault(r, RcptResult(r, status, text))

    async def cmd(line: str) -> Reply:
        writer.write(line.encode("utf-8", "surrogateescape") + b"\r\n")
        await asyncio.wait_for(writer.drain(), timeout)
        return await read_reply(reader, timeout)

    connected = False
    try:
        banner = await read_reply(reader, timeout)
        connected = True
        if banner.status != "ok":
            fail_rest(banner.status, banner.text)
            return TransactionResult(list(final.values()), relay)
        ehlo = await cmd(f"{'LHLO' if lmtp else 'EHLO'} {helo}")
        extensions: dict[str, str] = {}
        if ehlo.status == "permfail" and not lmtp:
            ehlo = await cmd(f"HELO {helo}")
        elif ehlo.status == "ok":
            for line in ehlo.lines[1:]:
                key, _, value = line.partition(" ")
                extensions[key.upper()] = value
        if ehlo.status != "ok":
            fail_rest(ehlo.status, ehlo.text)
            return TransactionResult(list(final.values()), relay)
        mail = f"MAIL FROM:<{mail_from}>"
        if "SIZE" in extensions and size_hint:
            limit = extensions["SIZE"]
            if limit.isdigit() and int(limit) and size_hint > int(limit):
                fail_rest("permfail", "message too large for peer")
                return TransactionResult(list(final.values()), relay)
            mail += f" SIZE={size_hint}"
        reply = await cmd(mail)
        if reply.status != "ok":
            fail_rest(reply.status, reply.text)
            await cmd("RSET")
            return TransactionResult(list(final.values()), relay)
        accepted = []
        for r in rcpts:
            reply = await cmd(f"RCPT TO:<{r}>")
            if reply.status == "ok":
                accepted.append(r)
            else:
                final[r] = RcptResult(r, reply.status, reply.text)
        if not accepted:
            await cmd("RSET")
            return TransactionResult([final[r] for r in rcpts], relay)
        reply = await cmd("DATA")
        if reply.code != 354:
            fail_rest(reply.status if reply.status != "ok" else "tempfail", reply.text)
            return TransactionResult([final[r] for r in rcpts], relay)
        writer.write(encode_data(message))
        await asyncio.wait_for(writer.drain(), timeout)
        for r in (accepted if lmtp else accepted[:1]):
            reply = await read_reply(reader, timeout)
            targets = [r] if lmtp else accepted
            for t in targets:
                final[t] = RcptResult(t, reply.status, reply.text)
        try:
            await cmd("QUIT")
        except (OSError, TimeoutError, ProtocolError, ConnectionError):
            pass
        return TransactionResult([final[r] for r in rcpts], relay)
    except TimeoutError:
        fail_rest("tempfail", "Timeout")
    except ProtocolError as exc:
        fail_rest("tempfail", str(exc))
    except (OSError, ConnectionError) as exc:
        fail_rest("tempfail", getattr(exc, "strerror", None) or str(exc) or "Connection error")
    finally:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 5)
        except (OSError, TimeoutError, ConnectionError):
            pass
    return TransactionResult([final[r] for r in rcpts], relay, connected)
