"""Rule matching (first matching ``match`` wins) and the tables rules look into."""
from __future__ import annotations

import ipaddress
import pwd
import re
import socket
from dataclasses import dataclass

from common.trace import FLAGS, trace
from smtpd.config import Config, Table, _interfaces


class TableUnavailable(Exception):
    """A lookup could not be answered (external table down): a temporary failure."""


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


class StaticTable:
    def __init__(self, table: Table) -> None:
        self.table = table
        values = table.values or []
        self.items = [str(v) for v in values] if isinstance(values, list) else list(values)
        self.map = {k.lower(): v for k, v in values.items()} if isinstance(values, dict) else {}

    def lookup(self, service: str, key: str):
        value = self.map.get(key.lower())
        if value is None:
            return None
        if service in ("alias", "virtual"):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    def check(self, service: str, key: str, regex: bool = False) -> bool:
        key = key.lower()
        for entry in self.items:
            e = entry.lower()
            if regex:
                if re.search(entry, key, re.I):
                    return True
            elif service == "netaddr":
                try:
                    if ipaddress.ip_address(key) in ipaddress.ip_network(e, strict=False):
                        return True
                except ValueError:
                    if e == key:
                        return True
            elif service == "domain":
                if e == key or (e.startswith("*.") and key.endswith(e[1:])):
                    return True
            elif service == "mailaddr":
                user, _, domain = key.rpartition("@")
                if e == key or e == f"@{domain}" or e == user or (e.startswith("@") and e[1:] == domain):
                    return True
            elif e == key:
                return True
        return False


class ExternalTable:
    def __init__(self, table: Table) -> None:
        self.table = table

    def lookup(self, service, key):
        raise TableUnavailable(f"table <{self.table.name}>: backend {self.table.backend} not supported yet")

    check = lookup


class SpecialTable:
    def __init__(self, name: str, config: Config) -> None:
        self.name = name
        self.config = config

    def lookup(self, service: str, key: str):
        if self.name == "getpwnam" and service == "userinfo":
            try:
                pw = pwd.getpwnam(key)
            except KeyError:
                return None
            return f"{pw.pw_uid}:{pw.pw_gid}:{pw.pw_dir}"
        return None

    def check(self, service: str, key: str, regex: bool = False) -> bool:
        if self.name == "anydestination":
            return True
        if self.name in ("localhost", "anyhost"):
            if key == "local":
                return True
            try:
                ip = ipaddress.ip_address(key)
            except ValueError:
                return False
            return self.name == "anyhost" or ip.is_loopback or key in local_addresses()
        if self.name == "localnames":
            names = {"localhost", self.config.hostname.lower(), socket.gethostname().lower()}
            names |= {l.hostname.lower() for l in self.config.listeners if l.hostname}
            return key.lower() in names or key.strip("[]") in local_addresses()
        return False


_LOCAL_ADDRS: set[str] | None = None


def local_addresses() -> set[str]:
    global _LOCAL_ADDRS
    if _LOCAL_ADDRS is None:
        _LOCAL_ADDRS = {a for lst in _interfaces().values() for _, a in lst}
    return _LOCAL_ADDRS


class TableSet:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.tables = {}
        for name, table in config.tables.items():
            self.tables[name] = StaticTable(table) if table.backend == "static" else ExternalTable(table)
            if FLAGS.tables:
                trace("table: opened %s:%s (%s)", table.backend, name, table.config or "inline")
        local_addresses()

    def get(self, name: str):
        name = name.strip("<>")
        table = self.tables.get(name) or SpecialTable(name, self.config)
        return _TracedTable(name, table) if FLAGS.lookup else table


class _TracedTable:
    """``trace lookup``: each lookup and check with its answer (table.c's lines)."""

    def __init__(self, name: str, table) -> None:
        self.name, self.table = name, table
        kind = getattr(getattr(table, "table", None), "backend", None)
        self.label = f"{kind or 'special'}:{name}"

    def lookup(self, service: str, key: str):
        result = self.table.lookup(service, key)
        trace('lookup: lookup "%s" as %s in table %s -> %s', key, service, self.label,
              "none" if result is None else f'"{result}"')
        return result

    def check(self, service: str, key: str, regex: bool = False) -> bool:
        result = self.table.check(service, key, regex)
        trace('lookup: check "%s" as %s in table %s -> %s', key, service, self.label,
              "found" if result else "none")
        return result


def _cond_ok(cond, tables: TableSet, ctx: MatchContext) -> bool:
    def check(service: str, key: str) -> bool:
        return tables.get(cond.table).check(service, key, cond.regex)

    domain = ctx.rcpt.rpartition("@")[2].lower()
    if cond.kind == "from":
        if cond.what == "any":
            return True
        if cond.what == "local":
            return ctx.source == "local" or tables.get("localhost").check("netaddr", ctx.source)
        if cond.what == "socket":
            return ctx.source == "local"
        if cond.what == "src":
            return check("netaddr", ctx.source)
        if cond.what == "rdns":
            return bool(ctx.rdns) and (cond.table is None or check("domain", ctx.rdns))
        if cond.what == "auth":
            return _auth_ok(cond, tables, ctx)
        if cond.what == "mail-from":
            return check("mailaddr", ctx.mail_from)
    if cond.kind == "for":
        if cond.what == "any":
            return True
        if cond.what == "local":
            return tables.get("localnames").check("domain", domain)
        if cond.what == "domain":
            return check("domain", domain)
        if cond.what == "rcpt-to":
            return check("mailaddr", ctx.rcpt)
    if cond.kind == "tag":
        return ctx.tag is not None and check("string", ctx.tag)
    if cond.kind == "helo":
        return ctx.helo is not None and check("domain", ctx.helo)
    if cond.kind == "mail-from":
        return check("mailaddr", ctx.mail_from)
    if cond.kind == "rcpt-to":
        return check("mailaddr", ctx.rcpt)
    if cond.kind == "auth":
        return _auth_ok(cond, tables, ctx)
    if cond.kind == "tls":
        return ctx.tls
    return False


def _auth_ok(cond, tables: TableSet, ctx: MatchContext) -> bool:
    """ruleset.c ruleset_match_smtp_auth: the session authenticated and, with a table,
    as a user it lists (looked up as an address when the name has an @)."""
    if not ctx.auth_user:
        return False
    if cond.table is None:
        return True
    service = "string" if cond.regex or "@" not in ctx.auth_user else "mailaddr"
    return tables.get(cond.table).check(service, ctx.auth_user, cond.regex)


def match(config: Config, tables: TableSet, ctx: MatchContext):
    for number, rule in enumerate(config.rules, 1):
        if all(_cond_ok(c, tables, ctx) != c.negate for c in rule.conditions):
            if FLAGS.rules:
                trace("rules: rule #%d matched: %s", number, rule_text(rule))
            return rule
    if FLAGS.rules:
        trace("rules: no rule matched for <%s>", ctx.rcpt)
    return None


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
