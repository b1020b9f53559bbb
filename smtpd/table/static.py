"""Inline and ``file:`` tables (table_static.c).

The parent reads a table file while parsing the configuration (as root, as
OpenSMTPD's parse.y does through table_config), so its entries reach lka in the
configuration; ``smtpctl update table`` re-reads the file in lka, as
table_static_update does, with lka's rights.
"""
from __future__ import annotations

import logging
from pathlib import Path

from smtpd.config_files import FileRefused, read_checked
from smtpd.table.base import Table
from smtpd.table.file_format import MalformedTable, parse_table_text
from smtpd.table.services import SERVICES, entry_matches, uses_matching

log = logging.getLogger("smtpd")


class StaticTable(Table):
    backend = "static"
    services = SERVICES - {"auth"}

    def __init__(self, name: str, values, config: str | None = None,
                 source: str | None = None, kind: str | None = None) -> None:
        super().__init__(name, config)
        self.source = source            # the file to re-read on update, as seen from lka
        self._set(values, kind)

    def _set(self, values, kind: str | None) -> None:
        values = values or []
        if isinstance(values, dict):
            self.map = {str(k).lower(): str(v) for k, v in values.items()}
        else:
            self.map = {str(v).lower(): None for v in values}
        self.kind = kind or ("hash" if isinstance(values, dict) else "list")
        self.entries = list(values) if isinstance(values, dict) else [str(v) for v in values]
        self._fetch_at = 0

    async def update(self) -> str | None:
        if not self.source:
            return None
        try:
            text, _ = read_checked(Path(self.source), secret=False)
            kind, entries = parse_table_text(text)
        except (FileRefused, MalformedTable) as exc:
            log.info("info: Failed to update table \"%s\": %s: %s", self.name, self.source, exc)
            return str(exc)
        self._set(dict(entries) if kind == "hash" else [k for k, _ in entries], kind)
        log.info("info: Table \"%s\" successfully updated", self.name)
        return None

    def lookup_now(self, service: str, key: str) -> str | None:
        key = key.lower()
        if uses_matching(service):
            for entry, value in self.map.items():
                if entry_matches(service, key, entry):
                    return value
            return None
        return self.map.get(key)

    def check_now(self, service: str, key: str, regex: bool = False) -> bool:
        key = key.lower()
        if not (regex or uses_matching(service)):
            return key in self.map
        return any(entry_matches(service, key, entry, regex) for entry in self.entries)

    def fetch_now(self, service: str) -> str | None:
        """The next entry, round-robin (table_static_fetch: relay source addresses)."""
        if not self.entries:
            return None
        entry = self.entries[self._fetch_at % len(self.entries)]
        self._fetch_at += 1
        return str(entry)
