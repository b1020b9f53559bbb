"""AUTH pieces (smtpd/auth.py) and the rules that depend on AUTH (smtpd/ruleset.py)."""
from __future__ import annotations

import base64
import io
import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtpctl.local_commands import encrypt
from smtpd import auth
from smtpd.auth import AuthSyntaxError
from smtpd.config import ConfigError
from smtpd.parse import parse_config
from smtpd.ruleset import MatchContext, TableSet, match


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- PLAIN / LOGIN ------------------------------------------------------------------------------

def test_plain_gives_user_and_password_and_ignores_authzid():
    assert auth.decode_plain(b64(b"\0alice\0s3cret")) == ("alice", "s3cret")
    assert auth.decode_plain(b64(b"admin\0alice\0s3cret")) == ("alice", "s3cret")
    assert auth.decode_plain(b64("\0jos\u00e9\0p\u00e4ss".encode())) == ("jos\u00e9", "p\u00e4ss")


@pytest.mark.parametrize("raw", [
    b"alice\0s3cret",            # one NUL: no authzid field
    b"\0\0s3cret",               # empty user
    b"\0alice\0",                # empty password
    b"\0al\rice\0pw",            # CR in user
    b"\0alice\0p\nw",            # LF in password
    b"\0alice\0\xff\xfe",        # password not UTF-8
    b"\0" + b"u" * 300 + b"\0pw",
    b"\0alice\0" + b"p" * 1100,  # over OpenSMTPD's buffer
])
def test_plain_refuses_malformed_responses(raw):
    with pytest.raises(AuthSyntaxError):
        auth.decode_plain(b64(raw))


@pytest.mark.parametrize("text", ["not base64!", "YWxpY2U", "*"])
def test_plain_refuses_what_is_not_base64(text):
    with pytest.raises(AuthSyntaxError):
        auth.decode_plain(text)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(max_size=200), st.binary(max_size=1200).map(b64)))
def test_arbitrary_responses_decode_or_are_syntax_errors(text):
    for decode in (auth.decode_plain, auth.decode_login_user, auth.decode_login_password):
        try:
            result = decode(text)
        except AuthSyntaxError:
            continue
        for value in (result if isinstance(result, tuple) else (result,)):
            assert isinstance(value, str) and "\r" not in value and "\n" not in value


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0\r\n"),
               min_size=1, max_size=60),
       st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0\r\n"),
               min_size=1, max_size=60),
       st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=20))
def test_plain_round_trip(user, password, authzid):
    raw = f"{authzid}\0{user}\0{password}".encode()
    if len(user.encode()) <= auth.USERNAME_MAX and len(raw) <= auth.PLAIN_MAX:
        assert auth.decode_plain(b64(raw)) == (user, password)


def test_login_fields_and_prompts():
    assert base64.b64decode(auth.LOGIN_USER_PROMPT) == b"Username:"
    assert base64.b64decode(auth.LOGIN_PASSWORD_PROMPT) == b"Password:"
    assert auth.decode_login_user(b64(b"alice")) == "alice"
    assert auth.decode_login_password(b64(b"s3cret")) == "s3cret"
    with pytest.raises(AuthSyntaxError):
        auth.decode_login_user(b64(b"ali\r\nce"))
    with pytest.raises(AuthSyntaxError):
        auth.decode_login_password("%%%")


def test_failure_delay_is_random_under_a_second():
    import random
    delays = [auth.failure_delay(random.Random(seed)) for seed in range(50)]
    assert all(0.0 <= d < auth.AUTH_FAILURE_DELAY_MAX for d in delays)
    assert len(set(delays)) == len(delays)


# --- hashes ------------------------------------------------------------------------------------

def smtpctl_encrypt(password: str) -> str:
    out = io.StringIO()
    encrypt(password, io.StringIO(), out)
    return out.getvalue().strip()


def openssl_passwd(scheme: str, password: str) -> str:
    return subprocess.run(["openssl", "passwd", f"-{scheme}", password], capture_output=True,
                          text=True, check=True, timeout=30).stdout.strip()


def test_smtpctl_encrypt_output_is_accepted():
    stored = smtpctl_encrypt("correct horse")
    assert stored.startswith("$2b$")
    assert auth.check_password("correct horse", stored)
    assert not auth.check_password("correct hors", stored)
    assert not auth.check_password("", stored)


@pytest.mark.parametrize("scheme", ["6", "5", "1"])
def test_crypt_formats_made_by_another_implementation(scheme):
    assert auth.load_libcrypt()
    stored = openssl_passwd(scheme, "p\u00e4ssword")
    assert stored.startswith(f"${scheme}$")
    assert auth.check_password("p\u00e4ssword", stored)
    assert not auth.check_password("passwor", stored)


@pytest.mark.parametrize("stored", ["", "*", "!", "!$6$abc$def", "*LK*", "$2b$garbage", "$9$x$y"])
def test_locked_empty_and_malformed_hashes_never_match(stored):
    assert not auth.check_password("", stored)
    assert not auth.check_password("anything", stored)


# --- credentials tables -----------------------------------------------------------------------------

CONF = """\
pki mx.example.test cert "/nonexistent/c.pem"
pki mx.example.test key "/nonexistent/k.pem"
table creds {{ alice = "{alice}", bob = "bob:{bob}", short = "ab", "half" = ":x" }}
table senders {{ alice = "alice@example.test, @team.example.test, alias+news", bob = "bob" }}
table admins {{ alice }}
listen on 127.0.0.1 port 2587 tls-require pki mx.example.test auth <creds> senders <senders>
listen on 127.0.0.1 port 2465 smtps pki mx.example.test auth-optional
action out relay host smtp://127.0.0.1:2526
action local maildir
match from any auth <admins> for any action out
match from any for domain "example.test" action local
match from any auth for any action out
"""


@pytest.fixture()
def creds_config(tmp_path):
    path = tmp_path / "smtpd.conf"
    path.write_text(CONF.format(alice=smtpctl_encrypt("alice-pw"), bob=openssl_passwd("6", "bob-pw")))
    return parse_config(path)


def test_table_authentication_results(creds_config):
    table = TableSet(creds_config).get("creds")
    assert auth.authenticate_with_table(table, "alice", "alice-pw") == "ok"
    assert auth.authenticate_with_table(table, "bob", "bob-pw") == "ok"        # user:hash form
    assert auth.authenticate_with_table(table, "alice", "bob-pw") == "permfail"
    assert auth.authenticate_with_table(table, "carol", "alice-pw") == "permfail"
    assert auth.authenticate_with_table(table, "short", "ab") == "tempfail"    # table.c: < 3
    assert auth.authenticate_with_table(table, "half", "x") == "tempfail"


def test_listener_auth_and_senders_in_the_model(creds_config):
    submission, smtps = creds_config.listeners
    assert (submission.tls, submission.auth, submission.auth_table, submission.senders) == \
        ("require", "required", "creds", "senders")
    assert (smtps.tls, smtps.port, smtps.auth, smtps.auth_table) == ("smtps", 2465, "optional", None)


@pytest.mark.parametrize("user, sender, result", [
    ("alice", "alice@example.test", "ok"),
    ("alice", "ALICE@Example.TEST", "ok"),
    ("alice", "alice+tag@example.test", "ok"),       # the table's entry has no tag
    ("alice", "anyone@team.example.test", "ok"),
    ("alice", "alias+news@elsewhere.test", "ok"),
    ("alice", "alias@elsewhere.test", "permfail"),   # the entry's tag must be there
    ("alice", "mallory@example.test", "permfail"),
    ("alice", "", "permfail"),
    ("bob", "bob@anywhere.test", "ok"),
    ("carol", "carol@example.test", "permfail"),
])
def test_senders(creds_config, user, sender, result):
    table = TableSet(creds_config).get("senders")
    assert auth.sender_allowed(table, user, sender) == result


# --- rules that need AUTH -------------------------------------------------------------------------

def rule_for(config, rcpt: str, user: str | None, source: str = "203.0.113.9"):
    ctx = MatchContext(source=source, rdns=None, helo="client.test", mail_from="s@a.test",
                       rcpt=rcpt, tag=None, auth_user=user, tls=True, local_listener=False)
    rule = match(config, TableSet(config), ctx)
    return None if rule is None else rule.action


def test_relay_rule_that_needs_auth_refuses_unauthenticated_relaying(creds_config):
    # no rule matches: lka answers 550 Invalid recipient
    assert rule_for(creds_config, "victim@elsewhere.test", None) is None
    assert rule_for(creds_config, "victim@elsewhere.test", "bob") == "out"           # match auth
    assert rule_for(creds_config, "victim@elsewhere.test", "alice") == "out"         # from auth <admins>
    assert rule_for(creds_config, "u@example.test", None) == "local"


def test_from_auth_table_limits_to_listed_users(tmp_path):
    path = tmp_path / "smtpd.conf"
    path.write_text("table admins { alice, root@example.test }\naction out relay\n"
                    "match from auth <admins> for any action out\n"
                    "match !from auth for any reject\n")
    config = parse_config(path)
    assert rule_for(config, "x@y.test", "alice") == "out"
    assert rule_for(config, "x@y.test", "root@example.test") == "out"      # as an address
    assert rule_for(config, "x@y.test", "bob") is None
    rules = config.rules
    assert rules[1].reject and rules[1].conditions[0].negate


def test_system_accounts_need_a_privileged_daemon(creds_config):
    auth.check_system_accounts(creds_config, privileged=True)
    with pytest.raises(ConfigError) as err:
        auth.check_system_accounts(creds_config, privileged=False)
    assert err.value.line == 7 and "credentials table" in err.value.message


def test_system_account_lookup():
    if os.geteuid() != 0:
        # the shadow file is root's: an unprivileged daemon cannot decide
        assert auth.authenticate_system("no-such-user-pysmtpd", "x") == "tempfail"
        return
    assert auth.authenticate_system("no-such-user-pysmtpd", "x") == "permfail"
    assert auth.authenticate_system("", "x") == "permfail"
    for line in Path("/etc/shadow").read_text().splitlines():
        name, stored = line.split(":")[:2]
        assert auth.system_password_hash(name) == stored


@pytest.mark.skipif(os.geteuid() != 0, reason="creates a system account; CI runs as root")
def test_system_account_password_checked_through_the_shadow_file():
    """A throwaway account with a password set by chpasswd (the system's default hash,
    yescrypt on current Debian): the parent's check says ok for it and only for it."""
    user = f"pysmtpd-auth-{os.getpid()}"
    subprocess.run(["useradd", "-M", "-d", "/nonexistent", "-s", "/usr/sbin/nologin", user],
                   check=True, capture_output=True, timeout=30)
    try:
        subprocess.run(["chpasswd"], input=f"{user}:Tr0ub4dor&3\n", text=True, check=True,
                       capture_output=True, timeout=30)
        assert auth.system_password_hash(user).startswith("$")
        assert auth.authenticate_system(user, "Tr0ub4dor&3") == "ok"
        assert auth.authenticate_system(user, "Tr0ub4dor&4") == "permfail"
    finally:
        subprocess.run(["userdel", user], capture_output=True, timeout=30)
