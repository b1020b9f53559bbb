"""table(5) files: lists, maps and aliases (util.c parse_table_line, as makemap and
table_static.c read them).

A file is a list or a map, decided by its first entry (a ``# @list`` comment before
it forces a list): a list entry is the whole line; a map entry is a key, then spaces,
tabs or a colon, then the value (``key value``, ``key: a, b``).  A map line without a
value is malformed, as is a ``[`` with no ``]``.  Comments are whole lines starting
with ``#``; keys are lowercased.
"""
from __future__ import annotations

import re


class MalformedTable(ValueError):
    def __init__(self, lineno: int, text: str = "invalid map entry") -> None:
        super().__init__(f"line {lineno}: {text}")
        self.lineno = lineno


_KEY_END = re.compile(r"[ \t:]")


def parse_table_text(text: str, kind: str | None = None) -> tuple[str, list[tuple[str, str | None]]]:
    """(kind, entries) of a table file's text: kind "list" or "hash" (an empty file is
    a hash, as table_static.c accepts empty alias files); entries in file order, keys
    lowercased, the value None in a list.  ``kind`` forces one (makemap -t set / plain)."""
    entries: list[tuple[str, str | None]] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            if kind is None and line[1:].strip() == "@list":
                kind = "list"
            continue
        if line.startswith("["):
            end = line.find("]")
            if end < 0:
                raise MalformedTable(lineno)
            split = end + 1
        else:
            m = _KEY_END.search(line)
            split = m.start() if m else len(line)
        if kind is None:
            kind = "list" if split == len(line) else "hash"
        if kind == "list":
            entries.append((line.lower(), None))
            continue
        key, value = line[:split], line[split + 1:].lstrip(" \t")
        if split == len(line) or not value:
            raise MalformedTable(lineno)
        entries.append((key.lower(), value))
    return kind or "hash", entries
