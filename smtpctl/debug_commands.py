"""smtpctl ``trace``/``untrace SUBSYSTEM``, ``profile``/``unprofile SUBSYSTEM``,
``log verbose``/``log brief`` (smtpctl.c do_trace, do_profile, do_log_*).

The keyword is checked here first, with OpenSMTPD's message and exit status
(``smtpctl: invalid trace keyword: foo``, 1); control applies the change to every
process and answers ``command succeeded`` once all of them have it.
"""
from __future__ import annotations

import sys

import typer

from common import trace
from smtpctl import format as fmt

COMMANDS = frozenset({"trace", "untrace", "profile", "unprofile", "log verbose", "log brief"})


def run(conn, name: str, word: str | None = None) -> None:
    """``name`` is one of COMMANDS; ``word`` the subsystem of (un)trace and (un)profile."""
    args = {}
    if word is not None:
        try:
            (trace.trace_bits if name in ("trace", "untrace") else trace.profile_bits)(word)
        except trace.KeywordError as exc:
            print(f"smtpctl: {exc}", file=sys.stderr)
            raise typer.Exit(1)
        args["subsystem"] = word
    reply = conn.request(name, **args)
    print(fmt.command_result(reply.ok, reply.text or None))
    if not reply.ok:
        raise typer.Exit(1)
