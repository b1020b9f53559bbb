"""lka's DNS lookups for the MTA: MX (with implicit and null MX), A/AAAA, PTR
(OpenSMTPD's dns.c).

By default the system's resolver is used (dnspython reads /etc/resolv.conf for MX;
getaddrinfo and getnameinfo, which also read /etc/hosts, for addresses and PTR).
With `mta resolver ADDR... [port N]` every lookup goes to those servers through
dnspython, so that tests (and sites with a dedicated resolver) point lka at a
DNS server of their own.
"""
from __future__ import annotations

import asyncio
import socket

import dns.asyncresolver
import dns.exception
import dns.resolver
import dns.reversename

LOOKUP_TIMEOUT = 30


class NullMx(Exception):
    """RFC 7505: the domain publishes a single MX "." : it accepts no mail."""


class Resolver:
    def __init__(self, servers: list[str] | None = None, port: int = 53) -> None:
        self.own = bool(servers)
        if self.own:
            self.resolver = dns.asyncresolver.Resolver(configure=False)
            self.resolver.nameservers = list(servers)
            self.resolver.port = port
        else:
            self.resolver = dns.asyncresolver.Resolver()
        self.resolver.lifetime = LOOKUP_TIMEOUT

    async def mx(self, domain: str) -> list[tuple[int, str, str]]:
        """[(preference, name, address)] in the order of the answer; an address
        literal ``[1.2.3.4]`` is its own MX; no MX record: the domain's own addresses
        (implicit MX, RFC 5321 5.1).  Raises NXDOMAIN, NullMx, DNSException, OSError."""
        if domain.startswith("[") and domain.endswith("]"):
            literal = domain[1:-1]
            if literal.lower().startswith("ipv6:"):
                literal = literal[5:]
            return [(-1, domain, literal)]
        try:
            answer = await self.resolver.resolve(domain, "MX")
            records = sorted((r.preference, r.exchange.to_text(omit_final_dot=True)) for r in answer)
        except dns.resolver.NoAnswer:
            records = [(0, domain)]
        if records and all(name in ("", ".", "localhost") for _, name in records):
            raise NullMx()
        hosts = []
        for pref, name in records:
            if name in ("", ".", "localhost"):
                continue
            try:
                for addr in await self.addresses(name):
                    hosts.append((pref, name, addr))
            except (OSError, dns.exception.DNSException):
                continue
        return hosts

    async def addresses(self, name: str) -> list[str]:
        if not self.own:
            loop = asyncio.get_running_loop()
            infos = await asyncio.wait_for(
                loop.getaddrinfo(name, None, type=socket.SOCK_STREAM), LOOKUP_TIMEOUT)
            return list(dict.fromkeys(info[4][0] for info in infos))
        found: list[str] = []
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self.resolver.resolve(name, rdtype)
            except dns.resolver.NoAnswer:
                continue
            found.extend(r.address for r in answer)
        if not found:
            raise dns.resolver.NoAnswer()
        return list(dict.fromkeys(found))

    async def ptr(self, address: str) -> str:
        if not self.own:
            loop = asyncio.get_running_loop()
            host, _ = await asyncio.wait_for(loop.getnameinfo((address, 0), socket.NI_NAMEREQD), 10)
            return host
        answer = await self.resolver.resolve(dns.reversename.from_address(address), "PTR")
        return answer[0].target.to_text(omit_final_dot=True)
