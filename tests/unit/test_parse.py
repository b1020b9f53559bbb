"""smtpd.conf grammar: what parses into the model, and what each error says."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from smtpd.config import ConfigError, check_config
from smtpd.parse import parse_config
from smtpd.ruleset import MatchContext, TableSet, match

REPO = Path(__file__).resolve().parents[2]


def conf(tmp_path: Path, text: str, name: str = "smtpd.conf") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        parse_config(conf(tmp_path, text))
    return err.value


BASE = """\
# comment
port = "2525"
listen on 127.0.0.1 port $port hostname mx.example.test
table users { alice = "1000:1000:/home/alice", "bob" => "1001:1001:/home/bob" }
table domains { example.test, "other.test" }
action "local" maildir "~/Maildir" userbase <users>
action out relay host smtp://127.0.0.1:2526
smtp max-message-size 10M
match from any for domain <domains> action local
match from local for any action out
match from src { 192.0.2.0/24 } for rcpt-to "x@y.test" reject
"""


def test_full_config_model(tmp_path):
    c = parse_config(conf(tmp_path, BASE))
    lis = c.listeners[0]
    assert (lis.address, lis.port, lis.hostname, lis.lineno) == ("127.0.0.1", 2525, "mx.example.test", 3)
    assert c.tables["users"].values == {"alice": "1000:1000:/home/alice", "bob": "1001:1001:/home/bob"}
    assert c.tables["domains"].values == ["example.test", "other.test"]
    assert c.actions["local"].method == "maildir" and c.actions["local"].target == "~/Maildir"
    assert c.actions["local"].userbase == "users"
    assert c.actions["out"].host == "smtp://127.0.0.1:2526"
    assert c.max_message_size == 10 * 1024 * 1024
    assert [r.action for r in c.rules] == ["local", "out", None] and c.rules[2].reject
    assert all(type(v) is str for v in c.tables["domains"].values)   # plain str, not tokens


def test_rules_match_in_order(tmp_path):
    c = parse_config(conf(tmp_path, BASE))
    tables = TableSet(c)

    def rule_for(source: str, rcpt: str):
        ctx = MatchContext(source=source, rdns=None, helo="client.test", mail_from="s@a.test",
                           rcpt=rcpt, tag=None, auth_user=None, tls=False, local_listener=False)
        rule = match(c, tables, ctx)
        return None if rule is None else (rule.action, rule.reject)

    assert rule_for("198.51.100.7", "bob@example.test") == ("local", False)
    assert rule_for("198.51.100.7", "bob@OTHER.test") == ("local", False)
    assert rule_for("198.51.100.7", "bob@elsewhere.test") is None      # no open relay
    assert rule_for("127.0.0.1", "bob@elsewhere.test") == ("out", False)
    assert rule_for("local", "x@y.test") == ("out", False)


def test_match_defaults_to_from_local_for_local(tmp_path):
    c = parse_config(conf(tmp_path, 'action a maildir\nmatch action a\n'))
    assert [(x.kind, x.what) for x in c.rules[0].conditions] == [("from", "local"), ("for", "local")]


def test_include_and_table_file(tmp_path):
    (tmp_path / "aliases").write_text("# aliases\nroot: alice\npostmaster:   root\n")
    (tmp_path / "domains").write_text("example.test\nother.test\n")
    conf(tmp_path, f'table aliases file:{tmp_path}/aliases\n', "tables.conf")
    c = parse_config(conf(tmp_path, f'include "{tmp_path}/tables.conf"\n'
                                    f'table domains file:{tmp_path}/domains\n'
                                    'action a maildir alias <aliases>\n'
                                    'match for domain <domains> action a\n'))
    assert c.tables["aliases"].values == {"root": "alice", "postmaster": "root"}
    assert c.tables["domains"].values == ["example.test", "other.test"]


def test_continuation_lines_and_command_line_macros(tmp_path):
    c = parse_config(conf(tmp_path, 'p = 25\nlisten on 127.0.0.1 \\\n  port $p\naction a maildir\nmatch action a\n'),
                     macros={"p": "2600"})
    assert c.listeners[0].port == 2600


@pytest.mark.parametrize("text, line, words", [
    ("listen on 127.0.0.1 prot 25\naction a maildir\nmatch action a\n", 1, ['unexpected "prot"', "port"]),
    ("action a maildir\nfrobnicate yes\nmatch action a\n", 2, ['unexpected "frobnicate"', "expected one of"]),
    ("action a maildir\nmatch for domain <nope> action a\n", 2, ["undefined table: <nope>"]),
    ("action a maildir\nmatch from any action b\n", 2, ['undefined action "b"']),
    ("action a maildir\naction a maildir\nmatch action a\n", 2, ['action "a" already defined']),
    ("listen on 127.0.0.1 port 99999\n", 1, ["port"]),
    ("smtp max-message-size lots\n", 1, ["size"]),
    ("action a maildir\nmatch from any for any\n", 2, ["unexpected end of line", "action"]),
    ("action a maildir\nmatch action a $undefined\n", 2, ["macro 'undefined' not defined"]),
    ("accept from any for domain example.org deliver to mbox\n", 1, ["accept", "pre-6.4"]),
    ("action a maildir\nmatch from any for any action a\ntable t { a, b = c }\n", 3, ["either a list or a mapping"]),
])
def test_errors_name_the_line_and_what_was_expected(tmp_path, text, line, words):
    err = error(tmp_path, text)
    assert err.line == line, str(err)
    assert str(err).startswith(f"{tmp_path}/smtpd.conf:{line}: ")
    for w in words:
        assert w in str(err), str(err)


def test_no_rules_is_an_error(tmp_path):
    assert "no rules" in str(error(tmp_path, "listen on 127.0.0.1\n"))


def test_missing_table_file_and_include(tmp_path):
    assert "No such file" in str(error(tmp_path, "table t file:/nonexistent/aliases\n"))
    assert "nonexistent" in str(error(tmp_path, 'include "/nonexistent/x.conf"\n'))


def test_unknown_interface_is_reported_by_the_check(tmp_path):
    c = parse_config(conf(tmp_path, "listen on nosuchif0\naction a maildir\nmatch action a\n"))
    with pytest.raises(ConfigError) as err:
        check_config(c)
    assert err.value.line == 1 and "invalid virtual ip or interface: nosuchif0" in str(err.value)


def test_smtpd_n_checks_a_file(tmp_path):
    good = conf(tmp_path, BASE, "good.conf")
    bad = conf(tmp_path, "action a maildir\nmatch frm any action a\n", "bad.conf")
    run = [sys.executable, "-m", "smtpd", "-n", "-f"]
    ok = subprocess.run(run + [str(good)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "configuration OK" in ok.stdout + ok.stderr
    ko = subprocess.run(run + [str(bad)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert ko.returncode != 0 and f"{bad}:2: " in ko.stderr and '"frm"' in ko.stderr


def test_features_of_later_issues_are_reported_not_silently_ignored(tmp_path):
    c = parse_config(conf(tmp_path, 'filter f proc-exec "/bin/true"\n'
                                    "listen on 127.0.0.1 mask-src filter f\n"
                                    "action a forward-only\naction r relay srs\n"
                                    "match from any for any action r\n"))
    assert c.not_applied == [
        f'{tmp_path}/smtpd.conf:4: relay option "srs" is accepted but not applied yet',
    ]
    assert parse_config(conf(tmp_path, BASE)).not_applied == []


def test_queue_ttl_action_ttl_and_warn_intervals_are_applied(tmp_path):
    c = parse_config(conf(tmp_path, "queue ttl 2d\nbounce warn-interval 1h, 6h\n"
                                    'action r relay host "smtp://127.0.0.1:25" ttl 30m\n'
                                    "match from any for any action r\n"))
    assert (c.queue_ttl, c.bounce_warn_interval, c.actions["r"].ttl) == (2 * 86400, [3600, 6 * 3600], 1800)
    assert c.not_applied == []


# --- TLS and AUTH (issue 8) ---------------------------------------------------------------------

PKI = 'pki mx.example.test cert "/c.pem"\npki MX.example.test key "/k.pem"\npki mx.example.test dhe auto\n'
RULES = "action a maildir\nmatch for local action a\n"


def test_tls_and_auth_listen_options_in_the_model(tmp_path):
    c = parse_config(conf(tmp_path, PKI + 'pki "*" cert "/c2.pem" key "/k2.pem"\n'
                                          "ca clients cert /ca.pem\n"
                                          "table creds { alice = x }\ntable senders { alice = alice@x.test }\n"
                                          "listen on 127.0.0.1 port 2587 tls-require verify pki mx.example.test "
                                          'pki "*" ca clients auth <creds> senders <senders> masquerade '
                                          'hostname mx.example.test ciphers HIGH protocols "tlsv1.2,tlsv1.3" '
                                          "received-auth mask-src no-dsn\n"
                                          "listen on 127.0.0.1 smtps pki mx.example.test auth-optional proxy-v2\n"
                                          "listen on 127.0.0.1 port 2525 tls pki mx.example.test\n"
                                          "smtp ciphers compat\n" + RULES))
    assert c.pki["mx.example.test"].cert == "/c.pem" and c.pki["mx.example.test"].key == "/k.pem"
    assert c.pki["mx.example.test"].dhe == "auto" and c.pki["*"].key == "/k2.pem"
    assert c.ca["clients"].cert == "/ca.pem" and c.tls_ciphers == "compat"
    sub, smtps, starttls = c.listeners
    assert (sub.tls, sub.tls_verify, sub.pki, sub.ca) == ("require", True, ["mx.example.test", "*"], "clients")
    assert (sub.auth, sub.auth_table, sub.senders, sub.masquerade) == ("required", "creds", "senders", True)
    assert (sub.ciphers, sub.protocols, sub.hostname) == ("HIGH", "tlsv1.2,tlsv1.3", "mx.example.test")
    assert (sub.received_auth, sub.mask_src, sub.no_dsn, sub.proxy_v2) == (True, True, True, False)
    assert (smtps.tls, smtps.port, smtps.auth, smtps.auth_table, smtps.proxy_v2) == ("smtps", 465, "optional", None, True)
    assert (starttls.tls, starttls.port, starttls.auth, starttls.tls_verify) == ("starttls", 2525, "", False)
    assert c.not_applied == []


@pytest.mark.parametrize("text, line, message", [
    ("listen on 127.0.0.1 auth\n", 4, "invalid listen option: auth requires tls/smtps"),
    ("listen on 127.0.0.1 pki mx.example.test\n", 4, "invalid listen option: pki requires tls/smtps"),
    ("listen on 127.0.0.1 tls\n", 4, "invalid listen option: pki required for tls/smtps"),
    ("listen on 127.0.0.1 smtps pki nope.example.test\n", 4, "pki name not found: nope.example.test"),
    ("listen on 127.0.0.1 tls pki mx.example.test ca nope\n", 4, "ca name not found: nope"),
    ("listen on 127.0.0.1 tls smtps pki mx.example.test\n", 4, "TLS mode already specified"),
    ("listen on 127.0.0.1 tls pki mx.example.test auth auth-optional\n", 4, "auth already specified"),
    ("listen on 127.0.0.1 tls pki mx.example.test ciphers A ciphers B\n", 4, "ciphers already specified"),
    ("listen on 127.0.0.1 tls pki mx.example.test proxy-v2 proxy-v2\n", 4, "proxy-v2 already specified"),
    ("listen on 127.0.0.1 tls pki mx.example.test senders { a, b }\n", 4,
     'invalid use of table "anon:4:1" as SENDERS parameter'),
    ("listen on socket auth\n", 4, "need a TCP listener"),
    ("pki mx.example.test dhe strong\n", 4, "invalid DHE keyword: strong"),
    ("pki bad_name! cert /c.pem\n", 4, "not a valid domain name: bad_name!"),
    ("pki mx.example.test certificate /c.pem\n", 4, 'unexpected "certificate", expected "cert"'),
    ("ca x.test key /k.pem\n", 4, 'unexpected "key", expected "cert"'),
    ("table m { a = b }\nmatch from auth <m> for any action a\n", 5,
     'table "m" may not be used for from lookups'),
    ("table m { a = b }\nmatch from any auth regex <m> for any action a\n", 5,
     'table "m" may not be used for auth lookups'),
    ("match from auth auth for any action a\n", 4, "auth already specified for this rule"),
])
def test_tls_and_auth_errors_name_the_line(tmp_path, text, line, message):
    err = error(tmp_path, PKI + text + RULES)
    assert err.line == line and message in err.message, str(err)


def test_auth_rules_parse_into_conditions(tmp_path):
    c = parse_config(conf(tmp_path, "table users { alice, bob }\naction a maildir\n"
                                    "match from any auth <users> for any action a\n"
                                    "match from auth for any action a\n"
                                    "match !from auth for any reject\n"
                                    "match from any auth regex { '^a' } for any action a\n"))
    kinds = [[(x.kind, x.what, x.table, x.negate, x.regex) for x in r.conditions] for r in c.rules]
    assert kinds[0][1] == ("auth", "auth", "users", False, False)
    assert kinds[1][0] == ("from", "auth", None, False, False)
    assert kinds[2][0] == ("from", "auth", None, True, False)
    assert kinds[3][1][:2] == ("auth", "auth") and kinds[3][1][4] is True
