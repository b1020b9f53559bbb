"""smtpctl commands that never talk to the daemon: ``encrypt`` and ``spf walk``.

``encrypt`` hashes passwords for credentials tables as OpenBSD's encrypt(1)
does: bcrypt, ``$2b$`` (the bcrypt library; the stdlib's crypt module is gone
in Python 3.13).  Without an argument it hashes every line of standard input,
one hash per line, so that passwords stay out of ps(1).

``spf walk`` reads domain names on standard input and prints the address
ranges their SPF records allow, one per line (OpenSMTPD's spfwalk.c): it
follows ``include:`` and ``redirect=``, resolves ``a`` and ``mx`` mechanisms,
and prints ``ip4:``/``ip6:`` ranges as they are written.  The record parsing
is pure (``spf_terms``); the walk takes a resolver so tests can give it a real
DNS server on loopback.
"""
from __future__ import annotations

import ipaddress
import sys
from typing import Iterable, Iterator, TextIO

import bcrypt

BCRYPT_MAX_BYTES = 72            # bcrypt ignores (the library refuses) anything beyond
SPF_MAX_LOOKUPS = 10             # RFC 7208 4.6.4: DNS-querying terms per evaluation


class LocalCommandError(Exception):
    pass


# --- encrypt -----------------------------------------------------------------------------------

def encrypt_password(password: str) -> str:
    data = password.encode("utf-8")
    if len(data) > BCRYPT_MAX_BYTES:
        raise LocalCommandError(f"password too long: bcrypt uses at most {BCRYPT_MAX_BYTES} bytes")
    return bcrypt.hashpw(data, bcrypt.gensalt()).decode("ascii")


def encrypt(argument: str | None, stdin: TextIO, stdout: TextIO) -> None:
    if argument is not None:
        print(encrypt_password(argument), file=stdout)
        return
    for line in stdin:
        print(encrypt_password(line.rstrip("\r\n")), file=stdout)


# --- spf walk ----------------------------------------------------------------------------------

def spf_record(txt_records: Iterable[str]) -> str | None:
    """The one ``v=spf1`` record among a name's TXT strings (RFC 7208 4.5), else None."""
    found = [t for t in txt_records if t.lower() == "v=spf1" or t.lower().startswith("v=spf1 ")]
    return found[0] if len(found) == 1 else None


def spf_terms(record: str) -> Iterator[tuple[str, str]]:
    """(mechanism or modifier, value) for each term, qualifiers dropped: '-all' -> ('all', '')."""
    for term in record.split()[1:]:
        if term[0] in "+-~?":
            term = term[1:]
        if "=" in term and ":" not in term.split("=", 1)[0]:
            name, _, value = term.partition("=")
            yield name.lower() + "=", value
            continue
        name, _, value = term.partition(":")
        if "/" in name:                          # "a/24", "mx/24//64": prefixes for the addresses
            name, _, cidrs = name.partition("/")
            value = f"{value}/{cidrs}"
        yield name.lower(), value


def split_target(value: str, default: str) -> tuple[str, str, str]:
    """'example.org/24//64' -> ('example.org', '/24', '/64'); the name defaults to the domain."""
    name, _, cidrs = value.partition("/")
    v4, _, v6 = cidrs.partition("//") if cidrs else ("", "", "")
    return name or default, f"/{v4}" if v4 else "", f"/{v6}" if v6 else ""


def with_prefix(address: str, prefix: str) -> str:
    return str(ipaddress.ip_network(f"{address}{prefix}", strict=False)) if prefix else address


class SpfWalk:
    """Walk SPF records with a dnspython resolver; collect ranges in order, once each."""

    def __init__(self, resolver) -> None:
        self.resolver = resolver
        self.seen_domains: set[str] = set()
        self.ranges: list[str] = []
        self.errors: list[str] = []

    def _txt(self, domain: str) -> list[str]:
        import dns.exception
        try:
            answer = self.resolver.resolve(domain, "TXT", lifetime=10)
        except dns.exception.DNSException as exc:
            self.errors.append(f"{domain}: {exc.__class__.__name__}")
            return []
        return [b"".join(r.strings).decode("utf-8", "replace") for r in answer]

    def _addresses(self, name: str, v4_prefix: str, v6_prefix: str) -> None:
        import dns.exception
        for rdtype, prefix in (("A", v4_prefix), ("AAAA", v6_prefix)):
            try:
                answer = self.resolver.resolve(name, rdtype, lifetime=10)
            except dns.exception.DNSException:
                continue
            for r in answer:
                self._add(with_prefix(r.address, prefix))

    def _add(self, text: str) -> None:
        if text not in self.ranges:
            self.ranges.append(text)

    def walk(self, domain: str, depth: int = 0) -> None:
        domain = domain.rstrip(".").lower()
        if domain in self.seen_domains or depth > SPF_MAX_LOOKUPS:
            return
        self.seen_domains.add(domain)
        record = spf_record(self._txt(domain))
        if record is None:
            return
        redirect = None
        for name, value in spf_terms(record):
            if name in ("ip4", "ip6"):
                self._add(value)
            elif name == "include":
                self.walk(value, depth + 1)
            elif name == "redirect=":
                redirect = value
            elif name == "a":
                self._addresses(*split_target(value, domain))
            elif name == "mx":
                import dns.exception
                target, v4, v6 = split_target(value, domain)
                try:
                    answer = self.resolver.resolve(target, "MX", lifetime=10)
                except dns.exception.DNSException:
                    continue
                for r in answer:
                    self._addresses(r.exchange.to_text(omit_final_dot=True), v4, v6)
        if redirect and not any(n == "all" for n, _ in spf_terms(record)):
            self.walk(redirect, depth + 1)


def spf_walk(stdin: TextIO, stdout: TextIO, resolver=None) -> None:
    if resolver is None:
        import dns.resolver
        resolver = dns.resolver.Resolver()
    walker = SpfWalk(resolver)
    for line in stdin:
        domain = line.strip()
        if domain and not domain.startswith("#"):
            walker.walk(domain)
    for text in walker.ranges:
        print(text, file=stdout)
    for error in walker.errors:
        print(f"smtpctl: spf walk: {error}", file=sys.stderr)
