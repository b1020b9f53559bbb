#!/usr/bin/env python3
"""Many concurrent SMTP sessions against pysmtpd (issue 12: 1,000 on loopback).

Boots the real daemon as bench/bench_mail.py does (its code, imported), then:

1. opens ``--sessions`` SMTP sessions (default 1000) at once: connect, banner, EHLO,
   each bounded by ``--op-timeout``; the connect latency is connect -> EHLO's 250;
2. keeps every session open and has each send ``--per-session`` messages (default
   1): message j of the run (j = k * sessions + i for session i's k-th message) is
   started ``j * spread / total`` seconds after the last session opened, so the
   offered load is ``total / --spread`` msg/s (``--spread 0``: every message at once,
   a burst); the commit latency is the final ``.`` of DATA -> its 250;
3. QUITs every session once all are done, then waits for every accepted message to
   be delivered (the Maildir's new/, or the relay sink with ``--mode relay``).

Reports failures (connect errors, 4xx/5xx replies, timeouts), how many sessions were
open at the same time, commit and connect latency (p50/p90/p99/max), peak PSS and RSS
of the daemon's processes, pony's memory per open session, the daemon's CPU per message
per process (connection set-up included), and deliveries.  The
daemon's defaults refuse 1,000 sessions from one address (``smtp limit
max-sessions 768 max-sessions-per-address 64``): the configuration sets both to
``--limit`` (default: the sessions plus 10 %), as an admin expecting that load would;
``--default-limits`` keeps the defaults (the run then shows the 421 refusals).
The client raises its own RLIMIT_NOFILE to fit the sessions.

Bounded by ``--timeout`` (default 300 s); stops everything it started and removes
its temporary directory unless ``--keep``.  Prints a summary, then one JSON line.

    python bench/bench_sessions.py                       # 1000 sessions, 1 message each
    python bench/bench_sessions.py --sessions 1000 --spread 0     # all at once
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

try:
    import uvloop         # pysmtpd's own event loop, installed with it
except ImportError:       # pragma: no cover - a dependency of pysmtpd on Linux
    uvloop = None

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from bench_mail import (  # noqa: E402  (bench/ is not a package)
    BenchError, DaemonRun, Destination, LoadStats, RssSampler, SmtpError, build_config,
    close_writer, cpu_seconds_by_title, delivery_results, free_port, get_postfix_tools,
    latency_text, make_message, memory_results, numbered, open_session, percentiles_ms,
    pgrp_pids, quit_session, run_and_print, send_message, stop_run, summary_alarms,
    vmrss_kib, wait_until,
)
from meters import rollup_pss_kib  # noqa: E402


def raise_nofile(needed: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; the new soft limit
    (a BenchError if it stays under ``needed``)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft != resource.RLIM_INFINITY and soft < needed:
        raise BenchError(f"RLIMIT_NOFILE hard limit {soft} < {needed} descriptors needed")
    return soft


def process_memory_kib(pgid: int, title: str) -> tuple[int, int]:
    """(RSS, PSS) in KiB of the group's processes called ``title``."""
    rss = pss = 0
    for pid, t in pgrp_pids(pgid):
        if t == title:
            rss += vmrss_kib(pid)
            pss += rollup_pss_kib(pid)
    return rss, pss


class Client:
    """The sessions of one run and what happened to them."""

    def __init__(self, port: int, sessions: int, per_session: int, size: int, rcpt: str,
                 spread: float, op_timeout: float) -> None:
        self.port = port
        self.sessions = sessions
        self.per_session = per_session
        self.rcpt = rcpt
        self.spread = spread
        self.op_timeout = op_timeout
        self.template = make_message(size, rcpt)
        self.stats = LoadStats()
        self.open_now = 0
        self.max_open = 0
        self.all_open_at: float | None = None
        self.all_done_at: float | None = None
        self.timeouts = 0

    def fail(self, what: str, exc: BaseException) -> None:
        if isinstance(exc, asyncio.TimeoutError):
            self.timeouts += 1
            self.stats.error(f"{what}: timeout after {self.op_timeout:g} s")
        else:
            self.stats.error(f"{what}: {type(exc).__name__}: {exc}")

    async def run(self, on_all_open) -> None:
        opened = asyncio.Event()        # every session is open (or failed to open)
        sent = asyncio.Event()          # every session is done sending
        waiting = [self.sessions]
        unsent = [self.sessions]

        def count_down(counter: list[int], event: asyncio.Event) -> None:
            counter[0] -= 1
            if counter[0] == 0:
                if event is opened:
                    self.all_open_at = time.monotonic()
                    on_all_open(self)
                else:
                    self.all_done_at = time.monotonic()
                event.set()

        async def session(i: int) -> None:
            try:
                conn = await asyncio.wait_for(open_session(self.port, self.stats), self.op_timeout)
            except (OSError, SmtpError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
                self.fail("connect", exc)
                conn = None
            count_down(waiting, opened)
            if conn is None:
                count_down(unsent, sent)
                return
            reader, writer, pipelining = conn
            self.open_now += 1
            self.max_open = max(self.max_open, self.open_now)
            try:
                await opened.wait()
                try:
                    ok = await self.send_all(i, reader, writer, pipelining)
                finally:
                    count_down(unsent, sent)
                if ok:
                    await sent.wait()          # every session stays open until all have sent
                    await quit_session(reader, writer)
            finally:
                self.open_now -= 1
                await close_writer(writer)

        await asyncio.gather(*(session(i) for i in range(self.sessions)))

    async def send_all(self, i: int, reader, writer, pipelining: bool) -> bool:
        """Session ``i``'s messages, each at its time; False once one could not be sent
        (the session is then closed)."""
        total = self.sessions * self.per_session
        for k in range(self.per_session):
            j = k * self.sessions + i
            await asyncio.sleep(max(0.0, self.all_open_at + j * self.spread / total - time.monotonic()))
            try:
                await asyncio.wait_for(send_message(reader, writer, numbered(self.template, j),
                                                    self.rcpt, pipelining, self.stats),
                                       self.op_timeout)
            except (OSError, SmtpError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
                self.fail("message", exc)
                return False
        return True


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=1000, help="concurrent sessions (default 1000)")
    p.add_argument("--per-session", type=int, default=1, metavar="K",
                   help="messages each session sends (default 1)")
    p.add_argument("--size", type=int, default=5120, help="message size in bytes (default 5120)")
    p.add_argument("--spread", type=float, default=10.0, metavar="SECONDS",
                   help="the messages' start times are spread evenly over this many seconds "
                        "(default 10: 100 msg/s offered for 1000 messages; 0: all at once)")
    p.add_argument("--mode", choices=["relay", "maildir"], default="maildir")
    p.add_argument("--limit", type=int, default=None,
                   help="smtp limit max-sessions and max-sessions-per-address (default: "
                        "the sessions plus 10 %%)")
    p.add_argument("--default-limits", action="store_true",
                   help="keep the daemon's default session limits")
    p.add_argument("--op-timeout", type=float, default=60.0,
                   help="bound on opening a session and on each message (default 60 s)")
    p.add_argument("--timeout", type=float, default=300.0, help="global timeout in seconds")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--label", default="", help="free text copied into the JSON line")
    args = p.parse_args(argv)
    if args.sessions < 1 or args.per_session < 1 or args.size < 64 or args.spread < 0:
        p.error("--sessions and --per-session must be >= 1, --size >= 64, --spread >= 0")
    if args.limit is None:
        args.limit = args.sessions + max(10, args.sessions // 10)
    return args


def run(args: argparse.Namespace) -> dict:
    t_start = time.monotonic()
    deadline = t_start + args.timeout
    base = Path(tempfile.mkdtemp(prefix="pysmtpd-sessions-"))
    os.chmod(base, 0o711)
    total = args.sessions * args.per_session
    result: dict = {
        "bench": "sessions", "mode": args.mode, "sessions": args.sessions,
        "per_session": args.per_session, "messages": total, "size": args.size,
        "spread_seconds": args.spread,
        "limits": "default" if args.default_limits else args.limit, "label": args.label,
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "nproc": os.cpu_count(), "python": platform.python_version(), "uid": os.getuid(),
        "loadavg_start": os.getloadavg()[0], "timed_out": False, "error": None,
    }
    daemon: DaemonRun | None = None
    dest: Destination | None = None
    sampler: RssSampler | None = None
    client: Client | None = None
    try:
        tools = get_postfix_tools(quiet=True) if args.mode == "relay" else None
        port, sink_port = free_port(), free_port()
        extra = () if args.default_limits else (
            f"smtp limit max-sessions {args.limit} max-sessions-per-address {args.limit}",)
        config_text, new_dir = build_config(base, port, args.mode, sink_port, extra=extra)
        dest = Destination(args.mode, tools, base, sink_port, new_dir)
        result["sink"] = dest.name
        daemon = DaemonRun(base, config_text)
        daemon.start()
        pgid = daemon.proc.pid
        # after the start: the daemon keeps the limits it was given (raising them for
        # its sessions is its own business)
        result["client_nofile"] = raise_nofile(args.sessions + 64)
        sampler = RssSampler(pgid)
        result["idle_rss_mib"] = round(sampler.sample() / 1024, 1)
        result["idle_pss_mib"] = round(sampler.last_pss_kib / 1024, 1)
        pony_idle = process_memory_kib(pgid, "smtpd: pony")
        sampler.start()
        client = Client(port, args.sessions, args.per_session, args.size, dest.rcpt,
                        args.spread, args.op_timeout)

        def on_all_open(c: Client) -> None:
            rss, pss = process_memory_kib(pgid, "smtpd: pony")
            result["pony_rss_all_open_mib"] = round(rss / 1024, 1)
            result["pony_pss_all_open_mib"] = round(pss / 1024, 1)
            if c.max_open:
                result["pony_kib_per_open_session"] = round((rss - pony_idle[0]) / c.max_open, 1)

        async def go() -> None:
            await asyncio.wait_for(client.run(on_all_open), max(1.0, deadline - time.monotonic()))
        result["client_loop"] = "uvloop" if uvloop is not None else "asyncio"
        try:
            client_run(go())
        except asyncio.TimeoutError:
            result["timed_out"] = True
        accepted = client.stats.accepted
        result["failed"] = client.stats.failed
        if accepted:
            wait_until(lambda: dest.counter.count >= accepted or not daemon.alive(), deadline, 0.05)
            if dest.counter.count < accepted:
                result["timed_out"] = result["timed_out"] or daemon.alive()
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))   # duplicates?
    except BenchError as exc:
        result["error"] = str(exc)
    finally:
        stop_run(result, sampler, daemon, dest, base, args.keep)
        result["total_seconds"] = round(time.monotonic() - t_start, 2)
        result["loadavg_end"] = os.getloadavg()[0]

    if client is not None:
        st = client.stats
        result.update({
            "opened": len(st.connect_seconds), "max_open_at_once": client.max_open,
            "accepted": st.accepted, "failed": st.failed, "timeouts": client.timeouts,
            "errors": dict(sorted(st.errors.items(), key=lambda kv: -kv[1])[:8]),
            "send_seconds": round(client.all_done_at - client.all_open_at, 3)
            if client.all_done_at and client.all_open_at else None,
            "open_seconds": round(client.all_open_at - st.first_connect, 3)
            if client.all_open_at and st.first_connect else None,
            "commit_latency_ms": percentiles_ms(st.commit_seconds),
            "connect_latency_ms": percentiles_ms(st.connect_seconds),
        })
        result.update(delivery_results(dest.counter, st.accepted, client.all_open_at))
    if sampler is not None:
        result.update(memory_results(sampler))
        by_title = cpu_seconds_by_title(sampler.cpu_ticks)
        result["cpu_seconds_by_process"] = by_title
        if client is not None and client.stats.accepted:
            result["cpu_ms_per_message"] = {t: round(1000 * v / client.stats.accepted, 2)
                                            for t, v in by_title.items()}
    return result


def client_run(coro):
    """The client's loop: uvloop when it can be had.  Opening 1,000 sessions at once
    is a burst for the client as much as for the daemon: on asyncio's default loop
    the client's own work for the burst put about 70 ms into every connect latency
    (p99 229 ms, against 158 on uvloop, 2026-12-03, same daemon)."""
    return uvloop.run(coro) if uvloop is not None else asyncio.run(coro)


def summary(r: dict) -> str:
    def f(x, unit=""):
        return "n/a" if x is None else f"{x}{unit}"
    con = r.get("connect_latency_ms") or {}
    s = (f"{r['sessions']} sessions x {r['per_session']} ({r['mode']}, spread {r['spread_seconds']:g} s,"
         f" limits {r['limits']}, client on {r.get('client_loop', 'asyncio')}): opened {r.get('opened', 0)} (max {r.get('max_open_at_once', 0)} at once,"
         f" connect ms p50 {f(con.get('p50'))} p99 {f(con.get('p99'))} max {f(con.get('max'))}),"
         f" accepted {r.get('accepted', 0)}/{r['messages']}, {r.get('failed', 0)} failed"
         f" ({r.get('timeouts', 0)} timeouts), delivered {r.get('delivered', 0)};"
         f" {latency_text(r.get('commit_latency_ms'))};"
         f" peak PSS {f(r.get('peak_pss_mib'), ' MiB')} (idle {f(r.get('idle_pss_mib'), ' MiB')}),"
         f" peak RSS {f(r.get('peak_rss_mib'), ' MiB')},"
         f" pony {f(r.get('pony_kib_per_open_session'), ' KiB')} per open session")
    return s + summary_alarms(r)


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_and_print(run, summary, args, args.sessions * args.per_session)


if __name__ == "__main__":
    sys.exit(main())
