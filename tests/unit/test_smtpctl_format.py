"""smtpctl output formats (smtpctl.c) and common.durations (to.c, parse.y)."""
from __future__ import annotations

import json

import pytest

from common.durations import duration_to_text, parse_duration
from smtpctl.format import (
    MONITOR_HEADER,
    command_result,
    format_bulk_result,
    format_monitor_row,
    format_queue_json,
    format_queue_line,
    format_stat_value,
    format_stats,
    format_status,
    monitor_header,
    strnvis,
)

# --- durations ------------------------------------------------------------


@pytest.mark.parametrize("seconds,text", [
    (0, "0s"),
    (1, "1s"),
    (59, "59s"),
    (60, "1m"),
    (61, "1m1s"),
    (3600, "1h"),
    (3601, "1h1s"),
    (86400, "1d"),
    (93784, "1d2h3m4s"),
    (90000, "1d1h"),
    (86460, "1d1m"),
    (7 * 86400, "7d"),
    (400 * 86400 + 59, "400d59s"),
    (-1, "-1s"),
    (-93784, "-1d2h3m4s"),
    (-3600, "-1h"),
])
def test_duration_to_text(seconds, text):
    assert duration_to_text(seconds) == text


@pytest.mark.parametrize("text,seconds", [
    ("30s", 30), ("1s", 1), ("5m", 300), ("4h", 14400), ("2d", 172800),
    ("007m", 420), (f"{2**31 - 1}s", 2**31 - 1), (f"{(2**31 - 1) // 86400}d",
                                                  (2**31 - 1) // 86400 * 86400),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", [
    "", "s", "5", "0s", "5w", "5 s", " 5s", "-5s", "+5s", "1d2h", "5S",
    "1.5h", f"{2**31}s", f"{(2**31 - 1) // 86400 + 1}d",
])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError):
        parse_duration(text)


# --- strnvis --------------------------------------------------------------


@pytest.mark.parametrize("raw,vis", [
    ("plain text: 421 4.7.0 try again", "plain text: 421 4.7.0 try again"),
    ("tab\there", "tab\there"),
    ("nl\nhere", "nl\nhere"),
    ("back\\slash", "back\\\\slash"),
    ("cr\r", "cr\\^M"),
    ("\x01\x1b\x7f", "\\^A\\^[\\^?"),
    ("caf\u00e9", "caf\\M-C\\M-)"),          # UTF-8 c3 a9
    (b"\xa0", "\\240"),                       # meta-space goes octal
    (b"\x80\x9b\xff\xe9", "\\M^@\\M^[\\M^?\\M-i"),
    ("cut\x00after", "cut"),
    ('"quoted" *?[#', '"quoted" *?[#'),
])
def test_strnvis(raw, vis):
    assert strnvis(raw) == vis


def test_strnvis_truncates_on_whole_encodings():
    assert strnvis("a" * 5000) == "a" * 2047
    assert strnvis("abcd", size=4) == "abc"
    assert strnvis("ab\r", size=5) == "ab"       # "\^M" would not fit
    assert strnvis("ab\r", size=6) == "ab\\^M"
    assert strnvis("a\\", size=3) == "a"          # "\\\\" would not fit


# --- show queue -----------------------------------------------------------


def env(**kw):
    e = {
        "evpid": 0xB183B2D0B6C6F9AE,
        "sockaddr": "192.0.2.7",
        "type": "mta",
        "flags": [],
        "suspended": False,
        "held": False,
        "sender": "s@src.test",
        "rcpt": "r@sink.test",
        "dest": "r@sink.test",
        "ctime": 1795538835,
        "expire": 1795538835,
        "lasttry": 0,
        "retry": 0,
        "runstate": "pending",
        "runtime": -1,
        "errorline": "",
    }
    e.update(kw)
    return e


def test_queue_line_reference_example():
    assert format_queue_line(env()) == (
        "b183b2d0b6c6f9ae|inet4|mta||s@src.test|r@sink.test|r@sink.test"
        "|1795538835|1795538835|0|0|pending|-1|")


def test_queue_line_field_count():
    # smtpctl.c's printf has 14 |-separated fields (13 separators); the
    # "15 fields" sometimes quoted counts runstate|runtime twice.
    assert len(format_queue_line(env()).split("|")) == 14


@pytest.mark.parametrize("sockaddr,src", [
    ("local", "local"), ("192.0.2.7", "inet4"), ("[2001:db8::1]", "inet6"),
    ("[IPv6:2001:db8::1]", "inet6"), ("2001:db8::1", "inet6"),
    ("", "?"), ("garbage", "?"), (None, "?"),
])
def test_queue_src(sockaddr, src):
    assert format_queue_line(env(sockaddr=sockaddr)).split("|")[1] == src


@pytest.mark.parametrize("kind,agent", [
    ("mda", "mda"), ("mta", "mta"), ("bounce", "bounce"), ("other", "?")])
def test_queue_agent(kind, agent):
    assert format_queue_line(env(type=kind)).split("|")[2] == agent


@pytest.mark.parametrize("flags,suspended,held,text", [
    ([], False, False, ""),
    (["authenticated"], False, False, "auth"),
    (["internal", "authenticated", "bounce"], False, False, "bounce,auth,internal"),
    (["bounce"], True, False, "bounce,suspend"),
    ([], True, True, "suspend,hold"),
    (["internal", "authenticated", "bounce"], True, True,
     "bounce,auth,internal,suspend,hold"),
    ([], False, True, "hold"),
])
def test_queue_flags(flags, suspended, held, text):
    line = format_queue_line(env(flags=flags, suspended=suspended, held=held))
    assert line.split("|")[3] == text


def test_queue_unexpected_flag():
    with pytest.raises(ValueError, match="b183b2d0b6c6f9ae: unexpected flags"):
        format_queue_line(env(flags=["weird"]))


def test_queue_addresses():
    line = format_queue_line(env(sender="", rcpt="postmaster", dest="u@d"))
    assert line.split("|")[4:7] == ["@", "postmaster@", "u@d"]


def test_queue_runstates():
    assert format_queue_line(env(runstate="pending", runtime=300)).split("|")[11:13] \
        == ["pending", "300"]
    assert format_queue_line(env(runstate="inflight", runtime=12)).split("|")[11:13] \
        == ["inflight", "12"]
    assert format_queue_line(env(runstate="offline", runtime=None)).split("|")[11:13] \
        == ["offline", ""]
    assert format_queue_line(env(runstate="offline", runtime=99)).split("|")[11:13] \
        == ["offline", ""]
    assert format_queue_line(env(runstate="invalid", runtime=5)).split("|")[11:13] \
        == ["invalid", ""]


def test_queue_full_line_bounce_offline_with_error():
    e = env(evpid=0x0000000100000002, sockaddr="local", type="bounce",
            flags=["bounce", "authenticated"], sender="", rcpt="a@b", dest="a@b",
            ctime=1000, expire=1000 + 7 * 86400, lasttry=1500, retry=3,
            runstate="offline", runtime=None,
            errorline="450 4.2.0 mailbox busy\r")
    assert format_queue_line(e) == (
        "0000000100000002|local|bounce|bounce,auth|@|a@b|a@b|1000|605800|1500|3"
        "|offline||450 4.2.0 mailbox busy\\^M")


def test_queue_numbers_wrap_like_size_t():
    line = format_queue_line(env(lasttry=-1))
    assert line.split("|")[9] == str(2**64 - 1)


def test_queue_json():
    e = env(flags=["authenticated"], suspended=True, sender="",
            errorline="x\r", runstate="inflight", runtime=4)
    out = format_queue_json(e)
    assert "\n" not in out
    obj = json.loads(out)
    assert list(obj) == ["evpid", "src", "agent", "flags", "sender", "rcpt",
                         "dest", "ctime", "expire", "lasttry", "retry",
                         "runstate", "runtime", "errorline"]
    assert obj == {
        "evpid": "b183b2d0b6c6f9ae", "src": "inet4", "agent": "mta",
        "flags": ["auth", "suspend"], "sender": "@", "rcpt": "r@sink.test",
        "dest": "r@sink.test", "ctime": 1795538835, "expire": 1795538835,
        "lasttry": 0, "retry": 0, "runstate": "inflight", "runtime": 4,
        "errorline": "x\r",
    }
    assert out.startswith('{"evpid":"b183b2d0b6c6f9ae","src":"inet4",')


def test_queue_json_offline_runtime_null():
    obj = json.loads(format_queue_json(env(runstate="offline", runtime=None)))
    assert obj["runstate"] == "offline" and obj["runtime"] is None


# --- show status ----------------------------------------------------------


def test_status_all_running():
    assert format_status({}) == ["MDA running", "MTA running", "SMTP running"]
    assert format_status({"mda": False, "mta": False, "smtp": False}) == [
        "MDA running", "MTA running", "SMTP running"]


def test_status_mixed():
    assert format_status({"smtp": True, "mda": True}) == [
        "MDA paused", "MTA running", "SMTP paused"]
    assert format_status({"mta": "paused", "mda": "running"}) == [
        "MDA running", "MTA paused", "SMTP running"]
    assert format_status({"mta_paused": True}) == [
        "MDA running", "MTA paused", "SMTP running"]


def test_status_bitmask():
    assert format_status(0x2 | 0x8) == ["MDA paused", "MTA running", "SMTP paused"]
    assert format_status(0x4) == ["MDA running", "MTA paused", "SMTP running"]


def test_status_bad_value():
    with pytest.raises(ValueError):
        format_status({"mda": "sleeping"})


# --- show stats -----------------------------------------------------------


def test_stats_sorted_and_uptime():
    kv = {
        "smtp.session": 3,
        "uptime": 93784,
        "control.session": 1,
        "scheduler.envelope": 0,
        "smtp.session.inet4": 2,
        "queue.bounce": 1,
        "mta.task.running": -1,
        "smtp.session.local": 1,
        "smtp.smtps": 0,
        "scheduler.ramqueue.hold-overflow": 0,
        "scheduler.ramqueue.holdq": 2,
    }
    assert format_stats(kv) == [
        "control.session=1",
        "mta.task.running=-1",
        "queue.bounce=1",
        "scheduler.envelope=0",
        "scheduler.ramqueue.hold-overflow=0",
        "scheduler.ramqueue.holdq=2",
        "smtp.session=3",
        "smtp.session.inet4=2",
        "smtp.session.local=1",
        "smtp.smtps=0",
        "uptime=93784",
        "uptime.human=1d2h3m4s",
    ]


def test_stats_strcmp_order_not_locale():
    # '-' (0x2d) < '.' (0x2e) < 'Z' < '_' < 'a'
    assert format_stats({"a.b": 1, "a-b": 2, "aZ": 3, "a_": 4, "aa": 5}) == [
        "a-b=2", "a.b=1", "aZ=3", "a_=4", "aa=5"]


def test_stats_uptime_zero_and_only():
    assert format_stats({"uptime": 0}) == ["uptime=0", "uptime.human=0s"]
    assert format_stats({}) == []


def test_stat_values():
    assert format_stat_value(5) == "5"
    assert format_stat_value(-2) == "-2"
    assert format_stat_value(True) == "1"
    assert format_stat_value(1.5) == "1.500000"
    assert format_stat_value(2.000005) == "2.5"       # %lld.%lld, no padding
    assert format_stat_value(3.0) == "3.0"
    assert format_stat_value(0.9999999) == "1.0"
    with pytest.raises(TypeError):
        format_stat_value("x")


def test_stats_float_line():
    assert format_stats({"profiling.x": 1.25}) == ["profiling.x=1.250000"]


# --- bulk results ---------------------------------------------------------


@pytest.mark.parametrize("verb", ["paused", "resumed", "scheduled", "removed"])
def test_bulk_result(verb):
    assert format_bulk_result(verb, 0) == f"0 envelope {verb}"
    assert format_bulk_result(verb, 1) == f"1 envelope {verb}"
    assert format_bulk_result(verb, 2) == f"2 envelopes {verb}"
    assert format_bulk_result(verb, 1000) == f"1000 envelopes {verb}"


def test_bulk_result_discovered():
    assert format_bulk_result("discovered", 0) == "0 envelopes discovered"
    assert format_bulk_result("discovered", 1) == "1 envelope discovered"
    assert format_bulk_result("discovered", 3) == "3 envelopes discovered"


# --- monitor --------------------------------------------------------------

H1 = "--- client ---  -- envelope --   ---- relay/delivery --- ------- misc -------"
H2 = "curr conn disc  curr  enq  deq   ok tmpfail prmfail loop expire remove bounce"


def test_monitor_header():
    assert MONITOR_HEADER == (H1, H2)
    assert monitor_header(True) == [H1, H2]
    assert monitor_header(False) == ["", H1, H2]


def digest(**kw):
    d = dict.fromkeys(("clt_connect", "clt_disconnect", "evp_enqueued",
                       "evp_dequeued", "evp_expired", "evp_removed",
                       "evp_bounce", "dlv_ok", "dlv_permfail", "dlv_tempfail",
                       "dlv_loop"), 0)
    d.update(kw)
    return d


def test_monitor_first_row_zero():
    assert format_monitor_row(digest(), None) == (
        "   0    0    0     0    0    0    0       0       0    0      0      0      0")


def test_monitor_first_row_totals():
    cur = digest(clt_connect=10, clt_disconnect=7, evp_enqueued=20,
                 evp_dequeued=15, dlv_ok=12, dlv_tempfail=2, dlv_permfail=1,
                 dlv_loop=0, evp_expired=1, evp_removed=1, evp_bounce=3)
    assert format_monitor_row(cur, None) == (
        "   3   10    7     5   20   15   12       2       1    0      1      1      3")


def test_monitor_deltas_and_columns():
    prev = digest(clt_connect=10, clt_disconnect=7, evp_enqueued=20,
                  evp_dequeued=15, dlv_ok=12, dlv_tempfail=2, dlv_permfail=1,
                  evp_bounce=3)
    cur = digest(clt_connect=12, clt_disconnect=11, evp_enqueued=26,
                 evp_dequeued=16, dlv_ok=13, dlv_tempfail=5, dlv_permfail=1,
                 dlv_loop=1, evp_expired=2, evp_removed=4, evp_bounce=3)
    row = format_monitor_row(cur, prev)
    assert row == (
        "   1    2    4    10    6    1    1       3       0    1      2      4      0")
    assert len(row) == len(H2)


def test_monitor_wide_values_and_missing_keys():
    row = format_monitor_row({"clt_connect": 123456}, {})
    assert row == (
        "123456 123456    0     0    0    0    0       0       0    0      0      0      0")


def test_monitor_negative_wraps_like_size_t():
    row = format_monitor_row(digest(clt_disconnect=1), None)
    assert row.startswith(f"{2**64 - 1}    0    1  ")


# --- command results ------------------------------------------------------


def test_command_result():
    assert command_result(True) == "command succeeded"
    assert command_result(True, "ignored") == "command succeeded"
    assert command_result(False) == "command failed"
    assert command_result(False, "") == "command failed"
    assert command_result(False, None) == "command failed"
    assert command_result(False, "already paused") == "command failed: already paused"


@pytest.mark.parametrize("entry_kw,env_kw", [
    ({"runstate": "pending", "runtime": 42}, {}),
    ({"runstate": "inflight", "runtime": -3}, {"sockaddr": "[::1]", "sender": ""}),
    ({"runstate": "offline", "runtime": None}, {"errorline": "421 4.4.2 gone\tagain é|x", "retry": 7,
                                                "last_try": 1700000100}),
    ({"runstate": "pending", "runtime": 1, "suspended": True}, {}),
    ({"runstate": "pending", "runtime": 1, "held": True}, {"flags": ["bounce", "authenticated"]}),
    ({"runstate": "invalid", "runtime": 5}, {"type": "bounce", "sockaddr": "local", "rcpt": "user"}),
])
def test_the_fast_queue_line_is_the_general_one(entry_kw, env_kw):
    from smtpctl import format as fmt
    from common.envelope import Envelope
    from common.messages import QueueListEntry
    env = Envelope(id=0x1234567800000001, dispatcher="d", type="mta", sockaddr="192.0.2.1",
                   sender="s@a.test", rcpt="r@b.test", dest="r@b.test", ctime=1700000000)
    for k, v in env_kw.items():
        setattr(env, k, v)
    entry = QueueListEntry(evpid=env.id, expire=1700086400, envelope=env, **entry_kw)
    assert fmt.format_queue_entry(entry) == fmt.format_queue_line(fmt.entry_fields(entry))
