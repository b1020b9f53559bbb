"""Tables: one interface, one module per backend (OpenSMTPD's table.c and table_*.c).

A table answers ``lookup`` (the value of a key), ``check`` (is the key in it) and
``fetch`` (the next value, round-robin) for a *service* (alias, domain, credentials,
...: smtpd/table/services.py).  Every answer is awaitable; the backends that never
wait (inline and file tables, db files, getpwnam, the special tables) answer the
``*_now`` methods too, the synchronous fast path the per-RCPT rule matching uses.
A proc table (smtpd-tables(7)) answers only through ``await``; TableUnavailable is
the one temporary failure every backend raises.  docs/tables.md tells the design.

Backends: static.py (inline and ``file:``), db.py (``db:``, Berkeley DB hash files as
makemap writes them), getpwnam.py, special.py (localhost, anyhost, localnames,
anydestination), proc.py (external table programs).  tableset.py opens the tables a
configuration names and finds them by name.
"""
from smtpd.table.base import Table, TableUnavailable
from smtpd.table.tableset import TableSet

__all__ = ["Table", "TableSet", "TableUnavailable"]
