"""The MTA side of pony: relaying queued envelopes over SMTP (OpenSMTPD's mta.c).

Envelopes arrive one by one from the queue; those of one message going to the
same relay (a smarthost, or the recipient domain's MXs) are gathered for a moment
into one task.  Tasks wait in their relay (smtpd/mta_routes.py: relays, hosts,
routes, connectors, limits and penalties); the relay opens sessions when its limits
allow, each on the route mta_routes picks (MX preference, fewest connections), and
every session carries task after task (up to `session-mail-max`) until the relay
has none left for `session-keepalive` seconds.  The SMTP dialogue itself is
mta_session's, and so are the action's TLS (opportunistic, required, smtps, verified
or not) and AUTH to a smarthost (credentials from lka): docs/mta.md.  `relay src`
binds the local address of the connections (a table's next address, asked of lka at
each drain) and `helo-src` names the HELO after it (asked of lka per connection).  A route whose first connection fails is disabled for a while; a
relay none of whose routes is usable fails its tasks (temporary failure).

`mta max-deferred` (hold queues, docs/queue.md "Scheduler"): once a relay failed,
new envelopes for it (never tried yet) are not tried but answered "hold" (up to
max-deferred per relay) for 15 s x failures² (capped at 1 h); the scheduler keeps
them in that relay's hold queue until a delivery to the relay succeeds (then they
are released, due at once) or until their own next retry time.  When the window
ends, one held envelope is released to probe the relay.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import deque

from common import stat
from common.durations import duration_to_text
from common.envelope import Envelope
from common.ipc import PeerTimeout
from common.messages import (
    CtlLinesReply, CtlMtaBlock, CtlReply, DeliveryResult, MessageContent,
    MessageOpen,
    MtaDnsLookup, MtaDnsReply, MtaHeloReply, MtaHoldqRelease, MtaLookupHelo, MtaLookupSource,
    MtaSourceReply,
)
from common.trace import FLAGS, SESSION, trace
from common.vis import COMMAND, VIS_DQ, log_text
from smtpd.dsn_params import mail_params, rcpt_params
from smtpd.mta_routes import (
    FAILURE_TEXT, ROUTE_DISABLED_NET, ROUTE_DISABLED_SMTP, Limits, Relay, RelayKey, Route, Routing,
    Source,
)
from smtpd.mta_session import (
    Connection, DsnRequest, ProtocolError, RelayRefused, failure_text, session_options,
)
from smtpd.relay_url import RelayUrlError, parse_relay_url
from smtpd.scheduler_ram import HOLDQ_MAX

log = logging.getLogger("smtpd")

GATHER_DELAY = 0.02      # seconds to wait for the other envelopes of a message
FAILING_TTL = 4 * 3600   # a failing relay is forgotten after this (OpenSMTPD's hoststat entries)
HOLD_WINDOW = 15         # seconds x failures² a failed relay holds new envelopes (route penalty)
HOLD_WINDOW_MAX = 3600
MESSAGE_ID_SCAN = 64 * 1024   # the header of a message is looked at up to this size

# OpenSMTPD's mta.* populations: relays with work, their connectors (relay x source:
# the one default source today), the domains routed by MX, the sources in use
_RELAYS = stat.Population("mta.relay")
_CONNECTORS = stat.Population("mta.connector")
_DOMAINS = stat.Population("mta.domain")
_SOURCES = stat.Population("mta.source")
_NETWORK_ERRORS = (TimeoutError, ProtocolError, OSError, ConnectionError)


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


class Task:
    """One message's envelopes for one relay, delivered in one transaction."""
    __slots__ = ("envelopes", "action", "probed")

    def __init__(self, envelopes: list[Envelope], action) -> None:
        self.envelopes = envelopes
        self.action = action
        self.probed = False      # the relay's disabled routes were tried once more for it


def limits_from_config(config) -> tuple[Limits, dict[str, Limits]]:
    """`mta limit` settings over mta_routes.Limits' defaults: the default limits, and
    those of each domain named (which start from the default ones)."""
    def build(*settings: dict[str, int]) -> Limits:
        # the keys set are the Limits' explicit ones: applied exactly as OpenSMTPD does
        return Limits(**{key.replace("-", "_"): value for s in settings for key, value in s.items()})
    base = config.mta_limits.get("", {})
    return build(base), {d: build(base, s) for d, s in config.mta_limits.items() if d}


def message_id(message: bytes) -> str:
    """The Message-ID header of a message, unfolded, or "" if it has none."""
    head = message[:MESSAGE_ID_SCAN]
    # the header ends at the first empty line (LF or CRLF ends); only the lines from
    # the first one naming message-id on can hold it (per message: kept off the body)
    ends = [i for i in (head.find(b"\n\n"), head.find(b"\n\r\n")) if i >= 0]
    if ends:
        head = head[:min(ends)]
    at = head.lower().find(b"message-id")
    if at < 0:
        return ""
    head = head[head.rfind(b"\n", 0, at) + 1:].replace(b"\r\n", b"\n")
    value = None
    for line in head.split(b"\n"):
        if value is not None and line[:1] in (b" ", b"\t"):
            value += line.strip()
            continue
        if value is not None:
            break
        name, sep, rest = line.partition(b":")
        if sep and name.strip().lower() == b"message-id":
            value = rest.strip()
    return value.decode("utf-8", "replace") if value else ""


class Mta:
    def __init__(self, pony) -> None:
        self.pony = pony
        self.routing = Routing()
        self.config = pony.config
        self.pending: dict[tuple, list[Envelope]] = {}
        self.outstanding: set[int] = set()      # evpids given to the MTA, not yet reported
        self.failing: dict[str, FailingRelay] = {}
        self.holdq_ids = 0
        self.gathering: dict[RelayKey, int] = {}        # tasks being gathered, per relay
        # the sessions of each relay waiting for a task: a new task wakes one of them
        self.idle: dict[RelayKey, deque[asyncio.Future]] = {}
        self.timers: dict[RelayKey, asyncio.TimerHandle] = {}
        self.enable_timer: asyncio.TimerHandle | None = None

    @property
    def config(self):
        return self._config

    @config.setter
    def config(self, config) -> None:
        """At start and at a reload: the limits apply to the relays made from now on."""
        self._config = config
        self.routing.default_limits, self.routing.domain_limits = limits_from_config(config)

    # -- envelopes in --------------------------------------------------------------------------

    def relay_key(self, action, domain: str) -> RelayKey:
        if action is None:
            return RelayKey(domain)
        common = dict(helo=action.helo, action=action.name, helo_src=action.helo_src or "",
                      **_source_fields(action.src))
        if action.host:
            try:
                url = parse_relay_url(action.host)
                return RelayKey(url.host.lower(), url.port, as_host=True, scheme=url.scheme, **common)
            except RelayUrlError:
                return RelayKey(action.host, 0, as_host=True, **common)
        backup = (action.backup_mx or self.config.hostname) if action.backup else None
        return RelayKey(domain, 0, backup=backup, **common)

    def add(self, env: Envelope) -> None:
        action = self.config.actions.get(env.dispatcher)
        if action is not None and action.host and not _parsable(action.host):
            # mta.c mta_handle_envelope: a temporary failure, so the mail waits for a fixed config
            log.warning("warn: Failed to parse smarthost %s", action.host)
            self.pony.spawn(self._report([env], "tempfail", "Cannot parse smarthost", "-", 0))
            return
        key = self.relay_key(action, env.dest.rpartition("@")[2].lower())
        if self._hold(env, key.text()) or self._hiwat(env, self._relay(key)):
            return
        if env.id not in self.outstanding:
            self.outstanding.add(env.id)
            stat.increment("mta.envelope")
        gather = (env.msgid, env.dispatcher, key)
        batch = self.pending.get(gather)
        if batch is None:
            self.pending[gather] = [env]
            self.gathering[key] = self.gathering.get(key, 0) + 1
            asyncio.get_running_loop().call_later(GATHER_DELAY, self._flush, gather)
        else:
            batch.append(env)

    def _relay(self, key: RelayKey) -> Relay:
        relay = self.routing.relays.get(key)
        if relay is None:
            relay = self.routing.relay(key)
            _RELAYS.add(key)
            _CONNECTORS.add((key, ""))
            _SOURCES.add("")
            if not key.as_host:
                _DOMAINS.add(key.domain)
        return relay

    def _flush(self, gather: tuple) -> None:
        key = gather[2]
        self.gathering[key] -= 1
        if not self.gathering[key]:
            del self.gathering[key]
        envelopes = self.pending.pop(gather, [])
        relay = self._relay(key)
        if not envelopes:
            self._maybe_forget(relay)
            return
        action = self.config.actions.get(envelopes[0].dispatcher)
        if action is None or action.method != "relay":
            self.pony.spawn(self._report(envelopes, "tempfail", f"action {envelopes[0].dispatcher!r} "
                                         "is not a relay action in the configuration", "-", 0))
            self._maybe_forget(relay)
            return
        relay.tasks.append(Task(envelopes, action))
        stat.increment("mta.task")
        self._wake_one(key)
        self._drain(relay)

    def _wake_one(self, key: RelayKey) -> None:
        """One idle session of the relay, the last one to have gone idle, looks for a
        task (not all of them: the others would only find none and wait again; and the
        sessions woken least go idle long enough to end at session-keepalive)."""
        waiters = self.idle.get(key)
        while waiters:
            waiter = waiters.pop()
            if not waiter.done():
                waiter.set_result(None)
                return

    # -- opening sessions (mta_drain, mta_connect) ---------------------------------------------

    def _drain(self, relay: Relay) -> None:
        if relay.mxs is None:
            if not relay.tasks:
                self._maybe_forget(relay)
            elif "MX" not in relay.waiting:
                relay.waiting.add("MX")
                self.pony.spawn(self._lookup(relay))
            return
        if relay.fail is not None:
            status, text = relay.fail
            self._fail_tasks(relay, status, text)
            return
        if relay.key.source_table:
            # mta_query_source: each drain asks lka for the table's next address
            if "source" not in relay.waiting:
                relay.waiting.add("source")
                self.pony.spawn(self._query_source(relay))
            return
        self._connect_from(relay, self.routing.source(relay.key.source))

    async def _query_source(self, relay: Relay) -> None:
        try:
            reply = await self.pony.mesh.request(
                "lka", MtaLookupSource(reqid=self.pony.ctx.new_id(), table=relay.key.source_table),
                (MtaSourceReply,), timeout=60)
            address = str(ipaddress.ip_address(reply.address)) if reply.status == "ok" else ""
        except (PeerTimeout, ValueError):
            address = ""
        relay.waiting.discard("source")
        if self.routing.relays.get(relay.key) is not relay:
            return
        if not address:
            # mta_on_source: no source, and no connection to carry the tasks
            log.warning("warn: Failed to get source address for %s", relay.key.text())
            if relay.nconn == 0 and relay.tasks:
                self._fail_tasks(relay, "tempfail", FAILURE_TEXT["error_source"])
            else:
                self._maybe_forget(relay)
            return
        self._connect_from(relay, self.routing.source(address))

    def _connect_from(self, relay: Relay, source: Source) -> None:
        """mta_connect: open the connections the relay needs now from ``source``."""
        for _ in range(1000):
            decision = self.routing.connect(relay, source, time.monotonic())
            if decision.route is not None:
                self.routing.opened(relay, decision.route, time.monotonic(), time.time())
                self.pony.spawn(self._session(relay, decision.route, decision.host_name))
                continue
            if decision.error is not None and relay.nconn == 0:
                if decision.error.startswith("error_route") and any(not t.probed for t in relay.tasks):
                    # pysmtpd: a task is not failed by routes another task disabled;
                    # they are tried once more for it (penalty kept), see docs/mta.md
                    for task in relay.tasks:
                        task.probed = True
                    relay.probe = True
                    continue
                log.info("smtp-out: No valid route for %s", relay.key.text())
                # pysmtpd: the last refusal or network error says more than mta.c's failstr
                text = relay.last_error if decision.error.startswith("error_route") and relay.last_error \
                    else FAILURE_TEXT[decision.error]
                self._fail_tasks(relay, "tempfail", text)
            elif decision.retry_at is not None:
                self._retry_at(relay, decision.retry_at)
            break
        self._maybe_forget(relay)

    def _retry_at(self, relay: Relay, when: float) -> None:
        old = self.timers.pop(relay.key, None)
        if old is not None:
            old.cancel()
        relay.timeout_at = when
        relay.waiting.add("connector")

        def fire() -> None:
            self.timers.pop(relay.key, None)
            relay.timeout_at = None
            relay.waiting.discard("connector")
            if self.routing.relays.get(relay.key) is relay:
                self._drain(relay)
        self.timers[relay.key] = asyncio.get_running_loop().call_later(
            max(0.0, when - time.monotonic()), fire)

    def _fail_tasks(self, relay: Relay, status: str, text: str) -> None:
        tasks = list(relay.tasks)
        relay.tasks.clear()
        if status == "tempfail":
            self._relay_failed(relay.key.text())
        for task in tasks:
            stat.decrement("mta.task")
            # mta_flush: relay= is the relay's domain (or smarthost) name
            self.pony.spawn(self._task_report(task, status, text, relay.key.domain, 0))
        relay.mxs = None             # looked up again for the next task
        relay.fail = None
        self._maybe_forget(relay)

    def _maybe_forget(self, relay: Relay) -> None:
        if self.gathering.get(relay.key):
            return
        if not relay.tasks:
            self._release_holdq(relay)
        if self.routing.forget(relay):
            timer = self.timers.pop(relay.key, None)
            if timer is not None:
                timer.cancel()
            self.idle.pop(relay.key, None)
            _RELAYS.discard(relay.key)
            _CONNECTORS.discard((relay.key, ""))
            _SOURCES.discard("")
            if not relay.key.as_host:
                _DOMAINS.discard(relay.key.domain)

    async def _lookup(self, relay: Relay) -> None:
        key = relay.key
        try:
            ipaddress.ip_address(key.domain)
            hosts, status, error = [(0, key.domain, key.domain)], "ok", ""
        except ValueError:
            try:
                reply = await self.pony.mesh.request(
                    "lka", MtaDnsLookup(reqid=self.pony.ctx.new_id(), kind="host" if key.as_host else "mx",
                                        name=key.domain), (MtaDnsReply,), timeout=60)
                hosts, status, error = reply.hosts, reply.status, reply.error
            except PeerTimeout:
                hosts, status, error = [], "tempfail", "Temporary failure in MX lookup"
        relay.waiting.discard("MX")
        if status == "ok" and hosts:
            self.routing.set_mxs(relay, hosts, key.backup)
            if FLAGS.mta:
                trace("mta: %s: hosts %s", key.text(), ", ".join(f"{p}:{n}[{a}]" for p, n, a in hosts))
        else:
            log.info("smtp-out: Failed to resolve MX for %s: %s", key.text(), error)
            relay.mxs = []
            relay.fail = (status if status != "ok" else "tempfail", error or "No MX found for domain")
        self._drain(relay)

    # -- a session: connect, greet, then task after task ---------------------------------------

    async def _session(self, relay: Relay, route: Route, mx_name: str) -> None:
        host = route.dst
        session_id = self.pony.ctx.new_id()
        SESSION.set(session_id)
        port = relay.key.port or self.config.mta_mx_port
        ready = False
        failed = True            # until the session ends cleanly
        penalize = True          # a failed first connection disables the route
        reason = ROUTE_DISABLED_NET
        stat.increment("mta.task.running")
        try:
            if host.ptrname is None:
                host.ptrname = await self._ptr(host.address) or ""     # "": no name, not asked again
            helo = await self._helo(relay, route)
            if helo is None:
                return                   # the route is disabled for a while, as a failed connection
            action = self.config.actions.get(relay.key.action)
            try:
                options = await session_options(self.pony, action)     # TLS and AUTH
            except RelayRefused as exc:
                log.warning("warn: mta: action %s: %s", relay.key.action, exc.text)
                penalize = False         # the configuration's fault, not the route's
                self._fail_tasks(relay, exc.status, exc.text)
                return
            log.info("%016x mta connecting address=%s%s:%d host=%s", session_id, options.schema,
                     _bracket(host.address), port, host.ptrname or host.address)
            conn = Connection(host.address, port, helo=helo, session=session_id, options=options,
                              server_name=mx_name, source_address=route.src.address or None)
            try:
                refused = await conn.open()
            except _NETWORK_ERRORS as exc:
                refused = failure_text(exc)
            if isinstance(refused, str) and conn.writer is None:
                relay.last_error = refused
                log.info("%016x mta error reason=Connection failed: %s", session_id,
                         log_text(refused, COMMAND))
                await conn.close(quit=False)
                return
            log.info("%016x mta connected", session_id)
            if refused is not None:          # banner, EHLO, TLS or AUTH refused
                relay.last_error = refused if isinstance(refused, str) else refused.text
                reason = ROUTE_DISABLED_SMTP
                log.info("%016x mta error reason=%s", session_id, log_text(relay.last_error, COMMAND))
                await conn.close(quit=False)
                return
            ready = True
            self.routing.ready(relay, route)
            if relay.tasks:
                self._drain(relay)       # a working route may take one more connection now
            messages = await self._serve(relay, conn, session_id, host.text())
            failed = conn.failed
            if conn.usable:
                await conn.close()
                log.info("%016x mta disconnected reason=quit messages=%d", session_id, messages)
            else:
                await conn.close(quit=False)
        except Exception:
            log.exception("warn: mta: session %016x failed", session_id)
        finally:
            stat.decrement("mta.task.running")
            delay = self.routing.closed(relay, route, ready, time.monotonic(), penalize, reason, failed)
            if delay:
                log.info("smtp-out: Disabling route %s for %ds", route.text(), delay)
                self._schedule_enable()
                for task in relay.tasks:     # this failure was their try
                    task.probed = True
            self._drain(relay)

    async def _serve(self, relay: Relay, conn: Connection, session_id: int, relay_text: str) -> int:
        """Send the relay's tasks on ``conn`` until none comes for `session-keepalive`
        seconds, the session's quota is reached, or the connection fails."""
        limits = relay.limits
        messages = 0
        while messages < limits.session_mail_max and conn.usable:
            if _closed_by_peer(conn):
                conn.usable = False     # the server hung up while we were idle: nothing lost
                break
            task = self.routing.take_task(relay, time.monotonic())
            if task is None:
                if not await self._wait_task(relay, limits.session_keepalive):
                    break
                continue
            stat.decrement("mta.task")
            self._task_taken(relay)
            if not await self._send_task(task, relay, conn, session_id, relay_text):
                break
            messages += 1
            if limits.session_transaction_delay:
                await asyncio.sleep(limits.session_transaction_delay)
        if relay.tasks:
            self._wake_one(relay.key)    # this session may have been woken for a task it leaves
        return messages

    async def _wait_task(self, relay: Relay, keepalive: float) -> bool:
        """Whether a task may be there for this session within ``keepalive`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + keepalive
        for _ in range(100_000):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            if relay.tasks:
                wait = self.routing.rate_wait(relay, time.monotonic())
                if wait <= 0:
                    return True
                if wait > remaining:      # over the rate for longer: let the connection go
                    self._retry_at(relay, time.monotonic() + wait)
                    return False
                await asyncio.sleep(wait)
                continue
            waiter = loop.create_future()
            waiters = self.idle.setdefault(relay.key, deque())
            waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                return False
            finally:
                if waiter in waiters:        # timed out (a woken one was taken out already)
                    waiters.remove(waiter)
        return False

    async def _send_task(self, task: Task, relay: Relay, conn: Connection, session_id: int,
                         relay_text: str) -> bool:
        """One transaction; False if the connection is no longer usable."""
        envelopes = task.envelopes
        first = envelopes[0]
        message = await self._message(first.msgid)
        if message is None:
            await self._task_report(task, "tempfail", "Cannot read message from the queue", "-", session_id)
            return True
        sender = first.sender if task.action.mail_from is None else task.action.mail_from
        dsn = DsnRequest(mail=mail_params(first.dsn_ret, first.dsn_envid),
                         rcpts=[rcpt_params(e.dsn_notify, e.dsn_orcpt) for e in envelopes])
        try:
            result = await conn.transaction(sender, [e.dest for e in envelopes], message,
                                            len(message), dsn)
        except _NETWORK_ERRORS as exc:
            conn.usable = False
            conn.failed = True
            text = failure_text(exc)
            log.info("%016x mta error reason=%s", session_id, log_text(text, COMMAND))
            await self._task_report(task, "tempfail", text, relay_text, session_id)
            return False
        mid, source = message_id(message), _local_address(conn)
        for env, res in zip(envelopes, result.results):
            await self._report([env], res.status, res.reply, relay_text, session_id, result.dsn, mid,
                               source)
        if not relay.key.as_host:
            self.routing.hoststat(relay.key.domain, result.results[0].reply, time.time())
        if any(res.status == "ok" for res in result.results):
            await self._relay_works(relay.key.text())
        return conn.usable

    def _schedule_enable(self) -> None:
        when = self.routing.next_enable()
        if when is None:
            return
        if self.enable_timer is not None:
            self.enable_timer.cancel()

        def fire() -> None:
            self.enable_timer = None
            for route in self.routing.enable_due(time.monotonic()):
                log.info("smtp-out: Enabling route %s", route.text())
            self._drain_all()
            self._schedule_enable()
        self.enable_timer = asyncio.get_running_loop().call_later(max(0.0, when - time.monotonic()), fire)

    def _drain_all(self) -> None:
        for relay in list(self.routing.relays.values()):
            if relay.tasks:
                self._drain(relay)

    async def _helo(self, relay: Relay, route: Route) -> str | None:
        """mta_session.c: the `helo-src` table's name for the route's source address, else
        the action's `helo`, else our hostname; None if the table has no name for it."""
        key = relay.key
        if not (key.helo_src and route.src.address):
            return key.helo or self.config.hostname
        try:
            reply = await self.pony.mesh.request(
                "lka", MtaLookupHelo(reqid=self.pony.ctx.new_id(), table=key.helo_src,
                                     address=route.src.address), (MtaHeloReply,), timeout=60)
            if reply.status == "ok" and reply.name:
                return reply.name
        except PeerTimeout:
            pass
        relay.last_error = "Failed to retrieve helo string"
        log.info("smtp-out: Error on route %s: %s", route.text(), relay.last_error)
        return None

    async def _ptr(self, address: str) -> str | None:
        try:
            reply = await self.pony.mesh.request(
                "lka", MtaDnsLookup(reqid=self.pony.ctx.new_id(), kind="ptr", name=address),
                (MtaDnsReply,), timeout=15)
        except PeerTimeout:
            return None
        return reply.hosts[0][1] if reply.status == "ok" and reply.hosts else None

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

    def _hiwat(self, env: Envelope, relay: Relay) -> bool:
        """mta.c: a relay with `task-hiwat` tasks waiting (being gathered included) holds
        new envelopes in a hold queue of its own, released by `task-release` when it is
        down to `task-lowat`."""
        waiting = relay.ntask + self.gathering.get(relay.key, 0)
        if not relay.onhold and waiting >= self.routing.task_marks(relay)[0]:
            log.info("smtp-out: hiwat reached on %s: holding envelopes", relay.key.text())
            relay.onhold = True
        if not relay.onhold:
            return False
        if not relay.holdqs or relay.holdqs[-1][1] >= HOLDQ_MAX:
            # a hold queue takes HOLDQ_MAX envelopes; one more would wait for its retry
            # time (OpenSMTPD does that): a burst of any size is held in several
            self.holdq_ids += 1
            relay.holdqs.append([self.holdq_ids, 0])
        relay.holdqs[-1][1] += 1
        self.pony.spawn(self.pony.mesh.send("queue", DeliveryResult(
            evpid=env.id, agent="mta", status="hold", holdq=relay.holdqs[-1][0])))
        return True

    def _task_taken(self, relay: Relay) -> None:
        if relay.ntask == self.routing.task_marks(relay)[1]:
            if relay.onhold:
                log.info("smtp-out: back to lowat on %s: releasing", relay.key.text())
                relay.onhold = False
            if relay.holdqs:
                oldest = relay.holdqs[0]
                n = relay.limits.task_release
                self.pony.spawn(self.pony.mesh.send("queue", MtaHoldqRelease(holdq=oldest[0], n=n)))
                oldest[1] -= n
                if oldest[1] <= 0:
                    relay.holdqs.popleft()
        elif relay.ntask == 0:
            self._release_holdq(relay)

    def _release_holdq(self, relay: Relay) -> None:
        if relay.holdqs:
            for holdq, _ in relay.holdqs:
                self.pony.spawn(self.pony.mesh.send("queue", MtaHoldqRelease(holdq=holdq, n=0)))
            relay.holdqs.clear()
            relay.onhold = False

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

    def withdraw(self, evpid: int) -> None:
        """`smtpctl remove|pause envelope` of an envelope in flight: taken out of its task
        if that task is not being sent, and given back to the scheduler (a temporary
        failure the scheduler turns into the removal, or keeps paused)."""
        env = None
        for gather, envelopes in self.pending.items():
            env = _pop_envelope(envelopes, evpid)
            if env is not None:
                if not envelopes:
                    del self.pending[gather]
                break
        else:
            for relay in self.routing.relays.values():
                for task in relay.tasks:
                    env = _pop_envelope(task.envelopes, evpid)
                    if env is not None:
                        if not task.envelopes:
                            relay.tasks.remove(task)
                            stat.decrement("mta.task")
                        break
                if env is not None:
                    break
        if env is None:
            return              # being sent, or not the MTA's: its attempt ends as it will
        if FLAGS.mta:
            trace("mta: evp:%016x withdrawn by the administrator", evpid)
        if env.id in self.outstanding:
            self.outstanding.discard(env.id)
            stat.decrement("mta.envelope")
        self.pony.spawn(self.pony.mesh.send("queue", DeliveryResult(
            evpid=evpid, agent="mta", status="tempfail", errorline="Withdrawn by administrator")))

    # -- smtpctl (show routes|hosts|relays|hoststats, mta paused, resume route, pause mta from) --

    def control(self, msg) -> CtlReply | CtlLinesReply:
        now, wall = time.monotonic(), time.time()
        routing = self.routing
        if isinstance(msg, CtlMtaBlock):
            (routing.block if msg.block else routing.unblock)(msg.source, msg.domain)
            if not msg.block:
                self._drain_all()
            return CtlReply(reqid=msg.reqid, ok=True)
        if msg.command == "resume route":
            for route in routing.resume(msg.id):
                log.info("smtp-out: Enabling route %s per admin request", route.text())
            self._drain_all()
            return CtlReply(reqid=msg.reqid, ok=True)
        routing.expire_hoststats(wall)
        lines = {"show routes": lambda: routing.show_routes(now),
                 "show hosts": lambda: routing.show_hosts(wall),
                 "show relays": lambda: routing.show_relays(now, wall),
                 "show hoststats": routing.show_hoststats,
                 "show mta paused": routing.show_blocks}.get(msg.command)
        if lines is None:
            return CtlReply(reqid=msg.reqid, ok=False, text=f"command not supported: {msg.command}")
        return CtlLinesReply(reqid=msg.reqid, lines=lines())

    # -- results -------------------------------------------------------------------------

    async def _message(self, msgid: int) -> bytes | None:
        try:
            reply = await self.pony.mesh.request(
                "queue", MessageOpen(reqid=self.pony.ctx.new_id(), msgid=msgid), (MessageContent,))
        except PeerTimeout:
            return None
        return reply.data if reply.ok else None

    async def _task_report(self, task: Task, status: str, detail: str, relay: str, session_id: int) -> None:
        await self._report(task.envelopes, status, detail, relay, session_id)

    async def _report(self, envelopes, status: str, detail: str, relay: str, session_id: int,
                      remote_dsn: bool = False, mid: str = "", source: str = "-") -> None:
        now = int(time.time())
        word = {"ok": "Ok", "tempfail": "TempFail", "permfail": "PermFail"}.get(status, "TempFail")
        # pysmtpd adds the message's Message-ID at the end of the line, when known
        extra = f' message-id="{log_text(mid, COMMAND | VIS_DQ)}"' if mid else ""
        for env in envelopes:
            if env.id in self.outstanding:
                self.outstanding.discard(env.id)
                stat.decrement("mta.envelope")
            log.info('%016x mta delivery evpid=%016x from=<%s> to=<%s> rcpt=<%s> source="%s" '
                     'relay="%s" delay=%s result="%s" stat="%s"%s', session_id, env.id, env.sender,
                     env.dest, env.rcpt if env.rcpt != env.dest else "-", source, relay,
                     duration_to_text(now - env.ctime), word, log_text(detail, COMMAND), extra)
            # the results of one loop turn leave in one frame (common/ipc.py batches them)
            await self.pony.mesh.send("queue", DeliveryResult(
                evpid=env.id, agent="mta", status=status if status in ("ok", "permfail") else "tempfail",
                errorline=detail, esc_code=_esc_code(detail), dsn_notify=env.dsn_notify,
                remote_dsn=remote_dsn))


def _source_fields(src: str | None) -> dict[str, str]:
    """`src "ADDR"` binds that address; `src <table>` is looked up by lka (a table's name
    is never an address: the parser's anonymous tables are named anon:LINE:N)."""
    if not src:
        return {}
    try:
        return {"source": str(ipaddress.ip_address(src))}
    except ValueError:
        return {"source_table": src}


def _parsable(url: str) -> bool:
    try:
        parse_relay_url(url)
    except RelayUrlError:
        return False
    return True


def _pop_envelope(envelopes: list[Envelope], evpid: int) -> Envelope | None:
    for i, env in enumerate(envelopes):
        if env.id == evpid:
            return envelopes.pop(i)
    return None


def _local_address(conn: Connection) -> str:
    """The connection's local address (the delivery line's source=), "-" if unknown."""
    writer = getattr(conn, "writer", None)
    sockname = writer.get_extra_info("sockname") if writer is not None else None
    return str(sockname[0]) if sockname else "-"


def _closed_by_peer(conn: Connection) -> bool:
    reader = getattr(conn, "reader", None)
    return reader is not None and reader.at_eof()


def _bracket(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def _esc_code(reply: str) -> int:
    """The subject*10+detail of an enhanced status code in a reply, 0 if none."""
    parts = reply.split()
    if len(parts) > 1:
        esc = parts[1].split(".")
        if len(esc) == 3 and all(p.isdigit() for p in esc):
            return int(esc[1]) * 10 + int(esc[2])
    return 0
