"""Connecting to Ray and sizing work to it: the cluster named by ``RAY_ADDRESS`` or a local one,
whether it has GPUs, and how many torch threads a CPU worker gets.

A local cluster gets spare logical CPUs, to avoid the actor-pool deadlock (a pool or trainer
that takes every logical CPU starves Ray Data's reads). The factory's actors, the trainer's
workers and the server's replicas all ask these helpers, so they agree.
"""

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


def cluster_has_gpus() -> bool:
    """Whether the connected Ray cluster advertises any GPU (False when Ray is not started)."""
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def cpu_threads(workers: int) -> int:
    """Torch threads per CPU worker on this machine: its cores shared among ``workers``
    (Ray starts a worker with one thread per CPU it asked for)."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))
