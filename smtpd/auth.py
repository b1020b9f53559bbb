"""SMTP AUTH: decoding PLAIN and LOGIN, checking passwords against credentials tables or
the system's accounts, and the ``senders`` check (OpenSMTPD's smtp_session.c
smtp_rfc4954_auth_*, lka.c lka_authenticate/lka_mailaddrmap, table.c K_CREDENTIALS,
util.c mailaddr_match, and the crypt_checkpass of openbsd-compat).

The decoders are pure: the session core calls them on the client's base64 and gets
the user and password, or ``AuthSyntaxError`` (OpenSMTPD answers ``501 5.5.2
Syntax error``).  Password checks are lka's for tables and the parent's for the
system's accounts (only root can read the shadow file); both run them in a thread,
as bcrypt and crypt(3) take tens of milliseconds by design.

Hashes accepted: bcrypt (``$2a$``, ``$2b$``, ``$2y$``; ``smtpctl encrypt`` writes
``$2b$``) through the bcrypt package, and whatever the system's crypt(3) knows
(``$6$``, ``$5$``, ``$1$``, yescrypt ``$y$``...) through libcrypt, loaded once by
``load_libcrypt`` while the process is still privileged.  The comparison of the
computed hash with the stored one is constant-time.
"""
from __future__ import annotations

import base64
import binascii
import ctypes
import ctypes.util
import fnmatch
import hmac
import os
import pwd
import random
import threading
from dataclasses import dataclass

import bcrypt

from smtpd.config import ConfigError
from smtpd.table import TableUnavailable

# smtp_session.c: the PLAIN buffer is 1024 bytes with a NUL kept; a user name must
# fit s->username (SMTPD_MAXMAILADDRSIZE); LOGIN's password buffer is LINE_MAX.
PLAIN_MAX = 1023
USERNAME_MAX = 254
PASSWORD_MAX = 2047
BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")


class AuthSyntaxError(ValueError):
    """The client's AUTH data is not what the mechanism defines: 501."""


# --- PLAIN and LOGIN (RFC 4616, the LOGIN draft) --------------------------------------------

def _b64(text: str, limit: int) -> bytes:
    try:
        data = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise AuthSyntaxError("not base64") from None
    if len(data) > limit:
        raise AuthSyntaxError("too long")
    return data


def _text(data: bytes, what: str) -> str:
    if b"\r" in data or b"\n" in data:
        raise AuthSyntaxError(f"CR or LF in the {what}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        # The IPC contract carries text: a password that is not UTF-8 could not have
        # been made by smtpctl encrypt either.
        raise AuthSyntaxError(f"{what} is not UTF-8") from None


def decode_plain(response: str) -> tuple[str, str]:
    """``base64(authzid NUL user NUL password)`` -> (user, password).  The authzid is
    ignored, as OpenSMTPD ignores it (it never acts for another identity); user and
    password must not be empty, and end at the next NUL as C strings do."""
    data = _b64(response, PLAIN_MAX)
    parts = data.split(b"\0")
    if len(parts) < 3:
        raise AuthSyntaxError("expected authzid NUL user NUL password")
    user, password = parts[1], parts[2]
    if not user or not password:
        raise AuthSyntaxError("empty user or password")
    if len(user) > USERNAME_MAX:
        raise AuthSyntaxError("user name too long")
    return _text(user, "user name"), _text(password, "password")


def decode_login_user(response: str) -> str:
    """The answer to ``334 VXNlcm5hbWU6`` (or AUTH LOGIN's initial response)."""
    data = _b64(response, USERNAME_MAX).split(b"\0", 1)[0]
    return _text(data, "user name")


def decode_login_password(response: str) -> str:
    """The answer to ``334 UGFzc3dvcmQ6``."""
    data = _b64(response, PASSWORD_MAX).split(b"\0", 1)[0]
    return _text(data, "password")


# Prompts of AUTH LOGIN, base64 as they go on the wire ("Username:", "Password:")
LOGIN_USER_PROMPT = "VXNlcm5hbWU6"
LOGIN_PASSWORD_PROMPT = "UGFzc3dvcmQ6"

# smtp_auth_failure_pause: a failed AUTH is answered after a random pause under a second,
# so a client cannot tell from the timing why it failed, nor try passwords at full speed.
AUTH_FAILURE_DELAY_MAX = 1.0
_SYSTEM_RANDOM = random.SystemRandom()


def failure_delay(rng: random.Random = _SYSTEM_RANDOM) -> float:
    """Seconds to wait before ``535 Authentication failed`` (the session's clock)."""
    return rng.uniform(0.0, AUTH_FAILURE_DELAY_MAX)


# --- hashes ---------------------------------------------------------------------------------

class _Libcrypt:
    """crypt(3) from libcrypt (libxcrypt on Linux): crypt_rn when it is there (thread-safe,
    its own buffer), else crypt under a lock."""

    DATA_SIZE = 65536            # > libxcrypt's struct crypt_data (32768)

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lock = threading.Lock()
        self.crypt_rn = getattr(lib, "crypt_rn", None)
        if self.crypt_rn is not None:
            self.crypt_rn.restype = ctypes.c_char_p
            self.crypt_rn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]
        self.crypt = lib.crypt
        self.crypt.restype = ctypes.c_char_p
        self.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]

    def hash(self, password: bytes, setting: bytes) -> bytes | None:
        if self.crypt_rn is not None:
            data = ctypes.create_string_buffer(self.DATA_SIZE)
            return self.crypt_rn(password, setting, data, self.DATA_SIZE)
        with self.lock:
            return self.crypt(password, setting)


_LIBCRYPT: _Libcrypt | None = None
_LIBCRYPT_LOADED = False


def load_libcrypt() -> bool:
    """Open libcrypt once (call it before chroot or dropping privileges); False when the
    system has none, and then only bcrypt hashes can be checked."""
    global _LIBCRYPT, _LIBCRYPT_LOADED
    if not _LIBCRYPT_LOADED:
        _LIBCRYPT_LOADED = True
        for name in (ctypes.util.find_library("crypt"), "libcrypt.so.1", "libcrypt.so.2"):
            if not name:
                continue
            try:
                _LIBCRYPT = _Libcrypt(ctypes.CDLL(name))
                break
            except (OSError, AttributeError):
                continue
    return _LIBCRYPT is not None


def check_password(password: str, stored_hash: str) -> bool:
    """Whether ``password`` hashes to ``stored_hash``.  A locked or empty hash (``*``,
    ``!...``, "") never matches: OpenSMTPD's empty-hash-empty-password case cannot
    arise, as credentials tables refuse values shorter than 3 characters."""
    pw = password.encode("utf-8")
    goal = stored_hash.encode("utf-8")
    if not goal or goal[:1] in (b"*", b"!") or b"\0" in pw:
        return False
    if stored_hash.startswith(BCRYPT_PREFIXES):
        if len(pw) > 72:
            # bcrypt ignores bytes after 72 (the library refuses them); smtpctl encrypt
            # refuses such passwords, so none can match.
            return False
        try:
            return bcrypt.checkpw(pw, goal)
        except ValueError:
            return False
    if not load_libcrypt():
        return False
    computed = _LIBCRYPT.hash(pw, goal)
    if not computed or computed.startswith(b"*"):
        return False
    return hmac.compare_digest(computed, goal)


# --- credentials tables (table.c K_CREDENTIALS) ------------------------------------------------

class CredentialsError(Exception):
    """A credentials entry that cannot be used (a temporary failure, as OpenSMTPD)."""


def credentials_hash(value: str | list[str] | None) -> str | None:
    """The password hash of a credentials table value: ``HASH`` or ``USER:HASH`` (the
    form relay credentials share), None when the user has no entry.  Raises
    CredentialsError on an entry table.c refuses (shorter than 3, or an empty side)."""
    if value is None:
        return None
    if isinstance(value, list):
        value = ",".join(value)
    value = value.strip()
    if len(value) < 3:
        raise CredentialsError("credentials entry too short")
    user, sep, secret = value.partition(":")
    if not sep:
        return value
    if not user or not secret:
        raise CredentialsError("credentials entry with an empty user or password")
    return secret


def authenticate_with_table(table, user: str, password: str) -> str:
    """lka_authenticate: "ok", "permfail" (no such user, wrong password) or "tempfail"
    (the table cannot answer, a malformed entry).  ``table`` is a ruleset table."""
    try:
        stored = credentials_hash(table.lookup_now("credentials", user))
    except (TableUnavailable, CredentialsError):
        return "tempfail"
    if stored is None:
        # Spend the time a real check costs, so that timing does not tell which users exist.
        check_password(password, _DUMMY_HASH)
        return "permfail"
    return "ok" if check_password(password, stored) else "permfail"


_DUMMY_HASH = "$2b$10$" + "x" * 53


# --- system accounts (the parent: auth_pwd / getspnam) ----------------------------------------

class _Spwd(ctypes.Structure):
    _fields_ = [("sp_namp", ctypes.c_char_p), ("sp_pwdp", ctypes.c_char_p)]


_getspnam = ctypes.CDLL(None).getspnam
_getspnam.restype = ctypes.POINTER(_Spwd)
_getspnam.argtypes = [ctypes.c_char_p]
_SHADOW_LOCK = threading.Lock()          # getspnam answers in a static buffer


def system_password_hash(user: str) -> str | None:
    """The account's hash from the shadow database (getspnam; the parent runs as root),
    else from the passwd entry, None when there is no such account."""
    try:
        pw = pwd.getpwnam(user)
    except (KeyError, ValueError):
        return None
    with _SHADOW_LOCK:
        entry = _getspnam(user.encode("utf-8"))
        stored = entry.contents.sp_pwdp if entry else None
    return stored.decode("utf-8", "replace") if stored is not None else pw.pw_passwd


def authenticate_system(user: str, password: str) -> str:
    """The parent's check of a system account: "ok" or "permfail"; "tempfail" in a
    daemon that is not root (the start refuses that configuration, but a reload may
    bring it), which cannot read the hashes."""
    if os.geteuid() != 0:
        return "tempfail"
    if not user or "\0" in user:
        return "permfail"
    stored = system_password_hash(user)
    if stored is None:
        check_password(password, _DUMMY_HASH)
        return "permfail"
    return "ok" if check_password(password, stored) else "permfail"


def check_system_accounts(config, privileged: bool) -> None:
    """A listener with ``auth`` and no credentials table authenticates the system's
    accounts, whose hashes only root can read: refuse to start otherwise."""
    for listener in config.listeners:
        if listener.auth and listener.auth_table is None and not privileged:
            raise ConfigError(listener.file, listener.lineno,
                              "auth without a credentials table checks the system's accounts, "
                              "which needs smtpd started as root: give a table "
                              "(listen on ... auth <table>) or start as root")


# --- senders (lka_mailaddrmap, mailaddr_match) ---------------------------------------------------

@dataclass(frozen=True)
class MailAddr:
    user: str
    domain: str

    @classmethod
    def parse(cls, text: str) -> "MailAddr":
        user, sep, domain = text.strip().strip("<>").rpartition("@")
        return cls(user, domain) if sep else cls(domain, "")


def _split_addresses(value: str) -> list[str]:
    """mailaddr_line: comma-separated, quotes and backslashes protect commas."""
    out, buf, quote, escape = [], [], "", False
    for ch in value:
        if escape:
            buf.append(ch)
            escape = False
        elif ch == "\\":
            escape = True
        elif ch == "," and not quote:
            out.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
            if ch in "\"'" and (not quote or quote == ch):
                quote = "" if quote else ch
    out.append("".join(buf))
    return [a.strip() for a in out if a.strip()]


def mailaddr_match(address: MailAddr, pattern: MailAddr, delimiter: str = "+") -> bool:
    """util.c mailaddr_match: an empty pattern matches all; ``@domain`` any user of the
    domain (``*`` wildcards); a user without a tag matches the address's tagged forms."""
    if not pattern.user and not pattern.domain:
        return True
    if pattern.domain and not fnmatch.fnmatchcase(address.domain.lower(), pattern.domain.lower()):
        return False
    if pattern.user:
        user = address.user
        if delimiter and delimiter not in pattern.user:
            user = user.split(delimiter, 1)[0]
        if user.lower() != pattern.user.lower():
            return False
    return True


def sender_allowed(table, user: str, sender: str, delimiter: str = "+") -> str:
    """lka_mailaddrmap: may the authenticated ``user`` send as ``sender``?  "ok",
    "permfail" (not listed) or "tempfail" (the table cannot answer)."""
    try:
        value = table.lookup_now("mailaddrmap", user)
    except TableUnavailable:
        return "tempfail"
    if value is None:
        return "permfail"
    text = value if isinstance(value, str) else ",".join(value)
    address = MailAddr.parse(sender)
    for entry in _split_addresses(text):
        if mailaddr_match(address, MailAddr.parse(entry), delimiter):
            return "ok"
    return "permfail"
