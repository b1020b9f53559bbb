"""Counters under OpenSMTPD's names (stat_backend.c): ``smtp.session``, ``queue.bounce``...

Any process calls ``increment``/``decrement``/``set`` where the event happens; the
values live in this process until control gathers them for ``smtpctl show stats``,
``monitor`` and the metrics endpoint (control asks every process: smtpd/stat_backend.py).
Calls are cheap dictionary updates, safe on the hot path.  A key exists only once
touched, as in OpenSMTPD, so a counter never reads zero merely because nobody
implemented it.

Besides each value, the running totals of increments and decrements are kept:
``monitor`` shows new and closed SMTP sessions, enqueued and dequeued envelopes,
which OpenSMTPD's control counts from the increment/decrement messages it receives.
"""
from __future__ import annotations

from common.trace import FLAGS, trace

_counters: dict[str, int | float] = {}
_increments: dict[str, int] = {}
_decrements: dict[str, int] = {}


def increment(key: str, n: int = 1) -> None:
    old = _counters.get(key, 0)
    _counters[key] = old + n
    _increments[key] = _increments.get(key, 0) + n
    if FLAGS.stat:
        trace("stat: increment: %s: %d -> %d", key, old, old + n)


def decrement(key: str, n: int = 1) -> None:
    old = _counters.get(key, 0)
    _counters[key] = old - n
    _decrements[key] = _decrements.get(key, 0) + n
    if FLAGS.stat:
        trace("stat: decrement: %s: %d -> %d", key, old, old - n)


def set(key: str, value: int | float) -> None:  # noqa: A001 - OpenSMTPD's name (stat_set)
    """A value that is not counted (a size, a duration in seconds as a float)."""
    _counters[key] = value
    if FLAGS.stat:
        trace("stat: set: %s: %s", key, value)


def snapshot() -> dict[str, int | float]:
    """A copy of every counter this process has touched."""
    return dict(_counters)


def totals() -> tuple[dict[str, int], dict[str, int]]:
    """Copies of the running totals of increments and of decrements, by key."""
    return dict(_increments), dict(_decrements)


def reset() -> None:
    """For tests: forget every counter."""
    _counters.clear()
    _increments.clear()
    _decrements.clear()


class Population:
    """A counter of distinct live objects (relays, hosts, users...): ``add`` and
    ``discard`` are reference-counted per object, and the counter moves only when
    the first reference to an object is taken or the last one dropped."""

    __slots__ = ("key", "refs")

    def __init__(self, key: str) -> None:
        self.key = key
        self.refs: dict[object, int] = {}

    def add(self, item: object) -> None:
        n = self.refs.get(item, 0)
        self.refs[item] = n + 1
        if n == 0:
            increment(self.key)

    def discard(self, item: object) -> None:
        n = self.refs.get(item, 0)
        if n <= 0:
            return
        if n == 1:
            del self.refs[item]
            decrement(self.key)
        else:
            self.refs[item] = n - 1
