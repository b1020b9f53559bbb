from smtpd.scheduler_ram import Action, RamQueue, next_try

MSG = 0x1234ABCD
E1 = (MSG << 32) | 1
E2 = (MSG << 32) | 2
DAY = 86400


def committed(*evpids, type_="mta", ctime=1000, retry=0):
    q = RamQueue()
    for e in evpids:
        q.stage(e, type_, ctime, ctime + 4 * DAY, retry)
    q.commit(evpids[0] >> 32, now=ctime)
    return q


def test_staged_envelopes_wait_for_commit_and_rollback_drops_them():
    q = RamQueue()
    q.stage(E1, "mta", 1000, 1000 + DAY, 0)
    assert q.next_batch(1000, 10) == []
    q.rollback(MSG)
    assert q.commit(MSG, 1000) == 0 and len(q) == 0


def test_new_envelope_is_due_immediately_with_the_right_agent():
    q = committed(E1, E2)
    assert q.next_batch(1000, 10) == [Action("transfer", E1), Action("transfer", E2)]
    q2 = committed(E1, type_="mda")
    assert q2.next_batch(1000, 10) == [Action("deliver", E1)]


def test_retry_schedule_is_quadratic_and_anchored_to_ctime():
    assert [next_try(0, "mta", n, 0) for n in (0, 1, 2, 3)] == [0, 400, 1600, 3600]
    assert [next_try(0, "mda", n, 0) for n in (1, 2, 3)] == [10, 40, 90]
    # a step whose time has passed is skipped
    assert next_try(0, "mta", 1, 500) == 1600


def test_tempfail_reschedules_and_nothing_runs_early():
    q = committed(E1)
    assert q.next_batch(1000, 10) == [Action("transfer", E1)]
    assert q.inflight == 1
    q.tempfail(E1, retry=1, now=1001)
    assert q.inflight == 0
    assert q.next_batch(1399, 10) == []
    assert q.next_wakeup() == 1400
    assert q.next_batch(1400, 10) == [Action("transfer", E1)]


def test_delivered_envelope_is_forgotten():
    q = committed(E1)
    q.next_batch(1000, 10)
    q.delivered(E1)
    assert len(q) == 0 and q.next_wakeup() is None and q.listing(0, 10, 1000) == []


def test_expired_envelope_is_expired_not_tried():
    q = RamQueue()
    q.stage(E1, "mta", 1000, 1500, 1)
    q.commit(MSG, 1000)
    assert q.next_batch(1400, 10) == [Action("transfer", E1)]
    q.tempfail(E1, 2, 1401)            # next try 2600, but it expires at 1500
    assert q.next_wakeup() == 1500
    assert q.next_batch(1500, 10) == [Action("expire", E1)]
    assert len(q) == 0


def test_schedule_all_makes_a_deferred_envelope_due_now():
    q = committed(E1)
    q.next_batch(1000, 10)
    q.tempfail(E1, 1, 1001)
    assert q.schedule(0, 1002) == 1
    assert q.next_batch(1002, 10) == [Action("transfer", E1)]
    # in flight: schedule does not count it
    assert q.schedule(E1, 1003) == 0


def test_schedule_by_msgid_selects_every_envelope_of_the_message():
    q = committed(E1, E2)
    other = (0x99 << 32) | 5
    q.stage(other, "mta", 1000, 1000 + DAY, 0)
    q.commit(0x99, 1000)
    assert {i.evpid for i in q.select(MSG)} == {E1, E2}
    assert [i.evpid for i in q.select(other)] == [other]


def test_pause_parks_envelopes_until_resume():
    q = committed(E1)
    q.pause("mta")
    assert q.next_batch(1000, 10) == []
    q.resume("mta", 1005)
    assert q.next_batch(1005, 10) == [Action("transfer", E1)]


def test_remove_pending_and_inflight():
    q = committed(E1, E2)
    assert q.next_batch(1000, 1) == [Action("transfer", E1)]
    assert q.remove(0) == 2
    # E2 was pending: removed at once; E1 in flight: removed when it comes back
    assert q.next_batch(1000, 10) == [Action("remove", E2)]
    q.removed_done(E2)
    q.tempfail(E1, 1, 1001)
    assert q.next_batch(1001, 10) == [Action("remove", E1)]
    q.removed_done(E1)
    assert len(q) == 0
    assert q.remove(E1) == 0


def test_listing_is_ordered_with_a_cursor_and_runstates():
    q = committed(E2, E1)
    q.next_batch(1000, 1)                          # E1 goes in flight
    rows = q.listing(0, 10, 1010)
    assert rows == [(E1, "inflight", 10), (E2, "pending", -10)]
    assert q.listing(E1, 10, 1010) == [(E2, "pending", -10)]


def test_commit_twice_keeps_one_live_envelope():
    q = committed(E1)
    q.stage(E1, "mta", 1000, 1000 + DAY, 0)
    q.commit(MSG, 1000)
    assert len(q) == 1
    assert q.next_batch(1000, 10) == [Action("transfer", E1)]
