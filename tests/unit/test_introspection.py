"""Pure parts of the introspection commands: trace/profile keywords and masks, the
counters and their totals, the monitor digest, the Prometheus exposition, the
metrics configuration, and the queue backend's profiling proxy."""
from __future__ import annotations

import io
import logging
import os
from contextlib import redirect_stdout
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from common import stat, trace
from common.envelope import Envelope
from common.messages import ClientResult
from smtpd.config import ConfigError
from smtpd.metrics import exposition, metric_name, process_usage
from smtpd.parse import parse_config
from smtpd.queue_fs import Spool
from smtpd.queue_profile import Observed
from smtpd.stat_backend import Gathered
from smtpctl import monitor
from smtpctl.format import format_stats


@pytest.fixture(autouse=True)
def clean_state():
    stat.reset()
    trace.FLAGS.set_tracing(0)
    trace.FLAGS.set_profiling(0)
    yield
    stat.reset()
    trace.FLAGS.set_tracing(0)
    trace.FLAGS.set_profiling(0)


def test_trace_keywords_are_opensmtpds_bits():
    assert [trace.trace_bits(w) for w in ("imsg", "io", "smtp", "filters", "mta", "bounce",
                                          "scheduler", "lookup", "stat", "rules", "mproc", "expand")] == \
        [0x2, 0x4, 0x8, 0x10, 0x20, 0x40, 0x80, 0x100, 0x200, 0x400, 0x800, 0x1000]
    assert trace.trace_bits("all") & trace.TRACE_DEBUG == 0
    assert trace.trace_bits("all") & 0x7FFE == 0x7FFE
    for word in ("tables", "queue", "debug", "", "MPROC"):
        with pytest.raises(trace.KeywordError, match=f"^invalid trace keyword: {word}$"):
            trace.trace_bits(word)
    assert (trace.profile_bits("imsg"), trace.profile_bits("queue")) == (0x2, 0x4)
    with pytest.raises(trace.KeywordError, match="^invalid profile keyword: disk$"):
        trace.profile_bits("disk")


def test_smtpd_dash_T_words():
    tracing, profiling, unknown = trace.from_command_line(
        ["transfer", "bounces", "stats", "tables", "queue", "profile-imsg", "profstat", "nope"], 1)
    assert tracing == trace.TRACE_DEBUG | trace.TRACE_MTA | trace.TRACE_BOUNCE | trace.TRACE_STAT \
        | trace.TRACE_TABLES | trace.TRACE_QUEUE
    assert profiling == trace.PROFILE_IMSG | trace.PROFILE_TOSTAT
    assert unknown == ["nope"]
    assert trace.from_command_line([], 0) == (0, 0, [])


def test_switches_follow_the_mask():
    flags = trace.Switches()
    flags.set_tracing(trace.TRACE_MPROC | trace.TRACE_DEBUG)
    assert flags.mproc and flags.debug and not flags.imsg and not flags.smtp
    flags.set_tracing(trace.TRACE_ALL)
    assert not flags.debug and all(getattr(flags, n) for n in (
        "imsg", "io", "smtp", "filters", "mta", "bounce", "scheduler", "lookup", "stat", "rules",
        "mproc", "expand", "tables", "queue"))
    flags.set_profiling(trace.PROFILE_QUEUE)
    assert flags.profile_queue and not flags.profile_imsg
    assert trace.names(trace.TRACE_MPROC | trace.TRACE_SMTP) == ["smtp", "mproc"]


def test_counters_and_totals():
    stat.increment("smtp.session")
    stat.increment("smtp.session")
    stat.decrement("smtp.session")
    stat.increment("scheduler.envelope", 3)
    stat.set("queue.evpcache.size", 7)
    assert stat.snapshot() == {"smtp.session": 1, "scheduler.envelope": 3, "queue.evpcache.size": 7}
    assert stat.totals() == ({"smtp.session": 2, "scheduler.envelope": 3}, {"smtp.session": 1})


def test_population_counts_distinct_live_objects():
    hosts = stat.Population("mta.host")
    hosts.add("192.0.2.1")
    hosts.add("192.0.2.1")
    hosts.add("192.0.2.2")
    assert stat.snapshot() == {"mta.host": 2}
    hosts.discard("192.0.2.1")
    assert stat.snapshot() == {"mta.host": 2}
    hosts.discard("192.0.2.1")
    hosts.discard("192.0.2.9")          # never added: no effect
    assert stat.snapshot() == {"mta.host": 1}


def test_histogram_percentiles_are_bucket_bounds():
    latency = stat.histogram("smtp.commit.latency")
    assert stat.histogram("smtp.commit.latency") is latency     # one per key and process
    assert stat.snapshot() == {}                        # no key until something is measured
    # 100 durations: 50 of 11.5 ms, 40 of 17.7 ms, 9 of 25.3 ms, one of 0.3 s
    for seconds, n in ((0.0115, 50), (0.0177, 40), (0.0253, 9), (0.3, 1)):
        for _ in range(n):
            latency.observe(seconds)
    # nearest rank: the 50th, 90th and 99th durations, each as the bound of its bucket
    assert stat.snapshot() == {"smtp.commit.latency.count": 100, "smtp.commit.latency.p50_ms": 12.0,
                               "smtp.commit.latency.p90_ms": 18.0, "smtp.commit.latency.p99_ms": 26.0,
                               "smtp.commit.latency.max_ms": 300.0}
    latency.observe(0.3001)                             # the 99th of 101 is now 0.3 s
    assert latency.values()["smtp.commit.latency.p99_ms"] == 300.0
    stat.reset()
    assert stat.snapshot() == {} and latency.count == 0


def test_histogram_buckets():
    h = stat.Histogram("t")
    bounds = stat.LATENCY_BOUNDS_MS
    assert bounds == tuple(sorted(bounds)) and bounds[0] == 0.1 and bounds[-1] == 10000.0
    # a millisecond apart from 1 to 50 ms: a p99 near 20 ms reads to the millisecond
    assert [b for b in bounds if 1 <= b <= 50] == [float(v) for v in range(1, 51)]
    # one decimal at most: show stats prints floats as seconds.microseconds
    assert all(round(b, 1) == b for b in bounds)
    h.observe(0.012)                   # exactly on a bound: in the bucket it closes
    h.observe(0.00005)                 # below the first bound
    assert h.percentiles(0.5, 1.0) == [0.1, 12.0]
    h.observe(12.5)                    # past the last bound: the maximum, to 0.1 ms
    assert h.percentiles(0.99) == [12500.0] and h.values()["t.max_ms"] == 12500.0
    one = stat.Histogram("one")
    one.observe(0.0203)
    assert one.values() == {"one.count": 1, "one.p50_ms": 21.0, "one.p90_ms": 21.0,
                            "one.p99_ms": 21.0, "one.max_ms": 20.3}
    assert format_stats({"one.max_ms": 20.3, "one.p50_ms": 0.3}) == [
        "one.max_ms=20.300000", "one.p50_ms=0.300000"]


def test_stat_trace_lines(caplog):
    trace.FLAGS.set_tracing(trace.TRACE_STAT)
    with caplog.at_level(logging.DEBUG, logger="smtpd.trace"):
        stat.increment("mda.user")
        stat.decrement("mda.user")
        stat.Histogram("smtp.commit.latency").observe(0.0125)
    assert [r.getMessage() for r in caplog.records] == [
        "stat: increment: mda.user: 0 -> 1", "stat: decrement: mda.user: 1 -> 0",
        "stat: observe: smtp.commit.latency: 12.500 ms"]


def test_digest_from_gathered_counters():
    g = Gathered()
    g.add({"smtp.session": 1, "scheduler.envelope": 2, "scheduler.delivery.ok": 5, "queue.bounce": 1},
          {"smtp.session": 9, "scheduler.envelope": 7}, {"smtp.session": 8, "scheduler.envelope": 5})
    g.add({"scheduler.envelope.removed": 1}, {}, {})
    d = g.digest()
    assert (d["clt_connect"], d["clt_disconnect"], d["evp_enqueued"], d["evp_dequeued"]) == (9, 8, 7, 5)
    assert (d["dlv_ok"], d["evp_bounce"], d["evp_removed"], d["dlv_tempfail"]) == (5, 1, 1, 0)


class _Replies:
    """smtpctl's monitor and show stats against a list of canned control answers."""

    def __init__(self, replies) -> None:
        self.replies = list(replies)
        self.asked: list[str] = []

    def request(self, command: str, **args):
        self.asked.append(command)
        return self.replies.pop(0)


def test_monitor_rows_and_header_every_25():
    digests = [ClientResult(ok=True, data={"clt_connect": i, "clt_disconnect": 0, "evp_enqueued": 2 * i})
               for i in range(27)]
    out = io.StringIO()
    monitor.monitor(_Replies(digests), rows=27, interval=0, out=out)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("--- client ---") and lines[1].startswith("curr conn disc")
    assert lines[2].split()[:5] == ["0", "0", "0", "0", "0"]
    assert lines[3].split()[:5] == ["1", "1", "0", "2", "2"]
    assert lines[27:30] == ["", *lines[0:2]]          # again before row 26, after an empty line
    assert len(lines) == 2 + 25 + 3 + 2


def test_show_stats_prints_uptime_since_start():
    conn = _Replies([ClientResult(ok=True, data={"uptime": 1000, "smtp.session": 2, "control.session": 1})])
    out = io.StringIO()
    with redirect_stdout(out):
        monitor.show_stats(conn, now=1125)
    assert out.getvalue() == "control.session=1\nsmtp.session=2\nuptime=125\nuptime.human=2m5s\n"


def test_prometheus_exposition():
    body, ctype = exposition({"smtp.session": 3, "scheduler.ramqueue.hold-overflow": 1, "uptime": 100,
                              "profiling.imsg.queue.pony.smtp_message_commit": 0.25}, None, now=160)
    assert ctype.startswith("text/plain")
    samples = {s.name: s.value for f in text_string_to_metric_families(body.decode()) for s in f.samples}
    assert samples == {"smtpd_smtp_session": 3.0, "smtpd_scheduler_ramqueue_hold_overflow": 1.0,
                       "smtpd_uptime_seconds": 60.0,
                       "smtpd_profiling_imsg_queue_pony_smtp_message_commit": 0.25}
    assert metric_name("mta.task.running") == "smtpd_mta_task_running"
    assert b"# HELP smtpd_smtp_session OpenSMTPD statistic smtp.session" in body
    assert b"smtpd_process" not in body                  # no process usage given, no empty family


def test_prometheus_types_and_process_metrics():
    body, _ = exposition({"smtp.session": 1, "smtp.session.inet4": 7, "scheduler.delivery.ok": 5,
                          "scheduler.envelope": 2, "queue.bounce": 1, "uptime": 100}, None, now=160,
                         processes={"lka": {"cpu_seconds": 1.5, "resident_memory_bytes": 4096.0},
                                    "parent": {"cpu_seconds": 0.25, "resident_memory_bytes": 8192.0,
                                               "open_fds": 12.0}})
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    types = {name: f.type for name, f in families.items()}
    assert types == {"smtpd_smtp_session": "gauge", "smtpd_smtp_session_inet4": "counter",
                     "smtpd_scheduler_delivery_ok": "counter", "smtpd_scheduler_envelope": "gauge",
                     "smtpd_queue_bounce": "counter", "smtpd_uptime_seconds": "gauge",
                     "smtpd_process_cpu_seconds": "counter",
                     "smtpd_process_resident_memory_bytes": "gauge", "smtpd_process_open_fds": "gauge"}
    samples = {(s.name, s.labels.get("process")): s.value for f in families.values() for s in f.samples}
    assert samples["smtpd_scheduler_delivery_ok_total", None] == 5.0
    assert samples["smtpd_process_cpu_seconds_total", "lka"] == 1.5
    assert samples["smtpd_process_resident_memory_bytes", "parent"] == 8192.0
    assert [k for k in samples if k[0] == "smtpd_process_open_fds"] == [("smtpd_process_open_fds", "parent")]


def test_process_usage_reads_proc():
    usage = process_usage({"me": os.getpid(), "gone": 2 ** 22 + 1})
    assert set(usage) == {"me"}
    assert usage["me"]["open_fds"] == len(os.listdir("/proc/self/fd"))     # both count listdir's own
    assert usage["me"]["resident_memory_bytes"] > 1 << 20
    assert 0 < usage["me"]["cpu_seconds"] <= sum(os.times()[:2]) + 0.01


def test_metrics_config(tmp_path: Path):
    base = 'listen on 127.0.0.1\naction "l" maildir\nmatch for local action "l"\n'
    path = tmp_path / "smtpd.conf"
    path.write_text(base)
    assert parse_config(path).metrics_address is None                 # off by default
    for text, addr, port in (("metrics listen on 127.0.0.1 port 9025", "127.0.0.1", 9025),
                             ("metrics listen on localhost port 1", "127.0.0.1", 1),
                             ("metrics listen on ::1 port 65535", "::1", 65535)):
        path.write_text(base + text + "\n")
        config = parse_config(path)
        assert (config.metrics_address, config.metrics_port) == (addr, port)
    for text, message in (
            ("metrics listen on 192.0.2.1 port 9025", "4: metrics: 192.0.2.1 is not a loopback address"),
            ("metrics listen on eth0 port 9025", "4: metrics: eth0 is not a loopback address"),
            ("metrics listen on 127.0.0.1", "4: syntax error: unexpected end of line"),
            ("metrics listen on 127.0.0.1 port 0", '4: invalid port "0"'),
            ("metrics on 127.0.0.1 port 1", '4: syntax error: unexpected "on", expected "listen"'),
            ("metrics listen on 127.0.0.1 port 1\nmetrics listen on 127.0.0.1 port 2",
             "5: metrics listen on: already defined")):
        path.write_text(base + text + "\n")
        with pytest.raises(ConfigError) as err:
            parse_config(path)
        assert message in str(err.value), str(err.value)


def test_queue_profile_times_and_traces_the_real_spool(tmp_path: Path, caplog):
    spool = Spool(tmp_path / "spool")
    spool.setup(0, 0, False)
    observed = Observed(spool)
    msgid = observed.create_message()                 # switches off: no line, plain method
    assert observed.create_message.__func__ is Spool.create_message
    trace.FLAGS.set_profiling(trace.PROFILE_QUEUE)
    trace.FLAGS.set_tracing(trace.TRACE_QUEUE)
    with caplog.at_level(logging.DEBUG, logger="smtpd.trace"):
        env = Envelope(sender="a@b.test", rcpt="c@d.test", dest="c@d.test", type="mda",
                       dispatcher="local", ctime=1)
        evpid = observed.write_incoming_envelope(msgid, env)
        body = observed.open_body(msgid)
        body.write(b"Subject: x\n\nbody\n")
        observed.commit(msgid, body)
        assert observed.load_envelope(evpid).rcpt == "c@d.test"
        assert list(observed.walk()) == [(msgid, [evpid])]
        with pytest.raises(FileNotFoundError):
            observed.load_envelope(evpid + 1)
    lines = [r.getMessage() for r in caplog.records]
    for op in ("queue_envelope_create", "queue_message_fd_rw", "queue_message_commit",
               "queue_envelope_load", "queue_message_walk"):
        assert any(line.startswith(f"profile-queue: {op} 0.") for line in lines), (op, lines)
    assert f"queue-backend: queue_envelope_load({evpid:016x}) -> evp:{evpid:016x}" in lines
    assert f"queue-backend: queue_envelope_load({evpid + 1:016x}) -> FileNotFoundError" in lines
    assert observed.root == spool.root                # attributes read through
