"""A short memory of answers between processes (a pysmtpd addition): pony's of the
reverse DNS names of its recent clients and of the users it delivers to, lka's of
users' .forward files, the parent's of which homes are on a local disk.

Every SMTP session starts with the client's PTR lookup, and every local delivery
with the user's lookup (uid, gid, home), which pony asks of lka: a round trip
between processes (and for the PTR a getnameinfo on a thread in lka), under load
milliseconds, for an answer that is the same for every connection a busy client
opens, or every message a mailbox gets, within seconds.  pony keeps the answers for
a few seconds (the TTL each user gives: smtpd/pony.py, smtpd/mda.py); what failed
for a temporary reason is not kept.  Sans-I/O: the clock is given.  Bounded: at
most ``max_entries``; when full, the expired answers, then the oldest, go first.
"""
from __future__ import annotations

import time

MAX_ENTRIES = 4096


class TtlCache:
    def __init__(self, ttl: float, max_entries: int = MAX_ENTRIES, clock=time.monotonic) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.clock = clock
        self._entries: dict = {}          # key -> (expiry, value), oldest first

    def get(self, key):
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= self.clock():
            del self._entries[key]
            return None
        return entry[1]

    def put(self, key, value) -> None:
        self._entries.pop(key, None)
        if len(self._entries) >= self.max_entries:
            # insertion order is expiry order (one TTL for all): drop the expired, then the oldest
            now = self.clock()
            for old in [k for k, (expiry, _) in self._entries.items() if expiry <= now] or [next(iter(self._entries))]:
                del self._entries[old]
        self._entries[key] = (self.clock() + self.ttl, value)

    def clear(self) -> None:
        self._entries.clear()
