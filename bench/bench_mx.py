#!/usr/bin/env python3
"""MX relaying at scale: MESSAGES queued messages (default 10,000) for DOMAINS domains
(default 500) whose MXs are HOSTS hosts on loopback (default 5, 127.0.0.11...).

A DNS server on loopback (tests/dns_server.py) gives each domain two MXs (preference
10 and 20, on two of the hosts); one sink process serves every host on the same port
(`mta mx-port`) and counts, per host, the messages, the connections and the most
connections open at once.  The spool is written directly (bench_scale.fill_spool),
the daemon starts with `-P mta`, then `smtpctl resume mta` and the clock runs until
every message is at a sink (bounded by --timeout).

Reports the drain rate (messages/s), the connections opened, and the most connections
each host saw at once against `mta limit max-conn-per-host` (--max-conn-per-host,
default OpenSMTPD's 10).  Stops everything it started, removes its directory unless
--keep.  A summary line, then one JSON line.

    python bench/bench_mx.py                      # 10000 messages, 500 domains, 5 hosts
    python bench/bench_mx.py -m 1000 -d 50        # a quick one
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO), str(BENCH)]

from bench_mail import BenchError, free_port, stop_process_group  # noqa: E402
from bench_scale import Run, fill_spool, new_base, stop_all  # noqa: E402
from smtpd.queue_fs import Spool  # noqa: E402
from tests.dns_server import DnsServer  # noqa: E402

# One process, one asyncio loop, a server per host address.  Prints
# "ADDRESS messages connections max_open" for every host whenever asked on stdin.
SINK_SERVER = r'''
import asyncio, sys
from aiosmtpd.smtp import SMTP

stats = {}

class Handler:
    def __init__(self, address):
        self.address = address
    async def handle_DATA(self, server, session, envelope):
        stats[self.address][0] += 1
        return "250 2.0.0 Ok: queued"

class Counting(SMTP):
    def __init__(self, address):
        super().__init__(Handler(address), hostname=address)
        self.address = address
    def connection_made(self, transport):
        s = stats[self.address]
        s[1] += 1; s[3] += 1; s[2] = max(s[2], s[3])
        super().connection_made(transport)
    def connection_lost(self, exc):
        stats[self.address][3] -= 1
        super().connection_lost(exc)

async def main(port, addresses):
    loop = asyncio.get_running_loop()
    for a in addresses:
        stats[a] = [0, 0, 0, 0]
        await loop.create_server(lambda a=a: Counting(a), a, port, backlog=1024)
    print("ready", flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.readline():
        print(" ".join(f"{a}:{s[0]}:{s[1]}:{s[2]}" for a, s in stats.items()), flush=True)

asyncio.run(main(int(sys.argv[1]), sys.argv[2:]))
'''


class MultiSink:
    def __init__(self, port: int, addresses: list[str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", SINK_SERVER, str(port), *addresses],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     start_new_session=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise BenchError("the sink did not start")
        self.lock = threading.Lock()

    def stats(self) -> dict[str, tuple[int, int, int]]:
        """address -> (messages, connections, most open at once)."""
        with self.lock:
            self.proc.stdin.write("?\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        out = {}
        for item in line.split():
            address, messages, conns, most = item.split(":")
            out[address] = (int(messages), int(conns), int(most))
        return out

    def stop(self) -> None:
        stop_process_group(self.proc, grace=2)


def zone(domains: list[str], hosts: list[str]) -> dict:
    records: dict = {}
    for i, address in enumerate(hosts):
        records[f"mx{i}.bench.test"] = {"A": [address]}
    for i, domain in enumerate(domains):
        first, second = i % len(hosts), (i + 1) % len(hosts)
        records[domain] = {"MX": [f"10 mx{first}.bench.test.", f"20 mx{second}.bench.test."]}
    return records


def run(args) -> dict:
    base, owner = new_base("pysmtpd-mx-")
    hosts = [f"127.0.0.{11 + i}" for i in range(args.hosts)]
    domains = [f"d{i}.bench.test" for i in range(args.domains)]
    result: dict = {"messages": args.messages, "domains": args.domains, "hosts": args.hosts,
                    "max_conn_per_host": args.max_conn_per_host}
    daemon = sink = None
    mx_port = free_port()
    with DnsServer(zone(domains, hosts)) as dns:
        try:
            sink = MultiSink(mx_port, hosts)
            daemon = Run(base / "d", 0, free_port())
            daemon.config.write_text("\n".join([
                "# pysmtpd MX scale benchmark (bench/bench_mx.py)",
                f"listen on 127.0.0.1 port {free_port()}",
                f"mta resolver 127.0.0.1 port {dns.port}",
                f"mta mx-port {mx_port}",
                f"mta limit max-conn-per-host {args.max_conn_per_host}",
                'action "outbound" relay',
                'match from local for any action "outbound"',
            ]) + "\n")
            spool = Spool(daemon.spool)
            spool.setup(*(owner or (os.getuid(), os.getgid())), privileged=owner is not None)
            fill_spool(spool, args.messages, 1, owner, domains)
            daemon.start(args.timeout)
            t0 = time.monotonic()
            daemon.smtpctl("resume", "mta")
            delivered = 0
            deadline = t0 + args.timeout
            while time.monotonic() < deadline:
                stats = sink.stats()
                delivered = sum(s[0] for s in stats.values())
                if delivered >= args.messages:
                    break
                time.sleep(0.2)
            elapsed = time.monotonic() - t0
            stats = sink.stats()
            result.update({
                "delivered": delivered, "drain_s": elapsed, "per_s": delivered / elapsed,
                "connections": sum(s[1] for s in stats.values()),
                "per_host": {a: {"messages": m, "connections": c, "max_open": o}
                             for a, (m, c, o) in stats.items()},
                "max_open": max(s[2] for s in stats.values()),
            })
            result["within_limit"] = result["max_open"] <= args.max_conn_per_host
        finally:
            stop_all([daemon, sink], base, args.keep)
    return result


def summary(r: dict) -> str:
    return (f"{r['delivered']}/{r['messages']} messages to {r['domains']} domains on {r['hosts']} MX hosts "
            f"in {r['drain_s']:.1f} s: {r['per_s']:.0f} messages/s over {r['connections']} connections; "
            f"most open at once on one host {r['max_open']} (limit {r['max_conn_per_host']})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-m", "--messages", type=int, default=10000)
    p.add_argument("-d", "--domains", type=int, default=500)
    p.add_argument("--hosts", type=int, default=5, choices=range(1, 100), metavar="N")
    p.add_argument("--max-conn-per-host", type=int, default=10)
    p.add_argument("--timeout", type=float, default=900.0, help="bound on the start and on the drain")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args(argv)
    r = run(args)
    print(summary(r))
    print(json.dumps(r))
    return 0 if r["delivered"] == r["messages"] and r["within_limit"] else 1


if __name__ == "__main__":
    sys.exit(main())
