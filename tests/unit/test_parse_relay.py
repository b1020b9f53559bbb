"""Relay TLS and AUTH options (smtpd/parse_relay.py) and the TLS policy a session
takes from them and the relay URL (smtpd/mta_session.py tls_policy), as OpenSMTPD's
parse.y, mta.c and mta_session.c decide them."""
from __future__ import annotations

from pathlib import Path

import pytest

from smtpd.config import ConfigError
from smtpd.mta_session import RelayRefused, tls_policy
from smtpd.parse import parse_config
from smtpd.relay_url import parse_relay_url


def parse(tmp_path: Path, action: str, extra: str = ""):
    path = tmp_path / "smtpd.conf"
    path.write_text(f"listen on 127.0.0.1\ntable secrets {{ a = \"u:p\" }}\n{extra}"
                    f"action out relay {action}\nmatch from local for any action out\n")
    return parse_config(path).actions["out"]


def error(tmp_path: Path, action: str, extra: str = "") -> str:
    with pytest.raises(ConfigError) as err:
        parse(tmp_path, action, extra)
    return str(err.value)


def test_options_are_parsed(tmp_path):
    ca = tmp_path / "ca.pem"
    act = parse(tmp_path, 'host "smtp+tls://a@mx.test" auth <secrets> tls no-verify ca myca '
                'protocols "tlsv1.3" ciphers "HIGH"', f'ca myca cert "{ca}"\n')
    assert (act.tls_required, act.tls_verify) == (True, False)
    assert (act.auth_table, act.relay_ca) == ("secrets", "myca")
    assert (act.relay_protocols, act.relay_ciphers) == ("tlsv1.3", "HIGH")
    act = parse(tmp_path, "tls")
    assert act.tls_required and act.tls_verify


@pytest.mark.parametrize("action, message", [
    ("tls tls", "tls already specified for this dispatcher"),
    ("auth <secrets>", "auth may not be specified without host on a dispatcher"),
    ('host "smtp+tls://a@mx.test" auth <nosuch>', "undefined table: <nosuch>"),
    ("pki nosuch", "pki name not found: nosuch"),
    ("ca nosuch", "ca name not found: nosuch"),
    ('protocols "tlsv9"', "invalid protocols"),
])
def test_bad_options_are_refused(tmp_path, action, message):
    assert message in error(tmp_path, action)


class Act:
    def __init__(self, tls_required=False, tls_verify=False):
        self.tls_required, self.tls_verify = tls_required, tls_verify


@pytest.mark.parametrize("url, act, policy", [
    (None, Act(), ("opportunistic", False)),                       # MX: STARTTLS if offered
    (None, Act(True, True), ("required", True)),                   # tls
    (None, Act(True, False), ("required", False)),                 # tls no-verify
    ("smtp://h", Act(), ("opportunistic", False)),
    ("smtp+tls://h", Act(), ("required", True)),                   # verified by default
    ("smtp+tls://h", Act(True, False), ("required", False)),
    ("smtps://h", Act(), ("smtps", True)),
    ("smtps://h", Act(True, False), ("smtps", False)),
    ("smtp+notls://h", Act(), ("no", False)),
    ("lmtp://h:24", Act(), ("no", False)),
])
def test_tls_policy(url, act, policy):
    assert tls_policy(act, parse_relay_url(url) if url else None) == policy


def test_tls_with_smtp_notls_is_refused():
    with pytest.raises(RelayRefused) as err:
        tls_policy(Act(True, True), parse_relay_url("smtp+notls://h"))
    assert err.value.text == "TLS required for relaying"
