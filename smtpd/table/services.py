"""Lookup services, how a key matches a table entry, and what a value must look like
(table.c: table_service_name, the *_match functions, table_parse_lookup)."""
from __future__ import annotations

import ipaddress
import re

# Every service OpenSMTPD knows (enum table_service), plus "virtual", the name our
# expansion gives to alias lookups in a virtual table (the same K_ALIAS in table.c).
SERVICES = frozenset({
    "alias", "domain", "credentials", "netaddr", "userinfo", "source", "mailaddr",
    "addrname", "mailaddrmap", "relayhost", "string", "regex", "auth",
})
WIRE_NAME = {"virtual": "alias"}          # the name a table program is told


def wire_service(service: str) -> str:
    return WIRE_NAME.get(service, service)


def entry_matches(service: str, key: str, entry: str, regex: bool = False) -> bool:
    """Does ``key`` (from the session, lowercased) match ``entry`` (from the table)?
    Domains match ``*.example.org`` wildcards, addresses match networks, mail addresses
    match ``@domain`` and ``user`` entries; any other service compares exactly."""
    e = entry.lower()
    if regex or service == "regex":
        try:
            return re.search(entry, key, re.I) is not None
        except re.error:
            return False
    if service == "netaddr":
        if e == key:
            return True
        try:
            return ipaddress.ip_address(key) in ipaddress.ip_network(e, strict=False)
        except ValueError:
            return False
    if service == "domain":
        return e == key or (e.startswith("*.") and key.endswith(e[1:]))
    if service == "mailaddr":
        user, _, domain = key.rpartition("@")
        return e == key or e == f"@{domain}" or e == user
    return e == key


def uses_matching(service: str) -> bool:
    """Services whose lookups walk the entries with entry_matches (table_static.c keycmp)."""
    return service in ("domain", "netaddr", "mailaddr", "regex")


def parse_userinfo(key: str, value: str) -> tuple[int, int, str]:
    """A userinfo value, ``uid:gid:home`` (table.c K_USERINFO via text_to_userinfo);
    ValueError when malformed."""
    uid, gid, home = value.split(":", 2)
    if not home.startswith("/"):
        raise ValueError(f"userinfo for {key}: home directory {home!r} is not absolute")
    return int(uid), int(gid), home


def split_alias_value(value: str) -> list[str]:
    """An alias value: comma-separated targets (expand.c expand_line)."""
    return [v.strip() for v in value.split(",") if v.strip()]


# What the configuration may use a table for (parse.y's table_check_use calls): the
# kinds of table allowed, the services one of which it must offer, and the error.
USES: dict[str, tuple[frozenset[str], frozenset[str], str]] = {}


def _use(name: str, kinds: str, services: str, message: str) -> None:
    USES[name] = (frozenset(kinds.split()), frozenset(services.split()), message)


_use("alias", "dynamic hash", "alias", "table {} may not be used for alias lookups")
_use("virtual", "dynamic hash", "alias", "table {} may not be used for virtual lookups")
_use("userbase", "dynamic hash", "userinfo", "table {} may not be used for userbase lookups")
_use("helo-src", "dynamic hash", "addrname", "table {} may not be used for helo-source lookups")
_use("src", "dynamic list hash", "source", "table {} may not be used for source lookups")
_use("host", "dynamic list", "relayhost", "table {} may not be used for host lookups")
_use("domain", "dynamic hash", "relayhost", "table {} may not be used for host lookups")
_use("listen-auth", "dynamic hash", "credentials", "table {} may not be used for auth lookups")
_use("senders", "dynamic hash", "mailaddrmap", "invalid use of table {} as SENDERS parameter")
_use("hostnames", "dynamic hash", "addrname", "invalid use of table {} as HOSTNAMES parameter")
_use("match-auth", "dynamic list hash", "string credentials", "table {} may not be used for auth lookups")
_use("from-auth", "dynamic list", "string credentials", "table {} may not be used for from lookups")
