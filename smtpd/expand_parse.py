"""Alias, .forward and :include: lines into expansion targets (OpenSMTPD's expand.c
expand_line and to.c text_to_expandnode).

A line is a comma-separated list; a comma inside double or single quotes, or after a
backslash, does not split.  Each item is, in this order of recognition:

- ``error:CODE TEXT`` (or ``:error:``): a 4xx or 5xx code, a space, then text;
- ``:include:/path`` (or ``include:``): more targets, read from a file;
- ``|command`` (or ``"|command"``): mail piped to a command;
- ``/path``: mail appended to a file;
- ``user@domain``: an address, from a restricted character set;
- ``user``: a user name (letters, digits, ``_ . - +``).

Anything else makes the whole line invalid, as in OpenSMTPD (a table lookup then
fails temporarily, a .forward is refused).  Nothing here is interpreted further: a
command stays a string that only a delivery agent may run.
"""
from __future__ import annotations

from dataclasses import dataclass

# expandnode types, by OpenSMTPD's names
ADDRESS = "address"
USERNAME = "username"
FILENAME = "filename"
FILTER = "filter"
INCLUDE = "include"
ERROR = "error"

# OpenSMTPD bounds each item to LINE_MAX and each field to a fixed buffer
LINE_MAX = 2048
_ADDRESS_USER_EXTRA = set("!#$%*/?|^{}`~&'+-=_.")
_ADDRESS_DOMAIN_EXTRA = set("-.")
_USERNAME_EXTRA = set("_.-+")


@dataclass(frozen=True)
class Target:
    """One item of an alias/.forward line: its type and its text (the address, user,
    path, command or ``CODE TEXT`` of an error)."""
    type: str
    value: str


class LineError(ValueError):
    """A line that is not a list of valid targets (unbalanced quotes, a bad item)."""


def split_line(line: str) -> list[str]:
    """expand_line_split: the items of a comma-separated line, quotes kept, backslash
    escapes applied, surrounding whitespace stripped, empty items dropped."""
    items: list[str] = []
    buf: list[str] = []
    escaped = dq = sq = False
    for ch in line:
        if escaped:
            buf.append(ch)
            escaped = False
            continue
        if ch == "\\":
            escaped = True
            continue
        if ch == "," and not dq and not sq:
            items.append("".join(buf))
            buf = []
            continue
        buf.append(ch)
        if ch == '"' and not sq:
            dq = not dq
        elif ch == "'" and not dq:
            sq = not sq
        if len(buf) >= LINE_MAX:
            raise LineError("item too long")
    if escaped or dq or sq:
        raise LineError("unbalanced quotes or trailing backslash")
    items.append("".join(buf))
    return [item.strip() for item in items if item.strip()]


def _after_keyword(text: str, keyword: str) -> str | None:
    """What follows ``:keyword:`` or ``keyword:`` (any case), or None."""
    lower = text[:len(keyword) + 2].lower()
    for prefix in (f":{keyword}:", f"{keyword}:"):
        if lower.startswith(prefix):
            return text[len(prefix):]
    return None


def _is_error(text: str) -> Target | None:
    body = _after_keyword(text, "error")
    if body is None:
        return None
    # [45][0-9]{2} [a-zA-Z0-9].*
    if (len(body) < 5 or body[0] not in "45" or not body[1:3].isdigit() or not body[1:3].isascii()
            or body[3] != " " or not (body[4].isascii() and body[4].isalnum())):
        raise LineError(f"invalid error target: {text!r}")
    return Target(ERROR, body)


def _is_include(text: str) -> Target | None:
    path = _after_keyword(text, "include")
    if path is None:
        return None
    if not path.startswith("/"):
        raise LineError(f"include needs an absolute path: {text!r}")
    return Target(INCLUDE, path)


def _is_filter(text: str) -> Target | None:
    quoted = text.startswith('"')
    if not text[quoted:].startswith("|"):
        return None
    command = text[quoted + 1:]
    if quoted:
        if not command.endswith('"'):
            raise LineError(f"unterminated quoted command: {text!r}")
        command = command[:-1]
    return Target(FILTER, command)


def _is_address(text: str) -> Target | None:
    user, at, domain = text.partition("@")
    if not at or not user or not domain or len(text) < 3:
        return None
    if not all((c.isascii() and c.isalnum()) or c in _ADDRESS_USER_EXTRA for c in user):
        return None
    if not all((c.isascii() and c.isalnum()) or c in _ADDRESS_DOMAIN_EXTRA for c in domain):
        return None
    return Target(ADDRESS, text)


def parse_target(text: str) -> Target:
    """text_to_expandnode: what one item is, or LineError."""
    for kind in (_is_error, _is_include, _is_filter):
        target = kind(text)
        if target is not None:
            return target
    if text.startswith("/"):
        return Target(FILENAME, text)
    target = _is_address(text)
    if target is not None:
        return target
    if text and all((c.isascii() and c.isalnum()) or c in _USERNAME_EXTRA for c in text):
        return Target(USERNAME, text)
    raise LineError(f"not a valid alias target: {text!r}")


def parse_line(line: str, includes: bool = True) -> list[Target]:
    """expand_line: the targets of one line; ``includes`` False drops :include: items
    (a .forward file and an included file cannot include further)."""
    targets = [parse_target(item) for item in split_line(line)]
    return [t for t in targets if includes or t.type != INCLUDE]


def file_lines(text: str) -> list[str]:
    """The logical lines of a .forward or :include: file (fparseln): ``#`` starts a
    comment, a backslash-newline continues the line."""
    lines: list[str] = []
    pending = ""
    for raw in text.split("\n"):
        line = pending + raw
        if line.endswith("\\") and not line.endswith("\\\\"):
            pending = line[:-1]
            continue
        pending = ""
        comment = _comment_start(line)
        if comment is not None:
            line = line[:comment]
        if line.strip():
            lines.append(line)
    if pending.strip():
        lines.append(pending)
    return lines


def _comment_start(line: str) -> int | None:
    escaped = False
    for i, ch in enumerate(line):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == "#":
            return i
    return None
