"""``db:`` tables: Berkeley DB hash files, as OpenSMTPD's makemap writes them (table_db.c).

The format is the one OpenSMTPD uses on Linux: libdb's hash (or btree) access method
through its 4.4BSD ``dbopen`` interface, every key and value stored with its ending
NUL byte, keys lowercased.  Our makemap (smtpctl/mapfiles.py) writes the same files,
so a db made by either program is read by both.  libdb is reached through ctypes
(libdb5.3 is part of every Debian system: PAM and apt use it), loaded on first use,
not at import (docs/tables.md says why this format and not another).

The handle is reopened when the file's mtime changes (table_db_lookup does so), so
``makemap`` alone is enough for lka to see new contents; ``smtpctl update table``
reopens it at once.  Lookups hold a lock: a libdb handle is not thread-safe.
"""
from __future__ import annotations

import ctypes
import logging
import ctypes.util
import os
import threading
from pathlib import Path

from smtpd.config_files import open_regular
from smtpd.table.base import Table, TableUnavailable
from smtpd.table.services import SERVICES, entry_matches, uses_matching

O_RDONLY, O_RDWR, O_CREAT, O_TRUNC = os.O_RDONLY, os.O_RDWR, os.O_CREAT, os.O_TRUNC
DB_BTREE, DB_HASH = 0, 1
R_FIRST, R_NEXT, R_NOOVERWRITE = 3, 7, 8
DBTYPES = {"hash": DB_HASH, "btree": DB_BTREE}
log = logging.getLogger("smtpd")
LIBRARIES = ("libdb-5.3.so", "libdb5.3.so", "libdb.so")


class DBT(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("size", ctypes.c_size_t)]


class _DB(ctypes.Structure):
    pass


_DBP = ctypes.POINTER(_DB)
_DBTP = ctypes.POINTER(DBT)
_DB._fields_ = [
    ("type", ctypes.c_int),
    ("close", ctypes.CFUNCTYPE(ctypes.c_int, _DBP)),
    ("delete", ctypes.CFUNCTYPE(ctypes.c_int, _DBP, _DBTP, ctypes.c_uint)),
    ("get", ctypes.CFUNCTYPE(ctypes.c_int, _DBP, _DBTP, _DBTP, ctypes.c_uint)),
    ("put", ctypes.CFUNCTYPE(ctypes.c_int, _DBP, _DBTP, _DBTP, ctypes.c_uint)),
    ("seq", ctypes.CFUNCTYPE(ctypes.c_int, _DBP, _DBTP, _DBTP, ctypes.c_uint)),
    ("sync", ctypes.CFUNCTYPE(ctypes.c_int, _DBP, ctypes.c_uint)),
    ("internal", ctypes.c_void_p),
    ("fd", ctypes.CFUNCTYPE(ctypes.c_int, _DBP)),
]

_dbopen = None


class DbError(OSError):
    pass


def _library():
    """libdb's dbopen (``__db185_open``), loaded once."""
    global _dbopen
    if _dbopen is None:
        names = list(LIBRARIES)
        found = ctypes.util.find_library("db")
        if found:
            names.append(found)
        for name in names:
            try:
                lib = ctypes.CDLL(name, use_errno=True)
                func = lib.__db185_open
            except (OSError, AttributeError):
                continue
            func.restype = _DBP
            func.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
            _dbopen = func
            break
        else:
            raise DbError("db tables need Berkeley DB (libdb5.3), which is not installed")
    return _dbopen


def available() -> bool:
    try:
        _library()
    except DbError:
        return False
    return True


class DbFile:
    """One open Berkeley DB file (the 4.4BSD interface libdb keeps for compatibility)."""

    def __init__(self, path: str, write: bool = False, dbtype: str = "hash", mode: int = 0o644) -> None:
        dbopen = _library()
        flags = (O_RDWR | O_CREAT | O_TRUNC) if write else O_RDONLY
        db = dbopen(os.fsencode(path), flags, mode, DBTYPES[dbtype], None)
        if not db:
            err = ctypes.get_errno()
            raise DbError(err, f"dbopen: {path}: {os.strerror(err) if err else 'not a db file'}")
        self.db = db
        self.path = path

    def close(self) -> None:
        if self.db:
            db, self.db = self.db, None
            if db.contents.close(db) != 0:
                raise DbError(ctypes.get_errno(), f"dbclose: {self.path}")

    def fileno(self) -> int:
        return self.db.contents.fd(self.db)

    def get(self, key: bytes) -> bytes | None:
        k = ctypes.create_string_buffer(key, len(key))
        kd, vd = DBT(ctypes.cast(k, ctypes.c_void_p), len(key)), DBT()
        r = self.db.contents.get(self.db, ctypes.byref(kd), ctypes.byref(vd), 0)
        if r == 1:
            return None
        if r != 0:
            raise DbError(ctypes.get_errno(), f"db get: {self.path}")
        return ctypes.string_at(vd.data, vd.size)

    def put(self, key: bytes, value: bytes) -> bool:
        """False when the key is there already (nothing is overwritten)."""
        k = ctypes.create_string_buffer(key, len(key))
        v = ctypes.create_string_buffer(value, len(value))
        kd = DBT(ctypes.cast(k, ctypes.c_void_p), len(key))
        vd = DBT(ctypes.cast(v, ctypes.c_void_p), len(value))
        r = self.db.contents.put(self.db, ctypes.byref(kd), ctypes.byref(vd), R_NOOVERWRITE)
        if r < 0:
            raise DbError(ctypes.get_errno(), f"db put: {self.path}")
        return r == 0

    def items(self):
        """Every (key, value), as stored."""
        kd, vd = DBT(), DBT()
        flag = R_FIRST
        while True:
            r = self.db.contents.seq(self.db, ctypes.byref(kd), ctypes.byref(vd), flag)
            if r == 1:
                return
            if r != 0:
                raise DbError(ctypes.get_errno(), f"db seq: {self.path}")
            yield ctypes.string_at(kd.data, kd.size), ctypes.string_at(vd.data, vd.size)
            flag = R_NEXT


def check_db_file(path: str) -> None:
    """At configuration time (table_db_config): a regular file, and a db file unless it
    is empty (an empty file is an empty table, as an empty table file is).  Raises
    FileRefused or OSError."""
    fd, st = open_regular(Path(path))
    os.close(fd)
    if st.st_size:
        DbFile(path).close()


def cstring(data: bytes) -> str:
    """A stored key or value: text up to its NUL (makemap stores strlen + 1 bytes)."""
    return data.split(b"\0", 1)[0].decode("utf-8", "replace")


class _Empty:
    def get(self, key: bytes) -> None:
        return None

    def items(self):
        return iter(())


_EMPTY = _Empty()


class DbTable(Table):
    backend = "db"
    services = SERVICES - {"auth"}
    kind = "dynamic"

    def __init__(self, name: str, config: str | None) -> None:
        super().__init__(name, config)
        self.path = config or ""
        self.handle: DbFile | None = None
        self.mtime: float | None = None
        self.lock = threading.Lock()
        self._fetch_at = 0

    async def open(self) -> None:
        with self.lock:
            try:
                self._reopen()
            except OSError as exc:       # table_open_all is fatal in OpenSMTPD; 4xx here
                log.warning("warn: table %s: %s", self.name, exc)

    def _reopen(self) -> None:
        st = os.stat(self.path)
        handle = DbFile(self.path) if st.st_size else None       # empty: an empty table
        old, self.handle, self.mtime = self.handle, handle, st.st_mtime
        if old is not None:
            old.close()

    async def update(self) -> str | None:
        with self.lock:
            try:
                self._reopen()
            except OSError as exc:
                log.info("info: Failed to update table \"%s\": %s", self.name, exc)
                return str(exc)
        log.info("info: Table \"%s\" successfully updated", self.name)
        return None

    async def close(self) -> None:
        with self.lock:
            if self.handle is not None:
                self.handle.close()
                self.handle = None

    def _current(self) -> DbFile | _Empty:
        """The handle, reopened if makemap replaced the file since (table_db_lookup)."""
        try:
            if os.stat(self.path).st_mtime != self.mtime:
                self._reopen()
        except OSError as exc:
            raise TableUnavailable(f"table {self.name}: {exc}") from None
        return self.handle or _EMPTY

    def lookup_now(self, service: str, key: str) -> str | None:
        key = key.lower()
        with self.lock:
            db = self._current()
            try:
                if uses_matching(service):
                    for k, v in db.items():
                        if entry_matches(service, key, cstring(k)):
                            return cstring(v)
                    return None
                value = db.get(key.encode() + b"\0")
            except DbError as exc:
                raise TableUnavailable(f"table {self.name}: {exc}") from None
        return None if value is None else cstring(value)

    def check_now(self, service: str, key: str, regex: bool = False) -> bool:
        if not (regex or uses_matching(service)):
            return self.lookup_now(service, key) is not None
        key = key.lower()
        with self.lock:
            db = self._current()
            try:
                return any(entry_matches(service, key, cstring(k), regex) for k, _ in db.items())
            except DbError as exc:
                raise TableUnavailable(f"table {self.name}: {exc}") from None

    def fetch_now(self, service: str) -> str | None:
        """The next key, round-robin (table_db_fetch)."""
        with self.lock:
            try:
                keys = [cstring(k) for k, _ in self._current().items()]
            except DbError as exc:
                raise TableUnavailable(f"table {self.name}: {exc}") from None
        if not keys:
            return None
        key = keys[self._fetch_at % len(keys)]
        self._fetch_at += 1
        return key
