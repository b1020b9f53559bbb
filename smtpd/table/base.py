"""The table interface every backend implements (OpenSMTPD's struct table_backend)."""
from __future__ import annotations

import asyncio
import threading


class TableUnavailable(Exception):
    """A lookup could not be answered (a table program down, a db file unreadable, a
    malformed value): a temporary failure, which callers turn into a 4xx."""


class WouldBlock(TableUnavailable):
    """A synchronous lookup in a table that can only answer through ``await``, asked
    from the event loop's own thread (which must not wait for it)."""


class Table:
    """One table.  ``services`` are those it may answer (checked at config time,
    table.c table_check_use); ``kind`` is "list", "hash" or "dynamic" (table.c's
    T_LIST, T_HASH, T_DYNAMIC: what the configuration may use it for).

    Subclasses that answer without waiting implement ``lookup_now``, ``check_now``
    and ``fetch_now``; the awaitable methods call them.  Keys are lowercased here,
    as table.c table_lookup does, before the backend sees them.
    """

    backend = "none"
    services: frozenset[str] = frozenset()
    kind = "dynamic"
    blocking = False            # True: answers only through await (proc tables)

    def __init__(self, name: str, config: str | None = None) -> None:
        self.name = name
        self.config = config

    @property
    def label(self) -> str:
        """``backend:name``, as OpenSMTPD's lookup traces name a table."""
        return f"{self.backend}:{self.name}"

    # -- life cycle: opened in lka after the privilege drop, updated by `smtpctl update table`

    async def open(self) -> None:
        pass

    async def update(self) -> str | None:
        """Reload what the backend caches; None when done, else why not."""
        return None

    async def close(self) -> None:
        pass

    # -- the awaitable interface every caller may use

    async def lookup(self, service: str, key: str) -> str | None:
        return self.lookup_now(service, key)

    async def check(self, service: str, key: str, regex: bool = False) -> bool:
        return self.check_now(service, key, regex)

    async def fetch(self, service: str) -> str | None:
        return self.fetch_now(service)

    # -- the synchronous fast path (backends that never wait)

    def lookup_now(self, service: str, key: str) -> str | None:
        return None

    def check_now(self, service: str, key: str, regex: bool = False) -> bool:
        return False

    def fetch_now(self, service: str) -> str | None:
        return None


class BlockingTable(Table):
    """A table whose answers must be awaited.  Its ``*_now`` methods serve code that
    still runs synchronously in a worker thread (lka runs such code there when the
    configuration has a blocking table): they wait for the event loop to answer.
    From the loop's own thread they raise WouldBlock."""

    blocking = True
    NOW_TIMEOUT = 60.0

    def __init__(self, name: str, config: str | None = None) -> None:
        super().__init__(name, config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.loop_thread: int | None = None

    def bind_loop(self) -> None:
        """The event loop that answers (the one running now; none outside a loop)."""
        try:
            self.loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self.loop_thread = threading.get_ident()

    def _wait(self, coro):
        if self.loop is None or threading.get_ident() == self.loop_thread:
            coro.close()
            raise WouldBlock(f"table {self.name}: a {self.backend} table cannot answer synchronously")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(self.NOW_TIMEOUT)
        except TimeoutError:
            future.cancel()
            raise TableUnavailable(f"table {self.name}: no answer") from None

    def lookup_now(self, service: str, key: str) -> str | None:
        return self._wait(self.lookup(service, key))

    def check_now(self, service: str, key: str, regex: bool = False) -> bool:
        return self._wait(self.check(service, key, regex))

    def fetch_now(self, service: str) -> str | None:
        return self._wait(self.fetch(service))
