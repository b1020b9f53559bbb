"""The latency summary of bench/bench_mail.py (nearest-rank percentiles)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from bench_mail import percentiles_ms  # noqa: E402  (bench/ is not a package)


def test_nearest_rank_in_milliseconds():
    seconds = [i / 1000 for i in range(1, 101)]          # 1 .. 100 ms, shuffled below
    seconds = seconds[::2] + seconds[1::2]
    assert percentiles_ms(seconds) == {"count": 100, "p50": 50.0, "p90": 90.0, "p99": 99.0,
                                       "max": 100.0}


def test_few_samples_and_none():
    assert percentiles_ms([0.25]) == {"count": 1, "p50": 250.0, "p90": 250.0, "p99": 250.0,
                                      "max": 250.0}
    assert percentiles_ms([0.001, 0.003])["p50"] == 1.0
    assert percentiles_ms([0.001, 0.003])["p99"] == 3.0
    assert percentiles_ms([]) is None
