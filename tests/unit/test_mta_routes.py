"""smtpd/mta_routes.py: route choice, limits, penalties, rates and the show lines,
with the clock passed in."""
import random

from smtpd.mta_routes import (
    DELAY_CHECK_LIMIT, FAILURE_TEXT, ROUTE_DISABLED, Limits, RelayKey, Routing,
)


def routing(**limits) -> Routing:
    return Routing(Limits(**limits), rng=random.Random(1))


def relay_with(r: Routing, mxs, tasks=1, key=None):
    relay = r.relay(key or RelayKey("example.org"))
    r.set_mxs(relay, mxs)
    relay.tasks.extend(range(tasks))
    return relay


def test_lowest_preference_first_and_equal_preferences_shuffled():
    orders = set()
    for seed in range(20):
        r = Routing(rng=random.Random(seed))
        relay = r.relay(RelayKey("example.org"))
        r.set_mxs(relay, [(20, "c", "10.0.0.3"), (10, "a", "10.0.0.1"), (10, "b", "10.0.0.2")])
        prefs = [p for p, _ in relay.mxs]
        assert prefs == [10, 10, 20]
        orders.add(tuple(h.address for _, h in relay.mxs[:2]))
        assert relay.mxs[2][1].address == "10.0.0.3"
    assert orders == {("10.0.0.1", "10.0.0.2"), ("10.0.0.2", "10.0.0.1")}


def test_new_connection_goes_to_the_least_loaded_best_mx_and_never_to_a_worse_one():
    r = routing(conn_delay_route=0, conn_delay_relay=0, reconn_delay_route=0)
    relay = relay_with(r, [(10, "a", "10.0.0.1"), (10, "b", "10.0.0.2"), (20, "c", "10.0.0.3")], tasks=100)
    src = r.source()
    used = []
    for _ in range(4):
        d = r.connect(relay, src, now=100.0)
        assert d.route is not None
        r.opened(relay, d.route, 100.0, 1000.0)
        r.ready(relay, d.route)
        used.append(d.route.dst.address)
    assert sorted(used) == ["10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.2"]


def test_host_limit_caps_connections_and_says_when_to_look_again():
    r = routing(max_conn_per_host=2, conn_delay_route=0, conn_delay_relay=0)
    relay = relay_with(r, [(10, "a", "10.0.0.1")], tasks=100)
    src = r.source()
    for _ in range(2):
        d = r.connect(relay, src, 50.0)
        r.opened(relay, d.route, 50.0, 0)
        r.ready(relay, d.route)
    d = r.connect(relay, src, 50.0)
    assert d.route is None and d.retry_at == 50.0 + DELAY_CHECK_LIMIT
    assert "limit_host" in r.connector(relay, src).flags or "limit_route" in r.connector(relay, src).flags
    r.closed(relay, relay.mxs[0][1] and r.routes[("", "10.0.0.1")], True, 51.0)
    assert r.connect(relay, src, 60.0).route is not None


def test_no_more_connections_than_tasks_need():
    r = routing(conn_delay_route=0, conn_delay_relay=0, reconn_delay_route=0)
    relay = relay_with(r, [(10, "a", "10.0.0.1")], tasks=1)
    d = r.connect(relay, r.source(), 0.0)
    r.opened(relay, d.route, 0.0, 0)
    r.ready(relay, d.route)
    assert r.connect(relay, r.source(), 100.0).route is None     # one ready session for one task


def test_failed_first_connection_disables_the_route_for_a_penalty_then_enables_it():
    r = routing(conn_delay_route=0, conn_delay_relay=0, reconn_delay_route=0)
    relay = relay_with(r, [(10, "a", "10.0.0.1")])
    src = r.source()
    d = r.connect(relay, src, 0.0)
    r.opened(relay, d.route, 0.0, 0)
    assert r.closed(relay, d.route, False, 1.0) == 15
    assert d.route.flags & ROUTE_DISABLED
    d2 = r.connect(relay, src, 2.0)
    assert d2.error == "error_route_net" and FAILURE_TEXT[d2.error] == "Network error on destination MXs"
    assert r.show_routes(2.0) == ["1. [] <-> 10.0.0.1 NDQ- nconn=0 nerror=1 penalty=1 timeout=14s"]
    assert r.enable_due(10.0) == []
    assert r.enable_due(16.0) == [d.route]
    assert not d.route.flags & ROUTE_DISABLED and d.route.penalty == 0
    d3 = r.connect(relay, src, 20.0)
    assert d3.route is d.route


def test_falls_back_to_the_next_preference_when_the_best_routes_are_disabled():
    r = routing(conn_delay_route=0, conn_delay_relay=0, reconn_delay_route=0)
    relay = relay_with(r, [(10, "a", "10.0.0.1"), (20, "b", "10.0.0.2")])
    src = r.source()
    d = r.connect(relay, src, 0.0)
    assert d.route.dst.address == "10.0.0.1"
    r.opened(relay, d.route, 0.0, 0)
    r.closed(relay, d.route, False, 0.5)
    d = r.connect(relay, src, 1.0)
    assert d.route.dst.address == "10.0.0.2" and d.host_name == "b"


def test_backup_mx_relays_only_to_better_mxs():
    r = routing()
    relay = r.relay(RelayKey("example.org", backup="me.example.org"))
    r.set_mxs(relay, [(10, "a", "10.0.0.1"), (20, "me.example.org", "10.0.0.9"), (30, "c", "10.0.0.3")],
              "me.example.org")
    relay.tasks.append(0)
    d = r.connect(relay, r.source(), 0.0)
    assert d.route.dst.address == "10.0.0.1"
    r.opened(relay, d.route, 0.0, 0)
    r.closed(relay, d.route, False, 0.0)
    assert r.connect(relay, r.source(), 1.0).error == "error_route_net"
    # the primary MX itself has nowhere to relay
    primary = r.relay(RelayKey("example.org", backup="a"))
    r.set_mxs(primary, [(10, "a", "10.0.0.1"), (20, "b", "10.0.0.2")], "a")
    primary.tasks.append(0)
    assert r.connect(primary, r.source(), 2.0).error == "error_mx"


def test_delays_between_connections_are_waited_for():
    r = routing(conn_delay_route=0, conn_delay_relay=2)
    relay = relay_with(r, [(10, "a", "10.0.0.1")], tasks=50)
    d = r.connect(relay, r.source(), 100.0)
    r.opened(relay, d.route, 100.0, 0)
    r.ready(relay, d.route)
    d2 = r.connect(relay, r.source(), 100.5)
    assert d2.route is None and d2.retry_at == 102.0


def test_message_rate_holds_tasks_back_without_dropping_them():
    r = routing(max_msg_rate=2, max_msg_period=60)
    relay = relay_with(r, [(10, "a", "10.0.0.1")], tasks=3)
    assert r.take_task(relay, 0.0) == 0
    assert r.take_task(relay, 1.0) == 1
    assert r.take_task(relay, 2.0) is None and relay.ntask == 1
    assert r.rate_wait(relay, 2.0) == 58.0
    assert r.take_task(relay, 60.0) == 2


def test_blocked_source_and_domain_and_the_show_lines():
    r = routing()
    relay = relay_with(r, [(10, "a", "10.0.0.1")])
    r.block("", "example.org")
    assert r.connect(relay, r.source(), 0.0).error == "error_blocked"
    assert r.show_blocks() == ["[] -> example.org"]
    r.unblock("", "example.org")
    assert r.connect(relay, r.source(), 0.0).route is not None
    r.hosts["10.0.0.1"].ptrname = "mx.example.org"
    assert r.show_hosts(0.0) == ["10.0.0.1 mx.example.org refcount=0 nconn=0 lastconn=-"]
    lines = r.show_relays(0.0, 0.0)
    assert lines[0] == "[relay:example.org,smtp] refcount=0 ntask=1 nconn=0 lastconn=- timeout=- wait="
    assert lines[1].startswith("  connector [] refcount=0 nconn=0 lastconn=- timeout=- flags=")
    r.hoststat("Example.org", "250 2.0.0 Ok", 1700000000.0)
    assert r.show_hoststats() == ["example.org|1700000000|250 2.0.0 Ok"]
    r.expire_hoststats(1700000000.0 + 4 * 3600)
    assert r.show_hoststats() == []


def test_resume_route_clears_penalties_and_a_probe_retries_disabled_routes():
    r = routing(conn_delay_route=0, conn_delay_relay=0, reconn_delay_route=0)
    relay = relay_with(r, [(10, "a", "10.0.0.1")])
    d = r.connect(relay, r.source(), 0.0)
    r.opened(relay, d.route, 0.0, 0)
    r.closed(relay, d.route, False, 0.0)
    assert r.resume(d.route.id) == [d.route] and d.route.penalty == 0
    assert r.connect(relay, r.source(), 1.0).route is d.route
    r.opened(relay, d.route, 1.0, 0)
    r.closed(relay, d.route, False, 1.0)
    assert r.connect(relay, r.source(), 2.0).error == "error_route_net"
    relay.probe = True
    assert r.connect(relay, r.source(), 2.0).route is d.route


def test_relay_text_as_opensmtpd():
    assert RelayKey("mx.example.org", 2525, as_host=True).text() == "[relay:mx.example.org,port=2525,smtp,mx]"
    assert RelayKey("example.org", backup="b.example.org", helo="me").text() == \
        "[relay:example.org,smtp,backup=b.example.org,heloname=me]"


# -- the grammar (smtpd/parse_mta.py) and the limits it gives (smtpd/mta.py) ----------------

def parsed(tmp_path, text):
    from smtpd.parse import parse_config
    path = tmp_path / "smtpd.conf"
    path.write_text(text)
    return parse_config(path)


def test_mta_limit_resolver_mx_port_and_relay_options_parse(tmp_path):
    from smtpd.mta import limits_from_config
    config = parsed(tmp_path, "\n".join([
        "mta limit max-conn-per-host 2 session-mail-max 10",
        "mta limit for domain Example.ORG max-conn-per-route 1 max-msg-rate 10/min inet6",
        "mta resolver 127.0.0.1 ::1 port 5353",
        "mta mx-port 2525",
        'action "out" relay backup mx mx2.example.org mail-from <bounce@example.org>',
        'match from local for any action "out"', ""]))
    default, per_domain = limits_from_config(config)
    assert (default.max_conn_per_host, default.session_mail_max, default.max_conn_per_route) == (2, 10, 5)
    org = per_domain["example.org"]
    assert (org.max_conn_per_host, org.max_conn_per_route, org.family) == (2, 1, 6)
    assert (org.max_msg_rate, org.max_msg_period) == (10, 60)
    assert (config.mta_resolver, config.mta_resolver_port, config.mta_mx_port) == (["127.0.0.1", "::1"], 5353, 2525)
    out = config.actions["out"]
    assert (out.backup, out.backup_mx, out.mail_from) == (True, "mx2.example.org", "bounce@example.org")
    assert config.not_applied == []


def test_mta_grammar_errors_name_the_problem(tmp_path):
    import pytest
    from smtpd.config import ConfigError
    for text, message in (("mta limit max-conn-per-moon 3", "invalid mta limit keyword: max-conn-per-moon"),
                          ("mta limit max-msg-rate 10/fortnight", 'invalid rate "10/fortnight"'),
                          ("mta limit max-conn-per-host -1", 'invalid number "-1"'),
                          ("mta resolver dns.example port 53", 'invalid address "dns.example"'),
                          ("mta mx-port 0", 'invalid port "0"')):
        with pytest.raises(ConfigError) as info:
            parsed(tmp_path, text + '\naction "out" relay\nmatch from local for any action "out"\n')
        assert message in str(info.value), (text, str(info.value))


def test_relay_src_and_helo_src_are_applied(tmp_path):
    config = parsed(tmp_path, 'table h { 127.0.0.1 = "me.example.org" }\n'
                              'table s { 127.0.0.2, 127.0.0.3 }\n'
                              'action "out" relay src 127.0.0.1 helo-src <h>\n'
                              'action "tbl" relay src <s>\n'
                              'match from local for any action "out"\n')
    assert config.not_applied == []
    assert (config.actions["out"].src, config.actions["out"].helo_src) == ("127.0.0.1", "h")
    assert config.actions["tbl"].src == "s"


def test_relay_key_tells_a_source_address_from_a_source_table():
    from smtpd.mta import _source_fields
    assert _source_fields("127.0.0.2") == {"source": "127.0.0.2"}
    assert _source_fields("::1") == {"source": "::1"}
    assert _source_fields("anon:4:1") == {"source_table": "anon:4:1"}
    assert _source_fields(None) == {}


def test_block_stops_only_the_connections_from_its_source():
    r = Routing()
    r.block("127.0.0.2", "example.org")
    assert r.is_blocked(r.source("127.0.0.2"), "example.org")
    assert not r.is_blocked(r.source("127.0.0.3"), "example.org")
    assert not r.is_blocked(r.source(""), "example.org")       # no `src`: OpenSMTPD's NULL source
    assert not r.is_blocked(r.source("127.0.0.2"), "example.com")


# -- pysmtpd's connection policy: default delays waived on a route that works -----------------

def open_ready(r: Routing, relay, now: float, greet: bool = True):
    d = r.connect(relay, r.source(), now)
    assert d.route is not None, d
    r.opened(relay, d.route, now, 0)
    if greet:
        r.ready(relay, d.route)
    return d.route


def test_a_working_route_opens_more_connections_at_once_as_the_backlog_needs():
    r = Routing(rng=random.Random(1))                      # every limit at its default
    relay = relay_with(r, [(10, "a", "10.0.0.1")], tasks=100)
    route = open_ready(r, relay, 100.0, greet=False)
    d = r.connect(relay, r.source(), 100.0)                 # a new route: OpenSMTPD's delays
    assert d.route is None and d.retry_at == 102.0           # conn-delay-relay
    assert r.connect(relay, r.source(), 102.0).route is None  # its first is still opening
    assert "limit_route" in r.connector(relay, r.source()).flags
    r.ready(relay, route)
    for n in range(2, 6):                                   # no conn-delay-route nor -relay now
        assert open_ready(r, relay, 100.0) is route and route.nconn == n
    d = r.connect(relay, r.source(), 100.0)                 # max-conn-per-route (5) reached
    assert d.route is None and d.retry_at == 100.0 + DELAY_CHECK_LIMIT


def test_slow_start_opens_one_connection_at_a_time_on_a_working_route():
    r = Routing(rng=random.Random(1))
    relay = relay_with(r, [(10, "a", "10.0.0.1")], tasks=100)
    route = open_ready(r, relay, 0.0)
    open_ready(r, relay, 0.0, greet=False)                  # opening, not greeted yet
    assert r.connect(relay, r.source(), 0.0).route is None
    r.ready(relay, route)
    assert r.connect(relay, r.source(), 0.0).route is route


def test_a_session_that_ends_on_its_quota_is_replaced_without_waiting():
    r = Routing(rng=random.Random(1))
    relay = relay_with(r, [(10, "a", "10.0.0.1")], tasks=1)
    route = open_ready(r, relay, 10.0)
    r.closed(relay, route, True, 10.5, failed=False)        # session-mail-max reached, QUIT
    assert open_ready(r, relay, 10.5) is route              # no reconn-delay-route (3 s)


def test_the_delays_apply_again_after_a_session_on_the_route_failed():
    r = Routing(rng=random.Random(1))
    relay = relay_with(r, [(10, "a", "10.0.0.1")], tasks=100)
    route = open_ready(r, relay, 10.0)
    r.closed(relay, route, True, 11.0, failed=True)         # a network error mid-session
    assert r.connect(relay, r.source(), 11.0).retry_at == 12.0   # conn-delay-relay 2 s from 10.0
    assert r.connect(relay, r.source(), 12.0).retry_at == 15.0   # conn-delay-route 5 s
    assert open_ready(r, relay, 15.0) is route              # greeted: working again
    assert open_ready(r, relay, 15.0) is route


def test_a_failed_connection_on_a_working_route_brings_the_delays_back():
    r = Routing(rng=random.Random(1))
    relay = relay_with(r, [(10, "a", "10.0.0.1")], tasks=100)
    route = open_ready(r, relay, 10.0)
    failing = open_ready(r, relay, 10.0, greet=False)
    assert r.closed(relay, failing, False, 10.2) is None    # not a new route: not disabled
    assert r.connect(relay, r.source(), 10.2).retry_at == 12.0   # conn-delay-relay
    assert r.connect(relay, r.source(), 12.0).retry_at == 15.0   # conn-delay-route


def test_delays_the_administrator_sets_apply_as_in_opensmtpd():
    r = Routing(Limits(conn_delay_route=5), rng=random.Random(1))
    relay = relay_with(r, [(10, "a", "10.0.0.1")], tasks=100)
    route = open_ready(r, relay, 100.0)
    d = r.connect(relay, r.source(), 101.0)
    assert d.route is None and d.retry_at == 105.0
    r.closed(relay, route, True, 110.0, failed=False)       # the default reconn delay is still waived
    assert open_ready(r, relay, 110.0) is route
    assert Limits(conn_delay_route=5).explicit == {"conn_delay_route"} and Limits().explicit == set()


def test_configured_limit_keys_are_explicit(tmp_path):
    from smtpd.mta import limits_from_config
    config = parsed(tmp_path, "mta limit conn-delay-relay 2\nmta limit for domain a.test reconn-delay-route 3\n"
                              'action "out" relay\nmatch from local for any action "out"\n')
    default, per_domain = limits_from_config(config)
    assert default.explicit == {"conn_delay_relay"} and default.conn_delay_relay == 2
    assert per_domain["a.test"].explicit == {"conn_delay_relay", "reconn_delay_route"}
    r = Routing(default, rng=random.Random(1))
    relay = relay_with(r, [(10, "a", "10.0.0.1")], tasks=100)
    open_ready(r, relay, 100.0)
    assert r.connect(relay, r.source(), 100.0).retry_at == 102.0


def test_no_connection_opens_while_the_message_rate_is_reached():
    r = Routing(Limits(max_msg_rate=1, max_msg_period=60), rng=random.Random(1))
    relay = relay_with(r, [(10, "a", "10.0.0.1")], tasks=3)
    route = open_ready(r, relay, 0.0)
    assert r.take_task(relay, 0.0) == 0
    r.closed(relay, route, True, 1.0, failed=False)          # its session let go, over the rate
    d = r.connect(relay, r.source(), 1.0)
    assert d.route is None and d.retry_at == 60.0
    assert r.connect(relay, r.source(), 60.0).route is route


def test_default_task_marks_grow_with_the_ready_sessions_and_configured_ones_do_not():
    r = Routing(rng=random.Random(1))
    relay = relay_with(r, [(10, "a", "10.0.0.1")], tasks=100)
    assert r.task_marks(relay) == (50, 30)                   # a stuck relay: OpenSMTPD's marks
    for _ in range(3):
        open_ready(r, relay, 0.0)
    assert r.task_marks(relay) == (150, 90)
    r = Routing(Limits(task_hiwat=2, task_lowat=1), rng=random.Random(1))
    relay = relay_with(r, [(10, "a", "10.0.0.1")], tasks=100)
    open_ready(r, relay, 0.0)
    open_ready(r, relay, 0.0)
    assert r.task_marks(relay) == (2, 1)
