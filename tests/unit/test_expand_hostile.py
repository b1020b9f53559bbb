"""Hostile addresses never reach a shell (the CVE-2020-7247 class), expansion side:
whatever a client puts in MAIL FROM or RCPT TO comes out of expansion refused or as
inert data (dest, rcpt, sender, mda_subaddress), never as a command or a file to
write.  Only table, .forward and :include: contents name commands and files."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import envelope as envelope_codec
from smtpd.expand import FileAnswer
from tests.unit.test_expand import World, expand

HOSTILE = [
    "a;reboot", "$(touch /tmp/pwned)", "`touch /tmp/pwned`", "a'b", 'a"b', "|touch /tmp/pwned",
    '"|touch /tmp/pwned"', "/etc/passwd", ":include:/etc/shadow", "error:550 x", "a|b", "a&&b",
    "a>b", "${IFS}x", "a\\b", "..", "-oProxyCommand=x", "%{rcpt}", "a b",
]
TRUSTED_EXEC = {"/usr/bin/tracker"}
TRUSTED_FILE = {"/var/mail/archive"}


def _world(tmp_path, **kw):
    return World(tmp_path, aliases={"bugs": "|/usr/bin/tracker", "archive": "/var/mail/archive"},
                 virtuals={"@": "alice"}, **kw)


def _assert_inert(result) -> None:
    for env in result.envelopes:
        assert env.mda_exec in TRUSTED_EXEC | {""} and env.mda_file in TRUSTED_FILE | {""}
        if env.mda_method == "exec":
            assert env.mda_exec in TRUSTED_EXEC
        if env.mda_method == "file":
            assert env.mda_file in TRUSTED_FILE
        envelope_codec.dump(env)          # storable: no line breaks anywhere


@pytest.mark.parametrize("local", HOSTILE)
def test_a_hostile_local_part_is_an_unknown_user(tmp_path, local):
    world = _world(tmp_path)
    result = expand(world, f"{local}@example.test")
    assert result.error is not None and result.error[0] == 550 and not result.envelopes
    # it was only ever looked up, as a key
    assert not [r for r in world.asked if type(r).__name__ in ("ReadInclude",)]


@pytest.mark.parametrize("local", HOSTILE)
def test_a_hostile_address_caught_by_a_catch_all_is_data(tmp_path, local):
    result = expand(_world(tmp_path), f"{local}@virtual.test")
    assert [(e.mda_user, e.mda_method, e.mda_exec, e.mda_file) for e in result.envelopes] == [
        ("alice", "", "", "")]
    assert result.envelopes[0].dest == f"{local}@virtual.test"


@pytest.mark.parametrize("tag", HOSTILE)
def test_a_hostile_tag_is_only_the_subaddress(tmp_path, tag):
    result = expand(_world(tmp_path), f"alice+{tag}@example.test")
    if result.error is None:
        env, = result.envelopes
        assert (env.mda_user, env.mda_method, env.mda_exec, env.mda_subaddress) == ("alice", "", "", tag.lower())
    else:                                  # a tag with the delimiter in it may name another alias
        assert result.error[0] in (550, 424)


@pytest.mark.parametrize("sender", ["a;reboot@remote.test", "`id`@remote.test", "$(id)@remote.test",
                                    '"|cmd"@remote.test', ""])
def test_a_hostile_sender_is_carried_as_data(tmp_path, sender):
    result = expand(_world(tmp_path), "alice@example.test", sender=sender)
    env, = result.envelopes
    assert (env.sender, env.mda_method, env.mda_exec) == (sender, "", "")


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a\x00b", "a\x1bb"])
def test_control_characters_are_refused(tmp_path, bad):
    assert expand(_world(tmp_path), f"{bad}@virtual.test").error[0] == 550
    assert expand(_world(tmp_path), "alice@example.test", sender=f"{bad}@remote.test").error[0] == 550


@pytest.mark.parametrize("target", ["a;b@relay.test", "$(id)@relay.test", "a b@relay.test", "x@re;lay.test"])
def test_alias_addresses_with_shell_syntax_make_the_entry_invalid(tmp_path, target):
    world = World(tmp_path, aliases={"list": f"alice, {target}"})
    assert expand(world, "list@example.test").error[0] == 424


def test_backquotes_are_a_valid_address_character_and_stay_data(tmp_path):
    world = World(tmp_path, aliases={"list": "`reboot`@relay.test"})
    env, = expand(world, "list@example.test").envelopes
    assert (env.type, env.dest, env.mda_exec) == ("mta", "`reboot`@relay.test", "")
    world = World(tmp_path, aliases={"list": "`reboot`@example.test"})
    assert expand(world, "list@example.test").error[0] == 550      # no such user


def test_a_forward_naming_a_hostile_address_keeps_it_data(tmp_path):
    world = World(tmp_path, forwards={"alice": FileAnswer("ok", "`id`@relay.test\n")})
    env, = expand(world, "alice@example.test").envelopes
    assert (env.type, env.dest, env.mda_method) == ("mta", "`id`@relay.test", "")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(local=st.text(min_size=1, max_size=40), domain=st.sampled_from(
           ["example.test", "virtual.test", "relay.test", "fwd.test", "exp.test"]),
       sender=st.text(max_size=40))
def test_no_client_text_becomes_a_command_or_a_file(tmp_path, local, domain, sender):
    result = expand(_world(tmp_path), f"{local}@{domain}", sender=sender)
    _assert_inert(result)
    for env in result.envelopes:
        assert local not in (env.mda_exec, env.mda_file) or local in TRUSTED_EXEC | TRUSTED_FILE
