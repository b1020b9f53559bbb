"""RFC 5321 mailbox syntax, as pysmtpd accepts it in MAIL/RCPT and in internal
injections (bounces, offline files): deliberately strict, a dot-atom local part (or a
quoted string without control characters) at a domain name or address literal.  No
shell metacharacter can pass into an envelope through here."""
from __future__ import annotations

import re

_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LOCAL = rf"(?:{_ATOM}(?:\.{_ATOM})*|\"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*\")"
_DOMAIN = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*|\[[0-9A-Fa-f:.IPv]+\])"
_MAILBOX = re.compile(rf"^{_LOCAL}@{_DOMAIN}$")


def valid_mailbox(addr: str) -> bool:
    return len(addr) <= 254 and bool(_MAILBOX.match(addr)) and len(addr.rpartition("@")[0]) <= 64
