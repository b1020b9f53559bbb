"""pony's memory of the reverse DNS names of its recent clients (a pysmtpd addition).

Every SMTP session starts with the client's PTR lookup, which pony asks of lka
(lka's resolver, smtpd/dns.py), a round trip between processes and, in lka, a
getnameinfo on a thread: under load that is milliseconds before the banner, for an
answer that is the same for every connection a busy client opens within seconds.
pony keeps the answers (a name, or "<unknown>" when the address has none) for
``TTL`` seconds; a lookup that failed for a temporary reason (a timeout) is not
kept.  Sans-I/O: the clock is given.  Bounded: at most ``MAX_ENTRIES``; when full,
the oldest answers go first.
"""
from __future__ import annotations

import time

TTL = 30.0
MAX_ENTRIES = 4096


class RdnsCache:
    def __init__(self, ttl: float = TTL, max_entries: int = MAX_ENTRIES, clock=time.monotonic) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.clock = clock
        self._names: dict[str, tuple[float, str]] = {}     # address -> (expiry, name), oldest first

    def get(self, address: str) -> str | None:
        entry = self._names.get(address)
        if entry is None:
            return None
        if entry[0] <= self.clock():
            del self._names[address]
            return None
        return entry[1]

    def put(self, address: str, name: str) -> None:
        self._names.pop(address, None)
        if len(self._names) >= self.max_entries:
            # insertion order is expiry order (one TTL for all): drop the expired, then the oldest
            now = self.clock()
            for key in [k for k, (expiry, _) in self._names.items() if expiry <= now] or [next(iter(self._names))]:
                del self._names[key]
        self._names[address] = (self.clock() + self.ttl, name)
