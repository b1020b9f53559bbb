"""Listener plans: start-up with systemd's sockets and reload diffs (real sockets on
127.0.0.1 ephemeral ports; the machine's interfaces are given, for "listen on all")."""
from __future__ import annotations

import socket

import pytest

from smtpd import listeners
from smtpd.config import Config, ConfigError, Listener
from smtpd.sdnotify import ActivationError, InheritedSocket

IFACES = {"lo": [(socket.AF_INET, "127.0.0.1")], "eth0": [(socket.AF_INET, "127.0.0.2")]}


def cfg(*listeners_: Listener) -> Config:
    return Config(file="smtpd.conf", hostname="mx.test", listeners=list(listeners_))


def lis(address: str, port: int, lineno: int = 1, **kw) -> Listener:
    return Listener(address=address, port=port, lineno=lineno, file="smtpd.conf", **kw)


def listening(address: str = "127.0.0.1", port: int = 0) -> socket.socket:
    s = socket.socket()
    s.bind((address, port))
    s.listen(1)
    return s


@pytest.fixture
def sockets():
    made: list[socket.socket] = []
    yield made
    for s in made:
        s.close()


def test_reload_keeps_wanted_binds_new_closes_removed(sockets):
    a, b = listening(), listening()
    sockets += [a, b]
    pa, pb = a.getsockname()[1], b.getsockname()[1]
    current = [listeners.Bound((socket.AF_INET, "127.0.0.1", pa), a, 0),
               listeners.Bound((socket.AF_INET, "127.0.0.1", pb), b, 1)]
    probe = listening()
    pc = probe.getsockname()[1]
    probe.close()
    plan = listeners.plan(cfg(lis("127.0.0.1", pc), lis("127.0.0.1", pa, hostname="new")), current, IFACES)
    assert [(bound.sock, index) for bound, index in plan.keep] == [(a, 1)]
    assert plan.bind == [((socket.AF_INET, "127.0.0.1", pc), 0)]
    assert plan.close == [current[1]]
    made = listeners.bind_planned(cfg(lis("127.0.0.1", pc), lis("127.0.0.1", pa)), plan)
    sockets += [m.sock for m in made]
    assert made[0].sock.getsockname() == ("127.0.0.1", pc)


def test_bind_failure_names_the_line_and_leaves_nothing_bound(sockets):
    busy = listening()
    sockets.append(busy)
    free = listening()
    port_free = free.getsockname()[1]
    free.close()
    config = cfg(lis("127.0.0.1", port_free, 3), lis("127.0.0.1", busy.getsockname()[1], 4))
    plan = listeners.plan(config, [], IFACES)
    with pytest.raises(listeners.BindError) as info:
        listeners.bind_planned(config, plan)
    assert info.value.line == 4 and "Address already in use" in str(info.value)
    again = listening("127.0.0.1", port_free)          # the first one was closed again
    again.close()


def test_systemd_socket_matched_exactly_and_stray_one_refused(sockets):
    s = listening()
    sockets.append(s)
    port = s.getsockname()[1]
    bound = listeners.initial(cfg(lis("127.0.0.1", port)), [InheritedSocket(s, "smtp")], IFACES)
    assert len(bound) == 1 and bound[0].inherited and bound[0].sock is s and bound[0].index == 0
    stray = listening()
    sockets.append(stray)
    with pytest.raises(ActivationError, match="match no listener"):
        listeners.initial(cfg(lis("127.0.0.1", port + 0)), [InheritedSocket(stray, "")], IFACES)


def test_wildcard_socket_serves_only_listen_on_all(sockets):
    wild = listening("0.0.0.0")
    sockets.append(wild)
    port = wild.getsockname()[1]
    # "listen on all" of that port: both interface addresses are served by it.
    bound = listeners.initial(cfg(lis("all", port)), [InheritedSocket(wild, "")], IFACES)
    assert [b.sock for b in bound] == [wild]
    # "listen on 127.0.0.1": a wildcard socket would open more than asked: refused.
    wild2 = listening("0.0.0.0")
    sockets.append(wild2)
    with pytest.raises((ActivationError, ConfigError)):
        listeners.initial(cfg(lis("127.0.0.1", wild2.getsockname()[1])), [InheritedSocket(wild2, "")], IFACES)


def test_wildcard_socket_with_listeners_of_different_options_is_refused(sockets):
    wild = listening("0.0.0.0")
    sockets.append(wild)
    port = wild.getsockname()[1]
    config = cfg(lis("all", port, 1, hostname="a.test"), lis("0.0.0.0", port, 2, hostname="b.test"))
    with pytest.raises(ConfigError, match="options differ"):
        listeners.initial(config, [InheritedSocket(wild, "")], IFACES)
