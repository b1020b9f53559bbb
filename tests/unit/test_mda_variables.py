"""Tests for smtpd.mda_variables (OpenSMTPD format specifiers)."""

from __future__ import annotations

import re

import pytest

from smtpd.mda_variables import FormatError, expand_format, sanitize

CTX = dict(
    sender="Alice.Smith@Sender.example",
    rcpt="Bob+Lists@Example.org",
    dest="bob@example.org",
    user="bob",
    home="/home/bob",
)


def ex(template: str, **over: object) -> str:
    kw = {**CTX, **over}
    return expand_format(template, **kw)  # type: ignore[arg-type]


# --- every specifier ----------------------------------------------------------------------------

@pytest.mark.parametrize("template, expected", [
    ("%{sender}", "Alice.Smith@Sender.example"),
    ("%{sender.user}", "Alice.Smith"),
    ("%{sender.domain}", "Sender.example"),
    ("%{rcpt}", "Bob+Lists@Example.org"),
    ("%{rcpt.user}", "Bob+Lists"),
    ("%{rcpt.domain}", "Example.org"),
    ("%{dest}", "bob@example.org"),
    ("%{dest.user}", "bob"),
    ("%{dest.domain}", "example.org"),
    ("%{user.username}", "bob"),
    ("%{user.directory}", "/home/bob"),
    ("%{mbox.from}", "Alice.Smith@Sender.example"),
])
def test_specifiers(template: str, expected: str) -> None:
    assert ex(template) == expected


def test_specifier_names_are_case_insensitive() -> None:
    assert ex("%{RCPT.User}") == "Bob+Lists"
    assert ex("%{Sender}") == CTX["sender"]


def test_null_sender() -> None:
    assert ex("%{sender}", sender="") == ""
    assert ex("%{sender.user}", sender="") == ""
    assert ex("%{sender.domain}", sender="") == ""
    assert ex("x%{sender}y", sender="") == "xy"
    assert ex("%{mbox.from}", sender="") == "MAILER-DAEMON"


def test_mda_specifier() -> None:
    cmd = "/usr/local/bin/procmail -f 'x y'"
    # %{mda} is our own already-expanded command: not sanitised.
    assert ex("/usr/bin/wrap -- %{mda}", mda=cmd) == f"/usr/bin/wrap -- {cmd}"


def test_mda_without_value_is_an_error() -> None:
    with pytest.raises(FormatError, match="mda"):
        ex("%{mda}")


def test_user_directory_not_sanitised() -> None:
    assert ex("%{user.directory}/Maildir", home="/home/o'brien") == "/home/o'brien/Maildir"


def test_address_split_uses_last_at() -> None:
    assert ex("%{rcpt.user}|%{rcpt.domain}", rcpt='a@b@c.org') == "a@b|c.org"


def test_literal_text_and_percent() -> None:
    assert ex("/var/mail/%{user.username}.box") == "/var/mail/bob.box"
    assert ex("100%% %{dest.user}") == "100% bob"
    assert ex("50% off") == "50% off"
    assert ex("end%") == "end%"
    assert ex("sh -c '{ cat; }'") == "sh -c '{ cat; }'"
    assert ex("") == ""


def test_multiple_tokens() -> None:
    assert (ex("/var/vmail/%{dest.domain}/%{dest.user}/Maildir")
            == "/var/vmail/example.org/bob/Maildir")


# --- slices (smtpd.conf(5) examples: inclusive end offsets) ---------------------------------------

@pytest.mark.parametrize("spec, expected", [
    ("[0]", "e"),
    ("[1]", "x"),
    ("[8:]", "org"),
    ("[-3:]", "org"),
    ("[0:6]", "example"),
    ("[0:-4]", "example"),
    ("[:6]", "example"),
    ("[:]", "example.org"),
    ("[2:4]", "amp"),
    ("[-1]", "g"),
    ("[-3]", "o"),
    ("[0:100]", "example.org"),
    ("[10]", "g"),
    ("[-11:]", "example.org"),
])
def test_slices(spec: str, expected: str) -> None:
    assert ex("%{dest.domain" + spec + "}") == expected


@pytest.mark.parametrize("spec", ["[11]", "[20:]", "[-12:]", "[-12]", "[5:2]", "[0:-12]",
                                  "[a]", "[1:b]", "[]", "[1.5]", "[ ]", "[1:2:3]"])
def test_bad_slices(spec: str) -> None:
    with pytest.raises(FormatError):
        ex("%{dest.domain" + spec + "}")


def test_slice_of_empty_value_is_empty() -> None:
    assert ex("%{sender[3:5]}", sender="") == ""
    assert ex("%{sender[0]}", sender="") == ""


def test_slice_with_modifier() -> None:
    assert ex("%{rcpt.user[0]:lowercase}") == "b"
    assert ex("%{rcpt.domain[-3:]:uppercase}") == "ORG"
    # Modifiers apply before the slice (OpenSMTPD order): strip first, then take 3 chars.
    assert ex("%{rcpt[0:4]:strip}") == "Bob@E"


# --- modifiers -------------------------------------------------------------------------------

def test_lowercase_uppercase() -> None:
    assert ex("%{rcpt:lowercase}") == "bob+lists@example.org"
    assert ex("%{rcpt:uppercase}") == "BOB+LISTS@EXAMPLE.ORG"
    assert ex("%{rcpt.user:LOWERCASE}") == "bob+lists"


def test_strip() -> None:
    assert ex("%{rcpt:strip}") == "Bob@Example.org"
    assert ex("%{rcpt.user:strip}") == "Bob"
    assert ex("%{dest:strip}") == "bob@example.org"  # no tag: unchanged
    assert ex("%{rcpt.user:strip}", rcpt="a+b+c@x") == "a"


def test_strip_custom_delimiter() -> None:
    kw = dict(rcpt="bob-lists@example.org")
    assert ex("%{rcpt:strip}", sub_addr_delim="-", **kw) == "bob@example.org"
    assert ex("%{rcpt:strip}", **kw) == "bob-lists@example.org"


def test_empty_delimiter_rejected() -> None:
    with pytest.raises(ValueError):
        ex("%{rcpt}", sub_addr_delim="")


def test_chained_modifiers() -> None:
    assert ex("%{rcpt:lowercase|strip}") == "bob@example.org"
    assert ex("%{rcpt:strip:uppercase}") == "BOB@EXAMPLE.ORG"


def test_unknown_modifier() -> None:
    with pytest.raises(FormatError, match="modifier"):
        ex("%{rcpt:shout}")
    with pytest.raises(FormatError):
        ex("%{rcpt:}")
    with pytest.raises(FormatError):
        ex("%{rcpt:lowercase|}")


# --- sanitising --------------------------------------------------------------------------------

SAFE = re.compile(r"[A-Za-z0-9@._+=,:-]*")

HOSTILE = [
    "x;rm -rf /@evil.example",
    "../../etc/passwd@evil.example",
    "`id`@evil.example",
    "$(reboot)@evil.example",
    "a\nb@evil.example",
    "a\r\nX-Evil: 1@evil.example",
    "a|b&c>d<e@evil.example",
    "'quote\"d\\@evil.example",
    "~root@evil.example",
    "a b\tc@evil.example",
    "a*b?c[d]{e}!#%^@evil.example",
    "é@evil.example",
    "a\0b@evil.example",
]


@pytest.mark.parametrize("hostile", HOSTILE)
@pytest.mark.parametrize("token", ["sender", "sender.user", "rcpt", "rcpt.user", "dest",
                                   "dest.user", "mbox.from"])
def test_hostile_values_are_sanitised(hostile: str, token: str) -> None:
    out = ex("%{" + token + "}", sender=hostile, rcpt=hostile, dest=hostile)
    assert SAFE.fullmatch(out), out
    assert ".." not in out
    assert not out.startswith(".")
    assert "/" not in out


def test_sanitise_exact_replacements() -> None:
    assert ex("%{sender.user}", sender=";rm -rf /@x") == ":rm:-rf::"
    assert ex("%{sender.user}", sender="../../etc@x") == "::::::etc"
    assert ex("%{sender.user}", sender="`id`@x") == ":id:"
    assert ex("%{sender.user}", sender="$(id)@x") == "::id:"
    assert ex("%{sender.user}", sender="a\nb@x") == "a:b"
    # Length is preserved (one ':' per bad character).
    assert len(ex("%{sender.user}", sender="a\r\nb@x")) == 4


def test_sanitise_keeps_normal_addresses() -> None:
    addr = "first.last+tag=x,y-z_9@sub.example-domain.org"
    assert ex("%{rcpt}", rcpt=addr) == addr


def test_sanitise_user_username() -> None:
    assert ex("%{user.username}", user="a/b;c") == "a:b:c"


def test_dots_cannot_form_traversal() -> None:
    assert ex("/var/mail/%{rcpt.user}/", rcpt="..@x") == "/var/mail/::/"
    assert ex("/var/mail/%{rcpt.user}/", rcpt=".@x") == "/var/mail/:/"
    assert ex("/var/mail/.%{rcpt.user}", rcpt=".@x") == "/var/mail/.:"
    assert ex("%{rcpt.user}", rcpt=".hidden@x") == ":hidden"
    assert ex("%{rcpt.user}", rcpt="a...b@x") == "a:::b"
    assert ex("%{rcpt.user}", rcpt="a.b.c@x") == "a.b.c"
    # Slicing cannot expose a leading dot either: sanitising runs on the sliced value.
    assert ex("%{rcpt.user[1:]}", rcpt="a.forward@x") == ":forward"


def test_sanitize_function_direct() -> None:
    assert sanitize("") == ""
    assert sanitize("ok.name") == "ok.name"
    assert sanitize("../x") == ":::x"


def test_raw_disables_sanitising() -> None:
    assert ex("%{sender.user:raw}", sender="a;b/../c@x") == "a;b/../c"
    assert ex("%{sender:lowercase|raw}", sender="A$B@X") == "a$b@x"
    assert ex("%{sender[0:2]:raw}", sender="$(x@y") == "$(x"


# --- ~ expansion ---------------------------------------------------------------------------------

def test_tilde_expansion() -> None:
    assert ex("~/Maildir") == "/home/bob/Maildir"
    assert ex("~") == "/home/bob"
    assert ex("~/") == "/home/bob/"
    assert ex("~/Maildir", home="/home/bob/") == "/home/bob/Maildir"
    assert ex("~/Maildir", home="/") == "/Maildir"
    assert ex("~/%{rcpt.domain:lowercase}/Maildir") == "/home/bob/example.org/Maildir"


def test_tilde_only_at_start() -> None:
    assert ex("/x/~/y") == "/x/~/y"
    assert ex("~root/x") == "~root/x"
    assert ex(" ~/x") == " ~/x"


def test_tilde_from_value_is_not_expanded() -> None:
    # A value starting with "~" cannot become a home-directory reference.
    assert ex("%{rcpt.user}/x", rcpt="~/x@y") == "::x/x"


# --- syntax errors -----------------------------------------------------------------------------

@pytest.mark.parametrize("template", [
    "%{nosuch}",
    "%{sender.nosuch}",
    "%{user}",
    "%{rcpt.user.more}",
    "%{}",
    "%{rcpt",
    "/var/mail/%{rcpt.user",
    "%{rcpt%{dest}}",
    "%{%{rcpt}}",
    "%{rcpt[0}",
    "%{rcpt]0[}",
    "%{rcpt[0]x}",
    "%{ rcpt}",
])
def test_format_errors(template: str) -> None:
    with pytest.raises(FormatError):
        ex(template)


def test_error_messages_are_clear() -> None:
    with pytest.raises(FormatError, match=r"unknown format specifier %\{nosuch\}"):
        ex("%{nosuch}")
    with pytest.raises(FormatError, match="unterminated"):
        ex("abc %{rcpt")
    with pytest.raises(FormatError, match="out of range"):
        ex("%{dest.user[9]}")


def test_format_error_is_value_error() -> None:
    assert issubclass(FormatError, ValueError)
