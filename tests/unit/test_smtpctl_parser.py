"""smtpctl command grammar (OpenSMTPD parser.c semantics)."""
from __future__ import annotations

import pytest

from smtpctl.parser import (
    COMMANDS,
    EXIT_COMMAND_ERROR,
    Command,
    CommandError,
    Grammar,
    evpid_to_text,
    msgid_to_text,
    parse_command,
    parse_evpid,
    parse_id,
    parse_msgid,
)

EVP = "0123456789abcdef"
EVP_INT = 0x0123456789ABCDEF
MSG = "89abcdef"
MSG_INT = 0x89ABCDEF

ROOT_POSSIBILITIES = [
    "possibilities are:",
    "discover", "pause", "resume", "show", "log", "monitor", "profile",
    "remove", "schedule", "stop", "trace", "uncorrupt", "unprofile",
    "untrace", "update", "reload", "encrypt", "spf",
]

SHOW_POSSIBILITIES = [
    "possibilities are:",
    "show mta", "show envelope", "show hoststats", "show message",
    "show queue", "show hosts", "show relays", "show routes", "show stats",
    "show status",
]


def fails(words):
    with pytest.raises(CommandError) as info:
        parse_command(words)
    return info.value


# --- every command path -------------------------------------------------

# (words, name, args, privileged)
PATHS = [
    (["discover", EVP], "discover", {"evpid": EVP_INT}, True),
    (["discover", MSG], "discover", {"msgid": MSG_INT}, True),
    (["encrypt"], "encrypt", {}, False),
    (["encrypt", "secret"], "encrypt", {"str": "secret"}, False),
    (["log", "brief"], "log brief", {}, True),
    (["log", "verbose"], "log verbose", {}, True),
    (["monitor"], "monitor", {}, True),
    (["pause", "envelope", EVP], "pause envelope", {"evpid": EVP_INT}, True),
    (["pause", "envelope", MSG], "pause envelope", {"msgid": MSG_INT}, True),
    (["pause", "envelope", "all"], "pause envelope all", {}, True),
    (["pause", "mda"], "pause mda", {}, True),
    (["pause", "mta"], "pause mta", {}, True),
    (["pause", "smtp"], "pause smtp", {}, True),
    (["pause", "mta", "from", "192.0.2.1", "for", "example.org"],
     "pause mta from for", {"addr": "192.0.2.1", "str": "example.org"}, True),
    (["profile", "imsg"], "profile", {"str": "imsg"}, True),
    (["remove", EVP], "remove", {"evpid": EVP_INT}, True),
    (["remove", MSG], "remove", {"msgid": MSG_INT}, True),
    (["remove", "all"], "remove all", {}, True),
    (["resume", "envelope", EVP], "resume envelope", {"evpid": EVP_INT}, True),
    (["resume", "envelope", MSG], "resume envelope", {"msgid": MSG_INT}, True),
    (["resume", "envelope", "all"], "resume envelope all", {}, True),
    (["resume", "mda"], "resume mda", {}, True),
    (["resume", "mta"], "resume mta", {}, True),
    (["resume", "smtp"], "resume smtp", {}, True),
    (["resume", "mta", "from", "2001:db8::1", "for", "example.org"],
     "resume mta from for", {"addr": "2001:db8::1", "str": "example.org"}, True),
    (["resume", "route", "42"], "resume route", {"routeid": 42}, True),
    (["schedule", EVP], "schedule", {"evpid": EVP_INT}, True),
    (["schedule", MSG], "schedule", {"msgid": MSG_INT}, True),
    (["schedule", "all"], "schedule all", {}, True),
    (["show", "envelope", EVP], "show envelope", {"evpid": EVP_INT}, True),
    (["show", "hosts"], "show hosts", {}, True),
    (["show", "hoststats"], "show hoststats", {}, True),
    (["show", "relays"], "show relays", {}, True),
    (["show", "routes"], "show routes", {}, True),
    (["show", "stats"], "show stats", {}, True),
    (["show", "status"], "show status", {}, True),
    (["show", "message", MSG], "show message", {"msgid": MSG_INT}, True),
    (["show", "message", EVP], "show message", {"evpid": EVP_INT}, True),
    (["show", "mta", "paused"], "show mta paused", {}, True),
    (["show", "queue"], "show queue", {}, True),
    (["show", "queue", MSG], "show queue", {"msgid": MSG_INT}, True),
    (["spf", "walk"], "spf walk", {}, False),
    (["stop"], "stop", {}, True),
    (["trace", "smtp"], "trace", {"str": "smtp"}, True),
    (["untrace", "all"], "untrace", {"str": "all"}, True),
    (["unprofile", "queue"], "unprofile", {"str": "queue"}, True),
    (["update", "table", "aliases"], "update table", {"str": "aliases"}, True),
    (["uncorrupt", MSG], "uncorrupt", {"msgid": MSG_INT}, True),
    (["reload"], "reload", {}, True),
]


@pytest.mark.parametrize("words,name,args,privileged", PATHS,
                         ids=[" ".join(p[0]) for p in PATHS])
def test_every_command(words, name, args, privileged):
    cmd = parse_command(words)
    assert isinstance(cmd, Command)
    assert cmd.name == name
    assert cmd.args == args
    assert cmd.privileged is privileged


def test_every_installed_pattern_is_exercised():
    exercised = {parse_command(w).pattern for w, *_ in PATHS}
    assert exercised == {p for p, _ in COMMANDS}


def test_only_encrypt_and_spf_walk_are_unprivileged():
    assert sorted(p for p, priv in COMMANDS if not priv) == [
        "encrypt", "encrypt <str>", "spf walk"]


def test_pattern_and_target():
    cmd = parse_command(["pause", "envelope", EVP])
    assert cmd.pattern == "pause envelope <evpid>"
    assert cmd.target == ("evpid", EVP_INT)
    assert parse_command(["remove", MSG]).target == ("msgid", MSG_INT)
    assert parse_command(["schedule", "all"]).target == ("all", None)
    assert parse_command(["show", "stats"]).target is None


def test_install_order_of_typed_children():
    # discover tries <evpid> first, schedule <msgid> first; lengths decide anyway
    assert parse_command(["discover", MSG]).args == {"msgid": MSG_INT}
    assert parse_command(["schedule", EVP]).args == {"evpid": EVP_INT}


def test_str_takes_anything():
    assert parse_command(["encrypt", "all"]).args == {"str": "all"}
    assert parse_command(["trace", "sh"]).args == {"str": "sh"}
    assert parse_command(["update", "table", ""]).args == {"str": ""}


# --- abbreviations ------------------------------------------------------

@pytest.mark.parametrize("words,name", [
    (["sh", "q"], "show queue"),
    (["sh", "ro"], "show routes"),
    (["sh", "rel"], "show relays"),
    (["sh", "hoststat"], "show hoststats"),
    (["sh", "env", EVP], "show envelope"),
    (["sh", "mt", "p"], "show mta paused"),
    (["sh", "me", MSG], "show message"),
    (["sh", "stats"], "show stats"),
    (["sh", "statu"], "show status"),
    (["l", "b"], "log brief"),
    (["lo", "v"], "log verbose"),
    (["mon"], "monitor"),
    (["m"], "monitor"),
    (["pa", "e", "a"], "pause envelope all"),
    (["pa", "md"], "pause mda"),
    (["pa", "mt"], "pause mta"),
    (["pa", "s"], "pause smtp"),
    (["pa", "mt", "f", "10.0.0.1", "f", "x"], "pause mta from for"),
    (["resu", "ro", "7"], "resume route"),
    (["rem", "a"], "remove all"),
    (["rel"], "reload"),
    (["sc", "al"], "schedule all"),
    (["st"], "stop"),
    (["tr", "x"], "trace"),
    (["unc", MSG], "uncorrupt"),
    (["unp", "x"], "unprofile"),
    (["unt", "x"], "untrace"),
    (["up", "t", "x"], "update table"),
    (["en"], "encrypt"),
    (["sp", "w"], "spf walk"),
    (["d", EVP], "discover"),
    (["pr", "x"], "profile"),
])
def test_unique_prefix(words, name):
    assert parse_command(words).name == name


def test_show_alone_lists_children():
    assert fails(["show"]).lines == SHOW_POSSIBILITIES


def test_ambiguous_show_st():
    # "st" could be stats or status: smtpctl lists every child of "show"
    err = fails(["sh", "st"])
    assert err.lines == SHOW_POSSIBILITIES
    assert str(err) == "\n".join(SHOW_POSSIBILITIES)
    assert err.text == str(err)
    assert err.possibilities == SHOW_POSSIBILITIES[1:]
    assert err.exit_status == EXIT_COMMAND_ERROR == 255


@pytest.mark.parametrize("words", [["sh", "h"], ["sh", "m"], ["sh", "r"],
                                   ["sh", "stat"], ["show", "x"], ["sh", ""]])
def test_ambiguous_or_unknown_under_show(words):
    assert fails(words).lines == SHOW_POSSIBILITIES


@pytest.mark.parametrize("words", [[], ["r"], ["un"], ["s"], ["u"], ["bogus"],
                                   ["showq"], ["re"]])
def test_ambiguous_or_unknown_at_root(words):
    assert fails(words).lines == ROOT_POSSIBILITIES


def test_empty_word_is_a_prefix_of_everything():
    assert fails([""]).lines == ROOT_POSSIBILITIES
    assert parse_command(["sp", ""]).name == "spf walk"  # single literal child


def test_pause_possibilities():
    expected = ["possibilities are:", "pause mta", "pause envelope",
                "pause mda", "pause smtp"]
    assert fails(["pause"]).lines == expected
    assert fails(["pa", "m"]).lines == expected
    assert fails(["pause", "x"]).lines == expected


def test_resume_possibilities():
    assert fails(["resume"]).lines == [
        "possibilities are:", "resume mta", "resume envelope", "resume mda",
        "resume route", "resume smtp"]


def test_log_possibilities_when_incomplete():
    assert fails(["log"]).lines == ["possibilities are:", "log brief",
                                    "log verbose"]


def test_placeholder_children_listed_by_token():
    assert fails(["schedule"]).lines == [
        "possibilities are:", "schedule <msgid>", "schedule <evpid>",
        "schedule all"]
    assert fails(["remove", "nothex!!"]).lines == [
        "possibilities are:", "remove <evpid>", "remove <msgid>", "remove all"]
    assert fails(["discover"]).lines == [
        "possibilities are:", "discover <evpid>", "discover <msgid>"]
    assert fails(["show", "queue", "zz"]).lines == [
        "possibilities are:", "show queue <msgid>"]
    assert fails(["show", "envelope"]).lines == [
        "possibilities are:", "show envelope <evpid>"]
    assert fails(["resume", "route", "0"]).lines == [
        "possibilities are:", "resume route <routeid>"]
    assert fails(["update", "table"]).lines == [
        "possibilities are:", "update table <str>"]


def test_path_uses_full_tokens_and_placeholders():
    # the path printed is the matched tokens, not the words typed
    assert fails(["pa", "mt", "f", "10.0.0.1"]).lines == [
        "possibilities are:", "pause mta from <addr> for"]
    assert fails(["pa", "mt", "f", "10.0.0.1", "x"]).lines == [
        "possibilities are:", "pause mta from <addr> for"]
    assert fails(["pa", "mt", "f", "not-an-ip"]).lines == [
        "possibilities are:", "pause mta from <addr>"]
    assert fails(["pa", "mt", "x"]).lines == [
        "possibilities are:", "pause mta from"]


@pytest.mark.parametrize("words", [
    ["stop", "now"], ["monitor", "x"], ["show", "stats", "x"],
    ["show", "queue", MSG, "x"], ["encrypt", "a", "b"], ["spf", "walk", "x"],
    ["schedule", "all", "x"], ["log", "brief", "x"], ["reload", "x"],
    ["show", "mta", "paused", "x"],
])
def test_extra_words_after_a_leaf(words):
    err = fails(words)
    assert err.lines == ["invalid command"]
    assert str(err) == "invalid command"
    assert err.possibilities == []


def test_no_prefix_match_on_placeholders():
    # "<" is not a prefix of a placeholder's token for matching purposes
    assert fails(["show", "queue", "<"]).lines == [
        "possibilities are:", "show queue <msgid>"]


def test_string_argument_is_refused():
    with pytest.raises(TypeError):
        parse_command("show queue")


# --- ids ----------------------------------------------------------------

@pytest.mark.parametrize("word", [
    "1234567",            # 7 chars
    "123456789",          # 9 chars
    "123456789abcdef",    # 15 chars
    "0123456789abcdef0",  # 17 chars
    "0000000g",           # non-hex msgid length
    "0123456789abcdeg",   # non-hex evpid length
    "00000000",           # zero msgid
    "0000000000000000",   # zero evpid
    "0x123456",           # strtoul would take it; we do not
    " 1234567",
    "+1234567",
    "-1234567",
])
def test_bad_ids_are_refused(word):
    with pytest.raises(ValueError):
        parse_id(word)
    lines = fails(["remove", word]).lines
    assert lines == ["possibilities are:", "remove <evpid>", "remove <msgid>",
                     "remove all"]
    assert fails(["show", "envelope", word]).lines == [
        "possibilities are:", "show envelope <evpid>"]


def test_empty_word_after_remove_is_remove_all():
    # parser.c quirk kept: "" is a prefix of the only literal child, "all"
    with pytest.raises(ValueError):
        parse_id("")
    assert parse_command(["remove", ""]).name == "remove all"
    assert fails(["show", "envelope", ""]).lines == [
        "possibilities are:", "show envelope <evpid>"]


def test_parse_id():
    assert parse_id("89abcdef") == ("msgid", 0x89ABCDEF)
    assert parse_id("0123456789abcdef") == ("evpid", 0x0123456789ABCDEF)
    assert parse_id("89ABCDEF") == ("msgid", 0x89ABCDEF)
    assert parse_id("00000001") == ("msgid", 1)
    assert parse_id("ffffffff") == ("msgid", 0xFFFFFFFF)
    assert parse_id("0000000000000001") == ("evpid", 1)
    assert parse_id("ffffffffffffffff") == ("evpid", 2**64 - 1)
    assert isinstance(parse_id("00000001"), tuple)


def test_parse_msgid_evpid_helpers():
    assert parse_msgid("89abcdef") == MSG_INT
    assert parse_msgid("0123456789abcdef") is None
    assert parse_msgid("00000000") is None
    assert parse_evpid("0123456789abcdef") == EVP_INT
    assert parse_evpid("89abcdef") is None


def test_id_text():
    assert msgid_to_text(0xABC) == "00000abc"
    assert evpid_to_text(0xABC) == "0000000000000abc"
    assert evpid_to_text(EVP_INT) == EVP


def test_evpid_never_matches_msgid_and_vice_versa():
    assert fails(["show", "envelope", MSG]).lines == [
        "possibilities are:", "show envelope <evpid>"]
    assert fails(["show", "queue", EVP]).lines == [
        "possibilities are:", "show queue <msgid>"]
    assert fails(["uncorrupt", EVP]).lines == [
        "possibilities are:", "uncorrupt <msgid>"]


def test_uppercase_hex_accepted():
    assert parse_command(["schedule", EVP.upper()]).args == {"evpid": EVP_INT}


# --- route ids and addresses ---------------------------------------------

@pytest.mark.parametrize("word,value", [
    ("1", 1), ("42", 42), ("007", 7), (str(2**63 - 1), 2**63 - 1)])
def test_routeid_ok(word, value):
    assert parse_command(["resume", "route", word]).args == {"routeid": value}


@pytest.mark.parametrize("word", ["0", "-1", str(2**63), "1x", "", "0x10", " 1"])
def test_routeid_bad(word):
    assert fails(["resume", "route", word]).lines == [
        "possibilities are:", "resume route <routeid>"]


@pytest.mark.parametrize("word,value", [
    ("192.0.2.1", "192.0.2.1"),
    ("0.0.0.0", "0.0.0.0"),
    ("::1", "::1"),
    ("2001:DB8:0:0::1", "2001:db8::1"),
    # inet_ntop's text, as OpenSMTPD prints it, whatever Python's str() does
    ("::ffff:192.0.2.1", "::ffff:192.0.2.1"),
    ("0:0:0:0:0:ffff:c000:201", "::ffff:192.0.2.1"),
    ("::ffff:0:0", "::ffff:0.0.0.0"),
    ("::c000:201", "::192.0.2.1"),
    ("::0.1.0.0", "::0.1.0.0"),
    ("::1:0:0", "::1:0:0"),
    ("::ffff:1:c000:201", "::ffff:1:c000:201"),
    ("fe80::1%1", "fe80::1%1"),
    ("2001:db8::1%42", "2001:db8::1%42"),
    ("fe80::1%4294967295", "fe80::1%4294967295"),
])
def test_addr_ok(word, value):
    cmd = parse_command(["pause", "mta", "from", word, "for", "example.org"])
    assert cmd.args == {"addr": value, "str": "example.org"}


@pytest.mark.parametrize("word", [
    "192.0.2", "192.0.2.256", "01.2.3.4", "example.org", "[::1]", "::1%",
    "2001:db8::1%eth0", "fe80::1%4294967296", "192.0.2.1%1", "", "1.2.3.4/24",
])
def test_addr_bad(word):
    assert fails(["resume", "mta", "from", word]).lines == [
        "possibilities are:", "resume mta from <addr>"]


def test_addr_link_local_interface_name():
    import socket
    names = [name for _, name in socket.if_nameindex()]
    if not names:
        pytest.skip("no network interfaces")
    word = f"fe80::1%{names[0]}"
    cmd = parse_command(["pause", "mta", "from", word, "for", "d"])
    assert cmd.args["addr"] == word
    # only link-local addresses may name an interface
    assert fails(["pause", "mta", "from", f"2001:db8::1%{names[0]}"]).lines[1:] \
        == ["pause mta from <addr>"]


# --- the grammar machinery ----------------------------------------------

def test_duplicate_pattern_refused():
    g = Grammar([("a b", True)])
    with pytest.raises(ValueError, match="duplicate pattern"):
        g.install("a  b")


def test_custom_grammar_int_placeholder():
    g = Grammar([("set level <int>", True), ("set name <str>", False)])
    assert g.parse(["set", "level", "-3"]).args == {"int": -3}
    assert g.parse(["se", "n", "x"]).privileged is False
    with pytest.raises(CommandError) as info:
        g.parse(["set", "level", str(2**31)])
    assert info.value.lines == ["possibilities are:", "set level <int>"]


def test_patterns_listing_covers_table():
    from smtpctl.parser import GRAMMAR
    assert sorted(GRAMMAR.patterns()) == sorted(p for p, _ in COMMANDS)


def test_ipv6_text_is_inet_ntop():
    # glibc's inet_ntop is the ISC code OpenBSD's libc has: the text OpenSMTPD prints
    import ipaddress
    import random
    import socket

    from smtpctl.parser import ipv6_text
    rng = random.Random(13)
    for _ in range(5000):
        groups = [rng.choice([0, 0, 0, 0xFFFF, 1, rng.randrange(65536)]) for _ in range(8)]
        addr = ipaddress.IPv6Address(b"".join(g.to_bytes(2, "big") for g in groups))
        assert ipv6_text(addr) == socket.inet_ntop(socket.AF_INET6, addr.packed), addr
