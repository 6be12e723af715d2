"""Stand-ins for the Generator (its ``model_hash`` and ``generate(requests, batch_size)``), so
that the factory's own cost is measured apart from the model's.

NullGenerator: a constant volume at once (what is left is bookkeeping: benchmarks/scale.py).
PacedGenerator: realistic volumes after a fixed wait per batch, as a GPU would take.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from factory.anatomy import ANATOMY_CHANNELS, MASK_LABELS, channels_from_labels
from factory.models.checkpoint import load_checkpoint
from factory.models.generator import Volume

PACED_SIZE = (256, 256, 128)
EFFUSION = {"laterality": "bilateral", "severity": "large"}


class NullGenerator:
    """Returns a constant volume at once: what is left is the factory's own cost."""

    def __init__(self, ref: str, storage_options=None):
        checkpoint = load_checkpoint(ref, hash_files=False)
        self.model_hash = checkpoint.hash
        self.size = tuple(checkpoint.config.size)
        self.spacing = tuple(checkpoint.config.spacing_mm)

    def generate(self, requests, batch_size=4):
        hu = np.full(self.size, -1000, np.int16)
        affine = np.diag([*self.spacing, 1.0])
        return [
            Volume(hu, self.spacing, affine, {}, r.prompt, r.seed, self.model_hash, {})
            for r in requests
        ]


def make_bank(path: Path, variants: int = 4, size=PACED_SIZE) -> Path:
    """Render ``variants`` phantoms (int16 HU with scanner noise, anatomy labels) into ``path``
    (.npz) once, so that a stand-in starts in a second, as a loaded model would."""
    from factory.phantom.dataset import default_grid
    from factory.phantom.render import render_phantom

    grid = default_grid(size, None)
    phantoms = [
        render_phantom(grid, {"pleural_effusion": EFFUSION}, "M", 60, i) for i in range(variants)
    ]
    np.savez(
        path,
        hu=np.stack([p.image for p in phantoms]),
        labels=np.stack([p.mask for p in phantoms]),
        affine=grid.affine(),
    )
    return path


class PacedGenerator:
    """Realistic volumes (256x256x128 int16 phantoms with CT noise, and the anatomy masks)
    returned ``pace_s`` seconds after each batch is asked for. The wait is a sleep, which
    releases the GIL as a GPU's sampling does: the factory's cost and overlap show on a CPU as
    they would beside a GPU."""

    def __init__(self, ref: str, storage_options=None, *, bank: str, pace_s: float):
        self.model_hash = load_checkpoint(ref, hash_files=False).hash
        self.pace_s = pace_s
        with np.load(bank) as data:
            self.hu = list(data["hu"])
            self.affine = data["affine"]
            self.masks = [
                dict(
                    zip(
                        ANATOMY_CHANNELS,
                        channels_from_labels(labels, MASK_LABELS, ANATOMY_CHANNELS),
                        strict=True,
                    )
                )
                for labels in data["labels"]
            ]
        self.spacing = tuple(float(s) for s in np.diag(self.affine)[:3])

    def generate(self, requests, batch_size=4):
        time.sleep(self.pace_s)
        out = []
        for r in requests:
            k = r.seed % len(self.hu)
            out.append(
                Volume(
                    self.hu[k],
                    self.spacing,
                    self.affine,
                    self.masks[k],
                    r.prompt,
                    r.seed,
                    self.model_hash,
                    {},
                )
            )
        return out
