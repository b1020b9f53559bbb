"""``smtpctl`` (also ``mailq``): control the mail server through control (smtpctl.c).

The commands are a typer command tree (``app``): one typer command per command of
smtpctl(8), with its help (``smtpctl show queue --help``, ``smtpctl help show queue``)
and shell completion (``contrib/completion/``, made by smtpctl.completion).

What a command line means is decided first by OpenSMTPD's grammar (smtpctl.parser, its
parser.c), exactly as OpenSMTPD's smtpctl decides it: any word may be cut to a unique
prefix (``sh q`` is ``show queue``), a word that fits no command prints
``possibilities are:`` and the candidates with exit status 255, a malformed id is named
(exit 1).  The command it resolves to is then run through the typer tree with its words
spelled out in full, so the grammar and the tree cannot disagree about what runs (a
unit test also checks that both hold the same commands, in the same order).

The options (``--socket``/``-s``, ``--json``, ``-h``/``--help``) may stand anywhere on the
line, as before.  Run as ``mailq`` (argv[0]), smtpctl is ``smtpctl show queue``; as
``sendmail``/``send-mail`` it is sendmail(8) (smtpctl.sendmail); as ``newaliases`` or
``makemap``, those commands (smtpctl.mapfiles).

Startup time matters (mailq runs from scripts): rich is never loaded (plain help), and
typer's value conversion, which loads pydantic, is skipped (Verbatim).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from functools import cache
from typing import Optional

import typer
from typer.core import TyperCommand, TyperGroup

from smtpctl import actions, debug_commands, mailq, monitor
from smtpctl import reload as reload_command
from smtpctl.client import socket_path
from smtpctl.parser import GRAMMAR, PLACEHOLDERS, CommandError, evpid_to_text, msgid_to_text, parse_command

PROG = "smtpctl"
COMPLETE_VAR = "_SMTPCTL_COMPLETE"      # set by the shell completion scripts
CONTEXT = {"help_option_names": ["-h", "--help"]}


class Verbatim:
    """Recent typer (0.2x) converts every value with pydantic: about 90 ms of imports on
    each run, for words that are strings the grammar has checked already.  smtpctl's
    commands take them as they are."""

    @staticmethod
    def coerce(value, param, ctx):
        return value


VERBATIM = Verbatim()


class VerbatimParams:
    """Mixed into smtpctl's command classes: their parameters (the help option too) skip
    typer's value conversion (``_runtime_param`` exists only in the typer versions that
    have it; elsewhere this changes nothing)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if hasattr(param, "_runtime_param"):
                param._runtime_param = VERBATIM

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None and hasattr(option, "_runtime_param"):
            option._runtime_param = VERBATIM
        return option


class Command(VerbatimParams, TyperCommand):
    """A command of smtpctl."""


class PrefixGroup(VerbatimParams, TyperGroup):
    """A group whose subcommands may be cut to a unique prefix, as every smtpctl word.

    Used by help (``smtpctl sh q --help``) and by shell completion (``smtpctl sh q<TAB>``);
    a command that runs has been spelled out in full by the grammar already."""

    def lookup(self, word: str):
        """The subcommand ``word`` names (exactly, or as a unique prefix), else None."""
        if word in self.commands:
            return self.commands[word]
        found = [cmd for name, cmd in self.commands.items() if name.startswith(word)]
        return found[0] if len(found) == 1 else None

    def resolve_command(self, ctx, args):
        cmd = self.lookup(args[0])
        if cmd is None:
            if ctx.resilient_parsing:       # completing: nothing to offer past this word
                return None, None, args[1:]
            names = ", ".join(self.commands)
            ctx.fail(f"no such command: {args[0]!r} (possibilities are: {names})")
        return cmd.name, cmd, args[1:]


class CommandTree(typer.Typer):
    """A typer app whose commands are smtpctl's Command class."""

    def command(self, name=None, **kwargs):
        return super().command(name, cls=Command, **kwargs)


def _group(help_text: str) -> typer.Typer:
    return CommandTree(cls=PrefixGroup, help=help_text, add_completion=False,
                       rich_markup_mode=None, pretty_exceptions_enable=False,
                       context_settings=CONTEXT)


@dataclass
class Settings:
    socket: Optional[str]


app = _group("Control the pysmtpd mail server (smtpctl(8)).  Any command word may be cut "
             "to a unique prefix: 'smtpctl sh q' is 'smtpctl show queue'.")


@app.callback()
def root(ctx: typer.Context,
         socket: Optional[str] = typer.Option(
             None, "--socket", "-s", metavar="PATH",
             help="control socket (default: $SMTPD_SOCKET, else /var/run/smtpd.sock)")) -> None:
    ctx.obj = Settings(socket)


def _on_daemon(ctx: typer.Context, action, *args) -> None:
    """``action(connection, *args)`` on a connection to the control socket."""
    with actions.control(ctx.find_root().obj.socket) as conn:
        action(conn, *args)


ENVELOPE_OR_MESSAGE = "an envelope id (16 hex digits) or a message id (8 hex digits: every envelope of it)"
SUBSYSTEM = "a subsystem, as smtpctl(8) lists them (e.g. smtp, queue, imsg, all)"
ROUTE = typer.Argument(None, metavar="from <addr> for <str>", show_default=False,
                       help="only relaying from this local address to this domain")

# --- the command tree (command() puts each group's commands in the grammar's order) ----------

pause = _group("Suspend deliveries, relaying, incoming sessions or envelopes.")
resume = _group("Resume what pause suspended.")
show = _group("Show the queue, an envelope, a message, counters or the daemon's state.")
show_mta = _group("Show the relaying state.")
log = _group("Set the daemon's log verbosity.")
update = _group("Reload what a table backend caches.")
spf = _group("SPF records.")
for name, group in (("pause", pause), ("resume", resume), ("show", show), ("log", log),
                    ("update", update), ("spf", spf)):
    app.add_typer(group, name=name)
show.add_typer(show_mta, name="mta")


def _command(group: typer.Typer, name: str, doc: str, action, *args) -> None:
    """A command of no argument: ``action(connection, *args)`` on the daemon."""
    def run_command(ctx: typer.Context) -> None:
        _on_daemon(ctx, action, *args)
    run_command.__doc__ = doc
    group.command(name)(run_command)


def _word_command(group: typer.Typer, name: str, doc: str, metavar: str, word_help: str,
                  action, *args) -> None:
    """A command of one word (an id, a subsystem, a name): ``action(connection, *args, word)``."""
    def run_command(ctx: typer.Context, word: str = typer.Argument(
            ..., metavar=metavar, help=word_help, show_default=False)) -> None:
        _on_daemon(ctx, action, *args, word)
    run_command.__doc__ = doc
    group.command(name)(run_command)


# (group, name, help, action, action's first arguments)
NO_ARGUMENT_COMMANDS = (
        (show_mta, "paused", "The sources and domains whose relaying is paused (pause mta from ... for ...).",
         actions.show_lines, "show mta paused"),
        (log, "brief", "Turn verbose (debug) logging off.", debug_commands.run, "log brief"),
        (log, "verbose", "Turn verbose (debug) logging on.", debug_commands.run, "log verbose"),
        (app, "monitor", "Print the daemon's main counters every second (increments; two are absolute).",
         monitor.run, "monitor"),
        (pause, "mda", "Stop local deliveries for now.", actions.simple, "pause mda"),
        (pause, "smtp", "Stop accepting incoming SMTP sessions for now.", actions.simple, "pause smtp"),
        (resume, "mda", "Resume local deliveries.", actions.simple, "resume mda"),
        (resume, "smtp", "Resume accepting incoming SMTP sessions.", actions.simple, "resume smtp"),
        (show, "hoststats", "The last delivery status per domain over the last 4 hours.",
         actions.show_lines, "show hoststats"),
        (show, "hosts", "The remote MX hosts known.", actions.show_lines, "show hosts"),
        (show, "relays", "The active relays and their connectors.", actions.show_lines, "show relays"),
        (show, "routes", "The routes known and their state.", actions.show_lines, "show routes"),
        (show, "stats", "Every counter of the daemon, key=value.", monitor.run, "show stats"),
        (show, "status", "Whether MDA, MTA and SMTP are running or paused.", actions.show_status),
        (app, "stop", "Stop the daemon.", actions.simple, "stop"),
        (app, "reload", "Re-read the configuration; a refused file is reported and exits 1 (pysmtpd).",
         reload_command.run))
for entry in NO_ARGUMENT_COMMANDS:
    _command(*entry)

ENVELOPES = "<evpid>|<msgid>|all"
# (group, name, help, the word's metavar and help, action, action's first arguments)
ONE_WORD_COMMANDS = (
        (app, "discover", "Schedule an envelope, or every envelope of a message, moved into the queue by hand.",
         "<evpid>|<msgid>", ENVELOPE_OR_MESSAGE, actions.envelope_command, "discover"),
        (pause, "envelope", "Stop scheduling an envelope, a message's envelopes, or all of them.",
         ENVELOPES, ENVELOPE_OR_MESSAGE + ", or all", actions.envelope_command, "pause envelope"),
        (resume, "envelope", "Resume scheduling an envelope, a message's envelopes, or all of them.",
         ENVELOPES, ENVELOPE_OR_MESSAGE + ", or all", actions.envelope_command, "resume envelope"),
        (app, "remove", "Remove an envelope, every envelope of a message, or all envelopes.",
         ENVELOPES, ENVELOPE_OR_MESSAGE + ", or all", actions.envelope_command, "remove"),
        (app, "schedule", "Make an envelope, a message's envelopes, or all envelopes due for delivery now.",
         ENVELOPES, ENVELOPE_OR_MESSAGE + ", or all", actions.envelope_command, "schedule"),
        (app, "uncorrupt", "Move a message's envelopes from the corrupt bucket back into the queue.",
         "<msgid>", "a message id (8 hex digits)", actions.envelope_command, "uncorrupt"),
        (show, "envelope", "Print an envelope file as it is in the queue.",
         "<evpid>", "an envelope id (16 hex digits)", actions.show_file, "show envelope"),
        (show, "message", "Print a message as it is in the queue.",
         "<msgid>|<evpid>", ENVELOPE_OR_MESSAGE, actions.show_file, "show message"),
        (app, "trace", "Turn on real-time tracing of a subsystem.",
         "<subsystem>", SUBSYSTEM, debug_commands.run, "trace"),
        (app, "untrace", "Turn off real-time tracing of a subsystem.",
         "<subsystem>", SUBSYSTEM, debug_commands.run, "untrace"),
        (app, "profile", "Turn on real-time profiling of a subsystem (queue, imsg).",
         "<subsystem>", SUBSYSTEM, debug_commands.run, "profile"),
        (app, "unprofile", "Turn off real-time profiling of a subsystem.",
         "<subsystem>", SUBSYSTEM, debug_commands.run, "unprofile"),
        (resume, "route", "Resume a route disabled after errors.",
         "<routeid>", "a route number (show routes)", actions.resume_route, "resume route"),
        (update, "table", "Make the daemon reload a table (re-read its file, reopen its db, "
         "tell its program).", "<name>", "the table's name", actions.update_table))
for entry in ONE_WORD_COMMANDS:
    _word_command(*entry)


def _mta(ctx: typer.Context, verb: str, route: Optional[list[str]]) -> None:
    if route:
        if len(route) != 4 or route[0] != "from" or route[2] != "for":
            actions.die(f"usage: {verb} mta [from <addr> for <str>]")
        _on_daemon(ctx, actions.mta_route, f"{verb} mta from", route[1], route[3])
        return
    _on_daemon(ctx, actions.simple, f"{verb} mta")


@pause.command("mta")
def pause_mta(ctx: typer.Context, route: Optional[list[str]] = ROUTE) -> None:
    """Stop relaying and deliveries to remote hosts for now."""
    _mta(ctx, "pause", route)


@resume.command("mta")
def resume_mta(ctx: typer.Context, route: Optional[list[str]] = ROUTE) -> None:
    """Resume relaying and deliveries to remote hosts."""
    _mta(ctx, "resume", route)


@show.command("queue")
def show_queue(ctx: typer.Context,
               msgid: Optional[str] = typer.Argument(None, metavar="<msgid>", show_default=False,
                                                     help="only this message's envelopes"),
               as_json: bool = typer.Option(False, "--json", help="one JSON object per envelope")) -> None:
    """One line per envelope in the queue, fields separated by '|' (what mailq prints)."""
    ident = int(msgid, 16) if msgid else 0
    if mailq.daemon_down(socket_path(ctx.find_root().obj.socket)):
        # as OpenSMTPD's smtpctl: the spool itself, runstate "offline" (smtpctl/mailq.py)
        status = mailq.show_offline(as_json, ident)
        if status:
            raise typer.Exit(status)
        return
    _on_daemon(ctx, actions.show_queue, as_json, ident)


@app.command()
def encrypt(password: Optional[str] = typer.Argument(
        None, metavar="<string>", show_default=False,
        help="the password (else one per line on standard input, which ps(1) cannot show)")) -> None:
    """Hash passwords for credentials tables (bcrypt); needs no daemon."""
    actions.encrypt(password)


@spf.command("walk")
def spf_walk() -> None:
    """Print the address ranges the SPF records of the domains on standard input allow."""
    actions.spf_walk()


# --- running a command line -------------------------------------------------------------------

@cache
def command() -> PrefixGroup:
    """The click command of ``app`` (built once per run), each group's commands in the
    grammar's order (help and completion list them so)."""
    root = typer.main.get_command(app)
    groups = [((), root)]
    for path, group in groups:
        order = GRAMMAR.keywords(path)
        group.commands = {name: group.commands[name]
                          for name in sorted(group.commands, key=order.index)}
        groups += [((*path, name), sub) for name, sub in group.commands.items()
                   if isinstance(sub, PrefixGroup)]
    return root



def _word(kind: str, value) -> str:
    if kind == "msgid":
        return msgid_to_text(value)
    if kind == "evpid":
        return evpid_to_text(value)
    return str(value)


def command_argv(cmd, sock: Optional[str] = None, as_json: bool = False) -> list[str]:
    """The full-length command line of the typer tree for a parsed command: its path of
    command names, then (after ``--``, so that a word such as ``-x`` stays an argument)
    its arguments."""
    words = [_word(PLACEHOLDERS[token], cmd.args[PLACEHOLDERS[token]])
             if token in PLACEHOLDERS else token for token in cmd.pattern.split()]
    node, depth = command(), 0
    while isinstance(node, PrefixGroup) and depth < len(words):
        node = node.commands[words[depth]]
        depth += 1
    argv = ["--socket", sock] if sock else []
    argv += words[:depth]
    if as_json and cmd.name == "show queue":
        argv.append("--json")
    if words[depth:]:
        argv += ["--", *words[depth:]]
    return argv


def run(words: list[str], sock: Optional[str], as_json: bool) -> None:
    """Run one command line (the words after the options); ends with typer.Exit(status)
    for a non-zero status."""
    try:
        cmd = parse_command(words)
    except CommandError as exc:
        if exc.id_error:                # a word that is no id where one is expected
            actions.die(exc.id_error)
        print(exc.text, file=sys.stderr)
        raise typer.Exit(exc.exit_status)
    status = command().main(command_argv(cmd, sock, as_json), prog_name=PROG, standalone_mode=False)
    if status:
        raise typer.Exit(status)


class OtherOption(Exception):
    """An option smtpctl does not take: left to click, which names it (exit 2)."""


@dataclass
class CommandLine:
    words: list[str]
    socket: Optional[str] = None
    as_json: bool = False
    help: bool = False


def split_argv(argv: list[str]) -> CommandLine:
    """The options, wherever they stand, and the command words (all after ``--``)."""
    line = CommandLine(words=[])
    args = iter(argv)
    for arg in args:
        if arg == "--":
            line.words.extend(args)
        elif arg in ("--socket", "-s"):
            line.socket = next(args, None)
            if line.socket is None:
                raise OtherOption(arg)
        elif arg.startswith("--socket="):
            line.socket = arg.partition("=")[2]
        elif arg.startswith("-s") and arg != "-s":
            line.socket = arg[2:]
        elif arg == "--json":
            line.as_json = True
        elif arg in ("-h", "--help"):
            line.help = True
        elif arg.startswith("-") and arg != "-":
            raise OtherOption(arg)
        else:
            line.words.append(arg)
    return line


def show_help(words: list[str]) -> None:
    """``smtpctl [help] WORDS... --help``: the help of the command (or group) the words name."""
    path, node = [], command()
    for word in words:
        if not isinstance(node, PrefixGroup):
            break
        path.append(word)
        node = node.lookup(word)
        if node is None:
            break
    command().main([*path, "--help"], prog_name=PROG)


def run_status(words: list[str], sock: Optional[str] = None) -> int:
    """``run`` for another mode of the program (sendmail -bp): its exit status."""
    try:
        run(words, sock, False)
    except typer.Exit as exc:
        return exc.exit_code
    return 0


def program_name(argv0: str) -> str:
    """The mode argv[0] names, as OpenSMTPD's smtpctl reads __progname: ``sendmail``,
    ``send-mail``, ``mailq``, ``newaliases``, ``makemap`` or ``smtpctl``; a suffix
    after a dot is ignored (``sendmail.pysmtpd``, the name alternatives(8) links)."""
    return os.path.basename(argv0).split(".")[0]


def main() -> None:
    prog = program_name(sys.argv[0])
    if prog in ("sendmail", "send-mail"):
        from smtpctl import sendmail
        sys.exit(sendmail.main(prog, sys.argv[1:]))
    argv = sys.argv[1:]
    # makemap(8) and newaliases(8) are smtpctl called by those names (smtpctl/mapfiles.py)
    name = os.path.basename(sys.argv[0]).split(".")[0]
    if name in ("makemap", "newaliases"):
        from smtpctl import mapfiles     # not "makemap.py": alternatives(8) owns that name
        sys.exit(mapfiles.main_by_name(name, argv))
    if os.environ.get(COMPLETE_VAR):
        # A completion script asks for candidates: answered from the command tree alone,
        # never from the daemon.
        from typer.completion import completion_init
        completion_init()
        command().main(argv, prog_name=PROG, complete_var=COMPLETE_VAR)
        return
    try:
        line = split_argv(argv)
    except OtherOption:
        command().main(argv, prog_name=PROG)
        return
    if prog == "mailq":
        line.words[:0] = ["show", "queue"]
    if line.help or line.words[:1] == ["help"]:
        show_help(line.words[1:] if line.words[:1] == ["help"] else line.words)
        return
    try:
        run(line.words, line.socket, line.as_json)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
