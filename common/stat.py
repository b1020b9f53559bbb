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

A pysmtpd addition: ``Histogram``, durations counted in fixed buckets (one list
slot incremented per event), shown as ``<key>.count``, ``<key>.p50_ms``,
``<key>.p90_ms``, ``<key>.p99_ms`` and ``<key>.max_ms``, the percentiles worked out
only when someone looks (``snapshot``).
"""
from __future__ import annotations

from bisect import bisect_left

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
    """A copy of every counter this process has touched, with the percentiles of
    every histogram that has counted something."""
    out = dict(_counters)
    for histogram in _histograms.values():
        if histogram.count:
            out.update(histogram.values())
    return out


def totals() -> tuple[dict[str, int], dict[str, int]]:
    """Copies of the running totals of increments and of decrements, by key."""
    return dict(_increments), dict(_decrements)


def reset() -> None:
    """For tests: forget every counter."""
    _counters.clear()
    _increments.clear()
    _decrements.clear()
    for histogram in _histograms.values():
        histogram.clear()


def _latency_bounds_ms() -> tuple[float, ...]:
    """Bucket upper bounds in ms: 0.1 ms apart below 1 ms, 1 ms apart up to 50 ms (a
    p99 near 20 ms reads to the millisecond), then coarser up to 10 s.  Every bound
    has at most one decimal, so that ``show stats`` (which prints a float as a struct
    timeval, seconds.microseconds) shows it as it is."""
    bounds = [k / 10 for k in range(1, 10)]
    for start, stop, step in ((1, 50, 1), (50, 200, 5), (200, 1000, 50), (1000, 10000, 500)):
        bounds += [float(v) for v in range(start, stop, step)]
    bounds.append(10000.0)
    return tuple(bounds)


LATENCY_BOUNDS_MS = _latency_bounds_ms()


class Histogram:
    """Durations since the start in fixed buckets: ``observe`` costs a bisection and
    two increments, no allocation.  A percentile is the upper bound of the bucket
    holding its rank (nearest rank); past the last bound, the maximum seen."""

    __slots__ = ("key", "bounds", "counts", "count", "max_ms")

    def __init__(self, key: str, bounds_ms: tuple[float, ...] = LATENCY_BOUNDS_MS) -> None:
        self.key = key
        self.bounds = bounds_ms
        self.counts = [0] * (len(bounds_ms) + 1)
        self.count = 0
        self.max_ms = 0.0

    def observe(self, seconds: float) -> None:
        ms = seconds * 1000.0
        self.counts[bisect_left(self.bounds, ms)] += 1
        self.count += 1
        if ms > self.max_ms:
            self.max_ms = ms
        if FLAGS.stat:
            trace("stat: observe: %s: %.3f ms", self.key, ms)

    def clear(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)
        self.count = 0
        self.max_ms = 0.0

    def percentiles(self, *fractions: float) -> list[float]:
        """The bucket bound at each fraction's rank (``fractions`` ascending)."""
        out: list[float] = []
        ranks = [max(1, -(-self.count * round(f * 1000) // 1000)) for f in fractions]
        seen = 0
        for index, n in enumerate(self.counts):
            seen += n
            while ranks and seen >= ranks[0]:
                ranks.pop(0)
                out.append(self.bounds[index] if index < len(self.bounds) else round(self.max_ms, 1))
            if not ranks:
                break
        return out

    def values(self) -> dict[str, int | float]:
        p50, p90, p99 = self.percentiles(0.5, 0.9, 0.99)
        key = self.key
        return {f"{key}.count": self.count, f"{key}.p50_ms": p50, f"{key}.p90_ms": p90,
                f"{key}.p99_ms": p99, f"{key}.max_ms": round(self.max_ms, 1)}


_histograms: dict[str, Histogram] = {}


def histogram(key: str) -> Histogram:
    """The process's histogram of ``key``, made at the first call."""
    found = _histograms.get(key)
    if found is None:
        found = _histograms[key] = Histogram(key)
    return found


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
