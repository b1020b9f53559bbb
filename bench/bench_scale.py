#!/usr/bin/env python3
"""Queue scale benchmark of pysmtpd: a spool of 100,000 envelopes.

Writes MESSAGES messages of RCPTS envelopes each (default 20,000 x 5) straight into
a temporary spool, in the spool's own format (smtpd.queue_fs paths,
common.envelope codec), all of type mta for a relay whose deliveries are paused
(``smtpd -P mta``), then measures:

* start: daemon launched -> ``ready:`` log line, and -> ``done loading queue into
  scheduler`` (a debug line: the daemon runs with ``-v``);
* ``smtpctl show queue``: wall time to list every envelope (best of 2, lines counted);
* scheduler memory: VmRSS of the scheduler process once the queue is loaded, minus
  the same with an empty spool (a first, short run), per envelope;
* scheduler throughput: envelopes scheduled per second once ``smtpctl resume mta``
  lets them go to a fast relay sink (Postfix smtp-sink, else aiosmtpd), from the
  ``scheduler.envelope*`` counters of ``smtpctl show stats`` over ``--drain`` seconds,
  and the pure model's (smtpd.scheduler_ram) ops/s with no process around it.

Bounded (``--timeout``), stops every process it started, removes its directory
unless ``--keep``.  Prints a summary, then one JSON line.

    python bench/bench_scale.py                    # 20000 x 5
    python bench/bench_scale.py -m 2000 -r 5       # a quick one
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO), str(BENCH)]

from bench_mail import (  # noqa: E402  (bench/ is not a package)
    AiosmtpdSink, BenchError, PostfixSink, free_port, get_postfix_tools, stop_process_group,
    vmrss_kib, wait_until,
)
from common import envelope as envcodec  # noqa: E402
from common.envelope import Envelope  # noqa: E402
from common.ids import random_evpid, random_msgid  # noqa: E402
from smtpd.queue_fs import Spool  # noqa: E402
from smtpd.scheduler_ram import RamQueue  # noqa: E402

LOADED = "done loading queue into scheduler"
BODY = (b"From: bench@local.test\nTo: user@remote.test\nSubject: scale\n\n"
        + b"scale benchmark message body line\n" * 30)


def fill_spool(spool: Spool, messages: int, rcpts: int, owner: tuple[int, int] | None,
               domains: list[str] | None = None) -> int:
    """Committed messages written as the queue writes them (no fsync: one sync at the end);
    the recipients are at remote.test, or at ``domains`` in turn (one per message)."""
    now = int(time.time())
    used: set[int] = set()
    count = 0
    buckets: set[Path] = set()
    for i in range(messages):
        domain = domains[i % len(domains)] if domains else "remote.test"
        msgid = random_msgid()
        while msgid in used:
            msgid = random_msgid()
        used.add(msgid)
        d = spool.message_dir(msgid)
        if d.parent not in buckets:
            d.parent.mkdir(mode=0o700, exist_ok=True)
            buckets.add(d.parent)
            if owner:
                os.chown(d.parent, *owner)
        d.mkdir(mode=0o700)
        (d / "message").write_bytes(BODY)
        names = ["message"]
        evpids: set[int] = set()
        for j in range(rcpts):
            evpid = random_evpid(msgid)
            while evpid in evpids:
                evpid = random_evpid(msgid)
            evpids.add(evpid)
            env = Envelope(id=evpid, dispatcher="outbound", type="mta", smtpname="bench.test",
                           helo="client.test", hostname="localhost", sockaddr="127.0.0.1",
                           sender="bench@local.test", rcpt=f"u{j}@{domain}",
                           dest=f"u{j}@{domain}", ctime=now)
            (d / f"{evpid:016x}").write_bytes(envcodec.dump(env))
            names.append(f"{evpid:016x}")
            count += 1
        if owner:
            os.chown(d, *owner)
            for name in names:
                os.chown(d / name, *owner)
    os.sync()
    return count


def model_ops(n: int) -> dict:
    """The pure scheduler model alone: insert n envelopes, then schedule and retire them."""
    rq = RamQueue()
    now = int(time.time())
    t0 = time.perf_counter()
    for i in range(n):
        msgid = 0x10000000 + i // 5
        rq.stage((msgid << 32) | (i % 5 + 1), "mta", now, now + 86400, 0)
        if i % 5 == 4:
            rq.commit(msgid, now)
    t1 = time.perf_counter()
    done = 0
    for _ in range(n):
        batch = rq.next_batch(now, 100)
        if not batch:
            break
        for action in batch:
            rq.delivered(action.evpid)
            done += 1
    t2 = time.perf_counter()
    return {"insert_per_s": n / (t1 - t0), "schedule_per_s": done / (t2 - t1) if done else None}


class Run:
    def __init__(self, base: Path, sink_port: int, port: int) -> None:
        self.base = base
        base.mkdir()
        self.config = base / "smtpd.conf"
        self.config.write_text("\n".join([
            "# pysmtpd scale benchmark (bench/bench_scale.py)",
            f"listen on 127.0.0.1 port {port}",
            f'action "outbound" relay host "smtp://127.0.0.1:{sink_port}"',
            'match from local for any action "outbound"',
        ]) + "\n")
        self.spool = base / "spool"
        self.socket = base / "ctl.sock"
        self.logfile = base / "smtpd.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float) -> dict:
        """Launch; the seconds to ready and to the queue loaded, the process ids."""
        self.logfile.write_bytes(b"")
        cmd = [sys.executable, "-m", "smtpd", "-d", "-v", "-P", "mta", "-f", str(self.config),
               "--spool", str(self.spool), "--socket", str(self.socket)]
        t0 = time.monotonic()
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = t0 + timeout
        if not wait_until(lambda: "ready:" in self.log() or self.proc.poll() is not None, deadline, 0.01) \
                or self.proc.poll() is not None:
            raise BenchError(f"smtpd did not start:\n{self.log()[-3000:]}")
        ready = time.monotonic() - t0
        if not wait_until(lambda: LOADED in self.log() or self.proc.poll() is not None, deadline, 0.01):
            raise BenchError("the queue did not finish loading in time")
        loaded = time.monotonic() - t0
        pids = dict(re.findall(r"(\w+)=(\d+)", self.log().split("ready:", 1)[1].splitlines()[0]))
        return {"ready_s": ready, "loaded_s": loaded, "pids": {k: int(v) for k, v in pids.items()}}

    def log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""

    def smtpctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "smtpctl", "--socket", str(self.socket), *args],
                              cwd=REPO, capture_output=True, text=True, timeout=timeout, check=True)

    def stats(self) -> dict[str, float]:
        out = {}
        for line in self.smtpctl("show", "stats").stdout.splitlines():
            key, _, value = line.partition("=")
            try:
                out[key.strip()] = float(value)
            except ValueError:
                pass
        return out

    def stop(self) -> None:
        stop_process_group(self.proc, grace=5)


def settled_rss_kib(pid: int, seconds: float = 1.0) -> int:
    """VmRSS once it stops moving (the collector and the allocator settle)."""
    last = vmrss_kib(pid)
    for _ in range(int(seconds / 0.2) * 10):
        time.sleep(0.2)
        now = vmrss_kib(pid)
        if abs(now - last) < 64:
            return now
        last = now
    return last


def new_base(prefix: str) -> tuple[Path, tuple[int, int] | None]:
    """A run's directory, and the owner its spool files need (_smtpq's when root)."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(base, 0o711)
    owner = None
    if os.getuid() == 0:
        q = pwd.getpwnam("_smtpq")
        owner = (q.pw_uid, q.pw_gid)
    return base, owner


def stop_all(started: list, base: Path, keep: bool) -> None:
    """Stop what was started (None: never was), then remove the run's directory unless kept."""
    for thing in started:
        if thing is not None:
            thing.stop()
    if keep:
        print(f"kept {base}", file=sys.stderr)
    else:
        shutil.rmtree(base, ignore_errors=True)


def run(args) -> dict:
    base, owner = new_base("pysmtpd-scale-")
    result: dict = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "nproc": os.cpu_count(), "python": platform.python_version(), "uid": os.getuid(),
                    "machine": platform.machine(), "messages": args.messages, "rcpts": args.rcpts}
    sink = None
    empty = full = None
    try:
        sink_port = free_port()
        # 1. the empty daemon: the scheduler's RSS with no envelope
        empty = Run(base / "empty", sink_port, free_port())
        s0 = empty.start(args.timeout)
        result["scheduler_rss_empty_kib"] = settled_rss_kib(s0["pids"]["scheduler"])
        result["empty_ready_s"] = s0["ready_s"]
        empty.stop()
        empty = None
        # 2. the spool, written directly
        full = Run(base / "full", sink_port, free_port())
        spool = Spool(full.spool)
        spool.setup(*(owner or (os.getuid(), os.getgid())), privileged=owner is not None)
        t0 = time.monotonic()
        result["envelopes"] = fill_spool(spool, args.messages, args.rcpts, owner)
        result["fill_s"] = time.monotonic() - t0
        # 3. start until ready, until loaded
        s1 = full.start(args.timeout)
        result["ready_s"], result["loaded_s"] = s1["ready_s"], s1["loaded_s"]
        sched = s1["pids"]["scheduler"]
        rss = settled_rss_kib(sched)
        result["scheduler_rss_kib"] = rss
        result["scheduler_bytes_per_envelope"] = (rss - result["scheduler_rss_empty_kib"]) * 1024 / result["envelopes"]
        result["queue_rss_kib"] = vmrss_kib(s1["pids"]["queue"])
        # 4. show queue, every line
        times = []
        for _ in range(2):
            t = time.monotonic()
            out = full.smtpctl("show", "queue").stdout
            times.append(time.monotonic() - t)
            result["show_queue_lines"] = out.count("\n")
        result["show_queue_s"] = min(times)
        # 5. resume towards a fast sink
        tools = get_postfix_tools(quiet=True) if args.sink != "aiosmtpd" else None
        sink = PostfixSink(tools, sink_port, base) if tools else AiosmtpdSink(sink_port, base)
        sink.start()
        result["sink"] = sink.name
        before = full.stats()
        t = time.monotonic()
        full.smtpctl("resume", "mta")
        time.sleep(args.drain)
        after = full.stats()
        elapsed = time.monotonic() - t
        left = after.get("scheduler.envelope", 0)
        scheduled = before.get("scheduler.envelope", 0) - left + after.get("scheduler.envelope.inflight", 0)
        result["drain_s"] = elapsed
        result["scheduled_per_s"] = scheduled / elapsed
        result["delivered_per_s"] = (before.get("scheduler.envelope", 0) - left) / elapsed
        # 6. the pure model
        result["model"] = model_ops(result["envelopes"])
    finally:
        stop_all([empty, full, sink], base, args.keep)
    return result


def summary(r: dict) -> str:
    m = r.get("model", {})
    return (f"{r['envelopes']} envelopes ({r['messages']} x {r['rcpts']}): ready {r['ready_s']:.2f} s, "
            f"queue loaded {r['loaded_s']:.2f} s; show queue {r['show_queue_s']:.2f} s "
            f"({r['show_queue_lines']} lines); scheduler RSS {r['scheduler_rss_kib'] / 1024:.1f} MiB, "
            f"{r['scheduler_bytes_per_envelope']:.0f} B/envelope; scheduled {r['scheduled_per_s']:.0f}/s "
            f"(delivered {r['delivered_per_s']:.0f}/s to {r['sink']}); model: insert "
            f"{m.get('insert_per_s', 0):.0f}/s, schedule {m.get('schedule_per_s') or 0:.0f}/s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-m", "--messages", type=int, default=20000)
    p.add_argument("-r", "--rcpts", type=int, default=5, help="envelopes per message")
    p.add_argument("--drain", type=float, default=10.0, help="seconds of delivery measured")
    p.add_argument("--sink", choices=["auto", "aiosmtpd"], default="auto")
    p.add_argument("--timeout", type=float, default=120.0, help="bound on each start")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args(argv)
    r = run(args)
    print(summary(r))
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
