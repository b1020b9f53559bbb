"""smtpd/mta_session.py's driver over a real (UNIX socket) connection: the pump
between the socket and the client core, as the LMTP delivery method uses it."""
from __future__ import annotations

import asyncio

from smtpd.mta_session import Connection, open_and_send


async def _lmtp_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: list) -> None:
    """An LMTP server taking b@x and refusing c@x after DATA (one reply per recipient)."""
    writer.write(b"220 lmtp.test LMTP\r\n")
    for _ in range(20):
        line = await asyncio.wait_for(reader.readline(), 10)
        seen.append(line)
        verb = line[:4].upper()
        if verb == b"LHLO":
            writer.write(b"250-lmtp.test\r\n250 PIPELINING\r\n")
        elif verb == b"DATA":
            writer.write(b"354 go\r\n")
            seen.append(await asyncio.wait_for(reader.readuntil(b"\r\n.\r\n"), 10))
            writer.write(b"250 2.0.0 <b@x> delivered\r\n452 4.2.2 <c@x> over quota\r\n")
        elif verb == b"QUIT":
            writer.write(b"221 bye\r\n")
            await writer.drain()
            break
        else:
            writer.write(b"250 ok\r\n")
        await writer.drain()
    writer.close()


def test_lmtp_over_a_unix_socket(tmp_path):
    path = str(tmp_path / "lmtp.sock")
    seen: list[bytes] = []

    async def run():
        server = await asyncio.start_unix_server(lambda r, w: _lmtp_server(r, w, seen), path)
        async with server:
            conn = Connection(path, 0, helo="me.test", lmtp=True, timeout=10)
            result = await open_and_send(conn, "a@x", ["b@x", "c@x"], b"Subject: s\n\nbody\r.\n")
            await conn.close()
            return result

    result = asyncio.run(asyncio.wait_for(run(), 30))
    assert [(r.rcpt, r.status, r.reply) for r in result.results] == [
        ("b@x", "ok", "250 2.0.0 <b@x> delivered"), ("c@x", "tempfail", "452 4.2.2 <c@x> over quota")]
    assert seen[0] == b"LHLO me.test\r\n"
    assert b"Subject: s\r\n\r\nbody\r\n..\r\n.\r\n" in seen
    assert seen[-1] == b"QUIT\r\n"
