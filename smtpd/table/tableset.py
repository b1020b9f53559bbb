"""The tables of one configuration, opened in lka and found by name (table.c's
table_create / table_find / table_open_all / table_update)."""
from __future__ import annotations

import asyncio
import logging

from common.trace import FLAGS, trace
from smtpd.table.base import Table, TableUnavailable
from smtpd.table.db import DbTable
from smtpd.table.getpwnam import GetpwnamTable
from smtpd.table.proc import ProcTable
from smtpd.table.special import SPECIAL_NAMES, SpecialTable, local_addresses
from smtpd.table.static import StaticTable

log = logging.getLogger("smtpd")


def make_table(spec) -> Table:
    """The backend for a configuration's Table (smtpd.config.Table)."""
    if spec.backend == "static":
        return StaticTable(spec.name, spec.values, spec.config, getattr(spec, "source", None) or None,
                           getattr(spec, "kind", None) or None)
    if spec.backend == "db":
        return DbTable(spec.name, getattr(spec, "source", None) or spec.config)
    if spec.backend == "getpwnam":
        return GetpwnamTable(spec.name)
    return ProcTable(spec.name, spec.backend, spec.config, getattr(spec, "command", None) or None)


class TableSet:
    def __init__(self, config) -> None:
        self.config = config
        self.tables: dict[str, Table] = {name: make_table(spec) for name, spec in config.tables.items()}
        self.specials: dict[str, Table] = {name: SpecialTable(name, config) for name in SPECIAL_NAMES}
        self.specials["getpwnam"] = GetpwnamTable("getpwnam")
        for table in self.tables.values():
            if table.blocking:
                table.bind_loop()          # lka builds its tables in its loop
        local_addresses()

    @property
    def blocking(self) -> bool:
        """Whether some table answers only through await (lka then runs synchronous
        callers in a worker thread)."""
        return any(t.blocking for t in self.tables.values())

    async def open(self) -> None:
        """table_open_all: after the privilege drop (proc tables are started here, all at
        once: each handshake may take its timeout)."""
        await asyncio.gather(*(table.open() for table in self.tables.values()))
        if FLAGS.tables:
            for table in self.tables.values():
                trace("table: opened %s (%s)", table.label, table.config or "inline")

    async def close(self) -> None:
        for table in self.tables.values():
            try:
                await table.close()
            except Exception:
                log.exception("warn: table %s: error while closing", table.name)

    async def update(self, name: str) -> str | None:
        """``smtpctl update table NAME``: None when reloaded, else why not."""
        table = self.tables.get(name)
        if table is None:
            return f"no such table: {name}"
        try:
            return await table.update()
        except TableUnavailable as exc:
            return str(exc)

    def get(self, name: str) -> Table:
        name = name.strip("<>")
        table = self.tables.get(name) or self.specials.get(name)
        if table is None:
            table = SpecialTable(name, self.config)       # an unknown name matches nothing
        return TracedTable(table) if FLAGS.lookup else table


class TracedTable:
    """``trace lookup``: each lookup and check with its answer (table.c's lines)."""

    def __init__(self, table: Table) -> None:
        self.table = table
        self.name, self.label, self.blocking = table.name, table.label, table.blocking

    def _lookup_line(self, service: str, key: str, result) -> None:
        trace('lookup: lookup "%s" as %s in table %s -> %s', key, service, self.label,
              "none" if result is None else f'"{result}"')

    def _check_line(self, service: str, key: str, result: bool) -> None:
        trace('lookup: check "%s" as %s in table %s -> %s', key, service, self.label,
              "found" if result else "none")

    async def lookup(self, service: str, key: str):
        result = await self.table.lookup(service, key)
        self._lookup_line(service, key, result)
        return result

    def lookup_now(self, service: str, key: str):
        result = self.table.lookup_now(service, key)
        self._lookup_line(service, key, result)
        return result

    async def check(self, service: str, key: str, regex: bool = False) -> bool:
        result = await self.table.check(service, key, regex)
        self._check_line(service, key, result)
        return result

    def check_now(self, service: str, key: str, regex: bool = False) -> bool:
        result = self.table.check_now(service, key, regex)
        self._check_line(service, key, result)
        return result

    async def fetch(self, service: str):
        return await self.table.fetch(service)

    def fetch_now(self, service: str):
        return self.table.fetch_now(service)
