"""A certificate authority made at test time with the openssl command line.

Tests never ship keys: ``CertificateAuthority(tmp_path)`` makes a CA, then
``issue("mail.example.test")`` a server (or client) certificate signed by it, each
as PEM files with a private key only its owner can read (smtpd refuses key
files others can read, as OpenSMTPD does).  EC P-256 keys keep it quick.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

OPENSSL_TIMEOUT = 30


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True,
                   timeout=OPENSSL_TIMEOUT)


@dataclass
class Issued:
    name: str
    cert: Path
    key: Path

    def pem(self) -> Path:
        """Key and certificate in one file (as some pki lines name one file twice)."""
        both = self.cert.with_suffix(".pem")
        both.write_bytes(self.key.read_bytes() + self.cert.read_bytes())
        both.chmod(0o600)
        return both


class CertificateAuthority:
    def __init__(self, directory: Path, name: str = "pysmtpd test CA") -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.key = self.dir / "ca.key"
        self.cert = self.dir / "ca.crt"
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-keyout", self.key, "-out", self.cert, "-days", "2", "-subj", f"/CN={name}",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=self.dir)
        self.key.chmod(0o600)
        self.serial = 1

    def issue(self, name: str, *, client: bool = False) -> Issued:
        """A certificate for ``name`` (its CN and DNS name) signed by this CA."""
        stem = f"{name.replace('*', 'star')}-{self.serial}"
        key, csr, cert = (self.dir / f"{stem}.{ext}" for ext in ("key", "csr", "crt"))
        ext = self.dir / f"{stem}.ext"
        usage = "clientAuth" if client else "serverAuth"
        ext.write_text(f"subjectAltName=DNS:{name}\nextendedKeyUsage={usage}\n"
                       "basicConstraints=CA:FALSE\n")
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-keyout", key, "-out", csr, "-subj", f"/CN={name}", cwd=self.dir)
        _openssl("x509", "-req", "-in", csr, "-CA", self.cert, "-CAkey", self.key,
                 "-set_serial", str(self.serial), "-days", "2", "-extfile", ext, "-out", cert,
                 cwd=self.dir)
        self.serial += 1
        key.chmod(0o600)
        os.unlink(csr)
        return Issued(name, cert, key)
