"""Certificate renewal by ``smtpctl reload``, against the real daemon: pony, chrooted
and unprivileged, cannot read the key files, so the parent reads them and sends their
contents to pony alone; a new certificate is served on STARTTLS and smtps listeners
alike, a key that does not load is refused with the reason and the old certificate
stays in service, and ``trace mproc`` never shows the key material."""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import smtplib
import ssl
import tempfile
from pathlib import Path

import pytest

from tests.conftest import Daemon, free_port
from tests.e2e.test_trace import mproc_lines
from tests.tlsca import CertificateAuthority, Issued

NAME = "mx.example.test"
CLIENT_TIMEOUT = 30


def client_context(ca: CertificateAuthority) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca.cert))
    ctx.check_hostname = False               # the CNs differ on purpose; the chain is checked
    return ctx


def served_cn(ca: CertificateAuthority, port: int, *, smtps: bool = False) -> str:
    """The CN of the certificate a new session gets (STARTTLS, or smtps), its chain
    verified against the test CA."""
    ctx = client_context(ca)
    if smtps:
        client = smtplib.SMTP_SSL("127.0.0.1", port, timeout=CLIENT_TIMEOUT, context=ctx)
    else:
        client = smtplib.SMTP("127.0.0.1", port, timeout=CLIENT_TIMEOUT)
    with client as c:
        c.ehlo("client.test")
        if not smtps:
            c.starttls(context=ctx)
            c.ehlo("client.test")
        subject = dict(item[0] for item in c.sock.getpeercert()["subject"])
    return subject["commonName"]


def install(issued: Issued, cert: Path, key: Path) -> None:
    """Put a certificate and its key where smtpd.conf names them (the admin's renewal)."""
    shutil.copyfile(issued.cert, cert)
    shutil.copyfile(issued.key, key)
    key.chmod(0o600)


def key_lines(issued: Issued) -> list[str]:
    """The base64 lines of the private key, which must appear in no log."""
    return [line for line in issued.key.read_text().splitlines() if line and "-----" not in line]


def test_reload_serves_a_renewed_certificate_and_keeps_the_key_out_of_traces(make_daemon, tmp_path):
    ca = CertificateAuthority(tmp_path / "ca")
    first, renewed = ca.issue("first.example.test"), ca.issue("renewed.example.test")
    pki_dir = tmp_path / "pki"
    pki_dir.mkdir()
    cert, key = pki_dir / "server.crt", pki_dir / "server.key"
    install(first, cert, key)
    starttls, smtps = free_port(), free_port()
    d = make_daemon("\n".join([
        f'pki {NAME} cert "{cert}"',
        f'pki {NAME} key "{key}"',
        f"listen on 127.0.0.1 port {starttls} tls pki {NAME} hostname {NAME}",
        f"listen on 127.0.0.1 port {smtps} smtps pki {NAME} hostname {NAME}",
        'action "out" relay host "smtp://127.0.0.1:9"',
        'match from local for any action "out"',
    ]) + "\n").start()
    assert served_cn(ca, starttls) == "first.example.test"
    assert served_cn(ca, smtps, smtps=True) == "first.example.test"

    assert d.smtpctl("trace", "mproc").stdout == "command succeeded\n"
    opened = smtplib.SMTP("127.0.0.1", starttls, timeout=CLIENT_TIMEOUT)   # before the reload
    opened.ehlo("client.test")
    install(renewed, cert, key)
    res = d.smtpctl("reload")
    assert res.stdout.startswith("command succeeded"), res.stdout
    d.wait_log("configuration reloaded")
    assert served_cn(ca, starttls) == "renewed.example.test"
    # a session opened before the reload still has STARTTLS, with the listener's new pki
    with opened:
        opened.starttls(context=client_context(ca))
        assert dict(i[0] for i in opened.sock.getpeercert()["subject"])["commonName"] == \
            "renewed.example.test"
    assert served_cn(ca, smtps, smtps=True) == "renewed.example.test"
    if os.geteuid() == 0:
        # chrooted, pony loaded them from short-lived copies in its scratch directory
        pony_root = Path(f"/proc/{d.children()['smtpd: pony']}/root")
        assert os.readlink(pony_root) != "/"
        assert list((pony_root / "pony-tls").iterdir()) == []

    # The parent sent the certificate and key to pony alone: its prepare message is
    # larger than the others' by at least their size, and the others' are all alike.
    log = d.log_since_start()
    sizes = {dst: size for src, dst, size, name, _ in mproc_lines(log)
             if src == "parent" and name == "conf_reload_prepare"}
    assert set(sizes) == {"control", "lka", "queue", "scheduler", "pony"}, sizes
    others = {size for dst, size in sizes.items() if dst != "pony"}
    assert len(others) == 1, sizes
    assert sizes["pony"] >= others.pop() + cert.stat().st_size + key.stat().st_size, sizes

    # A key that does not load: refused with the reason, the renewed certificate stays.
    key.write_text("-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    res = d.smtpctl("reload", check=False)
    assert res.returncode == 1, res.stdout
    assert res.stdout.startswith(f"command failed: {d.config}:1: pki {NAME}: cannot load certificate or key"), res.stdout
    assert served_cn(ca, starttls) == "renewed.example.test"
    assert served_cn(ca, smtps, smtps=True) == "renewed.example.test"
    # ... and so does a key the parent cannot use at all (others may read it)
    install(first, cert, key)
    key.chmod(0o644)
    res = d.smtpctl("reload", check=False)
    assert res.returncode == 1 and "insecure permissions" in res.stdout, res.stdout
    assert served_cn(ca, starttls) == "renewed.example.test"

    log = d.wait_log("reload failed")
    assert log.count("reload failed, keeping the current configuration") == 2
    for line in key_lines(first) + key_lines(renewed):
        assert line not in log
    assert "PRIVATE KEY" not in log
    assert d.proc.poll() is None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start the daemon as another user")
def test_reload_renews_the_certificate_in_unprivileged_mode(tmp_path):
    """Started by a normal user (nobody, through setpriv as test_daemon.py does), pony is
    not chrooted: it loads the bytes the parent sent through a memory file."""
    nobody = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="pysmtpd-unpriv-"))
    d = None
    try:
        ca = CertificateAuthority(base / "ca")
        first, renewed = ca.issue("first.example.test"), ca.issue("renewed.example.test")
        cert, key = base / "server.crt", base / "server.key"
        install(first, cert, key)
        for path in (base, cert, key):
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        port = free_port()
        d = Daemon(base, "\n".join([
            f'pki {NAME} cert "{cert}"',
            f'pki {NAME} key "{key}"',
            f"listen on 127.0.0.1 port {port} tls pki {NAME} hostname {NAME}",
            'action "out" relay host "smtp://127.0.0.1:9"',
            'match from local for any action "out"',
        ]) + "\n", prefix=[
            "setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups",
            "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"])
        d.start()
        assert served_cn(ca, port) == "first.example.test"
        install(renewed, cert, key)
        d.proc.send_signal(signal.SIGHUP)
        d.wait_log("configuration reloaded")
        assert served_cn(ca, port) == "renewed.example.test"
    finally:
        if d is not None:
            d.stop()
            assert not d.children(), "processes left behind"
        shutil.rmtree(base, ignore_errors=True)
