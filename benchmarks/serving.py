"""Serving measurements (docs/benchmarks.md, "Serving"), all load on 127.0.0.1:

    .venv/bin/python benchmarks/serving.py latency [--n 20] [--steps 10]
    .venv/bin/python benchmarks/serving.py batching [--n 32] [--concurrency 8] [--steps 10]
        [--gpus 0]

latency: one request at a time, p50/p95, for ``Generator.generate`` plus NIfTI encoding called
directly in this process and for POST /v1/volumes through Ray Serve (proxy, ingress, handle,
generator replica with the same number of torch threads): the difference is Serve's overhead.
batching: ``--concurrency`` clients send ``--n`` requests in all, against the application
with ``@serve.batch`` (max batch = concurrency) and without it (max batch 1); the ratio of
throughputs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from factory.data.nifti import nifti_bytes
from factory.models.generator import Generator, Request

PROMPT = "Large bilateral pleural effusion."


def percentiles(seconds: list[float]) -> tuple[float, float]:
    ordered = sorted(seconds)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, round(0.95 * len(ordered)))]


def post(base: str, body: dict, inside: list | None = None) -> float:
    """Seconds for one POST /v1/volumes; appends the replica's own generation time to
    ``inside`` (the X-Generate-Seconds header)."""
    request = urllib.request.Request(
        base + "/v1/volumes", data=json.dumps(body).encode(), method="POST"
    )
    request.add_header("Content-Type", "application/json")
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        response.read()
        if inside is not None:
            inside.append(float(response.headers["X-Generate-Seconds"]))
    return time.perf_counter() - start


def start_app(model: str, max_batch: int, wait_s: float, threads: int, gpus: float = 0) -> str:
    """Deploy the application with these batching settings; returns its base URL."""
    from ray import serve

    from serve.app import build_app

    args = {
        "models": {"m": model},
        "default_model": "m",
        "batching": {"max_batch_size": max_batch, "batch_wait_timeout_s": wait_s},
        "limits": {"max_ongoing_requests": 16, "max_queued_requests": 64},
        "cpus_per_replica": threads,
        "gpus_per_replica": gpus,
        "api_key_env": None,
    }
    serve.run(build_app(args), name="bench", route_prefix="/")
    base = "http://127.0.0.1:8000"
    post(base, {"prompt": PROMPT, "seed": 0, "steps": 1})  # warm: first call loads everything
    return base


def latency(args) -> None:
    threads = torch.get_num_threads()
    generator = Generator.load(args.model, device="cpu")
    direct = []
    for i in range(args.n + 1):
        start = time.perf_counter()
        (volume,) = generator.generate([Request(PROMPT, seed=i, steps=args.steps)], batch_size=1)
        nifti_bytes(np.asarray(volume.hu, np.int16), volume.affine)
        if i:  # the first call warms up
            direct.append(time.perf_counter() - start)
    del generator
    init_local_ray()
    base = start_app(args.model, max_batch=1, wait_s=0.0, threads=threads)
    inside: list[float] = []
    served = [
        post(base, {"prompt": PROMPT, "seed": i, "steps": args.steps}, inside)
        for i in range(args.n)
    ]
    (d50, d95), (s50, s95), (i50, i95) = (
        percentiles(direct),
        percentiles(served),
        percentiles(inside),
    )
    print(f"latency, {args.n} sequential requests, {args.steps} steps, {threads} threads")
    print("| path | p50 s | p95 s |\n|---|---|---|")
    print(f"| Generator.generate + NIfTI, in process | {d50:.3f} | {d95:.3f} |")
    print(f"| POST /v1/volumes through Ray Serve | {s50:.3f} | {s95:.3f} |")
    print(f"| of which Generator.generate in the replica | {i50:.3f} | {i95:.3f} |")
    print(f"Serve overhead: p50 {1000 * (s50 - d50):+.0f} ms ({100 * (s50 / d50 - 1):+.1f}%)")


def batching(args) -> None:
    init_local_ray()
    rows = []
    for label, max_batch, wait in (
        ("@serve.batch off (max batch 1)", 1, 0.0),
        (f"@serve.batch max {args.concurrency}, wait 0.1 s", args.concurrency, 0.1),
    ):
        base = start_app(args.model, max_batch, wait, threads=os.cpu_count() or 1, gpus=args.gpus)
        bodies = [{"prompt": PROMPT, "seed": i, "steps": args.steps} for i in range(args.n)]
        start = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            times = list(pool.map(lambda b, base=base: post(base, b), bodies))
        wall = time.perf_counter() - start
        p50, p95 = percentiles(times)
        rows.append((label, args.n / wall, p50, p95))
    clients = f"{args.concurrency} concurrent clients"
    print(f"throughput, {args.n} requests from {clients}, {args.steps} steps")
    print("| application | volumes/s | p50 s | p95 s |\n|---|---|---|---|")
    for label, rate, p50, p95 in rows:
        print(f"| {label} | {rate:.3f} | {p50:.2f} | {p95:.2f} |")
    print(f"batching speed-up: {rows[1][1] / rows[0][1]:.2f}x")


def init_local_ray() -> None:
    import ray
    from ray import serve

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=(os.cpu_count() or 1) + 2, include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["latency", "batching"])
    parser.add_argument("--model", default="builtin:demo")
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--gpus", type=float, default=0, help="GPUs per replica")
    args = parser.parse_args()
    args.n = args.n or (20 if args.what == "latency" else 32)
    {"latency": latency, "batching": batching}[args.what](args)


if __name__ == "__main__":
    main()
