"""The parent's listening sockets: bound as root, or taken from systemd, and the
plan of a reload (which sockets stay, which are bound, which are closed).

A socket is known by its key ``(family, address, port)``; the configuration's
``listen on`` lines resolve to keys (an interface name to each of its addresses).
A socket stays across a reload when its key is still wanted, so connections
waiting in its backlog are served, never refused.

Sockets from systemd (smtpd.socket) are matched to the listeners by address and
port; a wildcard one (``ListenStream=25`` is ``[::]:25``) serves every listener
of its port that listens on every address (``all``, ``any``, ``0.0.0.0``,
``::``); those must then agree on their options (a connection to a wildcard
socket cannot tell which of them it was meant for).
"""
from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field

from smtpd.config import Config, ConfigError, Listener, resolve_listener_addresses
from smtpd.sdnotify import ActivationError, InheritedSocket

Key = tuple[int, str, int]          # family, address, port

# The kernel caps it at net.core.somaxconn (4096 by default since Linux 5.4): a burst
# of a thousand connections waits in the queue instead of being dropped and retried
# by the clients a second later (SYN retransmission).  pony's server listens with it too.
BACKLOG = 4096


def key_text(key: Key) -> str:
    family, address, port = key
    return f"[{address}]:{port}" if family == socket.AF_INET6 else f"{address}:{port}"


@dataclass
class Bound:
    key: Key
    sock: socket.socket
    index: int                      # the listener it serves, in the current config
    inherited: bool = False         # passed by systemd, not bound by us

    @property
    def wildcard(self) -> bool:
        return ipaddress.ip_address(self.key[1]).is_unspecified


def wanted_keys(config: Config, ifaces=None) -> list[tuple[Key, int]]:
    """Every (key, listener index) the configuration asks for, in its order."""
    out: list[tuple[Key, int]] = []
    for index, listener in enumerate(config.listeners):
        if listener.address == "socket":
            continue
        for family, address in resolve_listener_addresses(listener, ifaces):
            key = (family, str(ipaddress.ip_address(address)), listener.port)
            if all(k != key for k, _ in out):
                out.append((key, index))
    return out


def _options(listener: Listener) -> tuple:
    return (listener.hostname, listener.tag)


WILDCARD_LISTENERS = ("all", "any", "0.0.0.0", "::")


def _covers(bound: Bound, key: Key, listener: Listener) -> bool:
    if bound.key == key:
        return True
    # A wildcard socket from systemd serves only listeners that ask for every
    # address themselves: it must never open a port wider than smtpd.conf says.
    if not (bound.inherited and bound.wildcard and bound.key[2] == key[2]
            and listener.address in WILDCARD_LISTENERS):
        return False
    # An IPv6 wildcard socket of systemd is dual-stack unless BindIPv6Only=ipv6-only.
    return bound.key[0] == key[0] or (bound.key[0] == socket.AF_INET6 and key[0] == socket.AF_INET
                                      and not bound.sock.getsockopt(socket.IPPROTO_IPV6,
                                                                    socket.IPV6_V6ONLY))


@dataclass
class Plan:
    keep: list[tuple[Bound, int]] = field(default_factory=list)     # (socket, new index)
    bind: list[tuple[Key, int]] = field(default_factory=list)
    close: list[Bound] = field(default_factory=list)


def plan(config: Config, current: list[Bound], ifaces=None) -> Plan:
    """What to do to serve ``config`` from the sockets of ``current``."""
    result = Plan()
    used: dict[int, int] = {}                    # id(bound) -> index
    for key, index in wanted_keys(config, ifaces):
        match = next((b for b in current if b.key == key), None) or \
            next((b for b in current if _covers(b, key, config.listeners[index])), None)
        if match is None:
            result.bind.append((key, index))
            continue
        if id(match) in used:
            first = config.listeners[used[id(match)]]
            if _options(first) != _options(config.listeners[index]):
                listener = config.listeners[index]
                raise ConfigError(listener.file, listener.lineno,
                                  f"socket {key_text(match.key)} from systemd serves the listeners "
                                  f"of lines {first.lineno} and {listener.lineno}, whose options "
                                  "differ: give each its own ListenStream= address")
            continue
        used[id(match)] = index
        result.keep.append((match, index))
    result.close = [b for b in current if id(b) not in used]
    return result


class BindError(ConfigError):
    """A listener's address cannot be bound (in use, not on this machine): not a
    mistake in the file necessarily, so the daemon exits 1, not EX_CONFIG."""


def bind(key: Key, listener: Listener) -> socket.socket:
    family, address, port = key
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, port))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise BindError(listener.file, listener.lineno,
                        f"cannot listen on {address} port {port}: {exc.strerror}") from None
    return sock


def bind_planned(config: Config, result: Plan) -> list[Bound]:
    """Bind the sockets the plan lacks; on an error close those bound and raise."""
    made: list[Bound] = []
    try:
        for key, index in result.bind:
            made.append(Bound(key, bind(key, config.listeners[index]), index))
    except ConfigError:
        for b in made:
            b.sock.close()
        raise
    return made


def from_systemd(inherited: list[InheritedSocket]) -> list[Bound]:
    out = []
    for item in inherited:
        family, host, port = item.address()
        out.append(Bound((family, str(ipaddress.ip_address(host.split("%")[0])), port),
                         item.sock, -1, inherited=True))
    return out


def initial(config: Config, inherited: list[InheritedSocket], ifaces=None) -> list[Bound]:
    """The sockets to start with: systemd's, matched to the listeners, and the rest
    bound here.  A socket from systemd that no listener wants is an error: systemd
    would keep accepting connections on it that nobody serves."""
    current = from_systemd(inherited)
    result = plan(config, current, ifaces)
    if result.close:
        for b in current:
            b.sock.close()
        unused = ", ".join(key_text(b.key) for b in result.close)
        raise ActivationError(f"socket(s) from systemd match no listener of {config.file}: {unused}")
    kept = []
    for bound, index in result.keep:
        bound.index = index
        kept.append(bound)
    return kept + bind_planned(config, result)
