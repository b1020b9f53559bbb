"""control's side of ``trace``, ``untrace``, ``log verbose|brief``, ``profile``, ``unprofile``.

As in OpenSMTPD's control.c, control owns the two masks (``tracing``, whose 0x1 bit
is debug logging, and ``profiling``), changes them, applies them to itself and
broadcasts the new value to every other process (``ctl_verbose``/``ctl_profile``).
``log verbose`` sets the tracing mask to exactly the debug bit and ``log brief`` to 0,
clearing any trace, as there.  Unlike OpenSMTPD, each process acknowledges the change,
so ``command succeeded`` means that every process has switched (a test, or an admin,
can act on it right away); a process that does not answer makes the command fail
with its name.
"""
from __future__ import annotations

import asyncio
import logging

from common import trace
from common.ipc import PeerTimeout
from common.messages import ClientResult, CtlProfile, CtlReply, CtlVerbose
from smtpd import introspection

log = logging.getLogger("smtpd")

PEERS = ("parent", "lka", "queue", "scheduler", "pony")
ACK_TIMEOUT = 5.0
COMMANDS = ("trace", "untrace", "log verbose", "log brief", "profile", "unprofile")


class Switches:
    def __init__(self, ctx) -> None:
        self.ctx = ctx

    async def command(self, cmd: str, args: dict) -> ClientResult:
        flags = trace.FLAGS
        try:
            if cmd in ("trace", "untrace"):
                bits = trace.trace_bits(str(args.get("subsystem", "")))
                mask = flags.tracing | bits if cmd == "trace" else flags.tracing & ~bits
                return await self._broadcast(CtlVerbose, mask)
            if cmd in ("profile", "unprofile"):
                bits = trace.profile_bits(str(args.get("subsystem", "")))
                mask = flags.profiling | bits if cmd == "profile" else flags.profiling & ~bits
                return await self._broadcast(CtlProfile, mask)
        except trace.KeywordError as exc:
            return ClientResult(ok=False, text=str(exc))
        if cmd == "log verbose":
            return await self._broadcast(CtlVerbose, trace.TRACE_DEBUG)
        if cmd == "log brief":
            return await self._broadcast(CtlVerbose, 0)
        return ClientResult(ok=False, text=f"unknown command {cmd}")

    async def _broadcast(self, kind: type, mask: int) -> ClientResult:
        if kind is CtlVerbose:
            introspection.set_tracing("control", mask)
            log.info("info: control: tracing mask 0x%04x%s", mask,
                     f" ({', '.join(trace.names(mask))})" if trace.names(mask) else "")
        else:
            trace.FLAGS.set_profiling(mask)
            log.info("info: control: profiling mask 0x%x", mask)
        mesh, new_id = self.ctx.mesh, self.ctx.new_id
        replies = await asyncio.gather(
            *(mesh.request(peer, kind(mask=mask, reqid=new_id()), (CtlReply,), timeout=ACK_TIMEOUT)
              for peer in PEERS), return_exceptions=True)
        silent = [peer for peer, reply in zip(PEERS, replies) if not isinstance(reply, CtlReply)]
        for peer, reply in zip(PEERS, replies):
            if isinstance(reply, BaseException) and not isinstance(reply, PeerTimeout):
                log.error("warn: control: %s: %s", peer, reply)
        if silent:
            return ClientResult(ok=False, text=f"no answer from {', '.join(silent)}")
        return ClientResult(ok=True)
