"""CPU time, resident memory and open descriptors of the daemon's processes, read
by the parent in /proc for the metrics endpoint (smtpd/metrics.py).  A module of its
own so that the parent, which only reads these, does not load prometheus-client
(3 MB of private memory: docs/architecture.md, "Memory").
"""
from __future__ import annotations

import os


def process_usage(pids: dict[str, int]) -> dict[str, dict[str, float]]:
    """Name -> {cpu_seconds, resident_memory_bytes[, open_fds]} of each process that
    still exists, from /proc/PID/stat (readable by anyone) and /proc/PID/fd (only
    where ptrace's read access is allowed: left out elsewhere)."""
    ticks, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
    out: dict[str, dict[str, float]] = {}
    for name, pid in pids.items():
        try:
            with open(f"/proc/{pid}/stat") as f:
                # After the command name (which may hold spaces and parentheses):
                # state is field 3 of proc(5), utime 14, stime 15, rss 24 (pages).
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        usage = {"cpu_seconds": (int(fields[11]) + int(fields[12])) / ticks,
                 "resident_memory_bytes": float(int(fields[21]) * page)}
        try:
            usage["open_fds"] = float(len(os.listdir(f"/proc/{pid}/fd")))
        except OSError:
            pass
        out[name] = usage
    return out
