"""smtpctl's side of the control socket (blocking; requests one after the other)."""
from __future__ import annotations

import os
import socket

from common.control_wire import PERMISSION_DENIED, WireError, frame, recv_frame
from common.messages import PROTOCOL_VERSION, ClientRequest, ClientResult

DEFAULT_SOCKET = "/var/run/smtpd.sock"
TIMEOUT = 120.0


class NotRunning(Exception):
    """Nothing answers on the control socket."""


class PermissionDenied(Exception):
    """control refused the command: the caller is neither root nor smtpd's user."""


def socket_path(option: str | None) -> str:
    return option or os.environ.get("SMTPD_SOCKET") or DEFAULT_SOCKET


class Connection:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise NotRunning(path) from None

    def request(self, command: str, **args):
        self.sock.sendall(frame(ClientRequest(version=PROTOCOL_VERSION, command=command, args=args)))
        reply = recv_frame(self.sock)
        if isinstance(reply, ClientResult) and not reply.ok and reply.text == PERMISSION_DENIED:
            raise PermissionDenied(command)
        return reply

    def next(self):
        return recv_frame(self.sock)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["Connection", "NotRunning", "PermissionDenied", "WireError", "socket_path"]
