"""``smtpd``: command line, and the entry point of every process.

The parent is what the admin starts; each child is the same program re-executed
with ``-x NAME`` (as OpenSMTPD does), so every process parses the configuration
itself at start and no configuration crosses a channel then (a reload is the
exception: see docs/ops.md).

The options are smtpd(8)'s: ``-d -F -h -n -v -D macro=value -f file -P system
-T trace``, with OpenSMTPD's behaviour (``-h`` prints the version and the usage
line and exits 1, a bad ``-D`` or ``-T`` is a warning, ``-n`` says
``configuration OK``).  pysmtpd adds ``--help`` and path overrides.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from smtpd.config import ConfigError, check_config
from smtpd.parse import parse_config

VERSION = "0.1.0"
DEFAULT_CONFIG = "/etc/smtpd.conf"
DEFAULT_SPOOL = "/var/spool/smtpd"
DEFAULT_SOCKET = "/var/run/smtpd.sock"
DEFAULT_SYSLOG_SOCKET = "/dev/log"
CHILDREN = ("control", "lka", "queue", "scheduler", "pony")

# Exit status of a daemon that cannot start on its configuration (sysexits.h
# EX_CONFIG): smtpd.service names it in RestartPreventExitStatus=, so systemd does
# not restart in a loop on a broken file.  `smtpd -n` exits 1, as OpenSMTPD's.
EXIT_CONFIG = 78

USAGE = ("usage: smtpd [-dFhnv] [-D macro=value] [-f file] [-P system] [-T trace]\n"
         "             [--spool dir] [--socket path] [--syslog-socket path]")

# smtpd(8) -T flags (smtpd.c); anything else is warned about and ignored, as there.
TRACE_FLAGS = frozenset({
    "imsg", "io", "smtp", "filters", "mta", "transfer", "bounce", "bounces", "scheduler",
    "lookup", "stat", "stats", "rules", "mproc", "expand", "table", "tables", "queue", "all",
    "profstat", "profile-imsg", "profile-queue",
})

HELP_TEXT = f"""\
  -d              do not daemonize; log to stderr (debug mode)
  -F              do not daemonize; log to syslog (foreground, as under systemd)
  -f file         configuration file (default {DEFAULT_CONFIG})
  -n              check the configuration, print "configuration OK" and exit
  -v              verbose logging (debug lines)
  -D macro=value  define a macro, overriding the configuration's
  -P system       start with smtp, mta or mda paused
  -T trace        trace a subsystem (mproc, imsg, ...; "all" for every one)
  -h              print the version and the usage line (exit 1, as OpenSMTPD)
  --help          print this help (exit 0)
  --spool dir     spool directory (default {DEFAULT_SPOOL})
  --socket path   control socket (default {DEFAULT_SOCKET}, or $SMTPD_SOCKET)
  --syslog-socket path
                  syslog socket used without -d (default {DEFAULT_SYSLOG_SOCKET}, or
                  $SMTPD_SYSLOG_SOCKET)
  --version       print the version
"""


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message)


def build_argparser() -> argparse.ArgumentParser:
    p = _Parser(prog="smtpd", add_help=False, allow_abbrev=False)
    p.add_argument("-d", dest="debug", action="store_true")
    p.add_argument("-F", dest="foreground", action="store_true")
    p.add_argument("-f", dest="config", default=DEFAULT_CONFIG)
    p.add_argument("-n", dest="check", action="store_true")
    p.add_argument("-v", dest="verbose", action="count", default=0)
    p.add_argument("-D", dest="macros", action="append", default=[])
    p.add_argument("-T", dest="trace", action="append", default=[])
    p.add_argument("-P", dest="pause", action="append", default=[])
    p.add_argument("-h", dest="short_help", action="store_true")
    p.add_argument("--help", dest="long_help", action="store_true")
    p.add_argument("--version", action="store_true")
    p.add_argument("--spool", default=None)
    p.add_argument("--socket", default=None)
    p.add_argument("--syslog-socket", dest="syslog_socket", default=None)
    # Internal: how the parent starts its children.
    p.add_argument("-x", dest="proc", choices=CHILDREN)
    p.add_argument("--rundir")
    p.add_argument("--parent-pid", type=int)
    p.add_argument("--listen-fds", default="")
    p.add_argument("--fd-channel", type=int, default=-1)
    p.add_argument("--queue-fd-channel", type=int, default=-1)
    return p


def parse_options(argv: list[str]):
    """The options, or SystemExit with OpenSMTPD's usage behaviour."""
    try:
        opts, extra = build_argparser().parse_known_args(argv)
        if extra:
            raise UsageError(f"unexpected argument: {extra[0]}")
    except UsageError as exc:
        print(f"smtpd: {exc}", file=sys.stderr)
        print(USAGE, file=sys.stderr)
        raise SystemExit(1)
    if opts.long_help:
        print(f"version: pysmtpd {VERSION}\n{USAGE}\n\n{HELP_TEXT}", end="")
        raise SystemExit(0)
    if opts.short_help:
        print(f"version: pysmtpd {VERSION}\n{USAGE}", file=sys.stderr)
        raise SystemExit(1)
    if opts.version:
        print(f"pysmtpd {VERSION}")
        raise SystemExit(0)
    if opts.proc is None:
        _warn_unknown(opts)
    opts.pause = [p for p in opts.pause if p in ("smtp", "mta", "mda")]
    return opts


def _warn_unknown(opts) -> None:
    for flag in opts.trace:
        if flag not in TRACE_FLAGS:
            print(f'warn: unknown trace flag "{flag}"', file=sys.stderr)
    for item in opts.macros:
        if "=" not in item or item.startswith("="):
            print(f"warn: could not parse macro definition {item}", file=sys.stderr)


def macros_of(opts) -> dict[str, str]:
    out = {}
    for item in opts.macros:
        name, sep, value = item.partition("=")
        if sep and name:
            out[name] = value
    return out


def resolve_paths(opts) -> None:
    opts.spool = str(Path(opts.spool or DEFAULT_SPOOL).absolute())
    opts.socket = str(Path(opts.socket or os.environ.get("SMTPD_SOCKET") or DEFAULT_SOCKET).absolute())
    opts.config = str(Path(opts.config).absolute())
    opts.syslog_socket = (opts.syslog_socket or os.environ.get("SMTPD_SYSLOG_SOCKET")
                          or DEFAULT_SYSLOG_SOCKET)


def load_config(opts):
    """Parse and check the configuration file named by the options (raises ConfigError)."""
    try:
        config = parse_config(opts.config, macros_of(opts))
    except OSError as exc:
        raise ConfigError(opts.config, None, exc.strerror or str(exc)) from None
    if opts.check or opts.proc is None:
        check_config(config)
    return config


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    opts = parse_options(argv)
    resolve_paths(opts)
    try:
        config = load_config(opts)
    except ConfigError as exc:
        print(f"smtpd: {exc}", file=sys.stderr)
        raise SystemExit(1 if opts.check or opts.proc else EXIT_CONFIG)
    if opts.check:
        for note in config.not_applied:
            print(f"warn: {note}", file=sys.stderr)
        print("configuration OK", file=sys.stderr)
        raise SystemExit(0)
    if opts.proc is None:
        from smtpd import parent
        raise SystemExit(parent.run(opts, argv, config))
    from smtpd import proc
    proc.leave(proc.run_child(opts, config))
