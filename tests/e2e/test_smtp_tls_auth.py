"""STARTTLS, SMTPS, AUTH and PROXY v2 against the real daemon (issue 8), with a CA and
certificates made at run time, and real clients: smtplib, swaks, openssl s_client."""
from __future__ import annotations

import base64
import smtplib
import socket
import ssl
import subprocess
import time
from pathlib import Path

from smtpctl.local_commands import encrypt_password
from smtpd import proxy_v2
from tests.conftest import free_port, wait_for
from tests.e2e.helpers import maildir_messages, userbase
from tests.e2e.test_smtp_protocol import Client
from tests.tlsca import CertificateAuthority

NAME = "mx.example.test"
CLIENT_TIMEOUT = 30


class Setup:
    """A daemon with a STARTTLS listener (auth-optional), an smtps one (auth
    required), a tls-require one and a proxy-v2 one; alice's password is "pw"."""

    def __init__(self, make_daemon, tmp_path: Path) -> None:
        self.ca = CertificateAuthority(tmp_path / "ca")
        issued = self.ca.issue(NAME)
        self.starttls, self.smtps, self.require, self.proxied = (free_port() for _ in range(4))
        base = tmp_path / "d"
        text = "\n".join([
            f'pki {NAME} cert "{issued.cert}"',
            f'pki {NAME} key "{issued.key}"',
            f'table creds {{ alice = "{encrypt_password("pw")}" }}',
            f"table users {userbase(base)}",
            f"listen on 127.0.0.1 port {self.starttls} tls pki {NAME} auth-optional <creds> hostname {NAME}",
            f"listen on 127.0.0.1 port {self.smtps} smtps pki {NAME} auth <creds> hostname {NAME}",
            f"listen on 127.0.0.1 port {self.require} tls-require pki {NAME} hostname {NAME}",
            f"listen on 127.0.0.1 port {self.proxied} proxy-v2",
            'action "local" maildir "~/Maildir" userbase <users>',
            'action "out" relay host "smtp://127.0.0.1:9"',
            'match from any for domain "example.test" action "local"',
            'match from any auth for any action "out"',
        ]) + "\n"
        self.base = base
        self.d = make_daemon(text).start()

    def context(self) -> ssl.SSLContext:
        """Verifies the chain; smtplib connects by address, so the name is not checked
        (swaks and s_client below check it, with SNI)."""
        ctx = ssl.create_default_context(cafile=str(self.ca.cert))
        ctx.check_hostname = False
        return ctx


def test_starttls_with_smtplib_then_auth_and_a_message(make_daemon, tmp_path):
    s = Setup(make_daemon, tmp_path)
    with smtplib.SMTP("127.0.0.1", s.starttls, timeout=CLIENT_TIMEOUT) as c:
        code, text = c.ehlo("client.test")
        assert b"STARTTLS" in text and b"AUTH" not in text      # no AUTH in clear text
        assert c.docmd("AUTH", "PLAIN AGFsaWNlAHB3")[0] == 503
        c.starttls(context=s.context())
        code, text = c.ehlo("client.test")
        assert b"STARTTLS" not in text and b"AUTH PLAIN LOGIN" in text
        assert c.login("alice", "pw") == (235, b"2.0.0 Authentication succeeded")
        c.sendmail("a@remote.test", ["alice@example.test"], b"Subject: tls\r\n\r\nsecret\r\n")
    msgs = wait_for(lambda: maildir_messages(s.base, "alice"), 20, "delivery")
    assert b" with ESMTPSA id " in msgs[0] and b":NO)" in msgs[0]
    log = s.d.wait_log("smtp authentication user=alice result=ok")
    assert "smtp tls ciphers=TLSv1." in log


def test_auth_failure_is_logged_and_slowed(make_daemon, tmp_path):
    s = Setup(make_daemon, tmp_path)
    with smtplib.SMTP_SSL("127.0.0.1", s.smtps, timeout=CLIENT_TIMEOUT, context=s.context()) as c:
        c.ehlo("client.test")
        assert c.mail("a@remote.test")[0] == 530           # auth required here
        started = time.monotonic()
        code, _ = c.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0alice\0wrong").decode())
        assert code == 535
        assert time.monotonic() - started >= 0.9           # the failure delay
        c.docmd("AUTH", "LOGIN")
        c.docmd(base64.b64encode(b"alice").decode())
        assert c.docmd(base64.b64encode(b"pw").decode())[0] == 235
    log = s.d.wait_log("smtp authentication user=alice result=ok")
    assert "smtp authentication user=alice result=permfail" in log
    assert 'failed-command command="AUTH PLAIN (...)" result="535 Authentication failed"' in log
    assert "d3Jvbmc" not in log                            # never the credentials


def test_unauthenticated_relaying_is_refused(make_daemon, tmp_path):
    s = Setup(make_daemon, tmp_path)
    with smtplib.SMTP("127.0.0.1", s.starttls, timeout=CLIENT_TIMEOUT) as c:
        c.ehlo("client.test")
        c.starttls(context=s.context())
        c.ehlo("client.test")
        c.mail("a@remote.test")
        assert c.rcpt("victim@elsewhere.test")[0] == 550


def test_tls_require_and_what_is_pipelined_after_starttls(make_daemon, tmp_path):
    s = Setup(make_daemon, tmp_path)
    c = Client(s.require)
    c.reply()
    c.cmd("EHLO client.test")
    assert c.cmd("MAIL FROM:<a@remote.test>")[0] == \
        "530 5.5.1 Invalid command: Must issue a STARTTLS command first"
    # CVE-2011-0411: a command sent in clear text behind STARTTLS is never executed
    c.sock.sendall(b"STARTTLS\r\nMAIL FROM:<evil@x.test>\r\n")
    assert c.reply() == ["220 2.0.0 Ready to start TLS"]
    assert c.buf == b""
    tls = s.context().wrap_socket(c.sock, server_hostname=NAME)
    tls.sendall(b"RCPT TO:<alice@example.test>\r\n")
    reply = tls.recv(4096)
    assert reply.startswith(b"503 5.5.1 "), reply            # no MAIL was taken
    tls.close()
    # clear text where the handshake should be: the session ends, an io-error, not a fault
    c = Client(s.starttls)
    c.reply()
    c.cmd("EHLO client.test")
    assert c.cmd("STARTTLS") == ["220 2.0.0 Ready to start TLS"]
    c.sock.sendall(b"EHLO client.test\r\n")
    c.sock.settimeout(30)
    assert c.sock.recv(100) == b""
    log = s.d.wait_log('smtp disconnected reason="io-error: ')
    assert "internal error" not in log


def test_swaks_and_openssl_s_client(make_daemon, tmp_path):
    s = Setup(make_daemon, tmp_path)
    swaks = subprocess.run(
        ["swaks", "--server", "127.0.0.1", "--port", str(s.starttls), "--tls", "--tls-verify",
         "--tls-ca-path", str(s.ca.cert), "--tls-sni", NAME, "--ehlo", "client.test",
         "--from", "a@remote.test", "--to", "alice@example.test", "--auth", "LOGIN",
         "--auth-user", "alice", "--auth-password", "pw"],
        capture_output=True, text=True, timeout=60)
    assert swaks.returncode == 0, swaks.stdout + swaks.stderr
    assert "250 2.0.0" in swaks.stdout
    for args in (["-starttls", "smtp", "-connect", f"127.0.0.1:{s.starttls}"],
                 ["-connect", f"127.0.0.1:{s.smtps}"]):
        out = subprocess.run(["openssl", "s_client", *args, "-CAfile", str(s.ca.cert),
                              "-servername", NAME, "-verify_return_error", "-quiet"],
                             input="EHLO client.test\r\nQUIT\r\n", capture_output=True, text=True,
                             timeout=60)
        assert "250-AUTH PLAIN LOGIN" in out.stdout and "221 2.0.0 Bye" in out.stdout, out.stdout + out.stderr


def test_proxy_v2_gives_the_client_address(make_daemon, tmp_path):
    s = Setup(make_daemon, tmp_path)
    with socket.create_connection(("127.0.0.1", s.proxied), timeout=CLIENT_TIMEOUT) as sock:
        sock.sendall(proxy_v2.build(("198.51.100.7", 40000), ("127.0.0.1", s.proxied)))
        c = Client.__new__(Client)
        c.sock, c.buf = sock, b""
        assert c.reply()[0].startswith("220 ")
        assert "[198.51.100.7]" in c.cmd("EHLO client.test")[0]
        c.cmd("QUIT")
    s.d.wait_log("smtp connected address=198.51.100.7 ")
    # a client that speaks SMTP at once is no balancer: closed without a reply
    with socket.create_connection(("127.0.0.1", s.proxied), timeout=CLIENT_TIMEOUT) as sock:
        sock.sendall(b"EHLO client.test\r\n")
        assert sock.recv(100) == b""
    s.d.wait_log('reason="protocol error (')
