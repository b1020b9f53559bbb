"""Format specifiers for local delivery (mirrors OpenSMTPD mda_variables.c).

``expand_format()`` turns a delivery template such as ``~/Maildir/%{rcpt.user:lowercase}`` or
``/usr/local/bin/procmail -f %{mbox.from}`` into the concrete string for one envelope.

Syntax (smtpd.conf(5) "FORMAT SPECIFIERS"):

* ``%{token}`` where token is one of ``sender``, ``sender.user``, ``sender.domain``, ``rcpt``,
  ``rcpt.user``, ``rcpt.domain``, ``dest``, ``dest.user``, ``dest.domain``, ``user.username``,
  ``user.directory``, ``mbox.from``, ``mda`` (names are case-insensitive).
* ``%{token[n]}``, ``%{token[a:b]}``, ``%{token[a:]}``, ``%{token[:b]}``: substrings.  As in
  OpenSMTPD the end offset ``b`` is **inclusive** when positive (``%{rcpt.domain[0:6]}`` of
  ``example.org`` is ``example``) and a negative end drops that many trailing characters
  (``[0:-4]`` is ``example``, i.e. Python's ``s[0:-4]``).  A negative start counts from the end
  (``[-3:]`` is ``org``).  ``[-n]`` is the n-th character from the end (OpenSMTPD rejects it, a
  bug we do not copy).  A start offset past the end of a non-empty value, or a start after the
  end, is an error; an end past the string is clamped.  Empty values expand to ``""`` whatever
  the slice.
* ``%{token:mod}`` / ``%{token[a:b]:mod}``, several modifiers chained with ``|`` (OpenSMTPD's
  separator) or ``:``: ``lowercase``, ``uppercase``, ``strip`` (drop the ``+tag`` of a local
  part: ``user+tag@dom`` -> ``user@dom``), ``raw`` (no sanitising).  Modifiers apply to the whole
  value before slicing, as in OpenSMTPD.
* ``%%`` is a literal ``%``; a ``%`` not followed by ``{`` or ``%`` is kept literally.
* A template starting with ``~/`` (or equal to ``~``) has that prefix replaced by the home
  directory.  ``~`` anywhere else is literal.

Sanitising: every expanded value except ``user.directory`` and ``mda`` (trusted, as in
OpenSMTPD) has each character outside ``[A-Za-z0-9@._+=,-]`` replaced by ``:`` -- this kills
shell metacharacters, whitespace, newlines, quotes, ``/`` and ``~``, and non-ASCII.  OpenSMTPD
only escapes ``!#$%&'*/?^`{|}~`` because its address parser already rejects the rest; we cannot
assume every caller validated addresses, so we keep a whitelist instead.  Dots are further
restricted so a value can never be, or combine with template text into, a ``..`` path component:
a leading dot and every dot of a run of two or more become ``:``.  Sanitising runs on the final
(sliced) value.  ``:raw`` disables all of this; use it only where the result is quoted properly.
"""

from __future__ import annotations

import re

__all__ = ["FormatError", "expand_format", "sanitize"]


class FormatError(ValueError):
    """A template cannot be expanded (syntax error, unknown token, bad slice, missing value)."""


# Characters that may appear in a sanitised value.  Everything else becomes SANITIZE_CHAR.
_SAFE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789@._+=,-")
# OpenSMTPD's replacement character for dangerous input (mda_variables.c).
SANITIZE_CHAR = ":"

# Tokens whose values come from the password database or from our own configuration and are
# therefore not sanitised (OpenSMTPD sets replace = 0 for exactly these two).
_TRUSTED_TOKENS = frozenset({"user.directory", "mda"})

_MODIFIERS = ("lowercase", "uppercase", "strip", "raw")

# token, optional [slice], optional :modifiers.  Token names are dotted words.
_TOKEN_RE = re.compile(
    r"""
    (?P<name>[A-Za-z]+(?:\.[A-Za-z]+)?)
    (?:\[(?P<slice>[^\[\]]*)\])?
    (?::(?P<mods>.*))?
    """,
    re.VERBOSE | re.DOTALL,
)
_INT_RE = re.compile(r"[+-]?[0-9]+")


def sanitize(value: str) -> str:
    """Replace every unsafe character of *value* with ``:`` (see the module docstring).

    Args:
        value: an untrusted string (address, local part, domain, user name).

    Returns:
        A string of the same length containing only ``[A-Za-z0-9@._+=,:-]``, not starting with
        ``.`` and without two consecutive dots.
    """
    chars = [c if c in _SAFE_CHARS else SANITIZE_CHAR for c in value]
    n = len(chars)
    for i, c in enumerate(chars):
        if c != ".":
            continue
        if i == 0 or (i > 0 and value[i - 1] == ".") or (i + 1 < n and value[i + 1] == "."):
            chars[i] = SANITIZE_CHAR
    return "".join(chars)


def _split_address(address: str) -> tuple[str, str]:
    """``user@domain`` -> (user, domain); the domain starts after the last ``@``."""
    user, at, domain = address.rpartition("@")
    if not at:
        return address, ""
    return user, domain


def _strip_tag(value: str, delim: str) -> str:
    """``user+tag@dom`` -> ``user@dom``; ``user+tag`` -> ``user`` (mda_variables.c mod_strip)."""
    pos = value.find(delim)
    if pos < 0:
        return value
    at = value.find("@", pos)
    if at < 0:
        return value[:pos]
    return value[:pos] + value[at:]


def _parse_offset(text: str, token: str) -> int:
    text = text.strip()
    if not _INT_RE.fullmatch(text):
        raise FormatError(f"invalid offset {text!r} in %{{{token}}}")
    return int(text)


def _apply_slice(value: str, spec: str, token: str) -> str:
    """Apply an OpenSMTPD-style ``[a:b]`` substring (inclusive end) to *value*."""
    if spec.strip() == "":
        raise FormatError(f"empty slice in %{{{token}}}")
    length = len(value)
    if ":" in spec:
        begin_text, _, end_text = spec.partition(":")
        begin = _parse_offset(begin_text, token) if begin_text.strip() else 0
        end = _parse_offset(end_text, token) if end_text.strip() else None
        if length == 0:
            return ""
        if begin < 0:
            begin += length
        if end is None or end >= length:
            end = length - 1
        elif end < 0:
            # A negative end removes that many trailing characters (OpenSMTPD: endoff += len-1).
            end += length - 1
    else:
        begin = _parse_offset(spec, token)
        if length == 0:
            return ""
        if begin < 0:
            begin += length
        end = begin
    if begin < 0 or begin >= length:
        raise FormatError(f"slice [{spec}] out of range for a value of length {length} "
                          f"in %{{{token}}}")
    if end < begin:
        raise FormatError(f"slice [{spec}] is empty or reversed in %{{{token}}}")
    return value[begin:end + 1]


def _lookup(name: str, token: str, values: dict[str, str | None]) -> str:
    try:
        value = values[name]
    except KeyError:
        raise FormatError(f"unknown format specifier %{{{token}}}") from None
    if value is None:
        raise FormatError(f"format specifier %{{{token}}} has no value here")
    return value


def _expand_token(token: str, values: dict[str, str | None], sub_addr_delim: str) -> str:
    match = _TOKEN_RE.fullmatch(token)
    if match is None:
        raise FormatError(f"malformed format specifier %{{{token}}}")
    name = match["name"].lower()
    value = _lookup(name, token, values)

    raw = False
    mods = match["mods"]
    if mods is not None:
        for mod in re.split(r"[|:]", mods):
            mod_l = mod.strip().lower()
            if mod_l == "lowercase":
                value = value.lower()
            elif mod_l == "uppercase":
                value = value.upper()
            elif mod_l == "strip":
                value = _strip_tag(value, sub_addr_delim)
            elif mod_l == "raw":
                raw = True
            else:
                raise FormatError(f"unknown modifier {mod!r} in %{{{token}}} "
                                  f"(expected one of: {', '.join(_MODIFIERS)})")

    if match["slice"] is not None:
        value = _apply_slice(value, match["slice"], token)

    if not raw and name not in _TRUSTED_TOKENS:
        value = sanitize(value)
    return value


def expand_format(template: str, *, sender: str, rcpt: str, dest: str, user: str, home: str,
                  mda: str | None = None, sub_addr_delim: str = "+") -> str:
    """Expand OpenSMTPD format specifiers in *template* for one delivery.

    Args:
        template: the text to expand (maildir path, mda command, wrapper...).
        sender: envelope sender ``user@domain``, ``""`` for the null sender.
        rcpt: original recipient ``user@domain``.
        dest: final destination address after alias/virtual expansion.
        user: the local user the delivery runs as (``%{user.username}``).
        home: that user's home directory (``%{user.directory}``, ``~`` expansion).
        mda: the command being wrapped, for ``mda wrapper`` templates (``%{mda}``).
        sub_addr_delim: the sub-address delimiter used by ``:strip`` (``smtp sub-addr-delim``).

    Returns:
        The expanded string.

    Raises:
        FormatError: unknown specifier or modifier, unterminated ``%{``, empty ``%{}``, bad or
            out-of-range slice, or ``%{mda}`` used without an *mda* value.
    """
    if not sub_addr_delim:
        raise ValueError("sub_addr_delim must not be empty")

    sender_user, sender_domain = _split_address(sender)
    rcpt_user, rcpt_domain = _split_address(rcpt)
    dest_user, dest_domain = _split_address(dest)
    values: dict[str, str | None] = {
        "sender": sender,
        "sender.user": sender_user,
        "sender.domain": sender_domain,
        "rcpt": rcpt,
        "rcpt.user": rcpt_user,
        "rcpt.domain": rcpt_domain,
        "dest": dest,
        "dest.user": dest_user,
        "dest.domain": dest_domain,
        "user.username": user,
        "user.directory": home,
        "mbox.from": sender if sender else "MAILER-DAEMON",
        "mda": mda,
    }

    out: list[str] = []
    pos = 0
    # Only a leading "~/" (or a bare "~") refers to the home directory, as in OpenSMTPD.
    if template == "~":
        return home
    if template.startswith("~/"):
        out.append(home.rstrip("/") + "/")
        pos = 2

    length = len(template)
    while pos < length:
        pct = template.find("%", pos)
        if pct < 0:
            out.append(template[pos:])
            break
        out.append(template[pos:pct])
        nxt = template[pct + 1:pct + 2]
        if nxt == "%":
            out.append("%")
            pos = pct + 2
        elif nxt == "{":
            close = template.find("}", pct + 2)
            if close < 0:
                raise FormatError(f"unterminated format specifier at offset {pct}: "
                                  f"{template[pct:pct + 40]!r}")
            token = template[pct + 2:close]
            if not token:
                raise FormatError(f"empty format specifier %{{}} at offset {pct}")
            if "{" in token or "%" in token:
                raise FormatError(f"unbalanced braces in format specifier at offset {pct}: "
                                  f"%{{{token}}}")
            out.append(_expand_token(token, values, sub_addr_delim))
            pos = close + 1
        else:
            out.append("%")
            pos = pct + 1
    return "".join(out)
