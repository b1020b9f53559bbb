"""Gathering the counters of every process (stat_backend.c, stat_ramstat.c), in control.

OpenSMTPD's processes send every increment to control as a message, and control
keeps the tree that ``show stats`` walks and the ``monitor`` digest.  Here each
process keeps its own counters (common.stat: a dictionary update, no message on the
hot path) and control asks all of them when someone looks: one ``stat_get`` per
process per ``show stats``, per ``monitor`` row (once a second) or per metrics scrape.
Nothing is spent while nobody looks.

The merged view: every key's values summed over the processes (a key normally lives
in one process), control's own counters (``control.session``), and ``uptime``, the
time control started (smtpctl prints the seconds since, as OpenSMTPD's does).

The monitor digest (struct stat_digest, control.c control_digest_update): new SMTP
clients and disconnections are the increments and decrements of ``smtp.session``,
enqueued and dequeued envelopes those of ``scheduler.envelope``; the other fields
are the net values of their counters.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from common import stat
from common.messages import ClientResult, StatGet, StatReply

log = logging.getLogger("smtpd")

PROCESSES = ("parent", "lka", "queue", "scheduler", "pony")
STAT_TIMEOUT = 5.0

# monitor digest field -> the counter it follows (net value since start).
DIGEST_NET = {
    "evp_expired": "scheduler.envelope.expired",
    "evp_removed": "scheduler.envelope.removed",
    "evp_bounce": "queue.bounce",
    "dlv_ok": "scheduler.delivery.ok",
    "dlv_permfail": "scheduler.delivery.permfail",
    "dlv_tempfail": "scheduler.delivery.tempfail",
    "dlv_loop": "scheduler.delivery.loop",
}
# digest fields counted from the increments / decrements of a counter.
DIGEST_UP_DOWN = {
    "smtp.session": ("clt_connect", "clt_disconnect"),
    "scheduler.envelope": ("evp_enqueued", "evp_dequeued"),
}


class StatsUnavailable(Exception):
    """A process did not answer: its counters cannot be shown."""


@dataclass
class Gathered:
    values: dict[str, int | float] = field(default_factory=dict)
    increments: dict[str, int] = field(default_factory=dict)
    decrements: dict[str, int] = field(default_factory=dict)
    # process name -> resource usage (cpu_seconds, resident_memory_bytes, open_fds),
    # from the parent's reply: the metrics endpoint's process metrics.
    processes: dict[str, dict[str, float]] = field(default_factory=dict)

    def add(self, values, increments, decrements) -> None:
        for source, dest in ((values, self.values), (increments, self.increments),
                             (decrements, self.decrements)):
            for key, value in source.items():
                dest[key] = dest.get(key, 0) + value

    def digest(self) -> dict[str, int]:
        out = {name: int(self.values.get(key, 0)) for name, key in DIGEST_NET.items()}
        for key, (up, down) in DIGEST_UP_DOWN.items():
            out[up] = self.increments.get(key, 0)
            out[down] = self.decrements.get(key, 0)
        return out


class Stats:
    def __init__(self, ctx, started: float | None = None) -> None:
        self.ctx = ctx
        self.started = int(time.time() if started is None else started)

    async def gather(self) -> Gathered:
        """Every process's counters, merged; raises StatsUnavailable naming the silent."""
        mesh, new_id = self.ctx.mesh, self.ctx.new_id
        replies = await asyncio.gather(
            *(mesh.request(proc, StatGet(reqid=new_id()), (StatReply,), timeout=STAT_TIMEOUT)
              for proc in PROCESSES), return_exceptions=True)
        silent = [proc for proc, reply in zip(PROCESSES, replies) if not isinstance(reply, StatReply)]
        if silent:
            log.warning("warn: control: no counters from %s", ", ".join(silent))
            raise StatsUnavailable(f"no answer from {', '.join(silent)}")
        out = Gathered()
        for reply in replies:
            out.add(reply.values, reply.increments, reply.decrements)
            out.processes.update(reply.processes)
        out.add(stat.snapshot(), *stat.totals())
        out.values["uptime"] = self.started
        return out

    async def answer(self, cmd: str) -> ClientResult:
        """``show stats``: every key and value (uptime = the start time);
        ``monitor``: the digest."""
        try:
            gathered = await self.gather()
        except StatsUnavailable as exc:
            return ClientResult(ok=False, text=str(exc))
        if cmd == "monitor":
            return ClientResult(ok=True, data=dict(gathered.digest(), timestamp=int(time.time())))
        return ClientResult(ok=True, data=dict(gathered.values))
