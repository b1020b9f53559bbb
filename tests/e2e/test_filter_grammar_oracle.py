"""The builtin filter grammar (smtpd/parse_filter.py) against OpenSMTPD 6.8's own parser: every
phase x check x action of ``filter NAME phase PHASE match CHECK ACTION`` is given to both, and
each line must be accepted by both or refused by both.

The oracle reads all the lines from one file with ``smtpd -n`` (parse.y's ``grammar error '\\n'``
recovers at the end of a line, so every refused line is reported as ``FILE:LINE: ...``); pysmtpd
parses each line in a file of its own, so one verdict cannot hide another.
"""
from __future__ import annotations

import re
import subprocess
from itertools import product

from smtpd.config import ConfigError
from smtpd.parse import parse_config
from tests.oracle import opensmtpd

TABLE = 'table t { "a", "b" }\n'
RULES = 'action "a" maildir\nmatch from any for any action "a"\n'

# Phases parse.y knows and some it does not (data-line, quit: commented out of its grammar).
PHASES = ("connect", "helo", "ehlo", "auth", "mail-from", "rcpt-to", "data", "commit",
          "data-line", "quit")
CHECKS = tuple(f"{neg}{check}" for neg, check in product(("", "!"), (
    "fcrdns", "fcrdns <t>", "fcrdns regex <t>",
    "rdns", "rdns <t>", "rdns regex <t>",
    "src", "src <t>", "src regex <t>",
    "helo", "helo <t>", "helo regex <t>",
    "auth", "auth <t>", "auth regex <t>",
    "mail-from", "mail-from <t>", "mail-from regex <t>",
    "rcpt-to", "rcpt-to <t>", "rcpt-to regex <t>")))
ACTIONS = ("junk", "bypass", 'reject "550 no"', 'disconnect "421 bye"', 'rewrite "x"',
           'report "seen"', "reject", "frobnicate")
LINES = [f'filter f{n} phase {phase} match {check} {action}'
         for n, (phase, check, action) in enumerate(product(PHASES, CHECKS, ACTIONS))]


def refused_by_opensmtpd(tmp_path) -> set[int]:
    """Indexes into LINES of the lines OpenSMTPD 6.8 refuses."""
    try:
        oracle = opensmtpd.OpenSmtpd.prepare(tmp_path, TABLE + "\n".join(LINES) + "\n" + RULES)
    except opensmtpd.Unavailable as exc:
        opensmtpd.unavailable(str(exc))
    res = subprocess.run([str(oracle.smtpd), "-n", "-f", str(oracle.config)],
                         capture_output=True, text=True, timeout=120)
    errors = re.findall(rf"^{re.escape(str(oracle.config))}:(\d+): (.*)$", res.stderr, re.M)
    assert res.returncode != 0 and errors, res.stderr
    # Only grammar errors are expected: anything else would mean the test's config is wrong.
    assert {message for _line, message in errors} == {"syntax error"}, res.stderr
    first = TABLE.count("\n") + 1
    return {int(line) - first for line, _message in errors}


def refused_by_pysmtpd(tmp_path) -> set[int]:
    refused = set()
    path = tmp_path / "smtpd.conf"
    for n, line in enumerate(LINES):
        path.write_text(TABLE + line + "\n" + RULES)
        try:
            parse_config(path)
        except ConfigError as err:
            assert err.line == 2, (line, err.line, err.message)
            refused.add(n)
    return refused


def test_builtin_filter_grammar_matches_opensmtpd(tmp_path):
    (tmp_path / "oracle").mkdir()
    theirs = refused_by_opensmtpd(tmp_path / "oracle")
    ours = refused_by_pysmtpd(tmp_path)
    # Both accept some and refuse some: a verdict that never varies would prove nothing.
    assert 0 < len(theirs) < len(LINES)
    only_ours = sorted(LINES[n] for n in ours - theirs)
    only_theirs = sorted(LINES[n] for n in theirs - ours)
    assert (only_ours, only_theirs) == ([], []), "refused by one parser only"
    # The cases the gap was about, named so that they cannot drift out of LINES.
    for line in ("filter f{} phase commit match rdns bypass", "filter f{} phase commit match rdns junk"):
        assert any(re.fullmatch(line.format(r"\d+"), LINES[n]) for n in theirs & ours)

