#!/usr/bin/env python3
"""Peak PSS of the daemon under bench_mail.py's load.

Runs ``bench/bench_mail.py`` with the arguments given, finds the daemon it starts
(the ``smtpd: [priv]`` process whose parent is that bench_mail.py: other runs on the
machine are left out), and every ``--interval`` seconds sums the PSS
(/proc/PID/smaps_rollup) of every process of the daemon's process group, delivery
workers included.  PSS rather than RSS: pages shared between processes (the
interpreter, libraries, copy-on-write pages of a fork) are counted once in the sum.

Prints bench_mail.py's output, then one JSON line: idle PSS per process (the first
sample), peak PSS summed and per title at that peak, and the highest seen per title.

    python bench/pss.py --mode maildir -n 2000 -s 10 --client smtp-source
    python bench/pss.py --idle [SECONDS]     # boot, wait (3 s), one sample, stop

Sampling stops once the daemon's log says every message was delivered (the daemon's
stop is not load), or when bench_mail.py exits (its own --timeout applies).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
READY = {f"smtpd: {name}" for name in ("[priv]", "control", "lka", "queue", "scheduler", "pony")}


def _stat_fields(pid: int) -> list[bytes] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None


def find_daemon(bench_pid: int) -> int | None:
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None and int(fields[1]) == bench_pid and _title(int(entry.name)).startswith("smtpd"):
            return int(entry.name)
    return None


def _title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


def pss_kib(pid: int) -> tuple[int, int]:
    """(Pss, Private_Clean + Private_Dirty) of /proc/PID/smaps_rollup, in KiB
    ((0, 0) once the process is gone).  The private part is what the process alone
    holds: what ending it would give back."""
    pss = private = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith((b"Private_Clean:", b"Private_Dirty:")):
                    private += int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return pss, private


def group_pss(pgid: int) -> dict[int, tuple[str, tuple[int, int]]]:
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        fields = _stat_fields(pid)
        if fields is None or fields[0] == b"Z" or int(fields[2]) != pgid:
            continue
        title = _title(pid)
        if title.startswith("smtpd: [priv]") and pid != pgid:
            title = "delivery worker"       # forked by the parent, its title unchanged
        out[pid] = (title, pss_kib(pid))
    return out


def by_title(sample, part: int = 0) -> dict[str, float]:
    """MiB per title (summed over processes of one title): PSS, or with part=1 private."""
    out: dict[str, float] = {}
    for title, kib in sample.values():
        out[title] = out.get(title, 0) + kib[part]
    return {t: round(v / 1024, 1) for t, v in sorted(out.items())}


def idle_sample(settle: float) -> int:
    """Boot the daemon as bench_mail.py does (maildir configuration), wait, sample once."""
    import shutil
    import tempfile
    sys.path.insert(0, str(BENCH))
    import bench_mail
    base = Path(tempfile.mkdtemp(prefix="pysmtpd-pss-"))
    os.chmod(base, 0o711)
    daemon = None
    try:
        config_text, _new = bench_mail.build_config(base, bench_mail.free_port(), "maildir",
                                                    bench_mail.free_port())
        daemon = bench_mail.DaemonRun(base, config_text)
        daemon.start()
        time.sleep(settle)
        sample = group_pss(daemon.proc.pid)
        print(json.dumps({"idle_pss_mib": round(sum(k[0] for _, k in sample.values()) / 1024, 1),
                          "idle_pss_by_process_mib": by_title(sample),
                          "idle_private_by_process_mib": by_title(sample, 1)}))
    finally:
        if daemon is not None:
            daemon.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


def _ticks(pid: int) -> tuple[int, int]:
    """(utime + stime, cutime + cstime) of a process, in clock ticks."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0, 0
    return int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])


class ParentCpu:
    """The parent's CPU apart from its delivery workers' (which share its title, so
    bench_mail.py counts them together): the parent's own time, and the workers' as
    the parent's reaped-children time plus that of the workers still alive."""

    def __init__(self, parent: int) -> None:
        self.parent = parent
        self.own0, self.reaped0 = _ticks(parent)
        self.live: dict[int, int] = {}

    def sample(self, workers: list[int]) -> None:
        self.own, self.reaped = _ticks(self.parent)
        self.live = {pid: _ticks(pid)[0] for pid in workers}

    def ms_per_message(self, messages: int) -> dict[str, float]:
        hz = os.sysconf("SC_CLK_TCK")
        if not messages or not hasattr(self, "own"):
            return {}
        workers = self.reaped - self.reaped0 + sum(self.live.values())
        return {"parent alone": round(1000 * (self.own - self.own0) / hz / messages, 3),
                "delivery workers": round(1000 * workers / hz / messages, 3)}


class DeliveryLog:
    """The daemon's log (bench_mail.py's smtpd.log, the daemon's standard error),
    read as it grows: sampling stops once every message was
    delivered, so the stop of the daemon (bench_mail.py stops it a second later) is
    not counted as load."""

    def __init__(self, daemon: int, messages: int) -> None:
        self.messages = messages
        self.delivered = 0
        self.offset = 0
        self.partial = b""
        try:                    # its standard error is the log file (its title hides its argv)
            self.path = os.readlink(f"/proc/{daemon}/fd/2")
        except OSError:
            self.path = None
        if self.path is not None and not self.path.endswith("smtpd.log"):
            self.path = None

    def all_done(self) -> bool:
        if self.path is None:
            return False
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return False
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        self.delivered += sum(1 for line in lines if b" delivery " in line
                              and (b"result=Ok" in line or b'result="Ok"' in line))
        return self.delivered >= self.messages


def _messages(argv: list[str]) -> int:
    return int(argv[argv.index("-n") + 1]) if "-n" in argv else 2000


def main(argv: list[str]) -> int:
    if argv[:1] == ["--idle"]:
        return idle_sample(float(argv[1]) if len(argv) > 1 else 3.0)
    interval = 0.1
    if argv[:1] == ["--interval"]:
        interval, argv = float(argv[1]), argv[2:]
    bench = subprocess.Popen([sys.executable, str(BENCH / "bench_mail.py"), *argv],
                             stdout=subprocess.PIPE, text=True)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(bench.stdout), daemon=True)
    reader.start()
    daemon = None
    deadline = time.monotonic() + 120
    while daemon is None and bench.poll() is None and time.monotonic() < deadline:
        daemon = find_daemon(bench.pid)
        time.sleep(0.05)
    idle: dict[int, tuple[str, int]] = {}
    parent_cpu = None
    peak_total, peak_sample, highest, samples, max_workers = 0, {}, {}, 0, 0
    if daemon is not None:
        # wait until the five children are up (the daemon says "ready" in its log)
        t_end = time.monotonic() + 60
        while bench.poll() is None and time.monotonic() < t_end and not READY <= {
                t for t, _ in group_pss(daemon).values()}:
            time.sleep(0.05)
        time.sleep(1.0)
        idle = group_pss(daemon)
        deliveries = DeliveryLog(daemon, _messages(argv))
        parent_cpu = ParentCpu(daemon)
        while bench.poll() is None and not deliveries.all_done():
            sample = group_pss(daemon)
            if not sample:
                break
            samples += 1
            total = sum(kib[0] for _, kib in sample.values())
            if total > peak_total:
                peak_total, peak_sample = total, sample
            for title, mib in by_title(sample).items():
                highest[title] = max(highest.get(title, 0), mib)
            workers = [pid for pid, (t, _) in sample.items() if t == "delivery worker"]
            max_workers = max(max_workers, len(workers))
            if READY <= {t for t, _ in sample.values()}:     # (a core child's end adds to cutime)
                parent_cpu.sample(workers)
            time.sleep(interval)
    bench.wait()
    reader.join(5)
    sys.stdout.write("".join(out))
    bench_json = {}
    for line in reversed(out):
        if line.startswith("{"):
            bench_json = json.loads(line)
            break
    print(json.dumps({
        "pss": True, "samples": samples,
        "idle_pss_mib": round(sum(k[0] for _, k in idle.values()) / 1024, 1),
        "idle_pss_by_process_mib": by_title(idle),
        "peak_pss_mib": round(peak_total / 1024, 1),
        "peak_pss_by_process_mib": by_title(peak_sample),
        "peak_private_by_process_mib": by_title(peak_sample, 1),
        "highest_pss_by_process_mib": highest,
        "max_delivery_workers": max_workers,
        "cpu_ms_per_message": bench_json.get("cpu_ms_per_message"),
        "parent_cpu_ms_per_message": parent_cpu.ms_per_message(bench_json.get("accepted") or 0)
        if parent_cpu is not None else None,
        "accepted_per_s": bench_json.get("accepted_per_s"),
        "delivered_per_s": bench_json.get("delivered_per_s"),
    }))
    return bench.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
