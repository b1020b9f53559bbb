"""Rule matching (ruleset.c): the first ``match`` rule whose conditions all hold wins.

The matching is sans-I/O: it yields the table checks it needs (Check) and is sent
their answers, so the same logic runs over the synchronous fast path of the tables
(``match``) or awaits them (``match_async``, for proc tables).  The tables
themselves are smtpd/table/.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Generator

from common.trace import FLAGS, trace
from smtpd.config import Config
from smtpd.table import TableSet, TableUnavailable

__all__ = ["Check", "MatchContext", "TableSet", "TableUnavailable", "match", "match_async",
           "rule_text"]


@dataclass
class MatchContext:
    source: str                  # "local" or the client IP
    rdns: str | None
    helo: str | None
    mail_from: str               # "" for <>
    rcpt: str
    tag: str | None
    auth_user: str | None
    tls: bool
    local_listener: bool


@dataclass(frozen=True)
class Check:
    """One question the matching asks: is ``key`` in ``table`` as ``service``?"""
    table: str
    service: str
    key: str
    regex: bool = False


Matching = Generator[Check, bool, bool]


def _cond_ok(cond, ctx: MatchContext) -> Matching:
    def check(service: str, key: str) -> Check:
        return Check(cond.table, service, key, cond.regex)

    domain = ctx.rcpt.rpartition("@")[2].lower()
    if cond.kind == "from":
        if cond.what == "any":
            return True
        if cond.what == "local":
            return ctx.source == "local" or (yield Check("localhost", "netaddr", ctx.source))
        if cond.what == "socket":
            return ctx.source == "local"
        if cond.what == "src":
            return (yield check("netaddr", ctx.source))
        if cond.what == "rdns":
            return bool(ctx.rdns) and (cond.table is None or (yield check("domain", ctx.rdns)))
        if cond.what == "auth":
            return (yield from _auth_ok(cond, ctx))
        if cond.what == "mail-from":
            return (yield check("mailaddr", ctx.mail_from))
    if cond.kind == "for":
        if cond.what == "any":
            return True
        if cond.what == "local":
            return (yield Check("localnames", "domain", domain))
        if cond.what == "domain":
            return (yield check("domain", domain))
        if cond.what == "rcpt-to":
            return (yield check("mailaddr", ctx.rcpt))
    if cond.kind == "tag":
        return ctx.tag is not None and (yield check("string", ctx.tag))
    if cond.kind == "helo":
        return ctx.helo is not None and (yield check("domain", ctx.helo))
    if cond.kind == "mail-from":
        return (yield check("mailaddr", ctx.mail_from))
    if cond.kind == "rcpt-to":
        return (yield check("mailaddr", ctx.rcpt))
    if cond.kind == "auth":
        return (yield from _auth_ok(cond, ctx))
    if cond.kind == "tls":
        return ctx.tls
    return False


def _auth_ok(cond, ctx: MatchContext) -> Matching:
    """ruleset.c ruleset_match_smtp_auth: the session authenticated and, with a table,
    as a user it lists (looked up as an address when the name has an @)."""
    if not ctx.auth_user:
        return False
    if cond.table is None:
        return True
    service = "string" if cond.regex or "@" not in ctx.auth_user else "mailaddr"
    return (yield Check(cond.table, service, ctx.auth_user, cond.regex))


def _rules(config: Config, ctx: MatchContext) -> Generator[Check, bool, object]:
    for number, rule in enumerate(config.rules, 1):
        for cond in rule.conditions:
            if (yield from _cond_ok(cond, ctx)) == cond.negate:
                break
        else:
            if FLAGS.rules:
                trace("rules: rule #%d matched: %s", number, rule_text(rule))
            return rule
    if FLAGS.rules:
        trace("rules: no rule matched for <%s>", ctx.rcpt)
    return None


def match(config: Config, tables: TableSet, ctx: MatchContext):
    """The matching rule (or None), over the tables' synchronous fast path.
    TableUnavailable when a table cannot answer."""
    steps = _rules(config, ctx)
    answer = None
    try:
        while True:
            q = steps.send(answer)
            answer = bool(tables.get(q.table).check_now(q.service, q.key, q.regex))
    except StopIteration as done:
        return done.value


async def match_async(config: Config, tables: TableSet, ctx: MatchContext):
    """match, awaiting each table (any backend, proc tables included)."""
    steps = _rules(config, ctx)
    answer = None
    try:
        while True:
            q = steps.send(answer)
            answer = bool(await tables.get(q.table).check(q.service, q.key, q.regex))
    except StopIteration as done:
        return done.value


def rule_text(rule) -> str:
    """A rule as smtpd.conf says it (ruleset.c rule_to_text), for trace lines."""
    words = ["match"]
    for c in rule.conditions:
        words.append(("!" if c.negate else "") + c.kind)
        if c.what != c.kind:
            words.append(c.what)
        if c.regex:
            words.append("regex")
        if c.table:
            words.append(f"<{c.table.strip('<>')}>")
    words += ["reject"] if rule.reject else ["action", f'"{rule.action}"']
    return " ".join(words)
