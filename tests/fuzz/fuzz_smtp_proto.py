"""Fuzz run of the SMTP protocol core: N generated sessions (default 10^6), each cut
at random points, none may crash, hang at EOF or send a reply outside RFC 5321's
grammar; one in four is also run whole and must agree with its cut run.

    .venv/bin/python tests/fuzz/fuzz_smtp_proto.py [SESSIONS] [FIRST_SEED]

It prints the count, the time and the number of sessions per second; docs/smtp.md
keeps the figure of the last full run.  The unit suite runs 10^5 of the same sessions
(tests/unit/test_smtp_proto.py).
"""
from __future__ import annotations

import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.unit.smtp_sessions import check_session, random_session  # noqa: E402

BATCH = 100


def main() -> int:
    total = int(float(sys.argv[1])) if len(sys.argv) > 1 else 1_000_000
    first_seed = int(sys.argv[2]) if len(sys.argv) > 2 else 1_000_000
    started = time.monotonic()
    done = 0
    for seed in range(first_seed, first_seed + (total + BATCH - 1) // BATCH):
        rng = random.Random(seed)
        for index in range(min(BATCH, total - done)):
            data, cuts = random_session(rng)
            try:
                check_session(data, cuts, compare=index % 4 == 0)
            except Exception:
                print(f"FAILED: seed {seed} session {index}: {data[:500]!r} cuts={cuts}", file=sys.stderr)
                raise
            done += 1
        if seed % 100 == 0:
            print(f"{done} sessions, {time.monotonic() - started:.0f} s", file=sys.stderr)
    elapsed = time.monotonic() - started
    print(f"{done} sessions without a failure in {elapsed:.0f} s ({done / elapsed:.0f}/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
