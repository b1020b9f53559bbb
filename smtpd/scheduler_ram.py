"""The scheduler's model of the queue, in memory and without I/O.

Pure and clock-injected (every method that depends on time takes ``now``), so it
is tested without processes.  OpenSMTPD's ramqueue semantics:

* new envelopes are staged per message and go live only when the message is
  committed (a rollback drops the stage);
* try n of an envelope is due at ``ctime + base * n**2`` (base 400 s for relaying,
  10 s for local delivery and bounces), anchored to the creation time;
* an envelope whose expiry time has come is expired instead of tried;
* envelopes of a paused agent wait aside until it resumes.

A heap keyed by the next event time with lazy invalidation keeps every
operation O(log n); a sorted list of ids serves ``show queue``'s cursor.
"""
from __future__ import annotations

import heapq
from bisect import bisect_right, insort
from dataclasses import dataclass

BACKOFF_TRANSFER = 400
BACKOFF_DELIVERY = 10

PENDING, INFLIGHT = "pending", "inflight"


class Item:
    __slots__ = ("evpid", "type", "ctime", "expire", "retry", "state", "sched",
                 "t_inflight", "removed", "suspended", "gen")

    def __init__(self, evpid: int, type: str, ctime: int, expire: int, retry: int) -> None:
        self.evpid = evpid
        self.type = type
        self.ctime = ctime
        self.expire = expire
        self.retry = retry
        self.state = PENDING
        self.sched = 0
        self.t_inflight = 0
        self.removed = False
        self.suspended = False
        self.gen = 0


@dataclass(frozen=True)
class Action:
    kind: str        # "deliver" | "transfer" | "expire" | "remove"
    evpid: int


def backoff(type_: str) -> int:
    return BACKOFF_TRANSFER if type_ == "mta" else BACKOFF_DELIVERY


def next_try(ctime: int, type_: str, retry: int, now: int) -> int:
    """The first try time at step >= retry that is not in the past (try 0 is now)."""
    base = backoff(type_)
    step = retry
    while step and ctime + base * step * step <= now:
        step += 1
    return ctime + base * step * step if step else ctime


class RamQueue:
    def __init__(self) -> None:
        self.items: dict[int, Item] = {}
        self.order: list[int] = []                 # sorted evpids, for listing
        self.staged: dict[int, list[Item]] = {}    # msgid -> envelopes not yet committed
        self.heap: list[tuple[int, int, int]] = [] # (when, evpid, gen)
        self.paused: set[str] = set()              # agent types on hold ("mda", "mta")
        self.parked: dict[str, list[Item]] = {"mda": [], "mta": [], "bounce": []}
        self.removals: list[int] = []              # admin removals to carry out
        self.inflight = 0

    # -- intake ---------------------------------------------------------------------------

    def stage(self, evpid: int, type_: str, ctime: int, expire: int, retry: int) -> None:
        self.staged.setdefault(evpid >> 32, []).append(Item(evpid, type_, ctime, expire, retry))

    def commit(self, msgid: int, now: int) -> int:
        """Staged envelopes go live; returns how many were new (a discover may stage
        envelopes the scheduler already has: the live ones are kept, not counted)."""
        count = 0
        for item in self.staged.pop(msgid, []):
            if item.evpid in self.items:        # already known (discover twice): keep the live one
                continue
            self.items[item.evpid] = item
            insort(self.order, item.evpid)
            self._reschedule(item, now)
            count += 1
        return count

    def rollback(self, msgid: int) -> None:
        self.staged.pop(msgid, None)

    # -- the run queue --------------------------------------------------------------------

    def _reschedule(self, item: Item, now: int) -> None:
        item.state = PENDING
        item.sched = next_try(item.ctime, item.type, item.retry, now)
        item.gen += 1
        if item.suspended:
            return
        heapq.heappush(self.heap, (min(item.sched, item.expire), item.evpid, item.gen))

    def next_batch(self, now: int, limit: int) -> list[Action]:
        actions = [Action("remove", evpid) for evpid in self.removals[:limit]]
        del self.removals[:len(actions)]
        while self.heap and len(actions) < limit and self.heap[0][0] <= now:
            _, evpid, gen = heapq.heappop(self.heap)
            item = self.items.get(evpid)
            if item is None or item.gen != gen or item.state != PENDING or item.suspended:
                continue
            if item.expire <= now:
                actions.append(Action("expire", evpid))
                self._forget(item)
                continue
            if item.type in self.paused:
                self.parked[item.type].append(item)
                continue
            item.state = INFLIGHT
            item.t_inflight = now
            self.inflight += 1
            actions.append(Action("transfer" if item.type == "mta" else "deliver", evpid))
        return actions

    def next_wakeup(self) -> int | None:
        """When the next batch can have work (None: nothing scheduled)."""
        if self.removals:
            return 0
        while self.heap:
            when, evpid, gen = self.heap[0]
            item = self.items.get(evpid)
            if item is not None and item.gen == gen and item.state == PENDING and not item.suspended:
                return when
            heapq.heappop(self.heap)
        return None

    # -- results ----------------------------------------------------------------------------

    def _done_inflight(self, evpid: int) -> Item | None:
        item = self.items.get(evpid)
        if item is not None and item.state == INFLIGHT:
            self.inflight -= 1
        return item

    def delivered(self, evpid: int) -> None:
        """ok, permanent failure or loop: the envelope is gone from the queue."""
        item = self._done_inflight(evpid)
        if item is not None:
            self._forget(item)

    def tempfail(self, evpid: int, retry: int, now: int) -> None:
        item = self._done_inflight(evpid)
        if item is None:
            return
        item.retry = retry
        if item.removed:
            item.state = PENDING
            self.removals.append(evpid)
            return
        self._reschedule(item, now)

    def _forget(self, item: Item) -> None:
        self.items.pop(item.evpid, None)
        i = bisect_right(self.order, item.evpid) - 1
        if i >= 0 and self.order[i] == item.evpid:
            del self.order[i]
        item.gen += 1

    # -- admin operations (smtpctl) ---------------------------------------------------------

    def select(self, ident: int) -> list[Item]:
        """0 = all, an id <= 0xffffffff = every envelope of that message, else one envelope."""
        if ident == 0:
            return list(self.items.values())
        if ident <= 0xFFFFFFFF:
            lo = bisect_right(self.order, (ident << 32) - 1)
            hi = bisect_right(self.order, (ident << 32) | 0xFFFFFFFF)
            return [self.items[e] for e in self.order[lo:hi]]
        item = self.items.get(ident)
        return [item] if item is not None else []

    def schedule(self, ident: int, now: int) -> int:
        count = 0
        for item in self.select(ident):
            if item.state != PENDING or item.removed:
                continue
            item.sched = now
            item.gen += 1
            for parked in self.parked.values():
                if item in parked:
                    parked.remove(item)
            heapq.heappush(self.heap, (now, item.evpid, item.gen))
            count += 1
        return count

    def remove(self, ident: int) -> int:
        count = 0
        for item in self.select(ident):
            if item.removed:
                continue
            item.removed = True
            count += 1
            if item.state == PENDING:
                item.gen += 1
                for parked in self.parked.values():
                    if item in parked:
                        parked.remove(item)
                self.removals.append(item.evpid)
        return count

    # Minimal pause/resume envelope (issue3-ctl, for its tests); sched's version replaces it.
    def suspend(self, ident: int) -> int:
        count = 0
        for item in self.select(ident):
            if item.suspended or item.removed:
                continue
            item.suspended = True
            item.gen += 1                   # drops its heap entry
            for parked in self.parked.values():
                if item in parked:
                    parked.remove(item)
            count += 1
        return count

    def unsuspend(self, ident: int, now: int) -> int:
        count = 0
        for item in self.select(ident):
            if not item.suspended:
                continue
            item.suspended = False
            if item.state == PENDING and not item.removed:
                item.gen += 1
                heapq.heappush(self.heap, (min(item.sched, item.expire), item.evpid, item.gen))
            count += 1
        return count

    def removed_done(self, evpid: int) -> None:
        item = self.items.get(evpid)
        if item is not None:
            self._forget(item)

    def pause(self, agent: str) -> None:
        self.paused.add(agent)

    def resume(self, agent: str, now: int) -> None:
        self.paused.discard(agent)
        for item in self.parked[agent]:
            if item.evpid in self.items and item.state == PENDING and not item.removed:
                item.gen += 1
                heapq.heappush(self.heap, (now, item.evpid, item.gen))
        self.parked[agent] = []

    def listing(self, after: int, limit: int, now: int) -> list[tuple[int, str, int]]:
        """(evpid, runstate, runtime) for up to ``limit`` envelopes with evpid > after."""
        start = bisect_right(self.order, after)
        out = []
        for evpid in self.order[start:start + limit]:
            item = self.items[evpid]
            if item.state == INFLIGHT:
                out.append((evpid, INFLIGHT, now - item.t_inflight))
            else:
                out.append((evpid, PENDING, item.sched - now))
        return out

    def __len__(self) -> int:
        return len(self.items)
