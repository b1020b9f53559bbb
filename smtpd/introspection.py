"""What every process (parent included) does for smtpctl's introspection commands.

control owns the masks and broadcasts each change (smtpd/control_trace.py); every
process applies it here: the trace switches, debug logging (``log verbose`` is the
0x1 bit of the same mask, as in OpenSMTPD), the profiling switches.  And every
process answers control's ``stat_get`` with its counters (common.stat), which control
gathers for ``show stats``, ``monitor`` and the metrics endpoint.
"""
from __future__ import annotations

import logging

from common import log as logsetup
from common import stat, trace
from common.messages import CtlProfile, CtlReply, CtlVerbose, Msg, StatGet, StatReply

log = logging.getLogger("smtpd")


def apply_command_line(opts) -> None:
    """The masks of ``smtpd -T WORD ... -v`` (every process parses the same argv;
    smtpd.main warns about unknown words, as OpenSMTPD)."""
    tracing, profiling, _unknown = trace.from_command_line(opts.trace, opts.verbose)
    trace.FLAGS.set_tracing(tracing)
    trace.FLAGS.set_profiling(profiling)


def set_tracing(proc: str, mask: int) -> None:
    was_debug = trace.FLAGS.debug
    trace.FLAGS.set_tracing(mask)
    if trace.FLAGS.debug != was_debug:
        # Said at debug level while debug logging is on: the line shows that this
        # process switched, and only then.
        if was_debug:
            log.debug("debug: %s: verbose logging off", proc)
        logsetup.set_verbose(trace.FLAGS.debug)
        if trace.FLAGS.debug:
            log.debug("debug: %s: verbose logging on", proc)


async def handle(mesh, proc: str, peer: str, msg: Msg, processes=None) -> bool:
    """Handle ``msg`` if it is one of control's introspection messages; True if it was.
    ``processes``: the parent's () -> resource usage of every process, for stat_get."""
    if isinstance(msg, CtlVerbose):
        set_tracing(proc, msg.mask)
    elif isinstance(msg, CtlProfile):
        trace.FLAGS.set_profiling(msg.mask)
    elif isinstance(msg, StatGet):
        increments, decrements = stat.totals()
        await mesh.send(peer, StatReply(reqid=msg.reqid, proc=proc, values=stat.snapshot(),
                                        increments=increments, decrements=decrements,
                                        processes=processes() if processes else {}))
        return True
    else:
        return False
    if msg.reqid:
        await mesh.send(peer, CtlReply(reqid=msg.reqid, ok=True))
    return True
