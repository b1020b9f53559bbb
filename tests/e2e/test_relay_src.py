"""`relay src` and `helo-src` on the real daemon: outbound connections bound to the
configured local addresses (127.0.0.2, 127.0.0.3), the HELO name looked up by the
source address; `pause mta from ADDR` stops only the relays using ADDR; an
unparsable relay URL is a temporary failure ("Cannot parse smarthost")."""
from __future__ import annotations

import re

from tests.conftest import free_port, wait_for
from tests.dns_server import DnsServer
from tests.e2e.helpers import config, send
from tests.e2e.test_relay_mx import MxSink, mx_config

HELOS = {"127.0.0.2": "two.local.test", "127.0.0.3": "three.local.test"}
TABLES = ('table sources { "127.0.0.2", "127.0.0.3" }\n'
          'table helos { "127.0.0.2" = "two.local.test", "127.0.0.3" = "three.local.test" }')


def zone(*domains: str) -> dict:
    records = {"mx.src.test": {"A": ["127.0.0.4"]}}
    for domain in domains:
        records[domain] = {"MX": ["10 mx.src.test."]}
    return records


def src_config(port: int, dns_port: int, mx_port: int, options: str) -> str:
    conf = TABLES + "\n" + mx_config(port, dns_port, mx_port)
    return conf.replace('action "outbound" relay\n', f'action "outbound" relay {options}\n')


def test_src_table_binds_its_addresses_and_helo_src_names_them(make_daemon):
    port, mx_port = free_port(), free_port()
    with DnsServer(zone("src.test")) as dns, MxSink("127.0.0.4", mx_port) as sink:
        d = make_daemon(src_config(port, dns.port, mx_port, "src <sources> helo-src <helos>")).start()
        for n in range(3):
            send(port, "me@local.test", [f"u{n}@src.test"])
            wait_for(lambda: len(sink.transactions) == n + 1, 30, f"message {n}")
        for t in sink.transactions:
            assert t.peer[0] in HELOS, t.peer
            assert t.helo == HELOS[t.peer[0]], (t.peer, t.helo)
        log = d.log()
        sources = set(re.findall(r'to=<u\d@src\.test> rcpt=<-> source="([0-9.]+)"', log))
        assert sources and sources <= set(HELOS), log
        assert sources == {t.peer[0] for t in sink.transactions}


def test_src_address_is_bound_and_pause_mta_from_stops_only_that_source(make_daemon):
    port, mx_port = free_port(), free_port()
    with DnsServer(zone("paused.test", "open.test")) as dns, MxSink("127.0.0.4", mx_port) as sink:
        d = make_daemon(src_config(port, dns.port, mx_port, 'src "127.0.0.3" helo-src <helos>')).start()
        # another source paused for open.test: this relay (source 127.0.0.3) goes on
        assert d.smtpctl("pause", "mta", "from", "127.0.0.2", "for", "open.test").returncode == 0
        assert d.smtpctl("pause", "mta", "from", "127.0.0.3", "for", "paused.test").returncode == 0
        send(port, "me@local.test", ["a@paused.test"])
        send(port, "me@local.test", ["b@open.test"])
        wait_for(lambda: sink.transactions, 30, "the open domain's message")
        log = d.wait_log("All routes to destination blocked")
        assert re.search(r'to=<a@paused\.test> .* result="TempFail" stat="All routes to destination blocked"',
                         log)
        [t] = sink.transactions
        assert (t.rcpt_tos, t.peer[0], t.helo) == (["b@open.test"], "127.0.0.3", "three.local.test")
        assert re.search(r'to=<b@open\.test> rcpt=<-> source="127\.0\.0\.3" .*result="Ok"', log)
        routes = d.smtpctl("show", "routes").stdout
        assert "127.0.0.3 <-> 127.0.0.4" in routes, routes


def test_helo_src_without_a_name_for_the_source_fails_the_route(make_daemon):
    port, mx_port = free_port(), free_port()
    with DnsServer(zone("src.test")) as dns, MxSink("127.0.0.4", mx_port) as sink:
        conf = src_config(port, dns.port, mx_port, 'src "127.0.0.5" helo-src <helos>')
        d = make_daemon(conf).start()
        send(port, "me@local.test", ["u@src.test"])
        log = d.wait_log('result="TempFail"')
        assert "smtp-out: Error on route 127.0.0.5 <-> 127.0.0.4: Failed to retrieve helo string" in log
        assert "smtp-out: Disabling route 127.0.0.5 <-> 127.0.0.4 for 15s" in log
        assert sink.transactions == []


def test_unparsable_relay_url_is_a_temporary_failure(make_daemon, tmp_path):
    port = free_port()
    conf = 'table secrets { label = "bob:pw" }\n' + config(tmp_path / "d", port,
                                                             relay="label@127.0.0.1:587")
    conf = conf.replace('relay host "label@127.0.0.1:587"', 'relay host "label@127.0.0.1:587" tls auth <secrets>')
    d = make_daemon(conf).start()
    send(port, "me@local.test", ["a@remote.test"])
    log = d.wait_log('stat="Cannot parse smarthost"')
    assert "warn: Failed to parse smarthost label@127.0.0.1:587" in log
    assert re.search(r'to=<a@remote\.test> .*result="TempFail" stat="Cannot parse smarthost"', log)
    lines = [line for line in d.queue_lines() if "a@remote.test" in line]
    assert len(lines) == 1, lines                     # still queued, no bounce
    assert "bounce" not in log
