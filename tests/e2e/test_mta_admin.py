"""The MTA's limits and its smtpctl commands on the real daemon: connections per host
capped, a message rate per domain that holds mail back without failing it, and
`pause|resume mta from ADDR for DOMAIN`, `show mta paused`, `show relays`."""
from __future__ import annotations

import re
import smtplib
import threading
import time

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP

from tests.conftest import free_port, wait_for
from tests.dns_server import DnsServer
from tests.e2e.helpers import send
from tests.e2e.test_relay_mx import MxSink, mx_config


class CountingSink(MxSink):
    """A sink on 127.0.0.5 that counts its open connections and their maximum."""

    def __init__(self, port: int) -> None:
        self.lock = threading.Lock()
        self.open = self.max_open = self.connections = 0
        sink = self

        class CountingSMTP(SMTP):
            def connection_made(self, transport):
                with sink.lock:
                    sink.open += 1
                    sink.connections += 1
                    sink.max_open = max(sink.max_open, sink.open)
                super().connection_made(transport)

            def connection_lost(self, exc):
                with sink.lock:
                    sink.open -= 1
                super().connection_lost(exc)

        class CountingController(Controller):
            def factory(self):
                return CountingSMTP(self.handler, **self.SMTP_kwargs)

        super().__init__("127.0.0.5", port, CountingController)


def zone(*domains: str) -> dict:
    records = {"mx.admin.test": {"A": ["127.0.0.5"]}}
    for domain in domains:
        records[domain] = {"MX": ["10 mx.admin.test."]}
    return records


def send_many(port: int, rcpts: list[str]) -> None:
    """One message per recipient, over one SMTP session."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        for rcpt in rcpts:
            s.sendmail("me@local.test", [rcpt], f"Subject: to {rcpt}\r\n\r\nhello\r\n")


def test_connections_per_host_are_capped_and_sessions_carry_many_messages(make_daemon):
    port, mx_port = free_port(), free_port()
    domains = [f"d{i}.test" for i in range(6)]
    with DnsServer(zone(*domains)) as dns, CountingSink(mx_port) as sink:
        d = make_daemon(mx_config(port, dns.port, mx_port,
                                  "mta limit max-conn-per-host 2 conn-delay-route 0 reconn-delay-route 0")).start()
        rcpts = [f"u{n}@{domains[n % len(domains)]}" for n in range(60)]
        send_many(port, rcpts)
        wait_for(lambda: len(sink.transactions) == 60, 60, "the 60 messages at the sink")
        assert sorted(r for t in sink.transactions for r in t.rcpt_tos) == sorted(rcpts)
        assert 1 <= sink.max_open <= 2, sink.max_open
        assert sink.connections < 60          # sessions carry several messages
        log = d.wait_log("mta disconnected reason=quit")
        counts = [int(n) for n in re.findall(r"mta disconnected reason=quit messages=(\d+)", log)]
        assert max(counts) > 1


def test_message_rate_holds_mail_back_without_failing_it(make_daemon):
    port, mx_port = free_port(), free_port()
    with DnsServer(zone("rate.test")) as dns, CountingSink(mx_port) as sink:
        d = make_daemon(mx_config(port, dns.port, mx_port,
                                  "mta limit for domain rate.test max-msg-rate 2/min")).start()
        send_many(port, [f"u{n}@rate.test" for n in range(5)])
        wait_for(lambda: len(sink.transactions) == 2, 30, "two messages under the rate")
        time.sleep(3)
        assert len(sink.transactions) == 2
        assert len(d.queue_lines()) == 3          # still queued, none failed
        assert "TempFail" not in d.log() and "PermFail" not in d.log()
        relays = d.smtpctl("show", "relays").stdout.splitlines()
        # (the last session may still be saying QUIT)
        assert re.fullmatch(r"\[relay:rate\.test,smtp\] refcount=0 ntask=3 nconn=[01] lastconn=\d+s "
                            r"timeout=\d+s wait=connector", relays[0]), relays
        assert re.match(r"  connector \[\] refcount=0 nconn=[01] ", relays[1]), relays

        # removed and paused while waiting in the relay: given back at once, never sent
        waiting = [line.split("|")[0] for line in d.queue_lines()]
        assert d.smtpctl("remove", waiting[0]).stdout.strip() == "1 envelope removed"
        wait_for(lambda: len(d.queue_lines()) == 2, 10, "the removed envelope out of the queue")
        assert d.smtpctl("pause", "envelope", waiting[1]).stdout.strip() == "1 envelope paused"
        wait_for(lambda: any(line.startswith(waiting[1]) and "|pending|" in line
                             for line in d.queue_lines()), 10, "the paused envelope back from the MTA")
        relays = d.smtpctl("show", "relays").stdout.splitlines()
        assert "ntask=1 " in relays[0], relays
        assert len(sink.transactions) == 2
        assert not re.search(rf"mta delivery evpid={waiting[0]}", d.log())


def test_pause_mta_from_for_blocks_a_domain_until_resumed(make_daemon):
    port, mx_port = free_port(), free_port()
    with DnsServer(zone("paused.test", "open.test")) as dns, CountingSink(mx_port) as sink:
        # a block stops the relays whose `src` is its address (tests/e2e/test_relay_src.py)
        conf = mx_config(port, dns.port, mx_port).replace('relay\n', 'relay src "127.0.0.1"\n', 1)
        d = make_daemon(conf).start()
        assert d.smtpctl("pause", "mta", "from", "127.0.0.1", "for", "paused.test").stdout.strip() == \
            "command succeeded"
        assert d.smtpctl("show", "mta", "paused").stdout == "127.0.0.1 -> paused.test\n"
        send(port, "me@local.test", ["a@paused.test"])
        send(port, "me@local.test", ["b@open.test"])
        wait_for(lambda: sink.transactions, 30, "the other domain's message")
        log = d.wait_log("All routes to destination blocked")
        assert re.search(r'to=<a@paused\.test> .* result="TempFail" stat="All routes to destination blocked"', log)
        assert [t.rcpt_tos for t in sink.transactions] == [["b@open.test"]]

        bad = d.smtpctl("pause", "mta", "from", "127.0.0.1", "for", check=False)
        assert bad.returncode != 0
        assert d.smtpctl("resume", "mta", "from", "127.0.0.1", "for", "paused.test").stdout.strip() == \
            "command succeeded"
        assert d.smtpctl("show", "mta", "paused").stdout == ""
        d.smtpctl("schedule", "all")
        wait_for(lambda: len(sink.transactions) == 2, 30, "the paused domain's message after resume")
        assert sink.transactions[1].rcpt_tos == ["a@paused.test"]


def test_task_hiwat_holds_envelopes_in_the_scheduler(make_daemon):
    port, mx_port = free_port(), free_port()
    with DnsServer(zone("hi.test")) as dns, CountingSink(mx_port) as sink:
        d = make_daemon(mx_config(port, dns.port, mx_port, "mta limit for domain hi.test "
                                  "max-msg-rate 1/min task-hiwat 2 task-lowat 1 task-release 1")).start()
        send_many(port, [f"u{n}@hi.test" for n in range(6)])
        log = d.wait_log("smtp-out: hiwat reached on [relay:hi.test,smtp]: holding envelopes")
        wait_for(lambda: sink.transactions, 30, "the one message the rate allows")
        relays = d.smtpctl("show", "relays").stdout.splitlines()
        assert re.fullmatch(r"\[relay:hi\.test,smtp\] refcount=0 ntask=2 nconn=\d lastconn=\d+s "
                            r"timeout=\S+ wait=(connector)?(ONHOLD)?", relays[0]), relays
        assert len(d.queue_lines()) == 5 and len(sink.transactions) == 1
        assert "TempFail" not in log and "PermFail" not in log


def relay_burst(make_daemon, sink: CountingSink, dns, port: int, mx_port: int, extra: str = ""):
    """30 messages for one MX host queued while the MTA is paused, then let go at once."""
    d = make_daemon(mx_config(port, dns.port, mx_port, extra)).start()
    assert d.smtpctl("pause", "mta").stdout.strip() == "command succeeded"
    send_many(port, [f"u{n}@burst.test" for n in range(30)])
    wait_for(lambda: len(d.queue_lines()) == 30, 30, "the 30 messages queued")
    assert d.smtpctl("resume", "mta").stdout.strip() == "command succeeded"
    wait_for(lambda: len(sink.transactions) == 30, 60, "the 30 messages at the sink")
    wait_for(lambda: d.queue_lines() == [], 30, "the queue to be empty")
    assert "TempFail" not in d.log() and "PermFail" not in d.log()
    return d


def test_a_working_route_takes_more_connections_without_the_default_delays(make_daemon):
    """pysmtpd's connection policy (docs/mta.md): once the first connection is greeted,
    the backlog gets more connections at once (OpenSMTPD's default conn-delay-route
    would allow one per 5 s)."""
    port, mx_port = free_port(), free_port()
    with DnsServer(zone("burst.test")) as dns, CountingSink(mx_port) as sink:
        d = relay_burst(make_daemon, sink, dns, port, mx_port)
        assert 2 <= sink.max_open <= 5, sink.max_open         # max-conn-per-route 5
        assert d.log().count(" mta connecting ") >= 2


def test_a_connection_delay_set_in_the_configuration_applies_as_in_opensmtpd(make_daemon):
    port, mx_port = free_port(), free_port()
    with DnsServer(zone("burst.test")) as dns, CountingSink(mx_port) as sink:
        d = relay_burst(make_daemon, sink, dns, port, mx_port, "mta limit conn-delay-route 60")
        assert sink.max_open == 1 and d.log().count(" mta connecting ") == 1
