"""Viz contract: HU windows, display planes, and the PNG helpers every picture is made with.

Views follow radiological convention: axial and coronal show the patient's right on the left
of the picture, anterior up (axial) and superior up (coronal, sagittal). Phantom previews, the
run summary, the QC report, the server's preview and the model card all draw through here, so
a volume looks the same everywhere. matplotlib is imported only by the functions that draw.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# Display windows as (level, width) in HU.
WINDOWS: dict[str, tuple[float, float]] = {"lung": (-600.0, 1500.0), "mediastinal": (40.0, 400.0)}


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def limits(level: float, width: float) -> tuple[float, float]:
    """The (low, high) HU of a (level, width) window."""
    return level - width / 2, level + width / 2


def windowed(image: np.ndarray, level: float, width: float) -> np.ndarray:
    """HU -> uint8 grey levels in the (level, width) window."""
    low = level - width / 2
    return (np.clip((image - low) / width, 0, 1) * 255).astype(np.uint8)


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


def aspects(spacing: Sequence[float]) -> dict[str, float]:
    """Pixel aspect ratio of each plane of :func:`planes` for voxel ``spacing`` (mm)."""
    sx, sy, sz = spacing
    return {"axial": sy / sx, "coronal": sz / sx, "sagittal": sz / sy}


def show_plane(ax, image: np.ndarray, low_high: tuple[float, float], aspect: float) -> None:
    """Draw one plane in grey between ``low_high`` HU, with no axes."""
    ax.imshow(
        image, cmap="gray", vmin=low_high[0], vmax=low_high[1], aspect=aspect,
        interpolation="nearest",
    )  # fmt: skip


def figure_png(fig, dpis: Sequence[int | None] = (None,), max_bytes: int | None = None, **kw):
    """PNG bytes of a matplotlib figure, which is closed after. With ``max_bytes`` the dpis are
    tried in turn until the picture is small enough."""
    data = b""
    for dpi in dpis:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", **({"dpi": dpi} if dpi else {}), **kw)
        data = buffer.getvalue()
        if max_bytes is None or len(data) <= max_bytes:
            break
    pyplot().close(fig)
    return data


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
    plt = pyplot()
    views = planes(volume, center)
    ratio = aspects(spacing)
    fig, axes = plt.subplots(2, 3, figsize=(9, 6.6), dpi=dpi)
    for row, (window, (level, width)) in enumerate(WINDOWS.items()):
        for col, (name, image) in enumerate(views.items()):
            ax = axes[row, col]
            show_plane(ax, image, limits(level, width), ratio[name])
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
