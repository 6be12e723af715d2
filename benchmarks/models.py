"""Model sizes and CPU/GPU timings: parameter counts for tiny and base, and for tiny the
per-step and per-volume generation times.

    .venv/bin/python benchmarks/models.py [--batches 1,4] > /tmp/models-bench.md

Per step: one UNet evaluation with classifier-free guidance (cond + uncond batched). Per
volume: the whole request (text, 20 DDIM steps, VAE decode to 64^3 HU, masks), median of 3,
per batch size (per-volume time = batch time / batch). On CUDA each batch is timed twice: with
the bf16 autocast that ships and in full fp32, with the peak GPU memory of each. Random
weights: speed does not depend on what the weights have learned.
"""

from __future__ import annotations

import argparse

import torch
from timing import timed

from factory.models.clip import CLIP3D
from factory.models.config import load_config
from factory.models.diffusion import TextConditionedUNet
from factory.models.generator import Generator, Request
from factory.models.vae import build_vae


def count(module: torch.nn.Module) -> str:
    """Parameters a network trains and saves (for CLIP: vision, heads, temperature)."""
    params = module.trainable_state_dict() if isinstance(module, CLIP3D) else module.state_dict()
    return f"{sum(p.numel() for p in params.values()) / 1e6:.2f} M"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,4", help="comma-separated batch sizes")
    batches = [int(b) for b in parser.parse_args().batches.split(",")]
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = (
        torch.cuda.get_device_name()
        if device == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"Device: {name}; torch {torch.__version__}\n")
    tiny = Generator.from_config(load_config("tiny"), device=device)
    print("| network | tiny | base |\n|---|---|---|")
    base = load_config("base")
    rows = {
        "VAE (AutoencoderKL)": (tiny.codec.vae, build_vae(base.vae)),
        "latent diffusion UNet": (tiny.unet, TextConditionedUNet(base)),
        "3D CLIP (vision + heads)": (
            CLIP3D.from_config(tiny.config, tiny.text),
            CLIP3D.from_config(base, tiny.text),
        ),
    }
    for label, (a, b) in rows.items():
        print(f"| {label} | {count(a)} | {count(b)} |")
    print(f"| text encoder (MiniLM, frozen) | {count(tiny.text)} | {count(tiny.text)} |\n")
    cfg = tiny.config
    precisions = (True, False) if device == "cuda" else (False,)
    with torch.inference_mode():
        for batch in batches:
            for amp in precisions:
                tiny.amp = amp
                x = torch.randn(2 * batch, cfg.latent_channels, *cfg.latent_size, device=device)
                t = torch.full((2 * batch,), 500, device=device)
                ctx = torch.randn(
                    2 * batch, 1 + cfg.text.max_tokens, cfg.text.hidden_size + 1, device=device
                )
                with tiny._autocast():
                    step = timed(lambda x=x, t=t, ctx=ctx: tiny.unet(x, t, ctx), warmup=True)
                    z = torch.randn(1, cfg.vae.latent_channels, *cfg.latent_size, device=device)
                    decode = timed(lambda z=z: tiny.codec.decode(z), warmup=True)
                reqs = [
                    Request(f"{60 + i} years old M: pleural effusion.", seed=i, steps=20)
                    for i in range(batch)
                ]
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                volume = (
                    timed(lambda r=reqs, b=batch: tiny.generate(r, batch_size=b), warmup=True)
                    / batch
                )
                extra = ""
                if device == "cuda":
                    peak = torch.cuda.max_memory_allocated() / 2**30
                    extra = f" ({'bf16 autocast' if amp else 'fp32'}, peak {peak:.2f} GiB)"
                print(
                    f"- batch {batch}{extra}: one guided UNet step {step:.4f} s; VAE decode of "
                    f"one 64^3 volume {decode:.4f} s; one volume with 20 DDIM steps "
                    f"{volume:.3f} s ({1 / volume:.1f} volumes/s)"
                )


if __name__ == "__main__":
    main()
