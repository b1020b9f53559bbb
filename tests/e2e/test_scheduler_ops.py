"""The scheduler against the real daemon: hold queues (`mta max-deferred`) and
`pause envelope` / `resume envelope` (docs/queue.md, "Scheduler")."""
from __future__ import annotations

import re
import time

from tests.conftest import free_port, wait_for
from tests.e2e.helpers import config, send
from tests.e2e.sink import Sink


def queue(d) -> dict[str, list[str]]:
    """show queue lines by recipient: the 14 fields."""
    return {line.split("|")[5]: line.split("|") for line in d.queue_lines()}


def test_failing_relay_holds_up_to_max_deferred_and_a_success_releases_them(make_daemon, tmp_path):
    sink_port, port = free_port(), free_port()
    conf = config(tmp_path / "d", port, relay=f"smtp://127.0.0.1:{sink_port}",
                  extra="mta max-deferred 1")
    d = make_daemon(conf).start()
    # the relay is down: the first envelope is tried and fails, which marks the relay failing
    send(port, "me@local.test", ["first@remote.test"])
    d.wait_log('result="TempFail"')
    # the next one is held without a try; the one after that is beyond max-deferred: tried
    send(port, "me@local.test", ["held@remote.test"])
    held = wait_for(lambda: (q := queue(d)).get("held@remote.test", [""] * 4)[3] == "hold" and q,
                    20, "the second envelope to be held")["held@remote.test"]
    assert held[10] == "0" and held[11] == "pending" and 0 < int(held[12]) <= 400
    send(port, "me@local.test", ["third@remote.test"])
    third = wait_for(lambda: queue(d).get("third@remote.test", [""] * 11)[10] == "1" and queue(d),
                     20, "the third envelope to be tried")["third@remote.test"]
    assert third[3] == "" and third[11] == "pending"
    assert d.log_since_start().count('result="TempFail"') == 2
    first = queue(d)["first@remote.test"]
    assert first[3] == "" and first[10] == "1"

    sink = Sink(sink_port).start()
    try:
        # a delivery to the relay succeeds: its hold queue is released at once
        assert d.smtpctl("schedule", first[0]).returncode == 0
        wait_for(lambda: len(sink.transactions) == 2, 20, "the first and the held envelope")
        assert sorted(r for t in sink.transactions for r in t.rcpt_tos) == [
            "first@remote.test", "held@remote.test"]
        # the envelope that was tried waits for its own retry time (400 s after ctime)
        time.sleep(0.5)
        assert list(queue(d)) == ["third@remote.test"]
        assert d.smtpctl("schedule", "all").stdout.strip() == "1 envelope scheduled"
        wait_for(lambda: len(sink.transactions) == 3, 20, "the third envelope")
        wait_for(lambda: d.queue_lines() == [], 10, "the queue to be empty")
    finally:
        sink.stop()


def test_held_envelope_probes_the_relay_when_the_hold_window_ends(make_daemon, tmp_path):
    sink_port, port = free_port(), free_port()
    d = make_daemon(config(tmp_path / "d", port, relay=f"smtp://127.0.0.1:{sink_port}")).start()
    send(port, "me@local.test", ["first@remote.test"])
    d.wait_log('result="TempFail"')
    send(port, "me@local.test", ["held@remote.test"])
    wait_for(lambda: queue(d).get("held@remote.test", [""] * 4)[3] == "hold", 20, "a held envelope")
    sink = Sink(sink_port).start()
    try:
        # nothing else goes to the relay: 15 s after the failure, the held envelope is
        # released alone to probe it (long before its own retry time, 400 s)
        wait_for(lambda: sink.transactions, 60, "the held envelope to probe the relay")
        assert [t.rcpt_tos for t in sink.transactions] == [["held@remote.test"]]
        assert list(queue(d)) == ["first@remote.test"]
    finally:
        sink.stop()


def _smtpctl(d, *args) -> str:
    return d.smtpctl(*args).stdout.strip()      # a failure (non-zero exit) raises


def test_pause_envelope_keeps_it_out_of_deliveries_until_resume(make_daemon, tmp_path):
    sink_port, port = free_port(), free_port()
    # max-deferred 0: no hold queue, the other message is tried as soon as it comes
    conf = config(tmp_path / "d", port, relay=f"smtp://127.0.0.1:{sink_port}",
                  extra="mta max-deferred 0")
    d = make_daemon(conf).start()
    send(port, "me@local.test", ["paused@remote.test"])
    d.wait_log('result="TempFail"')
    evpid = queue(d)["paused@remote.test"][0]
    _smtpctl(d, "pause", "envelope", evpid)
    line = queue(d)["paused@remote.test"]
    assert line[3] == "suspend" and line[11] == "pending"
    assert _smtpctl(d, "pause", "envelope", evpid[:8]) == "0 envelope paused"   # already

    sink = Sink(sink_port).start()
    try:
        # the relay works again and another message goes through it; the paused one stays
        send(port, "me@local.test", ["other@remote.test"])
        wait_for(lambda: len(sink.transactions) == 1, 20, "the other message")
        time.sleep(0.5)
        assert list(queue(d)) == ["paused@remote.test"]
        assert queue(d)["paused@remote.test"][3] == "suspend"
        # resume: the flag goes, the envelope waits for its next try; schedule sends it now
        assert _smtpctl(d, "resume", "envelope", evpid[:8]) == "1 envelope resumed"
        assert queue(d)["paused@remote.test"][3] == ""
        assert d.smtpctl("schedule", evpid).returncode == 0
        wait_for(lambda: len(sink.transactions) == 2, 20, "the resumed envelope")
        wait_for(lambda: d.queue_lines() == [], 10, "the queue to be empty")
    finally:
        sink.stop()


def test_schedule_delivers_a_paused_envelope_once_and_it_stays_paused(make_daemon, tmp_path):
    sink_port, port = free_port(), free_port()
    conf = config(tmp_path / "d", port, relay=f"smtp://127.0.0.1:{sink_port}",
                  extra="mta max-deferred 0")
    d = make_daemon(conf).start()
    send(port, "me@local.test", ["a@remote.test"])
    d.wait_log('result="TempFail"')
    evpid = queue(d)["a@remote.test"][0]
    _smtpctl(d, "pause", "envelope", "all")
    # still down: the scheduled try fails and the envelope comes back paused, retry 2
    assert d.smtpctl("schedule", evpid).returncode == 0
    wait_for(lambda: queue(d)["a@remote.test"][10] == "2", 20, "the scheduled try")
    assert queue(d)["a@remote.test"][3] == "suspend"
    assert _smtpctl(d, "resume", "envelope", "all") == "1 envelope resumed"


def test_queue_ttl_expires_an_envelope_that_keeps_failing(make_daemon, tmp_path):
    sink_port, port = free_port(), free_port()
    conf = config(tmp_path / "d", port, relay=f"smtp://127.0.0.1:{sink_port}",
                  extra="queue ttl 3s")
    d = make_daemon(conf).start()
    send(port, "me@local.test", ["late@remote.test"])
    # the first try ends 1-2 s after the message came in on a loaded machine: the evpid is
    # taken from its log line, as `show queue` read now may already be past the expiry
    log = d.wait_log('result="TempFail"')
    evpid = re.search(r"mta delivery evpid=([0-9a-f]{16}) from=<me@local\.test> to=<late@remote\.test>",
                      log).group(1)
    # its next try would be 400 s after creation: it expires at 3 s instead (expire =
    # ctime + queue ttl; delay= is counted in whole seconds, the timer may fire a bit late)
    log = d.wait_log("Envelope expired")
    expired = [l for l in log.splitlines() if "Envelope expired" in l and f"Expire for {evpid}:" in l]
    assert len(expired) == 1, log
    assert re.search(r", delay=[34]s, stat=Envelope expired$", expired[0]), expired
    wait_for(lambda: "late@remote.test" not in queue(d), 10, "the expired envelope to leave the queue")


def test_delay_notice_is_ordered_once_per_warn_interval(make_daemon, tmp_path):
    sink_port, port = free_port(), free_port()
    conf = config(tmp_path / "d", port, relay=f"smtp://127.0.0.1:{sink_port}",
                  extra="bounce warn-interval 1s\nmta max-deferred 0")
    d = make_daemon(conf, extra_args=["-T", "scheduler"]).start()
    send(port, "me@local.test", ["slow@remote.test"])
    evpid = wait_for(lambda: queue(d).get("slow@remote.test", [""] * 11)[10] == "1"
                     and queue(d)["slow@remote.test"][0], 20, "the first failure")
    # the next try (400 s) is past ctime + 1 s: the notice is due with this failure
    d.wait_log(f"scheduler: evp:{evpid} delay notice due (1s)")
    assert d.smtpctl("schedule", evpid).returncode == 0
    wait_for(lambda: queue(d)["slow@remote.test"][10] == "2", 20, "the second failure")
    assert d.log_since_start().count(f"scheduler: evp:{evpid} delay notice due") == 1
