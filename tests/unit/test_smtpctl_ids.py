"""smtpctl's ids on the command line: what names a message (8 hex digits), an envelope
(16 hex digits) or everything, and the clear error (exit 1) for anything else."""
from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout

import pytest
import typer

from smtpctl import actions
from smtpctl import main as smtpctl_main
from smtpctl.format import format_bulk_result
from smtpctl.parser import CommandError, parse_command

MSG, EVP = "89abcdef", "89abcdef01234567"


@pytest.mark.parametrize("words, target", [
    (["remove", MSG], ("msgid", 0x89ABCDEF)),
    (["remove", EVP], ("evpid", 0x89ABCDEF01234567)),
    (["remove", "all"], ("all", None)),
    (["schedule", MSG.upper()], ("msgid", 0x89ABCDEF)),
    (["pause", "envelope", EVP], ("evpid", 0x89ABCDEF01234567)),
    (["resume", "envelope", "all"], ("all", None)),
    (["discover", MSG], ("msgid", 0x89ABCDEF)),
    (["discover", EVP], ("evpid", 0x89ABCDEF01234567)),
    (["uncorrupt", MSG], ("msgid", 0x89ABCDEF)),
    (["show", "message", EVP], ("evpid", 0x89ABCDEF01234567)),
    (["show", "envelope", EVP], ("evpid", 0x89ABCDEF01234567)),
])
def test_ids_name_a_message_an_envelope_or_all(words, target):
    cmd = parse_command(words)
    assert cmd.target == target
    # what smtpctl sends control: 0 = all, <= 0xffffffff = every envelope of a message
    assert actions.target_id(words[-1]) == (target[1] or 0)


def _id_error(words):
    with pytest.raises(CommandError) as info:
        parse_command(words)
    return info.value.id_error


@pytest.mark.parametrize("word", ["xyz", "1234567", "123456789", "00000000",
                                  "0000000000000000", "0123456789abcdeg", "0x123456"])
def test_bad_ids_get_a_clear_error(word):
    both = f"invalid message or envelope id: {word!r} (8 hex digits for a message, 16 for an envelope)"
    assert _id_error(["remove", word]) == both
    assert _id_error(["schedule", word]) == both
    assert _id_error(["pause", "envelope", word]) == both
    assert _id_error(["discover", word]) == both
    assert _id_error(["show", "message", word]) == both
    assert _id_error(["show", "envelope", word]) == (
        f"invalid envelope id: {word!r} (an envelope id is 16 hex digits)")
    assert _id_error(["uncorrupt", word]) == f"invalid message id: {word!r} (a message id is 8 hex digits)"
    assert _id_error(["show", "queue", word]) == f"invalid message id: {word!r} (a message id is 8 hex digits)"


def test_kind_mismatch_is_an_id_error():
    assert _id_error(["show", "envelope", MSG]).startswith("invalid envelope id: '89abcdef'")
    assert _id_error(["uncorrupt", EVP]).startswith("invalid message id: '89abcdef01234567'")


@pytest.mark.parametrize("words", [["remove"], ["frobnicate"], ["show", "envelope"],
                                   ["resume", "route", "0"], ["remove", "all", "x"]])
def test_other_failures_are_not_id_errors(words):
    assert _id_error(words) is None


def _run(words, sock):
    out, err, code = io.StringIO(), io.StringIO(), 0
    with redirect_stdout(out), redirect_stderr(err):
        try:
            smtpctl_main.run(words, sock, False)
        except typer.Exit as exc:
            code = exc.exit_code
    return code, out.getvalue(), err.getvalue()


def test_bad_id_exits_1_before_connecting(tmp_path):
    sock = str(tmp_path / "none.sock")        # nothing listens: a connection attempt would say so
    assert _run(["remove", "zz"], sock) == (
        1, "", "smtpctl: invalid message or envelope id: 'zz' (8 hex digits for a message, 16 for an envelope)\n")
    assert _run(["show", "envelope", MSG], sock)[0] == 1
    # a grammar failure that is not about an id keeps OpenSMTPD's text and status 255
    code, _, err = _run(["remove"], sock)
    assert code == 255 and err.startswith("possibilities are:\nremove <evpid>\n")
    # a well-formed id does try the daemon
    assert _run(["remove", MSG], sock) == (1, "", "smtpctl: smtpd doesn't seem to be running\n")


@pytest.mark.parametrize("verb", ["paused", "resumed", "scheduled", "removed"])
def test_envelope_counts(verb):
    assert [format_bulk_result(verb, n) for n in (0, 1, 2)] == [
        f"0 envelope {verb}", f"1 envelope {verb}", f"2 envelopes {verb}"]


def test_discover_count_plural_rule():
    assert [format_bulk_result("discovered", n) for n in (0, 1, 2)] == [
        "0 envelopes discovered", "1 envelope discovered", "2 envelopes discovered"]


def test_every_envelope_command_has_its_verb():
    assert actions.ENVELOPE_VERBS == {"pause envelope": "paused", "resume envelope": "resumed",
                                           "schedule": "scheduled", "remove": "removed"}
