"""The MTA side of pony: relaying queued envelopes over SMTP.

Envelopes arrive one by one from the queue; those of one message going to the
same relay (smarthost, or the recipient domain's MXs) are gathered for a moment
and sent in one transaction.  Connections to a relay are kept a moment after a
transaction and reused for the next message to it (as OpenSMTPD's MTA does, up to
MAX_MESSAGES_PER_SESSION); the SMTP dialogue itself is mta_session.  This module
picks the hosts and reports each recipient's result to the queue.  TLS, AUTH and route penalties come with later issues.

`mta max-deferred` (hold queues, docs/queue.md "Scheduler"): once no host of a
relay could be reached, new envelopes for it (never tried yet) are not tried but
answered "hold" (up to max-deferred per relay) for a while, as OpenSMTPD disables a failed route for
15 s x penalty² (capped at 1 h); the scheduler keeps them in that relay's hold queue
until a delivery to the relay succeeds (then they are released, due at once) or
until their own next retry time.  When the window ends, one held envelope is
released to probe the relay, and new envelopes are tried again; a failure opens a
longer window.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import time

from common.vis import COMMAND, log_text
from common import stat
from common.durations import duration_to_text
from common.envelope import Envelope
from common.ipc import PeerTimeout
from common.trace import FLAGS, SESSION, trace
from common.messages import (
    DeliveryResult, MessageContent, MessageOpen, MtaDnsLookup, MtaDnsReply, MtaHoldqRelease,
)
from smtpd.dsn_params import mail_params, rcpt_params
from smtpd.mta_session import (
    Connection, DsnRequest, RelayRefused, SessionOptions, TransactionResult, open_and_send,
    session_options,
)
from smtpd.relay_url import RelayUrlError, parse_relay_url

log = logging.getLogger("smtpd")

GATHER_DELAY = 0.02      # seconds to wait for the other envelopes of a message
MAX_SESSIONS = 100
MAX_MESSAGES_PER_SESSION = 100
IDLE_TIMEOUT = 2.0       # seconds an idle connection waits for another message
FAILING_TTL = 4 * 3600   # a failing relay is forgotten after this (OpenSMTPD's hoststat entries)
HOLD_WINDOW = 15         # seconds x failures² a failed relay holds new envelopes (route penalty)
HOLD_WINDOW_MAX = 3600

# OpenSMTPD's MTA objects that have work, counted as its mta.* stats: a relay (a
# smarthost, or a domain's MXs) per task's destination, its connector (relay x source:
# we have the one default source), the domains routed by MX, and the sources in use.
_RELAYS = stat.Population("mta.relay")
_CONNECTORS = stat.Population("mta.connector")
_DOMAINS = stat.Population("mta.domain")
_SOURCES = stat.Population("mta.source")


class FailingRelay:
    """A relay none of whose hosts could be reached: its hold queue, and the
    envelopes answered "hold" for it (at most `mta max-deferred`)."""
    __slots__ = ("holdq", "since", "until", "failures", "held")

    def __init__(self, holdq: int, since: float) -> None:
        self.holdq = holdq
        self.since = since           # last failure
        self.until = since           # new envelopes are held until then
        self.failures = 0            # failed tries in a row
        self.held: set[int] = set()

    def failed(self, now: float) -> None:
        self.failures += 1
        self.since = now
        self.until = now + min(HOLD_WINDOW * self.failures ** 2, HOLD_WINDOW_MAX)


class Mta:
    def __init__(self, pony) -> None:
        self.pony = pony
        self.config = pony.config
        self.pending: dict[tuple, list[Envelope]] = {}
        self.slots = asyncio.Semaphore(MAX_SESSIONS)
        self.idle: dict[tuple, list[Connection]] = {}
        self.outstanding: set[int] = set()      # evpids given to the MTA, not yet reported
        self.failing: dict[str, FailingRelay] = {}
        self.holdq_ids = 0

    def add(self, env: Envelope) -> None:
        action = self.config.actions.get(env.dispatcher)
        domain = env.dest.rpartition("@")[2].lower()
        relay_key = (action.host if action is not None and action.host else domain)
        if self._hold(env, relay_key):
            return
        key = (env.msgid, env.dispatcher, relay_key)
        if env.id not in self.outstanding:
            self.outstanding.add(env.id)
            stat.increment("mta.envelope")
        batch = self.pending.get(key)
        if batch is None:
            self.pending[key] = [env]
            self._task_started(relay_key, by_mx=not (action is not None and action.host))
            asyncio.get_running_loop().call_later(GATHER_DELAY, self._flush, key)
        else:
            batch.append(env)

    # -- hold queues (`mta max-deferred`) ------------------------------------------------

    def _hold(self, env: Envelope, relay_key: str) -> bool:
        """Answer "hold" for a new envelope whose relay is failing, if there is room.
        One already deferred (retry > 0) follows its retry schedule: it is tried, as
        it is after `smtpctl schedule`, and probes the relay."""
        relay = self.failing.get(relay_key)
        if relay is None:
            return False
        now = time.monotonic()
        if now - relay.since > FAILING_TTL:
            del self.failing[relay_key]
            return False
        if env.id in relay.held:          # its retry time came while held: try it (a probe)
            relay.held.discard(env.id)
            return False
        if env.retry or now >= relay.until or len(relay.held) >= self.pony.config.mta_max_deferred:
            return False
        relay.held.add(env.id)
        if FLAGS.mta:
            trace("mta: holding evp:%016x for failing relay %s (holdq %016x)", env.id, relay_key,
                  relay.holdq)
        self.pony.spawn(self.pony.mesh.send("queue", DeliveryResult(
            evpid=env.id, agent="mta", status="hold", holdq=relay.holdq)))
        return True

    def _relay_failed(self, relay_key: str) -> None:
        now = time.monotonic()
        for key in [k for k, r in self.failing.items() if now - r.since > FAILING_TTL]:
            del self.failing[key]        # not heard of for hours: their held envelopes were retried
        relay = self.failing.get(relay_key)
        if relay is None:
            self.holdq_ids += 1
            relay = self.failing[relay_key] = FailingRelay(self.holdq_ids, now)
        relay.failed(now)
        asyncio.get_running_loop().call_later(relay.until - now, self._window_over, relay_key, relay)

    def _window_over(self, relay_key: str, relay: FailingRelay) -> None:
        """Release one held envelope: it probes the relay (its failure opens a new window)."""
        if self.failing.get(relay_key) is relay and time.monotonic() >= relay.until and relay.held:
            if FLAGS.mta:
                trace("mta: relay %s: releasing one envelope of holdq %016x to probe it",
                      relay_key, relay.holdq)
            self.pony.spawn(self.pony.mesh.send("queue", MtaHoldqRelease(holdq=relay.holdq, n=1)))

    async def _relay_works(self, relay_key: str) -> None:
        relay = self.failing.pop(relay_key, None)
        if relay is not None:
            if FLAGS.mta:
                trace("mta: relay %s works again: releasing holdq %016x", relay_key, relay.holdq)
            await self.pony.mesh.send("queue", MtaHoldqRelease(holdq=relay.holdq, n=0))

    def _task_started(self, relay_key: str, by_mx: bool) -> None:
        stat.increment("mta.task")
        _RELAYS.add(relay_key)
        _CONNECTORS.add((relay_key, ""))
        _SOURCES.add("")
        if by_mx:
            _DOMAINS.add(relay_key)

    def _task_done(self, relay_key: str, by_mx: bool) -> None:
        stat.decrement("mta.task")
        _RELAYS.discard(relay_key)
        _CONNECTORS.discard((relay_key, ""))
        _SOURCES.discard("")
        if by_mx:
            _DOMAINS.discard(relay_key)

    def _flush(self, key: tuple) -> None:
        envelopes = self.pending.pop(key, [])
        if envelopes:
            self.pony.spawn(self._run(envelopes, key[2]))

    async def _run(self, envelopes: list[Envelope], relay_key: str) -> None:
        action = self.config.actions.get(envelopes[0].dispatcher)
        by_mx = not (action is not None and action.host)
        try:
            async with self.slots:
                stat.increment("mta.task.running")
                if FLAGS.mta:
                    trace("mta: task for relay %s: msgid %08x, %d envelope(s)", relay_key,
                          envelopes[0].msgid, len(envelopes))
                try:
                    await self._deliver(envelopes, relay_key)
                except Exception as exc:
                    log.exception("warn: mta: delivery of %08x failed", envelopes[0].msgid)
                    await self._report(envelopes, "tempfail", f"Internal error: {exc}", "-", 0)
                finally:
                    stat.decrement("mta.task.running")
        finally:
            self._task_done(relay_key, by_mx)

    async def _deliver(self, envelopes: list[Envelope], relay_key: str) -> None:
        first = envelopes[0]
        action = self.config.actions.get(first.dispatcher)
        if action is None or action.method != "relay":
            await self._report(envelopes, "tempfail",
                               f"action {first.dispatcher!r} is not a relay action in the configuration", "-", 0)
            return
        hosts, error, status, port = await self._hosts(action, first.dest.rpartition("@")[2])
        if not hosts:
            if status == "tempfail":
                self._relay_failed(relay_key)
            await self._report(envelopes, status, error, "-", 0)
            return
        try:
            options = await session_options(self.pony, action)    # TLS and AUTH (mta_session)
        except RelayRefused as exc:
            log.warning("warn: mta: action %s: %s", first.dispatcher, exc.text)
            await self._report(envelopes, exc.status, exc.text, "-", 0)
            return
        message = await self._message(first.msgid)
        if message is None:
            await self._report(envelopes, "tempfail", "Cannot read message from the queue", "-", 0)
            return
        helo = action.helo or self.config.hostname
        session_id = self.pony.ctx.new_id()
        SESSION.set(session_id)          # names this session in `trace mproc` lines
        if FLAGS.mta:
            trace("mta: %016x: relay hosts for %s: %s", session_id, first.dest.rpartition("@")[2],
                  ", ".join(f"{n} [{a}]" for n, a in hosts))
        last_error = "No MX found for destination"
        dsn = DsnRequest(mail=mail_params(first.dsn_ret, first.dsn_envid),
                         rcpts=[rcpt_params(e.dsn_notify, e.dsn_orcpt) for e in envelopes])
        for name, address in hosts:
            result = await self._send(session_id, name, address, port, helo, first.sender,
                                      [e.dest for e in envelopes], message, dsn, options)
            relay = f"{name} [{address}]:{port}" if name != address else f"[{address}]:{port}"
            if not result.connected:
                last_error = result.results[0].reply if result.results else "Connection failed"
                continue
            for env, res in zip(envelopes, result.results):
                await self._report([env], res.status, res.reply, relay, session_id, result.dsn)
            if any(res.status == "ok" for res in result.results):
                await self._relay_works(relay_key)
            return
        self._relay_failed(relay_key)
        await self._report(envelopes, "tempfail", last_error, "-", session_id)

    async def _send(self, session_id: int, name: str, address: str, port: int, helo: str,
                    sender: str, rcpts: list[str], message: bytes,
                    dsn: DsnRequest | None = None,
                    options: SessionOptions | None = None) -> TransactionResult:
        key = (address, port, helo, name, options)
        conn = self._take_idle(key)
        if conn is not None:
            result = await open_and_send(conn, sender, rcpts, message, len(message), dsn)
            if conn.usable or conn.txn_replies:
                self._release(key, conn)
                return result
            await conn.close(quit=False)   # closed by the peer while idle: nothing was sent
        options = options or SessionOptions()
        log.info("%016x mta connecting address=%s%s:%d host=%s", session_id, options.schema,
                 address, port, name)
        conn = Connection(address, port, helo=helo, session=session_id, options=options,
                          server_name=name)
        result = await open_and_send(conn, sender, rcpts, message, len(message), dsn)
        self._release(key, conn)
        return result

    def _take_idle(self, key: tuple) -> Connection | None:
        conns = self.idle.get(key)
        while conns:
            conn = conns.pop()
            if conn.reader is not None and not conn.reader.at_eof():
                return conn
            self.pony.spawn(conn.close(quit=False))
        return None

    def _release(self, key: tuple, conn: Connection) -> None:
        if not conn.usable or conn.transactions >= MAX_MESSAGES_PER_SESSION:
            self.pony.spawn(conn.close())
            return
        self.idle.setdefault(key, []).append(conn)
        asyncio.get_running_loop().call_later(IDLE_TIMEOUT, self._expire, key, conn, conn.transactions)

    def _expire(self, key: tuple, conn: Connection, transactions: int) -> None:
        conns = self.idle.get(key, [])
        if conn in conns and conn.transactions == transactions:     # not used since
            conns.remove(conn)
            if not conns:
                self.idle.pop(key, None)
            self.pony.spawn(conn.close())

    async def _hosts(self, action, domain: str):
        """[(name, address)], error text, failure status, port."""
        port = 25
        if action.host:
            try:
                url = parse_relay_url(action.host)
            except RelayUrlError as exc:
                return [], str(exc), "permfail", port
            port = url.port
            try:
                ipaddress.ip_address(url.host)
                return [(url.host, url.host)], "", "ok", port
            except ValueError:
                kind, name = "host", url.host
        else:
            kind, name = "mx", domain
        try:
            reply = await self.pony.mesh.request(
                "lka", MtaDnsLookup(reqid=self.pony.ctx.new_id(), kind=kind, name=name),
                (MtaDnsReply,), timeout=60)
        except PeerTimeout:
            return [], "Temporary failure in MX lookup", "tempfail", port
        if reply.status != "ok":
            return [], reply.error, reply.status, port
        return [(n, a) for _, n, a in sorted(reply.hosts)], "", "ok", port

    async def _message(self, msgid: int) -> bytes | None:
        try:
            reply = await self.pony.mesh.request(
                "queue", MessageOpen(reqid=self.pony.ctx.new_id(), msgid=msgid), (MessageContent,))
        except PeerTimeout:
            return None
        return reply.data if reply.ok else None

    async def _report(self, envelopes, status: str, detail: str, relay: str, session_id: int,
                      remote_dsn: bool = False) -> None:
        now = int(time.time())
        word = {"ok": "Ok", "tempfail": "TempFail", "permfail": "PermFail"}.get(status, "TempFail")
        for env in envelopes:
            if env.id in self.outstanding:
                self.outstanding.discard(env.id)
                stat.decrement("mta.envelope")
            log.info('%016x mta delivery evpid=%016x from=<%s> to=<%s> rcpt=<%s> source="%s" '
                     'relay="%s" delay=%s result="%s" stat="%s"', session_id, env.id, env.sender,
                     env.dest, env.rcpt if env.rcpt != env.dest else "-", "-", relay,
                     duration_to_text(now - env.ctime), word, log_text(detail, COMMAND))
            esc = _esc_code(detail)
            await self.pony.mesh.send("queue", DeliveryResult(
                evpid=env.id, agent="mta", status=status if status in ("ok", "permfail") else "tempfail",
                errorline=detail, esc_code=esc, dsn_notify=env.dsn_notify, remote_dsn=remote_dsn))


def _esc_code(reply: str) -> int:
    """The subject*10+detail of an enhanced status code in a reply, 0 if none."""
    parts = reply.split()
    if len(parts) > 1:
        esc = parts[1].split(".")
        if len(esc) == 3 and all(p.isdigit() for p in esc):
            return int(esc[1]) * 10 + int(esc[2])
    return 0
