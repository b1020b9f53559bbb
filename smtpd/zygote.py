"""The zygote: one clean interpreter that imports what the children share, then
forks the five of them, so the imported code and objects are shared copy-on-write
instead of being built five times (docs/architecture.md, "Memory").

The parent starts it as ``python -I -c ENTRY SPEC REPORT_FD`` (the same isolated
interpreter a child was started with) with every descriptor any child inherits
(same numbers as in the parent).  It reads no configuration and holds nothing
secret: it imports the modules, collects and freezes the garbage collector's
objects, then forks one process per child of SPEC.  Each fork closes every
descriptor that is not its own, waits to be adopted by the parent (the parent is a
child subreaper while the zygote runs, so the children become its own when the
zygote exits), and goes on exactly as an exec'd child: ``smtpd.main.main(argv)``,
which parses the configuration, confines itself, drops its privileges and serves.
The zygote writes the children's pids, as JSON, to REPORT_FD and exits.

OpenSMTPD re-executes each process so that each has its own address space layout;
forks of one zygote share one layout.  Why that is acceptable here:
docs/architecture.md.
"""
from __future__ import annotations

import gc
import json
import os
import sys
import time

ADOPTION_TIMEOUT = 10.0

# What the zygote imports: every child's module and what proc.py preloads.
CHILD_MODULES = ("control", "lka", "queue", "scheduler", "pony")


def _import_everything() -> None:
    import importlib

    import smtpd.main  # noqa: F401  (argument parsing, configuration)
    from smtpd import proc
    for name in CHILD_MODULES:
        importlib.import_module(f"smtpd.{name}")
    proc.preload()


def _close_all_but(keep: set[int]) -> None:
    low = 3
    for fd in sorted(keep | {65536}):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1


def _await_adoption(parent_pid: int) -> None:
    """Until the zygote has exited and the parent (a subreaper) adopted us: the
    child's parent-death check (privsep.die_with_parent) must see the parent."""
    deadline = time.monotonic() + ADOPTION_TIMEOUT
    while os.getppid() != parent_pid:
        if time.monotonic() > deadline:
            os._exit(1)
        time.sleep(0.001)


def serve() -> list[str]:
    """In the zygote: fork the children, report their pids, exit.  Returns (in
    each child only) the command line that child runs."""
    spec = json.loads(sys.argv[1])
    report_fd = int(sys.argv[2])
    _import_everything()
    gc.collect()
    gc.freeze()
    pids = {}
    for child in spec["children"]:
        pid = os.fork()
        if pid == 0:
            _close_all_but(set(child["keep"]))
            _await_adoption(spec["parent_pid"])
            return child["argv"]
        pids[child["name"]] = pid
    data = json.dumps(pids).encode()
    while data:
        data = data[os.write(report_fd, data):]
    os._exit(0)
