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


def busiest_slices(
    with_images: Sequence[np.ndarray], without_images: Sequence[np.ndarray]
) -> list[int]:
    """(x, y, z) voxel whose coronal (y) and axial (z) slices differ most between the paired
    volumes: slices through a finding show it, where fixed mid-slices miss a posterior effusion."""
    shape = np.asarray(with_images[0]).shape
    diff = np.zeros(shape, np.float64)
    for a, b in zip(with_images, without_images, strict=True):
        diff += np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    centre = [s // 2 for s in shape]
    if diff.sum() == 0:
        return centre
    return [centre[0], int(diff.sum(axis=(0, 2)).argmax()), int(diff.sum(axis=(0, 1)).argmax())]


def columns_figure(
    title: str,
    panels: Sequence[tuple[str, np.ndarray]],
    spacing: Sequence[float],
    centre: Sequence[int],
    window: tuple[float, float],
    max_bytes: int,
) -> bytes:
    """PNG bytes: one column per (label, HU volume), axial and coronal rows through ``centre``,
    grey between ``window`` HU; drawn at lower resolutions until it is at most ``max_bytes``."""
    ratio = aspects(spacing)
    fig, axes = pyplot().subplots(2, len(panels), figsize=(2.1 * len(panels), 5.0), squeeze=False)
    for col, (label, hu) in enumerate(panels):
        views = planes(np.asarray(hu), centre)
        for row, name in enumerate(("axial", "coronal")):
            ax = axes[row, col]
            show_plane(ax, views[name], window, ratio[name])
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title("\n".join(textwrap.wrap(label, 26)), fontsize=7)
    axes[0, 0].set_ylabel(f"axial z={centre[2]}", fontsize=7)
    axes[1, 0].set_ylabel(f"coronal y={centre[1]}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return figure_png(fig, dpis=(100, 80, 64, 50), max_bytes=max_bytes)
