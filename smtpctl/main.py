"""``smtpctl`` (also ``mailq``): control the mail server through control.

The command words are parsed by smtpctl.parser (OpenSMTPD's grammar, with
unique-prefix abbreviations such as ``sh q``); typer handles the options around
them.  Output formats are OpenSMTPD's (smtpctl.format).
"""
from __future__ import annotations

import os
import sys
import time
from typing import Optional

import typer

from common.messages import ClientContent, ClientEnd, ClientQueueBatch, ClientResult
from smtpctl import debug_commands, monitor
from smtpctl import format as fmt
from smtpctl import reload as reload_command
from smtpctl import local_commands
from smtpctl.client import Connection, NotRunning, PermissionDenied, WireError, socket_path
from smtpctl.parser import CommandError, parse_command

app = typer.Typer(add_completion=False, context_settings={"help_option_names": ["-h", "--help"]})


def _die(text: str, code: int = 1) -> None:
    print(f"smtpctl: {text}" if not text.startswith("possibilities") and text != "invalid command" else text,
          file=sys.stderr)
    raise typer.Exit(code)


def show_queue(conn: Connection, as_json: bool, msgid: int = 0) -> None:
    first = conn.request("show queue", id=msgid) if msgid else conn.request("show queue")
    out = sys.stdout
    reply = first
    for _ in range(10_000_000):
        if isinstance(reply, ClientEnd):
            return
        if isinstance(reply, ClientResult):
            _die(fmt.command_result(False, reply.text))
        if isinstance(reply, ClientQueueBatch):
            if as_json:
                lines = [fmt.format_queue_json(fmt.entry_fields(entry)) for entry in reply.entries]
            else:
                lines = [fmt.format_queue_entry(entry) for entry in reply.entries]
            out.write("\n".join(lines) + "\n" if lines else "")
        reply = conn.next()


def run(words: list[str], sock: Optional[str], as_json: bool) -> None:
    try:
        cmd = parse_command(words)
    except CommandError as exc:
        if exc.id_error:                # a word that is no id where one is expected
            _die(exc.id_error)
        print(exc.text, file=sys.stderr)
        raise typer.Exit(exc.exit_status)
    if cmd.name in ("encrypt", "spf walk"):
        return run_local(cmd)
    try:
        with Connection(socket_path(sock)) as conn:
            dispatch(conn, cmd, as_json)
    except NotRunning:
        _die("smtpd doesn't seem to be running")
    except PermissionDenied:
        _die("need root privileges")
    except (WireError, OSError) as exc:
        _die(f"lost connection to smtpd: {exc}")


def run_local(cmd) -> None:
    """Commands smtpctl carries out itself, as any user (no daemon needed)."""
    try:
        if cmd.name == "encrypt":
            local_commands.encrypt(cmd.args.get("str"), sys.stdin, sys.stdout)
        else:
            local_commands.spf_walk(sys.stdin, sys.stdout)
    except local_commands.LocalCommandError as exc:
        _die(str(exc))


def dispatch(conn: Connection, cmd, as_json: bool) -> None:
    name = cmd.name
    if name == "show queue":
        return show_queue(conn, as_json, cmd.args.get("msgid", 0))
    if name.removesuffix(" all") in ENVELOPE_VERBS or name in ("discover", "uncorrupt"):
        return envelope_command(conn, cmd)
    if name in ("show envelope", "show message"):
        return show_file(conn, cmd)
    if name == "reload":
        raise typer.Exit(reload_command.run(conn, cmd))
    if name in debug_commands.COMMANDS:
        return debug_commands.run(conn, cmd)
    if name in monitor.COMMANDS:
        return monitor.run(conn, cmd)
    if name == "show status":
        reply = conn.request("show status")
        if not reply.ok:
            _die(fmt.command_result(False, reply.text))
        print("\n".join(fmt.format_status(reply.data)))
        return
    if name in ("pause mda", "pause mta", "pause smtp", "resume mda", "resume mta",
                "resume smtp", "stop"):
        reply = conn.request(name)
        print(fmt.command_result(reply.ok, reply.text or None))
        if not reply.ok:
            raise typer.Exit(1)
        return
    _die(f"command not supported yet: {name}")


# Envelope commands: the verb each prints (``%zu envelope%s <verb>``, smtpctl.c).
ENVELOPE_VERBS = {"pause envelope": "paused", "resume envelope": "resumed",
                  "schedule": "scheduled", "remove": "removed"}


def _target_id(cmd) -> int:
    """The id sent to control: 0 for all, a msgid (every envelope of it) or an evpid."""
    kind, ident = cmd.target
    return 0 if kind == "all" else ident


def envelope_command(conn: Connection, cmd) -> None:
    """pause/resume envelope, schedule, remove, discover, uncorrupt.

    As OpenSMTPD's smtpctl, the count is printed even when it is 0 (an unknown id) and
    the exit status is 0; a refusal (``command failed: ...``) exits 1."""
    name = cmd.name.removesuffix(" all")
    reply = conn.request(name, id=_target_id(cmd))
    if not reply.ok:
        print(fmt.command_result(False, reply.text))
        raise typer.Exit(1)
    if name == "uncorrupt":
        print(fmt.command_result(True))
    elif name == "discover":
        print(fmt.format_bulk_result("discovered", reply.count))
    else:
        print(fmt.format_bulk_result(ENVELOPE_VERBS[name], reply.count))


def show_file(conn: Connection, cmd) -> None:
    """show envelope / show message: the file's bytes as they are on disk.  smtpd's queue
    reads it (smtpctl needs no access to the spool); a file that cannot be read fails as
    OpenSMTPD's smtpctl does: ``smtpctl: fopen: <reason>``, exit 1."""
    _, ident = cmd.target
    reply = conn.request(cmd.name, id=ident)
    out = sys.stdout.buffer
    for _ in range(10_000_000):
        if isinstance(reply, ClientEnd):
            out.flush()
            return
        if isinstance(reply, ClientResult):
            _die(f"fopen: {reply.text}" if not reply.ok else "unexpected reply from smtpd")
        if isinstance(reply, ClientContent):
            out.write(reply.data)
        reply = conn.next()


@app.command()
def main_command(
    words: list[str] = typer.Argument(None, help="command, e.g. 'show queue', 'sh q', 'pause mta'"),
    sock: Optional[str] = typer.Option(None, "--socket", "-s", help="control socket (default $SMTPD_SOCKET or /var/run/smtpd.sock)"),
    as_json: bool = typer.Option(False, "--json", help="show queue: one JSON object per envelope"),
) -> None:
    """Control the pysmtpd mail server (see smtpctl(8))."""
    if not words:
        print("possibilities are:\n" + "\n".join(sorted({p.split()[0] for p in _patterns()})), file=sys.stderr)
        raise typer.Exit(255)
    run(list(words), sock, as_json)


def _patterns() -> list[str]:
    from smtpctl.parser import GRAMMAR
    return GRAMMAR.patterns()


def main() -> None:
    prog = os.path.basename(sys.argv[0]).split(".")[0]     # mailq.pysmtpd (alternatives) too
    if prog == "mailq":
        sys.argv[1:1] = ["show", "queue"]
    app(prog_name="smtpctl", args=sys.argv[1:], standalone_mode=True)


if __name__ == "__main__":
    main()
