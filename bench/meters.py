"""The benchmarks' instruments, cheap enough not to take the CPU they measure.

bench_mail.py and bench_compare.py share the machine's two cores with the daemon they
measure, so what they read, and how often, is chosen for its cost (docs/performance.md,
"What the benchmark harness itself costs"):

* deliveries into a Maildir are counted by inotify (``IN_CREATE``: Postfix's virtual(8)
  links tmp/ -> new/; ``IN_MOVED_TO``: pysmtpd renames), not by listing new/ every
  20 ms (which walks the whole directory each time, under the lock the daemon's
  renames need); a listing remains the fallback (no inotify, a queue overflow, no
  event for half a second) and the final check;
* memory: RSS (``/proc/PID/statm``, a few counters) every 200 ms; PSS
  (``/proc/PID/smaps_rollup``, for which the kernel walks every page table of the
  process: ~10 ms for pysmtpd's ten processes) every second and at once whenever the
  summed RSS reaches a new high, which is when the peak of PSS comes (more processes,
  more pages);
* CPU: utime + stime + cutime + cstime of a process tree by process title, read at the
  two ends of the load and not in between;
* the daemon's ``smtpctl show stats`` (``key=value`` lines) for the server-side commit
  latency.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import struct
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, TypeVar

# --------------------------------------------------------------------------- delivery count


class Counter:
    """A count of delivered messages and the monotonic time at which each was seen."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count = 0
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.times: list[float] = []

    def set(self, count: int, at: float) -> None:
        with self.lock:
            if count > self.count:
                if self.first_at is None:
                    self.first_at = at
                self.times.extend([at] * (count - self.count))
                self.count = count
                self.last_at = at

    def time_of(self, n: int) -> float | None:
        """When the n-th message (1-based) was seen."""
        with self.lock:
            return self.times[n - 1] if 0 < n <= len(self.times) else None


# <sys/inotify.h>
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_ISDIR = 0x40000000
_EVENT = struct.Struct("iIII")          # wd, mask, cookie, len; then len bytes of name


def parse_inotify_events(buf: bytes) -> list[tuple[int, int, str]]:
    """(watch descriptor, mask, name) of each ``struct inotify_event`` in ``buf`` (the
    name without its NUL padding; "" for an event on the watched directory itself)."""
    out = []
    pos = 0
    while pos + _EVENT.size <= len(buf):
        wd, mask, _cookie, length = _EVENT.unpack_from(buf, pos)
        pos += _EVENT.size
        name = buf[pos:pos + length].split(b"\0", 1)[0].decode(errors="surrogateescape")
        pos += length
        out.append((wd, mask, name))
    return out


class Inotify:
    """inotify(7) through libc (the standard library has no binding)."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        self._add = libc.inotify_add_watch
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")

    def add_watch(self, path: Path, mask: int) -> int:
        wd = self._add(self.fd, os.fsencode(path), mask)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
        return wd

    def read(self) -> bytes:
        try:
            return os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return b""

    def close(self) -> None:
        os.close(self.fd)


def listed_names(directory: Path) -> set[str]:
    try:
        with os.scandir(directory) as it:
            return {e.name for e in it}
    except OSError:
        return set()


class MaildirWatch(threading.Thread):
    """Counts the files that arrive in a Maildir's new/ (``counter``), by inotify.

    A message counts at the time its event is read (at most ``GATHER`` seconds plus
    a wake-up late).  The count is the number of distinct names seen in new/ (messages are never taken
    out of it here): names from the events, united with a listing of new/ whenever one
    is made (right after the watch is set, after a queue overflow, after half a second
    without events, at the end), so no message is counted twice or missed.  new/ need
    not exist yet: its nearest existing ancestor is watched until it does.  Without
    inotify, new/ is listed every ``poll_interval`` seconds (the old way)."""

    name_ = "maildir new/"
    IDLE_LISTING = 0.5            # seconds without an event before new/ is listed again
    GATHER = 0.005                # after a wake-up, let events gather this long: a few
                                  # per read instead of one wake-up per message

    def __init__(self, new_dir: Path, poll_interval: float = 0.02, use_inotify: bool = True) -> None:
        super().__init__(daemon=True, name="maildir-watch")
        self.new_dir = Path(new_dir)
        self.poll_interval = poll_interval
        self.use_inotify = use_inotify
        self.counter = Counter()
        self.stop_event = threading.Event()
        self.names: set[str] = set()
        self.method = "inotify" if use_inotify else "listing"
        self.listings = 0             # how many times new/ was listed (the cost inotify saves)
        self.events = 0
        self._new_wd: int | None = None

    def count(self) -> int:
        """Files in new/ now (a listing)."""
        return len(listed_names(self.new_dir))

    def _list(self, at: float) -> None:
        self.listings += 1
        self.names |= listed_names(self.new_dir)
        self.counter.set(len(self.names), at)

    def run(self) -> None:
        ino = None
        if self.use_inotify:
            try:
                ino = Inotify()
            except (OSError, AttributeError):
                self.method = "listing (no inotify)"
        try:
            if ino is not None:
                self._run_inotify(ino)
            else:
                while not self.stop_event.is_set():
                    self._list(time.monotonic())
                    self.stop_event.wait(self.poll_interval)
        finally:
            if ino is not None:
                ino.close()

    def _watch_deepest(self, ino: Inotify) -> None:
        """Watch new/ if it exists (then list it), else its nearest existing ancestor."""
        path = self.new_dir
        while not path.is_dir() and path.parent != path:
            path = path.parent
        mask = IN_CREATE | IN_MOVED_TO | IN_ONLYDIR
        wd = ino.add_watch(path, mask)
        if path == self.new_dir:
            self._new_wd = wd
            self._list(time.monotonic())

    def _run_inotify(self, ino: Inotify) -> None:
        self._watch_deepest(ino)
        poller = select.poll()
        poller.register(ino.fd, select.POLLIN)
        while not self.stop_event.is_set():
            if not poller.poll(1000 * self.IDLE_LISTING):
                self._list(time.monotonic())        # nothing for a while: make sure
                continue
            self.stop_event.wait(self.GATHER)
            buf = ino.read()
            now = time.monotonic()
            added = False
            for wd, mask, name in parse_inotify_events(buf):
                self.events += 1
                if mask & IN_Q_OVERFLOW:
                    self._list(now)
                elif wd == self._new_wd and mask & (IN_CREATE | IN_MOVED_TO) and not mask & IN_ISDIR:
                    if name not in self.names:
                        self.names.add(name)
                        added = True
                elif self._new_wd is None and mask & IN_ISDIR:
                    self._watch_deepest(ino)        # an ancestor of new/ (or new/) appeared
            if added:
                self.counter.set(len(self.names), now)

    def final_check(self) -> dict:
        """A last listing of new/ (after ``stop``): files the count missed are added
        (at the time of this check) and said so."""
        listed = listed_names(self.new_dir)
        missed = len(listed - self.names)
        self.names |= listed
        self.counter.set(len(self.names), time.monotonic())
        return {"maildir_count": self.method, "maildir_missed_by_count": missed,
                "maildir_listings": self.listings}

    def stop(self) -> None:
        self.stop_event.set()
        self.join(2)


# --------------------------------------------------------------------------- /proc


def machine_cpu_ticks(text: str | None = None) -> tuple[int, int]:
    """(steal, total) clock ticks of the whole machine since boot, from /proc/stat's
    ``cpu`` line (``text``: that file's content, for the tests).  Steal is the time a
    virtual CPU was ready to run while the hypervisor ran something else: on a shared
    VM it comes and goes, and a run that loses 10 % of its CPU to it is slower for
    that alone."""
    if text is None:
        with open("/proc/stat") as f:
            text = f.readline()
    fields = text.split("\n", 1)[0].split()
    if not fields or fields[0] != "cpu":
        raise ValueError("no cpu line")
    # user nice system idle iowait irq softirq steal [guest guest_nice: inside user]
    ticks = [int(x) for x in fields[1:9]]
    ticks += [0] * (8 - len(ticks))
    return ticks[7], sum(ticks)


def steal_share(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    """The share of the machine's CPU time stolen between two machine_cpu_ticks()."""
    total = after[1] - before[1]
    return round((after[0] - before[0]) / total, 3) if total > 0 else None


def stat_fields(pid: int) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command name (state is [0], ppid [1],
    process group [2], session [3], utime..cstime [11:15])."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None


def cmdline_title(pid: int) -> str | None:
    """argv[0] (pysmtpd's are set by setproctitle); "" for a zombie; None once gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return None


def statm_rss_kib(pid: int) -> int:
    """Resident set size from /proc/PID/statm (kept counters: no page-table walk)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
    except (OSError, ValueError, IndexError):
        return 0


def rollup_pss_kib(pid: int) -> int:
    """Proportional set size (``Pss:`` of /proc/PID/smaps_rollup), 0 if unreadable."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def tree_ticks(fields: list[bytes]) -> int:
    """utime + stime + cutime + cstime: a process and the children it has reaped."""
    return int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])


def cpu_ticks_by_title(members: Iterable[tuple[int, str, list[bytes]]]) -> dict[str, int]:
    """CPU ticks (a process and the children it reaped) summed per title, over
    (pid, title, stat fields).  A zombie (no title any more, not yet reaped) counts
    under its parent's title, where its time goes once reaped."""
    members = list(members)
    title_of = {pid: title for pid, title, _ in members}
    out: dict[str, int] = {}
    for pid, title, fields in members:
        if not title:
            title = title_of.get(int(fields[1])) or "(exited)"
        out[title] = out.get(title, 0) + tree_ticks(fields)
    return out


def ticks_spent(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """What each title spent between two ``cpu_ticks_by_title`` readings."""
    return {t: after.get(t, 0) - before.get(t, 0) for t in sorted(set(before) | set(after))}


T = TypeVar("T")


def settled(read: Callable[[], T], total: Callable[[T], int], deadline: float,
            window: float = 0.5, slack: int = 2) -> T:
    """``read()`` once the process tree stops spending (``total`` grows by at most
    ``slack`` ticks over ``window`` seconds: the work that follows the last delivery,
    such as removing queue files, belongs to the messages), or at ``deadline``."""
    last = read()
    while time.monotonic() < deadline:
        time.sleep(window)
        now = read()
        if total(now) - total(last) <= slack:
            return now
        last = now
    return last


def per_message(seconds_by_title: dict[str, float], accepted: int) -> dict[str, float]:
    """CPU seconds per title as ms per message."""
    return {t: round(1000 * v / accepted, 2) for t, v in seconds_by_title.items()}


class LoadCpu:
    """The CPU of the load alone: a process tree's ticks per title (``read``:
    ``cpu_ticks_by_title`` of its members, so delivery workers count through the
    cutime/cstime of the process that reaped them, or by their own line while alive),
    from its creation, just before the load, to the moment the tree's CPU settles after
    the last delivery (``finish``); and this script's own CPU over the same time,
    under ``self_title`` (the asyncio client, if it is the load, and the meters)."""

    def __init__(self, read: Callable[[], dict[str, int]], self_title: str) -> None:
        self.read = read
        self.self_title = self_title
        self.hz = os.sysconf("SC_CLK_TCK")
        self.before = read()
        self.self_before = time.process_time()
        self.t_before = time.monotonic()
        self.machine_before = machine_cpu_ticks()
        self.by_title: dict[str, float] | None = None
        self.seconds = 0.0
        self.steal: float | None = None

    def finish(self, deadline: float) -> None:
        after = settled(self.read, lambda d: sum(d.values()), deadline)
        spent = ticks_spent(self.before, after)
        self.by_title = {t: round(v / self.hz, 3) for t, v in spent.items()}
        self.by_title[self.self_title] = round(time.process_time() - self.self_before, 3)
        self.seconds = time.monotonic() - self.t_before
        self.steal = steal_share(self.machine_before, machine_cpu_ticks())

    def results(self, accepted: int) -> dict:
        daemon = sum(v for t, v in self.by_title.items() if t != self.self_title)
        out = {"cpu_window_seconds": round(self.seconds, 2),
               "cpu_seconds_by_process": self.by_title,
               "daemon_cpu_seconds": round(daemon, 3),
               # this script's share of the machine's CPUs over the window: its cost
               "bench_cpu_share": round(self.by_title[self.self_title]
                                        / (self.seconds * (os.cpu_count() or 1)), 4)
               if self.seconds else None,
               # the machine's CPU time the hypervisor took over the window (a VM's noise)
               "steal_share": self.steal}
        if accepted:
            out["cpu_ms_per_message"] = per_message(self.by_title, accepted)
            out["daemon_cpu_ms_per_message"] = round(1000 * daemon / accepted, 2)
        return out


RSS_INTERVAL = 0.2    # seconds between two readings of RSS (and of the tree's members)
PSS_EVERY = 5         # PSS at every 5th reading (each second), and at each new RSS high


class MemoryMeter(threading.Thread):
    """Peak RSS and PSS summed over a process tree (``members()``: (pid, title) of its
    live processes), and per title.

    RSS is read every ``interval`` seconds; PSS every ``pss_every`` ticks, and at once
    when the summed RSS passes the highest RSS at which PSS was read by ``margin_kib``
    (a new process, a grown one): PSS never exceeds RSS and rises with it, so its peak
    is read when it comes, not up to ``pss_every`` ticks later."""

    def __init__(self, members: Callable[[], list[tuple[int, str]]], interval: float = RSS_INTERVAL,
                 pss_every: int = PSS_EVERY, margin_kib: int = 1024, name: str = "memory-meter") -> None:
        super().__init__(daemon=True, name=name)
        self.members = members
        self.interval = interval
        self.pss_every = max(1, pss_every)
        self.margin_kib = margin_kib
        self.stop_event = threading.Event()
        self.ticks = self.samples = self.pss_samples = self.pss_triggered = 0
        self.peak_kib = self.peak_procs = self.max_procs = 0
        self.peak_by_title: dict[str, int] = {}
        self.last_kib = self.last_pss_kib = 0
        self.peak_pss_kib = 0
        self.peak_pss_by_title: dict[str, int] = {}
        self._pss_trigger_kib = 0

    def observe(self, procs: list[tuple[int, str]]) -> None:
        """A hook for subclasses: the members seen at each tick."""

    def wants_pss(self, total_rss_kib: int) -> bool:
        return self.ticks % self.pss_every == 0 or total_rss_kib > self._pss_trigger_kib

    def sample(self, pss: bool | None = None) -> int:
        """One tick (``pss``: force PSS on or off); returns the summed RSS in KiB."""
        procs = self.members()
        self.observe(procs)
        rss = {pid: statm_rss_kib(pid) for pid, _ in procs}
        total = sum(rss.values())
        by_title: dict[str, int] = {}
        for pid, title in procs:
            by_title[title] = by_title.get(title, 0) + rss[pid]
        for title, kib in by_title.items():
            if kib > self.peak_by_title.get(title, 0):
                self.peak_by_title[title] = kib
        if total > self.peak_kib:
            self.peak_kib, self.peak_procs = total, len(procs)
        self.max_procs = max(self.max_procs, len(procs))
        self.last_kib = total
        if pss if pss is not None else self.wants_pss(total):
            if pss is None and self.ticks % self.pss_every:
                self.pss_triggered += 1
            self._sample_pss(procs)
            self._pss_trigger_kib = max(self._pss_trigger_kib, total + self.margin_kib)
        self.ticks += 1
        self.samples += 1
        return total

    def _sample_pss(self, procs: list[tuple[int, str]]) -> None:
        total = 0
        by_title: dict[str, int] = {}
        for pid, title in procs:
            kib = rollup_pss_kib(pid)
            total += kib
            by_title[title] = by_title.get(title, 0) + kib
        for title, kib in by_title.items():
            if kib > self.peak_pss_by_title.get(title, 0):
                self.peak_pss_by_title[title] = kib
        self.peak_pss_kib = max(self.peak_pss_kib, total)
        self.last_pss_kib = total
        self.pss_samples += 1

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self.stop_event.set()
        self.join(2)


# --------------------------------------------------------------------------- show stats

COMMIT_LATENCY = "smtp.commit.latency"
LATENCY_FIELDS = (("count", "count"), ("p50", "p50_ms"), ("p90", "p90_ms"), ("p99", "p99_ms"),
                  ("max", "max_ms"))


def parse_stats(text: str) -> dict[str, str]:
    """``smtpctl show stats`` output (``key=value`` lines) as a dict; other lines are
    skipped."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip():
            out[key.strip()] = value.strip()
    return out


def _number(text: str | None) -> float | int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return None


def server_commit_latency(stats: dict[str, str]) -> dict[str, float | int | None]:
    """The daemon's own commit latency (``smtp.commit.latency.*`` of ``show stats``:
    end of DATA to the reply, in pony, since the daemon started) as count, p50, p90,
    p99 and max in ms; a key the daemon does not report is None."""
    return {out: _number(stats.get(f"{COMMIT_LATENCY}.{key}")) for out, key in LATENCY_FIELDS}


def latency_line(lat: dict | None) -> str:
    """``p50 X p90 Y p99 Z max W ms (n=N)``, or why there is none."""
    if not lat or all(lat.get(k) is None for k in ("p50", "p90", "p99", "max")):
        return "not reported"
    return (f"p50 {lat.get('p50')} p90 {lat.get('p90')} p99 {lat.get('p99')} max {lat.get('max')} ms"
            f" (n={lat.get('count')})")
