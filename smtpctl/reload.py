"""``smtpctl reload`` (a pysmtpd addition): ask smtpd to re-read its configuration.

The parent validates the file first; on an error the daemon keeps running on the
configuration it had and the reason is printed (``command failed: FILE:LINE: ...``),
with exit status 1, so ``smtpctl reload && echo ok`` can be scripted.
"""
from __future__ import annotations

import sys

import typer

from smtpctl import format as fmt


def run(conn) -> None:
    reply = conn.request("reload")
    print(fmt.command_result(reply.ok, reply.text or None))
    if reply.ok and reply.text:
        print(reply.text, file=sys.stderr)
    if not reply.ok:
        raise typer.Exit(1)
