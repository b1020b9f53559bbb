"""The tables every configuration has without defining them: ``<localhost>``,
``<anyhost>``, ``<localnames>`` and ``<anydestination>`` (OpenSMTPD's config.c makes
them static tables at start)."""
from __future__ import annotations

import ipaddress
import socket

from smtpd.config import _interfaces
from smtpd.table.base import Table

_LOCAL_ADDRS: set[str] | None = None


def local_addresses() -> set[str]:
    """Every address of this host's interfaces (read once: lka reads them at start)."""
    global _LOCAL_ADDRS
    if _LOCAL_ADDRS is None:
        _LOCAL_ADDRS = {a for lst in _interfaces().values() for _, a in lst}
    return _LOCAL_ADDRS


class SpecialTable(Table):
    backend = "static"
    kind = "list"
    services = frozenset({"netaddr", "domain", "string", "mailaddr"})

    def __init__(self, name: str, config) -> None:
        super().__init__(name)
        self.conf = config

    def check_now(self, service: str, key: str, regex: bool = False) -> bool:
        if self.name == "anydestination":
            return True
        if self.name in ("localhost", "anyhost"):
            if key == "local":
                return True
            try:
                ip = ipaddress.ip_address(key)
            except ValueError:
                return False
            return self.name == "anyhost" or ip.is_loopback or key in local_addresses()
        if self.name == "localnames":
            names = {"localhost", self.conf.hostname.lower(), socket.gethostname().lower()}
            names |= {l.hostname.lower() for l in self.conf.listeners if l.hostname}
            return key.lower() in names or key.strip("[]") in local_addresses()
        return False


SPECIAL_NAMES = frozenset({"localhost", "anyhost", "localnames", "anydestination"})
