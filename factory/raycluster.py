"""Connecting to Ray and sizing work to it: the cluster named by ``RAY_ADDRESS`` or a local one,
whether it has GPUs, and how many torch threads a CPU worker gets.

A local cluster gets spare logical CPUs, to avoid the actor-pool deadlock (a pool or trainer
that takes every logical CPU starves Ray Data's reads). The factory's actors, the trainer's
workers and the server's replicas all ask these helpers, so they agree.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket

NODE_WAIT_S = 300.0  # a run stops when no node can host one of its workers for this long
IN_FLIGHT = 2  # batches a generator actor holds: one sampling while the one before is written


def init_ray(workers: int) -> None:
    """Connect to ``RAY_ADDRESS`` or start a local cluster with spare logical CPUs, without
    Ray's dashboard (a second of start-up; start Ray yourself and set RAY_ADDRESS to watch)."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(num_cpus=max(os.cpu_count() or 1, workers) + 2, include_dashboard=False)


def parse_workers(text: str) -> tuple[int, int]:
    """``"4"`` -> (4, 4); ``"2-8"`` -> (2, 8): a fixed or elastic number of workers (training
    workers, generator actors); ValueError naming what is valid."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", str(text))
    if not match:
        raise ValueError(f"workers {text!r}: expected N or MIN-MAX, e.g. 4 or 2-8")
    lo = int(match.group(1))
    hi = int(match.group(2) or lo)
    if not 1 <= lo <= hi:
        raise ValueError(f"workers {text!r}: need 1 <= MIN <= MAX")
    return lo, hi


def cluster_has_gpus() -> bool:
    """Whether the connected Ray cluster advertises any GPU (False when Ray is not started)."""
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def nodes_that_fit(need: dict[str, float]) -> list[str]:
    """The alive nodes whose resources could host one worker asking for ``need`` (say
    ``{"GPU": 1}``), busy or not: none means no worker can start until nodes are added."""
    import ray

    return [
        node["NodeID"]
        for node in ray.nodes()
        if node.get("Alive") and all(node["Resources"].get(k, 0) >= v for k, v in need.items())
    ]


def workers_that_fit(need: dict[str, float]) -> int:
    """How many workers asking for ``need`` the alive nodes hold in all, busy or not."""
    import ray

    total = 0
    for node in ray.nodes():
        if node.get("Alive"):
            total += int(min(node["Resources"].get(k, 0) / v for k, v in need.items() if v))
    return total


def can_autoscale() -> bool:
    """Whether an autoscaler serves the connected cluster, so that it can add nodes: the
    launcher's, KubeRay's or Ray's fake one. Every head's monitor publishes a status in the
    GCS; without an autoscaling config it runs a read-only one, whose node types are the nodes
    themselves (``node_<id>``). Autoscaler v2 marks itself in the GCS."""
    import ray
    from ray._private import ray_constants
    from ray.autoscaler._private.util import format_readonly_node_type
    from ray.experimental.internal_kv import _internal_kv_get

    status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    with contextlib.suppress(ValueError, TypeError, AttributeError, KeyError):
        types = json.loads(status)["autoscaler_report"]["node_type_mapping"] or {}
        if any(kind != format_readonly_node_type(node) for node, kind in types.items()):
            return True
    v2 = _internal_kv_get(
        ray._raylet.GCS_AUTOSCALER_V2_ENABLED_KEY,
        namespace=ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE,
    )
    return v2 == b"1"


def cpu_threads(workers: int) -> int:
    """Torch threads per CPU worker on this machine: its cores shared among ``workers``
    (Ray starts a worker with one thread per CPU it asked for)."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def this_node() -> dict[str, str]:
    """Where this process runs: the Ray node and actor ids (empty outside Ray, or outside an
    actor) and the host name, for each volume's provenance and errors that name the node."""
    import ray

    node = actor = ""
    if ray.is_initialized():
        context = ray.get_runtime_context()
        node, actor = context.get_node_id(), context.get_actor_id() or ""
    return {"node_id": node, "host": socket.gethostname(), "actor_id": actor}


def node_text(where: dict[str, str]) -> str:
    """A :func:`this_node` as a person reads it in an error: ``node 1a2b3c4d5e6f (host gpu-3)``."""
    node = f"node {where['node_id'][:12]} " if where["node_id"] else ""
    return f"{node}(host {where['host']})"
