"""Median wall time of a callable, shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time

import torch


def timed(fn, repeat: int = 3, warmup: bool = False) -> float:
    """Median seconds of ``repeat`` calls of ``fn`` (after one untimed call if ``warmup``).

    CUDA work is asynchronous: the clock stops only once the device has finished.
    """
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    if warmup:
        fn()
    times = []
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
