"""The recipient expansion object (smtpd/expand.py), driven by hand: every request it
makes is answered here, from a parsed configuration (rules matched by the real
ruleset) and from tables, .forward and :include: contents the test gives."""
from __future__ import annotations

from pathlib import Path

import pytest

from common import envelope as envelope_codec
from common.envelope import Envelope
from smtpd.expand import (
    MAX_DEPTH, MAX_FORWARD_NODES, MAX_FORWARD_SIZE, MAX_NODES, TEMPFAIL, Expansion, FileAnswer,
    MatchRule, ReadForward, ReadInclude, TableLookup,
)
from smtpd.parse import parse_config
from smtpd.ruleset import MatchContext, match
from smtpd.table import TableSet

CONF = """
table aliases { unused = "x" }
table virtuals { unused = "x" }
table users { unused = "x" }
action "local" maildir alias <aliases> userbase <users>
action "virt" maildir virtual <virtuals> userbase <users>
action "fwdonly" forward-only alias <aliases> userbase <users>
action "exponly" expand-only userbase <users>
action "other-user" maildir userbase <users> user vmail
action "out" relay
match from any for domain "example.test" action "local"
match from any for domain "virtual.test" action "virt"
match from any for domain "fwd.test" action "fwdonly"
match from any for domain "exp.test" action "exponly"
match from any for domain "vmail.test" action "other-user"
match from local for domain "relay.test" action "out"
"""

USERS = {"alice": "1000:1000:/home/alice", "bob": "1001:1001:/home/bob",
         "root": "0:0:/root", "vmail": "2000:2000:/var/vmail"}


class World:
    """Answers an expansion's requests; records them in ``asked``."""

    def __init__(self, tmp_path: Path, aliases=None, virtuals=None, users=None, forwards=None,
                 includes=None, tempfail=()) -> None:
        conf = tmp_path / "smtpd.conf"
        conf.write_text(CONF)
        self.config = parse_config(conf)
        self.tableset = TableSet(self.config)
        self.tables = {"aliases": aliases or {}, "virtuals": virtuals or {},
                       "users": USERS if users is None else users}
        self.forwards = forwards or {}
        self.includes = includes or {}
        self.tempfail = set(tempfail)
        self.asked: list = []

    def answer(self, request):
        self.asked.append(request)
        if isinstance(request, MatchRule):
            if "rules" in self.tempfail:
                return TEMPFAIL
            return match(self.config, self.tableset, MatchContext(
                source="local" if request.internal else "192.0.2.1", rdns=None, helo="client.test",
                mail_from="sender@remote.test", rcpt=request.address, tag=None, auth_user=None,
                tls=False, local_listener=request.internal))
        if isinstance(request, TableLookup):
            if request.table in self.tempfail or (request.table, request.key) in self.tempfail:
                return TEMPFAIL
            return self.tables[request.table].get(request.key)
        if isinstance(request, ReadForward):
            return self.forwards.get(request.user, FileAnswer("absent"))
        if isinstance(request, ReadInclude):
            return self.includes.get(request.path, FileAnswer("absent"))
        raise AssertionError(request)

    def lookups(self, table: str) -> list[str]:
        return [r.key for r in self.asked if isinstance(r, TableLookup) and r.table == table]


def expand(world: World, rcpt: str, sender: str = "sender@remote.test"):
    env = Envelope(sender=sender, rcpt=rcpt, sockaddr="192.0.2.1", helo="client.test", ctime=1)
    exp = Expansion(env, world.config.actions, sub_addr_delim="+", smtpd_user="_smtpd")
    for _ in range(5000):
        request = exp.next_request()
        if request is None:
            assert exp.result is not None
            return exp.result
        exp.feed(world.answer(request))
    raise AssertionError("expansion did not end")


def deliveries(result) -> list[tuple]:
    assert result.error is None, result.error
    return [(e.type, e.dest, e.mda_user, e.mda_method, e.mda_exec or e.mda_file) for e in result.envelopes]


def refused(result) -> int:
    assert result.error is not None and not result.envelopes
    return result.error[0]


# --- users, aliases, tags --------------------------------------------------------------

def test_a_user_gets_an_mda_envelope_by_the_actions_method(tmp_path):
    world = World(tmp_path)
    result = expand(world, "Alice@example.test")
    assert deliveries(result) == [("mda", "Alice@example.test", "alice", "", "")]
    env = result.envelopes[0]
    assert (env.dispatcher, env.rcpt, env.sender) == ("local", "Alice@example.test", "sender@remote.test")
    assert world.lookups("aliases") == ["alice"] and world.lookups("users") == ["alice"]
    assert [r for r in world.asked if isinstance(r, ReadForward)] == [
        ReadForward("alice", "/home/alice", 1000, 1000)]


def test_the_tag_is_tried_first_in_aliases_then_kept_as_the_subaddress(tmp_path):
    world = World(tmp_path)
    result = expand(world, "alice+news@example.test")
    assert world.lookups("aliases") == ["alice+news", "alice"]
    assert result.envelopes[0].mda_subaddress == "news" and result.envelopes[0].mda_user == "alice"
    world = World(tmp_path, aliases={"alice+news": "bob"})
    assert [e.mda_user for e in expand(world, "alice+news@example.test").envelopes] == ["bob"]


def test_an_unknown_user_is_550_and_a_userbase_failure_451(tmp_path):
    assert expand(World(tmp_path), "nobody-here@example.test").error == (
        550, "5.1.1 Invalid recipient: <nobody-here@example.test>")
    assert expand(World(tmp_path, tempfail={"users"}), "alice@example.test").error == (
        451, "4.3.0 Temporary failure")
    assert expand(World(tmp_path, users={"alice": "garbage"}), "alice@example.test").error[0] == 451


def test_no_rule_is_550_and_a_rule_lookup_failure_451(tmp_path):
    assert expand(World(tmp_path), "x@elsewhere.test").error == (
        550, "5.7.1 Invalid recipient: <x@elsewhere.test>")
    assert refused(expand(World(tmp_path, tempfail={"rules"}), "alice@example.test")) == 451


def test_an_alias_list_gives_each_user_and_relays_remote_addresses(tmp_path):
    world = World(tmp_path, aliases={"team": "alice, bob, carol@relay.test"})
    assert sorted(deliveries(expand(world, "team@example.test"))) == [
        ("mda", "team@example.test", "alice", "", ""),
        ("mda", "team@example.test", "bob", "", ""),
        ("mta", "carol@relay.test", "", "", ""),
    ]


def test_an_alias_table_answering_a_list_is_read_as_one_line(tmp_path):
    world = World(tmp_path, aliases={"team": ["alice", "bob"]})
    assert [e.mda_user for e in expand(world, "team@example.test").envelopes] == ["alice", "bob"]


def test_the_same_user_twice_is_delivered_once(tmp_path):
    world = World(tmp_path, aliases={"team": "alice, alice, bob, alice"})
    assert [e.mda_user for e in expand(world, "team@example.test").envelopes] == ["alice", "bob"]


def test_a_user_named_in_its_own_alias_is_not_looked_up_again(tmp_path):
    world = World(tmp_path, aliases={"alice": "alice, bob"})
    assert sorted(e.mda_user for e in expand(world, "alice@example.test").envelopes) == ["alice", "bob"]
    assert world.lookups("aliases").count("alice") == 1


# --- |command, /file, :include:, error: -------------------------------------------------

def test_a_command_in_aliases_runs_as_the_unprivileged_user(tmp_path, caplog):
    world = World(tmp_path, aliases={"bugs": '"|/usr/bin/tracker --queue a,b", |/bin/cat'})
    result = expand(world, "bugs@example.test")
    assert sorted(deliveries(result)) == [
        ("mda", "bugs@example.test", "_smtpd", "exec", "/bin/cat"),
        ("mda", "bugs@example.test", "_smtpd", "exec", "/usr/bin/tracker --queue a,b"),
    ]
    assert "commands executed from aliases run with _smtpd privileges" in caplog.text


def test_a_file_in_aliases_is_an_mbox_file_delivery(tmp_path):
    world = World(tmp_path, aliases={"archive": "/var/mail/archive"})
    env = expand(world, "archive@example.test").envelopes[0]
    assert (env.mda_method, env.mda_file, env.mda_exec, env.mda_user) == ("file", "/var/mail/archive", "", "_smtpd")


def test_new_envelope_fields_survive_the_spool_codec(tmp_path):
    world = World(tmp_path, aliases={"x": "/var/mail/archive, |/bin/cat"})
    for env in expand(world, "x@example.test").envelopes:
        back = envelope_codec.load(envelope_codec.dump(env))
        assert (back.mda_method, back.mda_file, back.mda_exec) == (env.mda_method, env.mda_file, env.mda_exec)
    plain = envelope_codec.dump(expand(World(tmp_path), "alice@example.test").envelopes[0])
    assert b"mda-method" not in plain and b"mda-file" not in plain
    with pytest.raises(envelope_codec.EnvelopeError):
        envelope_codec.load(plain + b"mda-method: shell\n")


def test_an_include_file_adds_its_targets(tmp_path):
    includes = {"/etc/mail/staff": FileAnswer("ok", "# staff\nalice\nbob, \\\n  carol@relay.test\n"
                                                    ":include:/etc/mail/nested\n")}
    world = World(tmp_path, aliases={"staff": ":include:/etc/mail/staff"}, includes=includes)
    assert sorted(deliveries(expand(world, "staff@example.test"))) == [
        ("mda", "staff@example.test", "alice", "", ""),
        ("mda", "staff@example.test", "bob", "", ""),
        ("mta", "carol@relay.test", "", "", ""),
    ]
    # includes do not nest
    assert [r.path for r in world.asked if isinstance(r, ReadInclude)] == ["/etc/mail/staff"]


def test_an_unreadable_include_adds_nothing_and_the_name_falls_to_the_user_base(tmp_path):
    world = World(tmp_path, aliases={"alice": ":include:/missing"})
    assert [e.mda_user for e in expand(world, "alice@example.test").envelopes] == ["alice"]
    world = World(tmp_path, aliases={"staff": ":include:/missing"},
                  includes={"/missing": FileAnswer("permfail")})
    assert refused(expand(world, "staff@example.test")) == 550


@pytest.mark.parametrize(("target", "error"), [
    ("error:550 No such list", (550, "5.0.0 No such list: <gone@example.test>")),
    (":error:550 5.1.6 Moved away", (550, "5.1.6 Moved away: <gone@example.test>")),
    ("error:421 4.3.2 Try later", (421, "4.3.2 Try later: <gone@example.test>")),
])
def test_an_error_target_is_the_reply(tmp_path, target, error):
    assert expand(World(tmp_path, aliases={"gone": target}), "gone@example.test").error == error


@pytest.mark.parametrize("value", ["error:250 Fine", "error:55 short", "error:550", 'alice, "|unterminated',
                                   "al ice", "bob; rm -rf /"])
def test_a_table_value_that_does_not_parse_fails_temporarily(tmp_path, value):
    assert expand(World(tmp_path, aliases={"x": value}), "x@example.test").error == (
        424, "4.2.4 Mailing list expansion problem: <x@example.test>")


def test_an_error_anywhere_in_the_expansion_wins_over_deliveries(tmp_path):
    world = World(tmp_path, aliases={"list": "alice, bob, sub", "sub": "error:552 Mailbox full"})
    assert expand(world, "list@example.test").error == (552, "5.0.0 Mailbox full: <list@example.test>")


def test_an_alias_lookup_failure_is_424(tmp_path):
    world = World(tmp_path, tempfail={("aliases", "alice")})
    assert expand(world, "alice@example.test").error == (
        424, "4.2.4 Mailing list expansion problem: <alice@example.test>")


# --- virtual ---------------------------------------------------------------------------

def test_virtual_keys_in_opensmtpds_order_then_the_catch_alls(tmp_path):
    world = World(tmp_path, virtuals={"@": "bob"})
    assert [e.mda_user for e in expand(world, "Alice+Tag@Virtual.test").envelopes] == ["bob"]
    assert world.lookups("virtuals")[:6] == [
        "alice+tag@virtual.test", "alice@virtual.test", "alice+tag", "alice", "@virtual.test", "@"]


def test_virtual_domain_catch_all_before_the_global_one(tmp_path):
    world = World(tmp_path, virtuals={"@virtual.test": "alice", "@": "bob"})
    assert [e.mda_user for e in expand(world, "anyone@virtual.test").envelopes] == ["alice"]


def test_virtual_without_an_entry_is_524_and_a_failed_lookup_424(tmp_path):
    assert refused(expand(World(tmp_path), "x@virtual.test")) == 524
    world = World(tmp_path, virtuals={"@": "bob"}, tempfail={("virtuals", "x")})
    assert refused(expand(world, "x@virtual.test")) == 424


def test_virtual_targets_are_users_commands_or_addresses(tmp_path):
    world = World(tmp_path, virtuals={"info@virtual.test": "alice, |/bin/cat, carol@relay.test"})
    assert sorted(deliveries(expand(world, "info@virtual.test"))) == [
        ("mda", "info@virtual.test", "_smtpd", "exec", "/bin/cat"),
        ("mda", "info@virtual.test", "alice", "", ""),
        ("mta", "carol@relay.test", "", "", ""),
    ]


# --- ~/.forward ------------------------------------------------------------------------

def test_a_forward_file_replaces_delivery_and_may_keep_a_copy(tmp_path):
    forwards = {"alice": FileAnswer("ok", "# mine\nalice, bob\n|/usr/bin/vacation alice\n/home/alice/log\n")}
    result = expand(World(tmp_path, forwards=forwards), "alice@example.test")
    assert sorted(deliveries(result)) == [
        ("mda", "alice@example.test", "alice", "", ""),
        ("mda", "alice@example.test", "alice", "exec", "/usr/bin/vacation alice"),
        ("mda", "alice@example.test", "alice", "file", "/home/alice/log"),
        ("mda", "alice@example.test", "bob", "", ""),
    ]


def test_a_forward_to_another_user_only(tmp_path):
    world = World(tmp_path, forwards={"alice": FileAnswer("ok", "bob\n")})
    assert [e.mda_user for e in expand(world, "alice@example.test").envelopes] == ["bob"]


@pytest.mark.parametrize("answer", [FileAnswer("absent"), FileAnswer("ok", ""), FileAnswer("ok", "# nothing\n")])
def test_no_or_empty_forward_delivers_to_the_user(tmp_path, answer):
    world = World(tmp_path, forwards={"alice": answer})
    assert [e.mda_user for e in expand(world, "alice@example.test").envelopes] == ["alice"]


@pytest.mark.parametrize(("answer", "code"), [
    (FileAnswer("tempfail"), 424),
    (FileAnswer("permfail"), 524),                       # an insecure or unreadable file
    (FileAnswer("ok", "bob, \"|unterminated\n"), 424),   # syntax error
    (FileAnswer("ok", "bob\n" + "#" * MAX_FORWARD_SIZE), 424),
    (FileAnswer("ok", ", ".join(f"u{i}@relay.test" for i in range(MAX_FORWARD_NODES + 1))), 424),
])
def test_forward_failures(tmp_path, answer, code):
    assert refused(expand(World(tmp_path, forwards={"alice": answer}), "alice@example.test")) == code


def test_includes_in_a_forward_are_ignored(tmp_path):
    world = World(tmp_path, forwards={"alice": FileAnswer("ok", ":include:/etc/passwd\n")})
    assert [e.mda_user for e in expand(world, "alice@example.test").envelopes] == ["alice"]
    assert not [r for r in world.asked if isinstance(r, ReadInclude)]


def test_forward_only_needs_a_forward_and_refuses_commands_files_errors(tmp_path):
    assert expand(World(tmp_path), "alice@fwd.test").error == (
        424, "4.2.4 Mailing list expansion problem: <alice@fwd.test>")
    world = World(tmp_path, forwards={"alice": FileAnswer("ok", "bob@relay.test\n")})
    assert [e.dest for e in expand(world, "alice@fwd.test").envelopes] == ["bob@relay.test"]
    for target in ("|/bin/cat", "/tmp/file", "error:550 No"):
        world = World(tmp_path, forwards={"alice": FileAnswer("ok", target + "\n")})
        assert expand(world, "alice@fwd.test").error == (451, "4.3.0 Temporary failure"), target


def test_expand_only_without_a_forward_is_524(tmp_path):
    assert refused(expand(World(tmp_path), "alice@exp.test")) == 524
    world = World(tmp_path, forwards={"alice": FileAnswer("ok", "bob@relay.test\n")})
    assert [e.type for e in expand(world, "alice@exp.test").envelopes] == ["mta"]


def test_commands_and_files_in_roots_forward_are_refused(tmp_path):
    for target in ("|/bin/cat", "/tmp/root-mail"):
        world = World(tmp_path, forwards={"root": FileAnswer("ok", target + "\n")})
        assert refused(expand(world, "root@example.test")) == 451
    world = World(tmp_path, forwards={"root": FileAnswer("ok", "alice\n")})
    assert [e.mda_user for e in expand(world, "root@example.test").envelopes] == ["alice"]


def test_an_alternate_delivery_user_skips_forward_files(tmp_path):
    world = World(tmp_path, forwards={"alice": FileAnswer("ok", "|/bin/cat\n")})
    assert [e.mda_user for e in expand(world, "alice@vmail.test").envelopes] == ["alice"]
    assert not [r for r in world.asked if isinstance(r, ReadForward)]


def test_an_unanswerable_forward_request_fails_temporarily(tmp_path):
    world = World(tmp_path, forwards={"alice": TEMPFAIL})
    assert refused(expand(world, "alice@example.test")) == 424


# --- loops and limits ------------------------------------------------------------------

def test_addresses_that_alias_each_other_are_a_loop(tmp_path, caplog):
    from common.trace import FLAGS
    world = World(tmp_path, aliases={"a": "b@example.test", "b": "a@example.test"})
    FLAGS.expand = True
    try:
        with caplog.at_level("DEBUG"):
            assert expand(world, "a@example.test").error == (
                524, "5.2.4 Mailing list expansion problem: <a@example.test>")
    finally:
        FLAGS.expand = False
    assert "expand: loop detected" in caplog.text


def test_a_forward_back_to_its_own_address_is_a_loop(tmp_path):
    world = World(tmp_path, forwards={"alice": FileAnswer("ok", "alice@example.test\n")})
    assert refused(expand(world, "alice@example.test")) == 524


def test_user_names_that_alias_each_other_expand_to_nothing(tmp_path):
    world = World(tmp_path, aliases={"a": "b", "b": "a"})
    assert refused(expand(world, "a@example.test")) == 524


def test_depth_is_limited(tmp_path):
    chain = {f"u{i}": f"u{i + 1}" for i in range(MAX_DEPTH)}
    chain[f"u{MAX_DEPTH}"] = "alice"
    assert refused(expand(World(tmp_path, aliases=chain), "u0@example.test")) == 524
    short = {f"u{i}": f"u{i + 1}" for i in range(MAX_DEPTH - 3)}
    short[f"u{MAX_DEPTH - 3}"] = "alice"
    assert [e.mda_user for e in expand(World(tmp_path, aliases=short), "u0@example.test").envelopes] == ["alice"]


def test_the_size_of_one_expansion_is_limited(tmp_path):
    many = {"big": ", ".join(f"m{i}@relay.test" for i in range(MAX_NODES + 1))}
    assert refused(expand(World(tmp_path, aliases=many), "big@example.test")) == 524
    fine = {"big": ", ".join(f"m{i}@relay.test" for i in range(200))}
    assert len(expand(World(tmp_path, aliases=fine), "big@example.test").envelopes) == 200


def test_feeding_a_finished_expansion_is_an_error(tmp_path):
    world = World(tmp_path)
    env = Envelope(sender="", rcpt="x@elsewhere.test")
    exp = Expansion(env, world.config.actions)
    exp.feed(None)                       # no rule
    assert exp.next_request() is None and exp.result.error[0] == 550
    with pytest.raises(RuntimeError):
        exp.feed(None)
