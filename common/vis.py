"""Visible forms of untrusted text: strnvis(3) as OpenBSD's libc has it
(lib/libc/gen/vis.c), for log lines and for smtpctl's output.

OpenSMTPD passes a client's text through strnvis before it logs it, with flags
chosen per line (smtp_session.c, mda.c), and smtpctl prints an envelope's error
line with flags 0 (smtpctl.c).  ``strnvis`` is that function, flag for flag;
``log_text`` is the one entry for every log line that carries text from a client
(SMTP, control, filters, tables), so that no byte a client sends can forge or
corrupt a log line.
"""
from __future__ import annotations

# vis(3) flags, with OpenBSD's values.
VIS_OCTAL = 0x01        # use octal \ddd for every encoded byte
VIS_CSTYLE = 0x02       # \n \r \b \a \v \t \f \s \0 where one applies
VIS_SP = 0x04           # encode space too
VIS_TAB = 0x08          # encode tab too
VIS_NL = 0x10           # encode newline too
VIS_WHITE = VIS_SP | VIS_TAB | VIS_NL
VIS_SAFE = 0x20         # leave BS, BEL and CR as they are
VIS_NOSLASH = 0x40      # no leading backslash
VIS_GLOB = 0x100        # encode * ? [ # too
VIS_DQ = 0x200          # backslash before a double quote
VIS_ALL = 0x400         # encode every byte

LINE_MAX = 2048         # POSIX LINE_MAX: smtpctl's errorline buffer, and log_text's default

# The flags OpenSMTPD gives each kind of client text it logs:
AUTH_USER = VIS_WHITE | VIS_SAFE                  # smtp_session.c "authentication user=%s"
COMMAND = VIS_SAFE | VIS_CSTYLE                   # smtp_session.c "failed-command command=..."
MDA_OUTPUT = VIS_SAFE | VIS_CSTYLE | VIS_NL       # mda.c: the last line an mda printed

_CSTYLE = {0x0A: "n", 0x0D: "r", 0x08: "b", 0x07: "a", 0x0B: "v", 0x09: "t", 0x0C: "f",
           0x20: "s"}


def _visible(c: int, flags: int) -> bool:
    """vis.c's isvisible() for one byte 0..255 (the C locale)."""
    if c != 0x5C and flags & VIS_ALL:
        return False
    graph = 0x21 <= c <= 0x7E
    if graph and (not flags & VIS_GLOB or chr(c) not in "*?[#"):
        return True
    return ((not flags & VIS_SP and c == 0x20) or (not flags & VIS_TAB and c == 0x09)
            or (not flags & VIS_NL and c == 0x0A)
            or bool(flags & VIS_SAFE and (c in (0x08, 0x07, 0x0D) or graph)))


def vis(c: int, flags: int = 0, nextc: int = 0) -> str:
    """vis(3): the visible encoding of the byte ``c`` (``nextc`` follows it)."""
    if _visible(c, flags):
        if (c == 0x22 and flags & VIS_DQ) or (c == 0x5C and not flags & VIS_NOSLASH):
            return "\\" + chr(c)
        return chr(c)
    if flags & VIS_CSTYLE:
        if c in _CSTYLE:
            return "\\" + _CSTYLE[c]
        if c == 0:
            return "\\000" if 0x30 <= nextc <= 0x37 else "\\0"
    if (c & 0o177) == 0x20 or flags & VIS_OCTAL or (flags & VIS_GLOB and chr(c) in "*?[#"):
        return f"\\{c:03o}"
    out = "" if flags & VIS_NOSLASH else "\\"
    if c & 0o200:
        c &= 0o177
        out += "M"
    if c < 0x20 or c == 0x7F:
        return out + "^" + ("?" if c == 0x7F else chr(c + 0x40))
    return out + "-" + chr(c)


def _encode(data: bytes, flags: int, size: int) -> str:
    """At most ``size - 1`` characters of whole encodings (strnvis's truncation: an
    encoding that does not fit is left out with everything after it)."""
    limit = size - 1
    out: list[str] = []
    used = 0
    for i, c in enumerate(data):
        enc = vis(c, flags, data[i + 1] if i + 1 < len(data) else 0)
        if used + len(enc) > limit:
            break
        out.append(enc)
        used += len(enc)
    return "".join(out)


def _bytes(text: str | bytes) -> bytes:
    # A str is UTF-8 (surrogate escapes back to the bytes they stand for): non-ASCII
    # shows as the \M-... forms of its bytes, exactly as the C code shows them.
    return text.encode("utf-8", "surrogateescape") if isinstance(text, str) else bytes(text)


def strnvis(text: str | bytes, size: int = LINE_MAX, flags: int = 0) -> str:
    """``strnvis(dst, text, size, flags)``: a C string, so the encoding stops at a NUL."""
    return _encode(_bytes(text).split(b"\0", 1)[0], flags, size)


def log_text(text: str | bytes, flags: int = AUTH_USER, size: int = LINE_MAX) -> str:
    """Printable form of a client's text in a log line: strnvis with the flags OpenSMTPD
    uses for that line (AUTH_USER: blanks encoded, so a value stays one word; COMMAND;
    MDA_OUTPUT), with two differences that a Python string and our log path need:

    - the whole text is encoded, a NUL included (a C string would end there, and
      the rest of what the client sent would vanish from the line);
    - LF is always encoded, and BS, BEL and CR are encoded even under VIS_SAFE.
      OpenSMTPD's texts cannot hold a LF where it leaves it visible (an SMTP line
      ends there), and it leaves the other three to syslogd, which on OpenBSD
      vis-encodes every line it receives; our lines go to stderr (smtpd -d) or
      straight to the syslog socket, where a raw LF would forge a line and a raw
      CR would let a client overwrite what a terminal shows.
    """
    return _encode(_bytes(text), (flags | VIS_NL) & ~VIS_SAFE, size)
