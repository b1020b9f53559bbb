"""Builtin filters (``filter NAME phase PHASE match CONDITION DECISION``) against pysmtpd and
OpenSMTPD 6.8 (the oracle), one configuration for both: the replies each gives are asserted
literally, so the two agree wherever both pass.

Clients connect from addresses of 127.0.0.0/8 whose reverse DNS the private loopback DNS of
tests/filter_programs.py answers (nothing leaves the machine):

    127.0.0.1  localhost (/etc/hosts), forward-confirmed
    127.0.0.2  no PTR record: no rDNS
    127.0.0.3  good.example.test, whose A record is 127.0.0.3: forward-confirmed
    127.0.0.4  liar.example.test, whose A record is 192.0.2.1: rDNS, not forward-confirmed
    127.0.0.5  broken.example.test, whose A lookup fails (SERVFAIL): not forward-confirmed
    127.0.0.6  gone.example.test, which does not exist (NXDOMAIN): not forward-confirmed
    127.0.0.7  its PTR lookup fails (SERVFAIL): no rDNS
    127.0.0.8  bad!name.example.test, a PTR name no resolver accepts: no rDNS

Accepted mail is relayed to a sink (the oracle, unpacked, cannot deliver locally).
"""
from __future__ import annotations

import smtplib
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.e2e.sink import Sink
from tests.filter_programs import (
    SERVERS, private_dns, relay_config, shared_dir, start_server)

HOSTNAME = "mx.example.test"
PYTHON = "/usr/bin/python3"      # filters run as _smtpd (opensmtpd for the oracle) when root

DNS_RECORDS = {
    "3.0.0.127.in-addr.arpa": {"PTR": ["good.example.test."]},
    "good.example.test": {"A": ["127.0.0.3"]},
    "4.0.0.127.in-addr.arpa": {"PTR": ["liar.example.test."]},
    "liar.example.test": {"A": ["192.0.2.1"]},
    "5.0.0.127.in-addr.arpa": {"PTR": ["broken.example.test."]},
    "broken.example.test": {"RCODE": ["SERVFAIL"]},
    "6.0.0.127.in-addr.arpa": {"PTR": ["gone.example.test."]},
    "7.0.0.127.in-addr.arpa": {"RCODE": ["SERVFAIL"]},
    "8.0.0.127.in-addr.arpa": {"PTR": ["bad!name.example.test."]},
}

# The start of the proc filters below: an output function, the config lines skipped.
FILTER_PRELUDE = r'''
import sys
def out(line):
    sys.stdout.write(line + "\n"); sys.stdout.flush()
for line in sys.stdin:
    if line.rstrip("\n") == "config|ready":
        break
'''

# A proc filter that shows the builtins' ``report`` decisions: it subscribes to filter-report
# events and writes the ones of its session into a header of the message.
REPORT_WATCHER = FILTER_PRELUDE + r'''
out("register|report|smtp-in|filter-report")
out("register|filter|smtp-in|data-line")
out("register|ready")
reports, started = {}, set()
for line in sys.stdin:
    f = line.rstrip("\n").split("|")
    if f[0] == "report" and f[4] == "filter-report":
        reports.setdefault(f[5], []).append("|".join(f[6:]))
    elif f[0] == "filter" and f[4] == "data-line":
        sid, tok, data = f[5], f[6], "|".join(f[7:])
        if sid not in started:
            started.add(sid)
            out("filter-dataline|%s|%s|X-Filter-Reports: %s" % (sid, tok, "; ".join(reports.get(sid, [])) or "none"))
        if data == ".":
            started.discard(sid)
            reports.pop(sid, None)
        out("filter-dataline|%s|%s|%s" % (sid, tok, data))
'''

# A proc filter that shows what the link-connect report said: it disconnects at connect
# with the reverse name and the fcrdns word (pass, fail or error) in the reply.
CONNECT_WATCHER = FILTER_PRELUDE + r'''
out("register|report|smtp-in|link-connect")
out("register|filter|smtp-in|connect")
out("register|ready")
seen = {}
for line in sys.stdin:
    f = line.rstrip("\n").split("|")
    if f[0] == "report" and f[4] == "link-connect":
        seen[f[5]] = (f[6], f[7])
    elif f[0] == "filter" and f[4] == "connect":
        rdns, fcrdns = seen.pop(f[5], ("none", "none"))
        out("filter-result|%s|%s|disconnect|550 rdns=%s fcrdns=%s" % (f[5], f[6], rdns, fcrdns))
'''

LISTENERS = ("rdns", "fcrdns", "helo", "mailfrom", "junk", "rcptto", "bypass", "report",
             "rewrite", "badtext", "authphase", "connectwatch")


def _config(ports: dict[str, int], sink_port: int, watcher: Path) -> str:
    connect_watcher = watcher.with_name("connect_watcher.py")
    lines = [
        'table bulk { "^bulk-[0-9]+@" }',
        'table spammers { "spammer@example.net", "@junk.test" }',
        'table traps { "trap@example.test" }',
        'filter "no-rdns" phase connect match !rdns disconnect "550 5.7.1 no rDNS for you"',
        'filter "no-fcrdns" phase ehlo match !fcrdns reject "550 5.7.1 forward-confirmed rDNS required"',
        'filter "bad-helo" phase ehlo match helo regex { "^localhost$", "^[0-9.]+$" } '
        'reject "550 5.7.1 bad HELO name"',
        'filter "bulk" phase mail-from match mail-from regex <bulk> reject "550 5.7.1 no bulk senders"',
        'filter "junk-spammers" phase mail-from match mail-from <spammers> junk',
        'filter "trap" phase rcpt-to match rcpt-to <traps> reject "550 5.7.1 spam trap"',
        'filter "trusted" phase ehlo match src { "127.0.0.3" } bypass',
        'filter "trusted-then-helo" chain { "trusted", "bad-helo" }',
        'filter "report-spammers" phase mail-from match mail-from <spammers> report "spammer seen"',
        f'filter "watcher" proc-exec "{PYTHON} {watcher}"',
        'filter "reported" chain { "report-spammers", "watcher" }',
        'filter "rewrite-spammers" phase mail-from match mail-from <spammers> '
        'rewrite "<postmaster@example.test>"',
        'filter "bad-text" phase ehlo match helo regex { "^bad" } reject "go away"',
        'filter "auth-phase" phase auth match !auth reject "550 5.7.1 authenticate first"',
        f'filter "connect-watcher" proc-exec "{PYTHON} {connect_watcher}"',
    ]
    used = {"rdns": "no-rdns", "fcrdns": "no-fcrdns", "helo": "bad-helo", "mailfrom": "bulk",
            "junk": "junk-spammers", "rcptto": "trap", "bypass": "trusted-then-helo",
            "report": "reported", "rewrite": "rewrite-spammers", "badtext": "bad-text",
            "authphase": "auth-phase", "connectwatch": "connect-watcher"}
    lines += [f'listen on 127.0.0.1 port {ports[name]} hostname {HOSTNAME} filter "{used[name]}"'
              for name in LISTENERS]
    return "\n".join(lines) + "\n" + relay_config(sink_port)


@pytest.fixture(scope="module")
def dns():
    with private_dns(DNS_RECORDS) as server:
        yield server


@pytest.fixture(scope="module")
def watcher():
    directory = shared_dir("pysmtpd-report-watcher-")
    script = directory / "watcher.py"
    script.write_text(REPORT_WATCHER)
    script.chmod(0o644)
    connect_watcher = directory / "connect_watcher.py"
    connect_watcher.write_text(CONNECT_WATCHER)
    connect_watcher.chmod(0o644)
    yield script
    script.unlink()
    connect_watcher.unlink()
    directory.rmdir()


@pytest.fixture(scope="module", params=SERVERS)
def server(request, tmp_path_factory, dns, watcher, privsep_users):
    base = tmp_path_factory.mktemp(request.param)
    ports = {name: free_port() for name in LISTENERS}
    sink_port = free_port()
    srv = start_server(request.param, base, _config(ports, sink_port, watcher), ports, dns,
                       Sink(sink_port))
    try:
        yield srv
    finally:
        srv.stop()


def _client(server, listener: str, source: str = "127.0.0.1") -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", server.ports[listener], timeout=30, source_address=(source, 0))


MESSAGE = "From: {sender}\r\nTo: bob@example.test\r\nSubject: {subject}\r\n\r\nhello\r\n"


def _send(server, listener: str, sender: str, subject: str, rcpts=("bob@example.test",)):
    with _client(server, listener) as s:
        s.ehlo("client.example.test")
        assert s.mail(sender)[0] == 250
        for rcpt in rcpts:
            assert s.rcpt(rcpt)[0] == 250
        code, text = s.data(MESSAGE.format(sender=sender, subject=subject).encode())
        assert code == 250, (code, text)


def _headers(message: bytes, name: str) -> list[str]:
    head = message.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].decode()
    return [line.split(":", 1)[1].strip() for line in head.splitlines()
            if line.lower().startswith(name.lower() + ":")]


# --- rdns / fcrdns --------------------------------------------------------------------------

def test_no_rdns_is_disconnected_at_connect_with_the_configured_text(server):
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        _client(server, "rdns", source="127.0.0.2")
    assert (refused.value.smtp_code, refused.value.smtp_error) == (550, b"5.7.1 no rDNS for you")
    for source in ("127.0.0.1", "127.0.0.3", "127.0.0.4"):       # these have a reverse name
        with _client(server, "rdns", source=source) as s:
            assert s.noop()[0] == 250


@pytest.mark.parametrize("source, accepted", [
    ("127.0.0.1", True), ("127.0.0.3", True), ("127.0.0.4", False), ("127.0.0.2", False)])
def test_fcrdns_at_ehlo(server, source, accepted):
    with _client(server, "fcrdns", source=source) as s:
        code, text = s.ehlo("client.example.test")
        if accepted:
            assert code == 250, text
        else:
            assert (code, text) == (550, b"5.7.1 forward-confirmed rDNS required")
            assert s.noop()[0] == 250                 # a reject leaves the session open


@pytest.mark.parametrize("source, rdns, fcrdns", [
    ("127.0.0.1", "localhost", "pass"),
    ("127.0.0.3", "good.example.test", "pass"),
    ("127.0.0.2", "<unknown>", "fail"),              # no PTR record
    ("127.0.0.4", "liar.example.test", "fail"),      # the name's address is not the client's
    ("127.0.0.6", "gone.example.test", "fail"),      # the name does not exist
    # A failed lookup is "fail" too: OpenSMTPD's resolver (libasr) folds SERVFAIL into
    # EAI_NODATA (getaddrinfo) and EAI_NONAME (getnameinfo); see filter_proc.fcrdns_result.
    ("127.0.0.5", "broken.example.test", "fail"),
    ("127.0.0.7", "<unknown>", "fail"),
    ("127.0.0.8", "<unknown>", "fail"),              # a PTR name that is not a host name
])
def test_link_connect_reports_fcrdns_pass_fail_or_error(server, source, rdns, fcrdns):
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        _client(server, "connectwatch", source=source)
    assert (refused.value.smtp_code, refused.value.smtp_error) == (
        550, f"rdns={rdns} fcrdns={fcrdns}".encode())


# --- regex and tables -----------------------------------------------------------------------

@pytest.mark.parametrize("helo, accepted", [
    ("localhost", False), ("LOCALHOST", False), ("10.0.0.1", False), ("client.example.test", True)])
def test_helo_regex(server, helo, accepted):
    with _client(server, "helo") as s:
        code, text = s.ehlo(helo)
        assert (code == 250) if accepted else ((code, text) == (550, b"5.7.1 bad HELO name"))


def test_mail_from_regex_rejects_with_the_configured_text(server):
    with _client(server, "mailfrom") as s:
        s.ehlo("client.example.test")
        assert s.mail("bulk-42@example.net") == (550, b"5.7.1 no bulk senders")
        assert s.mail("alice@example.net")[0] == 250


def test_junk_adds_x_spam_to_the_message_of_a_listed_sender(server):
    _send(server, "junk", "someone@junk.test", "junked")
    _send(server, "junk", "alice@example.net", "clean")
    assert [v.lower() for v in _headers(server.delivered("junked"), "X-Spam")] == ["yes"]
    assert _headers(server.delivered("clean"), "X-Spam") == []


def test_rcpt_to_table(server):
    with _client(server, "rcptto") as s:
        s.ehlo("client.example.test")
        assert s.mail("alice@example.net")[0] == 250
        assert s.rcpt("Trap@example.test") == (550, b"5.7.1 spam trap")
        assert s.rcpt("bob@example.test")[0] == 250


# --- decisions ------------------------------------------------------------------------------

def test_bypass_skips_the_rest_of_the_chain(server):
    with _client(server, "bypass", source="127.0.0.3") as s:        # trusted: bypass
        assert s.ehlo("localhost")[0] == 250
    with _client(server, "bypass") as s:                            # not trusted: bad-helo
        assert s.ehlo("localhost") == (550, b"5.7.1 bad HELO name")


def test_report_reaches_report_subscribers_and_the_chain_goes_on(server):
    _send(server, "report", "spammer@example.net", "reported")
    _send(server, "report", "alice@example.net", "unreported")
    assert _headers(server.delivered("reported"), "X-Filter-Reports") == [
        "builtin|report-spammers|spammer seen"]
    assert _headers(server.delivered("unreported"), "X-Filter-Reports") == ["none"]


def test_rewrite_replaces_the_sender(server):
    _send(server, "rewrite", "spammer@example.net", "rewritten")
    server.delivered("rewritten")
    [tx] = [t for t in server.sink.transactions if b"Subject: rewritten" in t.data]
    assert tx.mail_from == "postmaster@example.test"


def test_a_reply_that_is_not_smtp_becomes_421_and_disconnects(server):
    with _client(server, "badtext") as s:
        assert s.ehlo("bad.example.test") == (421, b"Internal server error")
        with pytest.raises(smtplib.SMTPServerDisconnected):
            s.noop()


def test_phase_auth_filters_differ_as_docs_filters_md_says(server):
    """A chosen difference (docs/filters.md): OpenSMTPD's parse.y leaves ``phase auth``
    filters at connect, where ``!auth`` holds for everyone; pysmtpd keeps them at AUTH,
    where builtins never act."""
    if server.kind == "opensmtpd":
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            _client(server, "authphase")
        assert (refused.value.smtp_code, refused.value.smtp_error) == (550, b"5.7.1 authenticate first")
    else:
        with _client(server, "authphase") as s:
            assert s.ehlo("client.example.test")[0] == 250
