"""Builtin filters, pure: OpenSMTPD's lka_filter.c "code for builtin filters" and parse.y's
``filter NAME phase PHASE match [!]CONDITION DECISION``.

A builtin filter is one condition and one decision, registered for one phase::

    filter no-rdns    phase connect   match !rdns                 disconnect "550 no rDNS"
    filter no-fcrdns  phase connect   match !fcrdns               junk
    filter bad-helo   phase helo      match helo regex <badhelo>  reject "550 go away"
    filter known      phase mail-from match src <trusted>         bypass
    filter spamtrap   phase rcpt-to   match rcpt-to <traps>       report "spamtrap hit"

``evaluate(spec, phase, facts, tables)`` answers one filter at one phase with a
``Decision``; the chain around it (which filter comes next, proc filters, what the
session does with the answer) is the caller's.  Nothing here does I/O: the client's
reverse name and its forward confirmation are looked up by the daemon (pony asks lka,
as OpenSMTPD's smtp_session.c asks its resolver) and handed in as ``Facts``; table
lookups go through the table set the caller passes (lka's ``ruleset.TableSet``).

What OpenSMTPD does, and so what this module does (lka_filter.c, parse.y, 6.8 to 7.8):

* Every condition lka_filter.c knows is evaluated at every phase that has builtins
  (connect, helo, ehlo, mail-from, rcpt-to, data, commit); the grammar decides which
  conditions a phase may name (``CONDITIONS_BY_PHASE``).  The rcpt-to condition is only
  looked at in the rcpt-to phase, on that command's address.  At the other phases
  (starttls, auth, data-line, rset, quit, noop, help, wiz) a builtin never matches.
* ``!`` negates the condition's result, whatever it is.
* ``rdns`` holds when the session has a reverse name: not when the lookup failed
  (``<unknown>``) nor when the "name" is an address.  ``fcrdns`` holds when the
  forward lookup of that name gave back the client's address (``pass``; ``fail`` and
  ``error`` do not hold, so ``!fcrdns`` catches both).
* Table conditions look the key up lower-cased (table.c): ``rdns``/``helo`` as
  domains, ``src`` as a network address, ``mail-from``/``rcpt-to`` as mail
  addresses, ``auth`` as a string and as a credentials key; ``regex`` tables match the
  text instead.  A fact not known yet (no HELO, no MAIL FROM, no AUTH) is not found:
  ``helo <t>`` does not hold and ``!helo <t>`` does.
* The decision when the condition holds: ``reject``/``disconnect`` with the
  configured reply, ``rewrite`` with its value, ``junk``, ``bypass`` (proceed at once:
  the rest of the chain is skipped for this phase) or ``report`` (a ``filter-report``
  event with the text, then on to the next filter, as if nothing matched).  When it
  does not hold: proceed to the next filter.  The session checks reject/disconnect
  texts as for any filter (smtp_session.c: not ``[45]xx `` -> ``421 Internal server
  error``; ``421`` disconnects); that is the caller's, not repeated here.

Where pysmtpd differs, on purpose: OpenSMTPD's parse.y forgets to set the phase of
``phase auth`` filters, so they run at *connect* (where no user is known): the parser
decides what to make of that line, this module runs a spec at the phase it names.
OpenSMTPD's ``src`` text for IPv6 is ``[addr]`` (to.c ss_to_text); regex tables see
that text, address tables the bare address, so ``src { "::1/128" }`` works.
"""
from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass
from typing import Protocol


class Verdict(enum.Enum):
    """What a builtin filter answers (lka_filter.c filter_result_*)."""
    PROCEED = "proceed"          # condition false: on to the next filter of the chain
    REPORT = "report"            # condition true, ``report``: report it, then on to the next filter
    BYPASS = "bypass"            # condition true, ``bypass``: proceed now, skip the rest of the chain
    JUNK = "junk"                # mark the session (or its transaction) as spam: X-Spam: Yes
    REJECT = "reject"            # the command is refused with ``text``
    DISCONNECT = "disconnect"    # ``text`` is sent and the session ends
    REWRITE = "rewrite"          # the command's parameter becomes ``text``


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    text: str | None = None      # reply, rewritten parameter or report text

    @property
    def ends_chain(self) -> bool:
        """True when no later filter of the chain is asked at this phase."""
        return self.verdict not in (Verdict.PROCEED, Verdict.REPORT)


PROCEED = Decision(Verdict.PROCEED)


@dataclass(frozen=True, slots=True)
class Condition:
    """``[!]WHAT [regex] [<table>|{...}]`` of a builtin filter.

    ``what`` is one of ``fcrdns``, ``rdns``, ``src``, ``helo``, ``auth``, ``mail-from``,
    ``rcpt-to``; ``table`` is a table name as the configuration's table set knows it
    (an inline ``{ ... }`` list is an anonymous table there), None for bare ``fcrdns``,
    ``rdns`` and ``auth``."""
    what: str
    table: str | None = None
    regex: bool = False
    negate: bool = False


@dataclass(frozen=True, slots=True)
class BuiltinFilter:
    """``filter NAME phase PHASE match CONDITION DECISION``.

    ``action`` is ``reject``, ``disconnect``, ``rewrite``, ``report`` (each with
    ``text``), ``junk`` or ``bypass``."""
    name: str
    phase: str
    condition: Condition
    action: str
    text: str | None = None


@dataclass(frozen=True, slots=True)
class Facts:
    """What the session knows when a phase is filtered (lka_filter.c's filter_session).

    src: the client's address as text ("192.0.2.1", "2001:db8::1") or "local".
    rdns: its reverse name, "<unknown>" (or "") when there is none.
    fcrdns: "pass" (the name resolves back to ``src``), "fail" or "error", as the
        link-connect report says it.
    helo: the HELO/EHLO argument, once given (the current command's in those phases).
    mail_from: the sender address without <> ("" for the null sender), once given.
    rcpt_to: the address of the RCPT TO being filtered (rcpt-to phase only).
    auth_user: the user name of a successful AUTH."""
    src: str
    rdns: str = "<unknown>"
    fcrdns: str = "fail"
    helo: str | None = None
    mail_from: str | None = None
    rcpt_to: str | None = None
    auth_user: str | None = None


class _Table(Protocol):
    def check(self, service: str, key: str, regex: bool = False) -> bool: ...


class Tables(Protocol):
    """The configuration's tables (``ruleset.TableSet``)."""
    def get(self, name: str) -> _Table: ...


# Conditions each phase may name (parse.y filter_phase_*_options).  ``auth`` is listed for
# the grammar's sake: OpenSMTPD accepts it and never runs a builtin at AUTH.
_GLOBAL = ("fcrdns", "rdns", "src")
_SESSION = ("helo", "auth", "mail-from")
CONDITIONS_BY_PHASE: dict[str, tuple[str, ...]] = {
    "connect": _GLOBAL,
    "helo": _GLOBAL + ("helo",),
    "ehlo": _GLOBAL + ("helo",),
    "auth": _GLOBAL + ("helo", "auth"),
    "mail-from": _GLOBAL + _SESSION,
    "rcpt-to": _GLOBAL + _SESSION + ("rcpt-to",),
    "data": _GLOBAL + _SESSION,
    "commit": _GLOBAL + _SESSION,
}
# Decisions each phase may take: junk and bypass are refused at commit (parse.y
# filter_action_builtin_nojunk), the message being already complete.
ACTIONS = ("reject", "disconnect", "rewrite", "report", "junk", "bypass")
ACTIONS_WITH_TEXT = ("reject", "disconnect", "rewrite", "report")
ACTIONS_BY_PHASE: dict[str, tuple[str, ...]] = {
    phase: ACTIONS_WITH_TEXT if phase == "commit" else ACTIONS for phase in CONDITIONS_BY_PHASE}
# Phases at which lka_filter.c evaluates builtins (filter_execs[]; the rest are notimpl).
EVALUATED_PHASES = frozenset({"connect", "helo", "ehlo", "mail-from", "rcpt-to", "data", "commit"})


def evaluate(spec: BuiltinFilter, phase, facts: Facts, tables: Tables) -> Decision:
    """The decision of one builtin filter at ``phase`` (a phase name or smtp_proto.Phase).

    Raises nothing for missing facts: an unknown one is "not found".  A table the
    configuration does not know is the caller's bug (parse time refuses it)."""
    phase = getattr(phase, "value", phase)
    if phase != spec.phase or phase not in EVALUATED_PHASES:
        return PROCEED
    cond = spec.condition
    if cond.what == "rcpt-to" and phase != "rcpt-to":
        return PROCEED
    if _holds(cond, facts, tables) == cond.negate:
        return PROCEED
    return _decision(spec)


def _decision(spec: BuiltinFilter) -> Decision:
    # lka_filter_protocol_internal tests them in this order; the grammar sets exactly one.
    if spec.action == "rewrite":
        return Decision(Verdict.REWRITE, spec.text)
    if spec.action == "disconnect":
        return Decision(Verdict.DISCONNECT, spec.text)
    if spec.action == "junk":
        return Decision(Verdict.JUNK)
    if spec.action == "report":
        return Decision(Verdict.REPORT, spec.text)
    if spec.action == "bypass":
        return Decision(Verdict.BYPASS)
    return Decision(Verdict.REJECT, spec.text)


def _holds(cond: Condition, facts: Facts, tables: Tables) -> bool:
    """The condition before negation (filter_check_*)."""
    what = cond.what
    if what == "fcrdns":
        return facts.fcrdns == "pass"
    if what == "rdns" and cond.table is None:
        return has_rdns(facts.rdns)
    if what == "auth" and cond.table is None:
        return bool(facts.auth_user)
    if what == "rdns":
        return _lookup(tables, cond, "domain", facts.rdns or "<unknown>")
    if what == "src":
        text = src_text(facts.src) if cond.regex else facts.src
        return _lookup(tables, cond, "netaddr", text)
    if what == "helo":
        return _lookup(tables, cond, "domain", facts.helo)
    if what == "auth":
        # looked up as a string and as a credentials key (a user of a creds table)
        return (_lookup(tables, cond, "string", facts.auth_user)
                or _lookup(tables, cond, "credentials", facts.auth_user))
    if what == "mail-from":
        return _lookup(tables, cond, "mailaddr", facts.mail_from)
    if what == "rcpt-to":
        return _lookup(tables, cond, "mailaddr", facts.rcpt_to)
    raise ValueError(f"unknown builtin filter condition: {what!r}")


def _lookup(tables: Tables, cond: Condition, service: str, key: str | None) -> bool:
    if key is None or cond.table is None:
        return False
    # table.c table_lookup: keys are compared lower-cased
    return tables.get(cond.table).check(service, key.lower(), cond.regex)


def has_rdns(rdns: str | None) -> bool:
    """lka_filter.c filter_check_rdns: a reverse name that is a name, not a failure
    placeholder nor an address (text_to_netaddr accepts it)."""
    if not rdns or rdns == "<unknown>":
        return False
    try:
        ipaddress.ip_network(rdns.strip("[]"), strict=False)
    except ValueError:
        return True
    return False


def src_text(src: str) -> str:
    """The client address as OpenSMTPD prints it (to.c ss_to_text): IPv6 in brackets."""
    if src == "local" or ":" not in src or src.startswith("["):
        return src
    return f"[{src}]"


def fcrdns_verdict(src: str, forward: list[str] | None, error: bool = False) -> str:
    """smtp_session.c smtp_getaddrinfo_cb: "pass" when the forward lookup of the client's
    reverse name (``forward``: its addresses; None = no such name or no address) gives
    back ``src``, "error" when the lookup itself failed, else "fail"."""
    if error:
        return "error"
    try:
        client = ipaddress.ip_address(src.strip("[]"))
    except ValueError:
        return "fail"
    for addr in forward or ():
        try:
            if ipaddress.ip_address(addr.strip("[]")) == client:
                return "pass"
        except ValueError:
            continue
    return "fail"
