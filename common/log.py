"""Logging as OpenSMTPD does it: plain lines, to stderr in the foreground (-d),
else to syslog's mail facility, each line sent as glibc's syslog(3) sends it:
``<PRI>Mmm dd hh:mm:ss smtpd[pid]: <line>`` in one datagram to /dev/log.

Line formats (``%016x smtp connected address=...``) are built by the callers;
this module only decides where lines go and at which syslog priority: OpenSMTPD's
log_warn/log_warnx are LOG_ERR, log_info LOG_INFO, log_debug LOG_DEBUG, fatal
LOG_CRIT (log.c), so Python's WARNING and ERROR both map to LOG_ERR.

Why not logging.handlers.SysLogHandler: it sends no timestamp and no ``ident[pid]``
tag and ends each datagram with a NUL byte, so syslog daemons store lines that
differ from OpenSMTPD's (and from what log parsers expect), and it does not
reconnect when the syslog daemon is restarted.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import time

log = logging.getLogger("smtpd")

LOG_MAIL = 2 << 3
PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 3,
            logging.INFO: 6, logging.DEBUG: 7}
# A line longer than this is cut, as syslog daemons would (rsyslog's default 8k).
MAX_LINE = 8000
# Seconds a send may wait for a busy syslog daemon before the line is dropped:
# an event loop must not stall on logging.
SEND_TIMEOUT = 1.0


# The pid and the last second's timestamp, computed once rather than per line
# (getpid is a system call; a forked child learns its own pid at the fork).
_pid = os.getpid()
_stamp_second = -1
_stamp = ""


def _after_fork() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork)


def _timestamp(now: float | None) -> str:
    global _stamp_second, _stamp
    if now is None:
        now = time.time()
    second = int(now)
    if second != _stamp_second:
        _stamp = time.strftime("%b %e %H:%M:%S", time.localtime(second))
        _stamp_second = second
    return _stamp


def syslog_line(record_level: int, message: str, ident: str = "smtpd", pid: int | None = None,
                now: float | None = None) -> bytes:
    """One datagram as glibc's syslog(3) builds it (``%h %e %T`` timestamp)."""
    pri = LOG_MAIL | PRIORITY.get(record_level, 6 if record_level < logging.WARNING else 3)
    stamp = _timestamp(now)
    pid = _pid if pid is None else pid
    data = f"<{pri}>{stamp} {ident}[{pid}]: {message}".encode("utf-8", "backslashreplace")
    return data[:MAX_LINE]


class SyslogHandler(logging.Handler):
    """Sends each record to a local syslog socket (datagram, else stream)."""

    def __init__(self, address: str, ident: str = "smtpd") -> None:
        super().__init__()
        self.address = address
        self.ident = ident
        self.sock: socket.socket | None = None
        self.dropped = 0
        self._connect()

    def _connect(self) -> None:
        """A new connection replaces the old one only once made: in a chroot the
        socket's path cannot be reached again, and the connection made before it
        is all the process has (docs/security.md)."""
        last: OSError | None = None
        for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
            sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
            try:
                sock.settimeout(SEND_TIMEOUT)
                sock.connect(self.address)
            except OSError as exc:
                sock.close()
                last = exc
                continue
            self.close_socket()
            self.sock, self.kind = sock, kind
            return
        raise last  # type: ignore[misc]

    def close_socket(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def reopen(self) -> None:
        """Reconnect (after the syslog daemon was restarted, or on reload)."""
        try:
            self._connect()
        except OSError:
            pass

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = syslog_line(record.levelno, self.format(record), self.ident)
        except Exception:
            self.handleError(record)
            return
        for attempt in (1, 2):
            try:
                if self.sock is None:
                    self._connect()
                if self.kind == socket.SOCK_STREAM:
                    self.sock.sendall(data + b"\0")   # NUL-framed, as glibc  # type: ignore[union-attr]
                else:
                    self.sock.send(data)              # type: ignore[union-attr]
                return
            except OSError:
                # The daemon went away (restart) or is stuck: reconnect once.
                self.close_socket()
        self.dropped += 1

    def close(self) -> None:
        self.close_socket()
        super().close()


_handler: logging.Handler | None = None


def setup(foreground: bool, verbose: bool = False, proc: str = "parent",
          syslog_socket: str = "/dev/log") -> None:
    """Log to stderr (``foreground``: smtpd -d) or to syslog at ``syslog_socket``.
    If no syslog daemon listens there, lines go to stderr rather than nowhere."""
    global _handler
    # Our lines are "%(message)s" alone: no record needs its caller's file and line
    # (a walk up the stack per line), thread, process or task names.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging.logAsyncioTasks = False
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    handler: logging.Handler
    if foreground:
        handler = logging.StreamHandler(sys.stderr)
    else:
        try:
            handler = SyslogHandler(syslog_socket)
        except OSError as exc:
            handler = logging.StreamHandler(sys.stderr)
            print(f"smtpd: no syslog at {syslog_socket} ({exc.strerror}): logging to stderr",
                  file=sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    _handler = handler
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # Libraries log at INFO for every connection; keep our format clean.
    logging.getLogger("mail.log").setLevel(logging.ERROR)   # its warnings are not our format
    logging.getLogger("asyncio").setLevel(logging.WARNING)


def reopen() -> None:
    """Reconnect to syslog (config reload: the syslog daemon may have been restarted)."""
    if isinstance(_handler, SyslogHandler):
        _handler.reopen()


def set_verbose(verbose: bool) -> None:
    logging.getLogger().setLevel(logging.DEBUG if verbose else logging.INFO)
