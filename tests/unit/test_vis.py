"""common/vis.py: strnvis(3) flag for flag, and log_text, the escape of every log
line's client text.  Expected values are worked out by hand from OpenBSD's vis.c."""
from __future__ import annotations

import pytest

from common.vis import (
    AUTH_USER, COMMAND, MDA_OUTPUT, VIS_DQ, VIS_GLOB, VIS_NOSLASH, VIS_OCTAL, VIS_SAFE, VIS_WHITE,
    log_text, strnvis,
)


@pytest.mark.parametrize("raw, flags, expected", [
    # flags 0 (smtpctl): blanks stay, controls in ^ form, 8-bit in M- form
    ("a b\tc\n", 0, "a b\tc\n"),
    ("\r\x1b\x7f", 0, "\\^M\\^[\\^?"),
    ("\\", 0, "\\\\"),
    ("\xe9", 0, "\\M-C\\M-)"),                 # U+00E9 is the bytes C3 A9
    (b"\xa0\xff\x80", 0, "\\240\\M^?\\M^@"),     # 0xa0: a meta space, in octal
    # VIS_WHITE | VIS_SAFE (smtp_session.c's authentication user=): blanks encoded;
    # a space in octal, as vis.c does for any byte whose low 7 bits are a space
    ("a b\tc\n", AUTH_USER, "a\\040b\\^Ic\\^J"),
    ("\r\x07\x08", AUTH_USER, "\r\x07\x08"),     # VIS_SAFE leaves these three
    # VIS_SAFE | VIS_CSTYLE (failed-command command=)
    ("a b\t\x1b", COMMAND, "a b\t\\^["),           # a tab is not encoded
    ("\x0b\x0c", COMMAND, "\\v\\f"),
    # VIS_SAFE | VIS_CSTYLE | VIS_NL (mda.c): a newline as \n
    ("x\ny", MDA_OUTPUT, "x\\ny"),
    ("a b", VIS_WHITE | VIS_SAFE | COMMAND, "a\\sb"),
    ("\r\xe9", VIS_OCTAL, "\\015\\303\\251"),
    ('say "hi"', VIS_DQ, 'say \\"hi\\"'),
    ("\r\\", VIS_NOSLASH, "^M\\"),
    ("a*?[#", VIS_GLOB, "a\\052\\077\\133\\043"),
])
def test_strnvis_flags(raw, flags, expected):
    assert strnvis(raw, flags=flags) == expected


def test_strnvis_is_a_c_string_and_truncates_on_whole_encodings():
    assert strnvis("ab\0cd") == "ab"
    assert strnvis("a" * 5000) == "a" * 2047
    assert strnvis("ab\r", size=5) == "ab"          # "\^M" would not fit in 4
    assert strnvis("ab\r", size=6) == "ab\\^M"
    assert strnvis("a\\", size=3) == "a"            # nor a doubled backslash in 2


@pytest.mark.parametrize("raw, expected", [
    ("bob", "bob"),
    ("a\0b", "a\\^@b"),                    # NUL: the rest is kept, not cut
    ("a\rb", "a\\^Mb"),                    # CR encoded, unlike VIS_SAFE's strnvis
    ("a\nFAKE: line", "a\\^JFAKE:\\040line"),
    ("\x1b[31mred", "\\^[[31mred"),        # ESC: no terminal sequence gets through
    ("back\\slash", "back\\\\slash"),
    ("caf\xe9 \u2603", "caf\\M-C\\M-)\\040\\M-b\\M^X\\M^C"),
    (b"\xff\xfe", "\\M^?\\M-~"),           # bytes that are not UTF-8
    ("bad\udcffbyte", "bad\\M^?byte"),     # a surrogate escape is its byte again
])
def test_log_text_default_is_the_authentication_flags(raw, expected):
    assert log_text(raw) == expected


def test_log_text_with_the_command_flags():
    assert log_text("MAIL FROM:<a\rb>", COMMAND) == "MAIL FROM:<a\\rb>"
    assert log_text("a\nb", COMMAND) == "a\\nb"        # a newline never passes raw
    assert log_text("x\0" + "1", COMMAND) == "x\\0001"  # \0 before an octal digit: \000
    assert log_text("x\0y", COMMAND) == "x\\0y"


def test_log_text_truncates_on_whole_encodings():
    assert log_text("a" * 5000) == "a" * 2047
    assert log_text("abcdef", size=5) == "abcd"
    assert log_text("abc\r", size=6) == "abc"           # "\^M" is 3 more: 6 > 5
    assert log_text("ab\\", size=4) == "ab"
    assert log_text("ab\\", size=5) == "ab\\\\"


def test_log_text_output_is_one_printable_line():
    every_byte = bytes(range(256))
    out = log_text(every_byte, size=10_000)
    assert out.isascii() and out.isprintable()
    assert log_text(every_byte, COMMAND, size=10_000).replace("\t", "").isprintable()
