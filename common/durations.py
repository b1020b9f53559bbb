"""Durations as OpenSMTPD writes and reads them.

``duration_to_text`` is to.c's function of the same name (used by ``show
stats`` for ``uptime.human`` and by the MTA introspection output);
``parse_duration`` is parse.y's ``delaytonum`` (``30s``, ``5m``, ``4h``,
``2d``: one decimal number of at least 1 and a single unit letter).
"""
from __future__ import annotations

import re

__all__ = ["duration_to_text", "parse_duration", "DURATION_UNITS"]

DURATION_UNITS = {"s": 1, "m": 60, "h": 60 * 60, "d": 24 * 60 * 60}

_INT_MAX = 2**31 - 1
_DURATION_RE = re.compile(r"([0-9]+)([smhd])")


def duration_to_text(seconds: int) -> str:
    """``1d2h3m4s`` with zero parts left out, ``0s`` for 0, ``-`` prefix if negative."""
    t = int(seconds)
    if t == 0:
        return "0s"
    out = ""
    if t < 0:
        out = "-"
        t = -t
    s = t % 60
    t //= 60
    m = t % 60
    t //= 60
    h = t % 24
    d = t // 24
    if d:
        out += f"{d}d"
    if h:
        out += f"{h}h"
    if m:
        out += f"{m}m"
    if s:
        out += f"{s}s"
    return out


def parse_duration(text: str) -> int:
    """``"30s"`` -> 30, ``"5m"`` -> 300, ``"4h"`` -> 14400, ``"2d"`` -> 172800.

    Exactly as OpenSMTPD's ``delaytonum``: the number must be >= 1 and at most
    ``INT_MAX / unit`` (so ``0s`` is refused, as smtpd.conf refuses it).
    Raises ``ValueError`` for anything else.
    """
    m = _DURATION_RE.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"invalid duration: {text!r}")
    factor = DURATION_UNITS[m.group(2)]
    value = int(m.group(1))
    if value < 1 or value > _INT_MAX // factor:
        raise ValueError(f"invalid duration: {text!r}")
    return value * factor
