"""smtpd.conf grammar of local delivery (issue 11): ``mda wrapper NAME "command"``
and the checks that tie actions to wrappers (mirrors OpenSMTPD's parse.y
``mda wrapper`` and the dispatcher options ``wrapper``, ``user``, ``rcpt-to``).

Called from small hooks in smtpd/parse.py: ``p_mda`` for a statement starting with
``mda``, ``check_actions`` once the whole file is read.
"""
from __future__ import annotations

from smtpd.config import ConfigError


def p_mda(parser, c) -> None:
    """``mda wrapper NAME "command"``; any other ``mda`` statement keeps the loose
    treatment it had (accepted, not applied)."""
    tok = c.peek()
    if tok is None or tok != "wrapper" or tok.quoted:
        parser.p_loose(c)
        return
    c.word("")
    name = str(c.word("a wrapper name"))
    command = str(c.word("a wrapper command"))
    c.end()
    if name in parser.config.mda_wrappers:
        raise parser.err(f'mda wrapper "{name}" already defined')
    if "%{mda}" not in command:
        # OpenSMTPD runs the wrapper instead of the command: without %{mda} the
        # action's own command would silently never run
        raise parser.err(f'mda wrapper "{name}": the command must contain %{{mda}}')
    parser.config.mda_wrappers[name] = command


def check_actions(config) -> None:
    """Every ``wrapper NAME`` an action names is defined."""
    for action in config.actions.values():
        wrapper = getattr(action, "wrapper", None)
        if wrapper and wrapper not in config.mda_wrappers:
            raise ConfigError(config.file, action.lineno, f'undefined mda wrapper "{wrapper}"')
