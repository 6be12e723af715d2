"""Median wall time of a callable, shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time


def timed(fn, repeat: int = 3, warmup: bool = False) -> float:
    """Median seconds of ``repeat`` calls of ``fn`` (after one untimed call if ``warmup``)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
