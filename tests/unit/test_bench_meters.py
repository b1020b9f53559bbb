"""The benchmarks' instruments (bench/meters.py, bench_mail's load CPU): the inotify
count of a Maildir's new/ against real files, the parsing of ``smtpctl show stats``,
the per-title CPU arithmetic and the memory meter's PSS policy on this process."""
from __future__ import annotations

import mmap
import os
import struct
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import bench_mail  # noqa: E402  (bench/ is not a package)
import meters  # noqa: E402


def _event(wd: int, mask: int, name: str = "", pad: int = 16) -> bytes:
    raw = name.encode()
    length = 0 if not raw else (len(raw) // pad + 1) * pad     # NUL-padded, as the kernel does
    return struct.pack("iIII", wd, mask, 0, length) + raw.ljust(length, b"\0")


def test_parse_inotify_events():
    buf = (_event(1, meters.IN_MOVED_TO, "1700000000.M1P2.host")
           + _event(1, meters.IN_CREATE | meters.IN_ISDIR, "sub")
           + _event(2, meters.IN_Q_OVERFLOW))
    assert meters.parse_inotify_events(buf) == [
        (1, meters.IN_MOVED_TO, "1700000000.M1P2.host"),
        (1, meters.IN_CREATE | meters.IN_ISDIR, "sub"),
        (2, meters.IN_Q_OVERFLOW, "")]
    assert meters.parse_inotify_events(b"") == []


def _deliver(maildir: Path, n: int, start: int = 0) -> None:
    """Half the messages as pysmtpd delivers (rename tmp/ -> new/), half as Postfix's
    virtual(8) (link tmp/ -> new/, then unlink)."""
    for i in range(start, start + n):
        tmp = maildir / "tmp" / f"msg{i}"
        tmp.write_bytes(b"Subject: x\n\nbody\n")
        if i % 2:
            os.rename(tmp, maildir / "new" / tmp.name)
        else:
            os.link(tmp, maildir / "new" / tmp.name)
            os.unlink(tmp)


def _wait_count(watch: meters.MaildirWatch, n: int, seconds: float = 10.0) -> int:
    deadline = time.monotonic() + seconds
    while watch.counter.count < n and time.monotonic() < deadline:
        time.sleep(0.01)
    return watch.counter.count


@pytest.mark.parametrize("use_inotify", [True, False])
def test_maildir_watch_counts_renames_and_links_once(tmp_path, use_inotify):
    maildir = tmp_path / "home" / "alice" / "Maildir"
    watch = meters.MaildirWatch(maildir / "new", use_inotify=use_inotify)
    watch.start()
    try:
        time.sleep(0.05)                 # the watch is on an ancestor: new/ does not exist yet
        (tmp_path / "home" / "alice").mkdir(parents=True)
        for sub in ("tmp", "new", "cur"):
            (maildir / sub).mkdir(parents=True)
        _deliver(maildir, 300)
        assert _wait_count(watch, 300) == 300
        time.sleep(0.1)
        assert watch.counter.count == 300                   # nothing counted twice
    finally:
        watch.stop()
    assert not watch.is_alive()
    assert watch.method == ("inotify" if use_inotify else "listing")
    assert watch.final_check() == {"maildir_count": watch.method, "maildir_missed_by_count": 0,
                                   "maildir_listings": watch.listings}
    times = watch.counter.times
    assert len(times) == 300 and times == sorted(times)
    if use_inotify:
        # The count came from the events (those created while new/ was being watched
        # and listed may come from that listing), not from a listing every 20 ms.
        assert watch.events > 0 and watch.listings < 20


def test_maildir_watch_counts_what_was_there_before_it(tmp_path):
    new = tmp_path / "Maildir" / "new"
    for sub in ("tmp", "new", "cur"):
        (tmp_path / "Maildir" / sub).mkdir(parents=True)
    _deliver(tmp_path / "Maildir", 5)
    watch = meters.MaildirWatch(new)
    watch.start()
    try:
        assert _wait_count(watch, 5) == 5
        _deliver(tmp_path / "Maildir", 7, start=5)
        assert _wait_count(watch, 12) == 12
    finally:
        watch.stop()


def test_final_check_adds_what_the_count_missed(tmp_path):
    new = tmp_path / "new"
    new.mkdir()
    watch = meters.MaildirWatch(new)     # never started: every file is missed by the count
    for i in range(3):
        (new / f"m{i}").write_bytes(b"x")
    assert watch.final_check()["maildir_missed_by_count"] == 3
    assert watch.counter.count == 3


SHOW_STATS = """\
control.session=1
scheduler.envelope=0
smtp.commit.latency.count=2000
smtp.commit.latency.max_ms=41.7
smtp.commit.latency.p50_ms=3.2
smtp.commit.latency.p90_ms=7
smtp.commit.latency.p99_ms=19.9
smtp.session.inet4=2000
uptime=12
uptime.human=12s
"""


def test_parse_stats_and_the_commit_latency():
    stats = meters.parse_stats(SHOW_STATS + "not a stat line\n")
    assert stats["uptime.human"] == "12s" and stats["smtp.session.inet4"] == "2000"
    assert "not a stat line" not in stats
    assert meters.server_commit_latency(stats) == {"count": 2000, "p50": 3.2, "p90": 7,
                                                   "p99": 19.9, "max": 41.7}
    assert meters.latency_line(meters.server_commit_latency(stats)) == \
        "p50 3.2 p90 7 p99 19.9 max 41.7 ms (n=2000)"


def test_commit_latency_absent_or_unreadable_is_null():
    older = meters.parse_stats("uptime=3\nsmtp.session.inet4=10\n")   # before the stats exist
    lat = meters.server_commit_latency(older)
    assert lat == {"count": None, "p50": None, "p90": None, "p99": None, "max": None}
    assert meters.latency_line(lat) == "not reported"
    assert meters.latency_line(None) == "not reported"
    odd = meters.server_commit_latency({"smtp.commit.latency.p99_ms": "soon"})
    assert odd["p99"] is None


def _fields(ppid: int, utime: int, stime: int, cutime: int, cstime: int, state: str = "S") -> list[bytes]:
    f = [state.encode(), str(ppid).encode(), b"1", b"1"] + [b"0"] * 7
    return f + [str(x).encode() for x in (utime, stime, cutime, cstime)] + [b"0"] * 5


def test_cpu_by_title_counts_reaped_children_and_zombies_under_their_parent():
    members = [(10, "smtpd: [priv]", _fields(1, 5, 3, 40, 2)),     # reaped workers: cutime/cstime
               (11, "smtpd: [priv]", _fields(10, 7, 1, 0, 0)),     # a live worker
               (12, "", _fields(10, 2, 2, 0, 0, "Z")),             # exited, not reaped yet
               (13, "smtpd: queue", _fields(10, 9, 1, 0, 0)),
               (14, "", _fields(99, 1, 0, 0, 0, "Z"))]             # parent unknown
    assert meters.cpu_ticks_by_title(members) == {"smtpd: [priv]": 50 + 8 + 4, "smtpd: queue": 10,
                                                  "(exited)": 1}


def test_ticks_spent_between_two_readings():
    before = {"smtpd: [priv]": 100, "smtpd: queue": 50, "gone": 5}
    after = {"smtpd: [priv]": 180, "smtpd: queue": 50, "new": 7}
    assert meters.ticks_spent(before, after) == {"gone": -5, "new": 7, "smtpd: [priv]": 80,
                                                 "smtpd: queue": 0}


def test_settled_waits_until_spending_stops_and_is_bounded():
    readings = iter([0, 10, 25, 26, 26, 26])
    assert meters.settled(lambda: next(readings), lambda t: t, time.monotonic() + 5, window=0) == 26
    always = iter(range(0, 10**6, 10))
    t0 = time.monotonic()
    last = meters.settled(lambda: next(always), lambda t: t, t0 + 0.2, window=0.05)
    assert last >= 20 and time.monotonic() - t0 < 1.0


def test_memory_meter_reads_pss_periodically_and_at_rss_highs():
    me = [(os.getpid(), "pytest")]
    meter = meters.MemoryMeter(lambda: me, pss_every=5, margin_kib=4096)
    rss = meter.sample()                           # tick 0: a PSS reading
    assert rss > 0 and meter.pss_samples == 1 and meter.peak_pss_kib > 0
    assert meter.peak_pss_kib <= meter.peak_kib
    meter.sample()
    meter.sample()
    assert meter.pss_samples == 1                  # no new RSS high, not the 5th tick
    # 32 MiB of fresh pages, touched (malloc could reuse pages already resident)
    with mmap.mmap(-1, 32 << 20) as ballast:
        ballast.write(b"x" * (32 << 20))
        meter.sample()                             # a new RSS high: PSS at once
        assert meter.pss_samples == 2 and meter.pss_triggered == 1
        assert meter.peak_pss_kib >= 32 << 10
        meter.sample()                             # tick 4: steady, no PSS
        meter.sample()                             # tick 5: the periodic reading
    assert meter.pss_samples == 3 and meter.pss_triggered == 1
    assert meter.peak_by_title["pytest"] == meter.peak_kib


def test_load_cpu_of_a_process_group_counts_what_it_spent():
    pgid = os.getpgrp()
    load = meters.LoadCpu(lambda: meters.cpu_ticks_by_title(bench_mail.pgrp_members(pgid)),
                          bench_mail.BENCH_CLIENT)
    t0 = time.process_time()
    while time.process_time() - t0 < 0.3:          # burn 0.3 s of this process's CPU
        sum(range(1000))
    load.finish(time.monotonic() + 10)
    res = load.results(accepted=100)
    mine = bench_mail.cmdline_title(os.getpid())
    assert load.by_title[mine] >= 0.2
    assert load.by_title[bench_mail.BENCH_CLIENT] >= 0.25
    assert res["daemon_cpu_seconds"] >= 0.2
    assert res["cpu_ms_per_message"][mine] == pytest.approx(1000 * load.by_title[mine] / 100, abs=0.01)
    assert 0 < res["bench_cpu_share"] <= 1
    assert 0 <= res["steal_share"] < 1             # the machine's, from /proc/stat
