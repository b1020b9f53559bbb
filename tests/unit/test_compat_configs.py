"""The 30 real-world smtpd.conf files of ../shared/compat/configs, each against the
verdict OpenSMTPD 6.8 gave it (MANIFEST.tsv).

Paths the configs name are created as empty placeholder files under a temporary
root (the parser's ``root``), and the interfaces they listen on are handed to the
check as this test's own, as the manifest's notes describe.
"""
from __future__ import annotations

import csv
import re
import socket
from pathlib import Path

import pytest

from smtpd.config import ConfigError, check_config
from smtpd.parse import parse_config
from tests.tlsca import CertificateAuthority

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "compat" / "configs"
MANIFEST = CORPUS / "MANIFEST.tsv"
ROWS = list(csv.DictReader(MANIFEST.open(), delimiter="\t")) if MANIFEST.exists() else []

# OpenSMTPD-portable 6.8 on Linux has no interface groups, so it refuses
# "listen on all"; OpenBSD accepts it, and so do we (every address of every
# interface): the grammar of these files is valid (see docs/config.md).
LISTEN_ON_ALL = "invalid virtual ip or interface: all"


def test_corpus_is_present():
    assert len(ROWS) == 30, f"expected the 30 configs of {CORPUS}"


def _placeholders(notes: str, what: str) -> list[str]:
    m = re.search(rf"placeholder {what}: ([^;]+)", notes)
    return m.group(1).split() if m else []


def _pki_placeholders(path: Path, root: Path) -> None:
    """The manifest's placeholders for pki files are certificate and key pairs: each
    pki of the file gets one (a single file when its cert and key are one path)."""
    try:
        config = parse_config(path, root=root)
    except ConfigError:
        return
    ca = None
    for pki in config.pki.values():
        if pki.cert is None or pki.key is None:
            continue
        ca = ca or CertificateAuthority(root / "placeholder-ca")
        issued = ca.issue(pki.name.replace("*", "any"))
        cert, key = (root / p.lstrip("/") for p in (pki.cert, pki.key))
        for placeholder in (cert, key):
            placeholder.parent.mkdir(parents=True, exist_ok=True)
        if cert == key:
            cert.write_bytes(issued.pem().read_bytes())
        else:
            cert.write_bytes(issued.cert.read_bytes())
            key.write_bytes(issued.key.read_bytes())
        key.chmod(0o600)


def _prepare(row: dict, root: Path) -> dict[str, list[tuple[int, str]]]:
    # /etc/aliases: on the Debian machine that gave the verdicts, not in the notes
    for path in ["/etc/aliases"] + _placeholders(row["notes"], r"files for referenced paths"):
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("")
    ifaces = {"lo": [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]}
    for n, name in enumerate(_placeholders(row["notes"], "interfaces"), 10):
        ifaces[name] = [(socket.AF_INET, f"192.0.2.{n}")]
    return ifaces


@pytest.mark.parametrize("row", ROWS, ids=[r["file"] for r in ROWS])
def test_config_gets_opensmtpd_verdict(row, tmp_path):
    ifaces = _prepare(row, tmp_path)
    path = CORPUS / row["file"]
    expected = row["smtpd68_message"]

    _pki_placeholders(path, tmp_path)

    def verdict():
        config = parse_config(path, root=tmp_path)
        check_config(config, ifaces, root=tmp_path)
        return config

    if row["smtpd68_result"] == "ok" or expected.endswith(LISTEN_ON_ALL):
        config = verdict()
        assert config.rules
        if expected.endswith(LISTEN_ON_ALL):
            assert any(lis.address == "all" for lis in config.listeners)
        return
    with pytest.raises(ConfigError) as err:
        verdict()
    got = str(err.value)
    m = re.match(r"^[^:]+\.conf:(\d+): (.*)$", expected)
    if m:
        # "FILE:LINE: syntax error": the same line, and the message says what was expected
        assert err.value.line == int(m.group(1)), got
        assert m.group(2) in got and "expected" in got, got
    else:
        # "smtpd: table_create: table "aliases" already defined" and the like
        reason = re.sub(r"^(smtpd|warn): (table_create: )?", "", expected)
        assert reason in got, got
