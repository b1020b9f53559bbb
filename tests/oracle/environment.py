"""The site both servers of the fidelity tests run with: a CA, a server certificate, a
credentials table, four listeners, one configuration text valid for OpenSMTPD and pysmtpd.

Everything is made at run time under a temporary directory: the CA and certificate by openssl,
the password hash by ``openssl passwd -6`` (SHA-512 crypt, a crypt(3) format OpenSMTPD accepts).
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import free_port
from tests.e2e.helpers import userbase
from tests.oracle.transcripts import DOMAIN, PASSWORD, USER

HOSTNAME = "mail.example.test"
MAX_MESSAGE_SIZE = 20000
MAX_RCPT = 2
LISTENERS = ("plain", "starttls", "require", "smtps")


def _openssl(*args: str, cwd: Path) -> None:
    res = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        raise AssertionError(f"openssl {' '.join(args)}: {res.stderr}")


def make_pki(directory: Path) -> tuple[Path, Path, Path]:
    """(ca.crt, server.crt, server.key): a throw-away CA and a certificate for HOSTNAME."""
    if shutil.which("openssl") is None:
        raise AssertionError("openssl is needed (contrib/dev.sh installs it)")
    directory.mkdir(parents=True, exist_ok=True)
    # ECDSA keys: Debian's OpenSMTPD 6.8 with OpenSSL 3 fails the handshake with an RSA key
    # ("EVP lib": its privilege-separated RSA engine), as its users report.
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")
    _openssl("req", "-x509", *ec, "-nodes", "-days", "2", "-subj",
             "/CN=pysmtpd fidelity test CA", "-keyout", "ca.key", "-out", "ca.crt", cwd=directory)
    _openssl("req", *ec, "-nodes", "-subj", f"/CN={HOSTNAME}",
             "-keyout", "server.key", "-out", "server.csr", cwd=directory)
    (directory / "san.ext").write_text(f"subjectAltName=DNS:{HOSTNAME}\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", "server.crt",
             cwd=directory)
    (directory / "server.key").chmod(0o600)
    return directory / "ca.crt", directory / "server.crt", directory / "server.key"


def password_hash(password: str) -> str:
    res = subprocess.run(["openssl", "passwd", "-6", password], capture_output=True, text=True,
                         timeout=30, check=True)
    return res.stdout.strip()


@dataclass
class Site:
    base: Path
    cafile: Path
    ports: dict[str, int]
    config_text: str

    def port_list(self) -> list[int]:
        return [self.ports[name] for name in LISTENERS]

    def remove_homes(self) -> None:
        """As root the users' homes live outside ``base`` (tests/e2e/helpers.py userbase)."""
        homes = self.base / "home"
        if homes.is_symlink():
            shutil.rmtree(homes.resolve(), ignore_errors=True)


def make_site(base: Path) -> Site:
    """Files and a configuration for one server (call once per server: ports are its own)."""
    base.mkdir(parents=True, exist_ok=True)
    ca, cert, key = make_pki(base / "pki")
    creds = base / "creds"
    creds.write_text(f"{USER} {password_hash(PASSWORD)}\n")
    creds.chmod(0o600)
    ports = {name: free_port() for name in LISTENERS}
    users = userbase(base, users=("alice", "bob", "carol"))
    pki = f"pki {HOSTNAME}"
    text = "\n".join([
        "# fidelity tests: the same site for OpenSMTPD and pysmtpd (tests/oracle/environment.py)",
        f'{pki} cert "{cert}"',
        f'{pki} key "{key}"',
        f"table users {users}",
        f"table creds file:{creds}",
        f"smtp max-message-size {MAX_MESSAGE_SIZE}",
        f"smtp limit max-rcpt {MAX_RCPT}",
        f"listen on 127.0.0.1 port {ports['plain']} hostname {HOSTNAME}",
        f"listen on 127.0.0.1 port {ports['starttls']} hostname {HOSTNAME} tls {pki} auth <creds>",
        f"listen on 127.0.0.1 port {ports['require']} hostname {HOSTNAME} tls-require {pki}",
        f"listen on 127.0.0.1 port {ports['smtps']} hostname {HOSTNAME} smtps {pki} "
        f"auth-optional <creds>",
        'action "local" maildir "~/Maildir" userbase <users>',
        f'match from any for domain "{DOMAIN}" action "local"',
    ]) + "\n"
    return Site(base, ca, ports, text)
