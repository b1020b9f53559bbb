"""A small authoritative DNS server for tests, over real UDP and TCP on loopback.

It answers from a dict of records, e.g.
``{"example.test": {"MX": ["10 mx.example.test."], "TXT": ['"v=spf1 a -all"']}}``
(rdata in zone-file text), with NXDOMAIN for names it does not know and an empty
answer for known names without the asked type.  A name whose entry has ``"RCODE":
["SERVFAIL"]`` gets that error code for every question (a broken zone).  Stands in for dnsmasq where a test
needs records dnsmasq cannot serve (TXT with several strings, null MX...).
"""
from __future__ import annotations

import socket
import threading

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset


class DnsServer:
    def __init__(self, records: dict[str, dict[str, list[str]]], ttl: int = 60) -> None:
        self.records = {dns.name.from_text(k).canonicalize(): v for k, v in records.items()}
        self.ttl = ttl
        self.queries: list[tuple[str, str]] = []
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.port = self.udp.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve_udp, daemon=True, name="test-dns")

    def answer(self, wire: bytes) -> bytes:
        query = dns.message.from_wire(wire)
        reply = dns.message.make_response(query)
        reply.flags |= dns.flags.AA
        q = query.question[0]
        self.queries.append((q.name.to_text(), dns.rdatatype.to_text(q.rdtype)))
        entry = self.records.get(q.name.canonicalize())
        if entry is None:
            reply.set_rcode(dns.rcode.NXDOMAIN)
            return reply.to_wire()
        if "RCODE" in entry:
            reply.set_rcode(dns.rcode.from_text(entry["RCODE"][0]))
            return reply.to_wire()
        texts = entry.get(dns.rdatatype.to_text(q.rdtype), [])
        if texts:
            reply.answer.append(dns.rrset.from_text_list(q.name, self.ttl, dns.rdataclass.IN, q.rdtype, texts))
        return reply.to_wire()

    def _serve_udp(self) -> None:
        self.udp.settimeout(0.2)
        while not self._stop.is_set():
            try:
                data, peer = self.udp.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                self.udp.sendto(self.answer(data), peer)
            except Exception:     # a malformed query: no answer, as a real server might
                continue

    def resolver(self):
        """A dnspython resolver that asks only this server."""
        import dns.resolver
        r = dns.resolver.Resolver(configure=False)
        r.nameservers = ["127.0.0.1"]
        r.port = self.port
        r.timeout = r.lifetime = 5
        return r

    def __enter__(self) -> "DnsServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        self.udp.close()
