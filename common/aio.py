"""The event loop every process runs on.

uvloop (libuv) runs our socket-heavy loops (aiosmtpd sessions, MTA clients,
ZeroMQ readers) with noticeably less CPU than asyncio's pure-Python selector loop;
see docs/architecture.md and bench/.  The stdlib loop remains the fallback where
uvloop cannot be imported (PYSMTPD_LOOP=asyncio forces it, to compare).
"""
from __future__ import annotations

import asyncio
import gc
import os

try:        # imported here, before any privilege drop or chroot
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
    uvloop = None


def run(coro):
    # Objects alive at start (modules, config, tables) never become garbage:
    # keep the collector off them, and forked delivery children from touching
    # (and so copying) their pages.
    gc.freeze()
    if uvloop is not None and os.environ.get("PYSMTPD_LOOP") != "asyncio":
        return uvloop.run(coro)
    return asyncio.run(coro)
