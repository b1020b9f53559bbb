"""A daemon configured for TLS and AUTH starts, and one asking for TLS or AUTH it
cannot provide refuses to start, naming the line (issue 8; the SMTP side of
STARTTLS and AUTH is tested with the session core)."""
from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from smtpctl.local_commands import encrypt_password
from smtpd.main import EXIT_CONFIG
from tests.conftest import REPO, Daemon, free_port
from tests.tlsca import CertificateAuthority

EXIT_TIMEOUT = 30


def tls_config(ca_dir: Path, ports: tuple[int, int, int], *, key: Path | None = None,
               password_hash: str = "") -> str:
    issued = CertificateAuthority(ca_dir).issue("mx.example.test")
    starttls, smtps, submission = ports
    return (f'pki mx.example.test cert "{issued.cert}"\n'
            f'pki mx.example.test key "{key or issued.key}"\n'
            f'table creds {{ alice = "{password_hash or encrypt_password("pw")}" }}\n'
            f"listen on 127.0.0.1 port {starttls} tls pki mx.example.test\n"
            f"listen on 127.0.0.1 port {smtps} smtps pki mx.example.test auth <creds>\n"
            f"listen on 127.0.0.1 port {submission} tls-require pki mx.example.test auth\n"
            "action local maildir\naction out relay\n"
            "match from any auth for any action out\n"
            'match from any for domain "example.test" action local\n')


def refused(d: Daemon) -> str:
    d.start(wait=False)
    assert d.proc.wait(EXIT_TIMEOUT) == EXIT_CONFIG, d.log()
    return d.log()


@pytest.mark.skipif(os.geteuid() != 0, reason="auth on system accounts needs a root daemon; CI runs as root")
def test_daemon_with_tls_and_auth_listeners_starts(make_daemon, tmp_path):
    ports = (free_port(), free_port(), free_port())
    d = make_daemon(tls_config(tmp_path / "ca", ports)).start()
    for port in ports:
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            pass
    assert "not applied yet" not in d.log_since_start()


def test_mismatched_key_refuses_to_start_naming_the_pki_line(make_daemon, tmp_path):
    other = CertificateAuthority(tmp_path / "other").issue("other.example.test")
    d = make_daemon(tls_config(tmp_path / "ca", (free_port(), free_port(), free_port()), key=other.key))
    log = refused(d)
    assert f"{d.config}:1: pki mx.example.test: certificate and key do not match" in log
    res = subprocess.run([sys.executable, "-m", "smtpd", "-n", "-f", str(d.config)], cwd=REPO,
                         capture_output=True, text=True, timeout=EXIT_TIMEOUT)
    assert res.returncode != 0 and f"{d.config}:1: pki mx.example.test" in res.stderr


def test_world_readable_key_refuses_to_start(make_daemon, tmp_path):
    ca = CertificateAuthority(tmp_path / "ca2")
    issued = ca.issue("mx.example.test")
    issued.key.chmod(0o644)
    d = make_daemon(tls_config(tmp_path / "ca", (free_port(), free_port(), free_port()), key=issued.key))
    assert "insecure permissions: must be at most rwxr-----" in refused(d)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start the daemon as another user")
def test_unprivileged_daemon_refuses_auth_on_system_accounts():
    """Only root can read the shadow file: a daemon started as a normal user (nobody,
    through setpriv as test_daemon.py does) with `auth` and no table must not start."""
    nobody = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="pysmtpd-unpriv-auth-"))
    try:
        os.chown(base, nobody.pw_uid, nobody.pw_gid)
        text = tls_config(base / "ca", (free_port(), free_port(), free_port()))
        for path in (base / "ca").iterdir():
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        os.chown(base / "ca", nobody.pw_uid, nobody.pw_gid)
        d = Daemon(base, text, prefix=[
            "setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups",
            "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"])
        try:
            log = refused(d)
        finally:
            d.stop()
        assert f"{d.config}:6: auth without a credentials table checks the system's accounts" in log
    finally:
        shutil.rmtree(base, ignore_errors=True)
