"""Three-plane PNG montages of a CT volume in lung and mediastinal windows, with a caption.

Views follow radiological convention: axial and coronal show the patient's right on the
left of the picture, anterior up (axial) and superior up (coronal, sagittal).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

WINDOWS = {"lung": (-600.0, 1500.0), "mediastinal": (40.0, 400.0)}


def planes(volume: np.ndarray, center: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """Axial, coronal and sagittal slices through ``center`` (voxel index), display-oriented.

    ``volume`` is indexed (x, y, z) with x toward the patient's right (RAS+).
    """
    cx, cy, cz = center if center is not None else [n // 2 for n in volume.shape]
    return {
        "axial": volume[::-1, ::-1, cz].T,  # rows: anterior->posterior; cols: right->left
        "coronal": volume[::-1, cy, ::-1].T,  # rows: superior->inferior
        "sagittal": volume[cx, :, ::-1].T,  # rows: superior->inferior; cols: posterior->anterior
    }


def montage(
    volume: np.ndarray,
    spacing: Sequence[float],
    caption: str,
    path: str | Path,
    center: Sequence[int] | None = None,
    title: str = "",
    dpi: int = 100,
) -> Path:
    """Write a 2 x 3 montage (lung and mediastinal windows x three planes) to ``path``."""
    views = planes(volume, center)
    sx, sy, sz = spacing
    aspects = {"axial": sy / sx, "coronal": sz / sx, "sagittal": sz / sy}
    fig, axes = plt.subplots(2, 3, figsize=(9, 6.6), dpi=dpi)
    for row, (window, (level, width)) in enumerate(WINDOWS.items()):
        for col, (name, image) in enumerate(views.items()):
            ax = axes[row, col]
            ax.imshow(
                image,
                cmap="gray",
                vmin=level - width / 2,
                vmax=level + width / 2,
                aspect=aspects[name],
                interpolation="nearest",
            )
            ax.set_axis_off()
            ax.set_title(f"{name}, {window} window", fontsize=8)
    text = "\n".join(textwrap.wrap(caption, 120))
    fig.suptitle(title, fontsize=10)
    fig.text(0.5, 0.01, text, ha="center", va="bottom", fontsize=7.5, wrap=True)
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
