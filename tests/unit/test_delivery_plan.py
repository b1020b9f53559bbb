"""What pony asks the parent to do for an envelope: the method and its expanded
target, from the action or from what an alias/.forward named (mda_method); and the
grammar of the local actions and of ``mda wrapper``."""
from __future__ import annotations

import pytest

from common.envelope import Envelope
from smtpd.config import ConfigError
from smtpd.delivery_lmtp import parse_destination
from smtpd.mda import Mda
from smtpd.mda_variables import FormatError
from smtpd.parse import parse_config


def parsed(tmp_path, text: str):
    path = tmp_path / "smtpd.conf"
    path.write_text(text + '\nmatch from any for domain "example.test" action "a"\n')
    return parse_config(path)


def planner(config) -> Mda:
    mda = Mda.__new__(Mda)
    mda.config = config
    return mda


def env(**kw) -> Envelope:
    base = dict(dispatcher="a", type="mda", sender="s@remote.test", rcpt="alice+x@example.test",
                dest="alice@example.test", mda_user="alice", mda_subaddress="x")
    return Envelope(**{**base, **kw})


def test_grammar_of_local_actions(tmp_path):
    c = parsed(tmp_path, 'action "a" mbox\naction "b" mbox "/srv/mail"\n'
                         'action "c" lmtp "/run/lmtp" rcpt-to\naction "d" lmtp "127.0.0.1:24"\n'
                         'mda wrapper "w" "/usr/bin/env - %{mda}"\n'
                         'action "e" mda "procmail -f %{sender}" wrapper "w" user "bob"\n')
    a = c.actions
    assert (a["a"].method, a["a"].target, a["b"].target) == ("mbox", None, "/srv/mail")
    assert (a["c"].target, a["c"].lmtp_rcpt_to, a["d"].lmtp_rcpt_to) == ("/run/lmtp", True, False)
    assert (a["e"].wrapper, a["e"].user) == ("w", "bob")
    assert c.mda_wrappers == {"w": "/usr/bin/env - %{mda}"}
    assert not [n for n in c.not_applied if "mbox" in n or "lmtp" in n or "wrapper" in n]


@pytest.mark.parametrize("text,error", [
    ('action "a" mda "x" wrapper "nope"', 'undefined mda wrapper "nope"'),
    ('mda wrapper "w" "/bin/true"\naction "a" mda "x"', "must contain %{mda}"),
    ('mda wrapper "w" "%{mda}"\nmda wrapper "w" "%{mda}"\naction "a" mda "x"', "already defined"),
])
def test_grammar_errors(tmp_path, text, error):
    with pytest.raises(ConfigError) as err:
        parsed(tmp_path, text)
    assert error in str(err.value)


def test_plan_by_method(tmp_path):
    c = parsed(tmp_path, 'mda wrapper "w" "/wrap %{user.username} %{mda}"\n'
                         'action "a" maildir "~/Mail/%{rcpt.user}"\naction "b" mbox\n'
                         'action "l" lmtp "/run/lmtp"\naction "m" mda "deliver -f %{sender}"\n'
                         'action "mw" mda "deliver %{dest}" wrapper "w"\n')
    p = planner(c)
    assert p._plan(env(), c.actions["a"], "/home/alice", "alice") == ("maildir", "/home/alice/Mail/alice+x")
    assert p._plan(env(), c.actions["b"], "/h", "alice") == ("mbox", "")
    assert p._plan(env(), c.actions["l"], "/h", "alice") == ("lmtp", "/run/lmtp")
    assert p._plan(env(), c.actions["m"], "/h", "alice") == ("mda", "deliver -f s@remote.test")
    assert p._plan(env(), c.actions["mw"], "/h", "alice") == ("mda", "/wrap alice deliver alice@example.test")


def test_plan_of_alias_targets(tmp_path):
    c = parsed(tmp_path, 'action "a" maildir\n')
    p = planner(c)
    assert p._plan(env(mda_method="exec", mda_exec="/usr/bin/vacation %{sender}"), c.actions["a"], "/h", "alice") \
        == ("mda", "/usr/bin/vacation s@remote.test")
    assert p._plan(env(mda_method="file", mda_file="/var/log/mail.copy"), c.actions["a"], "/h", "alice") \
        == ("file", "/var/log/mail.copy")


def test_plan_escapes_hostile_values(tmp_path):
    c = parsed(tmp_path, 'action "a" mda "deliver %{sender} %{rcpt} %{rcpt.user}"\n')
    hostile = env(sender='"$(touch /tmp/x)"@remote.test', rcpt="`id`;x|y&z@example.test")
    method, command = planner(c)._plan(hostile, c.actions["a"], "/h", "alice")
    assert method == "mda"
    assert not set(command) & set(";`$|&()'\"\n")
    with pytest.raises(FormatError):
        planner(c)._plan(env(), parsed(tmp_path, 'action "a" forward-only\n').actions["a"], "/h", "alice")


def test_lmtp_destinations():
    import socket
    assert parse_destination("/run/dovecot/lmtp") == (socket.AF_UNIX, "/run/dovecot/lmtp")
    assert parse_destination("127.0.0.1:24") == (socket.AF_INET, ("127.0.0.1", 24))
    assert parse_destination("[::1]:24") == (socket.AF_INET6, ("::1", 24))
    assert parse_destination("lmtp.example:2424") == (socket.AF_INET, ("lmtp.example", 2424))
    for bad in ("nohostport", "host:", "host:99999", ":24", "relative/sock"):
        with pytest.raises(ValueError):
            parse_destination(bad)
