"""TLS out (issue 10 point 2) against the real daemon: a CA made at run time, sinks on
loopback offering STARTTLS or smtps; verified delivery, refusal on a wrong name or
an untrusted CA when verification is required, ``tls no-verify``, opportunistic
STARTTLS falling back to plain text, and ``tls`` with a server that has none."""
from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from tests.conftest import free_port, wait_for
from tests.e2e.helpers import send, userbase
from tests.e2e.raw_sink import RawSink
from tests.e2e.sink import Sink
from tests.tlsca import CertificateAuthority

NAME = "localhost"          # resolves to 127.0.0.1 only: the name TLS checks


def server_context(issued) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(issued.cert), str(issued.key))
    return ctx


def relay_config(base: Path, port: int, relay_line: str, extra: str = "") -> str:
    return "\n".join([
        f"listen on 127.0.0.1 port {port}",
        f"table users {userbase(base)}",
        extra,
        'action "local" maildir "~/Maildir" userbase <users>',
        f'action "outbound" relay {relay_line}',
        'match from any for domain "example.test" action "local"',
        'match from local for any action "outbound"',
    ]) + "\n"


class Setup:
    def __init__(self, make_daemon, tmp_path: Path) -> None:
        self.make_daemon, self.tmp_path = make_daemon, tmp_path
        self.ca = CertificateAuthority(tmp_path / "ca")
        self.port, self.sink_port = free_port(), free_port()

    def relay_once(self, d, result: str) -> str:
        """Send alice -> carol@remote.test; the log once a delivery line says ``result``."""
        send(self.port, "alice@example.test", ["carol@remote.test"])
        return d.wait_log(f'result="{result}"', 30)

    def daemon(self, relay_line: str, with_ca: bool = True):
        extra = f'ca relayca cert "{self.ca.cert}"' if with_ca else ""
        return self.make_daemon(relay_config(self.tmp_path / "d", self.port, relay_line, extra)).start()


def delivered_over_tls(d, sink, verified: str, port: int) -> None:
    send(port, "alice@example.test", ["carol@remote.test"])
    wait_for(lambda: sink.transactions, 30, "the relayed message")
    log = d.wait_log('result="Ok"')
    assert " mta tls ciphers=TLSv1." in log
    assert f'mta cert-check result="{verified}" fingerprint="SHA256:' in log


def test_starttls_verified_against_the_action_ca(make_daemon, tmp_path):
    s = Setup(make_daemon, tmp_path)
    sink = Sink(s.sink_port, tls_context=server_context(s.ca.issue(NAME)), require_starttls=True).start()
    try:
        d = s.daemon(f'host "smtp+tls://{NAME}:{s.sink_port}" ca relayca')
        delivered_over_tls(d, sink, "valid", s.port)
        assert f"mta connecting address=smtp+tls://127.0.0.1:{s.sink_port} host={NAME}" in d.log()
    finally:
        sink.stop()


def test_smtps_verified(make_daemon, tmp_path):
    s = Setup(make_daemon, tmp_path)
    sink = Sink(s.sink_port, ssl_context=server_context(s.ca.issue(NAME))).start()
    try:
        d = s.daemon(f'host "smtps://{NAME}:{s.sink_port}" ca relayca')
        delivered_over_tls(d, sink, "valid", s.port)
        assert f"address=smtps://127.0.0.1:{s.sink_port}" in d.log()
    finally:
        sink.stop()


def _refused(s: Setup, issued, relay_line: str, reason: str) -> None:
    sink = Sink(s.sink_port, tls_context=server_context(issued)).start()
    try:
        d = s.daemon(relay_line)
        log = s.relay_once(d, "TempFail")
        assert reason in log, log
        assert sink.transactions == []
        assert len(d.queue_lines()) == 1          # kept for a later try, not bounced
    finally:
        sink.stop()


def test_wrong_name_refused_when_verification_is_required(make_daemon, tmp_path):
    s = Setup(make_daemon, tmp_path)
    _refused(s, s.ca.issue("other.example.test"), f'host "smtp://{NAME}:{s.sink_port}" tls ca relayca',
             "IO Error: certificate verify failed: Hostname mismatch")


def test_untrusted_ca_refused_when_verification_is_required(make_daemon, tmp_path):
    s = Setup(make_daemon, tmp_path)
    stranger = CertificateAuthority(tmp_path / "other-ca", name="not trusted")
    _refused(s, stranger.issue(NAME), f'host "smtp+tls://{NAME}:{s.sink_port}" ca relayca',
             "IO Error: certificate verify failed: unable to get local issuer certificate")


@pytest.mark.parametrize("options, with_ca", [
    ("tls no-verify", True),            # TLS required, any certificate
    ("", False),                        # opportunistic STARTTLS: never verified
])
def test_unverified_tls_takes_any_certificate(make_daemon, tmp_path, options, with_ca):
    s = Setup(make_daemon, tmp_path)
    stranger = CertificateAuthority(tmp_path / "other-ca", name="not trusted")
    sink = Sink(s.sink_port, tls_context=server_context(stranger.issue("other.test")),
                require_starttls=True).start()
    try:
        d = s.daemon(f'host "smtp://{NAME}:{s.sink_port}" {options}'.rstrip(), with_ca=with_ca)
        delivered_over_tls(d, sink, "unverified", s.port)
    finally:
        sink.stop()


def test_opportunistic_tls_failure_falls_back_to_plain_text(make_daemon, tmp_path):
    s = Setup(make_daemon, tmp_path)
    sink = RawSink(s.sink_port, starttls="break").start()
    try:
        d = s.daemon(f'host "smtp://{NAME}:{s.sink_port}"', with_ca=False)
        log = s.relay_once(d, "Ok")
        assert len(sink.recorded) == 1
        assert "opportunistic TLS failed, downgrading to plain" in log
        assert f"mta connecting address=smtp+notls://127.0.0.1:{s.sink_port}" in log
        assert sink.connections == 2
    finally:
        sink.stop()


def test_starttls_refused_goes_on_in_plain_text_unless_tls_is_required(make_daemon, tmp_path):
    s = Setup(make_daemon, tmp_path)
    sink = RawSink(s.sink_port, starttls="refuse").start()
    try:
        d = s.daemon(f'host "smtp://{NAME}:{s.sink_port}"', with_ca=False)
        s.relay_once(d, "Ok")
        assert len(sink.recorded) == 1 and sink.connections == 1
        d.stop()
        d = s.daemon(f'host "smtp://{NAME}:{s.sink_port}" tls', with_ca=False)
        log = s.relay_once(d, "TempFail")
        assert "STARTTLS rejected: 454 4.7.0 TLS not available" in log
        assert len(sink.recorded) == 1
    finally:
        sink.stop()


@pytest.mark.parametrize("scheme, reason", [
    ("smtp", "TLS required but not supported by remote host"),     # the sink offers no STARTTLS
    ("smtp+notls", 'stat="TLS required for relaying"'),            # refused before connecting
])
def test_tls_required_and_not_possible(make_daemon, tmp_path, scheme, reason):
    s = Setup(make_daemon, tmp_path)
    sink = Sink(s.sink_port).start()
    try:
        d = s.daemon(f'host "{scheme}://{NAME}:{s.sink_port}" tls', with_ca=False)
        assert reason in s.relay_once(d, "TempFail")
        assert sink.transactions == []
    finally:
        sink.stop()


def test_client_certificate_from_the_action_pki(make_daemon, tmp_path):
    """A relay that wants a client certificate (the handshake fails without one) gets
    the action's ``pki``."""
    s = Setup(make_daemon, tmp_path)
    ctx = server_context(s.ca.issue(NAME))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(s.ca.cert))
    client = s.ca.issue("client.example.test", client=True)
    sink = Sink(s.sink_port, tls_context=ctx, require_starttls=True).start()
    try:
        extra = (f'ca relayca cert "{s.ca.cert}"\n'
                 f'pki client.example.test cert "{client.cert}"\n'
                 f'pki client.example.test key "{client.key}"')
        d = s.make_daemon(relay_config(s.tmp_path / "d", s.port, f'host "smtp+tls://{NAME}:{s.sink_port}" '
                                       "ca relayca pki client.example.test", extra)).start()
        delivered_over_tls(d, sink, "valid", s.port)
    finally:
        sink.stop()
