"""TLS for inbound SMTP: the server contexts of listeners, and how OpenSMTPD shows a
TLS session in its log and Received header (OpenSMTPD's ssl.c, smtpd.c
load_pki_tree/load_pki_keys, smtp.c's listener TLS setup, to.c tls_to_text);
and for outbound SMTP the client contexts of relay actions (mta.c
mta_setup_dispatcher), at the end of this module.

The parent checks every ``pki`` and ``ca`` at start (``check_tls``, called by
``config.check_config``): files readable only as OpenSMTPD allows, certificates
and keys that load and match, cipher and protocol strings the TLS library takes.
A configuration that asks for TLS the daemon cannot provide never starts.

``server_context`` builds one listener's ``ssl.SSLContext``: the first ``pki``
of the listener is the default certificate, the others are chosen by the name
the client asks for (SNI) matched against the pki names, which smtpd.conf(5)
defines as the server's host names (``*`` is the catch-all).  It takes the
files' contents in ``files`` when the caller cannot open the paths itself
(pony may be chrooted; the parent reads them with ``read_tls_files``).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import ssl
import tempfile
from pathlib import Path

from smtpd.config import Config, ConfigError, Listener
from smtpd.config_files import FileRefused, open_regular

# ssl.c ssl_load_file / ssl_load_key: the most a certificate or a key file may allow
CERT_MODE_MAX = 0o755
KEY_MODE_MAX = 0o740

_VERSIONS = {"tlsv1.0": ssl.TLSVersion.TLSv1, "tlsv1.1": ssl.TLSVersion.TLSv1_1,
             "tlsv1.2": ssl.TLSVersion.TLSv1_2, "tlsv1.3": ssl.TLSVersion.TLSv1_3}
_PROTOCOL_SETS = {"all": set(_VERSIONS), "legacy": set(_VERSIONS),
                  "default": {"tlsv1.2", "tlsv1.3"}, "secure": {"tlsv1.2", "tlsv1.3"}}
# libtls's cipher keywords, as OpenSSL cipher strings (Python sets TLS <= 1.2 suites only:
# TLS 1.3's are OpenSSL's, all AEAD)
_CIPHER_KEYWORDS = {
    "secure": "TLSv1.2+AEAD+ECDHE:TLSv1.2+AEAD+DHE",
    "default": "TLSv1.2+AEAD+ECDHE:TLSv1.2+AEAD+DHE",
    "compat": "HIGH:!aNULL",
    "legacy": "HIGH:MEDIUM:!aNULL",
    "insecure": "ALL:!aNULL:!eNULL",
    "all": "ALL:!aNULL:!eNULL",
}


class TLSConfigError(ValueError):
    """A ciphers or protocols string the TLS library cannot use."""


# --- the files: read by the privileged parent, checked as OpenSMTPD checks them --------------

def _mode_text(mode: int) -> str:
    return "".join(ch if mode & bit else "-"
                   for ch, bit in zip("rwxrwxrwx", (0o400, 0o200, 0o100, 0o40, 0o20, 0o10, 4, 2, 1)))


def read_secret_file(path: str, mode_max: int, root: Path | None = None) -> bytes:
    """The file's bytes if it is a regular file owned by root (or the daemon's own user
    when it runs unprivileged) whose mode allows no more than ``mode_max``; raises
    FileRefused with the reason otherwise."""
    real = root / Path(path).relative_to("/") if root is not None and Path(path).is_absolute() else Path(path)
    fd, st = open_regular(real)
    with open(fd, "rb") as f:
        if st.st_uid not in (0, os.geteuid()):
            raise FileRefused("not owned by uid 0")
        if st.st_mode & 0o777 & ~mode_max:
            raise FileRefused(f"insecure permissions: must be at most {_mode_text(mode_max)}")
        return f.read()


def read_tls_files(config: Config, root: Path | None = None) -> dict[str, bytes]:
    """Every pki's certificate and key and every ca's certificates, by path as the
    configuration names them; ConfigError (file:line of the pki or ca) if one cannot
    be used.  ``root`` stands for "/" (tests check real-world configs with it)."""
    files: dict[str, bytes] = {}

    def read(owner, kind: str, path: str | None, mode_max: int) -> None:
        label = f"{'ca' if kind == 'ca' else 'pki'} {owner.name}"
        if path is None:
            raise ConfigError(owner.file, owner.lineno, f"{label}: missing "
                              f"{'key' if kind == 'key' else 'certificate'} file")
        try:
            data = read_secret_file(path, mode_max, root)
        except (FileRefused, OSError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise ConfigError(owner.file, owner.lineno, f"{label}: {path}: {reason}") from None
        # a file named as both cert and key is checked with the key's stricter mode
        files[path] = data

    for pki in config.pki.values():
        read(pki, "cert", pki.cert, CERT_MODE_MAX)
        read(pki, "key", pki.key, KEY_MODE_MAX)
    for ca in config.ca.values():
        read(ca, "ca", ca.cert, CERT_MODE_MAX)
    return files


def check_tls(config: Config, root: Path | None = None) -> dict[str, bytes]:
    """Everything TLS the configuration asks for, loaded once as the listeners will
    load it: ConfigError naming the pki, ca or listen line that cannot work."""
    files = read_tls_files(config, root)
    for pki in config.pki.values():
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            _load_chain(ctx, files[pki.cert], files[pki.key])
        except ssl.SSLError as exc:
            raise ConfigError(pki.file, pki.lineno, f"pki {pki.name}: {_pki_error(exc)}") from None
    for ca in config.ca.values():
        try:
            _ca_context(files[ca.cert])
        except (ssl.SSLError, ValueError) as exc:
            raise ConfigError(ca.file, ca.lineno, f"ca {ca.name}: no usable certificate in "
                              f"{ca.cert} ({getattr(exc, 'reason', None) or exc})") from None
    for listener in config.listeners:
        try:
            server_context(config, listener, files=files)
        except (TLSConfigError, ssl.SSLError) as exc:
            raise ConfigError(listener.file, listener.lineno, str(exc)) from None
    for action in config.actions.values():
        if action.method == "relay":
            try:
                client_context(config, action, True, files)
            except (TLSConfigError, ssl.SSLError) as exc:
                raise ConfigError(config.file, action.lineno, str(exc)) from None
    return files


def _pki_error(exc: ssl.SSLError) -> str:
    if exc.reason == "KEY_VALUES_MISMATCH":
        return "certificate and key do not match"
    return f"cannot load certificate or key ({exc.reason or exc})"


# --- contexts -----------------------------------------------------------------------------

# The runtime directory's sub-directory that only pony's user may enter (the parent
# makes it): chrooted in the runtime directory, with no /proc, pony writes there the
# short-lived copies ``_pem_path`` needs at a reload.  ``scratch_dir`` is where it is
# seen from the process (None: the system's temporary directory).
SCRATCH_DIR_NAME = "pony-tls"
scratch_dir: str | None = None


@contextlib.contextmanager
def _pem_path(data: bytes):
    """A path to ``data`` for OpenSSL's file-only loaders: an anonymous memory file
    through /proc when there is one, else a private (0600) file in ``scratch_dir``
    removed as soon as it is loaded."""
    fd = os.memfd_create("pysmtpd-pki", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        path = f"/proc/self/fd/{fd}"
        if os.path.exists(path):
            yield path
            return
    finally:
        os.close(fd)
    fd, path = tempfile.mkstemp(prefix="pysmtpd-pki-", dir=scratch_dir)
    try:
        os.write(fd, data)
        os.close(fd)
        yield path
    finally:
        os.unlink(path)


def _no_passphrase() -> bytes:
    # OpenSMTPD asks for a key's passphrase on the terminal; a daemon started by an
    # init system has none, so an encrypted key is refused rather than prompted for.
    return b""


def _load_chain(ctx: ssl.SSLContext, cert: bytes, key: bytes) -> None:
    with _pem_path(cert) as cert_path, _pem_path(key) as key_path:
        ctx.load_cert_chain(cert_path, key_path, password=_no_passphrase)


def _ca_context(cadata: bytes) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_verify_locations(cadata=cadata.decode("ascii", "replace"))
    if not ctx.get_ca_certs():
        raise ValueError("no certificate found")
    return ctx


def protocol_range(text: str) -> tuple[ssl.TLSVersion, ssl.TLSVersion]:
    """libtls's protocols syntax ("tlsv1.2,tlsv1.3", "secure", "all,!tlsv1.0", ":" or ","
    separated, "!"/"-" removes) as the lowest and highest version to allow."""
    chosen: set[str] = set()
    for word in text.replace(":", ",").split(","):
        word = word.strip().lower()
        negate = word[:1] in ("!", "-")
        word = word.lstrip("!-+")
        versions = _PROTOCOL_SETS.get(word) or ({word} if word in _VERSIONS else None)
        if versions is None:
            raise TLSConfigError(f"invalid protocols: {text}")
        chosen = chosen - versions if negate else chosen | versions
    if not chosen:
        raise TLSConfigError(f"invalid protocols: {text} (no protocol left)")
    order = sorted(chosen, key=list(_VERSIONS).index)
    return _VERSIONS[order[0]], _VERSIONS[order[-1]]


def cipher_string(text: str) -> str:
    return _CIPHER_KEYWORDS.get(text.lower(), text)


def _set_protocols_and_ciphers(ctx: ssl.SSLContext, protocols: str | None, ciphers: str | None) -> None:
    """libtls's ``protocols`` (default "secure") and ``ciphers`` strings on a context."""
    low, high = protocol_range(protocols or "secure")
    try:
        ctx.minimum_version, ctx.maximum_version = low, high
    except ValueError as exc:
        raise TLSConfigError(f"invalid protocols: {protocols} ({exc})") from None
    if ciphers:
        try:
            ctx.set_ciphers(cipher_string(ciphers))
        except ssl.SSLError:
            raise TLSConfigError(f"invalid ciphers: {ciphers}") from None


def _base_context(config: Config, listener: Listener, files: dict[str, bytes]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    _set_protocols_and_ciphers(ctx, listener.protocols, listener.ciphers or config.tls_ciphers)
    if listener.tls_verify:
        ctx.verify_mode = ssl.CERT_REQUIRED
        if listener.ca is not None:
            ctx.load_verify_locations(cadata=files[config.ca[listener.ca].cert].decode("ascii", "replace"))
        else:
            ctx.load_default_certs(ssl.Purpose.CLIENT_AUTH)
    return ctx


def server_context(config: Config, listener: Listener, *,
                   files: dict[str, bytes] | None = None) -> ssl.SSLContext | None:
    """The listener's server context, or None when it has no TLS.  ``files`` maps the
    configuration's paths to their contents (``read_tls_files``); without it the paths
    are read here.  Raises TLSConfigError, ssl.SSLError or ConfigError when the TLS
    settings cannot work (``check_tls`` has said so at start)."""
    if not listener.tls:
        return None
    if files is None:
        files = read_tls_files(config)
    contexts: dict[str, ssl.SSLContext] = {}
    for name in listener.pki:
        pki = config.pki[name]
        ctx = _base_context(config, listener, files)
        _load_chain(ctx, files[pki.cert], files[pki.key])
        contexts[name] = ctx
    default = contexts[listener.pki[0]]
    if len(contexts) > 1:
        def choose(ssl_object, server_name: str | None, _ctx) -> None:
            picked = pick_pki(list(contexts), server_name)
            if picked is not None and contexts[picked] is not ssl_object.context:
                ssl_object.context = contexts[picked]
        default.sni_callback = choose
    return default


def pick_pki(names: list[str], server_name: str | None) -> str | None:
    """Which of a listener's pki serves ``server_name``: the one of that name, else
    the catch-all ``*``, else None (the listener's first stays)."""
    if server_name:
        wanted = server_name.rstrip(".").lower()
        if wanted in names:
            return wanted
    return "*" if "*" in names else None


# --- what the session shows of TLS ---------------------------------------------------------

def tls_log_text(ssl_object) -> str:
    """to.c tls_to_text: ``VERSION:CIPHER:BITS``, what follows ``smtp tls ciphers=``."""
    name, _protocol, bits = ssl_object.cipher()
    return f"{ssl_object.version()}:{name}:{bits}"


def received_clause(ssl_object, *, received_auth: bool = False, user: str = "") -> str:
    """The TLS part of the Received header (smtp_session.c smtp_message_begin):
    ``(VERSION:CIPHER:BITS:YES|NO)``, YES when the client's certificate was verified;
    with the listener's ``received-auth``, `` auth=yes user=NAME`` or `` auth=no``.
    The session writes it after ``id XXXXXXXX`` with a space before it."""
    verified = "YES" if ssl_object.getpeercert() else "NO"
    clause = f"({tls_log_text(ssl_object)}:{verified})"
    if received_auth:
        clause += f" auth=yes user={user}" if user else " auth=no"
    return clause


# --- outbound: the client contexts of relay actions (mta.c mta_setup_dispatcher) ------------

_system_ca: str | None = None


def system_ca_data() -> str:
    """The system's trusted CAs as PEM text, read once: pony reads them before it is
    chrooted (an OpenSSL CA directory is read lazily, at each verification, which a
    chroot would break), so they are loaded from the bundle file into memory."""
    global _system_ca
    if _system_ca is None:
        paths = ssl.get_default_verify_paths()
        _system_ca = ""
        for path in (os.environ.get(paths.openssl_cafile_env), paths.cafile, paths.openssl_cafile):
            if path and os.path.isfile(path):
                with open(path, "rb") as f:
                    _system_ca = f.read().decode("ascii", "replace")
                break
    return _system_ca


def client_context(config: Config, action, verify: bool,
                   files: dict[str, bytes]) -> ssl.SSLContext:
    """A relay action's client context: its ``protocols`` and ``ciphers`` (else the
    ``smtp ciphers`` default), its ``pki`` as client certificate, and when ``verify``
    the server's certificate and name checked against its ``ca`` or the system's CAs;
    without ``verify`` (opportunistic TLS, ``tls no-verify``) any certificate is taken."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.options |= ssl.OP_NO_COMPRESSION
    _set_protocols_and_ciphers(ctx, action.relay_protocols, action.relay_ciphers or config.tls_ciphers)
    if action.relay_pki:
        pki = config.pki[action.relay_pki]
        _load_chain(ctx, files[pki.cert], files[pki.key])
    if verify:
        cadata = (files[config.ca[action.relay_ca].cert].decode("ascii", "replace")
                  if action.relay_ca else system_ca_data())
        if cadata:
            ctx.load_verify_locations(cadata=cadata)
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.check_hostname = True
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_contexts(config: Config, files: dict[str, bytes] | None = None
                    ) -> dict[tuple[str, bool], ssl.SSLContext]:
    """{(action name, verify): context} for every relay action, built while the files
    can be read (``files``: their contents, as for ``server_context``)."""
    relays = [a for a in config.actions.values() if a.method == "relay"]
    if not relays:
        return {}
    if files is None:
        files = read_tls_files(config)
    system_ca_data()
    return {(a.name, verify): client_context(config, a, verify, files)
            for a in relays for verify in (False, True)}


def peer_certificate_text(ssl_object) -> str:
    """mta_session.c mta_tls_started: the ``fingerprint="SHA256:..."`` of the server's
    certificate, "" when it showed none."""
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return ""
    return "SHA256:" + hashlib.sha256(der).hexdigest()
