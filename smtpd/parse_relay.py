"""The TLS and AUTH options of ``action NAME relay`` (OpenSMTPD's parse.y
dispatcher_remote_option: ``tls [no-verify]``, ``auth <table>``, ``pki``, ``ca``,
``protocols``, ``ciphers``); parse.py calls ``relay_option`` for each option word."""
from __future__ import annotations

from smtpd.config import Action
from smtpd.tls import TLSConfigError, protocol_range


def relay_option(parser, c, act: Action, opt: str) -> bool:
    """Parse ``opt`` (already taken from the cursor ``c``) into ``act``; False when it
    is not one of these options.  Errors are OpenSMTPD's wording."""
    def once(field: str, word: str) -> None:
        if getattr(act, field):
            raise parser.err(f"{word} already specified for this dispatcher")

    if opt == "tls":
        once("tls_required", "tls")
        act.tls_required = True
        act.tls_verify = not c.take("no-verify")
    elif opt == "auth":
        if act.host is None:
            raise parser.err("auth may not be specified without host on a dispatcher")
        once("auth_table", "auth mapping")
        act.auth_table = c.table_ref()
    elif opt == "pki":
        once("relay_pki", "pki")
        name = str(c.word("a pki name")).lower()
        if name not in parser.config.pki:
            raise parser.err(f"pki name not found: {name}")
        act.relay_pki = name
    elif opt == "ca":
        once("relay_ca", "ca")
        name = str(c.word("a ca name")).lower()
        if name not in parser.config.ca:
            raise parser.err(f"ca name not found: {name}")
        act.relay_ca = name
    elif opt == "protocols":
        once("relay_protocols", "protocols")
        act.relay_protocols = str(c.word("a protocols string"))
        try:
            protocol_range(act.relay_protocols)
        except TLSConfigError as exc:
            raise parser.err(str(exc)) from None
    elif opt == "ciphers":
        once("relay_ciphers", "ciphers")
        act.relay_ciphers = str(c.word("a ciphers string"))
    else:
        return False
    return True
