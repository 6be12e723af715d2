"""Segmentation by generation (MedSyn's use): a phantom's CT held fixed as the image latents,
the anatomy channels sampled for it, scored by Dice against the phantom's true masks; the
same prompts and seeds sampled freely (no image) are the baseline.

    .venv/bin/python benchmarks/segmentation.py --n 4 --seeds 2
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from factory.anatomy import channels_from_labels
from factory.data.ctrate import read_split
from factory.data.nifti import read_nifti
from factory.models.generator import Generator, Request


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 2 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:demo")
    parser.add_argument("--n", type=int, default=4, help="phantoms (valid split, seed 11)")
    parser.add_argument("--seeds", type=int, default=2, help="samples per phantom")
    args = parser.parse_args()
    generator = Generator.load(args.model)
    names = generator.config.diffusion.anatomy_channels
    size = generator.config.size
    fixed: dict[str, list[float]] = {n: [] for n in names}
    free: dict[str, list[float]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                *(str(Path(sys.executable).parent / "ctfactory"), "phantom", "--n", str(args.n)),
                *("--size", "x".join(map(str, size)), "--seed", "11", "--split", "valid"),
                *("--out", tmp, "--workers", "1"),
            ],
            check=True,
            capture_output=True,
        )
        start = time.perf_counter()
        for record in read_split(tmp, "valid"):
            hu = read_nifti(record.image).astype(np.float32)
            stack = channels_from_labels(read_nifti(record.mask), record.legend, names)
            prompt = f"{record.findings} {record.impression}"
            for seed in range(args.seeds):
                (given,) = generator.generate([Request(prompt, seed=seed, image=hu)])
                (alone,) = generator.generate([Request(prompt, seed=seed)])
                for i, name in enumerate(names):
                    fixed[name].append(dice(given.masks[name], stack[i]))
                    free[name].append(dice(alone.masks[name], stack[i]))
        each = (time.perf_counter() - start) / (2 * args.n * args.seeds)
    print(f"{args.model}, {args.n} phantoms x {args.seeds} seeds, {each:.1f} s a sample\n")
    print("| channel | Dice, image fixed | Dice, sampled freely (baseline) |\n|---|---|---|")
    for name in names:
        a, b = np.array(fixed[name]), np.array(free[name])
        print(f"| {name} | {a.mean():.3f} +- {a.std():.3f} | {b.mean():.3f} +- {b.std():.3f} |")


if __name__ == "__main__":
    main()
