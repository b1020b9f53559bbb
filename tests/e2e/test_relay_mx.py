"""MX relaying end to end: lka asks a DNS server the test runs on loopback (`mta
resolver`), the MTA connects to the MXs on 127.0.0.x at the port `mta mx-port`
names, one MX down, one refusing every session, one working."""
from __future__ import annotations

import re
import socket
import threading

import pytest
from aiosmtpd.controller import Controller

from tests.conftest import free_port, wait_for
from tests.dns_server import DnsServer
from tests.e2e.helpers import send
from tests.e2e.sink import SinkHandler


class MxSink:
    """An aiosmtpd sink on any loopback address (tests/e2e/sink.py's handler)."""

    def __init__(self, address: str, port: int, controller_class=Controller) -> None:
        self.handler = SinkHandler()
        self.controller = controller_class(self.handler, hostname=address, port=port, ready_timeout=10)

    def __enter__(self) -> "MxSink":
        self.controller.start()
        return self

    def __exit__(self, *exc) -> None:
        self.controller.stop()

    @property
    def transactions(self):
        with self.handler.lock:
            return list(self.handler.transactions)


class RefusingMx:
    """Answers every connection with a 554 banner and closes it."""

    def __init__(self, address: str, port: int) -> None:
        self.sock = socket.create_server((address, port))
        self.sock.settimeout(0.2)
        self.connections = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        for _ in range(100_000):
            if self.stop.is_set():
                return
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            with conn:
                conn.sendall(b"554 5.7.1 mx-refuse does not want mail\r\n")

    def __enter__(self) -> "RefusingMx":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


def zone() -> dict:
    return {
        "multi.test": {"MX": ["10 mx-down.multi.test.", "10 mx-refuse.multi.test.",
                              "20 mx-ok.multi.test."]},
        "mx-down.multi.test": {"A": ["127.0.0.2"]},
        "mx-refuse.multi.test": {"A": ["127.0.0.3"]},
        "mx-ok.multi.test": {"A": ["127.0.0.4"]},
        "4.0.0.127.in-addr.arpa": {"PTR": ["mx-ok.multi.test."]},
        "implicit.test": {"A": ["127.0.0.4"]},          # no MX: its own address
        "nullmx.test": {"MX": ["0 ."]},
        "v6.test": {"MX": ["10 mx6.v6.test."]},
        "mx6.v6.test": {"AAAA": ["::1"]},
    }


def mx_config(port: int, dns_port: int, mx_port: int, extra: str = "") -> str:
    return "\n".join([
        f"listen on 127.0.0.1 port {port}",
        f"mta resolver 127.0.0.1 port {dns_port}",
        f"mta mx-port {mx_port}",
        "mta limit session-keepalive 1 conn-delay-relay 0",
        'action "outbound" relay',
        'match from local for any action "outbound"',
        extra,
    ]) + "\n"


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_mx_relay_skips_a_down_and_a_refusing_mx_and_logs_as_opensmtpd(make_daemon):
    port, mx_port = free_port(), free_port()
    with DnsServer(zone()) as dns, RefusingMx("127.0.0.3", mx_port) as refusing, \
            MxSink("127.0.0.4", mx_port) as ok:
        d = make_daemon(mx_config(port, dns.port, mx_port)).start()
        send(port, "me@local.test", ["rcpt@multi.test"],
             "Subject: mx\nMessage-ID: <mx-test-1@local.test>\n\nhello\n")
        wait_for(lambda: ok.transactions, 30, "delivery to the working MX")
        assert [t.rcpt_tos for t in ok.transactions] == [["rcpt@multi.test"]]
        assert refusing.connections == 1
        log = d.wait_log("mta disconnected reason=quit messages=1")
        assert re.search(rf"mta connecting address=smtp://127\.0\.0\.2:{mx_port} host=127\.0\.0\.2", log)
        assert re.search(r"mta error reason=Connection failed: .*refused", log)
        assert "mta error reason=554 5.7.1 mx-refuse does not want mail" in log
        assert "smtp-out: Disabling route [] <-> 127.0.0.2 for 15s" in log
        assert "smtp-out: Disabling route [] <-> 127.0.0.3 for 15s" in log
        assert re.search(rf"mta connecting address=smtp://127\.0\.0\.4:{mx_port} host=mx-ok\.multi\.test", log)
        assert re.search(r"[0-9a-f]{16} mta connected", log)
        assert re.search(r'mta delivery evpid=[0-9a-f]{16} from=<me@local.test> to=<rcpt@multi.test> '
                         r'rcpt=<-> source="127\.0\.0\.1" relay="127\.0\.0\.4 \(mx-ok\.multi\.test\)" delay=\d+s '
                         r'result="Ok" stat="250 2\.0\.0 Ok: queued" message-id="<mx-test-1@local\.test>"', log)

        routes = d.smtpctl("show", "routes").stdout.splitlines()
        down = [r for r in routes if "<-> 127.0.0.2 " in r]
        assert len(down) == 1 and re.fullmatch(
            r"\d+\. \[\] <-> 127\.0\.0\.2 NDQ- nconn=0 nerror=1 penalty=1 timeout=\d+s", down[0])
        assert any(re.fullmatch(r"\d+\. \[\] <-> 127\.0\.0\.4 \(mx-ok\.multi\.test\) -[-Q]-[-K] nconn=\d "
                                r"nerror=0 penalty=0 timeout=.*", r) for r in routes), routes
        hosts = d.smtpctl("show", "hosts").stdout.splitlines()
        assert any(re.fullmatch(r"127\.0\.0\.4 mx-ok\.multi\.test refcount=0 nconn=[01] lastconn=\d+s", h)
                   for h in hosts), hosts
        stats = d.smtpctl("show", "hoststats").stdout.splitlines()
        assert any(re.fullmatch(r"multi\.test\|\d+\|250 2\.0\.0 Ok: queued", s) for s in stats), stats

        # resume route: the down MX's route is enabled again at once
        route_id = down[0].split(".")[0]
        assert d.smtpctl("resume", "route", route_id).stdout.strip() == "command succeeded"
        assert "smtp-out: Enabling route [] <-> 127.0.0.2 per admin request" in d.wait_log("per admin request")
        again = [r for r in d.smtpctl("show", "routes").stdout.splitlines() if "<-> 127.0.0.2 " in r]
        assert re.fullmatch(r"\d+\. \[\] <-> 127\.0\.0\.2 N--- nconn=0 nerror=0 penalty=0 timeout=-", again[0])


def test_implicit_mx_null_mx_and_ipv6(make_daemon):
    port, mx_port = free_port(), free_port()
    with DnsServer(zone()) as dns, MxSink("127.0.0.4", mx_port) as ok:
        d = make_daemon(mx_config(port, dns.port, mx_port)).start()
        send(port, "me@local.test", ["a@implicit.test"])
        wait_for(lambda: ok.transactions, 30, "delivery to the implicit MX")
        assert ok.transactions[0].rcpt_tos == ["a@implicit.test"]

        send(port, "me@local.test", ["b@nullmx.test"])
        log = d.wait_log("Domain does not accept mail\"")
        assert re.search(r'to=<b@nullmx\.test> rcpt=<-> source="-" relay="nullmx\.test" delay=\d+s '
                         r'result="PermFail" stat="Domain does not accept mail"', log)
        assert "smtp-out: Failed to resolve MX for [relay:nullmx.test,smtp]: Domain does not accept mail" in log

    if not _ipv6_loopback():
        pytest.fail("no IPv6 loopback on this machine: the IPv6 MX case cannot run")
    with DnsServer(zone()) as dns, MxSink("::1", mx_port) as ok6:
        d.stop()
        d = make_daemon(mx_config(port, dns.port, mx_port), subdir="d6").start()
        send(port, "me@local.test", ["c@v6.test"])
        wait_for(lambda: ok6.transactions, 30, "delivery to the IPv6 MX")
        assert re.search(rf"mta connecting address=smtp://\[::1\]:{mx_port} ", d.log())


def _mta_lines(log: str) -> list[str]:
    """The MTA's lines of a log with what differs between runs and daemons made uniform:
    session and envelope ids, ports, delays."""
    out = []
    for line in log.splitlines():
        m = re.search(r"[0-9a-f]{16} (mta (?:connecting|connected|delivery|disconnected).*)", line)
        if m:
            text = re.sub(r"evpid=[0-9a-f]{16}", "evpid=ID", m.group(1))
            text = re.sub(r":\d+ host=", ":PORT host=", text)
            out.append(re.sub(r"delay=\d+s", "delay=Ns", text))
    return out


def test_smarthost_relay_log_lines_are_opensmtpd_s(make_daemon, tmp_path):
    """The same relay by OpenSMTPD 6.8 (tests/oracle) and by pysmtpd: the same MTA lines."""
    from tests.oracle import opensmtpd
    from tests.e2e.sink import Sink

    def relay_once(start) -> str:
        port, sink_port = free_port(), free_port()
        sink = Sink(sink_port).start()
        try:
            daemon = start(port, sink_port)
            send(port, "me@local.test", ["x@remote.test"], "Subject: t\n\nhi\n")
            wait_for(lambda: sink.transactions, 30, "the relayed message")
            wait_for(lambda: "mta disconnected" in daemon.log(), 30, "the session's end")
            return daemon.log()
        finally:
            sink.stop()

    conf = ('listen on 127.0.0.1 port {port}\naction "out" relay host smtp://127.0.0.1:{sink}\n'
            'match from any for any action "out"\n')
    oracle = None
    try:
        def start_oracle(port, sink_port):
            nonlocal oracle
            oracle = opensmtpd.OpenSmtpd.prepare(tmp_path / "oracle", conf.format(port=port, sink=sink_port))
            return oracle.start([port])
        (tmp_path / "oracle").mkdir()
        try:
            theirs = relay_once(start_oracle)
        except opensmtpd.Unavailable as exc:
            opensmtpd.unavailable(str(exc))
    finally:
        if oracle is not None:
            oracle.stop()
    ours = relay_once(lambda port, sink_port: make_daemon(
        conf.format(port=port, sink=sink_port) + "mta limit session-keepalive 1\n").start())
    assert len(_mta_lines(theirs)) == 4, theirs
    assert _mta_lines(ours) == _mta_lines(theirs), (ours, theirs)
