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
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

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
        return self.notify(STOPPING=1, STATUS=status)


def take_notify_socket_from_environment() -> Notifier:
    """The notifier of this process; the variable is removed from the environment so
    that the children (and the delivery helpers) do not inherit it (sd_notify's
    unset_environment)."""
    notifier = Notifier()
    os.environ.pop("NOTIFY_SOCKET", None)
    return notifier


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
