"""Relay URLs of ``action ... relay host URL``: ``[proto://[label@]]host[:port]``."""
from __future__ import annotations

from dataclasses import dataclass

SCHEMES = {"smtp": 25, "smtp+tls": 25, "smtp+notls": 25, "smtps": 465, "lmtp": 0}


class RelayUrlError(ValueError):
    pass


@dataclass(frozen=True)
class RelayUrl:
    scheme: str
    label: str | None
    host: str          # without brackets
    port: int

    def __str__(self) -> str:
        label = f"{self.label}@" if self.label else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{label}{host}:{self.port}"


def parse_relay_url(text: str) -> RelayUrl:
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "smtp", text
    scheme = scheme.lower()
    if scheme not in SCHEMES:
        raise RelayUrlError(f"unknown relay scheme {scheme!r}")
    label, at, hostport = rest.rpartition("@")
    if not at:
        label, hostport = "", rest
    if hostport.startswith("["):
        host, close, tail = hostport[1:].partition("]")
        if not close:
            raise RelayUrlError(f"unbalanced [ in {text!r}")
        if host.lower().startswith("ipv6:"):
            host = host[5:]
        port_text = tail[1:] if tail.startswith(":") else ""
        if tail and not tail.startswith(":"):
            raise RelayUrlError(f"bad relay host {text!r}")
    else:
        host, _, port_text = hostport.partition(":")
    if not host:
        raise RelayUrlError(f"no host in relay URL {text!r}")
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise RelayUrlError(f"bad port in relay URL {text!r}")
        port = int(port_text)
    else:
        port = SCHEMES[scheme]
        if not port:
            raise RelayUrlError("lmtp relay URLs need a port")
    if label and scheme not in ("smtp+tls", "smtps"):
        raise RelayUrlError("credentials are only allowed with smtp+tls:// or smtps://")
    return RelayUrl(scheme, label or None, host, port)
