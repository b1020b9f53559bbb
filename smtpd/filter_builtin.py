"""Builtin filters, pure: OpenSMTPD's lka_filter.c "code for builtin filters" and parse.y's
``filter NAME phase PHASE match [!]CONDITION DECISION``.

A builtin filter is one condition and one decision, registered for one phase::

    filter no-rdns    phase connect   match !rdns                 disconnect "550 no rDNS"
    filter no-fcrdns  phase connect   match !fcrdns               junk
    filter bad-helo   phase helo      match helo regex <badhelo>  reject "550 go away"
    filter known      phase mail-from match src <trusted>         bypass
    filter spamtrap   phase rcpt-to   match rcpt-to <traps>       report "spamtrap hit"

``evaluate(spec, phase, facts, tables, param)`` answers one filter at one phase with a
``Decision``; ``matches`` only says whether its condition holds, for lka_filter.Engine,
which owns the chain (which filter comes next, proc filters) and applies the action.
Nothing here does I/O: the client's reverse name and its forward confirmation are
looked up by the daemon (pony asks lka for the name; lka's filter_proc.py confirms it)
and come in ``lka_filter.Facts``; table lookups go through the table set the caller
passes (lka's ``ruleset.TableSet``).  Users' documentation: docs/filters.md.

What OpenSMTPD does, and so what this module does (lka_filter.c, parse.y, 6.8 to 7.8):

* Every condition lka_filter.c knows is evaluated at every phase that has builtins
  (connect, helo, ehlo, mail-from, rcpt-to, data, commit); the grammar decides which
  conditions a phase may name (smtpd/parse_filter.py).  The rcpt-to condition is only
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


class _Table(Protocol):
    def check(self, service: str, key: str, regex: bool = False) -> bool: ...


class Tables(Protocol):
    """The configuration's tables (``ruleset.TableSet``)."""
    def get(self, name: str) -> _Table: ...


# Phases at which lka_filter.c evaluates builtins (filter_execs[]; the rest are notimpl).
EVALUATED_PHASES = frozenset({"connect", "helo", "ehlo", "mail-from", "rcpt-to", "data", "commit"})


def evaluate(spec, phase, facts, tables: Tables, param: str | None = None) -> Decision:
    """The decision of one builtin filter at ``phase`` (a phase name or smtp_proto.Phase).

    ``spec`` is a ``config.Filter`` of kind "builtin" (``phase``, ``check`` with ``kind``,
    ``negate``, ``regex``, ``table``; ``action``, ``action_text``).  ``facts`` is what the
    session knows, an ``lka_filter.Facts`` (lka_filter.c's filter_session):

    * src: the client as the link-connect report gives it ("192.0.2.1:1234",
      "[2001:db8::1]:1234", "unix:...") or the bare address;
    * rdns: its reverse name, "<unknown>" (or "") when it has none;
    * fcrdns: True (or "pass") when the forward lookup of rdns gave back the client;
    * helo, mail_from (without <>, "" for the null sender), username (of a successful
      AUTH): None or "" until known.

    ``param`` is the filtered command's parameter: the address, at rcpt-to (lka_filter.c
    looks at the command's parameter there).  A fact not known yet is "not found"."""
    if not matches(spec, phase, facts, tables, param):
        return PROCEED
    return _decision(spec.action, spec.action_text or None)


def matches(spec, phase, facts, tables: Tables, param: str | None = None) -> bool:
    """Whether the filter's condition, negation applied, holds at ``phase``: the
    decision is then the filter's action (lka_filter.c filter_execs[phase].func)."""
    phase = getattr(phase, "value", phase)
    if phase != spec.phase or phase not in EVALUATED_PHASES:
        return False
    check = spec.check
    if check.kind == "rcpt-to" and phase != "rcpt-to":
        return False
    return _holds(check, facts, tables, param) != check.negate


def _decision(action: str, text: str | None) -> Decision:
    # lka_filter_protocol_internal tests them in this order; the grammar sets exactly one.
    if action == "rewrite":
        return Decision(Verdict.REWRITE, text)
    if action == "disconnect":
        return Decision(Verdict.DISCONNECT, text)
    if action == "junk":
        return Decision(Verdict.JUNK)
    if action == "report":
        return Decision(Verdict.REPORT, text)
    if action == "bypass":
        return Decision(Verdict.BYPASS)
    return Decision(Verdict.REJECT, text)


def _holds(check, facts, tables: Tables, param: str | None) -> bool:
    """The condition before negation (lka_filter.c filter_check_*)."""
    kind = check.kind
    username = getattr(facts, "username", None) or None
    if kind == "fcrdns":
        return facts.fcrdns is True or facts.fcrdns == "pass"
    if kind == "rdns" and check.table is None:
        return has_rdns(facts.rdns)
    if kind == "auth" and check.table is None:
        return username is not None
    if kind == "rdns":
        return _lookup(tables, check, "domain", facts.rdns or "<unknown>")
    if kind == "src":
        src = client_address(facts.src)
        return _lookup(tables, check, "netaddr", src_text(src) if check.regex else src)
    if kind == "helo":
        return _lookup(tables, check, "domain", facts.helo or None)
    if kind == "auth":
        # looked up as a string and as a credentials key (a user of a creds table)
        return (_lookup(tables, check, "string", username)
                or _lookup(tables, check, "credentials", username))
    if kind == "mail-from":
        return _lookup(tables, check, "mailaddr", facts.mail_from)
    if kind == "rcpt-to":
        return _lookup(tables, check, "mailaddr", param)
    raise ValueError(f"unknown builtin filter check: {kind!r}")


def _lookup(tables: Tables, check, service: str, key: str | None) -> bool:
    if key is None or check.table is None:
        return False
    # table.c table_lookup: keys are compared lower-cased; smtpd.table's check() is a
    # coroutine, its check_now() the synchronous answer a builtin filter needs
    table = tables.get(check.table)
    ask = getattr(table, "check_now", None) or table.check
    return ask(service, key.lower(), check.regex)


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


def client_address(src: str) -> str:
    """The address alone from ``src``, which may carry a port ("192.0.2.1:25",
    "[2001:db8::1]:25") or be a local socket ("unix:...", "local")."""
    if src == "local" or src.startswith("unix:"):
        return "local"
    if src.startswith("["):
        return src[1:src.index("]")] if "]" in src else src.strip("[")
    if src.count(":") == 1:
        return src.split(":", 1)[0]
    return src


def src_text(src: str) -> str:
    """The client address as OpenSMTPD prints it (to.c ss_to_text): IPv6 in brackets."""
    if src == "local" or ":" not in src or src.startswith("["):
        return src
    return f"[{src}]"
