"""``lmtp destination [rcpt-to]``: hand the message to an LMTP server (mirrors
OpenSMTPD's mail.lmtp.c, which its ``lmtp`` action runs as the user).

The destination is a unix socket (an absolute path) or ``host:port`` (a bracketed
IPv6 address allowed).  The dialogue is smtpd/smtp_client.py's sans-I/O core with
``lmtp=True``; this module is its blocking driver, run in the user's delivery
worker (so a socket only the user may reach is reached as the user), with one
overall deadline.  One envelope is one recipient, so the one LMTP reply to the end
of data for it decides: 2xx delivered, 5xx permanent, anything else, or a
connection that fails, temporary.
"""
from __future__ import annotations

import encodings.idna  # noqa: F401  loaded now: the worker, as the user, may not read the stdlib
import socket
import time

from smtpd import smtp_client
from smtpd.delivery_body import MessageBody

TIMEOUT = 300.0
HELO = "localhost"            # mail.lmtp says LHLO localhost


def parse_destination(dest: str) -> tuple[int, object]:
    """(address family, address) of ``/path`` or ``host:port`` / ``[v6]:port``."""
    if dest.startswith("/"):
        return socket.AF_UNIX, dest
    if dest.startswith("["):
        host, sep, port = dest[1:].partition("]:")
        family = socket.AF_INET6
    else:
        host, sep, port = dest.rpartition(":")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"lmtp destination {dest!r}: a unix socket path or host:port")
    return family, (host, int(port))


def _connect(dest: str, timeout: float) -> socket.socket:
    family, address = parse_destination(dest)
    if family == socket.AF_UNIX:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except BaseException:
            sock.close()
            raise
        return sock
    host, port = address  # type: ignore[misc]
    return socket.create_connection((host, port), timeout=timeout)


def deliver(dest: str, body: MessageBody, sender: str, rcpt: str,
            timeout: float = TIMEOUT) -> tuple[str, str]:
    """(status, error) of one LMTP transaction for ``rcpt``."""
    deadline = time.monotonic() + timeout
    try:
        sock = _connect(dest, timeout)
    except ValueError as exc:
        return "permfail", str(exc)
    except OSError as exc:
        return "tempfail", f"cannot connect to {dest}: {exc.strerror or exc}"
    message = b"".join(body.chunks())
    client = smtp_client.SmtpClient(smtp_client.ClientSettings(helo=HELO, lmtp=True, tls="no"))
    try:
        with sock:
            return _dialogue(sock, client, message, sender, rcpt, deadline)
    except smtp_client.ProtocolError as exc:
        return "tempfail", f"LMTP: {exc}"
    except TimeoutError:
        return "tempfail", "LMTP: timeout"
    except OSError as exc:
        return "tempfail", f"LMTP: {exc.strerror or exc}"


def _dialogue(sock: socket.socket, client, message: bytes, sender: str, rcpt: str,
              deadline: float) -> tuple[str, str]:
    result: tuple[str, str] | None = None
    for _ in range(10_000):                      # bounded: a few events per reply
        event = client.next_event()
        out = client.data_to_send()              # what the replies just read called for
        if out:
            sock.sendall(out)
        if event is smtp_client.NEED_DATA:
            if result is not None and client.state in (smtp_client.CLOSED, smtp_client.FAILED):
                return result
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
            client.receive_data(sock.recv(65536))
            continue
        if isinstance(event, smtp_client.Ready):
            if result is not None:
                client.quit()
                continue
            client.send_mail(smtp_client.Transaction(mail_from=sender, rcpts=(rcpt,), body=message))
            sock.sendall(client.data_to_send())
        elif isinstance(event, smtp_client.SessionFailed):
            return event.status, event.text
        elif isinstance(event, smtp_client.TransactionDone):
            first = event.results[0]
            result = (first.status, "" if first.status == "ok" else first.reply)
            client.quit()
            out = client.data_to_send()
            if out:
                try:
                    sock.sendall(out)
                except OSError:
                    pass
            return result                       # the QUIT reply changes nothing
        elif isinstance(event, smtp_client.Closed):
            return result or ("tempfail", "LMTP: connection closed")
    return "tempfail", "LMTP: dialogue did not end"
