"""Local delivery as the target user, run by the parent (the only process that
can change uid).  One short-lived forked child per delivery: it drops to the
user, writes the Maildir, and reports through its exit status and a pipe.

The child only runs plain Python file code and leaves with ``os._exit``: it never
touches the parent's ZeroMQ context or event loop, which makes the fork safe.
"""
from __future__ import annotations

import asyncio
import os

from common import privsep
from common.messages import MdaFork
from smtpd.maildir import MaildirError, deliver_maildir

EX_OK = 0
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_PERMFAIL = 65
DELIVERY_TIMEOUT = 300


def _child(msg: MdaFork, wfd: int) -> int:
    try:
        if privsep.privileged():
            if msg.uid == 0:
                os.write(wfd, b"MDA not allowed to deliver to root")
                return EX_NOPERM
            os.setgroups([])
            os.setresgid(msg.gid, msg.gid, msg.gid)
            os.setresuid(msg.uid, msg.uid, msg.uid)
        if msg.method != "maildir":
            os.write(wfd, f"delivery method {msg.method} not supported".encode())
            return EX_PERMFAIL
        deliver_maildir(msg.path, msg.message, junk=msg.junk)
        return EX_OK
    except MaildirError as exc:
        os.write(wfd, str(exc.text if hasattr(exc, "text") else exc).encode()[:1000])
        return EX_TEMPFAIL if exc.temporary else EX_PERMFAIL
    except BaseException as exc:  # the child must never return into the parent's code
        os.write(wfd, f"{type(exc).__name__}: {exc}".encode()[:1000])
        return EX_TEMPFAIL


async def run(msg: MdaFork) -> tuple[str, str]:
    """Deliver; returns (status, error) with status "ok" | "tempfail" | "permfail"."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = EX_TEMPFAIL
        try:
            os.close(rfd)
            code = _child(msg, wfd)
        finally:
            os._exit(code)
    os.close(wfd)
    loop = asyncio.get_running_loop()
    pidfd = os.pidfd_open(pid)
    exited = loop.create_future()
    loop.add_reader(pidfd, lambda: exited.done() or exited.set_result(None))
    try:
        await asyncio.wait_for(exited, DELIVERY_TIMEOUT)
    except TimeoutError:
        os.kill(pid, 9)
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    _, status = os.waitpid(pid, 0)
    error = os.read(rfd, 4096).decode("utf-8", "replace").strip()
    os.close(rfd)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return "tempfail", "terminated; timeout" if sig == 9 else f"terminated; signal {sig}"
    code = os.WEXITSTATUS(status)
    if code == EX_OK:
        return "ok", ""
    if code in (EX_TEMPFAIL, 71):
        return "tempfail", error or "temporary failure"
    return "permfail", error or f"exited with status {code}"
