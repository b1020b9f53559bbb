"""The ``table`` statement and the checks on how a table is used (parse.y's table
rule and table_check_use calls; table.c table_create).

``table NAME { ... }`` is an inline list or map; ``table NAME [file:]/path`` a table(5)
file, read here by the parent, as root, as OpenSMTPD reads it while parsing;
``table NAME db:/path`` a Berkeley DB file made by makemap (checked here, opened by
lka); ``table NAME getpwnam``; ``table NAME TYPE:ARG`` OpenSMTPD's external
``table-TYPE`` program from its libexec directory, and pysmtpd's ``proc:/path`` and
``"proc-exec:/path args"`` for a table program anywhere (smtpd/table/proc.py).
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path

from smtpd.config import Table
from smtpd.config_files import FileRefused
from smtpd.table import db as table_db
from smtpd.table.file_format import MalformedTable, parse_table_text
from smtpd.table.services import USES

# Where OpenSMTPD's packages put table-<type> programs (PATH_LIBEXEC).
LIBEXEC_DIRS = ("/usr/libexec/opensmtpd", "/usr/lib/opensmtpd", "/usr/local/libexec/smtpd",
                "/usr/libexec/smtpd")
BUILTIN = {"file": "static", "static": "static", "db": "db", "getpwnam": "getpwnam"}
# The special tables OpenSMTPD defines itself, and what they are.
SPECIAL_KINDS = {"localhost": "list", "anyhost": "list", "localnames": "list",
                 "anydestination": "list", "getpwnam": "dynamic"}


def parse_table_spec(parser, name: str, spec: str) -> Table:
    """The Table of ``table NAME SPEC`` (not inline); ConfigError at the line if refused."""
    backend, sep, arg = spec.partition(":")
    if not sep:
        if spec in BUILTIN and spec != "file" and spec != "static":
            backend, arg = spec, ""
        else:
            backend, arg = "file", spec
    kind = BUILTIN.get(backend)
    if kind == "static":
        path = parser.fs(Path(arg))
        values = load_table_file(path, parser, what=f"for table {name}")
        file_kind = "hash" if isinstance(values, dict) else "list"
        return Table(name, "static", arg, values, parser.line, kind=file_kind, source=str(path))
    if kind == "db":
        path = parser.fs(Path(arg))
        try:
            table_db.check_db_file(str(path))
        except (OSError, FileRefused) as exc:
            raise parser.err(f"invalid configuration file {arg} for table {name}: {exc}") from None
        return Table(name, "db", arg, None, parser.line, kind="dynamic", source=str(path))
    if kind == "getpwnam":
        return Table(name, "getpwnam", None, None, parser.line, kind="dynamic")
    return Table(name, backend, arg or None, None, parser.line, kind="dynamic",
                 command=_program(parser, name, backend, arg))


def load_table_file(path: Path, parser, secret: bool = False, what: str = ""):
    """A table(5) file's entries: a dict (a map) or a list; ``secret``: the file holds
    credentials (its modes are checked as a key's).  ConfigError at the line."""
    text = parser.read_file(path, "table file ", secret)[0]
    try:
        kind, entries = parse_table_text(text)
    except MalformedTable as exc:
        raise parser.err(f"invalid configuration file {path} {what}: {exc}".replace("  ", " ")) from None
    return dict(entries) if kind == "hash" else [k for k, _ in entries]


def _program(parser, name: str, backend: str, arg: str) -> tuple[str, list[str]] | None:
    """(executable, argv) of a table program; None when there is none."""
    if backend == "proc-exec":
        try:
            argv = shlex.split(arg)
        except ValueError as exc:
            raise parser.err(f"invalid proc-exec command for table {name}: {exc}") from None
        if not argv:
            raise parser.err(f"table {name}: proc-exec needs a command")
        return _executable(parser, name, argv[0]), argv
    if backend == "proc":
        return _executable(parser, name, arg), [name]
    if arg and not arg.startswith("/"):
        raise parser.err(f"invalid backend parameter for table: {name}")
    for directory in LIBEXEC_DIRS:
        path = Path(directory) / f"table-{backend}"
        if path.is_file():
            return str(path), [name] + ([f"{arg}"] if arg else [])
    # OpenSMTPD refuses the configuration ("backend does not exist"); accepted here, as
    # before tables could be external, with its lookups failing temporarily (4xx, nothing
    # lost) and a note at start, so a configuration made for OpenSMTPD with its extras
    # still starts (docs/tables.md).
    parser.not_yet(f'table backend "{backend}" (no table-{backend} program in {LIBEXEC_DIRS[0]})')
    return None


def _executable(parser, name: str, program: str) -> str:
    path = parser.fs(Path(program))
    if not path.is_absolute() or not path.is_file() or not os.access(path, os.X_OK):
        raise parser.err(f"table {name}: {program}: not an executable file given by its absolute path")
    return str(path)


def table_kind_and_services(config, name: str) -> tuple[str, frozenset[str] | None]:
    """(kind, services) of a named table: kind "list", "hash", "dynamic" or "" (an
    empty inline table: any use); services None when any."""
    if name in SPECIAL_KINDS and name not in config.tables:
        return SPECIAL_KINDS[name], frozenset({"userinfo"}) if name == "getpwnam" else None
    table = config.tables.get(name)
    if table is None:
        return "", None
    if table.backend == "static":
        kind = table.kind or ("" if not table.values else "hash" if isinstance(table.values, dict) else "list")
        return kind, None
    if table.backend == "getpwnam":
        return "dynamic", frozenset({"userinfo"})
    return "dynamic", None


def check_use(parser, name: str, use: str) -> None:
    """table_check_use: refuse at the line a table of the wrong kind (a list for aliases,
    a map for a source list) or a backend without the service (getpwnam for aliases)."""
    kinds, services, message = USES[use]
    kind, offered = table_kind_and_services(parser.config, name)
    if (kind and kind not in kinds) or (offered is not None and not offered & services):
        raise parser.err(message.format(f'"{name}"'))
