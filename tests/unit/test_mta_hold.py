from smtpd.mta import HOLD_WINDOW_MAX, FailingRelay


def test_hold_window_grows_as_route_penalties_and_is_capped():
    relay = FailingRelay(holdq=1, since=0.0)
    windows = []
    for now in (0.0, 100.0, 200.0, 300.0):
        relay.failed(now)
        windows.append(relay.until - now)
    assert windows == [15, 60, 135, 240]          # 15 s x failures²
    for _ in range(20):
        relay.failed(1000.0)
    assert relay.until - 1000.0 == HOLD_WINDOW_MAX == 3600
