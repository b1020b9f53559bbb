"""What every child process does around its own logic.

A child is started as ``smtpd -x NAME`` (by an isolated interpreter: see
``parent.child_argv``); it sets no-new-privs and empties its capability bounding
set, sets its title, lets its module do the few things that need root (bind the control
socket, create the spool), binds its channels, chroots where OpenSMTPD does, drops
privileges, connects its channels, tells the parent it is ready, and serves until
SIGTERM or the parent's death.  Everything is imported and every file it needs is
opened before the chroot (docs/security.md).
"""
from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import zmq
from setproctitle import setproctitle

from common import aio, log as logsetup
from common import privsep
from common.ids import UidGenerator
from common.ipc import Mesh
from common.messages import ConfEnd, ConfEndDone, Msg, SetupDone
from smtpd import introspection, queue_profile, reload

log = logging.getLogger("smtpd")


@dataclass
class Context:
    name: str
    opts: Any
    config: Any
    mesh: Mesh
    prepared: Any = None
    new_id: UidGenerator = field(default_factory=UidGenerator)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)


# Modules the standard library and our dependencies import lazily, on first use.
# After the privilege drop the interpreter's own files may be unreadable (a Python
# under /root, the chroot), so everything is imported while we still can.
PRELOAD = (
    "concurrent.futures.thread", "encodings.idna", "encodings.ascii", "encodings.latin_1",
    "encodings.utf_8", "email.utils", "email._parseaddr", "logging.handlers", "_strptime",
    "traceback", "linecache", "tokenize", "zmq.utils.garbage",
)
DNS_TYPES = ("MX", "A", "AAAA", "PTR", "CNAME", "NS", "SOA", "TXT", "TLSA", "SRV")


def preload() -> None:
    for name in PRELOAD:
        importlib.import_module(name)
    import dns.rdata
    import dns.rdataclass
    import dns.rdatatype
    for rdtype in DNS_TYPES:
        dns.rdata.get_rdata_class(dns.rdataclass.IN, dns.rdatatype.from_text(rdtype))
    # The C library reads the time zone (/etc/localtime, or $TZ's file) once, at the
    # first conversion, and keeps it: log timestamps and Date: headers stay local
    # time in a chroot without the zone files.
    time.localtime()


def run_child(opts, config) -> int:
    name = opts.proc
    # The syslog socket is connected here, before the chroot, and kept (common/log.py).
    logsetup.setup(foreground=opts.debug, verbose=bool(opts.verbose), proc=name,
                   syslog_socket=opts.syslog_socket)
    try:
        privsep.restrict()              # first: before any thread (ZeroMQ's) exists
    except privsep.PrivsepError as exc:
        log.error("fatal: %s: %s", name, exc)
        return 1
    setproctitle(f"smtpd: {name}")
    module = importlib.import_module(f"smtpd.{name}")
    preload()
    introspection.apply_command_line(opts)
    root = privsep.chroot_dir(name, opts.rundir, opts.spool)
    try:
        prepared = module.prepare(opts, config)
        if name == "queue":             # its storage, timed by `smtpctl profile queue`
            prepared = queue_profile.Observed(prepared)
        mesh = Mesh(name, Path(opts.rundir))
        mesh.bind()
        privsep.drop(name, root)
    except (OSError, zmq.ZMQError, privsep.PrivsepError) as exc:
        log.error("fatal: %s: %s", name, exc)
        return 1
    privsep.die_with_parent(opts.parent_pid)
    # Where the channels the peers bind are seen from this process's root.
    rundir_view = Path("/") if root == opts.rundir else Path(opts.rundir)
    return aio.run(_serve(name, module, opts, config, prepared, mesh, rundir_view))


def leave(code: int) -> NoReturn:
    """End a child that has stopped serving, without the interpreter's teardown: it
    would free every object, writing to (so copying) every page the child shares
    with the others (docs/architecture.md, "Memory"), a peak of memory at each stop
    for nothing.  The channels are closed by then; the log and the standard streams
    are flushed here."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


async def _serve(name, module, opts, config, prepared, mesh: Mesh, rundir_view: Path) -> int:
    loop = asyncio.get_running_loop()
    ctx = Context(name=name, opts=opts, config=config, mesh=mesh, prepared=prepared)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, ctx.stopping.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)   # reload is the parent's business
    mesh.connect(rundir_view)
    process = module.Process(ctx)

    async def handle(peer: str, msg: Msg):
        if isinstance(msg, ConfEnd):
            await process.on_conf_end()
            return await mesh.send("parent", ConfEndDone(proc=name))
        if isinstance(msg, reload.CHILD_MESSAGES):
            return await reload.on_child_message(ctx, process, peer, msg)
        if await introspection.handle(mesh, name, peer, msg):
            return None
        return await process.handle(peer, msg)

    mesh.start(handle)
    await process.start()
    await mesh.send("parent", SetupDone(proc=name, pid=os.getpid()))
    await ctx.stopping.wait()
    try:
        await asyncio.wait_for(process.stop(), 3)
    except Exception:
        log.exception("%s: error while stopping", name)
    mesh.close()
    return 0
