"""Phantom speed and per-finding visibility at three resolutions; prints Markdown tables.

    .venv/bin/python benchmarks/phantom.py > /tmp/phantom-bench.md

Speed: median of 3 single-process renders (no file writing) and of 3 full writes (render +
NIfTI + mask + JSON). Visibility: each finding rendered alone against the same subject without
it; "changed" counts voxels whose HU moved by more than 25, "max" the largest change.
"""

from __future__ import annotations

import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from timing import timed

from factory import vocab
from factory.phantom.dataset import PhantomSettings, default_grid, write_dataset
from factory.phantom.render import render_phantom

GRIDS = {
    "64^3 (5.9 x 5.9 x 5 mm)": default_grid((64, 64, 64), None),
    "128^3 (3 x 3 x 2.5 mm)": default_grid((128, 128, 128), None),
    "256x256x128 (1.5 x 1.5 x 2.5 mm)": default_grid((256, 256, 128), None),
}
ATTRS = {  # a middling version of each finding
    "lung_nodule": {"size_mm": 6, "count": 1}, "hiatal_hernia": {"size_mm": 35},
    "lymphadenopathy": {"size_mm": 14, "count": 1}, "medical_material": {"device": "port_catheter"},
}  # fmt: skip


def main() -> None:
    print(f"Machine: {platform.processor() or platform.machine()}, numpy {np.__version__}\n")
    print("| grid | render (s) | render + write one volume (s) |\n|---|---|---|")
    for name, grid in GRIDS.items():
        render = timed(lambda g=grid: render_phantom(g, {}, "M", 60, 1))
        with tempfile.TemporaryDirectory() as tmp:
            settings = PhantomSettings(n=1, grid=grid)
            write = timed(lambda s=settings, t=tmp: write_dataset(s, Path(t) / str(time.time_ns())))
        print(f"| {name} | {render:.2f} | {write:.2f} |")
    print("\n| finding | " + " | ".join(f"{n}: changed voxels / max dHU" for n in GRIDS) + " |")
    print("|---|" + "---|" * len(GRIDS))
    rng = np.random.default_rng(0)
    attrs = {}
    for f in vocab.FINDINGS:
        given = ATTRS.get(f.id, {})
        if "severity" in f.attributes:  # the mildest level
            given = {"severity": f.attributes["severity"].choices[0]}
        attrs[f.id] = vocab.complete_attributes(f.id, given, rng)
    normals = {
        n: render_phantom(g, {}, "M", 60, 1).image.astype(np.int32) for n, g in GRIDS.items()
    }
    for fid in vocab.FINDING_IDS:
        cells = []
        for name, grid in GRIDS.items():
            diff = np.abs(render_phantom(grid, {fid: attrs[fid]}, "M", 60, 1).image - normals[name])
            cells.append(f"{int((diff > 25).sum())} / {int(diff.max())}")
        detail = ", ".join(f"{k}={v}" for k, v in attrs[fid].items())
        print(f"| {vocab.BY_ID[fid].column} ({detail}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
