"""TLS configuration (smtpd/tls.py): the checks at start, and the listener contexts
tried with real handshakes over a socket pair, against certificates made at run time."""
from __future__ import annotations

import os
import pwd
import re
import signal
import socket
import ssl
import threading
from pathlib import Path

import pytest

from smtpd import tls
from smtpd.config import ConfigError, check_config
from smtpd.parse import parse_config
from tests.tlsca import CertificateAuthority, Issued

HANDSHAKE_TIMEOUT = 10


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> CertificateAuthority:
    return CertificateAuthority(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def certs(ca):
    return {name: ca.issue(name) for name in ("mx.example.test", "other.example.test", "any.example.test")}


def write_conf(tmp_path: Path, certs, listen: str, extra: str = "") -> Path:
    lines = [f'pki {name} cert "{c.cert}"\npki {name} key "{c.key}"' for name, c in certs.items()]
    path = tmp_path / "smtpd.conf"
    path.write_text("\n".join(lines) + f"\n{extra}{listen}\naction a maildir\nmatch for local action a\n")
    return path


def load(path: Path):
    config = parse_config(path)
    check_config(config, {"lo": [(socket.AF_INET, "127.0.0.1")]})
    return config


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_name: str | None):
    """Both ends over a socket pair; returns (server's SSLSocket info, client's peer cert)."""
    a, b = socket.socketpair()
    a.settimeout(HANDSHAKE_TIMEOUT)
    b.settimeout(HANDSHAKE_TIMEOUT)
    result: dict = {}

    def serve():
        try:
            with server_ctx.wrap_socket(a, server_side=True) as s:
                result["log"] = tls.tls_log_text(s)
                result["received"] = tls.received_clause(s, received_auth=True, user="alice")
                result["version"], result["cipher"] = s.version(), s.cipher()
                s.recv(1)
        except (ssl.SSLError, OSError) as exc:
            result["server_error"] = exc

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client_ctx.wrap_socket(b, server_hostname=server_name) as c:
            result["peer"] = c.getpeercert()
            c.sendall(b"x")
    finally:
        b.close()
        thread.join(HANDSHAKE_TIMEOUT)
        a.close()
    assert not thread.is_alive()
    return result


def client(ca, cert=None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca.cert))
    if cert is not None:
        ctx.load_cert_chain(cert.cert, cert.key)
    return ctx


def subject_cn(peer: dict) -> str:
    return dict(x[0] for x in peer["subject"])["commonName"]


# --- the checks at start -------------------------------------------------------------------------

def test_good_pki_passes_and_no_tls_listener_has_no_context(tmp_path, certs):
    config = load(write_conf(tmp_path, certs, "listen on 127.0.0.1 port 2525\n"
                                              "listen on 127.0.0.1 port 2587 tls pki mx.example.test"))
    plain, starttls = config.listeners
    assert tls.server_context(config, plain) is None
    assert isinstance(tls.server_context(config, starttls), ssl.SSLContext)


def test_mismatched_cert_and_key_refused_at_the_pki_line(tmp_path, certs):
    a, b = certs["mx.example.test"], certs["other.example.test"]
    path = tmp_path / "smtpd.conf"
    path.write_text(f'pki mx.example.test cert "{a.cert}"\npki mx.example.test key "{b.key}"\n'
                    "listen on 127.0.0.1 tls pki mx.example.test\naction a maildir\n"
                    "match for local action a\n")
    with pytest.raises(ConfigError) as err:
        load(path)
    assert err.value.line == 1 and "certificate and key do not match" in err.value.message


def test_key_readable_by_others_is_refused(tmp_path, ca):
    issued = ca.issue("perm.example.test")
    issued.key.chmod(0o644)
    with pytest.raises(ConfigError) as err:
        load(write_conf(tmp_path, {"perm.example.test": issued}, "listen on 127.0.0.1 tls pki perm.example.test"))
    assert "insecure permissions: must be at most rwxr-----" in err.value.message
    issued.key.chmod(0o640)             # group-readable is what OpenSMTPD allows
    load(write_conf(tmp_path, {"perm.example.test": issued}, "listen on 127.0.0.1 tls pki perm.example.test"))


def test_fifo_named_as_key_is_refused_without_waiting(tmp_path, ca):
    issued = ca.issue("fifo.example.test")
    fifo = tmp_path / "key.fifo"
    os.mkfifo(fifo, 0o600)
    issued = Issued(issued.name, issued.cert, fifo)
    signal.alarm(10)                    # a blocking open would wait for a writer forever
    try:
        with pytest.raises(ConfigError, match="not a regular file"):
            load(write_conf(tmp_path, {issued.name: issued}, f"listen on 127.0.0.1 tls pki {issued.name}"))
    finally:
        signal.alarm(0)


def test_group_writable_certificate_is_refused(tmp_path, ca):
    issued = ca.issue("gw.example.test")
    issued.cert.chmod(0o664)
    with pytest.raises(ConfigError, match="insecure permissions: must be at most rwxr-xr-x"):
        load(write_conf(tmp_path, {"gw.example.test": issued}, "listen on 127.0.0.1 tls pki gw.example.test"))


def test_missing_file_and_missing_key_statement(tmp_path, certs):
    c = certs["mx.example.test"]
    path = tmp_path / "smtpd.conf"
    path.write_text(f'pki mx.example.test cert "{c.cert}"\npki mx.example.test key "{tmp_path}/none.key"\n'
                    "listen on 127.0.0.1 tls pki mx.example.test\naction a maildir\nmatch for local action a\n")
    with pytest.raises(ConfigError, match=r"pki mx.example.test: .*none.key: No such file or directory"):
        load(path)
    path.write_text(f'pki mx.example.test cert "{c.cert}"\n'
                    "listen on 127.0.0.1 tls pki mx.example.test\naction a maildir\nmatch for local action a\n")
    with pytest.raises(ConfigError, match="pki mx.example.test: missing key file"):
        load(path)


def test_garbage_certificate_refused(tmp_path, certs):
    c = certs["mx.example.test"]
    bad = tmp_path / "bad.crt"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    path = tmp_path / "smtpd.conf"
    path.write_text(f'pki mx.example.test cert "{bad}"\npki mx.example.test key "{c.key}"\n'
                    "listen on 127.0.0.1 tls pki mx.example.test\naction a maildir\nmatch for local action a\n")
    with pytest.raises(ConfigError, match="pki mx.example.test: cannot load certificate or key"):
        load(path)


def test_encrypted_key_is_refused_not_prompted_for(tmp_path, ca):
    import subprocess
    issued = ca.issue("enc.example.test")
    encrypted = tmp_path / "enc.key"
    subprocess.run(["openssl", "pkey", "-in", issued.key, "-out", encrypted, "-aes256", "-passout", "pass:x"],
                   check=True, capture_output=True, timeout=30)
    encrypted.chmod(0o600)
    issued.key = encrypted
    with pytest.raises(ConfigError, match="pki enc.example.test: cannot load"):
        load(write_conf(tmp_path, {"enc.example.test": issued}, "listen on 127.0.0.1 tls pki enc.example.test"))


@pytest.mark.parametrize("options, message", [
    ("ciphers NO-SUCH-CIPHER", "invalid ciphers: NO-SUCH-CIPHER"),
    ("protocols tlsv9", "invalid protocols: tlsv9"),
    ('protocols "all,!all"', "no protocol left"),
])
def test_bad_ciphers_and_protocols_refused_at_the_listen_line(tmp_path, certs, options, message):
    path = write_conf(tmp_path, certs, f"listen on 127.0.0.1 tls pki mx.example.test {options}")
    with pytest.raises(ConfigError) as err:
        load(path)
    assert message in err.value.message and err.value.line == 7


def test_ca_without_certificates_refused(tmp_path, certs):
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    path = write_conf(tmp_path, certs, "listen on 127.0.0.1 tls-require verify pki mx.example.test ca clients",
                      extra=f'ca clients cert "{empty}"\n')
    with pytest.raises(ConfigError, match="ca clients: no usable certificate"):
        load(path)


def test_protocol_ranges():
    v = ssl.TLSVersion
    assert tls.protocol_range("secure") == (v.TLSv1_2, v.TLSv1_3)
    assert tls.protocol_range("tlsv1.3") == (v.TLSv1_3, v.TLSv1_3)
    assert tls.protocol_range("all,!tlsv1.0,-tlsv1.1") == (v.TLSv1_2, v.TLSv1_3)
    assert tls.protocol_range("tlsv1.2:tlsv1.3") == (v.TLSv1_2, v.TLSv1_3)


# --- handshakes -----------------------------------------------------------------------------------

def test_sni_picks_the_pki_of_the_asked_name(tmp_path, ca, certs):
    config = load(write_conf(tmp_path, certs, "listen on 127.0.0.1 tls pki mx.example.test "
                                              "pki other.example.test"))
    ctx = tls.server_context(config, config.listeners[0])
    for asked, served in [("other.example.test", "other.example.test"),
                          ("mx.example.test", "mx.example.test")]:
        assert subject_cn(handshake(ctx, client(ca), asked)["peer"]) == served
    # a name no pki has, or no SNI: the listener's first pki
    unchecked = client(ca)
    unchecked.check_hostname = False
    assert subject_cn(handshake(ctx, unchecked, "unknown.example.test")["peer"]) == "mx.example.test"
    assert subject_cn(handshake(ctx, unchecked, None)["peer"]) == "mx.example.test"


def test_catch_all_pki_serves_unknown_names(ca, certs):
    assert tls.pick_pki(["mx.example.test", "*"], "nope.test") == "*"
    assert tls.pick_pki(["mx.example.test", "*"], "MX.Example.Test.") == "mx.example.test"
    assert tls.pick_pki(["mx.example.test"], "nope.test") is None


def test_log_text_and_received_clause_as_opensmtpd_writes_them(tmp_path, ca, certs):
    config = load(write_conf(tmp_path, certs, "listen on 127.0.0.1 tls pki mx.example.test"))
    got = handshake(tls.server_context(config, config.listeners[0]), client(ca), "mx.example.test")
    name, _proto, bits = got["cipher"]
    assert got["log"] == f"{got['version']}:{name}:{bits}"
    assert re.fullmatch(r"TLSv1\.[23]:[A-Z0-9_-]+:\d+", got["log"])
    assert got["received"] == f"({got['log']}:NO) auth=yes user=alice"


def test_protocols_option_limits_versions(tmp_path, ca, certs):
    config = load(write_conf(tmp_path, certs, "listen on 127.0.0.1 tls pki mx.example.test protocols tlsv1.3"))
    ctx = tls.server_context(config, config.listeners[0])
    assert handshake(ctx, client(ca), "mx.example.test")["version"] == "TLSv1.3"
    old = client(ca)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError):
        handshake(ctx, old, "mx.example.test")


def test_verify_requires_a_client_certificate_from_the_ca(tmp_path, ca, certs):
    config = load(write_conf(tmp_path, certs, "listen on 127.0.0.1 tls-require verify pki mx.example.test ca clients",
                             extra=f'ca clients cert "{ca.cert}"\n'))
    listener = config.listeners[0]
    assert (listener.tls, listener.tls_verify, listener.ca) == ("require", True, "clients")
    ctx = tls.server_context(config, listener)
    good = handshake(ctx, client(ca, ca.issue("client.example.test", client=True)), "mx.example.test")
    assert good["received"].startswith("(") and ":YES) auth=" in good["received"]
    stranger = CertificateAuthority(tmp_path / "other-ca", "someone else")
    for ctx_client in (client(ca), client(ca, stranger.issue("client.example.test", client=True))):
        try:
            got = handshake(ctx, ctx_client, "mx.example.test")
        except (ssl.SSLError, OSError):
            continue                # TLS 1.2: the client sees the refusal in the handshake
        assert "server_error" in got and "log" not in got      # TLS 1.3: after it, server side


def test_files_read_elsewhere_make_the_same_context(tmp_path, ca, certs):
    config = load(write_conf(tmp_path, certs, "listen on 127.0.0.1 smtps pki mx.example.test"))
    files = tls.read_tls_files(config)
    for c in certs.values():
        c.key.rename(c.key.with_suffix(".gone"))        # the paths are no longer readable
    try:
        ctx = tls.server_context(config, config.listeners[0], files=files)
        assert subject_cn(handshake(ctx, client(ca), "mx.example.test")["peer"]) == "mx.example.test"
    finally:
        for c in certs.values():
            c.key.with_suffix(".gone").rename(c.key)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user; CI runs as root")
def test_context_from_files_after_a_privilege_drop(tmp_path, certs):
    """pony builds contexts at a reload as _smtpd, from contents the parent read: the
    memory-file path must work in a process whose uid changed (made non-dumpable)."""
    config = load(write_conf(tmp_path, certs, "listen on 127.0.0.1 smtps pki mx.example.test"))
    files = tls.read_tls_files(config)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:                                         # the child: drop, build, report
        try:
            nobody = pwd.getpwnam("nobody")
            os.setgroups([])
            os.setresgid(nobody.pw_gid, nobody.pw_gid, nobody.pw_gid)
            os.setresuid(nobody.pw_uid, nobody.pw_uid, nobody.pw_uid)
            ok = tls.server_context(config, config.listeners[0], files=files) is not None
            os.write(write, b"ok" if ok else b"none")
        except BaseException as exc:                     # noqa: BLE001 - reported to the parent
            os.write(write, repr(exc).encode()[:500])
        finally:
            os._exit(0)
    os.close(write)
    try:
        answer = os.read(read, 600)
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    assert answer == b"ok", answer
