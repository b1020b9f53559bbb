"""The SMTP DSN extension's parameters (RFC 3461), parsed and written back.

MAIL FROM takes ``RET=FULL|HDRS`` and ``ENVID=<xtext>``; RCPT TO takes
``NOTIFY=NEVER`` or a list of ``SUCCESS``, ``FAILURE``, ``DELAY``, and
``ORCPT=<addr-type>;<xtext>``.  Values are kept as received (ENVID and ORCPT in
their xtext form, as OpenSMTPD stores them in the envelope) and passed on as they
are to a next hop that offers DSN.  A bad value is refused with ``501 5.5.4``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from common.envelope import DSN_DELAY, DSN_FAILURE, DSN_NEVER, DSN_SUCCESS

NAMES = ("RET", "ENVID", "NOTIFY", "ORCPT")
_NOTIFY_BITS = {"SUCCESS": DSN_SUCCESS, "FAILURE": DSN_FAILURE, "DELAY": DSN_DELAY, "NEVER": DSN_NEVER}
_XTEXT = re.compile(r"^(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})+$")
_ADDR_TYPE = re.compile(r"^[A-Za-z0-9-]+$")
MAX_ENVID = 100
MAX_ORCPT = 500


def _bad(text: str) -> str:
    return f"501 5.5.4 Invalid command arguments: {text}"


@dataclass
class RcptDsn:
    notify: int = 0
    orcpt: str = ""


def valid_xtext(text: str) -> bool:
    return bool(_XTEXT.match(text))


def xtext_decode(text: str) -> str:
    return re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), text)


def split_dsn(params: str) -> tuple[str, list[str]]:
    """Take the DSN parameters out of a MAIL/RCPT parameter string, case preserved
    (the SMTP library upper-cases and refuses parameters it does not know)."""
    kept, dsn = [], []
    for word in params.split():
        if word.split("=", 1)[0].upper() in NAMES:
            dsn.append(word)
        else:
            kept.append(word)
    return " ".join(kept), dsn


def parse_mail_options(options: list[str]) -> tuple[str, str] | str:
    """(ret, envid), or the reply refusing them."""
    ret = envid = ""
    for option in options:
        key, eq, value = option.partition("=")
        key = key.upper()
        if key == "RET":
            if ret or value.upper() not in ("FULL", "HDRS"):
                return _bad(f"bad RET parameter {option}")
            ret = value.upper()
        elif key == "ENVID":
            if envid or not valid_xtext(value) or len(value) > MAX_ENVID:
                return _bad(f"bad ENVID parameter {option}")
            envid = value
    return ret, envid


def parse_rcpt_options(options: list[str]) -> RcptDsn | str:
    out = RcptDsn()
    seen: set[str] = set()
    for option in options:
        key, eq, value = option.partition("=")
        key = key.upper()
        if key in seen:
            return _bad(f"duplicate {key} parameter")
        seen.add(key)
        if key == "NOTIFY":
            for word in value.upper().split(","):
                bit = _NOTIFY_BITS.get(word)
                if bit is None:
                    return _bad(f"bad NOTIFY parameter {option}")
                out.notify |= bit
            if out.notify & DSN_NEVER and out.notify != DSN_NEVER:
                return _bad("NOTIFY=NEVER cannot be combined with other options")
        elif key == "ORCPT":
            addr_type, semi, addr = value.partition(";")
            if (not semi or not _ADDR_TYPE.match(addr_type) or not valid_xtext(addr)
                    or len(value) > MAX_ORCPT):
                return _bad(f"bad ORCPT parameter {option}")
            out.orcpt = f"{addr_type.lower()};{addr}" if addr_type.lower() == "rfc822" else value
    return out


def notify_text(bits: int) -> str:
    """NOTIFY= value for the bits of an envelope ("" when the sender gave none)."""
    if bits & DSN_NEVER:
        return "NEVER"
    return ",".join(name for name, bit in _NOTIFY_BITS.items() if bit != DSN_NEVER and bits & bit)


def mail_params(ret: str, envid: str) -> str:
    """The DSN part of a MAIL FROM line to a server that offers DSN."""
    out = []
    if ret:
        out.append(f"RET={ret}")
    if envid:
        out.append(f"ENVID={envid}")
    return " ".join(out)


def rcpt_params(notify: int, orcpt: str) -> str:
    out = []
    text = notify_text(notify)
    if text:
        out.append(f"NOTIFY={text}")
    if orcpt:
        out.append(f"ORCPT={orcpt}")
    return " ".join(out)
