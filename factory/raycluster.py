"""Connecting to Ray: the cluster named by ``RAY_ADDRESS``, or a local one sized to avoid the
actor-pool deadlock (a pool or trainer that takes every logical CPU starves Ray Data's reads)."""

from __future__ import annotations

import os


def init_ray(workers: int) -> None:
    """Connect to ``RAY_ADDRESS`` or start a local cluster with spare logical CPUs."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(num_cpus=max(os.cpu_count() or 1, workers) + 2)
