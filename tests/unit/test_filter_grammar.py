"""smtpd.conf's filter grammar (smtpd/parse_filter.py), as OpenSMTPD's parse.y."""
from __future__ import annotations

import pytest

from smtpd.config import ConfigError, FilterCheck
from smtpd.parse import parse_config

TAIL = 'action "a" maildir\nmatch from any for any action "a"\n'


def parse(tmp_path, text: str):
    path = tmp_path / "smtpd.conf"
    path.write_text(text + TAIL)
    return parse_config(path)


def error(tmp_path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        parse(tmp_path, text)
    return err.value


def test_proc_exec_proc_chain_and_listener(tmp_path):
    c = parse(tmp_path, 'proc rspamd "/usr/bin/filter-rspamd" user _rspamd group _rspamd chroot "/var/empty"\n'
                        'filter rspamd proc rspamd\n'
                        'filter dkim proc-exec "filter-dkimsign -d example.org -s s1 -k /etc/key" user _dkim\n'
                        'filter check_rdns phase connect match !rdns disconnect "550 no rDNS"\n'
                        'filter all chain { check_rdns, rspamd, dkim }\n'
                        'listen on 127.0.0.1 filter all\n'
                        'listen on 127.0.0.1 port 2525 filter { check_rdns, dkim }\n')
    assert c.filter_procs["rspamd"].user == "_rspamd" and c.filter_procs["rspamd"].chroot == "/var/empty"
    assert c.filter_procs["dkim"].command.startswith("filter-dkimsign") and c.filter_procs["dkim"].user == "_dkim"
    assert c.filters["dkim"].kind == "proc" and c.filters["dkim"].proc == "dkim"
    rdns = c.filters["check_rdns"]
    assert (rdns.kind, rdns.phase, rdns.check, rdns.action, rdns.action_text) == (
        "builtin", "connect", FilterCheck("rdns", negate=True), "disconnect", "550 no rDNS")
    assert c.filters["all"].chain == ["check_rdns", "rspamd", "dkim"]
    assert c.listeners[0].filter == "all"
    anon = c.listeners[1].filter
    assert anon == "<dynchain:00000000>" and c.filters[anon].chain == ["check_rdns", "dkim"]
    assert c.not_applied == []


@pytest.mark.parametrize("line, check, action", [
    ('filter f phase connect match fcrdns junk', FilterCheck("fcrdns"), ("junk", "")),
    ('filter f phase helo match helo regex { "^[0-9.]+$" } reject "550 bad helo"',
     FilterCheck("helo", regex=True, table="anon:1:1"), ("reject", "550 bad helo")),
    ('filter f phase mail-from match !auth bypass', FilterCheck("auth", negate=True), ("bypass", "")),
    ('filter f phase data match rdns bypass', FilterCheck("rdns"), ("bypass", "")),
    ('filter f phase rcpt-to match rcpt-to <t> report "seen"', FilterCheck("rcpt-to", table="t"), ("report", "seen")),
    ('filter f phase commit match src <t> rewrite "x"', FilterCheck("src", table="t"), ("rewrite", "x")),
    ('filter f builtin data match mail-from regex <t> junk', FilterCheck("mail-from", regex=True, table="t"), ("junk", "")),
])
def test_builtin_checks_and_actions(tmp_path, line, check, action):
    c = parse(tmp_path, "table t { a, b }\n" + line + "\n")
    f = c.filters["f"]
    assert f.kind == "builtin" and (f.action, f.action_text) == action
    if check.table and check.table.startswith("anon"):
        check.table = f.check.table
        assert f.check.table in c.tables
    assert f.check == check


@pytest.mark.parametrize("text, message", [
    ('filter f proc nope\n', "no processor exist with that name: nope"),
    ('filter f proc-exec "a"\nfilter f proc-exec "b"\n', "filter already exists with that name: f"),
    ('proc p "a"\nproc p "b"\n', "processor already exists with that name: p"),
    ('proc p "a" user x user y\n', "user already specified for this processor"),
    ('filter f phase connect match helo <t> junk\n', '"helo" cannot be checked at phase connect'),
    ('filter f phase commit match rdns junk\n', 'unexpected "junk"'),
    ('filter f phase commit match rdns bypass\n', 'unexpected "bypass"'),
    ('filter f phase commit match rdns frobnicate\n', 'expected one of: reject, disconnect, rewrite, report'),
    ('filter f phase connect match rdns reject\n', "expected the reject text"),
    ('filter f phase connect match src junk\n', "src needs a <table>"),
    ('filter f phase nowhere match rdns junk\n', 'expected a filter phase'),
    ('filter f chain { g }\n', "no filter exist with that name: g"),
    ('filter a proc-exec "x"\nfilter c chain { a }\nfilter d chain { c }\n', "no filter chain allowed within a filter chain: c"),
    ('filter a proc-exec "x"\nfilter c chain { a, a }\n', "no filter allowed twice within a filter chain: a"),
    ('proc p "x"\nfilter a proc p\nfilter b proc p\nfilter c chain { a, b }\n', "no proc allowed twice within a filter chain: p"),
    ('listen on 127.0.0.1 filter nope\n', "no filter exist with that name: nope"),
    ('filter f frobnicate\n', 'expected one of: proc, proc-exec, phase, chain'),
])
def test_errors_name_the_line(tmp_path, text, message):
    err = error(tmp_path, "table t { a }\n" + text)
    assert message in err.message and err.line == text.count("\n") + 1, (err.line, err.message)


def test_filter_timeout_limit(tmp_path):
    assert parse(tmp_path, "smtp limit filter-timeout 5s\n").filter_timeout == 5
    assert parse(tmp_path, "").filter_timeout == 60


def test_a_reload_that_changes_filters_is_refused(tmp_path):
    from smtpd.filter_proc import filters_changed
    a = parse(tmp_path, 'filter f proc-exec "a"\nlisten on 127.0.0.1 filter f\n')
    same = parse(tmp_path, '# moved down a line\nfilter f proc-exec "a"\nlisten on 127.0.0.1 port 26 filter f\n')
    other = parse(tmp_path, 'filter f proc-exec "b"\nlisten on 127.0.0.1 filter f\n')
    assert not filters_changed(a, same) and filters_changed(a, other)


def test_protocol_version_of_a_proc(tmp_path):
    c = parse(tmp_path, 'proc old "x" protocol 0.6\nfilter f proc-exec "y" protocol "0.5"\nproc new "z"\n')
    assert (c.filter_procs["old"].protocol, c.filter_procs["f"].protocol, c.filter_procs["new"].protocol) == (
        "0.6", "0.5", "0.7")
    assert "unsupported filter protocol" in error(tmp_path, 'proc p "x" protocol 0.4\n').message
