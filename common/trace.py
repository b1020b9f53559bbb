"""Tracing and profiling switches, as OpenSMTPD's ``tracing`` and ``profiling`` masks.

Every process holds one ``Switches`` object (``FLAGS``).  ``smtpd -T``/``-v`` set it
at start; at run time control changes it for every process at once (smtpctl
``trace``, ``untrace``, ``log verbose``, ``log brief``, ``profile``, ``unprofile``;
see smtpd/control_trace.py).  Code on hot paths reads one plain attribute
(``if FLAGS.mproc:``), so a switch that is off costs an attribute load and a branch.

Trace lines go to the ``smtpd.trace`` logger at DEBUG priority, like OpenSMTPD's
``log_trace`` (LOG_DEBUG whatever the verbosity): they are written whenever their
switch is on, with or without ``log verbose``.  Profile lines likewise (OpenSMTPD
also needs ``-v`` for them; an admin who asks for a profile wants to see it).

The bits and keywords are smtpd.h's and smtpctl.c's (``str_to_trace``), so the
numbers in a mask mean the same thing as in OpenSMTPD.
"""
from __future__ import annotations

import logging
from contextvars import ContextVar

TRACE_DEBUG = 0x0001
TRACE_IMSG = 0x0002
TRACE_IO = 0x0004
TRACE_SMTP = 0x0008
TRACE_FILTERS = 0x0010
TRACE_MTA = 0x0020
TRACE_BOUNCE = 0x0040
TRACE_SCHEDULER = 0x0080
TRACE_LOOKUP = 0x0100
TRACE_STAT = 0x0200
TRACE_RULES = 0x0400
TRACE_MPROC = 0x0800
TRACE_EXPAND = 0x1000
TRACE_TABLES = 0x2000
TRACE_QUEUE = 0x4000
# ``~TRACE_DEBUG`` in C: every trace bit, never the debug bit.
TRACE_ALL = 0x7FFFFFFF & ~TRACE_DEBUG

PROFILE_TOSTAT = 0x0001
PROFILE_IMSG = 0x0002
PROFILE_QUEUE = 0x0004

# smtpctl trace|untrace SUBSYSTEM (smtpctl.c str_to_trace), in smtpctl(8)'s order.
SMTPCTL_TRACE = {
    "imsg": TRACE_IMSG, "io": TRACE_IO, "smtp": TRACE_SMTP, "filters": TRACE_FILTERS,
    "mta": TRACE_MTA, "bounce": TRACE_BOUNCE, "scheduler": TRACE_SCHEDULER,
    "expand": TRACE_EXPAND, "lookup": TRACE_LOOKUP, "stat": TRACE_STAT, "rules": TRACE_RULES,
    "mproc": TRACE_MPROC, "all": TRACE_ALL,
}
# smtpd -T accepts a few more words and two subsystems smtpctl cannot switch (smtpd.c).
SMTPD_TRACE = {
    **SMTPCTL_TRACE, "transfer": TRACE_MTA, "bounces": TRACE_BOUNCE, "stats": TRACE_STAT,
    "table": TRACE_TABLES, "tables": TRACE_TABLES, "queue": TRACE_QUEUE,
}
SMTPD_PROFILE = {"profstat": PROFILE_TOSTAT, "profile-imsg": PROFILE_IMSG,
                 "profile-queue": PROFILE_QUEUE}
SMTPCTL_PROFILE = {"imsg": PROFILE_IMSG, "queue": PROFILE_QUEUE}


class KeywordError(ValueError):
    """An unknown subsystem; ``str()`` is smtpctl's message for it."""


def trace_bits(word: str) -> int:
    """smtpctl's ``str_to_trace``: the bits of one ``trace``/``untrace`` keyword."""
    try:
        return SMTPCTL_TRACE[word]
    except KeyError:
        raise KeywordError(f"invalid trace keyword: {word}") from None


def profile_bits(word: str) -> int:
    """smtpctl's ``str_to_profile``."""
    try:
        return SMTPCTL_PROFILE[word]
    except KeyError:
        raise KeywordError(f"invalid profile keyword: {word}") from None


def from_command_line(trace_words: list[str], verbose: int) -> tuple[int, int, list[str]]:
    """(tracing mask, profiling mask, unknown words) from ``smtpd -T ... -v``."""
    tracing = TRACE_DEBUG if verbose else 0
    profiling = 0
    unknown = []
    for word in trace_words:
        if word in SMTPD_TRACE:
            tracing |= SMTPD_TRACE[word]
        elif word in SMTPD_PROFILE:
            profiling |= SMTPD_PROFILE[word]
        else:
            unknown.append(word)
    return tracing, profiling, unknown


class Switches:
    """The masks of one process, unpacked into booleans for the hot paths."""

    __slots__ = ("tracing", "profiling", "debug", "imsg", "io", "smtp", "filters", "mta",
                 "bounce", "scheduler", "lookup", "stat", "rules", "mproc", "expand", "tables",
                 "queue", "profile_imsg", "profile_queue", "profile_tostat")

    def __init__(self) -> None:
        self.set_tracing(0)
        self.set_profiling(0)

    def set_tracing(self, mask: int) -> None:
        self.tracing = mask
        self.debug = bool(mask & TRACE_DEBUG)
        self.imsg = bool(mask & TRACE_IMSG)
        self.io = bool(mask & TRACE_IO)
        self.smtp = bool(mask & TRACE_SMTP)
        self.filters = bool(mask & TRACE_FILTERS)
        self.mta = bool(mask & TRACE_MTA)
        self.bounce = bool(mask & TRACE_BOUNCE)
        self.scheduler = bool(mask & TRACE_SCHEDULER)
        self.lookup = bool(mask & TRACE_LOOKUP)
        self.stat = bool(mask & TRACE_STAT)
        self.rules = bool(mask & TRACE_RULES)
        self.mproc = bool(mask & TRACE_MPROC)
        self.expand = bool(mask & TRACE_EXPAND)
        self.tables = bool(mask & TRACE_TABLES)
        self.queue = bool(mask & TRACE_QUEUE)

    def set_profiling(self, mask: int) -> None:
        self.profiling = mask
        self.profile_imsg = bool(mask & PROFILE_IMSG)
        self.profile_queue = bool(mask & PROFILE_QUEUE)
        self.profile_tostat = bool(mask & PROFILE_TOSTAT)


FLAGS = Switches()

# The SMTP or MTA session a task works for, so that `trace mproc` lines of the
# messages it sends name it (the messages themselves carry a reqid, not the session).
SESSION: ContextVar[int] = ContextVar("smtpd_session", default=0)

_trace_log = logging.getLogger("smtpd.trace")
# Its own level: trace lines pass whatever the root level (log brief) is.
_trace_log.setLevel(logging.DEBUG)


def trace(fmt: str, *args) -> None:
    """Log one trace (or profile) line; the caller has checked its switch."""
    _trace_log.debug(fmt, *args)


def names(mask: int, table: dict[str, int] = SMTPCTL_TRACE) -> list[str]:
    """The keywords whose bits are all set in ``mask`` (``all`` apart), for log lines."""
    return [word for word, bit in table.items() if word != "all" and mask & bit == bit]
