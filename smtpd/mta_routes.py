"""The MTA's routing state: relays, hosts, sources, routes and connectors, and the
limits and penalties that decide when and where a new connection may be opened
(OpenSMTPD's mta.c: mta_connect, mta_find_route, mta_route_*, the show functions).

Pure: no I/O, no event loop.  Every method that depends on time takes ``now``
(monotonic seconds) and ``wall`` where a date is shown; the shuffling of MXs of
equal preference takes an injected ``random.Random``.  smtpd/mta.py drives it.

The objects, as in OpenSMTPD:

* a **relay** is where a task goes: a domain's MXs, or a smarthost (with its port
  and the action's options); it holds the tasks (one message's envelopes each);
* a **host** is one remote address, a **source** one local address (``""`` when the
  system picks it), a **route** a source-host pair: connection counts, errors and
  penalties are kept per route;
* a **connector** is a relay seen from one source: the flags that say why it cannot
  connect now (limits reached, errors on every route).

A route whose first connection fails is disabled for 15 s x penalty² (at most 1 h);
when the delay is over it is enabled again with one penalty less.  A relay all of
whose routes are disabled fails its tasks (temporary failure), as OpenSMTPD's
"Network error on destination MXs".

Beyond OpenSMTPD: ``max-msg-rate`` (``mta limit for domain D max-msg-rate 10/min``)
bounds how many messages are sent to a relay per period; tasks over the rate wait
in the relay (nothing bounces, nothing is deferred).  And the connection delays
left at their defaults are waived on a route that works (greeted, no failure since):
its connections open as the backlog needs them, one at a time, up to the connection
limits; a delay the configuration sets applies as in OpenSMTPD (docs/mta.md,
"Connection policy").
"""
from __future__ import annotations

import ipaddress
import random
from collections import deque
from dataclasses import dataclass, field, fields

from common.durations import duration_to_text

DELAY_ROUTE_BASE = 15       # seconds x penalty² a route is disabled after a failed connection
DELAY_ROUTE_MAX = 3600
DELAY_CHECK_LIMIT = 5       # seconds before trying again when a limit was reached
HOSTSTAT_EXPIRE = 4 * 3600  # show hoststats keeps a domain's last result this long

# route flags (OpenSMTPD's ROUTE_*)
ROUTE_NEW, ROUTE_RUNQ, ROUTE_KEEPALIVE = 0x01, 0x02, 0x04
ROUTE_DISABLED_NET, ROUTE_DISABLED_SMTP = 0x10, 0x20
ROUTE_DISABLED = 0xF0

# connector flags (OpenSMTPD's CONNECTOR_*), in `show relays` order
CONNECTOR_FLAGS = [
    ("new", "NEW"), ("wait", "WAIT"),
    ("error_family", "ERROR_FAMILY"), ("error_source", "ERROR_SOURCE"), ("error_mx", "ERROR_MX"),
    ("error_route_net", "ERROR_ROUTE_NET"), ("error_route_smtp", "ERROR_ROUTE_SMTP"),
    ("error_blocked", "ERROR_BLOCKED"),
    ("limit_host", "LIMIT_HOST"), ("limit_route", "LIMIT_ROUTE"), ("limit_source", "LIMIT_SOURCE"),
    ("limit_relay", "LIMIT_RELAY"), ("limit_conn", "LIMIT_CONN"), ("limit_domain", "LIMIT_DOMAIN"),
]
# in the order mta.c picks the failure text when several connectors' errors are set
ERRORS = ("error_route_smtp", "error_route_net", "error_mx", "error_family", "error_blocked",
          "error_source")
LIMITS = ("limit_host", "limit_route", "limit_source", "limit_relay", "limit_conn", "limit_domain")

# why a relay cannot deliver: mta.c's failstr for each connector error
FAILURE_TEXT = {
    "error_route_smtp": "Destination seem to reject all mails",
    "error_route_net": "Network error on destination MXs",
    "error_mx": "No MX found for destination",
    "error_family": "Address family mismatch on destination MXs",
    "error_blocked": "All routes to destination blocked",
    "error_source": "Could not retrieve source address",
}


@dataclass(init=False)
class Limits:
    """`mta limit [for domain D] KEY VALUE ...`: OpenSMTPD's keys and defaults (limit.c),
    plus ``max-msg-rate`` (messages, period in seconds; 0: no bound).

    ``explicit`` names the fields that were given (``Limits(conn_delay_route=5)``, or
    set in the configuration): the connection delays of a key left at its default are
    waived on a route that works (`Routing.connect`, docs/mta.md "Connection
    policy"); a key the administrator set applies exactly as in OpenSMTPD."""
    max_conn_per_host: int = 10
    max_conn_per_route: int = 5
    max_conn_per_source: int = 100
    max_conn_per_connector: int = 20
    max_conn_per_relay: int = 100
    max_conn_per_domain: int = 100
    conn_delay_host: int = 0
    conn_delay_route: int = 5
    conn_delay_source: int = 0
    conn_delay_connector: int = 0
    conn_delay_relay: int = 2
    conn_delay_domain: int = 0
    reconn_delay_route: int = 3
    session_mail_max: int = 100
    session_transaction_delay: int = 0
    session_keepalive: int = 10
    max_failures_per_session: int = 25
    task_hiwat: int = 50
    task_lowat: int = 30
    task_release: int = 10
    family: int = 0                    # 0, 4 (inet4) or 6 (inet6)
    max_msg_rate: int = 0
    max_msg_period: int = 60
    explicit: frozenset[str] = frozenset()

    def __init__(self, **settings: int) -> None:
        for f in fields(self):
            setattr(self, f.name, f.default)
        for name, value in settings.items():
            if name not in _LIMIT_FIELDS:
                raise TypeError(f"Limits has no field {name!r}")
            setattr(self, name, value)
        self.explicit = frozenset(settings)

    @staticmethod
    def keys() -> list[str]:
        """The configuration keys (``max-conn-per-host``...), max-msg-rate and family aside."""
        return [f.name.replace("_", "-") for f in fields(Limits)
                if f.name not in ("family", "max_msg_rate", "max_msg_period", "explicit")]

    def delay(self, name: str, waived: bool) -> int:
        """The delay ``name`` (``conn_delay_route``...): 0 when ``waived`` (the route
        works) unless the administrator set it."""
        return 0 if waived and name not in self.explicit else getattr(self, name)


_LIMIT_FIELDS = frozenset(f.name for f in fields(Limits)) - {"explicit"}


@dataclass(eq=False)
class Host:
    address: str
    ptrname: str | None = None
    nconn: int = 0
    lastconn: float = 0
    lastconn_wall: float = 0
    refcount: int = 0

    def text(self) -> str:
        return f"{self.address} ({self.ptrname})" if self.ptrname else self.address

    @property
    def family(self) -> int:
        return ipaddress.ip_address(self.address).version


@dataclass(eq=False)
class Source:
    address: str = ""                  # "" : the system picks the local address

    nconn: int = 0
    lastconn: float = 0

    def text(self) -> str:
        return self.address or "[]"


@dataclass(eq=False)
class Route:
    id: int
    src: Source
    dst: Host
    flags: int = ROUTE_NEW
    nconn: int = 0
    nready: int = 0                    # its sessions that were greeted (nconn - nready: opening)
    proven: bool = False               # greeted once, and no session on it failed since
    nerror: int = 0
    penalty: int = 0
    lastconn: float = 0
    lastdisc: float = 0
    enable_at: float | None = None     # when a disabled route comes back

    def text(self) -> str:
        return f"{self.src.text()} <-> {self.dst.text()}"


@dataclass(eq=False)
class Domain:
    name: str
    nconn: int = 0
    lastconn: float = 0


@dataclass(eq=False)
class Connector:
    source: Source
    flags: set[str] = field(default_factory=lambda: {"new"})
    nconn: int = 0
    lastconn: float = 0
    lastconn_wall: float = 0
    retry_at: float | None = None


@dataclass(frozen=True)
class RelayKey:
    """What makes two tasks share a relay (mta.c's mta_relay_cmp, in short)."""
    domain: str                        # the recipient domain, or the smarthost's name
    port: int = 0                      # 0: the default (25, or `mta mx-port`)
    as_host: bool = False              # a smarthost: its A/AAAA, not its MXs
    scheme: str = "smtp"
    backup: str | None = None          # `relay backup [mx NAME]`: our own MX name
    helo: str | None = None
    source: str = ""                   # `src "ADDR"`: the one local address to bind
    action: str = ""                   # the relay action (its TLS and AUTH options)
    source_table: str = ""             # `src <table>`: lka gives the next source at each drain
    helo_src: str = ""                 # `helo-src <table>`: source address -> HELO name

    def text(self) -> str:
        parts = [f"[relay:{self.domain}"]
        if self.port:
            parts.append(f"port={self.port}")
        parts.append(self.scheme)
        if self.as_host:
            parts.append("mx")
        if self.backup:
            parts.append(f"backup={self.backup}")
        if self.helo:
            parts.append(f"heloname={self.helo}")
        if self.source or self.source_table:
            parts.append(f"sourcetable={self.source or self.source_table}")
        if self.helo_src:
            parts.append(f"helotable={self.helo_src}")
        return ",".join(parts) + "]"


@dataclass(eq=False)
class Relay:
    key: RelayKey
    domain: Domain
    limits: Limits
    tasks: deque = field(default_factory=deque)
    mxs: list[tuple[int, Host]] | None = None    # None: not looked up yet
    backup_pref: int | None = None
    fail: tuple[str, str] | None = None          # (status, text) of a failed MX lookup
    nconn: int = 0
    nconn_ready: int = 0
    lastconn: float = 0
    lastconn_wall: float = 0
    refcount: int = 0
    waiting: set[str] = field(default_factory=set)   # "MX", "connector", "limits", "source"
    timeout_at: float | None = None
    connectors: dict[str, Connector] = field(default_factory=dict)
    sent: deque = field(default_factory=deque)       # send times, for max-msg-rate
    probe: bool = False      # a task not tried yet found every route disabled: try them once more
    last_error: str = ""     # the last session's connection error or refusal
    onhold: bool = False     # task-hiwat reached: new envelopes are held until task-lowat
    holdq: int = 0           # the scheduler's hold queue of those envelopes (0: none yet)

    @property
    def ntask(self) -> int:
        return len(self.tasks)


@dataclass
class Decision:
    """What mta_connect decided for a connector: open ``route`` (to ``host_name``), or
    try again at ``retry_at``, or give up with ``error`` (a connector error flag)."""
    route: Route | None = None
    host_name: str = ""
    retry_at: float | None = None
    error: str | None = None


class Routing:
    def __init__(self, default_limits: Limits | None = None,
                 domain_limits: dict[str, Limits] | None = None,
                 rng: random.Random | None = None) -> None:
        self.default_limits = default_limits or Limits()
        self.domain_limits = domain_limits or {}
        self.rng = rng or random.Random()
        self.relays: dict[RelayKey, Relay] = {}
        self.hosts: dict[str, Host] = {}
        self.sources: dict[str, Source] = {}
        self.domains: dict[str, Domain] = {}
        self.routes: dict[tuple[str, str], Route] = {}
        self.blocks: set[tuple[str, str]] = set()    # (source, domain or "")
        self.hoststats: dict[str, tuple[float, str]] = {}   # domain -> (wall time, last result)
        self.route_ids = 0
        self.mx_names: dict[tuple[str, RelayKey], str] = {}   # the MX name of a relay's host

    # -- objects -----------------------------------------------------------------------------

    def relay(self, key: RelayKey) -> Relay:
        relay = self.relays.get(key)
        if relay is None:
            name = key.domain.lower()
            domain = self.domains.setdefault(name, Domain(name))
            limits = self.domain_limits.get(name, self.default_limits)
            relay = self.relays[key] = Relay(key, domain, limits)
        return relay

    def host(self, address: str) -> Host:
        return self.hosts.setdefault(address, Host(address))

    def source(self, address: str = "") -> Source:
        return self.sources.setdefault(address, Source(address))

    def route(self, src: Source, dst: Host) -> Route:
        key = (src.address, dst.address)
        route = self.routes.get(key)
        if route is None:
            self.route_ids += 1
            route = self.routes[key] = Route(self.route_ids, src, dst)
        return route

    def connector(self, relay: Relay, source: Source) -> Connector:
        return relay.connectors.setdefault(source.address, Connector(source))

    def set_mxs(self, relay: Relay, mxs: list[tuple[int, str, str]], backup_name: str | None = None) -> None:
        """The lookup's (preference, name, address) list: sorted by preference, equal
        preferences shuffled (load is spread among them); with ``backup_name`` (we are a
        backup MX) only the MXs preferred to that name are kept."""
        by_pref: dict[int, list[tuple[str, str]]] = {}
        for pref, name, address in mxs:
            by_pref.setdefault(pref, []).append((name, address))
        ordered: list[tuple[int, Host]] = []
        for pref in sorted(by_pref):
            group = by_pref[pref]
            self.rng.shuffle(group)
            for name, address in group:
                host = self.host(address)
                ordered.append((pref, host))
                self.mx_names[address, relay.key] = name
        relay.backup_pref = None
        if backup_name:
            prefs = [p for p, n, _ in mxs if n.rstrip(".").lower() == backup_name.rstrip(".").lower()]
            relay.backup_pref = min(prefs) if prefs else None
        relay.mxs = ordered
        relay.fail = None
        relay.waiting.discard("MX")

    def mx_name(self, relay: Relay, host: Host) -> str:
        return self.mx_names.get((host.address, relay.key), host.address)

    # -- deciding to connect (mta_connect, mta_find_route) ------------------------------------

    def is_blocked(self, source: Source, domain: str) -> bool:
        """`pause mta from ADDR for DOMAIN` (mta_is_blocked): only the connections from
        that very source address stop; a relay without `src` (the system picks its local
        address) is not stopped, as in OpenSMTPD."""
        return (source.address, domain) in self.blocks

    def wants_connection(self, relay: Relay) -> bool:
        """Not more connections than needed (mta_connect's first test)."""
        if relay.ntask == 0:
            return False
        return not (relay.nconn_ready >= relay.ntask or
                    (relay.nconn > 2 and relay.nconn >= relay.ntask / 2))

    def connect(self, relay: Relay, source: Source, now: float) -> Decision:
        """May ``relay`` open a connection from ``source`` now, and on which route?"""
        c = self.connector(relay, source)
        c.flags.discard("wait")
        if relay.probe and relay.mxs is not None:
            relay.probe = False
            self._probe(relay, source)
        if self.is_blocked(source, relay.domain.name):
            c.flags.add("error_blocked")
        else:
            c.flags.discard("error_blocked")
        errors = c.flags.intersection(ERRORS)
        if errors:
            return Decision(error=min(errors, key=lambda e: ERRORS.index(e)))
        c.flags.difference_update(LIMITS)
        if not self.wants_connection(relay):
            return Decision()
        rate_wait = self.rate_wait(relay, now)
        if rate_wait > 0:
            # over max-msg-rate: a connection now would carry nothing (and, on a route
            # whose delays are waived, be replaced at once by another)
            c.flags.add("wait")
            c.retry_at = now + rate_wait
            return Decision(retry_at=c.retry_at)
        lim = relay.limits
        nextconn = now
        waived = self.works(relay, source)
        for obj, delay_name, limit, flag in (
                (relay.domain, "conn_delay_domain", lim.max_conn_per_domain, "limit_domain"),
                (source, "conn_delay_source", lim.max_conn_per_source, "limit_source"),
                (c, "conn_delay_connector", lim.max_conn_per_connector, "limit_conn"),
                (relay, "conn_delay_relay", lim.max_conn_per_relay, "limit_relay")):
            delay = lim.delay(delay_name, waived)
            if obj.lastconn and obj.lastconn + delay > nextconn:
                nextconn = obj.lastconn + delay
            if obj.nconn >= limit:
                c.flags.add(flag)
        route = host_name = None
        if not c.flags.intersection(LIMITS) and nextconn <= now:
            route, host_name, nextconn = self._find_route(relay, c, now, nextconn)
        if route is None:
            errors = c.flags.intersection(ERRORS)
            if errors:
                return Decision(error=min(errors, key=lambda e: ERRORS.index(e)))
            if c.flags.intersection(LIMITS):
                nextconn = now + DELAY_CHECK_LIMIT
            c.flags.add("wait")
            c.retry_at = nextconn
            return Decision(retry_at=nextconn)
        c.flags.discard("new")
        return Decision(route=route, host_name=host_name)

    def works(self, relay: Relay, source: Source) -> bool:
        """Whether one of the relay's routes from ``source`` works: greeted, and no
        session on it failed since.  Its default connection delays are then waived
        (pysmtpd's connection policy, docs/mta.md)."""
        for _, host in relay.mxs or ():
            route = self.routes.get((source.address, host.address))
            if route is not None and route.proven:
                return True
        return False

    def _find_route(self, relay: Relay, c: Connector, now: float, nextconn: float):
        lim = relay.limits
        best = best_name = None
        level = None
        tm = 0.0
        seen = 0
        limit_host = limit_route = family_mismatch = suspended = False
        suspended_flags = 0
        for pref, host in relay.mxs or []:
            if level is None or pref > level:
                if best is not None or limit_host or limit_route or tm:
                    break
                if relay.backup_pref is not None and pref >= relay.backup_pref:
                    break
                level = pref
            seen += 1
            if lim.family and lim.family != host.family:
                family_mismatch = True
                continue
            if host.nconn >= lim.max_conn_per_host:
                limit_host = True
                continue
            if host.lastconn and host.lastconn + lim.conn_delay_host > now:
                tm = min(tm or host.lastconn + lim.conn_delay_host, host.lastconn + lim.conn_delay_host)
                continue
            route = self.route(c.source, host)
            if route.flags & ROUTE_DISABLED:
                suspended = True
                suspended_flags |= route.flags & ROUTE_DISABLED
                continue
            if route.nconn and route.flags & ROUTE_NEW:
                limit_route = True          # its first connection is not through yet
                continue
            if route.nconn >= lim.max_conn_per_route:
                limit_route = True
                continue
            waived = route.proven
            if waived and route.nconn > route.nready and not \
                    lim.explicit.intersection(("conn_delay_route", "reconn_delay_route")):
                limit_route = True          # slow start: one connection opening at a time
                continue
            for since, delay in ((route.lastconn, lim.delay("conn_delay_route", waived)),
                                 (route.lastdisc, lim.delay("reconn_delay_route", waived))):
                if since and since + delay > now:
                    tm = min(tm or since + delay, since + delay)
                    break
            else:
                if best is None or route.nconn < best.nconn:
                    best, best_name = route, self.mx_name(relay, host)
        if best is not None:
            return best, best_name, nextconn
        if seen == 0:
            c.flags.add("error_mx")
        elif limit_route:
            c.flags.add("limit_route")
        elif limit_host:
            c.flags.add("limit_host")
        elif tm:
            nextconn = max(nextconn, tm)
        elif family_mismatch:
            c.flags.add("error_family")
        elif suspended:
            if suspended_flags & ROUTE_DISABLED_NET:
                c.flags.add("error_route_net")
            if suspended_flags & ROUTE_DISABLED_SMTP:
                c.flags.add("error_route_smtp")
        return None, None, nextconn

    # -- sessions ------------------------------------------------------------------------------

    def opened(self, relay: Relay, route: Route, now: float, wall: float) -> None:
        """A session starts on ``route`` (mta_connect's counters)."""
        c = self.connector(relay, route.src)
        for obj in (c, relay, relay.domain, route, route.src, route.dst):
            obj.nconn += 1
            obj.lastconn = now
        c.lastconn_wall = relay.lastconn_wall = route.dst.lastconn_wall = wall

    def ready(self, relay: Relay, route: Route) -> None:
        """The session was greeted (mta_route_ok): the route is valid, and the
        connector's route errors are forgotten."""
        relay.nconn_ready += 1
        route.nready += 1
        route.proven = True
        route.flags |= ROUTE_KEEPALIVE
        if route.flags & ROUTE_NEW:
            route.flags &= ~ROUTE_NEW
            route.nerror = 0
            self.connector(relay, route.src).flags.difference_update(
                ("error_route_net", "error_route_smtp"))

    def closed(self, relay: Relay, route: Route, was_ready: bool, now: float,
               penalize: bool = True, reason: int = ROUTE_DISABLED_NET,
               failed: bool | None = None) -> int | None:
        """A session ended (mta_route_collect).  A route whose first connection failed is
        disabled: the delay in seconds is returned (the caller logs it).  ``failed``: the
        session ended on an error (default: it was never greeted); the route then no
        longer counts as working until a session on it is greeted again."""
        c = self.connector(relay, route.src)
        for obj in (c, relay, relay.domain, route, route.src, route.dst):
            obj.nconn -= 1
        if was_ready:
            relay.nconn_ready -= 1
            route.nready -= 1
        if (not was_ready) if failed is None else failed:
            route.proven = False
        route.lastdisc = now
        if route.nconn == 0:
            route.flags &= ~ROUTE_KEEPALIVE
        if route.flags & ROUTE_NEW and not was_ready and penalize:
            route.nerror += 1
            return self.disable(route, 1, reason, now)
        return None

    def disable(self, route: Route, penalty: int, reason: int, now: float) -> int:
        route.penalty += penalty
        route.proven = False
        delay = min(DELAY_ROUTE_BASE * route.penalty * route.penalty, DELAY_ROUTE_MAX)
        route.flags |= reason & ROUTE_DISABLED
        route.flags |= ROUTE_RUNQ
        route.enable_at = now + delay
        return delay

    def enable_due(self, now: float) -> list[Route]:
        """Routes whose delay is over: enabled again, one penalty less (mta_route_enable).
        Returns those that were disabled (the caller logs them)."""
        out = []
        for route in self.routes.values():
            if route.enable_at is not None and route.enable_at <= now:
                route.enable_at = None
                route.flags &= ~ROUTE_RUNQ
                if route.flags & ROUTE_DISABLED:
                    route.flags &= ~ROUTE_DISABLED
                    route.flags |= ROUTE_NEW
                    route.nerror = 0
                    out.append(route)
                if route.penalty:
                    route.penalty -= 1
        if out:
            self._clear_route_errors()
        return out

    def resume(self, route_id: int = 0) -> list[Route]:
        """`smtpctl resume route [ID]`: enable a disabled route now, penalties cleared."""
        out = []
        for route in self.routes.values():
            if route_id and route.id != route_id:
                continue
            if route.flags & ROUTE_DISABLED:
                route.flags &= ~(ROUTE_DISABLED | ROUTE_RUNQ)
                route.flags |= ROUTE_NEW
                route.nerror = route.penalty = 0
                route.enable_at = None
                out.append(route)
        if out:
            self._clear_route_errors()
        return out

    def _probe(self, relay: Relay, source: Source) -> None:
        """pysmtpd: a task that finds every route of its relay disabled (by other tasks'
        failures) has them enabled again once, penalty kept, so one more failure
        disables them for longer."""
        for _, host in relay.mxs or []:
            route = self.routes.get((source.address, host.address))
            if route is not None and route.flags & ROUTE_DISABLED:
                route.flags &= ~(ROUTE_DISABLED | ROUTE_RUNQ)
                route.flags |= ROUTE_NEW
                route.enable_at = None
        self.connector(relay, source).flags.difference_update(("error_route_net", "error_route_smtp"))

    def _clear_route_errors(self) -> None:
        for relay in self.relays.values():
            for c in relay.connectors.values():
                c.flags.difference_update(("error_route_net", "error_route_smtp"))

    def next_enable(self) -> float | None:
        times = [r.enable_at for r in self.routes.values() if r.enable_at is not None]
        return min(times) if times else None

    # -- tasks and the message rate ------------------------------------------------------------

    def rate_wait(self, relay: Relay, now: float) -> float:
        """Seconds before the relay may send one more message under max-msg-rate (0: now)."""
        lim = relay.limits
        if not lim.max_msg_rate:
            return 0.0
        while relay.sent and relay.sent[0] <= now - lim.max_msg_period:
            relay.sent.popleft()
        if len(relay.sent) < lim.max_msg_rate:
            return 0.0
        return relay.sent[0] + lim.max_msg_period - now

    def task_marks(self, relay: Relay) -> tuple[int, int]:
        """(task-hiwat, task-lowat) of the relay now.  OpenSMTPD's marks bound the tasks a
        relay holds in memory; pysmtpd scales the default ones by the relay's ready
        sessions, so a relay whose connections are taking its tasks does not push its
        new envelopes back to the scheduler (a hold and a release each) while a stuck
        one (no ready session) still holds them at 50.  Marks the configuration sets
        apply as they are."""
        lim = relay.limits
        scale = 1 if "task_hiwat" in lim.explicit or "task_lowat" in lim.explicit \
            else max(1, relay.nconn_ready)
        return lim.task_hiwat * scale, lim.task_lowat * scale

    def take_task(self, relay: Relay, now: float):
        """The next task for a session of the relay, or None; counts it against the rate."""
        if not relay.tasks or self.rate_wait(relay, now) > 0:
            return None
        if relay.limits.max_msg_rate:
            relay.sent.append(now)
        return relay.tasks.popleft()

    def forget(self, relay: Relay) -> bool:
        """Drop a relay with no task and no connection (its hosts and routes are kept:
        their errors outlive it).  Returns whether it was dropped."""
        if relay.tasks or relay.nconn or relay.refcount:
            return False
        self.relays.pop(relay.key, None)
        return True

    # -- hoststats, blocks ---------------------------------------------------------------------

    def hoststat(self, domain: str, result: str, wall: float) -> None:
        self.hoststats[domain.lower()] = (wall, result)

    def expire_hoststats(self, wall: float) -> None:
        for name in [n for n, (t, _) in self.hoststats.items() if t + HOSTSTAT_EXPIRE <= wall]:
            del self.hoststats[name]

    def block(self, source: str, domain: str) -> None:
        self.blocks.add((source, domain.lower()))

    def unblock(self, source: str, domain: str) -> None:
        self.blocks.discard((source, domain.lower()))

    # -- smtpctl show ... (the lines of mta.c's IMSG_CTL_MTA_SHOW_*) ---------------------------

    def show_routes(self, now: float) -> list[str]:
        out = []
        for route in sorted(self.routes.values(), key=lambda r: r.id):
            flags = "".join(ch if route.flags & bit else "-" for ch, bit in (
                ("N", ROUTE_NEW), ("D", ROUTE_DISABLED), ("Q", ROUTE_RUNQ), ("K", ROUTE_KEEPALIVE)))
            timeout = duration_to_text(int(route.enable_at - now)) if route.enable_at is not None else "-"
            out.append(f"{route.id}. {route.text()} {flags} nconn={route.nconn} nerror={route.nerror} "
                       f"penalty={route.penalty} timeout={timeout}")
        return out

    def show_hosts(self, wall: float) -> list[str]:
        return [f"{h.address} {h.ptrname or '-'} refcount={h.refcount} nconn={h.nconn} "
                f"lastconn={duration_to_text(int(wall - h.lastconn_wall)) if h.lastconn_wall else '-'}"
                for h in sorted(self.hosts.values(), key=lambda h: _address_key(h.address))]

    def show_relays(self, now: float, wall: float) -> list[str]:
        out = []
        for relay in sorted(self.relays.values(), key=lambda r: r.key.text()):
            timeout = duration_to_text(int(relay.timeout_at - now)) if relay.timeout_at is not None else "-"
            wait = ",".join(w for w in ("MX", "limits", "source", "connector") if w in relay.waiting)
            lastconn = duration_to_text(int(wall - relay.lastconn_wall)) if relay.lastconn_wall else "-"
            out.append(f"{relay.key.text()} refcount={relay.refcount} ntask={relay.ntask} "
                       f"nconn={relay.nconn} lastconn={lastconn} timeout={timeout} wait={wait}"
                       f"{'ONHOLD' if relay.onhold else ''}")
            for c in relay.connectors.values():
                ctimeout = duration_to_text(int(c.retry_at - now)) if "wait" in c.flags and c.retry_at else "-"
                clast = duration_to_text(int(wall - c.lastconn_wall)) if c.lastconn_wall else "-"
                flags = ",".join(name for key, name in CONNECTOR_FLAGS if key in c.flags)
                out.append(f"  connector {c.source.text()} refcount=0 nconn={c.nconn} "
                           f"lastconn={clast} timeout={ctimeout} flags={flags}")
        return out

    def show_hoststats(self) -> list[str]:
        return [f"{name}|{int(t)}|{result}" for name, (t, result) in sorted(self.hoststats.items())]

    def show_blocks(self) -> list[str]:
        return [f"{src or '[]'} -> {dom or '*'}" for src, dom in sorted(self.blocks)]


def _address_key(address: str):
    ip = ipaddress.ip_address(address)
    return (ip.version, ip.packed)
