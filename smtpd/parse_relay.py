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
        # A label with another scheme than smtp+tls:// or smtps:// is refused when the
        # URL is used (relay_url.py, as to.c text_to_relayhost), not here: OpenSMTPD
        # 6.8 loads such a configuration (tests/unit/test_compat_configs.py).
    elif opt in ("pki", "ca"):
        field = f"relay_{opt}"
        once(field, opt)
        name = str(c.word(f"a {opt} name")).lower()
        if name not in getattr(parser.config, opt):        # config.pki / config.ca
            raise parser.err(f"{opt} name not found: {name}")
        setattr(act, field, name)
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
