"""smtpd.conf's filter grammar: ``proc``, ``filter``, and the listener's ``filter`` option
(OpenSMTPD 6.4+ parse.y: its ``proc``, ``filter``, ``filter_phase_*`` and ``filterel`` rules).

    proc NAME "command" [user U] [group G] [chroot D] [protocol 0.5|0.6|0.7]
    filter NAME proc PROCNAME
    filter NAME proc-exec "command" [user U] [group G] [chroot D]
    filter NAME phase PHASE match [!] CHECK ACTION      (``builtin`` is taken for ``phase``)
    filter NAME chain { a, b, ... }
    listen on ... filter NAME | filter { a, b }

A builtin filter has one check and one action, as in parse.y: CHECK is ``fcrdns``,
``rdns``, ``rdns [regex] <table>``, ``src [regex] <table>``, ``helo [regex] <table>``,
``auth``, ``auth [regex] <table>``, ``mail-from [regex] <table>``, ``rcpt-to [regex]
<table>`` (which checks a phase accepts: PHASE_CHECKS); ACTION is ``junk``, ``bypass``,
``reject "text"``, ``disconnect "text"``, ``rewrite "text"`` or ``report "text"``; commit
takes neither ``junk`` nor ``bypass`` (parse.y's filter_action_builtin_nojunk: at commit the
message is complete, there is nothing left to mark or skip).  The model objects are smtpd/config.py's FilterProc, Filter and
FilterCheck; what the filters do is docs/filters.md.
"""
from __future__ import annotations

from smtpd.config import Filter, FilterCheck, FilterProc
from smtpd.lka_filter import PROTOCOL_VERSIONS

GLOBAL_CHECKS = ("fcrdns", "rdns", "src")
_HELO = GLOBAL_CHECKS + ("helo",)
_AUTH = _HELO + ("auth",)
_MAIL = _AUTH + ("mail-from",)
PHASE_CHECKS = {
    "connect": GLOBAL_CHECKS,
    "helo": _HELO,
    "ehlo": _HELO,
    "auth": _AUTH,
    "mail-from": _MAIL,
    "rcpt-to": _MAIL + ("rcpt-to",),
    "data": _MAIL,
    "commit": _MAIL,
}
BARE_CHECKS = ("fcrdns", "rdns", "auth")            # allowed without a table
TABLE_CHECKS = ("rdns", "src", "helo", "auth", "mail-from", "rcpt-to")
ACTIONS_WITH_TEXT = ("reject", "disconnect", "rewrite", "report")
ACTIONS = ("junk", "bypass") + ACTIONS_WITH_TEXT
# parse.y's filter_phase_commit takes filter_action_builtin_nojunk, which has neither.
PHASE_ACTIONS = {phase: ACTIONS_WITH_TEXT if phase == "commit" else ACTIONS for phase in PHASE_CHECKS}


def parse_proc(parser, c) -> None:
    """``proc NAME "command" [user U] [group G] [chroot D]``."""
    name = str(c.word("a processor name"))
    if name in parser.config.filter_procs:
        raise parser.err(f"processor already exists with that name: {name}")
    command = str(c.word("a command"))
    proc = FilterProc(name=name, command=command, lineno=parser.line, file=parser.file)
    _proc_params(parser, c, proc)
    parser.config.filter_procs[name] = proc


def _proc_params(parser, c, proc: FilterProc) -> None:
    seen: set[str] = set()
    while c.more():
        opt = c.word("user, group, chroot or protocol")
        if opt not in ("user", "group", "chroot", "protocol"):
            raise parser.err(f'syntax error: unexpected "{opt}", expected one of: user, group, chroot, protocol')
        if opt in seen:
            raise parser.err(f"{opt} already specified for this processor")
        seen.add(opt)
        value = str(c.word(f"a {opt}"))
        if opt == "protocol" and value not in PROTOCOL_VERSIONS:
            raise parser.err(f'unsupported filter protocol "{value}", expected one of: ' + ", ".join(PROTOCOL_VERSIONS))
        setattr(proc, opt, value)
    if not proc.command.strip():
        raise parser.err(f"empty command for processor {proc.name}")


def parse_filter(parser, c) -> None:
    config = parser.config
    name = str(c.word("a filter name"))
    if name in config.filters:
        raise parser.err(f"filter already exists with that name: {name}")
    kind = c.word("proc, proc-exec, phase or chain")
    flt = Filter(name=name, kind="proc", lineno=parser.line, file=parser.file)
    if kind == "proc":
        proc = str(c.word("a processor name"))
        if proc not in config.filter_procs:
            raise parser.err(f"no processor exist with that name: {proc}")
        flt.proc = proc
        c.end()
    elif kind == "proc-exec":
        command = str(c.word("a command"))
        if name in config.filter_procs:
            raise parser.err(f"processor already exists with that name: {name}")
        proc = FilterProc(name=name, command=command, lineno=parser.line, file=parser.file)
        _proc_params(parser, c, proc)
        config.filter_procs[name] = proc
        flt.proc = name
    elif kind in ("phase", "builtin"):
        flt.kind = "builtin"
        _builtin(parser, c, flt)
    elif kind == "chain":
        flt.kind = "chain"
        if c.peek() != "{":
            raise parser.err(f'syntax error: unexpected "{c.peek() or "end of line"}", expected "{{"')
        flt.chain = chain_members(parser, c.name_or_list("a filter name"))
        c.end()
    else:
        raise parser.err(f'syntax error: unexpected "{kind}", expected one of: proc, proc-exec, phase, chain')
    config.filters[name] = flt


def _builtin(parser, c, flt: Filter) -> None:
    phase = str(c.word("a phase"))
    if phase not in PHASE_CHECKS:
        raise parser.err(f'syntax error: unexpected "{phase}", expected a filter phase: '
                         + ", ".join(PHASE_CHECKS))
    flt.phase = phase
    c.expect("match")
    negate = c.take("!")
    kind = str(c.word("a check: " + ", ".join(PHASE_CHECKS[phase])))
    if kind not in PHASE_CHECKS[phase]:
        raise parser.err(f'syntax error: "{kind}" cannot be checked at phase {phase}, expected one of: '
                         + ", ".join(PHASE_CHECKS[phase]))
    check = FilterCheck(kind=kind, negate=negate)
    if c.take("regex"):
        if kind == "fcrdns":
            raise parser.err("syntax error: fcrdns takes no table")
        check.regex = True
        check.table = c.table_ref()
    elif kind in TABLE_CHECKS and (c.peek_ref() or c.peek() == "{"):
        check.table = c.table_ref()
    elif kind not in BARE_CHECKS:
        raise parser.err(f"syntax error: {kind} needs a <table> or regex <table>")
    flt.check = check
    allowed = PHASE_ACTIONS[phase]
    action = str(c.word("an action: " + ", ".join(allowed)))
    if action not in allowed:
        raise parser.err(f'syntax error: unexpected "{action}", expected one of: ' + ", ".join(allowed))
    flt.action = action
    if action in ACTIONS_WITH_TEXT:
        flt.action_text = str(c.word(f"the {action} text"))
    c.end()


def chain_members(parser, names: list[str]) -> list[str]:
    """parse.y's ``filterel`` checks: known, not a chain, not twice, no proc twice."""
    procs: set[str] = set()
    members: list[str] = []
    for name in names:
        flt = parser.config.filters.get(name)
        if flt is None:
            raise parser.err(f"no filter exist with that name: {name}")
        if flt.kind == "chain":
            raise parser.err(f"no filter chain allowed within a filter chain: {name}")
        if name in members:
            raise parser.err(f"no filter allowed twice within a filter chain: {name}")
        if flt.proc:
            if flt.proc in procs:
                raise parser.err(f"no proc allowed twice within a filter chain: {flt.proc}")
            procs.add(flt.proc)
        members.append(name)
    if not members:
        raise parser.err("syntax error: empty filter chain")
    return members


def listen_filter(parser, c) -> str:
    """The listener's ``filter NAME`` or ``filter { a, b }`` (an anonymous chain,
    OpenSMTPD's ``<dynchain:N>``); returns the filter name its sessions use."""
    config = parser.config
    if c.peek() == "{":
        members = chain_members(parser, c.name_or_list("a filter name"))
        n = 0
        while f"<dynchain:{n:08x}>" in config.filters:
            n += 1
        name = f"<dynchain:{n:08x}>"
        config.filters[name] = Filter(name=name, kind="chain", chain=members,
                                      lineno=parser.line, file=parser.file)
        return name
    name = str(c.word("a filter name or { list }"))
    if name not in config.filters:
        raise parser.err(f"no filter exist with that name: {name}")
    return name

