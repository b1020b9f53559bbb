"""pony's side of filtering (OpenSMTPD smtp_session.c's smtp_filter_* and smtp_report_*).

A session of a listener with ``filter NAME`` asks lka at each wait point of the core
(docs/smtp.md) whose phase its chain registered, and at no other: lka tells it at
``begin`` which phases and report events the chain wants, so a session of a chain that
only watches ``rcpt-to`` pays one round trip per RCPT and nothing else.  Report events
are sent without waiting (ordered before the next request of the session).  Data
lines, when a filter wants them, go to lka as the core's chunks (one message per
chunk, not per line) and come back filtered, gathered per read; the body then goes
to the queue from what the filters wrote.
"""
from __future__ import annotations

import asyncio

from common.ipc import PeerTimeout
from common.messages import (
    FilterReportEvent, FilterSmtpBegin, FilterSmtpBeginReply, FilterSmtpData, FilterSmtpEnd,
    FilterSmtpProtocol, FilterSmtpProtocolReply, FilterSmtpReport,
)

EXTRA_WAIT = 15.0
# sent whatever the chain registered: lka's builtin filters look at the HELO name and the
# authenticated user at later phases (lka_filter.c keeps them from these events)
ALWAYS_REPORTED = ("link-identify", "link-auth")     # pony waits filter-timeout plus this: lka answers tempfail first


class FilterFailed(PeerTimeout):
    """A filter of the chain failed (crashed, hung, wrote garbage): 421/451 4.3.0."""


class SessionFilters:
    def __init__(self, session, filter_name: str) -> None:
        self.session = session
        self.pony = session.pony
        self.name = filter_name
        self.phases: set[str] = set()
        self.events: set[str] = set()
        self.reports: list[FilterReportEvent] = []
        self.data_out: asyncio.Queue | None = None
        self.ended = False

    @property
    def timeout(self) -> float:
        return float(self.pony.config.filter_timeout) + EXTRA_WAIT

    async def begin(self, rdns: str, src: str, dest: str, now: float) -> bool:
        reply = await self.pony.mesh.request("lka", FilterSmtpBegin(
            reqid=self.pony.ctx.new_id(), session=self.session.session_id, filter=self.name,
            rdns=rdns, src=src, dest=dest, time=now), (FilterSmtpBeginReply,), timeout=self.timeout)
        self.phases, self.events = set(reply.phases), set(reply.events)
        return reply.ok

    def report(self, now: float, event: str, *params: str) -> None:
        if (event in self.events or event in ALWAYS_REPORTED) and not self.ended:
            self.reports.append(FilterReportEvent(event=event, params=list(params), time=now))

    async def flush(self) -> None:
        if self.reports:
            events, self.reports = self.reports, []
            await self.pony.mesh.send("lka", FilterSmtpReport(session=self.session.session_id, events=events))

    def wants(self, phase: str) -> bool:
        return phase in self.phases

    async def ask(self, phase: str, param: str, now: float) -> tuple[str, str | None]:
        """The chain's decision for ``phase``; FilterFailed when a filter failed."""
        await self.flush()
        try:
            reply = await self.pony.mesh.request("lka", FilterSmtpProtocol(
                reqid=self.pony.ctx.new_id(), session=self.session.session_id, phase=phase,
                param=param, time=now), (FilterSmtpProtocolReply,), timeout=self.timeout)
        except PeerTimeout as exc:
            raise FilterFailed(f"filter {self.name}: {exc}") from None
        if reply.decision == "tempfail":
            raise FilterFailed(f"filter {self.name}: a filter failed at phase {phase}")
        return reply.decision, reply.param

    # -- data lines --------------------------------------------------------------------------

    @property
    def wants_data(self) -> bool:
        return "data-line" in self.phases

    async def data(self, chunk: bytes, first: bool = False, last: bool = False) -> None:
        if first:
            self.data_out = asyncio.Queue()
        await self.flush()
        await self.pony.mesh.send("lka", FilterSmtpData(session=self.session.session_id, chunk=chunk,
                                                        first=first, last=last))

    def data_received(self, chunk: bytes, done: bool, failed: bool) -> None:
        if self.data_out is not None:
            self.data_out.put_nowait((chunk, done, failed))

    async def end(self) -> None:
        if self.ended:
            return
        await self.flush()
        self.ended = True
        await self.pony.mesh.send("lka", FilterSmtpEnd(session=self.session.session_id))
