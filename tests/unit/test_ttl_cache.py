"""pony's short memory of lka's answers (smtpd/ttl_cache.py)."""
from smtpd.ttl_cache import TtlCache


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_an_answer_is_kept_for_its_ttl_only():
    clock = Clock()
    cache = TtlCache(ttl=30, clock=clock)
    assert cache.get("192.0.2.1") is None
    cache.put("192.0.2.1", "mx.example.test")
    cache.put("192.0.2.2", "<unknown>")
    clock.now += 29.9
    assert cache.get("192.0.2.1") == "mx.example.test" and cache.get("192.0.2.2") == "<unknown>"
    clock.now += 0.1
    assert cache.get("192.0.2.1") is None and cache.get("192.0.2.2") is None


def test_a_new_answer_replaces_the_old_one_and_restarts_its_ttl():
    clock = Clock()
    cache = TtlCache(ttl=30, clock=clock)
    cache.put("192.0.2.1", "old.example.test")
    clock.now += 20
    cache.put("192.0.2.1", "new.example.test")
    clock.now += 20
    assert cache.get("192.0.2.1") == "new.example.test"


def test_it_is_bounded_expired_entries_first_then_the_oldest():
    clock = Clock()
    cache = TtlCache(ttl=30, max_entries=3, clock=clock)
    cache.put("a", "1")
    clock.now += 31                       # "a" expired
    cache.put("b", "2")
    cache.put("c", "3")
    cache.put("d", "4")                   # full: the expired "a" goes
    assert [cache.get(k) for k in "bcd"] == ["2", "3", "4"]
    cache.put("e", "5")                   # full, none expired: the oldest ("b") goes
    assert cache.get("b") is None and [cache.get(k) for k in "cde"] == ["3", "4", "5"]
    assert len(cache._entries) == 3


def test_clear_forgets_everything():
    cache = TtlCache(ttl=30, clock=Clock())
    cache.put(("users", "alice"), (1000, 1000, "/home/alice"))
    cache.clear()
    assert cache.get(("users", "alice")) is None
