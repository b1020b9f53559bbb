"""The ``<getpwnam>`` table: userinfo from the system's user database (table_getpwnam.c).

Answered in lka, which is not chrooted and may read the user database (OpenSMTPD's
lka pledges "getpw"); the answer is ``uid:gid:home``.
"""
from __future__ import annotations

import pwd

from smtpd.table.base import Table


class GetpwnamTable(Table):
    backend = "getpwnam"
    services = frozenset({"userinfo"})
    kind = "dynamic"

    def lookup_now(self, service: str, key: str) -> str | None:
        if service != "userinfo":
            return None
        try:
            pw = pwd.getpwnam(key.lower())
        except (KeyError, ValueError):
            return None
        return f"{pw.pw_uid}:{pw.pw_gid}:{pw.pw_dir}"

    def check_now(self, service: str, key: str, regex: bool = False) -> bool:
        return self.lookup_now(service, key) is not None
