"""makemap(8) and newaliases(8): build the db files ``db:`` tables read (makemap.c).

smtpctl acts as these when called by those names (argv[0]), as OpenSMTPD's does::

    makemap [-U] [-d hash|btree] [-o dbfile] [-t aliases|set] file
    newaliases [-f smtpd.conf]

The output is a Berkeley DB hash (or btree) file in OpenSMTPD's layout (keys
lowercased, keys and values NUL-terminated; smtpd/table/db.py), written to a temporary
file next to it, given the source's owner and mode, synced and renamed over the old
one: lka, which reopens a db whose mtime changed, never sees half a file.  ``-t set``
stores each line as a key (value ``<set>``); ``-t aliases`` checks every target of
every line.  ``-U`` prints a db's entries.  newaliases rebuilds the db of the
configuration's ``aliases`` table, then asks a running smtpd to ``update table
aliases``.
"""
from __future__ import annotations

import fcntl
import getopt
import os
import sys
import tempfile
from pathlib import Path

from smtpd.table import db as table_db
from smtpd.table.file_format import MalformedTable, parse_table_text

PATH_ALIASES = "/etc/aliases"          # portable OpenSMTPD on Linux (smtpd.conf's default)
DEFAULT_CONFIG = "/etc/smtpd.conf"


class MakemapError(Exception):
    pass


def _warn(prog: str, text: str) -> None:
    print(f"{prog}: {text}", file=sys.stderr)


def _usage(newaliases: bool) -> int:
    if newaliases:
        print("usage: newaliases [-f file]", file=sys.stderr)
    else:
        print("usage: makemap [-U] [-d dbtype] [-o dbfile] [-t type] file", file=sys.stderr)
    return 1


def _alias_target_ok(target: str) -> bool:
    """expand.c text_to_expandnode, enough to refuse what it refuses: an empty target, or a
    :include: / error: target with nothing after it."""
    target = target.strip()
    if not target:
        return False
    lowered = target.lower()
    for prefix in (":include:", "include:", "error:", ":error:"):
        if lowered.startswith(prefix):
            return bool(target[len(prefix):].strip())
    return True


def entries_of(text: str, map_type: str, source: str) -> list[tuple[str, str]]:
    """(key, value) pairs to store, keys lowercased; MakemapError names the line."""
    try:
        _, entries = parse_table_text(text, "list" if map_type == "set" else "hash")
    except MalformedTable as exc:
        raise MakemapError(f"{source}:{exc.lineno}: invalid entry") from None
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for lineno, (key, value) in enumerate(entries, 1):
        if key in seen:
            raise MakemapError(f"{source}: duplicate entry for {key}")
        seen.add(key)
        if map_type == "set":
            value = "<set>"
        elif map_type == "aliases" and not all(_alias_target_ok(t) for t in value.split(",")):
            raise MakemapError(f"{source}: invalid entry for {key}")
        out.append((key, value))
    return out


def _read_source(source: str) -> tuple[str, os.stat_result | None]:
    if source == "-":
        return sys.stdin.read(), None
    with open(source, encoding="utf-8", errors="replace") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MakemapError(f"{source} is locked") from None
        return f.read(), os.fstat(f.fileno())


def build(source: str, output: str, map_type: str = "plain", dbtype: str = "hash") -> int:
    """Write ``output`` from ``source``; the number of entries.  MakemapError or OSError."""
    text, st = _read_source(source)
    entries = entries_of(text, map_type, source)
    directory = os.path.dirname(os.path.abspath(output))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(output) + ".", dir=directory)
    try:
        os.close(fd)
        db = table_db.DbFile(tmp, write=True, dbtype=dbtype, mode=0o644)
        try:
            for key, value in entries:
                db.put(key.encode() + b"\0", value.encode() + b"\0")
        finally:
            db.close()
        if st is not None:
            os.chmod(tmp, st.st_mode & 0o7777)
            os.chown(tmp, st.st_uid, st.st_gid)
        else:
            os.chmod(tmp, 0o644)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, output)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return len(entries)


def dump(path: str, dbtype: str = "hash") -> None:
    db = table_db.DbFile(path, dbtype=dbtype)
    try:
        for key, value in db.items():
            print(f"{table_db.cstring(key)}\t{table_db.cstring(value)}")
    finally:
        db.close()


def aliases_source(config_path: str) -> str:
    """makemap.c conf_aliases: the file of the configuration's ``aliases`` table (its
    ``.db`` stripped: newaliases rebuilds that db from its source), else PATH_ALIASES."""
    from smtpd.parse import parse_config
    config = parse_config(config_path)
    table = config.tables.get("aliases")
    if table is None or not table.config:
        return PATH_ALIASES
    path = table.config
    return path[:-3] if path.endswith(".db") else path


def makemap(argv: list[str], newaliases: bool = False) -> int:
    prog = "newaliases" if newaliases else "makemap"
    try:
        opts, args = getopt.getopt(argv, "f:h" if newaliases else "b:C:d:ho:O:t:U")
    except getopt.GetoptError as exc:
        _warn(prog, str(exc))
        return _usage(newaliases)
    map_type, dbtype, output, dump_only = "plain", "hash", None, False
    config, source = DEFAULT_CONFIG, None
    for opt, value in opts:
        if opt == "-b" and value == "i":
            newaliases = True
        elif opt == "-d":
            if value not in table_db.DBTYPES:
                _warn(prog, f"unsupported DB type '{value}'")
                return 1
            dbtype = value
        elif opt == "-f":
            config = value
        elif opt == "-o":
            output = value
        elif opt == "-O" and value.startswith("AliasFile="):
            map_type, source = "aliases", value.split("=", 1)[1]
        elif opt == "-t":
            if value not in ("aliases", "set"):
                _warn(prog, f"unsupported type '{value}'")
                return 1
            map_type = value
        elif opt == "-U":
            dump_only = True
        elif opt == "-h":
            return _usage(newaliases)
    try:
        if newaliases:
            if os.geteuid() != 0:
                _warn(prog, "need root privileges")
                return 1
            if args:
                return _usage(True)
            map_type = "aliases"
            if source is None:
                source = aliases_source(config)
        else:
            if len(args) != 1:
                return _usage(False)
            source = args[0]
        if dump_only:
            dump(source, dbtype)
            return 0
        if source != "-" and not os.path.exists(source):
            _warn(prog, f"stat: {source}: No such file or directory")
            return 1
        output = output or f"{source}.db"
        count = build(source, output, map_type, dbtype)
    except (MakemapError, OSError) as exc:
        _warn(prog, str(exc))
        return 1
    except Exception as exc:          # a configuration newaliases could not read
        _warn(prog, str(exc))
        return 1
    if newaliases:
        print(f"{source}: {count} aliases")
    elif count == 0:
        _warn(prog, f"warning: empty map created: {output}")
    return 0


def notify_aliases_update(sock: str | None = None) -> None:
    """newaliases, when smtpd runs: ``update table aliases`` (its answer is not shown)."""
    from smtpctl.client import Connection, NotRunning, socket_path
    try:
        with Connection(socket_path(sock)) as conn:
            conn.request("update table", name="aliases")
    except (NotRunning, OSError, Exception):     # smtpd not running: nothing to tell
        pass


def main_by_name(name: str, argv: list[str]) -> int:
    """smtpctl's argv[0] dispatch for ``makemap`` and ``newaliases``: the exit status."""
    if name == "newaliases":
        status = makemap(argv, newaliases=True)
        notify_aliases_update()
        return status
    return makemap(argv)
