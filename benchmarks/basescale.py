"""The base preset at 256x256x128 and 512x512x128 within memory: peak memory and time of one
base VAE decode, whole and split (factory/models/split.py), and of one base UNet step (batch 2:
classifier-free guidance), random weights, each in a fresh process.

    .venv/bin/python benchmarks/basescale.py [--sizes 256,256,128 512,512,128]
        [--plans whole 16 16s]

A plan is ``whole`` (``vae.decode``), N (N chunks, every block held) or Ns (N chunks, the
upsamplings streamed into the next block).

Peak: the process's resident high-water mark over what it held before the call (CPU), or the
peak of CUDA memory allocated (GPU); the estimate is ``factory.models.split.peak_bytes``. A
whole decode that the estimate puts over the machine's memory is not run (it would be killed).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from factory.models.config import load_config
from factory.models.split import WHOLE, Split, peak_bytes, split_decode
from factory.models.vae import build_vae

GIB = 2**30


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def parse_plan(text: str) -> Split:
    return WHOLE if text == "whole" else Split(int(text.rstrip("s")), text.endswith("s"))


def measure(what: str, size: tuple[int, ...], plan: Split) -> dict:
    """One measurement in this process: seconds and peak bytes of one decode or UNet step."""
    torch.manual_seed(0)
    cfg = load_config("base").model_copy(update={"size": size})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    latent = tuple(s // cfg.vae.factor for s in size)
    with torch.inference_mode():
        if what == "decode":
            vae = build_vae(cfg.vae).to(device).eval()
            z = torch.randn(1, cfg.vae.latent_channels, *latent, device=device)
            run = lambda: split_decode(vae, z, plan)  # noqa: E731
        else:
            from factory.models.diffusion import TextConditionedUNet

            unet = TextConditionedUNet(cfg).to(device).eval()
            x = torch.randn(2, cfg.latent_channels, *latent, device=device)
            t = torch.full((2,), 500, device=device)
            ctx = torch.randn(2, 1 + cfg.text.max_tokens, cfg.text.hidden_size + 1, device=device)
            run = lambda: unet(x, t, ctx)  # noqa: E731
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            before = rss()
        start = time.perf_counter()
        out = run()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if device == "cuda":
            peak = torch.cuda.max_memory_allocated() - before
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        del out
    return {"seconds": seconds, "peak": peak}


def estimate(size: tuple[int, ...], plan: Split) -> int:
    cfg = load_config("base").model_copy(update={"size": size})
    vae = build_vae(cfg.vae)
    latent = (1, cfg.vae.latent_channels, *(s // cfg.vae.factor for s in size))
    return peak_bytes(vae.decoder, latent, plan, 4)


def child(what: str, size: tuple[int, ...], plan: str) -> dict | str:
    argv = [sys.executable, __file__, "--one", what, ",".join(map(str, size)), plan]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        return f"failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["256,256,128", "512,512,128"])
    parser.add_argument("--plans", nargs="+", default=["whole", "16", "16s"])
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        what, size, plan = args.one
        print(json.dumps(measure(what, tuple(map(int, size.split(","))), parse_plan(plan))))
        return
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if torch.cuda.is_available():
        memory = torch.cuda.get_device_properties(0).total_memory
        where = torch.cuda.get_device_name()
    else:
        where = f"CPU, {torch.get_num_threads()} threads, {memory / GIB:.0f} GiB"
    print(f"Device: {where}; torch {torch.__version__}; base preset, random weights, fp32\n")
    print("| size | what | plan | estimated peak (GiB) | peak (GiB) | time (s) |")
    print("|---|---|---|---|---|---|")
    for text in args.sizes:
        size = tuple(map(int, text.split(",")))
        label = "x".join(map(str, size))
        for plan in args.plans:
            guess = estimate(size, parse_plan(plan))
            if guess > 0.9 * memory:
                print(f"| {label} | decode | {plan} | {guess / GIB:.1f} | not run: over memory | |")
                continue
            got = child("decode", size, plan)
            cells = (
                f"{got['peak'] / GIB:.1f} | {got['seconds']:.1f}"
                if isinstance(got, dict)
                else f"{got} |"
            )
            print(f"| {label} | decode | {plan} | {guess / GIB:.1f} | {cells} |", flush=True)
        got = child("unet", size, "whole")
        cells = f"{got['peak'] / GIB:.1f} | {got['seconds']:.1f}" if isinstance(got, dict) else got
        print(f"| {label} | UNet step (batch 2) | - | - | {cells} |", flush=True)


if __name__ == "__main__":
    main()
