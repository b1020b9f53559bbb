"""Grammar of the MTA's routing: `mta limit`, `mta resolver`, `mta mx-port` and the
relay actions' routing options (backup, backup mx, helo-src, src, mail-from).
Called from smtpd/parse.py (parse.y's `mta` rule, limit.c's keys, and the relay
options of `action`); docs/config.md describes it.
"""
from __future__ import annotations

import ipaddress
import re

# limit.c's keys (all numbers; delays in seconds), and pysmtpd's max-msg-rate
LIMIT_KEYS = (
    "max-conn-per-host", "max-conn-per-route", "max-conn-per-source", "max-conn-per-connector",
    "max-conn-per-relay", "max-conn-per-domain", "conn-delay-host", "conn-delay-route",
    "conn-delay-source", "conn-delay-connector", "conn-delay-relay", "conn-delay-domain",
    "reconn-delay-route", "session-mail-max", "session-transaction-delay", "session-keepalive",
    "max-failures-per-session", "task-hiwat", "task-lowat", "task-release",
)
RATE_UNITS = {"s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "hour": 3600}
_RATE = re.compile(r"^([0-9]+)/([a-z]+)$")


def p_mta_option(parser, c, opt: str) -> bool:
    """``mta limit [for domain D] KEY VALUE ...``, ``mta resolver ADDR [port N]``,
    ``mta mx-port N``; False for any other word after ``mta``."""
    config = parser.config
    if opt == "limit":
        domain = ""
        if c.take("for"):
            c.expect("domain")
            domain = str(c.word("a domain")).lower()
        settings = config.mta_limits.setdefault(domain, {})
        if not c.more():
            raise parser.err("syntax error: expected an mta limit keyword")
        while c.more():
            key = str(c.word("an mta limit keyword"))
            if key in ("inet4", "inet6"):
                settings["family"] = 4 if key == "inet4" else 6
            elif key == "max-msg-rate":
                value = str(c.word("a rate (N/s, N/min, N/h)"))
                m = _RATE.match(value)
                if not m or m.group(2) not in RATE_UNITS or not 0 < int(m.group(1)) < 1 << 31:
                    raise parser.err(f'invalid rate "{value}" (expected N/s, N/min or N/h)')
                settings["max-msg-rate"] = int(m.group(1))
                settings["max-msg-period"] = RATE_UNITS[m.group(2)]
            elif key in LIMIT_KEYS:
                settings[key] = c.number(str(c.word("a number")), 0, (1 << 31) - 1)
            else:
                raise parser.err(f"invalid mta limit keyword: {key}")
        return True
    if opt == "resolver":
        addresses = []
        while c.more() and c.peek() != "port":
            addresses.append(_address(parser, str(c.word("an address"))))
        if not addresses:
            raise parser.err("syntax error: expected the address of a DNS server after mta resolver")
        port = 53
        if c.take("port"):
            port = c.number(str(c.word("a port")), 1, 65535, "port")
        c.end()
        config.mta_resolver = addresses
        config.mta_resolver_port = port
        return True
    if opt == "mx-port":
        config.mta_mx_port = c.number(str(c.word("a port")), 1, 65535, "port")
        c.end()
        return True
    return False


def relay_option(parser, c, act, opt: str) -> bool:
    """The routing options of a relay action; False for the others."""
    if opt == "backup":
        act.backup = True
        if c.take("mx"):
            act.backup_mx = str(c.word("a hostname"))
        return True
    if opt == "src":
        # an address is bound as is; a table's addresses come from lka (smtpd/mta.py)
        act.src = c.table_ref() if c.peek_ref() or c.peek() == "{" else _address(parser, str(c.word("an address")))
        return True
    if opt == "helo-src":
        act.helo_src = c.table_ref()
        return True
    if opt == "mail-from":
        value = str(c.word("a mailaddr"))
        if value not in ("<>", "") and "@" not in value:
            raise parser.err(f'invalid mail-from address "{value}"')
        act.mail_from = value.strip("<>")
        return True
    return False


def _address(parser, text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise parser.err(f'invalid address "{text}"') from None
