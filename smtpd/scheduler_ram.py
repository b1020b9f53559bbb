"""The scheduler's model of the queue, in memory and without I/O.

Pure and clock-injected (every method that depends on time takes ``now``), so it
is tested without processes.  OpenSMTPD's ramqueue semantics (docs/queue.md,
"Scheduler"):

* new envelopes are staged per message and go live only when the message is
  committed (a rollback drops the stage);
* try n of an envelope is due at ``ctime + base * n**2`` (base 400 s for relaying,
  10 s for local delivery and bounces), anchored to the creation time;
* an envelope whose expiry time has come is expired instead of tried;
* a tempfail may make a delay notice due (``bounce warn-interval``);
* an envelope is pending, in flight or held (parked in a hold queue of the MTA
  until a delivery to its route succeeds, or until its next retry time);
  ``pause envelope`` suspends it, in any state;
* envelopes of a paused agent wait aside until it resumes.

Memory is what limits a 100,000-envelope queue, so nothing here is an object per
envelope: an envelope is a *slot*, an index into parallel ``array`` columns,
found from its id through one dict.  The run queue is a heap of plain ints
``time << 32 | slot`` with lazy invalidation (an entry is live only if it still
matches the slot's state and time), and ``show queue``'s cursor walks a sorted
set of ids kept in blocks of unsigned arrays.  Every operation on one envelope
is O(log n).
"""
from __future__ import annotations

import heapq
from array import array
from bisect import bisect_left, bisect_right
from collections import deque
from dataclasses import dataclass, field
from itertools import islice

BACKOFF_TRANSFER = 400
BACKOFF_DELIVERY = 10
HOLDQ_MAX = 1000            # envelopes one hold queue takes (as OpenSMTPD)
PARK_MAX = 1024             # envelopes set aside for a paused agent per batch (SCHEDULEMAX)
MAX_INFLIGHT = 5000         # OpenSMTPD's `scheduler limit max-inflight` default

PENDING, INFLIGHT = "pending", "inflight"
TYPES = ("mta", "mda", "bounce")
_TYPE_CODE = {name: code for code, name in enumerate(TYPES)}

# Slot states.  PENDING: waits for its next try (in the heap at min(sched, expire)
# unless suspended); SCHEDULED: `smtpctl schedule`d (in the heap at sched, even when
# suspended); INFLIGHT: given to the queue for delivery (sched = when); HELD: in a
# hold queue, also in the heap at min(sched, expire) where sched is its next retry;
# PARKED: due, but its agent is paused (in the heap at its expiry only); REMOVING:
# a remove order went to the queue, waiting for its ack (not listed).
_FREE, _PENDING, _SCHEDULED, _INFLIGHT, _HELD, _PARKED, _REMOVING = range(7)

# The meta column packs the small fields of a slot.
_STATE_MASK = 0x7
_TYPE_SHIFT = 3
_TYPE_MASK = 0x3 << _TYPE_SHIFT
_SUSPENDED = 1 << 5
_REMOVED = 1 << 6            # removed by the admin while in flight
_RETRY_SHIFT = 7
_SLOT_MASK = 0xFFFFFFFF


@dataclass(frozen=True)
class Action:
    kind: str        # "deliver" | "transfer" | "expire" | "remove"
    evpid: int
    agent: str = field(default="", compare=False)   # deliver/transfer: "mda", "mta" or "bounce"


def backoff(type_: str) -> int:
    return BACKOFF_TRANSFER if type_ == "mta" else BACKOFF_DELIVERY


def next_try(ctime: int, type_: str, retry: int, now: int) -> int:
    """The first try time at step >= retry that is not in the past (try 0 is now)."""
    base = backoff(type_)
    step = retry
    while step and ctime + base * step * step <= now:
        step += 1
    return ctime + base * step * step if step else ctime


class SortedIndex:
    """evpid -> slot, sorted by evpid, in blocks of unsigned arrays (16 bytes an entry
    and no Python object per entry, where a dict costs about 100): lookups by bisection,
    O(log n); add and remove O(log n + BLOCK).  Serves lookups, ``show queue``'s cursor
    and the selection of a message's envelopes."""
    BLOCK = 512

    def __init__(self) -> None:
        self.keys: list[array] = []
        self.vals: list[array] = []
        self.maxes: list[int] = []
        self.count = 0

    def _find(self, key: int) -> tuple[int, int, bool]:
        """(block, position, found) of ``key``."""
        i = bisect_left(self.maxes, key)
        if i == len(self.maxes):
            return i, 0, False
        block = self.keys[i]
        j = bisect_left(block, key)
        return i, j, j < len(block) and block[j] == key

    def get(self, key: int) -> int | None:
        i, j, found = self._find(key)
        return self.vals[i][j] if found else None

    def __contains__(self, key: int) -> bool:
        return self._find(key)[2]

    def add(self, key: int, val: int) -> None:
        if not self.keys:
            self.keys.append(array("Q", [key]))
            self.vals.append(array("Q", [val]))
            self.maxes.append(key)
            self.count = 1
            return
        i, j, found = self._find(key)
        if found:
            self.vals[i][j] = val
            return
        i = min(i, len(self.maxes) - 1)     # past every block: append to the last one
        keys, vals = self.keys[i], self.vals[i]
        j = bisect_left(keys, key)
        keys.insert(j, key)
        vals.insert(j, val)
        self.maxes[i] = keys[-1]
        self.count += 1
        if len(keys) > 2 * self.BLOCK:
            half = self.BLOCK
            self.keys[i:i + 1] = [keys[:half], keys[half:]]
            self.vals[i:i + 1] = [vals[:half], vals[half:]]
            self.maxes[i:i + 1] = [keys[half - 1], keys[-1]]

    def remove(self, key: int) -> None:
        i, j, found = self._find(key)
        if not found:
            return
        keys = self.keys[i]
        del keys[j]
        del self.vals[i][j]
        self.count -= 1
        if keys:
            self.maxes[i] = keys[-1]
        else:
            del self.keys[i], self.vals[i], self.maxes[i]

    def after(self, key: int):
        """(key, value) of the keys > ``key``, in order."""
        i = bisect_right(self.maxes, key)
        if i == len(self.maxes):
            return
        j = bisect_right(self.keys[i], key)
        yield from zip(self.keys[i][j:], self.vals[i][j:])
        for keys, vals in zip(self.keys[i + 1:], self.vals[i + 1:]):
            yield from zip(keys, vals)

    def between(self, lo: int, hi: int):
        """(key, value) of the keys in [lo, hi], in order."""
        for key, val in self.after(lo - 1):
            if key > hi:
                return
            yield key, val

    def values(self):
        for vals in self.vals:
            yield from vals

    def __iter__(self):
        for keys in self.keys:
            yield from keys

    def __len__(self) -> int:
        return self.count


@dataclass(frozen=True)
class Listing:
    rows: list[tuple[int, str, int, bool, bool]]   # (evpid, runstate, runtime, suspended, held)
    last: int                                       # the last evpid looked at (the cursor)
    more: bool


class RamQueue:
    def __init__(self, warn_intervals=(4 * 3600,), max_inflight: int = MAX_INFLIGHT) -> None:
        self.warn_intervals = list(warn_intervals)
        self.max_inflight = max_inflight
        # the columns, indexed by slot
        self.evpid = array("Q")
        self.ctime = array("q")
        self.expire = array("q")
        self.sched = array("q")        # next try (pending/held), schedule time, or in-flight since
        self.last_bounce = array("q")  # ctime + the warn interval of the last delay notice
        self.meta = array("q")         # state, type, flags, retry (see _STATE_MASK...)
        self.free = array("q")         # slots to reuse
        self.index = SortedIndex()                   # live evpid -> slot, sorted (listing, msgids)
        self.heap: list[int] = []                    # time << 32 | slot
        self.staged: dict[int, list[tuple]] = {}     # msgid -> envelopes not yet committed
        self.paused: set[str] = set()                # agent types on hold ("mda", "mta")
        self.parked = {code: array("q") for code in range(len(TYPES))}
        self.removals: deque[int] = deque()          # evpids whose remove order is due
        self.holdqs: dict[int, dict[int, None]] = {}  # holdq id -> its slots, in order
        self.held_in: dict[int, int] = {}            # slot -> its holdq id
        self.inflight = 0
        self.hold_overflow = 0

    # -- slots ------------------------------------------------------------------------------

    def _alloc(self, evpid: int, type_code: int, ctime: int, expire: int, retry: int,
               last_bounce: int) -> int:
        meta = _PENDING | (type_code << _TYPE_SHIFT) | (retry << _RETRY_SHIFT)
        if self.free:
            slot = self.free.pop()
            self.evpid[slot] = evpid
            self.ctime[slot] = ctime
            self.expire[slot] = expire
            self.sched[slot] = 0
            self.last_bounce[slot] = last_bounce
            self.meta[slot] = meta
        else:
            slot = len(self.meta)
            self.evpid.append(evpid)
            self.ctime.append(ctime)
            self.expire.append(expire)
            self.sched.append(0)
            self.last_bounce.append(last_bounce)
            self.meta.append(meta)
        self.index.add(evpid, slot)
        return slot

    def _free(self, slot: int) -> None:
        evpid = self.evpid[slot]
        self._unhold(slot)
        self.index.remove(evpid)
        self.meta[slot] = _FREE
        self.free.append(slot)

    def _state(self, slot: int) -> int:
        return self.meta[slot] & _STATE_MASK

    def _set_state(self, slot: int, state: int) -> None:
        self.meta[slot] = (self.meta[slot] & ~_STATE_MASK) | state

    def _type(self, slot: int) -> str:
        return TYPES[(self.meta[slot] & _TYPE_MASK) >> _TYPE_SHIFT]

    def _retry(self, slot: int) -> int:
        return self.meta[slot] >> _RETRY_SHIFT

    def _key_time(self, slot: int, meta: int) -> int | None:
        """The heap time of a slot in its current state, None if not in the heap."""
        state = meta & _STATE_MASK
        if state in (_PENDING, _HELD):
            return None if meta & _SUSPENDED else min(self.sched[slot], self.expire[slot])
        if state == _SCHEDULED:
            return self.sched[slot]
        if state == _PARKED:
            return self.expire[slot]
        return None

    def _push(self, slot: int) -> None:
        t = self._key_time(slot, self.meta[slot])
        if t is not None:
            heapq.heappush(self.heap, (t << 32) | slot)

    def _unhold(self, slot: int) -> None:
        holdq = self.held_in.pop(slot, None)
        if holdq is not None:
            slots = self.holdqs[holdq]
            del slots[slot]
            if not slots:
                del self.holdqs[holdq]

    def _pend(self, slot: int, sched: int) -> None:
        """Back to pending (leaving any hold queue), due at ``sched``."""
        self._unhold(slot)
        self._set_state(slot, _PENDING)
        self.sched[slot] = sched
        self._push(slot)

    # -- intake ---------------------------------------------------------------------------

    def stage(self, evpid: int, type_: str, ctime: int, expire: int, retry: int,
              last_bounce: int = 0) -> None:
        self.staged.setdefault(evpid >> 32, []).append((evpid, _TYPE_CODE.get(type_, 0), ctime,
                                                        expire, retry, last_bounce))

    def staged_count(self, msgid: int) -> int:
        return len(self.staged.get(msgid, ()))

    def commit(self, msgid: int, now: int) -> int:
        """Make a message's staged envelopes live; the number of new live envelopes."""
        count = 0
        for evpid, type_code, ctime, expire, retry, last_bounce in self.staged.pop(msgid, ()):
            if evpid in self.index:        # already known (discover twice): keep the live one
                continue
            slot = self._alloc(evpid, type_code, ctime, expire, retry, last_bounce)
            self._pend(slot, next_try(ctime, TYPES[type_code], retry, now))
            count += 1
        return count

    def rollback(self, msgid: int) -> None:
        self.staged.pop(msgid, None)

    # -- the run queue --------------------------------------------------------------------

    def _live(self, key: int) -> tuple[int, int] | None:
        """(time, slot) of a heap entry that still stands, else None."""
        t, slot = key >> 32, key & _SLOT_MASK
        if self._key_time(slot, self.meta[slot]) == t:
            return t, slot
        return None

    def next_batch(self, now: int, limit: int) -> list[Action]:
        """Up to ``limit`` orders, in OpenSMTPD's order within a batch: removals,
        expiries, then bounces, local deliveries and relays."""
        removes: list[Action] = []
        while self.removals and len(removes) < limit:
            evpid = self.removals.popleft()
            slot = self.index.get(evpid)
            if slot is not None and self._state(slot) == _REMOVING:
                removes.append(Action("remove", evpid))
        expires: list[Action] = []
        runs: list[list[Action]] = [[], [], []]      # by type code: mta, mda, bounce
        count = len(removes)
        parked = 0
        heap = self.heap
        while heap and count < limit and parked < PARK_MAX and self.inflight < self.max_inflight:
            if heap[0] >> 32 > now:
                break
            live = self._live(heapq.heappop(heap))
            if live is None:
                continue
            _, slot = live
            evpid = self.evpid[slot]
            if self.expire[slot] <= now:
                expires.append(Action("expire", evpid))
                self._free(slot)
                count += 1
                continue
            type_code = (self.meta[slot] & _TYPE_MASK) >> _TYPE_SHIFT
            if TYPES[type_code] in self.paused:
                self._unhold(slot)
                self._set_state(slot, _PARKED)
                self.parked[type_code].append(slot)
                self._push(slot)
                parked += 1
                continue
            self._unhold(slot)
            self._set_state(slot, _INFLIGHT)
            self.sched[slot] = now
            self.inflight += 1
            runs[type_code].append(Action("transfer" if type_code == 0 else "deliver", evpid,
                                          TYPES[type_code]))
            count += 1
        return removes + expires + runs[2] + runs[1] + runs[0]

    def next_wakeup(self) -> int | None:
        """When the next batch can have work (None: nothing scheduled, or as many
        envelopes in flight as allowed: a result wakes the scheduler)."""
        if self.removals:
            return 0
        if self.inflight >= self.max_inflight:
            return None
        while self.heap:
            live = self._live(self.heap[0])
            if live is not None:
                return live[0]
            heapq.heappop(self.heap)
        return None

    # -- results ----------------------------------------------------------------------------

    def _returned(self, evpid: int) -> int | None:
        slot = self.index.get(evpid)
        if slot is not None and self._state(slot) == _INFLIGHT:
            self.inflight -= 1
        return slot

    def delivered(self, evpid: int) -> bool:
        """ok, permanent failure or loop: the envelope is gone from the queue."""
        slot = self._returned(evpid)
        if slot is None:
            return False
        self._free(slot)
        return True

    def tempfail(self, evpid: int, retry: int, now: int, last_bounce: int = 0) -> int:
        """A temporary failure (the queue counted the try in ``retry``).  Returns the
        warn interval of a delay notice now due, else 0 (OpenSMTPD scheduler.c: the
        first interval w with nexttry >= ctime + w > last bounce)."""
        slot = self._returned(evpid)
        if slot is None:
            return 0
        meta = self.meta[slot]
        self.meta[slot] = (meta & ((1 << _RETRY_SHIFT) - 1)) | (retry << _RETRY_SHIFT)
        if meta & _REMOVED:
            self._to_removal(slot)
            return 0
        type_ = self._type(slot)
        ctime = self.ctime[slot]
        nexttry = next_try(ctime, type_, retry, now)
        self._pend(slot, nexttry)
        if type_ == "bounce":             # never a notice about a notice
            return 0
        last = max(self.last_bounce[slot], last_bounce)
        for warn in self.warn_intervals:
            if not warn:
                break
            stamp = ctime + warn
            if nexttry >= stamp and last < stamp:
                self.last_bounce[slot] = stamp
                return warn
        self.last_bounce[slot] = last
        return 0

    def hold(self, evpid: int, holdq: int, now: int) -> bool:
        """The MTA keeps this envelope aside until its route works again (hold queue
        ``holdq``): it waits there for a release, or until its next retry time.  No
        try is counted.  False if it could not be held (suspended, removed, holdq full)."""
        slot = self._returned(evpid)
        if slot is None:
            return False
        if self.meta[slot] & _REMOVED:
            self._to_removal(slot)
            return False
        retry = self._retry(slot)
        nexttry = next_try(self.ctime[slot], self._type(slot), max(retry, 1), now)
        slots = self.holdqs.get(holdq, {})
        if self.meta[slot] & _SUSPENDED or len(slots) >= HOLDQ_MAX:
            if not self.meta[slot] & _SUSPENDED:
                self.hold_overflow += 1
            self._pend(slot, nexttry)
            return False
        self.holdqs[holdq] = slots
        slots[slot] = None
        self.held_in[slot] = holdq
        self._set_state(slot, _HELD)
        self.sched[slot] = nexttry
        self._push(slot)
        return True

    def release(self, holdq: int, n: int, now: int) -> int:
        """Make up to ``n`` (<= 0: all) envelopes of a hold queue due now."""
        slots = self.holdqs.get(holdq)
        if not slots:
            return 0
        chosen = list(slots) if n <= 0 else list(islice(slots, n))
        for slot in chosen:
            self._pend(slot, now)
        return len(chosen)

    def removed_done(self, evpid: int) -> bool:
        slot = self.index.get(evpid)
        if slot is None:
            return False
        self._free(slot)
        return True

    def _to_removal(self, slot: int) -> None:
        self._unhold(slot)
        self._set_state(slot, _REMOVING)
        self.removals.append(self.evpid[slot])

    # -- admin operations (smtpctl) ---------------------------------------------------------

    def select(self, ident: int) -> list[int]:
        """Slots: 0 = all, an id <= 0xffffffff = every envelope of that message, else one."""
        if ident == 0:
            return list(self.index.values())
        if ident <= 0xFFFFFFFF:
            return [slot for _, slot in self.index.between(ident << 32, (ident << 32) | 0xFFFFFFFF)]
        slot = self.index.get(ident)
        return [] if slot is None else [slot]

    def schedule(self, ident: int, now: int) -> int:
        """Due now, even if suspended (it stays suspended after this try); not in flight."""
        count = 0
        for slot in self.select(ident):
            if self._state(slot) in (_INFLIGHT, _REMOVING):
                continue
            self._unhold(slot)
            self._set_state(slot, _SCHEDULED)
            self.sched[slot] = now
            self._push(slot)
            count += 1
        return count

    def remove(self, ident: int) -> int:
        """Removed without a bounce; one in flight only when it comes back."""
        count = 0
        for slot in self.select(ident):
            meta = self.meta[slot]
            state = meta & _STATE_MASK
            if state == _REMOVING or meta & _REMOVED:
                continue
            if state == _INFLIGHT:
                self.meta[slot] = meta | _REMOVED
            else:
                self._to_removal(slot)
            count += 1
        return count

    def inflight_ids(self, ident: int) -> list[int]:
        """The evpids selected by ``ident`` that are in flight."""
        return [self.evpid[slot] for slot in self.select(ident) if self._state(slot) == _INFLIGHT]

    def suspend(self, ident: int) -> int:
        """``pause envelope``: out of the run queue and hold queues; one in flight is
        only flagged, and not requeued when it comes back."""
        count = 0
        for slot in self.select(ident):
            meta = self.meta[slot]
            state = meta & _STATE_MASK
            if meta & (_SUSPENDED | _REMOVED) or state == _REMOVING:
                continue
            self.meta[slot] = meta | _SUSPENDED
            if state in (_HELD, _PARKED, _SCHEDULED):
                self._unhold(slot)
                self._set_state(slot, _PENDING)
            count += 1
        return count

    def resume_envelopes(self, ident: int, now: int) -> int:
        """``resume envelope``: back in the run queue at its next try time."""
        count = 0
        for slot in self.select(ident):
            meta = self.meta[slot]
            if not meta & _SUSPENDED or meta & _STATE_MASK == _REMOVING:
                continue
            self.meta[slot] = meta & ~_SUSPENDED
            self._push(slot)
            count += 1
        return count

    def pause(self, agent: str) -> None:
        self.paused.add(agent)

    def resume(self, agent: str, now: int) -> None:
        self.paused.discard(agent)
        code = _TYPE_CODE[agent]
        for slot in self.parked[code]:
            meta = self.meta[slot]
            if meta & _STATE_MASK == _PARKED and (meta & _TYPE_MASK) >> _TYPE_SHIFT == code:
                self._set_state(slot, _PENDING)
                self._push(slot)
        self.parked[code] = array("q")

    def listing(self, after: int, limit: int, now: int) -> Listing:
        """Up to ``limit`` envelopes with evpid > after, in order (runtime: seconds to
        the next try if pending, seconds in flight if in flight)."""
        rows = []
        last = after
        looked = 0
        meta, sched = self.meta, self.sched
        for evpid, slot in self.index.after(after):
            if looked == limit:
                return Listing(rows, last, True)
            looked += 1
            last = evpid
            m = meta[slot]
            state = m & _STATE_MASK
            if state == _REMOVING:
                continue
            if state == _INFLIGHT:
                rows.append((evpid, INFLIGHT, now - sched[slot], bool(m & _SUSPENDED), False))
            else:
                rows.append((evpid, PENDING, sched[slot] - now, bool(m & _SUSPENDED), state == _HELD))
        return Listing(rows, last, False)

    def state_of(self, evpid: int) -> str | None:
        """For tests and traces: pending, scheduled, inflight, held, parked, removing."""
        slot = self.index.get(evpid)
        if slot is None:
            return None
        return ("free", "pending", "scheduled", "inflight", "held", "parked", "removing")[self._state(slot)]

    def suspended(self, evpid: int) -> bool:
        slot = self.index.get(evpid)
        return slot is not None and bool(self.meta[slot] & _SUSPENDED)

    def __len__(self) -> int:
        return len(self.index)
