"""Recipient expansion: from an RCPT address to the envelopes to queue.

Pure logic over the configuration and the tables (lka calls it): match the
rules, then for a local action resolve virtual/alias tables and the user base,
with OpenSMTPD's limits (depth 10, duplicates suppressed).  Errors come back as
(SMTP code, text) pairs for pony to answer with.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from common.envelope import Envelope
from common.trace import FLAGS, trace
from smtpd.ruleset import MatchContext, TableUnavailable, match

MAX_DEPTH = 10

TEMPFAIL = (451, "4.3.0 Temporary failure")


@dataclass
class ExpandResult:
    envelopes: list[Envelope] = field(default_factory=list)
    error: tuple[int, str] | None = None


class _Fail(Exception):
    def __init__(self, code: int, text: str) -> None:
        self.code, self.text = code, text


def split_address(addr: str) -> tuple[str, str]:
    user, _, domain = addr.rpartition("@")
    return (user, domain) if user else (addr, "")


def lookup_userinfo(tables, table: str, user: str):
    """(status, (uid, gid, home) | None) from a userbase table or the password db."""
    try:
        value = tables.get(table or "<getpwnam>").lookup_now("userinfo", user.lower())
    except TableUnavailable:
        return "tempfail", None
    if not value:
        return "notfound", None
    text = value if isinstance(value, str) else value[0]
    try:
        uid, gid, home = text.split(":", 2)
        return "ok", (int(uid), int(gid), home)
    except ValueError:
        return "tempfail", None


def expand_recipient(config, tables, req) -> ExpandResult:
    base: Envelope = req.envelope
    seen: set[tuple[str, str]] = set()
    out: list[Envelope] = []

    def context(addr: str, internal: bool) -> MatchContext:
        return MatchContext(
            source="local" if internal else base.sockaddr.strip("[]"), rdns=req.rdns or None,
            helo=base.helo, mail_from=base.sender, rcpt=addr, tag=base.tag or None,
            auth_user=base.username or None, tls=req.tls,
            local_listener=internal or req.local_listener)

    def address(addr: str, depth: int, internal: bool) -> None:
        if FLAGS.expand:
            trace("expand: lka_expand: address: %s [depth=%d]", addr, depth)
        if depth > MAX_DEPTH:
            raise _Fail(524, "5.2.4 Mailing list expansion problem")
        try:
            rule = match(config, tables, context(addr, internal))
        except TableUnavailable:
            raise _Fail(*TEMPFAIL) from None
        if rule is None or rule.reject:
            raise _Fail(550, f"5.7.1 Invalid recipient: <{base.rcpt}>")
        action = config.actions[rule.action]
        if action.method == "relay":
            emit(action, addr, "mta", internal)
        else:
            local(action, addr, depth, internal)

    def local(action, addr: str, depth: int, internal: bool) -> None:
        if FLAGS.expand:
            trace("expand: lka_expand: username: %s [depth=%d, action=%s]", addr, depth, action.name)
        user, domain = split_address(addr.lower())
        plain, _, tag = user.partition(config.sub_addr_delim)
        if action.virtual:
            keys = [f"{user}@{domain}", f"{plain}@{domain}", user, plain, f"@{domain}", "@"]
            targets = lookup_first(action.virtual, "virtual", keys)
            if targets is None:
                raise _Fail(550, f"5.1.1 Invalid recipient: <{base.rcpt}>")
            return follow(action, targets, domain, depth)
        if action.alias:
            targets = lookup_first(action.alias, "alias", [user, plain])
            if targets is not None:
                return follow(action, targets, domain, depth)
        deliver_to_user(action, plain, tag, addr, internal)

    def lookup_first(table: str, service: str, keys: list[str]):
        try:
            backend = tables.get(table)
            for key in dict.fromkeys(keys):
                value = backend.lookup_now(service, key)
                if value:
                    return [value] if isinstance(value, str) else list(value)
        except TableUnavailable:
            raise _Fail(*TEMPFAIL) from None
        return None

    def follow(action, targets: list[str], domain: str, depth: int) -> None:
        if FLAGS.expand:
            trace("expand: lka_expand: expanded to %s [depth=%d]", ", ".join(targets), depth)
        for raw in targets:
            for target in (t.strip() for t in raw.split(",")):
                if not target:
                    continue
                if target.startswith(("|", "/", ":include:", "include:", "error:", ":error:", '"')):
                    # Pipes, files, includes and error: targets come with the MDA issue.
                    raise _Fail(524, "5.2.4 Mailing list expansion problem")
                if "@" in target:
                    address(target, depth + 1, internal=True)
                else:
                    local(action, f"{target}@{domain}", depth + 1, internal=True)

    def deliver_to_user(action, user: str, tag: str, addr: str, internal: bool) -> None:
        status, info = lookup_userinfo(tables, action.userbase or "", user)
        if status == "tempfail":
            raise _Fail(*TEMPFAIL)
        if info is None:
            raise _Fail(550, f"5.1.1 Invalid recipient: <{base.rcpt}>")
        emit(action, addr, "mda", internal, mda_user=user, subaddress=tag)

    def emit(action, dest: str, type_: str, internal: bool, mda_user: str = "", subaddress: str = "") -> None:
        if (action.name, dest.lower()) in seen:
            if FLAGS.expand:
                trace("expand: %s: node found, discarding", dest)
            return
        seen.add((action.name, dest.lower()))
        flags = list(base.flags)
        if internal and "internal" not in flags:
            flags.append("internal")
        env = Envelope(**{f: getattr(base, f) for f in base.__struct_fields__})
        env.dispatcher, env.type, env.dest, env.flags = action.name, type_, dest, flags
        env.mda_user, env.mda_subaddress = mda_user, subaddress
        if FLAGS.expand:
            trace("expand: envelope for %s: %s, action %s%s", base.rcpt, dest, action.name,
                  f", user {mda_user}" if mda_user else "")
        out.append(env)

    try:
        address(base.rcpt, 0, internal=False)
    except _Fail as fail:
        return ExpandResult(error=(fail.code, fail.text))
    if not out:
        return ExpandResult(error=(524, "5.2.4 Mailing list expansion problem"))
    return ExpandResult(envelopes=out)
