"""Builtin filters (smtpd/filter_builtin.py): every condition, negation, table and regex
lookups through the daemon's own table set, every decision, the phases OpenSMTPD evaluates."""
from __future__ import annotations

import pytest

from smtpd.config import Config, Table
from smtpd.lka_filter import Facts
import dataclasses

from smtpd.config import Filter, FilterCheck
from smtpd.filter_builtin import (
    PROCEED, Decision, Verdict, client_address, evaluate, has_rdns, matches,
    src_text)
from smtpd.ruleset import TableSet

TABLES = {
    "nets": ["192.0.2.0/24", "2001:db8::/32"],
    "names": ["mx.example.org", "*.spam.test"],
    "badhelo": ["^localhost$", "^[0-9.]+$", "(?i)^friend"],
    "senders": ["spammer@example.net", "@junk.test"],
    "traps": ["trap@example.org"],
    "rxaddr": ["^bulk-[0-9]+@"],
    "users": ["alice"],
    "creds": {"carol": "$6$hash"},
    "rxsrc": [r"^\[2001:db8:"],
}


@pytest.fixture
def tables() -> TableSet:
    config = Config(file="smtpd.conf", hostname="mx.example.test")
    for name, values in TABLES.items():
        config.tables[name] = Table(name, "static", None, values)
    return TableSet(config)


def spec(phase: str, what: str, table: str | None = None, *, regex: bool = False,
         negate: bool = False, action: str = "reject", text: str | None = "550 go away"):
    return Filter(name="f", kind="builtin", phase=phase,
                  check=FilterCheck(kind=what, negate=negate, regex=regex, table=table),
                  action=action, action_text=text or "")


# lka_filter.Facts, as lka fills it: src with its port, as the link-connect report has it
CLEAN = Facts(src="198.51.100.7:40000", rdns="mail.example.com", fcrdns=True, helo="mail.example.com",
              mail_from="someone@example.com", username=None)


def facts(**changes) -> Facts:
    return dataclasses.replace(CLEAN, **changes)


REJECT = Decision(Verdict.REJECT, "550 go away")


# --- conditions ---------------------------------------------------------------------------

@pytest.mark.parametrize("fcrdns, holds", [
    ("pass", True), ("fail", False), ("error", False), (True, True), (False, False)])
def test_fcrdns_holds_only_when_the_forward_lookup_confirmed(tables, fcrdns, holds):
    f = facts(fcrdns=fcrdns)
    assert evaluate(spec("connect", "fcrdns"), "connect", f, tables) == (REJECT if holds else PROCEED)
    assert evaluate(spec("connect", "fcrdns", negate=True), "connect", f, tables) == (
        PROCEED if holds else REJECT)


@pytest.mark.parametrize("rdns, holds", [
    ("mail.example.com", True), ("<unknown>", False), ("", False),
    ("192.0.2.1", False), ("2001:db8::1", False), ("[2001:db8::1]", False)])
def test_rdns_holds_for_a_name_not_for_a_failure_or_an_address(tables, rdns, holds):
    assert has_rdns(rdns) is holds
    assert evaluate(spec("connect", "rdns"), "connect", facts(rdns=rdns), tables) == (
        REJECT if holds else PROCEED)
    assert evaluate(spec("connect", "rdns", negate=True), "connect", facts(rdns=rdns), tables) == (
        PROCEED if holds else REJECT)


@pytest.mark.parametrize("rdns, holds", [
    ("mx.example.org", True), ("MX.Example.ORG", True), ("a.b.spam.test", True),
    ("mx.example.com", False), ("<unknown>", False)])
def test_rdns_table_matches_domains_and_wildcards(tables, rdns, holds):
    assert evaluate(spec("helo", "rdns", "names"), "helo", facts(rdns=rdns), tables) == (
        REJECT if holds else PROCEED)


@pytest.mark.parametrize("src, holds", [
    ("192.0.2.55", True), ("198.51.100.7", False), ("2001:db8::25", True), ("::1", False),
    ("local", False)])
def test_src_table_matches_networks(tables, src, holds):
    assert evaluate(spec("connect", "src", "nets"), "connect", facts(src=src), tables) == (
        REJECT if holds else PROCEED)
    assert evaluate(spec("connect", "src", "nets", negate=True), "connect", facts(src=src),
                    tables) == (PROCEED if holds else REJECT)


@pytest.mark.parametrize("src, holds", [
    ("192.0.2.55:40123", True), ("[2001:db8::25]:25", True), ("198.51.100.7:25", False),
    ("unix:/var/run/smtpd.sock", False)])
def test_src_given_with_a_port_as_link_connect_reports_it(tables, src, holds):
    assert evaluate(spec("connect", "src", "nets"), "connect", facts(src=src), tables) == (
        REJECT if holds else PROCEED)
    assert client_address(src) in ("192.0.2.55", "2001:db8::25", "198.51.100.7", "local")


def test_src_regex_sees_ipv6_in_brackets_as_opensmtpd_prints_it(tables):
    assert src_text("2001:db8::25") == "[2001:db8::25]"
    assert src_text("192.0.2.1") == "192.0.2.1" and src_text("local") == "local"
    s = spec("connect", "src", "rxsrc", regex=True)
    assert evaluate(s, "connect", facts(src="2001:db8::25"), tables) == REJECT
    assert evaluate(s, "connect", facts(src="2001:db9::25"), tables) == PROCEED


@pytest.mark.parametrize("helo, holds", [
    ("localhost", True), ("LOCALHOST", True), ("10.1.2.3", True), ("Friendly.example", True),
    ("mail.example.com", False), ("localhost.example", False)])
def test_helo_regex(tables, helo, holds):
    s = spec("helo", "helo", "badhelo", regex=True)
    assert evaluate(s, "helo", facts(helo=helo), tables) == (REJECT if holds else PROCEED)


def test_helo_table_and_its_negation(tables):
    s = spec("ehlo", "helo", "names")
    assert evaluate(s, "ehlo", facts(helo="x.spam.test"), tables) == REJECT
    assert evaluate(s, "ehlo", facts(helo="mail.example.com"), tables) == PROCEED
    n = spec("ehlo", "helo", "names", negate=True)
    assert evaluate(n, "ehlo", facts(helo="mail.example.com"), tables) == REJECT


def test_a_fact_not_known_yet_is_not_found_and_its_negation_holds(tables):
    before_helo = facts(helo=None, mail_from=None)
    assert evaluate(spec("mail-from", "helo", "names"), "mail-from", before_helo, tables) == PROCEED
    assert evaluate(spec("mail-from", "helo", "names", negate=True), "mail-from", before_helo,
                    tables) == REJECT
    assert evaluate(spec("data", "mail-from", "senders"), "data", before_helo, tables) == PROCEED


@pytest.mark.parametrize("sender, holds", [
    ("spammer@example.net", True), ("Spammer@Example.NET", True), ("anyone@junk.test", True),
    ("spammer@example.com", False), ("", False)])
def test_mail_from_table_matches_addresses_and_domains(tables, sender, holds):
    s = spec("mail-from", "mail-from", "senders")
    assert evaluate(s, "mail-from", facts(mail_from=sender), tables) == (REJECT if holds else PROCEED)


def test_mail_from_regex(tables):
    s = spec("mail-from", "mail-from", "rxaddr", regex=True)
    assert evaluate(s, "mail-from", facts(mail_from="bulk-42@example.net"), tables) == REJECT
    assert evaluate(s, "mail-from", facts(mail_from="bulk@example.net"), tables) == PROCEED


def test_rcpt_to_looks_at_the_command_s_address_in_the_rcpt_to_phase_only(tables):
    s = spec("rcpt-to", "rcpt-to", "traps")
    assert evaluate(s, "rcpt-to", facts(), tables, param="trap@example.org") == REJECT
    assert evaluate(s, "rcpt-to", facts(), tables, param="Trap@Example.ORG") == REJECT
    assert evaluate(s, "rcpt-to", facts(), tables, param="bob@example.org") == PROCEED
    assert evaluate(s, "rcpt-to", facts(), tables) == PROCEED              # no address given
    data = spec("data", "rcpt-to", "traps")
    assert evaluate(data, "data", facts(), tables, param="trap@example.org") == PROCEED
    rx = spec("rcpt-to", "rcpt-to", "rxaddr", regex=True, negate=True)
    assert evaluate(rx, "rcpt-to", facts(), tables, param="bulk-1@example.org") == PROCEED
    assert matches(rx, "rcpt-to", facts(), tables, param="bob@example.org") is True


def test_auth_plain_and_with_tables(tables):
    assert evaluate(spec("mail-from", "auth"), "mail-from", facts(username="alice"), tables) == REJECT
    assert evaluate(spec("mail-from", "auth"), "mail-from", facts(username=None), tables) == PROCEED
    assert evaluate(spec("mail-from", "auth", negate=True), "mail-from", facts(), tables) == REJECT
    listed = spec("rcpt-to", "auth", "users")
    assert evaluate(listed, "rcpt-to", facts(username="Alice"), tables) == REJECT
    assert evaluate(listed, "rcpt-to", facts(username="bob"), tables) == PROCEED
    assert evaluate(listed, "rcpt-to", facts(username=None), tables) == PROCEED
    creds = spec("data", "auth", "creds")          # a credentials table: its users are keys
    assert evaluate(creds, "data", facts(username="carol"), tables) == REJECT


# --- decisions ----------------------------------------------------------------------------

@pytest.mark.parametrize("action, text, expected", [
    ("reject", "550 5.7.1 no", Decision(Verdict.REJECT, "550 5.7.1 no")),
    ("disconnect", "421 bye", Decision(Verdict.DISCONNECT, "421 bye")),
    ("rewrite", "postmaster@example.org", Decision(Verdict.REWRITE, "postmaster@example.org")),
    ("report", "suspicious", Decision(Verdict.REPORT, "suspicious")),
    ("junk", None, Decision(Verdict.JUNK)),
    ("bypass", None, Decision(Verdict.BYPASS)),
])
def test_each_decision_when_the_condition_holds(tables, action, text, expected):
    s = spec("connect", "rdns", negate=True, action=action, text=text)
    assert evaluate(s, "connect", facts(rdns="<unknown>"), tables) == expected
    assert evaluate(s, "connect", facts(), tables) == PROCEED


def test_which_decisions_end_the_chain():
    # report goes on to the next filter (lka_filter.c does not return after reporting)
    assert not PROCEED.ends_chain and not Decision(Verdict.REPORT, "x").ends_chain
    for verdict in (Verdict.BYPASS, Verdict.JUNK, Verdict.REJECT, Verdict.DISCONNECT, Verdict.REWRITE):
        assert Decision(verdict, "x").ends_chain


# --- phases -------------------------------------------------------------------------------

def test_a_filter_answers_only_at_its_own_phase(tables):
    s = spec("helo", "rdns", negate=True)
    no_rdns = facts(rdns="<unknown>")
    assert evaluate(s, "helo", no_rdns, tables) == REJECT
    assert evaluate(s, "ehlo", no_rdns, tables) == PROCEED
    assert evaluate(s, "mail-from", no_rdns, tables) == PROCEED


def test_phase_objects_of_the_protocol_core_are_accepted(tables):
    from smtpd.smtp_proto import Phase
    assert evaluate(spec("mail-from", "rdns", negate=True), Phase.MAIL_FROM,
                    facts(rdns="<unknown>"), tables) == REJECT


@pytest.mark.parametrize("phase", ["auth", "starttls", "data-line", "rset", "quit", "noop"])
def test_builtins_never_act_where_opensmtpd_has_no_builtin(tables, phase):
    # lka_filter.c filter_execs[]: filter_builtins_notimpl at these phases
    assert evaluate(spec(phase, "rdns", negate=True), phase, facts(rdns="<unknown>"), tables) == PROCEED


def test_unknown_condition_is_a_bug_not_a_silent_pass(tables):
    with pytest.raises(ValueError):
        evaluate(spec("connect", "tag", "names"), "connect", facts(), tables)
