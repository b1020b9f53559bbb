"""Table programs speaking OpenSMTPD 7's table protocol 0.1 (smtpd-tables(7)), written
from the man page, for the table tests: one in Python, one in POSIX shell.

Each answers from a data file (argv[1], as OpenSMTPD passes a table's ARG): lines
``SERVICE KEY VALUE`` (lookup and check) in the Python one, ``KEY`` (a domain list) in
the shell one.  The Python one also misbehaves on purpose for three keys: ``crash``
(exits), ``hang`` (never answers) and ``garbage`` (answers out of protocol).
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from tests.oracle import opensmtpd as oracle

PYTHON_TABLE = r'''
import sys, time

def main():
    entries, fetch = {}, {}
    with open(sys.argv[1]) as f:
        for line in f:
            parts = line.split(None, 2)
            if len(parts) == 3:
                entries[(parts[0], parts[1].lower())] = parts[2].strip()
                fetch.setdefault(parts[0], []).append(parts[2].strip())
    for line in sys.stdin:
        if line.rstrip("\n") == "config|ready":
            break
    services = sorted({service for service, _ in entries})
    for service in services:
        print("register|" + service)
    print("register|ready", flush=True)
    turn = 0
    for line in sys.stdin:
        fields = line.rstrip("\n").split("|")
        if fields[0] != "table" or fields[1] != "0.1":
            print("invalid line: " + line, file=sys.stderr)
            sys.exit(1)
        op = fields[4]
        if op == "update":
            print("update-result|%s|ok" % fields[5], flush=True)
            continue
        service, reqid = fields[5], fields[6]
        key = "|".join(fields[7:])
        if key == "crash":
            sys.exit(3)
        if key == "hang":
            time.sleep(3600)
        if key == "garbage":
            print("this is not the protocol", flush=True)
            continue
        if op == "fetch":
            values = fetch.get(service, [])
            if values:
                print("fetch-result|%s|found|%s" % (reqid, values[turn % len(values)]), flush=True)
                turn += 1
            else:
                print("fetch-result|%s|not-found" % reqid, flush=True)
            continue
        value = entries.get((service, key))
        if value is None:
            print("%s-result|%s|not-found" % (op, reqid), flush=True)
        elif op == "check":
            print("check-result|%s|found" % reqid, flush=True)
        else:
            print("lookup-result|%s|found|%s" % (reqid, value), flush=True)

main()
'''

SHELL_TABLE = r'''#!/bin/sh
# a domain list from the file named by $1, one domain a line
while IFS= read -r line; do
    [ "$line" = "config|ready" ] && break
done
echo "register|domain"
echo "register|ready"
while IFS='|' read -r table version time name op service id key; do
    if [ "$op" = "update" ]; then
        echo "update-result|$service|ok"
        continue
    fi
    if grep -qxF -- "$key" "$1"; then
        if [ "$op" = "check" ]; then
            echo "check-result|$id|found"
        else
            echo "lookup-result|$id|found|$key"
        fi
    else
        echo "$op-result|$id|not-found"
    fi
done
'''


def python_for_tables() -> str:
    """An interpreter smtpd's user may run: the system's (the test's own may live
    under /root, which _smtpd cannot enter), else this one (unprivileged runs)."""
    for candidate in ("/usr/bin/python3", shutil.which("python3") or ""):
        if candidate and os.access(candidate, os.X_OK) and not candidate.startswith("/root"):
            return candidate
    return sys.executable


def write_programs(directory: Path) -> tuple[Path, Path]:
    """(python table, shell table) written into ``directory``, executable by anyone."""
    py = directory / "table-py.py"
    py.write_text(PYTHON_TABLE)
    py.chmod(0o644)
    sh = directory / "table-sh"
    sh.write_text(SHELL_TABLE)
    sh.chmod(0o755)
    return py, sh


EXTRAS = "opensmtpd-extras"


def fetch_extras(cache: Path = oracle.CACHE) -> Path:
    """Debian's opensmtpd-extras unpacked (``apt-get download`` + ``dpkg -x``, never
    installed): its root directory.  Raises oracle.Unavailable with the reason."""
    return oracle.unpack_package(EXTRAS, cache / "extras-root", "usr/libexec/opensmtpd/table-passwd")
