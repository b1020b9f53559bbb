"""Counters under OpenSMTPD's names (stat_backend.c): ``smtp.session``, ``queue.bounce``...

Any process calls ``increment``/``decrement``/``set`` where the event happens; the
values live in this process until they are gathered for ``smtpctl show stats`` and
``monitor`` (control asks every process, see smtpd/control.py).  Calls are cheap
dictionary updates, safe on the hot path.  A key exists only once touched, as in
OpenSMTPD, so a counter never reads zero merely because nobody implemented it.
"""
from __future__ import annotations

_counters: dict[str, int] = {}


def increment(key: str, n: int = 1) -> None:
    _counters[key] = _counters.get(key, 0) + n


def decrement(key: str, n: int = 1) -> None:
    _counters[key] = _counters.get(key, 0) - n


def set(key: str, value: int) -> None:  # noqa: A001 - OpenSMTPD's name (stat_set)
    _counters[key] = value


def snapshot() -> dict[str, int]:
    """A copy of every counter this process has touched."""
    return dict(_counters)


def reset() -> None:
    """For tests: forget every counter."""
    _counters.clear()
