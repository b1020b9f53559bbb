#!/usr/bin/env python3
"""Whole-daemon CPU profile of pysmtpd under load: py-spy over bench/bench_mail.py.

Runs ``bench/bench_mail.py`` (every option it does not know itself is passed through;
``--client smtp-source`` unless another client is named), attaches
``py-spy record --subprocesses --format raw`` to the daemon's parent as soon as it
exists (control, lka, queue, scheduler, pony and the delivery workers are all its
subprocesses), stops py-spy when the bench ends, and writes into ``--out``:

* ``spy.txt``: the raw dump (collapsed stacks, one line per distinct stack and process);
* ``bench.out``: bench_mail's summary line and JSON line;
* ``summary.md`` and ``summary.json``: per process, samples, share and CPU ms per
  message; per activity (the ``RULES`` table below) and process, CPU ms per message.

The CPU of a process is measured, not sampled: bench_mail's
``cpu_seconds_by_process_with_startup`` (utime + stime from /proc over each process's
life, as py-spy samples it from the start; ``cpu_seconds_by_process`` from a tree
older than that key).  py-spy's samples only say how that CPU divides between
activities: a process's CPU is split in proportion to its samples per activity.
py-spy samples a thread while the kernel shows it runnable (state R: on a CPU, or
waiting for one), so on an oversubscribed machine the points where a thread wakes up
(the event loop, a syscall that just returned) gather extra samples; the run-queue
wait per process (from /proc/PID/task/TID/schedstat) is reported beside to show how
much.  py-spy itself costs CPU: throughput under the profiler is lower than without.
The daemon runs with one exec per child (``PYSMTPD_SPAWN=exec``, unless set otherwise):
py-spy cannot read a chrooted child's interpreter, and children forked by the zygote
chroot before py-spy finds them; the code they run is the same, only start-up and
memory differ.

Needs py-spy (``pip install py-spy``, into the venv that runs the bench; not a
dependency of pysmtpd or of its tests) and the right to ptrace the daemon (root, as
the issue 12 benchmarks run).

    .venv/bin/pip install py-spy                  # or: pip install -e ".[bench]"
    .venv/bin/python bench/bench_profile.py --mode maildir -n 2000 --out /tmp/prof-maildir
    .venv/bin/python bench/bench_profile.py --mode relay --hold -n 2000 --out /tmp/prof-relay
    # summarise a dump again (e.g. with a changed RULES table), or compare with an earlier run:
    .venv/bin/python bench/bench_profile.py --summarise /tmp/prof-maildir --compare /tmp/before
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable, Iterable

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PARENT_TITLE = "smtpd: [priv]"
WORKER = "delivery worker"
BOOT_TIMEOUT = 60.0

# --------------------------------------------------------------------------- raw format
#
# One line per distinct stack: ``frame;frame;...;frame COUNT``, root first.  With
# --subprocesses each stack starts with one frame per process, root process first:
# ``process PID:"CMDLINE"``.  A command line may hold ';' and '"' (the children's
# ``python -c "...; ...; main()" -x queue ...``), so a process frame ends at the
# first '";' that is followed by another process frame or by a Python frame
# (``function (file:line)``), or at the end of the stack.

_PROCESS_FRAME = re.compile(
    r'process (\d+):"(.*?)"(?:;(?=process \d+:"|[^ ;]+ \([^;]*\)(?:;|$))|$)')


@dataclasses.dataclass(frozen=True)
class Frame:
    function: str
    file: str
    line: int       # 0 when py-spy ran with --nolineno


@dataclasses.dataclass(frozen=True)
class Stack:
    processes: tuple[tuple[int, str], ...]    # (pid, command line), root process first
    frames: tuple[Frame, ...]                 # root first, leaf last
    count: int


def parse_frame(text: str) -> Frame:
    """``Mesh.send (common/ipc.py:147)`` -> Frame("Mesh.send", "common/ipc.py", 147)."""
    function, sep, rest = text.partition(" (")
    if not sep or not rest.endswith(")"):
        return Frame(text, "", 0)
    location = rest[:-1]
    file, colon, line = location.rpartition(":")
    if colon and line.isdigit():
        return Frame(function, file, int(line))
    return Frame(function, location, 0)


def parse_raw_line(line: str) -> Stack | None:
    """One line of py-spy's raw output; None for a blank or malformed line."""
    text, _, count = line.rstrip("\n").rpartition(" ")
    if not text or not count.isdigit():
        return None
    processes = []
    pos = 0
    while (m := _PROCESS_FRAME.match(text, pos)) is not None:
        processes.append((int(m.group(1)), m.group(2)))
        pos = m.end()
    rest = text[pos:]
    frames = tuple(parse_frame(f) for f in rest.split(";")) if rest else ()
    return Stack(tuple(processes), frames, int(count))


def parse_raw(lines: Iterable[str]) -> list[Stack]:
    return [s for s in map(parse_raw_line, lines) if s is not None]


_EXE_NAME = re.compile(r"(?:^|\s)-x\s+(\w+)")


def process_label(processes: tuple[tuple[int, str], ...]) -> str:
    """Which of the daemon's processes a stack comes from.  The root process is the
    one py-spy was attached to, the parent: "priv" (whatever its command line said
    then).  Below it, by the innermost process frame: a child started with ``-x NAME``
    (or already titled ``smtpd: NAME``) is NAME; a fork of the parent (its title, or
    its command line) is a delivery worker; anything else is named by its command."""
    if not processes:
        return "unknown"
    if len(processes) == 1:
        return "priv"
    cmdline = processes[-1][1]
    if "smtpd.zygote" in cmdline:
        return "zygote"                         # forks the children, which show its command line at first
    if (m := _EXE_NAME.search(cmdline)) is not None:
        return m.group(1)
    if cmdline.startswith(PARENT_TITLE):
        return WORKER
    if cmdline == processes[0][1]:
        return "child seen before its exec"     # py-spy keeps the command line it first saw
    if cmdline.startswith("smtpd: "):
        return cmdline[len("smtpd: "):].split()[0]
    words = cmdline.split()
    return "other: " + (os.path.basename(words[0]) if words else "?")


def title_of(label: str) -> str:
    """The process title bench_mail reports CPU under (workers keep the parent's)."""
    if label in ("priv", WORKER):
        return PARENT_TITLE
    return f"smtpd: {label}" if re.fullmatch(r"\w+", label) else label


# --------------------------------------------------------------------------- activities
#
# The classifier, in one table.  A stack gets the activity of the first rule that
# matches, looked for in this order:
#   1. rules of scope "stack", in table order, against every frame of the stack
#      (what runs inside logging is logging's cost, whatever called it);
#   2. rules of scope "frame", from the leaf frame up: the nearest frame that matches
#      any rule decides, and within one frame the first rule in table order.
# A rule matches a frame by its file (py-spy's short path: ``smtpd/queue_fs.py``,
# ``zmq/sugar/socket.py``, ``asyncio/runners.py``), its function, and/or the text
# of the source line the frame is at (C calls such as os.fsync have no frame of
# their own: their time shows on the Python line that calls them).
# asyncio's streams match no rule: their writes count for the code using them (the
# MTA's SMTP client).  No frame matched: "other".  No Python frame at all: an
# interpreter starting or exiting (NO_FRAME).

STACK, FRAME = "stack", "frame"
STARTUP = "startup/imports/config"
NO_FRAME = "interpreter start/exit (no Python frame)"
IPC = "IPC send/receive (zmq, ipc.py, fd passing)"
NATIVE = {"zmq": "IPC: ZeroMQ I/O threads (native, from schedstat)",
          "libuv": "uvloop worker threads (native: getaddrinfo..., from schedstat)"}
OTHER = "other"


@dataclasses.dataclass(frozen=True)
class Rule:
    activity: str
    scope: str = FRAME
    file: str | None = None       # regex, searched in the frame's file
    function: str | None = None   # regex, searched in the frame's function
    code: str | None = None       # regex, searched in the frame's source line

    def matches(self, frame: Frame, source_line: Callable[[str, int], str]) -> bool:
        if self.file is not None and not re.search(self.file, frame.file):
            return False
        if self.function is not None and not re.search(self.function, frame.function):
            return False
        if self.code is not None and not re.search(self.code, source_line(frame.file, frame.line)):
            return False
        return True


_OURS = r"^(smtpd|common)/"
RULES: tuple[Rule, ...] = (
    Rule(STARTUP, STACK, file=r"^<frozen importlib|^importlib/"),
    Rule(STARTUP, STACK, file=r"^smtpd/", function=r"^(prepare|load_config|check_config|preload|build_argparser)$"),
    Rule("stats/trace", STACK,
         file=r"^common/(stat|trace)\.py$|^smtpd/(stat_backend|metrics|control_trace|queue_profile)\.py$"),
    Rule("logging", STACK, file=r"^logging/|^common/log\.py$"),
    Rule("fsync/syncfs", file=_OURS, code=r"\bf(data)?sync\(|syncfs|\bos\.sync\("),
    Rule("fork/exec/spawn", file=_OURS, code=r"\bfork\(|\bexecv|posix_spawn|Popen\(|create_subprocess"),
    Rule("fork/exec/spawn", file=r"(^|/)subprocess\.py$|^asyncio/(base_)?subprocess\.py$|^multiprocessing/"),
    Rule("files: writes/renames/unlinks", file=_OURS,
         code=r"\bos\.(rename|replace|unlink|remove|link|mkdir|makedirs|rmdir|write|pwrite|writev|"
              r"sendfile|ftruncate|fchmod|fchown)\(|\.(write_bytes|write_text|mkdir|unlink)\("),
    Rule(STARTUP, file=r"^smtpd/(parse\w*|config\w*)\.py$|^common/privsep\.py$|^(argparse|gettext)\.py$"),
    Rule("TLS", file=r"^ssl\.py$|^asyncio/sslproto\.py$|^smtpd/tls\.py$"),
    Rule("SMTP parsing", file=r"^smtpd/(smtp_proto|dsn_params|proxy_v2)\.py$"),
    Rule("IPC encode/decode", file=r"^common/messages\.py$|^msgspec/"),
    Rule(IPC, file=r"^zmq/|^common/ipc\.py$|^smtpd/(fd_channel|fdpass)\.py$|^socket\.py$"),
    Rule("event loop and thread wake-ups",
         file=r"^common/aio\.py$|^asyncio/(?!streams\.py)|^(uvloop|concurrent)/|^(selectors|threading|queue)\.py$"),
    Rule("filters", file=r"^smtpd/(smtp_filters|filter_\w+|lka_filter)\.py$"),
    Rule("SMTP session logic", file=r"^smtpd/(smtp_session|pony|listeners|auth|enqueue)\.py$|^common/submission\.py$"),
    Rule("MTA (relay client)", file=r"^smtpd/(mta\w*|smtp_client|relay_url|dns)\.py$"),
    Rule("expansion/ruleset/tables (lka)",
         file=r"^smtpd/(lka|expand\w*|ruleset|forward|mda_variables)\.py$|^smtpd/table/"),
    Rule("queue logic (commit, envelopes)", file=r"^smtpd/(queue|queue_bounce|bounce)\.py$|^common/(envelope|ids)\.py$"),
    Rule("files: writes/renames/unlinks",
         file=r"^smtpd/(queue_fs|maildir|mailbox|delivery_\w+)\.py$|^(pathlib|shutil|tempfile|os)\.py$"),
    Rule("delivery dispatch (parent, workers, mda)", file=r"^smtpd/(parent|local_delivery|mda)\.py$"),
    Rule("scheduling", file=r"^smtpd/(scheduler_ram|scheduler)\.py$"),
    Rule("control", file=r"^smtpd/(control\w*|introspection|offline)\.py$"),
)

ACTIVITIES = tuple(dict.fromkeys([r.activity for r in RULES] + list(NATIVE.values()) + [NO_FRAME, OTHER]))


def _no_source(file: str, line: int) -> str:
    return ""


def classify(frames: tuple[Frame, ...], source_line: Callable[[str, int], str] = _no_source,
             rules: tuple[Rule, ...] = RULES) -> str:
    """The activity of one stack (frames root first), by ``rules`` (see above)."""
    if not frames:
        return NO_FRAME
    for rule in rules:
        if rule.scope == STACK and any(rule.matches(f, source_line) for f in frames):
            return rule.activity
    for frame in reversed(frames):
        for rule in rules:
            if rule.scope == FRAME and rule.matches(frame, source_line):
                return rule.activity
    return OTHER


class SourceLines:
    """``source_line(file, line)`` for the classifier: py-spy's short paths resolved
    against the profiled tree, then the standard library."""

    def __init__(self, roots: Iterable[Path]) -> None:
        self.roots = [Path(r) for r in roots]
        self._files: dict[str, list[str]] = {}

    def __call__(self, file: str, line: int) -> str:
        if file not in self._files:
            self._files[file] = []
            for root in self.roots:
                try:
                    self._files[file] = (root / file).read_text(errors="replace").splitlines()
                    break
                except (OSError, ValueError):
                    continue
        lines = self._files[file]
        return lines[line - 1] if 0 < line <= len(lines) else ""


# --------------------------------------------------------------------------- summary

def summarise(stacks: list[Stack], bench: dict, source_line: Callable[[str, int], str] = _no_source,
              sched: dict[str, dict[str, float]] | None = None, top: int = 8,
              pid_labels: dict[int, str] | None = None) -> dict:
    """Samples per process and activity, scaled to CPU ms per message by the CPU each
    process title used (bench_mail's ``cpu_seconds_by_process_with_startup``: whole
    lives, as py-spy samples them; ``cpu_seconds_by_process`` in an older tree's JSON);
    processes of one title (the parent and its delivery workers) share it by their samples.

    ``sched`` (``sched_totals``: per process label, seconds of ``cpu``, run-queue
    ``wait``, and the CPU of the native threads py-spy cannot sample, ``zmq_cpu`` and
    ``libuv_cpu``): their share of a process's CPU is an activity of its own, and only
    the rest is divided by samples.

    ``pid_labels``: the label of each child by PID as /proc showed it during the run,
    which corrects py-spy's command line of a child it first saw before its exec."""
    samples: Counter[str] = Counter()
    by_activity: dict[str, Counter[str]] = defaultdict(Counter)
    leaves: dict[str, Counter[tuple[str, str]]] = defaultdict(Counter)
    pids: dict[str, set[int]] = defaultdict(set)
    for s in stacks:
        label = process_label(s.processes)
        if pid_labels and len(s.processes) > 1:
            label = pid_labels.get(s.processes[-1][0], label)
        activity = classify(s.frames, source_line)
        samples[label] += s.count
        by_activity[label][activity] += s.count
        if s.processes:
            pids[label].add(s.processes[-1][0])
        leaf = s.frames[-1] if s.frames else Frame("(no Python frame)", "", 0)
        where = f"{leaf.function} ({leaf.file}:{leaf.line})" if leaf.file else leaf.function
        leaves[label][(where, activity)] += s.count
    accepted = bench.get("accepted") or 0
    cpu_by_title = (bench.get("cpu_seconds_by_process_with_startup")
                    or bench.get("cpu_seconds_by_process") or {})
    # How the CPU of one title divides between its processes (the parent and its
    # workers): by their measured CPU where schedstat saw them all, else by samples.
    weight: dict[str, float] = {}
    for label, n in samples.items():
        sharing = [x for x in samples if title_of(x) == title_of(label)]
        by_cpu = sched is not None and all(x in sched for x in sharing)
        weight[label] = sched[label]["cpu"] if by_cpu else n
    title_weight: Counter[str] = Counter()
    title_samples: Counter[str] = Counter()
    for label, n in samples.items():
        title_weight[title_of(label)] += weight[label]
        title_samples[title_of(label)] += n
    total_samples = sum(samples.values())
    processes = {}
    for label, n in samples.most_common():
        title = title_of(label)
        cpu = cpu_by_title.get(title)
        cpu_s = cpu * weight[label] / title_weight[title] if cpu is not None and title_weight[title] else None
        if cpu_s is None and sched is not None and label in sched:
            cpu_s = sched[label]["cpu"]         # no title of its own in bench_mail's figures (the zygote)
        ms = 1000 * cpu_s / accepted if cpu_s is not None and accepted else None
        own = (sched or {}).get(label)
        native = {kind: own[f"{kind}_cpu"] / own["cpu"] if own and own["cpu"] > 0 else 0.0
                  for kind in NATIVE}
        python_share = 1 - sum(native.values())
        activities = {a: (ms * python_share * c / n if ms is not None else None)
                      for a, c in by_activity[label].most_common()}
        for kind, share in native.items():
            if share:
                activities[NATIVE[kind]] = ms * share if ms is not None else None
        row = {"samples": n, "share_of_samples": n / total_samples, "processes": len(pids[label]),
               "cpu_seconds": cpu_s, "cpu_ms_per_message": ms,
               "activities_ms_per_message": activities,
               "activities_samples": dict(by_activity[label].most_common()),
               "top_leaves": [{"frame": w, "activity": a, "samples": c}
                              for (w, a), c in leaves[label].most_common(top)]}
        if own and accepted:
            row["schedstat_cpu_ms_per_message"] = 1000 * own["cpu"] / accepted
            row["runqueue_wait_ms_per_message"] = 1000 * own["wait"] / accepted
            row["zmq_io_thread_share"] = native["zmq"]
        processes[label] = row
    totals: Counter[str] = Counter()
    for row in processes.values():
        for a, ms in row["activities_ms_per_message"].items():
            if ms is not None:
                totals[a] += ms
    return {"samples": total_samples, "accepted": accepted, "processes": processes,
            "activity_totals_ms_per_message": dict(totals.most_common()),
            "unprofiled_cpu_ms_per_message": {
                t: 1000 * v / accepted for t, v in cpu_by_title.items()
                if accepted and t.startswith("smtpd") and not title_samples.get(t)}}


PROCESS_ORDER = ("priv", WORKER, "zygote", "control", "lka", "queue", "scheduler", "pony")


def _ordered(labels: Iterable[str]) -> list[str]:
    labels = list(labels)
    known = [p for p in PROCESS_ORDER if p in labels]
    return known + sorted(set(labels) - set(known))


def _f(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def markdown(summary: dict, meta: dict) -> str:
    """The two tables of docs/performance.md, with what they were measured under."""
    out = []
    b = meta.get("bench", {})
    out.append(f"{meta.get('title', 'profile')}: mode {b.get('mode')}{' --hold' if b.get('hold') else ''}, "
               f"n={b.get('n')}, {b.get('sessions')} sessions, client {b.get('client')}; "
               f"accepted {b.get('accepted')} at {b.get('accepted_per_s')} msg/s, delivered "
               f"{b.get('delivered')} at {b.get('delivered_per_s')} msg/s (under py-spy); "
               f"py-spy {meta.get('py_spy_mode', '?')} at {meta.get('rate', '?')} Hz, "
               f"{summary['samples']} samples; load average {meta.get('load_before', '?')} before, "
               f"{meta.get('load_after', '?')} after; {b.get('nproc')} cores; tree {meta.get('commit', '?')}.")
    out.append("")
    procs = summary["processes"]
    labels = _ordered(procs)
    out.append("| process | samples | share of samples | CPU ms/msg | of which ZeroMQ I/O threads "
               "| run-queue wait ms/msg |")
    out.append("|---|---:|---:|---:|---:|---:|")
    total_ms = 0.0
    for p in labels:
        r = procs[p]
        total_ms += r["cpu_ms_per_message"] or 0.0
        name = f"{p} ({r['processes']})" if p == WORKER else p
        zmq = r.get("zmq_io_thread_share")
        out.append(f"| {name} | {r['samples']} | {100 * r['share_of_samples']:.1f} % | "
                   f"{_f(r['cpu_ms_per_message'])} | {'n/a' if zmq is None else f'{100 * zmq:.0f} %'} | "
                   f"{_f(r.get('runqueue_wait_ms_per_message'))} |")
    out.append(f"| **all** | {summary['samples']} | 100 % | **{total_ms:.2f}** | | |")
    missed = summary.get("unprofiled_cpu_ms_per_message") or {}
    if missed:
        out.append("")
        out.append("NOT SAMPLED by py-spy (CPU ms/msg, left out of both tables): "
                   + ", ".join(f"{t} {ms:.2f}" for t, ms in sorted(missed.items())))
    totals = summary["activity_totals_ms_per_message"]
    startup = totals.get(STARTUP, 0.0) + totals.get(NO_FRAME, 0.0)
    out.append("")
    out.append(f"Of the {total_ms:.2f} ms, {startup:.2f} are the daemon's start and exit ({STARTUP}, "
               f"{NO_FRAME}) spread over the run's messages: {total_ms - startup:.2f} ms per message "
               "without them.")
    out.append("")
    out.append("CPU ms per message by activity (rows) and process (columns):")
    out.append("")
    out.append("| activity | " + " | ".join(labels) + " | **all** |")
    out.append("|---|" + "---:|" * (len(labels) + 1))
    for a, total in summary["activity_totals_ms_per_message"].items():
        cells = [procs[p]["activities_ms_per_message"].get(a) for p in labels]
        out.append(f"| {a} | " + " | ".join("" if c is None else _f(c) for c in cells)
                   + f" | **{_f(total)}** |")
    return "\n".join(out) + "\n"


def markdown_leaves(summary: dict) -> str:
    out = ["Top leaf frames per process (samples; the activity they count under):", ""]
    for p in _ordered(summary["processes"]):
        r = summary["processes"][p]
        out.append(f"- {p}: " + "; ".join(f"{x['frame']} {x['samples']} ({x['activity']})"
                                          for x in r["top_leaves"]))
    return "\n".join(out) + "\n"


def compare(before: dict, after: dict) -> str:
    """Before -> after, CPU ms per message, per process and per activity."""
    out = ["| | before ms/msg | after ms/msg | change |", "|---|---:|---:|---:|"]
    bp, ap = before["processes"], after["processes"]

    def row(name: str, x: float | None, y: float | None) -> str:
        delta = "" if x is None or y is None else f"{y - x:+.2f}"
        return f"| {name} | {_f(x)} | {_f(y)} | {delta} |"
    for p in _ordered(set(bp) | set(ap)):
        out.append(row(f"process {p}", bp.get(p, {}).get("cpu_ms_per_message"),
                       ap.get(p, {}).get("cpu_ms_per_message")))
    bt, at = before["activity_totals_ms_per_message"], after["activity_totals_ms_per_message"]
    for a in sorted(set(bt) | set(at), key=lambda a: -max(bt.get(a, 0), at.get(a, 0))):
        out.append(row(a, bt.get(a, 0.0), at.get(a, 0.0)))     # no sample there: none of its CPU
    out.append(row("**all**", sum(bt.values()), sum(at.values())))
    start = (STARTUP, NO_FRAME)
    out.append(row("**all without start and exit**", sum(v for a, v in bt.items() if a not in start),
                   sum(v for a, v in at.items() if a not in start)))
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- running

def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _stat_fields(pid: int) -> list[bytes] | None:
    """/proc/PID/stat after the command name: [state, ppid, pgrp, ...]."""
    data = _read(f"/proc/{pid}/stat")
    return data.rsplit(b")", 1)[1].split() if data else None


def find_daemon(bench_pid: int) -> int | None:
    """The daemon's parent: the child of bench_mail that runs ``-m smtpd``."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if not fields or int(fields[1]) != bench_pid:
            continue
        argv = (_read(f"/proc/{entry.name}/cmdline") or b"").split(b"\0")
        if argv[0].startswith(PARENT_TITLE.encode()) or b"smtpd" in argv[1:3] and b"-m" in argv[1:3]:
            return int(entry.name)
    return None


NATIVE_THREADS = {b"ZMQbg": "zmq", b"libuv-worker": "libuv"}   # thread name prefix -> kind


class SchedSampler(threading.Thread):
    """Every ``interval``, the run time and run-queue wait (/proc/PID/task/TID/schedstat)
    of every thread of the daemon's process group, by process label; the native
    threads py-spy cannot sample (ZeroMQ's I/O threads, uvloop's resolver pool) are
    told apart by their names."""

    def __init__(self, pgid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True, name="schedstat")
        self.pgid, self.interval = pgid, interval
        self.stop_event = threading.Event()
        self.labels: dict[int, str] = {}
        self.threads: dict[tuple[int, int], dict] = {}

    def _label(self, pid: int) -> str | None:
        """The label of the latest command line seen: a child forked by the parent
        shows the parent's until it execs, and its title once it set one."""
        cmdline = (_read(f"/proc/{pid}/cmdline") or b"").replace(b"\0", b" ").decode(errors="replace")
        if cmdline:                             # else exiting (a zombie): keep what was seen before
            outer = ((self.pgid, PARENT_TITLE),) if pid != self.pgid else ()   # the parent leads the group
            self.labels[pid] = process_label(outer + ((pid, cmdline),))
        return self.labels.get(pid)

    def sample(self) -> None:
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            fields = _stat_fields(pid)
            if not fields or int(fields[2]) != self.pgid or (label := self._label(pid)) is None:
                continue
            try:
                tids = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for tid in tids:
                data = _read(f"/proc/{pid}/task/{tid}/schedstat")
                comm = (_read(f"/proc/{pid}/task/{tid}/comm") or b"").strip()
                if data:
                    run_ns, wait_ns = (int(x) for x in data.split()[:2])
                    kind = next((k for prefix, k in NATIVE_THREADS.items() if comm.startswith(prefix)), "python")
                    self.threads[(pid, int(tid))] = {"pid": pid, "tid": int(tid), "label": label, "kind": kind,
                                                     "cpu": run_ns / 1e9, "wait": wait_ns / 1e9}

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.interval)

    def stop(self) -> tuple[dict[str, dict[str, float]], list[dict]]:
        """Per label: seconds of ``cpu``, run-queue ``wait``, and ``<kind>_cpu`` of the
        native threads; and the per-thread rows."""
        self.stop_event.set()
        self.join(5)
        for row in self.threads.values():
            row["label"] = self.labels[row["pid"]]
        return sched_totals(self.threads.values()), list(self.threads.values())


def sched_totals(threads: Iterable[dict]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for t in threads:
        row = out.setdefault(t["label"], {"cpu": 0.0, "wait": 0.0, "zmq_cpu": 0.0, "libuv_cpu": 0.0})
        row["cpu"] += t["cpu"]
        row["wait"] += t["wait"]
        if t["kind"] != "python":
            row[f"{t['kind']}_cpu"] += t["cpu"]
    return out


def _loadavg() -> str:
    return " ".join((_read("/proc/loadavg") or b"? ? ?").decode().split()[:3])


def _stop(proc: subprocess.Popen | None, sig: int, grace: float) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.send_signal(sig)
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    except ProcessLookupError:
        pass


def find_py_spy(given: str | None) -> str:
    for candidate in (given, str(Path(sys.executable).parent / "py-spy"), shutil.which("py-spy")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise SystemExit("bench_profile: py-spy not found: `pip install py-spy` (into the bench's venv)")


def run_profiled(args: argparse.Namespace, passthrough: list[str], out: Path) -> dict:
    """bench_mail under py-spy; returns the metadata of the run (bench_mail's JSON in it)."""
    py_spy = find_py_spy(args.py_spy)
    if not any(a == "--client" or a.startswith("--client=") for a in passthrough):
        passthrough = ["--client", "smtp-source", *passthrough]
    meta: dict = {"rate": args.rate, "py_spy_mode": "blocking" if args.blocking else "nonblocking",
                  "load_before": _loadavg(), "argv": passthrough, "commit": _commit(args.tree),
                  "tree": str(args.tree)}
    bench = spy = None
    sched: SchedSampler | None = None
    runq: dict = {}
    with open(out / "bench.out", "wb") as bench_out, open(out / "spy.log", "wb") as spy_log:
        try:
            # one exec per child: py-spy reads a process's interpreter binary through
            # /proc/PID/root, which a chrooted child no longer has; an exec'd child is
            # found before its chroot, one forked by the zygote is not (same code runs)
            env = dict(os.environ, PYSMTPD_SPAWN=os.environ.get("PYSMTPD_SPAWN", "exec"))
            bench = subprocess.Popen([sys.executable, str(args.tree / "bench" / "bench_mail.py"), *passthrough],
                                     cwd=args.tree, stdout=bench_out, stderr=subprocess.STDOUT, env=env)
            deadline = time.monotonic() + BOOT_TIMEOUT
            daemon = None
            while daemon is None and bench.poll() is None and time.monotonic() < deadline:
                daemon = find_daemon(bench.pid)
                if daemon is None:
                    time.sleep(0.02)
            if daemon is None:
                raise SystemExit(f"bench_profile: no daemon seen; see {out / 'bench.out'}")
            cmd = [py_spy, "record", "--subprocesses", "-p", str(daemon), "--format", "raw",
                   "--rate", str(args.rate), "-o", str(out / "spy.txt")]
            spy = subprocess.Popen(cmd + ([] if args.blocking else ["--nonblocking"]),
                                   stdout=spy_log, stderr=subprocess.STDOUT)
            sched = SchedSampler(daemon)
            sched.start()
            bench.wait()
            # The daemon is gone: py-spy writes its dump and exits by itself; else ask it.
            try:
                spy.wait(10)
            except subprocess.TimeoutExpired:
                _stop(spy, signal.SIGINT, 20)
        finally:
            if sched is not None:
                runq, meta["schedstat_threads"] = sched.stop()
            _stop(bench, signal.SIGTERM, 30)     # bench_mail stops its daemon on SIGTERM
            _stop(spy, signal.SIGINT, 20)
    meta["load_after"] = _loadavg()
    meta["schedstat"] = runq
    lines = (out / "bench.out").read_text(errors="replace").splitlines()
    meta["bench"] = next((json.loads(l) for l in reversed(lines) if l.startswith("{")), {})
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def _commit(root: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip() or "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def report(out: Path, meta: dict, source_root: Path, top: int, title: str) -> dict:
    with open(out / "spy.txt", errors="replace") as f:
        stacks = parse_raw(f)
    lines = SourceLines([source_root, Path(sysconfig.get_paths()["stdlib"])])
    pid_labels = {t["pid"]: t["label"] for t in meta.get("schedstat_threads") or ()}
    summary = summarise(stacks, meta.get("bench", {}), lines, meta.get("schedstat"), top, pid_labels)
    meta = {**meta, "title": title}
    text = markdown(summary, meta) + "\n" + markdown_leaves(summary)
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps({"meta": meta, "summary": summary}, indent=1) + "\n")
    return {"summary": summary, "text": text}


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=
                                "Any other option goes to bench/bench_mail.py (--mode, -n, -s, --hold...).",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="directory for the dump and the summary (default: a new one in /tmp)")
    p.add_argument("--rate", type=int, default=100, help="py-spy samples per second (default 100)")
    p.add_argument("--blocking", action="store_true",
                   help="let py-spy pause the processes at each sample (default: --nonblocking, cheaper)")
    p.add_argument("--py-spy", help="the py-spy program (default: next to this Python, then $PATH)")
    p.add_argument("--tree", type=Path,
                   help="the tree to benchmark and profile (its bench/bench_mail.py runs it; its sources "
                        "classify frames by their line; default: this one, or with --summarise the one recorded)")
    p.add_argument("--top", type=int, default=8, help="leaf frames listed per process (default 8)")
    p.add_argument("--title", default="profile", help="first words of the summary")
    p.add_argument("--summarise", type=Path, metavar="DIR",
                   help="no run: summarise DIR's spy.txt and meta.json again")
    p.add_argument("--compare", type=Path, metavar="PATH",
                   help="also print a before -> after table against a summary.json (or a --out "
                        "directory holding one), e.g. bench/profiles/6ddd130-maildir.json")
    return p.parse_known_args(argv)


def main(argv=None) -> int:
    args, passthrough = parse_args(argv)
    if args.summarise is not None:
        out = args.summarise
        meta = json.loads((out / "meta.json").read_text())
        args.tree = args.tree or Path(meta.get("tree") or REPO)
    else:
        args.tree = (args.tree or REPO).resolve()
        out = args.out or Path(tempfile.mkdtemp(prefix="pysmtpd-profile-"))
        out.mkdir(parents=True, exist_ok=True)

        def interrupted(signum, frame):
            raise KeyboardInterrupt
        signal.signal(signal.SIGTERM, interrupted)
        try:
            meta = run_profiled(args, passthrough, out)
        except KeyboardInterrupt:
            print("bench_profile: interrupted; the bench and py-spy were stopped", file=sys.stderr)
            return 130
    result = report(out, meta, args.tree, args.top, args.title)
    print(result["text"], end="")
    if args.compare is not None:
        path = args.compare / "summary.json" if args.compare.is_dir() else args.compare
        before = json.loads(path.read_text())["summary"]
        print("\nBefore -> after, CPU ms per message:\n")
        print(compare(before, result["summary"]), end="")
    print(f"\nbench_profile: dump and summary in {out}", file=sys.stderr)
    b = meta.get("bench", {})
    return 0 if b and not b.get("error") and not b.get("timed_out") else 1


if __name__ == "__main__":
    sys.exit(main())
