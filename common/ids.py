"""Message, envelope and session identifiers (design.md, "Identifiers and the spool").

A msgid is 32 random bits (never 0), printed ``%08x``.  An evpid carries its
msgid in the upper 32 bits and a random non-zero lower half, printed ``%016x``,
so ``evpid >> 32`` always names the message it belongs to.
"""
from __future__ import annotations

import random
import secrets

MSGID_MAX = 0xFFFFFFFF


def random_msgid() -> int:
    while True:
        msgid = secrets.randbits(32)
        if msgid:
            return msgid


def random_evpid(msgid: int) -> int:
    while True:
        low = secrets.randbits(32)
        if low:
            return (msgid << 32) | low


def msgid_of(evpid: int) -> int:
    return evpid >> 32


def is_msgid(value: int) -> bool:
    """smtpctl(8): an id that fits 32 bits names every envelope of a message."""
    return 0 < value <= MSGID_MAX


class UidGenerator:
    """Session/request ids: a per-process counter in the upper half, random low bits.

    Unique within a process and unlikely to collide across processes, which is
    all the logs and the request/reply correlation need.
    """

    def __init__(self) -> None:
        self._counter = secrets.randbits(24)
        # Not secrets: these correlate requests and log lines, one per message hop,
        # and a system call each would show in the profile.
        self._random = random.Random(secrets.randbits(128))

    def __call__(self) -> int:
        self._counter = (self._counter + 1) & 0xFFFFFFFF
        return (self._counter << 32) | self._random.getrandbits(32)
