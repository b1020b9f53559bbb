"""smtpctl ``show stats`` and ``monitor`` (smtpctl.c do_show_stats, do_monitor).

``show stats``: every counter of every process as ``key=value`` lines in strcmp
order, ``uptime`` as the seconds since smtpd started plus ``uptime.human``.

``monitor``: once a second, ask control for the digest and print one row: the two
``curr`` columns absolute, every other one the increment since the previous row (the
first row: since smtpd started), with the two-line header before the first row and
every 25 rows.  Ctrl-C (or a reader that went away, ``| head``) ends it quietly with
exit status 0; the daemon going away ends it with an error (exit 1).
"""
from __future__ import annotations

import os
import sys
import time

import typer

from smtpctl import format as fmt
from smtpctl.client import WireError

COMMANDS = frozenset({"show stats", "monitor"})
HEADER_EVERY = 25
INTERVAL = 1.0


def run(conn, name: str) -> None:
    if name == "show stats":
        show_stats(conn)
    else:
        try:
            monitor(conn)
        except KeyboardInterrupt:
            raise typer.Exit(0)
        except BrokenPipeError:
            # Nothing more can be written; keep the exit-time flush from complaining.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(0)


def _fail(text: str | None) -> None:
    print(f"smtpctl: {fmt.command_result(False, text)}", file=sys.stderr)
    raise typer.Exit(1)


def show_stats(conn, now: float | None = None) -> None:
    reply = conn.request("show stats")
    if not reply.ok:
        _fail(reply.text)
    kv = dict(reply.data)
    if "uptime" in kv:          # control sends when it started; print the seconds since
        kv["uptime"] = int(time.time() if now is None else now) - int(kv["uptime"])
    for line in fmt.format_stats(kv):
        print(line)


def monitor(conn, rows: int | None = None, interval: float = INTERVAL, out=None) -> None:
    """Print ``rows`` rows (None: until interrupted) ``interval`` seconds apart."""
    out = out or sys.stdout
    previous = None
    count = 0
    while rows is None or count < rows:
        try:
            reply = conn.request("monitor")
        except OSError as exc:       # not stdout's broken pipe: the daemon's side closed
            raise WireError(exc.strerror or str(exc)) from None
        if not reply.ok:
            _fail(reply.text)
        if count % HEADER_EVERY == 0:
            for line in fmt.monitor_header(first=count == 0):
                out.write(line + "\n")
        out.write(fmt.format_monitor_row(reply.data, previous) + "\n")
        out.flush()
        previous = reply.data
        count += 1
        if rows is None or count < rows:
            time.sleep(interval)
