"""Local delivery as the target user: the delivery worker, and the parent's part in
it (the parent is the only process that can change uid); mirrors the mda part of
OpenSMTPD's smtpd.c (forkmda).

At pony's request (MdaWorkerSpawn) the parent forks a delivery worker for a user
(uid, gid), handing it one end of an AF_UNIX seqpacket pair that pony made and sent
over (pony keeps the other end: smtpd/mda_workers.py has its side).  The worker
gives up every privilege at once (no-new-privs, an empty capability bounding set,
then the user's ids) and then delivers the messages pony sends it over that socket,
one at a time, answering each with a status.  Each request carries the message as a
descriptor the queue opened (SCM_RIGHTS; docs/delivery.md): the worker reads it,
neither pony nor the parent does.  The methods are modules of their own:
smtpd/maildir.py, delivery_mbox.py (mbox and /file), delivery_mda.py (mda, wrapper,
|command), delivery_lmtp.py.  The parent watches each worker through a pidfd, kills
one when pony asks (a delivery past its deadline) and tells pony how one ended.

A worker only runs plain Python file code (and, for an mda, fork+exec through
subprocess) and leaves with ``os._exit``: it never touches the parent's ZeroMQ
context or event loop, which makes the fork safe.  It ends when pony closes its
end of the socket (pony's pool decides: a worker idle too long, or one that served
its share), so a request can never race with a worker that is leaving.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import time

import msgspec

from common import privsep
from smtpd import delivery_lmtp, delivery_mbox, delivery_mda
from smtpd.delivery_body import MessageBody
from smtpd.maildir import MaildirError, deliver_maildir
from smtpd.ttl_cache import TtlCache

log = logging.getLogger("smtpd")

EX_OK = 0
EX_TEMPFAIL = 75
MAX_FRAME = 1 << 16            # one request or reply per datagram: no body in it
MAX_WORKERS = 256              # all users' together: pony keeps fewer (mda_workers.MAX_WORKERS)
ENDED_KEPT_SECONDS = 60.0      # how long the parent remembers how a worker ended
EXIT_WAIT = 5.0                # for a worker that closed its socket to be reaped


class Request(msgspec.Struct, array_like=True):
    method: str
    target: str
    junk: bool
    prefix: bytes
    sender: str
    rcpt: str
    dest: str
    username: str
    home: str
    subaddress: str
    lmtp_rcpt: str


class Reply(msgspec.Struct, array_like=True):
    status: str          # "ok" | "tempfail" | "permfail"
    error: str


# -- the worker (forked child, runs as the user) -------------------------------------------

def _deliver_one(req: Request, fd: int) -> Reply:
    try:
        body = MessageBody(req.prefix, fd)
        if req.method == "maildir":
            deliver_maildir(req.target, body, junk=req.junk)
            return Reply("ok", "")
        if req.method in ("mbox", "file"):
            delivery_mbox.append_mbox(req.target, body, req.sender, dotlock=req.method == "mbox")
            return Reply("ok", "")
        if req.method == "mda":
            env = delivery_mda.environment(home=req.home, username=req.username, sender=req.sender,
                                           rcpt=req.rcpt, dest=req.dest, subaddress=req.subaddress)
            status, error = delivery_mda.run(req.target, body, env, req.home)
            return Reply(status, error[:1000])
        if req.method == "lmtp":
            status, error = delivery_lmtp.deliver(req.target, body, req.sender, req.lmtp_rcpt or req.dest)
            return Reply(status, error[:1000])
        return Reply("permfail", f"delivery method {req.method} not supported")
    except MaildirError as exc:
        return Reply("tempfail" if exc.temporary else "permfail", str(exc.text)[:1000])
    except delivery_mbox.DeliveryFailure as exc:
        return Reply("tempfail" if exc.temporary else "permfail", exc.text[:1000])
    except Exception as exc:  # anything else is a temporary failure, reported
        return Reply("tempfail", f"{type(exc).__name__}: {exc}"[:1000])
    finally:
        os.close(fd)


def _drop_to(uid: int, gid: int) -> None:
    """No-new-privs and an empty bounding set (while still root: CAP_SETPCAP), then the
    user's ids: nothing the worker runs (an mda) can gain a privilege back."""
    privsep.restrict()
    if privsep.privileged():
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        if os.getuid() != uid or os.geteuid() != uid or os.getgroups():
            raise privsep.PrivsepError("delivery worker: privilege drop failed")


def _worker(uid: int, gid: int, parent_pid: int, sock: socket.socket) -> int:
    # What was inherited stays untouched: a collection would write to (and so copy)
    # the parent's pages.  What the worker makes, a few objects per message, is freed
    # by reference counting, and it lives for at most MAX_DELIVERIES messages.
    gc.disable()
    gc.freeze()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)       # a pipe to an mda that left: EPIPE
    # Nothing of the parent's (listeners, channels, pidfds) stays open in a
    # process that will run as a mail user.
    keep = sock.fileno()
    os.closerange(3, keep)
    os.closerange(keep + 1, 65536)
    _drop_to(uid, gid)
    privsep.die_with_parent(parent_pid)
    decode, encode = msgspec.msgpack.Decoder(Request).decode, msgspec.msgpack.Encoder().encode
    while True:
        data, fds, _flags, _addr = socket.recv_fds(sock, MAX_FRAME, 1)
        if not data:
            for fd in fds:
                os.close(fd)
            return EX_OK                               # sent away by the parent
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            reply = Reply("tempfail", "request without its message")
        else:
            reply = _deliver_one(decode(data), fds[0])
        sock.sendall(encode(reply))


# -- the parent's side ------------------------------------------------------------------

def fork_worker(uid: int, gid: int, sock: socket.socket) -> int:
    """Fork a worker that serves ``sock`` as (uid, gid); returns its pid (the caller
    closes its own copy of ``sock``)."""
    parent_pid = os.getpid()
    pid = os.fork()
    if pid == 0:
        code = EX_TEMPFAIL
        try:
            code = _worker(uid, gid, parent_pid, sock)
        finally:
            os._exit(code)
    return pid


def exit_text(status: int) -> str:
    """How a worker that vanished mid-delivery ended, from its wait status."""
    if os.WIFSIGNALED(status):
        return f"terminated; signal {os.WTERMSIG(status)}"
    return f"delivery process exited with status {os.WEXITSTATUS(status)}"


def root_refused(uid: int) -> str:
    """Why nothing is delivered as ``uid`` (uid 0 as root, as OpenSMTPD), or ""."""
    return "MDA not allowed to deliver to root" if privsep.privileged() and uid == 0 else ""


class WorkerProcesses:
    """The parent's part in local delivery: it forks a worker for a socket pony
    made (pony keeps the other end and talks to the worker itself: smtpd/mda_workers.py),
    reaps each one through a pidfd, kills one pony gave up on, and tells pony how one
    ended.  It never sees a request nor a message."""

    def __init__(self) -> None:
        self.running: dict[int, tuple[int, asyncio.Future]] = {}    # pid -> (pidfd, exit text)
        self.ended = TtlCache(ENDED_KEPT_SECONDS, max_entries=1024)  # pid -> exit text

    async def spawn(self, uid: int, gid: int, sock: socket.socket) -> tuple[str, str, int]:
        """(status, error, pid) of a new worker for (uid, gid) serving ``sock``."""
        refused = root_refused(uid)
        if refused:
            return "permfail", refused, 0
        if len(self.running) >= MAX_WORKERS:
            return "tempfail", "too many delivery processes", 0
        try:
            kind = (sock.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN),
                    sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE))
        except OSError:
            kind = None
        if kind != (socket.AF_UNIX, socket.SOCK_SEQPACKET):
            # only a request socket goes to a process that runs as a mail user
            return "tempfail", "not a delivery socket", 0
        pid = fork_worker(uid, gid, sock)
        loop = asyncio.get_running_loop()
        pidfd = os.pidfd_open(pid)
        loop.add_reader(pidfd, self._reap, pid)
        self.running[pid] = (pidfd, loop.create_future())
        return "ok", "", pid

    def _reap(self, pid: int) -> None:
        pidfd, ended = self.running.pop(pid)
        asyncio.get_running_loop().remove_reader(pidfd)
        os.close(pidfd)
        try:
            _, status = os.waitpid(pid, 0)          # the pidfd is readable: it has exited
        except ChildProcessError:
            status = 0
        text = exit_text(status)
        self.ended.put(pid, text)
        if not ended.done():
            ended.set_result(text)

    async def kill(self, pid: int) -> None:
        """SIGKILL a worker of ours (any other pid is ignored): pony gave up on it."""
        if pid in self.running:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    async def exit_text(self, pid: int) -> str:
        """How the worker ``pid`` ended, once it has (bounded wait)."""
        if pid in self.running:
            try:
                return await asyncio.wait_for(asyncio.shield(self.running[pid][1]), EXIT_WAIT)
            except TimeoutError:
                return "delivery process closed its socket and did not exit"
        return self.ended.get(pid) or "delivery process ended"

    def close(self) -> None:
        """At the parent's end: the workers still running are killed and collected
        (bounded: a process stuck in the kernel is left to init)."""
        loop = asyncio.get_running_loop()
        for pid, (pidfd, _) in list(self.running.items()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            loop.remove_reader(pidfd)
            os.close(pidfd)
            for _ in range(100):
                try:
                    if os.waitpid(pid, os.WNOHANG)[0]:
                        break
                except ChildProcessError:
                    break
                time.sleep(0.01)
        self.running.clear()
