"""One run for a lent GPU: what a volume costs, how much of the bare loop the factory keeps,
and what Serve's batching buys, printed as markdown tables (docs/benchmarks.md).

    .venv/bin/python benchmarks/gpu.py [--cap-s 60] > /tmp/gpu-bench.md

1. Sampling: s per volume and peak GPU memory of ``Generator.generate`` for tiny and base
   (random weights) at batch 1, 4 and 16, at 256x256x128 and 512x512x128, 30 rectified-flow
   steps, bf16 autocast, the base decode split to its config's memory budget. A batch whose
   time, foreseen from the batch before it, passes ``--cap-s`` is not run (so the whole run
   stays under 8 minutes on an H100-class GPU); out of memory is a cell, not a crash.
2. The factory: ``benchmarks/generation.py throughput`` with builtin:demo, one and two
   actors on the one GPU (``--gpus-per-worker 0.5``), writes overlapped with sampling.
3. Serve: ``benchmarks/serving.py batching`` at concurrency 8, with and without batching.

Without CUDA it says so and measures the CPU path at tiny sizes: tiny at 64^3, batch 1 and 2,
2 steps; the factory with 8 volumes and one actor; Serve with 4 requests from 2 clients.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

from factory.models.config import load_config
from factory.models.generator import Generator, Request

HERE = Path(__file__).resolve().parent
PROMPT = "70 years old M: Large pleural effusion on the right."


def sampling(presets, sizes, batches, steps: int, cap_s: float, device: str) -> None:
    """One table row per preset, size and batch: s per volume and peak memory."""
    print(f"### Sampling: {steps} rectified-flow steps, random weights\n")
    print("| preset | size | batch | s per volume | peak memory (GiB) |\n|---|---|---|---|---|")
    for preset in presets:
        for size in sizes:
            cfg = load_config(preset)
            cfg = cfg.model_copy(update={"size": size})
            gen = Generator.from_config(cfg, device=device)
            label = "x".join(map(str, size))
            foreseen = 0.0
            for batch in batches:
                if foreseen > cap_s:
                    print(f"| {preset} | {label} | {batch} | not run: foreseen {foreseen:.0f} s "
                          f"> --cap-s {cap_s:g} | |")  # fmt: skip
                    continue
                requests = [
                    Request(PROMPT, seed=i, steps=steps, scheduler="rectified_flow")
                    for i in range(batch)
                ]
                if device == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                try:
                    gen.generate(requests, batch_size=batch)
                except torch.OutOfMemoryError:
                    print(f"| {preset} | {label} | {batch} | out of memory | |", flush=True)
                    foreseen = float("inf")
                    continue
                if device == "cuda":
                    torch.cuda.synchronize()
                wall = time.perf_counter() - start
                peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
                cell = f"{peak:.1f}" if peak is not None else "- (CPU)"
                print(f"| {preset} | {label} | {batch} | {wall / batch:.2f} | {cell} |", flush=True)
                following = batches[batches.index(batch) + 1 :]
                foreseen = wall / batch * following[0] if following else 0.0
            del gen
    print()


def script(name: str, *args: str) -> None:
    """Another benchmark of this folder, its tables printed here."""
    print(f"### `benchmarks/{name} {' '.join(args)}`\n", flush=True)
    done = subprocess.run([sys.executable, str(HERE / name), *args], text=True)
    if done.returncode:
        print(f"(exit {done.returncode})")
    print(flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cap-s", type=float, default=60.0, help="the longest batch to run")
    args = parser.parse_args()
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}\n", flush=True)
        sizes = [(256, 256, 128), (512, 512, 128)]
        sampling(("tiny", "base"), sizes, [1, 4, 16], 30, args.cap_s, "cuda")
        script("generation.py", "throughput", "--n", "128", "--workers", "2",
               "--gpus-per-worker", "0.5")  # fmt: skip
        script("serving.py", "batching", "--n", "64", "--concurrency", "8", "--gpus", "1")
        return
    print(f"no CUDA here: the CPU path at tiny sizes; torch {torch.__version__}\n", flush=True)
    sampling(("tiny",), [(64, 64, 64)], [1, 2], 2, args.cap_s, "cpu")
    script("generation.py", "throughput", "--n", "8", "--workers", "1")
    script("serving.py", "batching", "--n", "4", "--concurrency", "2", "--steps", "2")


if __name__ == "__main__":
    main()
