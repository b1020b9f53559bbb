"""smtpd/control.py's ClientLogLimiter: how many lines one uid's control clients may
put in the log, with the clock passed in."""
from __future__ import annotations

from smtpd.control import ClientLogLimiter


def test_a_burst_per_interval_then_one_summary():
    limiter = ClientLogLimiter(burst=3, interval=60.0)
    assert [limiter.allow(1000, 100.0 + i)[0] for i in range(10)] == [True] * 3 + [False] * 7
    assert limiter.summaries(150.0) == []                 # the interval has not ended
    assert limiter.allow(0, 150.0) == (True, None)        # another uid has its own share
    # uid 1000's interval ends: its next line is logged, after the summary of the 7 left out
    assert limiter.allow(1000, 160.0) == (True, (7, 60.0))
    assert limiter.allow(1000, 161.0) == (True, None)


def test_a_quiet_uid_is_summed_up_by_the_timer_and_forgotten():
    limiter = ClientLogLimiter(burst=2, interval=10.0)
    for second in range(5):
        limiter.allow(1000, float(second))
    limiter.allow(1001, 3.0)                              # within its burst: nothing to sum up
    assert limiter.summaries(9.0) == []
    assert limiter.summaries(14.0) == [(1000, 3, 14.0)]   # 1001's ended too, with nothing left out
    assert limiter.windows == {}
    assert limiter.allow(1000, 15.0) == (True, None)


def test_at_stop_every_open_interval_is_summed_up():
    limiter = ClientLogLimiter(burst=1, interval=60.0)
    limiter.allow(5, 0.0)
    limiter.allow(5, 1.0)
    limiter.allow(6, 2.0)
    assert limiter.summaries(3.0, every=True) == [(5, 1, 3.0)]
    assert limiter.windows == {}
