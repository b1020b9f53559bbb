#!/usr/bin/env python3
"""pysmtpd beside a private Postfix in one run: the side-by-side table of issue 12.

For each mode (``relay``: to Postfix's smtp-sink on loopback; ``maildir``: local
delivery to a Maildir), a private Postfix (bench/postfix_instance.py, from the
distribution's package unpacked by bench/get-postfix-tools.sh) and pysmtpd (as root,
privilege separation on; bench/bench_mail.py's configuration), each fed by Postfix's
smtp-source with the same arguments (N messages of SIZE bytes over S sessions, one
message per connection).  Postfix goes first in the first repeat, pysmtpd in the
second, and so on (``run_plan``): where creating a file slows after recent deletions
(ext4 without a journal, as on the machine of issue 12: docs/spool.md, "Recycled
inodes"), the daemon measured second pays for the first one's deleted queue files,
and taking turns shares that out.  Both daemons are measured by the same code:

* accepted msg/s: smtp-source's start -> its last ``250`` to the end of DATA;
* delivered msg/s: smtp-source's start -> the N-th message at the sink (smtp-sink's
  counter) or in the Maildir's ``new/`` (counted by inotify: bench/meters.py);
* CPU per message: user + system time of every process of the daemon's session (the
  daemon is started in a session of its own; the children it reaped count through
  cutime/cstime), from just before the load to the moment its CPU settles after the
  last delivery, divided by the accepted messages;
* peak PSS: Pss from /proc/PID/smaps_rollup summed over the session, read every second
  and at each new high of the summed RSS, which is read every 200 ms (peak RSS
  alongside);
* pysmtpd's commit latency (end of DATA to its reply) as the daemon measures it:
  ``smtpctl show stats`` (``smtp.commit.latency.*``; null where this pysmtpd does not
  report it), under the table; with ``--latency``, also a run of pysmtpd under
  bench_mail's asyncio client, which times every commit from the client's side;
* this script's own CPU over the load, as a share of the machine (``bench_cpu_share``);
* the share of the machine's CPU time the hypervisor stole during the load
  (``steal_share``, /proc/stat): a run that lost more than 3 % is named under the
  table.  On the shared 2-core VM of issue 12, the slowest repeats measured since
  were the ones with 10-13 % stolen (2026-12-03).

Prints a markdown table (one row per daemon and mode; ``a-b`` ranges with ``-r 2`` or
more; the ratio column is pysmtpd's delivered msg/s over Postfix's, per repeat), then
one JSON line with every run.  Runs as root only (Postfix's master refuses otherwise);
it creates Postfix's ``postfix`` user and ``postdrop`` group when they are missing
(system accounts, kept afterwards).  Bounded: each run stops waiting after
``--timeout`` seconds; everything started is stopped by PID and the temporary
directories are removed unless ``--keep``.

    sudo .venv/bin/python bench/bench_compare.py            # N=2000 S=10 SIZE=5120
    sudo .venv/bin/python bench/bench_compare.py -r 2 --modes maildir
    sudo .venv/bin/python bench/bench_compare.py --latency --daemons pysmtpd
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import datetime as _dt
import json
import os
import platform
import pwd
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(BENCH)]

from bench_mail import (  # noqa: E402
    MAILDIR_RCPT, MAILDIR_USER, RELAY_RCPT, BenchError, DaemonRun, Interrupted, LoadStats,
    MaildirWatch, PostfixSink, asyncio_load, build_config, daemon_commit_latency, free_port,
    get_postfix_tools, percentiles_ms, rate, run_dir, smtp_source_load, wait_until)
from meters import (  # noqa: E402
    PSS_EVERY, RSS_INTERVAL, MemoryMeter, latency_line, machine_cpu_ticks, settled, steal_share,
    tree_ticks)
from postfix_instance import (  # noqa: E402
    PostfixError, PostfixInstance, ensure_users, session_members, session_pids)

DAEMONS = ("postfix", "pysmtpd")
STEAL_NOTED = 0.03      # share of the CPU stolen during a run above which it is pointed out
MODES = ("relay", "maildir")
ROW_NAMES = {("postfix", "relay"): "Postfix, relay to smtp-sink",
             ("pysmtpd", "relay"): "pysmtpd, relay to smtp-sink",
             ("postfix", "maildir"): "Postfix, local Maildir",
             ("pysmtpd", "maildir"): "pysmtpd, local Maildir"}
PR_SET_CHILD_SUBREAPER = 36
LEFT_FOR_THE_END: list[Path] = []     # the runs' directories, removed after the last run


# --------------------------------------------------------------------------- /proc

def tree_cpu_ticks(members: list[tuple[int, list[bytes]]]) -> int:
    """utime + stime + cutime + cstime summed: every process of the session, and the
    children they have reaped (a child not yet reaped counts by its own line)."""
    return sum(tree_ticks(f) for _, f in members)


def process_title(pid: int) -> str | None:
    """argv[0] without its directory (pysmtpd's are set by setproctitle), "(exiting)"
    for a process on its way out, None once it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            title = f.read().split(b"\0")[0].decode(errors="replace").rsplit("/", 1)[-1]
    except OSError:
        return None
    return title or "(exiting)"


def session_titles(sid: int) -> list[tuple[int, str]]:
    """(pid, title) of the live processes of session ``sid``."""
    out = []
    for pid in session_pids(sid):
        title = process_title(pid)
        if title is not None:
            out.append((pid, title))
    return out


class TreeMeter(MemoryMeter):
    """Peak PSS and RSS summed over the daemon's session (meters.MemoryMeter: RSS every
    200 ms, PSS every second and at each new RSS high)."""

    def __init__(self, sid: int, interval: float = RSS_INTERVAL, pss_every: int = PSS_EVERY) -> None:
        super().__init__(lambda: session_titles(sid), interval, pss_every, name="tree-meter")
        self.sid = sid


def settled_cpu_ticks(sid: int, deadline: float) -> int:
    """The session's CPU ticks once it stops spending (meters.settled), or at ``deadline``."""
    return settled(lambda: tree_cpu_ticks(session_members(sid)), lambda t: t, deadline)


def reap_orphans(sid: int) -> None:
    """Wait for the daemon's processes that were orphaned to us (we are a child
    subreaper), so none is left as a zombie."""
    for pid, fields in session_members(sid):
        if pid != sid and int(fields[1]) == os.getpid():
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


# --------------------------------------------------------------------------- one run

def run_one(daemon: str, mode: str, args: argparse.Namespace, tools: Path, repeat: int,
            client: str = "smtp-source") -> dict:
    """One daemon in one mode under one load: ``smtp-source`` (the table's), or
    ``asyncio`` (bench_mail's client, which times each commit: ``--latency``)."""
    # The previous run's dirty pages (its deleted queue files' metadata above all) are
    # written now, not during this run by the first fsync or syncfs of this daemon.
    os.sync()
    t_start = time.monotonic()
    deadline = t_start + args.timeout
    base = run_dir(f"bench-compare-{daemon}-{mode}-")
    nobody = pwd.getpwnam("nobody")
    result: dict = {"daemon": daemon, "mode": mode, "repeat": repeat, "n": args.n,
                    "sessions": args.s, "size": args.size, "client": client,
                    "timed_out": False, "error": None,
                    "loadavg_before": round(os.getloadavg()[0], 2)}
    stats = LoadStats()
    sink = watch = meter = server = None
    counter = None
    sid = 0
    try:
        port, sink_port = free_port(), free_port()
        if mode == "relay":
            sink = PostfixSink(tools, sink_port, base)
            sink.start()
            counter = sink.counter
        rcpt = RELAY_RCPT if mode == "relay" else MAILDIR_RCPT
        if daemon == "postfix":
            server = PostfixInstance(tools, base, port, mode, sink_port=sink_port,
                                     maildir_user=MAILDIR_USER, uid=nobody.pw_uid, gid=nobody.pw_gid)
            server.setup()
            server.start()
            new_dir = server.maildir_new
        else:
            config_text, new_dir = build_config(base, port, mode, sink_port)
            server = DaemonRun(base, config_text)
            server.start()
        sid = server.proc.pid
        if mode == "maildir":
            watch = MaildirWatch(new_dir)
            watch.start()
            counter = watch.counter
        meter = TreeMeter(sid, pss_every=args.pss_every)
        meter.sample(pss=True)
        result["idle_pss_mib"] = round(meter.last_pss_kib / 1024, 1)
        meter.start()
        hz = os.sysconf("SC_CLK_TCK")
        cpu_before = tree_cpu_ticks(session_members(sid))
        machine_before = machine_cpu_ticks()
        self_before, t_before = time.process_time(), time.monotonic()
        try:
            if client == "asyncio":
                asyncio.run(asyncio.wait_for(
                    asyncio_load(port, args.n, args.s, args.size, rcpt, 1, True, stats),
                    max(1.0, deadline - time.monotonic())))
            else:
                smtp_source_load(tools, port, args.n, args.s, args.size, rcpt, 1, stats, deadline, base)
        except TimeoutError:
            result["timed_out"] = True
        target = stats.accepted
        if target:
            wait_until(lambda: counter.count >= target or not server.alive(), deadline, 0.02)
            if counter.count < target:
                if not server.alive():
                    result["error"] = f"{daemon} exited during the run"
                else:
                    result["timed_out"] = True
        result["steal_share"] = steal_share(machine_before, machine_cpu_ticks())
        cpu_after = settled_cpu_ticks(sid, min(deadline, time.monotonic() + 5))
        result["cpu_seconds"] = round((cpu_after - cpu_before) / hz, 3)
        # This script's own CPU over the same time, as a share of the machine: the
        # meters' cost (and the asyncio client's, when it is the load).
        result["bench_cpu_seconds"] = round(time.process_time() - self_before, 3)
        result["bench_cpu_share"] = round(result["bench_cpu_seconds"]
                                          / ((time.monotonic() - t_before) * (os.cpu_count() or 1)), 4)
        time.sleep(0.3)                # duplicates would show as more than accepted
        if daemon == "pysmtpd":
            result["server_commit_latency_ms"] = daemon_commit_latency(server, result)
    except (BenchError, PostfixError, OSError) as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        try:
            if meter is not None:
                meter.stop()
            if watch is not None:
                watch.stop()
                result.update(watch.final_check())
            if server is not None:
                result["daemon_alive_at_end"] = server.alive()
                result["log_warnings"] = log_warnings(server.log())
                if result["error"] or result["timed_out"]:
                    result["log_tail"] = server.log_tail(15)
                server.stop()
                if sid:
                    reap_orphans(sid)
                    result["left_running"] = len(session_pids(sid))
        finally:
            if sink is not None:
                sink.stop()
            if args.keep:
                result["kept"] = str(base)
            else:
                # removed once every run is over: thousands of inodes freed now would
                # slow the next run's file creation (run_dir in bench_mail.py)
                LEFT_FOR_THE_END.append(base)
    t0 = stats.first_connect
    delivered = counter.count if counter is not None else 0
    last = counter.time_of(min(delivered, stats.accepted) or delivered) if delivered else None
    result.update({
        "accepted": stats.accepted, "failed": stats.failed,
        "errors": dict(sorted(stats.errors.items(), key=lambda kv: -kv[1])[:3]),
        "delivered": delivered, "duplicates": max(0, delivered - stats.accepted),
        "accepted_per_s": _r(rate(stats.accepted, t0, stats.last_accept)),
        "delivered_per_s": _r(rate(min(delivered, stats.accepted or delivered), t0, last)),
        "total_seconds": round(time.monotonic() - t_start, 2),
        "commit_latency_ms": percentiles_ms(stats.commit_seconds),   # the asyncio client's
    })
    if stats.accepted and "cpu_seconds" in result:
        result["cpu_ms_per_message"] = round(1000 * result["cpu_seconds"] / stats.accepted, 2)
    if meter is not None:
        result.update({
            "peak_pss_mib": round(meter.peak_pss_kib / 1024, 1),
            "peak_rss_mib": round(meter.peak_kib / 1024, 1),
            "max_processes": meter.max_procs,
            "pss_samples": meter.pss_samples, "pss_samples_at_rss_highs": meter.pss_triggered,
            "peak_pss_by_process_mib": {t: round(k / 1024, 1)
                                        for t, k in sorted(meter.peak_pss_by_title.items())},
        })
    return result


def log_warnings(log: str) -> int:
    """Lines of a daemon's log that report a warning or worse."""
    words = ("warn", "error", "fatal", "panic")
    return sum(1 for line in log.lower().splitlines() if any(w in line for w in words))


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def complete(r: dict) -> bool:
    return (not r.get("error") and not r.get("timed_out") and r.get("accepted") == r["n"]
            and r.get("delivered") == r["n"])


# --------------------------------------------------------------------------- report

def spread(values: list[float | None], digits: int = 0) -> str:
    """``x`` or ``min-max`` of the values that exist; ``n/a`` when none does."""
    xs = [v for v in values if v is not None]
    if not xs:
        return "n/a"
    lo, hi = min(xs), max(xs)
    if digits == 0 and hi < 10:
        digits = 1                     # a rate of 4.5 msg/s is not "4"
    fmt = f"{{:.{digits}f}}"
    return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}-{fmt.format(hi)}"


def ratios(runs: list[dict], mode: str) -> list[float]:
    """pysmtpd's delivered msg/s over Postfix's, per repeat that has both."""
    by = {(r["daemon"], r["repeat"]): r for r in table_runs(runs) if r["mode"] == mode}
    out = []
    for (daemon, repeat), r in sorted(by.items()):
        pf = by.get(("postfix", repeat))
        if daemon == "pysmtpd" and pf and pf.get("delivered_per_s") and r.get("delivered_per_s"):
            out.append(round(r["delivered_per_s"] / pf["delivered_per_s"], 2))
    return out


def table_runs(runs: list[dict]) -> list[dict]:
    """The runs of the table: smtp-source's load (not ``--latency``'s)."""
    return [r for r in runs if r.get("client", "smtp-source") == "smtp-source"]


def steal_lines(runs: list[dict], threshold: float = STEAL_NOTED) -> list[str]:
    """The table's runs that lost more than ``threshold`` of the machine's CPU to the
    hypervisor while their load ran: their figures say more about the host than the
    daemon."""
    out = []
    for r in table_runs(runs):
        share = r.get("steal_share")
        if share is not None and share > threshold:
            out.append(f"{r['daemon']} {r['mode']}, run {r['repeat'] + 1}: {100 * share:.0f} % of the"
                       " CPU time stolen by the hypervisor during the load")
    return out


def latency_lines(runs: list[dict]) -> list[str]:
    """pysmtpd's commit latency (end of DATA to 250), per mode: the daemon's own figures
    (``smtpctl show stats``) under smtp-source, and with ``--latency`` the asyncio
    client's, with the daemon's own for that run."""
    out = []
    for mode in MODES:
        for r in runs:
            if r["daemon"] != "pysmtpd" or r["mode"] != mode:
                continue
            head = f"pysmtpd {mode}, run {r['repeat'] + 1}, commit latency"
            if r.get("client") == "asyncio":
                out.append(f"{head} under bench_mail's asyncio client (pipelining; {r['n']} messages,"
                           f" {r['sessions']} sessions): client side "
                           f"{latency_line(client_latency(r.get('commit_latency_ms')))},"
                           f" server side {latency_line(r.get('server_commit_latency_ms'))}")
            else:
                out.append(f"{head} under smtp-source, server side (smtpctl show stats):"
                           f" {latency_line(r.get('server_commit_latency_ms'))}")
    return out


def client_latency(lat: dict | None) -> dict | None:
    """bench_mail's percentiles (count, p50...) in the shape latency_line prints."""
    return lat and {k: lat.get(k) for k in ("count", "p50", "p90", "p99", "max")}


def table(runs: list[dict]) -> str:
    runs = table_runs(runs)
    lines = ["| | accepted msg/s | delivered msg/s | CPU per message (whole daemon) | peak PSS"
             " | delivered: pysmtpd / Postfix |",
             "|---|---:|---:|---:|---:|---:|"]
    notes = []
    for mode in MODES:
        for daemon in DAEMONS:
            rs = [r for r in runs if r["daemon"] == daemon and r["mode"] == mode]
            if not rs:
                continue
            ratio = "1" if daemon == "postfix" else spread(ratios(runs, mode), 2)
            name = ROW_NAMES[(daemon, mode)]
            bad = [r for r in rs if not complete(r)]
            if bad:
                name += " *"
                for r in bad:
                    notes.append(f"* {ROW_NAMES[(daemon, mode)]}, run {r['repeat'] + 1}: "
                                 f"accepted {r.get('accepted')}/{r['n']}, delivered {r.get('delivered')}"
                                 + (", timed out" if r.get("timed_out") else "")
                                 + (f", {r['error']}" if r.get("error") else ""))
            cpu = spread([r.get("cpu_ms_per_message") for r in rs], 1)
            pss = spread([r.get("peak_pss_mib") for r in rs])
            lines.append(f"| {name} | {spread([r.get('accepted_per_s') for r in rs])}"
                         f" | {spread([r.get('delivered_per_s') for r in rs])}"
                         f" | {cpu}{' ms' if cpu != 'n/a' else ''}"
                         f" | {pss}{' MB' if pss != 'n/a' else ''} | {ratio} |")
    return "\n".join(lines + ([""] + notes if notes else []))


def heading(meta: dict) -> str:
    return (f"{meta['date'][:16]}, {meta['nproc']} cores, load average {meta['loadavg_start']}"
            f" at start / {meta['loadavg_end']} at end; Postfix {meta['postfix_version']},"
            f" pysmtpd {meta['pysmtpd_commit']} on Python {meta['python']}; smtp-source:"
            f" {meta['n']} messages of {meta['size']} bytes over {meta['sessions']} sessions,"
            f" one per connection; {meta['repeats']} run(s) of each.")


# --------------------------------------------------------------------------- main

def progress_line(r: dict) -> str:
    client = " (asyncio client)" if r.get("client") == "asyncio" else ""
    lat = r.get("commit_latency_ms")
    return (f"bench_compare: {r['daemon']} {r['mode']}{client} #{r['repeat'] + 1}: accepted"
            f" {r['accepted']} at {r['accepted_per_s']}/s, delivered {r['delivered']} at"
            f" {r['delivered_per_s']}/s, CPU {r.get('cpu_ms_per_message')} ms/msg,"
            f" peak PSS {r.get('peak_pss_mib')} MB"
            + (f", this script {100 * r['bench_cpu_share']:.1f} % of the CPUs"
               if r.get("bench_cpu_share") is not None else "")
            + (f", commit p99 {lat['p99']} ms" if lat else "")
            + (f", {100 * r['steal_share']:.1f} % of the CPU stolen" if r.get("steal_share") is not None else "")
            + (f", ERROR {r['error']}" if r["error"] else "")
            + (", TIMED OUT" if r["timed_out"] else ""))


def postfix_version(tools: Path) -> str:
    try:
        res = subprocess.run([str(tools / "usr/sbin/postconf"), "-d", "-h", "mail_version"],
                             env=dict(os.environ, LD_LIBRARY_PATH=str(tools / "usr/lib/postfix")),
                             capture_output=True, text=True, timeout=30)
        return res.stdout.strip() or "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def pysmtpd_commit() -> str:
    try:
        res = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        return res.stdout.strip() or "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, default=2000, help="messages per run (default 2000)")
    p.add_argument("-s", type=int, default=10, help="concurrent SMTP sessions (default 10)")
    p.add_argument("--size", type=int, default=5120, help="message size in bytes (default 5120)")
    p.add_argument("-r", "--repeats", type=int, default=1, help="runs of each pair (default 1)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--daemons", nargs="+", choices=DAEMONS, default=list(DAEMONS),
                   help="(default both; one alone gives no ratio)")
    p.add_argument("--timeout", type=float, default=600.0, help="bound of each run in seconds")
    p.add_argument("--keep", action="store_true", help="keep the temporary directories")
    p.add_argument("--pss-every", type=int, default=PSS_EVERY, metavar="K",
                   help=f"read PSS at every K-th reading of RSS ({RSS_INTERVAL} s apart) besides"
                        f" each new RSS high (default {PSS_EVERY})")
    p.add_argument("--latency", action="store_true",
                   help="also run pysmtpd under bench_mail's asyncio client (same -n, -s, --size),"
                        " which times every commit (smtp-source does not): p50/p90/p99 under the table")
    args = p.parse_args(argv)
    if args.n < 1 or args.s < 1 or args.size < 64 or args.repeats < 1 or args.pss_every < 1:
        p.error("-n, -s, -r and --pss-every must be >= 1, --size >= 64")
    return args


def run_plan(daemons, repeat: int, latency: bool) -> list[tuple[str, str]]:
    """(daemon, client) of one repeat of one mode, in order: the daemons take turns at
    going first (module docstring), and pysmtpd's asyncio-client run comes last."""
    order = list(daemons) if repeat % 2 == 0 else list(reversed(daemons))
    plan = [(daemon, "smtp-source") for daemon in order]
    if latency and "pysmtpd" in daemons:
        plan.append(("pysmtpd", "asyncio"))
    return plan


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench_compare: run as root (Postfix's master runs only as root; pysmtpd is"
              " measured with privilege separation)", file=sys.stderr)
        return 2

    def interrupted(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    # Postfix's master leaves its children to exit on their own: they come to us to reap.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    runs: list[dict] = []
    try:
        tools = get_postfix_tools(quiet=False)
        if tools is None:
            print("bench_compare: bench/get-postfix-tools.sh failed", file=sys.stderr)
            return 2
        for created in ensure_users():
            print(f"bench_compare: created Postfix's {created} (system account)", file=sys.stderr)
        meta = {"bench": "compare", "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                "nproc": os.cpu_count(), "python": platform.python_version(),
                "postfix_version": postfix_version(tools), "pysmtpd_commit": pysmtpd_commit(),
                "n": args.n, "sessions": args.s, "size": args.size, "repeats": args.repeats,
                "loadavg_start": " ".join(f"{x:.2f}" for x in os.getloadavg())}
        for repeat in range(args.repeats):
            for mode in args.modes:
                for daemon, client in run_plan(args.daemons, repeat, args.latency):
                    r = run_one(daemon, mode, args, tools, repeat, client)
                    runs.append(r)
                    print(progress_line(r), file=sys.stderr, flush=True)
    except Interrupted as exc:
        print(f"bench_compare: interrupted ({exc}); everything started was stopped", file=sys.stderr)
        return 130
    finally:
        for base in LEFT_FOR_THE_END:
            shutil.rmtree(base, ignore_errors=True)
    meta["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(heading(meta))
    print()
    print(table(runs))
    lines = latency_lines(runs) + steal_lines(runs)
    if lines:
        print()
        print("\n".join(lines))
    meta["ratio_delivered"] = {mode: ratios(runs, mode) for mode in args.modes}
    print(json.dumps({**meta, "runs": runs}), flush=True)
    return 0 if runs and all(complete(r) for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
