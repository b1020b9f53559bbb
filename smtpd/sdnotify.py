"""systemd integration of the parent: readiness notification and socket activation.

sd_notify(3): one datagram of ``KEY=VALUE`` lines to the AF_UNIX socket named by
$NOTIFY_SOCKET (a path, or ``@name`` for the abstract namespace).  Hand-written
rather than a dependency: it is twenty lines, and the library would add nothing
but an import.  Without $NOTIFY_SOCKET every call does nothing, so the same code
runs under systemd, under another supervisor and in a terminal.

sd_listen_fds(3): systemd passes listening sockets as fds 3, 4, ... with
$LISTEN_FDS (their count), $LISTEN_PID (our pid, so that a child that inherited
the environment does not take them) and $LISTEN_FDNAMES (``:``-separated names).
``inherited_sockets()`` takes them; the parent matches them to the configuration's
listeners (smtpd/listeners.py).

sd_watchdog_enabled(3): with WatchdogSec= in the unit, systemd sets $WATCHDOG_USEC
(and $WATCHDOG_PID) and expects ``WATCHDOG=1`` more often than that, or it kills
and restarts the service.  ``Watchdog`` sends it from the parent only while every
child answers: a child stuck in a loop, deadlocked or stopped stops the pings, so a
hung daemon is restarted even though no process died.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable

log = logging.getLogger("smtpd")

SD_LISTEN_FDS_START = 3


class Notifier:
    """Sends state changes to systemd's notification socket, if there is one."""

    def __init__(self, address: str | None = None) -> None:
        address = os.environ.get("NOTIFY_SOCKET") if address is None else address
        self.address: str | bytes | None = None
        if address:
            # "@name" is the abstract namespace: a leading NUL byte on the wire.
            self.address = "\0" + address[1:] if address.startswith("@") else address
        self.sent: int = 0
        self.failed: int = 0
        self.watchdog_usec: int = 0         # from $WATCHDOG_USEC: 0 when off
        self.stopping_sent = False          # STOPPING=1 said: the watchdog has nothing more to say

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: str | int) -> bool:
        """notify(READY=1, STATUS="...") sends ``READY=1\\nSTATUS=...``.  Never raises:
        a missing notification socket must not take the mail server down."""
        if self.address is None:
            return False
        text = "\n".join(f"{key}={value}" for key, value in fields.items())
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(2.0)
            sock.connect(self.address)
            sock.send(text.encode("utf-8", "replace"))
            self.sent += 1
            return True
        except OSError:
            self.failed += 1
            return False
        finally:
            sock.close()

    def ready(self, status: str) -> bool:
        return self.notify(READY=1, STATUS=status)

    def status(self, status: str) -> bool:
        return self.notify(STATUS=status)

    def reloading(self, status: str) -> bool:
        return self.notify(RELOADING=1, STATUS=status)

    def stopping(self, status: str) -> bool:
        self.stopping_sent = True
        return self.notify(STOPPING=1, STATUS=status)


def watchdog_usec(environ: dict[str, str]) -> int:
    """sd_watchdog_enabled(3): the watchdog timeout in microseconds, 0 if there is
    none or it is meant for another process ($WATCHDOG_PID)."""
    usec, pid = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return 0
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return 0
    return int(usec)


def take_notify_socket_from_environment() -> Notifier:
    """The notifier of this process, with the watchdog timeout; the variables are
    removed from the environment so that the children (and the delivery helpers) do
    not inherit them (sd_notify's unset_environment)."""
    notifier = Notifier()
    if notifier.enabled:
        notifier.watchdog_usec = watchdog_usec(os.environ)
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        os.environ.pop(name, None)
    return notifier


class Watchdog:
    """``WATCHDOG=1`` every half timeout (sd_watchdog_enabled(3)'s advice), each time
    only if every process named answered ``ask`` within a quarter of the timeout.

    ``ask(name, deadline)`` is a coroutine that returns once ``name`` answered and
    raises on silence (the parent sends a stat_get over the process's channel: the
    answer comes from the child's event loop, so a blocked loop is silent too).
    """

    def __init__(self, notifier: Notifier, names: Iterable[str],
                 ask: Callable[[str, float], Awaitable[object]]) -> None:
        self.notifier = notifier
        self.names = list(names)
        self.ask = ask
        self.period = notifier.watchdog_usec / 2e6
        self.deadline = notifier.watchdog_usec / 4e6
        self.silent: list[str] = []          # who did not answer the last round

    @property
    def enabled(self) -> bool:
        return self.notifier.enabled and self.notifier.watchdog_usec > 0

    async def _answers(self, name: str) -> bool:
        try:
            await self.ask(name, self.deadline)
            return True
        except Exception:                    # silence, a closed channel: no answer either way
            return False

    async def round(self) -> bool:
        """One round: ask everyone, ping if all answered; True if it pinged."""
        answers = await asyncio.gather(*(self._answers(n) for n in self.names))
        silent = [n for n, ok in zip(self.names, answers) if not ok]
        if self.notifier.stopping_sent:
            return False
        if silent and silent != self.silent:
            log.error("warn: smtpd: watchdog: no answer from %s in %.3gs: not telling systemd "
                      "that smtpd is alive", ", ".join(silent), self.deadline)
        elif not silent and self.silent:
            log.info("info: smtpd: watchdog: every process answers again")
        self.silent = silent
        return not silent and self.notifier.notify(WATCHDOG=1)

    async def run(self) -> None:
        if not self.enabled:
            return
        log.info("info: smtpd: watchdog: %.3gs (a ping every %.3gs while every process answers)",
                 self.notifier.watchdog_usec / 1e6, self.period)
        while not self.notifier.stopping_sent:     # children going away are not hung
            started = time.monotonic()
            await self.round()
            await asyncio.sleep(max(0.0, self.period - (time.monotonic() - started)))


@dataclass
class InheritedSocket:
    sock: socket.socket
    name: str           # from $LISTEN_FDNAMES, "" if systemd gave none

    def address(self) -> tuple[int, str, int]:
        host, port = self.sock.getsockname()[:2]
        return self.sock.family, host, port


class ActivationError(Exception):
    pass


def inherited_sockets(environ: dict[str, str] | None = None) -> list[InheritedSocket]:
    """The listening sockets systemd passed to this process ([] if none), and the
    LISTEN_* variables removed from ``environ`` (os.environ by default).

    Raises ActivationError for sockets smtpd cannot serve (not TCP, not listening).
    """
    env = os.environ if environ is None else environ
    count, pid = env.pop("LISTEN_FDS", ""), env.pop("LISTEN_PID", "")
    names = env.pop("LISTEN_FDNAMES", "")
    if not count:
        return []
    if not (count.isdigit() and pid.isdigit()):
        raise ActivationError(f"bad LISTEN_FDS={count!r} / LISTEN_PID={pid!r}")
    if int(pid) != os.getpid():
        return []           # meant for another process (we were forked or exec'd since)
    name_list = names.split(":") if names else []
    out = []
    for index in range(int(count)):
        fd = SD_LISTEN_FDS_START + index
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise ActivationError(f"fd {fd} from systemd: {exc.strerror}") from None
        name = name_list[index] if index < len(name_list) else ""
        what = f"fd {fd}" + (f" ({name})" if name else "")
        problem = ""
        if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
            problem = "is not a TCP socket (use ListenStream=)"
        elif not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            problem = "is not listening (Accept=no is required)"
        if problem:
            sock.detach()                 # leave the descriptor as it was
            for taken in out:
                taken.sock.detach()
            raise ActivationError(f"{what} from systemd {problem}")
        sock.set_inheritable(False)
        out.append(InheritedSocket(sock, name))
    return out
