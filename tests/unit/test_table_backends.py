"""Table backends that answer at once (smtpd/table/: static, file format, db, getpwnam),
the configuration's table statements and use checks (smtpd/parse_table.py), and rule
matching over the sync and async interfaces (smtpd/ruleset.py)."""
from __future__ import annotations

import asyncio
import os
import pwd
import time

import pytest

from smtpd.config import ConfigError
from smtpd.parse import parse_config
from smtpd.ruleset import MatchContext, match, match_async
from smtpd.table import TableSet
from smtpd.table.db import DbFile, DbTable
from smtpd.table.file_format import MalformedTable, parse_table_text
from smtpd.table.getpwnam import GetpwnamTable
from smtpd.table.static import StaticTable
from smtpctl import mapfiles as makemap


# --- table(5) files ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, kind, entries", [
    ("a\nB\n", "list", [("a", None), ("b", None)]),
    ("root: alice\nTeam:  alice, bob\n", "hash", [("root", "alice"), ("team", "alice, bob")]),
    ("key\tvalue with spaces\n", "hash", [("key", "value with spaces")]),
    ("# comment\n\n  x  y \n", "hash", [("x", "y")]),
    ("# @list\nfirst entry\n", "list", [("first entry", None)]),
    ("[IPv6:::1] host\n", "hash", [("[ipv6:::1]", "host")]),     # brackets keep colons
    ("", "hash", []),                                    # an empty file is an empty map
])
def test_file_format(text, kind, entries):
    assert parse_table_text(text) == (kind, entries)


@pytest.mark.parametrize("text, line", [("a b\nlonely\n", 2), ("x: \n", 1), ("[::1 x\n", 1)])
def test_malformed_map_lines(text, line):
    with pytest.raises(MalformedTable) as err:
        parse_table_text(text)
    assert err.value.lineno == line


# --- static -----------------------------------------------------------------------------------

def test_static_lookup_check_and_matching():
    t = StaticTable("t", {"Alice": "a@example.test", "*.example.org": "relay", "10.0.0.0/8": "net"})
    assert t.lookup_now("alias", "ALICE") == "a@example.test"
    assert t.lookup_now("domain", "mx.example.org") == "relay"
    assert t.lookup_now("netaddr", "10.1.2.3") == "net"
    assert t.lookup_now("alias", "bob") is None
    assert t.check_now("domain", "a.example.org") and not t.check_now("domain", "example.com")
    lst = StaticTable("l", ["@example.test", "192.0.2.0/24"])
    assert lst.check_now("mailaddr", "x@example.test") and lst.check_now("netaddr", "192.0.2.9")
    assert [lst.fetch_now("source") for _ in range(3)] == ["@example.test", "192.0.2.0/24", "@example.test"]
    assert asyncio.run(t.lookup("alias", "alice")) == "a@example.test"      # the awaitable face


# --- db (makemap's files) --------------------------------------------------------------------

def test_makemap_db_is_read_by_the_db_table_and_reopened_when_replaced(tmp_path):
    src = tmp_path / "aliases"
    src.write_text("Root: alice\nteam: alice, bob\n")
    assert makemap.makemap(["-t", "aliases", str(src)]) == 0
    table = DbTable("aliases", str(tmp_path / "aliases.db"))
    asyncio.run(table.open())
    assert table.lookup_now("alias", "ROOT") == "alice"
    assert table.lookup_now("alias", "team") == "alice, bob"
    assert table.lookup_now("alias", "nobody") is None
    assert table.check_now("alias", "team")
    time.sleep(0.01)
    src.write_text("team: bob\n")
    assert makemap.makemap(["-t", "aliases", str(src)]) == 0
    os.utime(tmp_path / "aliases.db", (time.time() + 5, time.time() + 5))   # a new mtime for sure
    assert table.lookup_now("alias", "team") == "bob"                       # reopened
    assert table.lookup_now("alias", "root") is None


def test_makemap_set_plain_and_refusals(tmp_path, capsys):
    src = tmp_path / "domains"
    src.write_text("example.test\nExample.ORG\n")
    assert makemap.makemap(["-t", "set", "-o", str(tmp_path / "d.db"), str(src)]) == 0
    db = DbFile(str(tmp_path / "d.db"))
    assert dict(db.items()) == {b"example.test\0": b"<set>\0", b"example.org\0": b"<set>\0"}
    db.close()
    (tmp_path / "dup").write_text("a x\nA y\n")
    assert makemap.makemap([str(tmp_path / "dup")]) == 1
    assert "duplicate entry for a" in capsys.readouterr().err
    (tmp_path / "bad").write_text("a x\nlonely\n")
    assert makemap.makemap([str(tmp_path / "bad")]) == 1
    assert f"{tmp_path}/bad:2: invalid entry" in capsys.readouterr().err
    assert not (tmp_path / "bad.db").exists() and not list(tmp_path.glob("bad.db.*"))
    (tmp_path / "empty").write_text("")
    assert makemap.makemap([str(tmp_path / "empty")]) == 0
    assert "warning: empty map created" in capsys.readouterr().err
    assert makemap.makemap(["-U", str(tmp_path / "d.db")]) == 0
    assert sorted(capsys.readouterr().out.splitlines()) == ["example.org\t<set>", "example.test\t<set>"]
    assert makemap.makemap(["-t", "nope", str(src)]) == 1
    assert makemap.makemap([]) == 1
    assert "usage: makemap [-U] [-d dbtype] [-o dbfile] [-t type] file" in capsys.readouterr().err


def test_makemap_carries_the_sources_mode(tmp_path):
    src = tmp_path / "secrets"
    src.write_text("bob bob:secret\n")
    src.chmod(0o640)
    assert makemap.makemap([str(src)]) == 0
    assert (tmp_path / "secrets.db").stat().st_mode & 0o777 == 0o640


def test_getpwnam():
    root = pwd.getpwnam("root")
    t = GetpwnamTable("getpwnam")
    assert t.lookup_now("userinfo", "ROOT") == f"{root.pw_uid}:{root.pw_gid}:{root.pw_dir}"
    assert t.lookup_now("userinfo", "no-such-user-here") is None
    assert t.lookup_now("alias", "root") is None


# --- the configuration's table statements ----------------------------------------------------

RULES = 'action "a" maildir\nmatch from any for any action "a"\n'


def conf(tmp_path, text: str):
    path = tmp_path / "smtpd.conf"
    path.write_text(text + RULES)
    return path


def refusal(tmp_path, text: str) -> str:
    with pytest.raises(ConfigError) as err:
        parse_config(conf(tmp_path, text))
    return str(err.value)


def test_a_list_cannot_be_an_alias_table(tmp_path):
    (tmp_path / "one").write_text("alice\nbob\n")
    text = f'table aliases file:{tmp_path}/one\naction "l" maildir alias <aliases>\n'
    assert refusal(tmp_path, text) == \
        f'{tmp_path}/smtpd.conf:2: table "aliases" may not be used for alias lookups'
    assert refusal(tmp_path, 'action "l" maildir virtual { a, b }\n').endswith(
        'may not be used for virtual lookups')
    assert refusal(tmp_path, 'action "l" maildir alias <getpwnam>\n').endswith(
        'table "getpwnam" may not be used for alias lookups')
    assert refusal(tmp_path, 'table u { alice }\naction "l" maildir userbase <u>\n').endswith(
        'table "u" may not be used for userbase lookups')


def test_malformed_file_and_bad_db_are_refused_at_their_line(tmp_path):
    (tmp_path / "map").write_text("a b\nlonely\n")
    assert refusal(tmp_path, f"table t file:{tmp_path}/map\n") == \
        f"{tmp_path}/smtpd.conf:1: invalid configuration file {tmp_path}/map for table t: line 2: invalid map entry"
    (tmp_path / "x.db").write_text("not a db at all, but long enough to be looked at\n")
    assert "invalid configuration file" in refusal(tmp_path, f"\ntable t db:{tmp_path}/x.db\n")
    assert refusal(tmp_path, "table t proc:/no/such/program\n").endswith(
        "/no/such/program: not an executable file given by its absolute path")


def test_table_kinds_in_the_model(tmp_path):
    (tmp_path / "aliases").write_text("root: alice\n")
    (tmp_path / "src").write_text("root: alice\n")
    assert makemap.makemap([str(tmp_path / "src")]) == 0
    config = parse_config(conf(tmp_path, f"table a file:{tmp_path}/aliases\ntable d db:{tmp_path}/src.db\n"
                                         "table p getpwnam\ntable x sqlite:/etc/mail/sqlite.conf\n"
                                         'table i { "@" = "vmail" }\n'))
    t = config.tables
    assert (t["a"].backend, t["a"].kind, t["a"].values) == ("static", "hash", {"root": "alice"})
    assert (t["d"].backend, t["d"].source) == ("db", f"{tmp_path}/src.db")
    assert t["p"].backend == "getpwnam"
    assert t["x"].backend == "sqlite" and t["x"].command is None       # no table-sqlite here
    assert any('table backend "sqlite"' in note for note in config.not_applied)
    tables = TableSet(config)
    assert tables.get("<d>").lookup_now("alias", "root") == "alice"
    assert tables.get("i").lookup_now("virtual", "@") == "vmail"


def test_sync_and_async_matching_agree(tmp_path):
    config = parse_config(conf(tmp_path, 'table doms { example.test }\ntable nets { 192.0.2.0/24 }\n'
                                         'action "r" relay\n'
                                         'match from src <nets> for domain <doms> action "r"\n'
                                         'match from any for domain <doms> reject\n'))
    tables = TableSet(config)
    for source, rcpt in (("192.0.2.7", "a@example.test"), ("198.51.100.1", "a@example.test"),
                         ("192.0.2.7", "a@other.test")):
        ctx = MatchContext(source=source, rdns=None, helo="h", mail_from="s@x.test", rcpt=rcpt,
                           tag=None, auth_user=None, tls=False, local_listener=False)
        sync = match(config, tables, ctx)
        assert asyncio.run(match_async(config, tables, ctx)) is sync
    assert match(config, tables, ctx).action == "a"
