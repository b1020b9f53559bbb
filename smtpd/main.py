"""``smtpd``: command line, and the entry point of every process.

The parent is what the admin starts; each child is the same program re-executed
with ``-x NAME`` (as OpenSMTPD does), so every process parses the configuration
itself and no configuration ever crosses a channel.
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
CHILDREN = ("control", "lka", "queue", "scheduler", "pony")


def build_argparser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="smtpd", description="pysmtpd mail server (OpenSMTPD's design, in Python)")
    p.add_argument("-d", dest="debug", action="store_true",
                   help="do not daemonize; log to stderr")
    p.add_argument("-F", dest="foreground", action="store_true",
                   help="do not daemonize; log to syslog")
    p.add_argument("-f", dest="config", default=DEFAULT_CONFIG, metavar="FILE",
                   help=f"configuration file (default {DEFAULT_CONFIG})")
    p.add_argument("-n", dest="check", action="store_true",
                   help="check the configuration and exit")
    p.add_argument("-v", dest="verbose", action="count", default=0, help="verbose logging")
    p.add_argument("-D", dest="macros", action="append", default=[], metavar="MACRO=VALUE",
                   help="define a macro (overrides the configuration's)")
    p.add_argument("-T", dest="trace", action="append", default=[], metavar="TRACE",
                   help="enable tracing of a subsystem (mproc, ...)")
    p.add_argument("-P", dest="pause", action="append", default=[], choices=["smtp", "mta", "mda"],
                   help="start with a subsystem paused")
    p.add_argument("--spool", default=None, metavar="DIR",
                   help=f"spool directory (default {DEFAULT_SPOOL})")
    p.add_argument("--socket", default=None, metavar="PATH",
                   help=f"control socket (default {DEFAULT_SOCKET}, or $SMTPD_SOCKET)")
    p.add_argument("--version", action="version", version=f"pysmtpd {VERSION}")
    # Internal: how the parent starts its children.
    p.add_argument("-x", dest="proc", choices=CHILDREN, help=argparse.SUPPRESS)
    p.add_argument("--rundir", help=argparse.SUPPRESS)
    p.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    p.add_argument("--listen-fds", default="", help=argparse.SUPPRESS)
    return p


def macros_of(opts) -> dict[str, str]:
    out = {}
    for item in opts.macros:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"smtpd: -D {item}: expected MACRO=VALUE")
        out[name] = value
    return out


def resolve_paths(opts) -> None:
    opts.spool = str(Path(opts.spool or DEFAULT_SPOOL).absolute())
    opts.socket = str(Path(opts.socket or os.environ.get("SMTPD_SOCKET") or DEFAULT_SOCKET).absolute())
    opts.config = str(Path(opts.config).absolute())


def load_config(opts):
    config = parse_config(opts.config, macros_of(opts))
    return config


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    opts = build_argparser().parse_args(argv)
    resolve_paths(opts)
    try:
        config = load_config(opts)
        if opts.check or opts.proc is None:
            check_config(config)
    except ConfigError as exc:
        print(f"smtpd: {exc}", file=sys.stderr)
        raise SystemExit(1)
    except OSError as exc:
        print(f"smtpd: {opts.config}: {exc.strerror}", file=sys.stderr)
        raise SystemExit(1)
    if opts.check:
        for note in config.not_applied:
            print(f"warn: {note}", file=sys.stderr)
        print("configuration OK", file=sys.stderr)
        raise SystemExit(0)
    if opts.proc is None:
        from smtpd import parent
        raise SystemExit(parent.run(opts, argv, config))
    from smtpd import proc
    raise SystemExit(proc.run_child(opts, config))
