"""AUTH to a smarthost (issue 10 point 3) against the real daemon:
``relay host smtp+tls://label@host auth <secrets>`` with OpenSMTPD's credentials
table format (label -> "user:password"), to an aiosmtpd sink that requires STARTTLS
and AUTH; PLAIN, LOGIN when only LOGIN is offered, and the failures."""
from __future__ import annotations

import threading

import pytest
from aiosmtpd.smtp import AuthResult

from tests.e2e.sink import Sink
from tests.e2e.test_relay_tls import NAME, Setup, relay_config, server_context


class Authenticator:
    """Takes user "bob" with password "s3cr:et"; records every try."""

    def __init__(self) -> None:
        self.tries: list[tuple[str, str, str]] = []
        self.lock = threading.Lock()

    def __call__(self, server, session, envelope, mechanism, auth_data) -> AuthResult:
        login, password = auth_data.login.decode(), auth_data.password.decode()
        with self.lock:
            self.tries.append((mechanism, login, password))
        return AuthResult(success=(login, password) == ("bob", "s3cr:et"), handled=False)


def auth_sink(s: Setup, **kwargs) -> tuple[Sink, Authenticator]:
    authenticator = Authenticator()
    sink = Sink(s.sink_port, tls_context=server_context(s.ca.issue(NAME)), require_starttls=True,
                auth_required=True, authenticator=authenticator, **kwargs).start()
    return sink, authenticator


def secrets(entry: str) -> str:
    return f"table secrets {{ {entry} }}\n"


def _config(s: Setup, entry: str, url: str, auth: str = "auth <secrets>"):
    extra = f'ca relayca cert "{s.ca.cert}"\n' + secrets(entry)
    text = relay_config(s.tmp_path / "d", s.port, f'host "{url}" {auth} ca relayca', extra)
    return s.make_daemon(text).start()


@pytest.mark.parametrize("offered, mechanism", [
    ({}, "PLAIN"),                                       # PLAIN when offered
    ({"auth_exclude_mechanism": ["PLAIN"]}, "LOGIN"),    # else LOGIN
])
def test_auth_with_a_credentials_table(make_daemon, tmp_path, offered, mechanism):
    s = Setup(make_daemon, tmp_path)
    sink, authenticator = auth_sink(s, **offered)
    try:
        # OpenSMTPD's format: label -> user:password, split at the first colon
        d = _config(s, 'relay1 = "bob:s3cr:et"', f"smtp+tls://relay1@{NAME}:{s.sink_port}")
        log = s.relay_once(d, "Ok")
        assert len(sink.transactions) == 1
        assert authenticator.tries == [(mechanism, "bob", "s3cr:et")]
        assert "s3cr" not in log
    finally:
        sink.stop()


def test_wrong_password_is_a_temporary_failure(make_daemon, tmp_path):
    s = Setup(make_daemon, tmp_path)
    sink, authenticator = auth_sink(s)
    try:
        d = _config(s, 'relay1 = "bob:wrong"', f"smtp+tls://relay1@{NAME}:{s.sink_port}")
        log = s.relay_once(d, "TempFail")
        assert 'stat="AUTH rejected: 535 5.7.8 Authentication credentials invalid"' in log
        assert sink.transactions == [] and len(d.queue_lines()) == 1
    finally:
        sink.stop()


def test_unknown_label_and_missing_auth_table(make_daemon, tmp_path):
    s = Setup(make_daemon, tmp_path)
    sink, authenticator = auth_sink(s)
    try:
        d = _config(s, 'other = "bob:s3cr:et"', f"smtp+tls://relay1@{NAME}:{s.sink_port}")
        log = s.relay_once(d, "TempFail")
        assert 'stat="Failed to retrieve secret"' in log
        assert "credentials not found for secrets:relay1" in log
        d.stop()
        d = _config(s, 'relay1 = "bob:s3cr:et"', f"smtp+tls://relay1@{NAME}:{s.sink_port}", auth="")
        assert 'stat="No auth table for relaying"' in s.relay_once(d, "TempFail")
        assert authenticator.tries == [] and sink.transactions == []
    finally:
        sink.stop()
