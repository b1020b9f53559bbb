"""The scheduler model's side of smtpctl discover and of corrupt messages: envelopes it
already knows are ignored (not counted, the live one kept), and a forgotten envelope
(queue_envelope_remove) is never ordered again."""
from smtpd.scheduler_ram import Action, RamQueue

MSG = 0x1234ABCD
E1 = (MSG << 32) | 1
E2 = (MSG << 32) | 2
DAY = 86400


def test_discover_of_known_envelopes_counts_only_new_ones():
    q = RamQueue()
    q.stage(E1, "mda", 1000, 1000 + DAY, 0)
    assert q.commit(MSG, 1000) == 1
    assert q.next_batch(1000, 10) == [Action("deliver", E1)]       # E1 now in flight
    q.stage(E1, "mda", 1000, 1000 + DAY, 0)                        # discover MSG: both loaded
    q.stage(E2, "mda", 1000, 1000 + DAY, 0)
    assert q.commit(MSG, 1001) == 1 and len(q) == 2
    assert q.state_of(E1) == "inflight"                            # the live one kept
    assert q.next_batch(1001, 10) == [Action("deliver", E2)]


def test_forgotten_envelopes_are_not_ordered_again():
    q = RamQueue()
    for e in (E1, E2):
        q.stage(e, "mta", 1000, 1000 + DAY, 0)
    q.commit(MSG, 1000)
    assert q.next_batch(1000, 1) == [Action("transfer", E1)]
    q.delivered(E1)            # in flight
    q.delivered(E2)            # pending
    assert len(q) == 0 and q.inflight == 0
    assert q.next_batch(10**9, 10) == [] and q.next_wakeup() is None
