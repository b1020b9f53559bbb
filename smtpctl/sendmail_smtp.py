"""``sendmail -bs``: an SMTP dialogue on standard input and output.

Programs that speak SMTP to a local sendmail (some mailers, test harnesses) run
``sendmail -bs``.  OpenSMTPD ignores -b and reads a message; pysmtpd answers SMTP
(RFC 5321's commands a submitting client needs: HELO/EHLO, MAIL, RCPT, DATA, RSET,
NOOP, VRFY, QUIT) and hands each message, at the end of DATA, to the daemon exactly
as sendmail does (smtpctl/sendmail.py: the control socket's ``enqueue``, the user's
identity from SO_PEERCRED, or offline/ when the daemon is down).  ``MAIL FROM`` plays
the part of ``-f``; RET, ENVID and NOTIFY that of -R, -V, -N.  The dialogue's
sans-I/O part is ``Dialogue`` (one line in, reply lines out).
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO, Callable

from common import submission
from smtpctl.client import Connection, NotRunning, socket_path

MAX_LINE = 4096              # a command line (RFC 5321: 512; addresses may be long)
MAX_MESSAGE = 64 * 1024 * 1024
MAX_COMMANDS = 100_000       # per dialogue: a runaway client ends


@dataclass
class Transaction:
    sender: str | None = None
    recipients: list[str] = field(default_factory=list)
    ret: str = ""
    envid: str = ""
    notify: str = ""


def _path_and_params(text: str) -> tuple[str, dict[str, str]] | None:
    """``<addr> KEY=VALUE...`` -> (addr, params), None when malformed."""
    text = text.strip()
    if not text.startswith("<") or ">" not in text:
        return None
    addr, _, rest = text[1:].partition(">")
    params = {}
    for word in rest.split():
        key, _, value = word.partition("=")
        params[key.upper()] = value
    return addr, params


class Dialogue:
    """The server side of ``sendmail -bs``, sans I/O: ``line()`` takes one command
    line and returns the reply; after ``DATA``'s 354 the caller collects the message
    and gives it to ``message()``, which calls ``submit`` (opts, recipients, data) ->
    reply text."""

    def __init__(self, hostname: str, submit: Callable[[submission.SendmailOptions, list[str], bytes], str],
                 base: submission.SendmailOptions) -> None:
        self.hostname = hostname
        self.submit = submit
        self.base = base
        self.txn = Transaction()
        self.greeted = False
        self.done = False

    def banner(self) -> str:
        return f"220 {self.hostname} ESMTP pysmtpd (sendmail -bs)"

    def line(self, text: str) -> tuple[str, bool]:
        """(reply, whether the message follows)."""
        verb, _, rest = text.partition(" ")
        verb = verb.upper()
        if verb in ("HELO", "EHLO"):
            self.greeted, self.txn = True, Transaction()
            if verb == "HELO":
                return f"250 {self.hostname} Hello {rest.strip()}", False
            return f"250-{self.hostname} Hello {rest.strip()}\r\n250-8BITMIME\r\n250-DSN\r\n250 HELP", False
        if verb == "QUIT":
            self.done = True
            return f"221 2.0.0 {self.hostname} Bye", False
        if verb == "NOOP":
            return "250 2.0.0 Ok", False
        if verb == "RSET":
            self.txn = Transaction()
            return "250 2.0.0 Reset state", False
        if verb == "VRFY":
            return "252 2.5.2 Cannot VRFY user; try RCPT to attempt delivery", False
        if verb == "MAIL":
            return self._mail(rest), False
        if verb == "RCPT":
            return self._rcpt(rest), False
        if verb == "DATA":
            if self.txn.sender is None:
                return "503 5.5.1 Invalid command: Must issue a MAIL command first", False
            if not self.txn.recipients:
                return "503 5.5.1 Invalid command: No recipient specified", False
            return "354 Enter mail, end with \".\" on a line by itself", True
        return "500 5.5.1 Invalid command: Command unrecognized", False

    def _mail(self, rest: str) -> str:
        if not self.greeted:
            return "503 5.5.1 Invalid command: Polite people say HELO first"
        if self.txn.sender is not None:
            return "503 5.5.1 Invalid command: Already in a transaction"
        head, _, arg = rest.partition(":")
        parsed = _path_and_params(arg) if head.strip().upper() == "FROM" else None
        if parsed is None:
            return "501 5.5.4 Syntax: MAIL FROM:<address>"
        addr, params = parsed
        self.txn = Transaction(sender=addr, ret=params.get("RET", ""), envid=params.get("ENVID", ""))
        return "250 2.0.0 Ok"

    def _rcpt(self, rest: str) -> str:
        if self.txn.sender is None:
            return "503 5.5.1 Invalid command: Must issue a MAIL command first"
        head, _, arg = rest.partition(":")
        parsed = _path_and_params(arg) if head.strip().upper() == "TO" else None
        if parsed is None or not parsed[0]:
            return "501 5.5.4 Syntax: RCPT TO:<address>"
        addr, params = parsed
        self.txn.recipients.append(addr)
        self.txn.notify = params.get("NOTIFY", self.txn.notify)
        return "250 2.1.5 Destination address valid: Recipient ok"

    def message(self, data: bytes) -> str:
        """The reply to a message received after DATA's 354 (dot-unstuffed, LF endings)."""
        txn, self.txn = self.txn, Transaction()
        # the null sender <> is the user's own address: a user does not send bounces
        opts = replace(self.base, sender=txn.sender or "", dsn_ret=txn.ret, dsn_envid=txn.envid,
                       dsn_notify=txn.notify, recipients=list(txn.recipients), by_headers=False)
        return self.submit(opts, list(txn.recipients), data)


def read_data(stream: BinaryIO) -> bytes | None:
    """The message after 354, up to the ``.`` line, dot-unstuffed; None at EOF."""
    lines: list[bytes] = []
    size = 0
    while True:
        line = stream.readline(MAX_LINE * 16)
        if not line:
            return None
        line = line.rstrip(b"\r\n")
        if line == b".":
            return b"".join(l + b"\n" for l in lines)
        if line.startswith(b"."):
            line = line[1:]
        size += len(line) + 1
        if size <= MAX_MESSAGE:
            lines.append(line)


def serve(prog: str, base: submission.SendmailOptions, stdin: BinaryIO, stdout: BinaryIO) -> int:
    from smtpctl import sendmail          # the submission itself

    def submit(opts: submission.SendmailOptions, rcpts: list[str], data: bytes) -> str:
        try:
            conn = Connection(socket_path(None))
        except NotRunning:
            args = ["-f", opts.sender] if opts.sender else []
            for flag, value in (("-N", opts.dsn_notify), ("-R", opts.dsn_ret), ("-V", opts.dsn_envid)):
                args += [flag, value] if value else []
            try:
                sendmail.write_offline(Path(os.environ.get("SMTPD_SPOOL") or "/var/spool/smtpd"),
                                       [*args, "--", *rcpts], data)
            except sendmail.SendmailError as exc:
                return f"451 4.3.0 {exc}"
            return "250 2.0.0 Message queued offline: sent when smtpd starts"
        with conn:
            reply = sendmail.request_enqueue(conn, opts, rcpts, data)
        return reply.text if reply.text[:3].isdigit() else f"{'250' if reply.ok else '451'} {reply.text}"

    dialogue = Dialogue(socket.gethostname(), submit, base)

    def say(text: str) -> None:
        stdout.write(text.encode("utf-8", "replace") + b"\r\n")
        stdout.flush()

    say(dialogue.banner())
    for _ in range(MAX_COMMANDS):
        raw = stdin.readline(MAX_LINE)
        if not raw:
            return 0
        reply, wants_data = dialogue.line(raw.decode("utf-8", "replace").rstrip("\r\n"))
        say(reply)
        if dialogue.done:
            return 0
        if wants_data:
            data = read_data(stdin)
            if data is None:
                return 0
            say(dialogue.message(data))
    return 0
