"""External table programs (table_proc.c, smtpd-tables(7)): the line protocol of
OpenSMTPD 7.6 and later, version 0.1.

lka starts the program (after its privilege drop, so it runs as smtpd's user) with a
socket for its standard input and output, and tells it who we are::

    config|smtpd-version|<version>      config|protocol|0.1
    config|tablename|<name>             config|ready

The program answers ``register|<service>`` lines and ``register|ready``.  Then one
request at a time, each with a fresh 8-hex-digit id::

    table|0.1|<time>|<name>|lookup|<service>|<id>|<key>  -> lookup-result|<id>|found|<value>
    table|0.1|<time>|<name>|check|<service>|<id>|<key>   -> check-result|<id>|found
    table|0.1|<time>|<name>|fetch|<service>|<id>         -> fetch-result|<id>|found|<value>
    table|0.1|<time>|<name>|update|<id>                   -> update-result|<id>|ok

(or ``not-found``, or ``error[|message]``).  A program that exits at once on this
handshake is started again and spoken to in OpenSMTPD 6's imsg protocol
(proc_imsg.py), which Debian 12's opensmtpd-extras programs speak; the protocol that
worked is kept for its restarts.  Where OpenSMTPD exits on a program that
dies, hangs or answers out of protocol, we kill it, answer a temporary failure and
start it again on a later lookup (at most once per RESTART_DELAY): the daemon lives.

The program is either OpenSMTPD's ``table-<type>`` in its libexec directory
(``table NAME TYPE:ARG``, argv[0] the table's name, argv[1] ARG), ``proc:/path`` (a
program of ours, argv[0] the table's name) or ``proc-exec:"command args"``.
"""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time

from common.vis import log_text
from smtpd.table import proc_imsg
from smtpd.table.base import BlockingTable, TableUnavailable
from smtpd.table.services import SERVICES, wire_service

log = logging.getLogger("smtpd")

PROTOCOL_VERSION = "0.1"
SMTPD_VERSION = "7.8.0-pysmtpd"       # what OpenSMTPD's handshake sends: its version
HANDSHAKE_TIMEOUT = 10.0
REPLY_TIMEOUT = 10.0
RESTART_DELAY = 1.0
MAX_LINE = 65536


class ProtocolError(Exception):
    pass


EOF = "unexpected end of file"


class ProcTable(BlockingTable):
    backend = "proc"
    services = SERVICES             # K_ANY until the program registers its own
    kind = "dynamic"

    def __init__(self, name: str, type_: str, config: str | None, command=None) -> None:
        super().__init__(name, config)
        # command: (executable, argv) as parse_table resolved it
        self.executable, self.argv = command if command else (None, [name])
        self.type = type_
        self.process: asyncio.subprocess.Process | None = None
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.lock = asyncio.Lock()
        self.failed_at: float | None = None
        self.registered: frozenset[str] = frozenset()
        self.protocol: str | None = None       # "line" or "imsg", once a handshake worked

    # -- the program's life ----------------------------------------------------------------

    async def open(self) -> None:
        async with self.lock:
            try:
                await self._start()
            except TableUnavailable:
                pass            # logged; lookups answer 4xx and try again later

    async def close(self) -> None:
        async with self.lock:
            await self._stop()

    async def _start(self) -> None:
        if self.executable is None:
            self._fail(f"no program for table type {self.type}")
        for protocol in ((self.protocol,) if self.protocol else ("line", "imsg")):
            await self._spawn()
            try:
                await asyncio.wait_for(self._handshake() if protocol == "line" else self._open_imsg(),
                                       HANDSHAKE_TIMEOUT)
            except ProtocolError as exc:
                await self._stop()
                if protocol == "line" and str(exc) == EOF and self.protocol is None:
                    continue            # exited on our first words: try OpenSMTPD 6's protocol
                self._fail(f"handshake failed: {exc}")
            except (TimeoutError, OSError, ValueError) as exc:
                await self._stop()
                self._fail(f"handshake failed: {exc or 'no answer'}")
            self.protocol = protocol
            log.debug("debug: table-proc: %s started (pid %d, %s protocol), services %s", self.name,
                      self.process.pid, protocol, ",".join(sorted(self.registered)))
            return

    async def _spawn(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv, executable=self.executable, stdin=child.fileno(),
                stdout=child.fileno(), close_fds=True)
        except OSError as exc:
            parent.close()
            self._fail(f"could not run {self.executable}: {exc.strerror or exc}")
        finally:
            child.close()
        self.reader, self.writer = await asyncio.open_unix_connection(sock=parent, limit=MAX_LINE)

    async def _open_imsg(self) -> None:
        self.writer.write(proc_imsg.open_frame(self.name))
        await self.writer.drain()
        await self._read_imsg("open")
        self.registered = SERVICES          # the imsg protocol registers none: K_ANY

    async def _read_imsg(self, what: str) -> str:
        try:
            header = await self.reader.readexactly(proc_imsg.HEADER.size)
            data = await self.reader.readexactly(proc_imsg.body_length(header))
        except asyncio.IncompleteReadError:
            raise ProtocolError(EOF) from None
        except proc_imsg.ImsgError as exc:
            raise ProtocolError(str(exc)) from None
        return "" if what == "open" else proc_imsg.reply_text(what, data)

    async def _handshake(self) -> None:
        self.writer.write((f"config|smtpd-version|{SMTPD_VERSION}\n"
                           f"config|protocol|{PROTOCOL_VERSION}\n"
                           f"config|tablename|{self.name}\n"
                           "config|ready\n").encode())
        await self.writer.drain()
        services = set()
        for _ in range(64):
            line = await self._read_line()
            if not line.startswith("register|"):
                raise ProtocolError(f"invalid handshake reply: {line!r}")
            service = line[9:]
            if service == "ready":
                break
            if service not in SERVICES and service != "none":
                raise ProtocolError(f"unknown service {service!r}")
            services.add(service)
        else:
            raise ProtocolError("too many register lines")
        if not services:
            raise ProtocolError("no services registered")
        self.registered = frozenset(services)

    async def _read_line(self) -> str:
        raw = await self.reader.readline()
        if not raw.endswith(b"\n"):
            raise ProtocolError(EOF)
        return raw[:-1].decode("utf-8", "replace").rstrip("\r")

    async def _stop(self) -> None:
        process, self.process = self.process, None
        if self.writer is not None:
            self.writer.close()
            self.writer = self.reader = None
        if process is not None and process.returncode is None:
            try:
                process.kill()
            except ProcessLookupError:
                pass
            try:
                await asyncio.wait_for(process.wait(), 5)
            except TimeoutError:
                log.warning("warn: table-proc: %s: pid %d did not exit", self.name, process.pid)

    def _fail(self, why: str):
        self.failed_at = time.monotonic()
        log.warning("warn: table-proc: %s: %s", self.name, log_text(why))
        raise TableUnavailable(f"table {self.name}: {why}")

    # -- requests ---------------------------------------------------------------------------

    async def _request(self, what: str, service: str | None, key: str | None) -> str:
        """One request and the text of its reply after ``<what>-result|<id>|``."""
        if key is not None and ("\r" in key or "\n" in key or "\0" in key):
            raise TableUnavailable(f"table {self.name}: key with a line break or a NUL")
        async with self.lock:
            if self.process is None or self.process.returncode is not None:
                if self.process is not None:
                    await self._stop()
                    self._fail_soft("the table program exited")
                if self.failed_at is not None and time.monotonic() - self.failed_at < RESTART_DELAY:
                    raise TableUnavailable(f"table {self.name}: restarting")
                await self._start()
            try:
                if self.protocol == "imsg":
                    return await self._exchange_imsg(what, service, key)
                return await self._exchange_line(what, service, key)
            except (TimeoutError, OSError, ProtocolError, ValueError) as exc:
                await self._stop()
                self._fail(f"{what}: {exc or 'no answer in %ds' % REPLY_TIMEOUT}")

    async def _exchange_line(self, what: str, service: str | None, key: str | None) -> str:
        reqid = f"{secrets.randbits(32):08x}"
        now = time.time()
        head = f"table|{PROTOCOL_VERSION}|{int(now)}.{int(now % 1 * 1e6):06d}|{self.name}|{what}"
        line = f"{head}|{wire_service(service)}|{reqid}" if service else f"{head}|{reqid}"
        if key is not None:
            line += f"|{key}"
        self.writer.write(line.encode() + b"\n")
        await asyncio.wait_for(self.writer.drain(), REPLY_TIMEOUT)
        reply = await asyncio.wait_for(self._read_line(), REPLY_TIMEOUT)
        prefix = f"{what}-result|{reqid}|"
        if not reply.startswith(prefix):
            raise ProtocolError(f"reply out of protocol: {reply[:200]!r}")
        return reply[len(prefix):]

    async def _exchange_imsg(self, what: str, service: str | None, key: str | None) -> str:
        self.writer.write(proc_imsg.request_frame(what, wire_service(service) if service else None, key))
        await asyncio.wait_for(self.writer.drain(), REPLY_TIMEOUT)
        return await asyncio.wait_for(self._read_imsg(what), REPLY_TIMEOUT)

    def _fail_soft(self, why: str) -> None:
        self.failed_at = time.monotonic() - RESTART_DELAY      # restart now, once
        log.warning("warn: table-proc: %s: %s", self.name, why)

    async def _result(self, what: str, service: str | None, key: str | None) -> str | None:
        """The value of a found answer, None for not-found; error -> TableUnavailable."""
        reply = await self._request(what, service, key)
        if reply == "not-found":
            return None
        if reply == "error" or reply.startswith("error|"):
            message = reply[6:]
            log.warning("warn: table-proc: %s %s failed%s", self.name, what,
                        f": {log_text(message)}" if message else "")
            raise TableUnavailable(f"table {self.name}: {what} failed")
        if what == "check" and reply == "found":
            return ""
        if reply.startswith("found|") and len(reply) > 6 and what != "check":
            return reply[6:]
        async with self.lock:
            await self._stop()
        self._fail(f"{what}: malformed reply: {reply[:200]!r}")

    async def lookup(self, service: str, key: str) -> str | None:
        return await self._result("lookup", service, key.lower())

    async def check(self, service: str, key: str, regex: bool = False) -> bool:
        return await self._result("check", "regex" if regex else service, key.lower()) is not None

    async def fetch(self, service: str) -> str | None:
        return await self._result("fetch", service, None)

    async def update(self) -> str | None:
        reply = await self._request("update", None, None)
        if reply == "ok":
            log.info("info: Table \"%s\" successfully updated", self.name)
            return None
        if reply == "error" or reply.startswith("error|"):
            log.warning("warn: table-proc: %s update failed%s", self.name,
                        f": {log_text(reply[6:])}" if reply[6:] else "")
            return reply[6:] or "update failed"
        async with self.lock:
            await self._stop()
        self._fail(f"update: malformed reply: {reply[:200]!r}")
