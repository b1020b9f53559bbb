"""smtpctl encrypt and spf walk (commands smtpctl runs itself)."""
from __future__ import annotations

import io
import subprocess
import sys

import bcrypt
import pytest

from smtpctl.local_commands import (
    LocalCommandError, SpfWalk, encrypt, encrypt_password, spf_record, spf_terms, split_target,
    spf_walk,
)
from tests.conftest import REPO
from tests.dns_server import DnsServer


def test_encrypt_makes_bcrypt_hashes_that_verify():
    hashed = encrypt_password("s3cret")
    assert hashed.startswith("$2b$")
    assert bcrypt.checkpw(b"s3cret", hashed.encode())
    assert not bcrypt.checkpw(b"other", hashed.encode())
    assert encrypt_password("s3cret") != hashed            # salted


def test_encrypt_reads_one_password_per_line_and_refuses_what_bcrypt_would_cut():
    out = io.StringIO()
    encrypt(None, io.StringIO("one\ntwo\r\n"), out)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert bcrypt.checkpw(b"one", lines[0].encode()) and bcrypt.checkpw(b"two", lines[1].encode())
    with pytest.raises(LocalCommandError):
        encrypt_password("x" * 73)


def test_smtpctl_encrypt_runs_without_a_daemon():
    res = subprocess.run([sys.executable, "-m", "smtpctl", "--socket", "/nonexistent", "encrypt", "pw"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert bcrypt.checkpw(b"pw", res.stdout.strip().encode())


def test_spf_terms_and_targets():
    assert spf_record(["hello", "v=spf1 -all"]) == "v=spf1 -all"
    assert spf_record(["v=spf1 a", "v=spf1 mx"]) is None          # two records: none (RFC 7208 4.5)
    assert list(spf_terms("v=spf1 +ip4:192.0.2.0/24 a/24 mx:m.test/28//64 redirect=x.test ~all")) == [
        ("ip4", "192.0.2.0/24"), ("a", "/24"), ("mx", "m.test/28//64"), ("redirect=", "x.test"), ("all", "")]
    assert split_target("m.test/28//64", "d.test") == ("m.test", "/28", "/64")
    assert split_target("", "d.test") == ("d.test", "", "")


def test_spf_walk_follows_includes_redirects_a_and_mx_against_a_real_dns_server():
    zone = {
        "example.test": {"TXT": ['"v=spf1 ip4:192.0.2.0/24 include:_spf.example.test a mx/30 -all"'],
                         "A": ["198.51.100.7"], "MX": ["10 mx.example.test."]},
        "_spf.example.test": {"TXT": ['"v=spf1 ip6:2001:db8::/32 " "include:loop.example.test ~all"']},
        "loop.example.test": {"TXT": ['"v=spf1 include:example.test -all"']},   # a loop: walked once
        "mx.example.test": {"A": ["203.0.113.9"], "AAAA": ["2001:db8::25"]},
        "other.test": {"TXT": ['"v=spf1 redirect=example.test"']},
    }
    with DnsServer(zone) as dns_server:
        out = io.StringIO()
        spf_walk(io.StringIO("other.test\n\n# comment\n"), out, resolver=dns_server.resolver())
    assert out.getvalue().splitlines() == [
        "192.0.2.0/24", "2001:db8::/32", "198.51.100.7", "203.0.113.8/30", "2001:db8::25"]
