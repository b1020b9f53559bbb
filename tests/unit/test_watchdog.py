"""smtpd/sdnotify.py's watchdog: sd_watchdog_enabled(3)'s variables and one round of
questions, pinging a real datagram socket (the daemon under it: tests/e2e/test_systemd.py)."""
from __future__ import annotations

import asyncio
import os
import socket

from smtpd import sdnotify


def test_watchdog_usec_follows_sd_watchdog_enabled():
    me = str(os.getpid())
    assert sdnotify.watchdog_usec({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": me}) == 30_000_000
    assert sdnotify.watchdog_usec({"WATCHDOG_USEC": "30000000"}) == 30_000_000
    assert sdnotify.watchdog_usec({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) == 0   # not ours
    assert sdnotify.watchdog_usec({"WATCHDOG_USEC": "0"}) == 0
    assert sdnotify.watchdog_usec({"WATCHDOG_USEC": "soon"}) == 0
    assert sdnotify.watchdog_usec({}) == 0


def test_a_round_pings_only_when_everyone_answers(tmp_path):
    path = str(tmp_path / "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(path)
    listener.settimeout(0)
    notifier = sdnotify.Notifier(path)
    notifier.watchdog_usec = 400_000
    stuck = {"lka"}
    asked: list[tuple[str, float]] = []

    async def ask(name: str, deadline: float) -> None:
        asked.append((name, deadline))
        if name in stuck:
            await asyncio.sleep(deadline * 10)

    async def ask_with_deadline(name: str, deadline: float) -> None:
        async with asyncio.timeout(deadline):
            await ask(name, deadline)

    dog = sdnotify.Watchdog(notifier, ["control", "lka", "queue"], ask_with_deadline)
    assert dog.enabled and dog.period == 0.2 and dog.deadline == 0.1
    try:
        assert asyncio.run(dog.round()) is False and dog.silent == ["lka"]
        assert sorted(asked) == [("control", 0.1), ("lka", 0.1), ("queue", 0.1)]
        try:
            listener.recv(100)
            raise AssertionError("pinged while lka was silent")
        except BlockingIOError:
            pass
        stuck.clear()
        assert asyncio.run(dog.round()) is True and dog.silent == []
        assert listener.recv(100) == b"WATCHDOG=1"
        # Once stopping, children going away are not hung: no ping, no complaint, and
        # run() returns.
        notifier.stopping("bye")
        assert listener.recv(100).startswith(b"STOPPING=1")
        stuck.add("lka")
        assert asyncio.run(dog.round()) is False and dog.silent == []
        asyncio.run(asyncio.wait_for(dog.run(), 5))
    finally:
        listener.close()
    notifier.watchdog_usec = 0
    assert not sdnotify.Watchdog(notifier, ["lka"], ask_with_deadline).enabled
