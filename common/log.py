"""Logging as OpenSMTPD does it: plain lines, to stderr in the foreground,
else to syslog's mail facility as ``smtpd[pid]: <line>``.

Line formats (``%016x smtp connected address=...``) are built by the callers;
this module only decides where lines go and at which level.
"""
from __future__ import annotations

import logging
import logging.handlers
import os
import sys

log = logging.getLogger("smtpd")


class _SyslogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"smtpd[{os.getpid()}]: {record.getMessage()}"


def setup(foreground: bool, verbose: bool = False, proc: str = "parent") -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    if foreground:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        try:
            handler = logging.handlers.SysLogHandler(
                address="/dev/log", facility=logging.handlers.SysLogHandler.LOG_MAIL)
            handler.setFormatter(_SyslogFormatter())
        except OSError:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # Libraries log at INFO for every connection; keep our format clean.
    logging.getLogger("mail.log").setLevel(logging.ERROR)   # its warnings are not our format
    logging.getLogger("asyncio").setLevel(logging.WARNING)


def set_verbose(verbose: bool) -> None:
    logging.getLogger().setLevel(logging.DEBUG if verbose else logging.INFO)
