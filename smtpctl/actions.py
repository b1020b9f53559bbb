"""What smtpctl's commands do with the daemon (smtpctl.c's do_* functions).

Each function gets an open control connection and the command's values as typed by
smtpctl.main's command tree; it prints OpenSMTPD's output (smtpctl.format) and ends with
``typer.Exit`` for a non-zero status.  ``control`` opens the connection and turns a
daemon that is not there, or a refusal, into smtpctl's messages.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator, Optional

import typer

from common.messages import ClientContent, ClientEnd, ClientQueueBatch, ClientResult
from smtpctl import format as fmt
from smtpctl import local_commands
from smtpctl.client import Connection, NotRunning, PermissionDenied, WireError, socket_path
from smtpctl.parser import parse_id


def die(text: str, code: int = 1) -> None:
    """``smtpctl: TEXT`` on stderr, exit status ``code`` (OpenSMTPD's errx)."""
    print(f"smtpctl: {text}", file=sys.stderr)
    raise typer.Exit(code)


@contextmanager
def control(sock: Optional[str]) -> Iterator[Connection]:
    """A connection to the control socket (--socket, $SMTPD_SOCKET or the default)."""
    try:
        with Connection(socket_path(sock)) as conn:
            yield conn
    except NotRunning:
        die("smtpd doesn't seem to be running")
    except PermissionDenied:
        die("need root privileges")
    except (WireError, OSError) as exc:
        die(f"lost connection to smtpd: {exc}")


def show_queue(conn: Connection, as_json: bool, msgid: int = 0) -> None:
    first = conn.request("show queue", id=msgid) if msgid else conn.request("show queue")
    out = sys.stdout
    reply = first
    for _ in range(10_000_000):
        if isinstance(reply, ClientEnd):
            return
        if isinstance(reply, ClientResult):
            die(fmt.command_result(False, reply.text))
        if isinstance(reply, ClientQueueBatch):
            if as_json:
                lines = [fmt.format_queue_json(fmt.entry_fields(entry)) for entry in reply.entries]
            else:
                lines = [fmt.format_queue_entry(entry) for entry in reply.entries]
            out.write("\n".join(lines) + "\n" if lines else "")
        reply = conn.next()


def show_status(conn: Connection) -> None:
    reply = conn.request("show status")
    if not reply.ok:
        die(fmt.command_result(False, reply.text))
    print("\n".join(fmt.format_status(reply.data)))


def simple(conn: Connection, name: str) -> None:
    """pause/resume mda, mta, smtp and stop: ``command succeeded`` or ``command failed``."""
    reply = conn.request(name)
    print(fmt.command_result(reply.ok, reply.text or None))
    if not reply.ok:
        raise typer.Exit(1)


def show_lines(conn: Connection, name: str) -> None:
    """show routes|hosts|relays|hoststats, show mta paused: the daemon's lines as they
    are (OpenSMTPD's smtpctl prints each line the MTA sends)."""
    reply = conn.request(name)
    if not reply.ok:
        die(fmt.command_result(False, reply.text))
    lines = reply.data.get("lines", [])
    if lines:
        sys.stdout.write("".join(f"{line}\n" for line in lines))


def resume_route(conn: Connection, name: str, word: str) -> None:
    """resume route <routeid> (0: every disabled route): ``command succeeded``."""
    reply = conn.request(name, id=int(word))
    print(fmt.command_result(reply.ok, reply.text or None))
    if not reply.ok:
        raise typer.Exit(1)


def mta_route(conn: Connection, name: str, source: str, domain: str) -> None:
    """pause|resume mta from <addr> for <str>: stop or resume relaying from a local
    address to a domain."""
    reply = conn.request(name, source=source, domain=domain)
    print(fmt.command_result(reply.ok, reply.text or None))
    if not reply.ok:
        raise typer.Exit(1)


def update_table(conn: Connection, name: str) -> None:
    """``update table NAME``: lka reloads the table; ``command succeeded`` or
    ``command failed`` (an unknown table, a file that cannot be read: see the log)."""
    reply = conn.request("update table", name=name)
    print(fmt.command_result(reply.ok, reply.text or None))
    if not reply.ok:
        raise typer.Exit(1)


def not_supported(conn: Connection, name: str, *words: str) -> None:
    """A command of smtpctl(8) smtpd does not carry out yet (smtpctl checks the daemon
    is there first, as for any command)."""
    die(f"command not supported yet: {name}")


def encrypt(password: Optional[str]) -> None:
    """Carried out by smtpctl itself, as any user (no daemon needed)."""
    try:
        local_commands.encrypt(password, sys.stdin, sys.stdout)
    except local_commands.LocalCommandError as exc:
        die(str(exc))


def spf_walk() -> None:
    local_commands.spf_walk(sys.stdin, sys.stdout)


# Envelope commands: the verb each prints (``%zu envelope%s <verb>``, smtpctl.c).
ENVELOPE_VERBS = {"pause envelope": "paused", "resume envelope": "resumed",
                  "schedule": "scheduled", "remove": "removed"}


def target_id(word: str) -> int:
    """The id sent to control for a checked word: 0 for ``all``, else the msgid (every
    envelope of that message) or the evpid, told apart by their length."""
    return 0 if word == "all" else parse_id(word)[1]


def envelope_command(conn: Connection, name: str, target: str) -> None:
    """pause/resume envelope, schedule, remove, discover, uncorrupt.

    As OpenSMTPD's smtpctl, the count is printed even when it is 0 (an unknown id) and
    the exit status is 0; a refusal (``command failed: ...``) exits 1."""
    reply = conn.request(name, id=target_id(target))
    if not reply.ok:
        print(fmt.command_result(False, reply.text))
        raise typer.Exit(1)
    if name == "uncorrupt":
        print(fmt.command_result(True))
    elif name == "discover":
        print(fmt.format_bulk_result("discovered", reply.count))
    else:
        print(fmt.format_bulk_result(ENVELOPE_VERBS[name], reply.count))


def show_file(conn: Connection, name: str, ident: str) -> None:
    """show envelope / show message: the file's bytes as they are on disk.  smtpd's queue
    reads it (smtpctl needs no access to the spool); a file that cannot be read fails as
    OpenSMTPD's smtpctl does: ``smtpctl: fopen: <reason>``, exit 1."""
    reply = conn.request(name, id=parse_id(ident)[1])
    out = sys.stdout.buffer
    for _ in range(10_000_000):
        if isinstance(reply, ClientEnd):
            out.flush()
            return
        if isinstance(reply, ClientResult):
            die(f"fopen: {reply.text}" if not reply.ok else "unexpected reply from smtpd")
        if isinstance(reply, ClientContent):
            out.write(reply.data)
        reply = conn.next()


