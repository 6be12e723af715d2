"""The image canvas the phantom paints on, partial-volume occupancy and smooth noise fields.

The phantom is defined in continuous space and sampled on a :class:`factory.geometry.Grid`;
painting happens on boxes of that grid (:class:`factory.geometry.Box`).
"""

from __future__ import annotations

import numpy as np

from factory.geometry import Box, Grid

AIR_HU = -1000.0


class Canvas:
    """The image being painted (float HU) and its anatomy label map, on one grid."""

    def __init__(self, grid: Grid):
        self.grid = grid
        self.hu = np.full(grid.shape, AIR_HU, dtype=np.float32)
        self.labels = np.zeros(grid.shape, dtype=np.uint8)

    def paint(self, box: Box, occ: np.ndarray, value, where: np.ndarray | None = None) -> None:
        """Blend ``value`` (HU, scalar or array) into the box with partial-volume weight ``occ``."""
        if where is not None:
            occ = occ * where
        region = self.hu[box.slices]
        region += (np.asarray(value, dtype=np.float32) - region) * occ

    def add(self, box: Box, delta: np.ndarray, occ: np.ndarray) -> None:
        """Shift HU by ``delta`` weighted by ``occ`` (textures such as mosaic attenuation)."""
        self.hu[box.slices] += delta * occ

    def label(self, box: Box, occ: np.ndarray, label: int, where: np.ndarray | None = None) -> None:
        """Set ``label`` where the structure covers at least half a voxel."""
        inside = occ >= 0.5
        if where is not None:
            inside &= where
        self.labels[box.slices][inside] = label


def occupancy(sdf: np.ndarray, h: float) -> np.ndarray:
    """Partial-volume fraction from a signed distance (mm, negative inside): a 1-voxel ramp."""
    return np.clip(0.5 - sdf / h, 0.0, 1.0)


def smooth_noise(rng: np.random.Generator, box: Box, cell_mm: float) -> np.ndarray:
    """Smooth random field (about unit variance) on ``box``, defined on a world lattice.

    The lattice of ``cell_mm`` spacing covers a fixed 560 mm cube, so a subject's texture does
    not depend on the grid it is sampled on. Interpolation is separable cubic B-spline.
    """
    half = 280.0
    n = int(np.ceil(2 * half / cell_mm)) + 4
    lattice = rng.standard_normal((n, n, n), dtype=np.float32)
    field = lattice
    for axis, coords in enumerate((box.x.ravel(), box.y.ravel(), box.z.ravel())):
        u = (coords + half) / cell_mm + 1.0
        lo = max(int(np.floor(u.min())) - 1, 0)
        hi = min(int(np.floor(u.max())) + 3, n)
        part = np.take(field, np.arange(lo, hi), axis=axis)
        field = np.tensordot(_bspline_weights(u - lo, hi - lo), part, axes=([1], [axis]))
        field = np.moveaxis(field, 0, axis)
    return field * np.float32(2.83)  # cubic B-spline interpolation leaves about 1/8 variance


def _bspline_weights(u: np.ndarray, n: int) -> np.ndarray:
    """Dense (len(u), n) matrix of cubic B-spline weights at lattice positions ``u``."""
    i0 = np.floor(u).astype(int)
    t = (u - i0).astype(np.float32)
    w = np.stack(
        [
            (1 - t) ** 3 / 6,
            (3 * t**3 - 6 * t**2 + 4) / 6,
            (-3 * t**3 + 3 * t**2 + 3 * t + 1) / 6,
            t**3 / 6,
        ],
        axis=1,
    )
    out = np.zeros((len(u), n), dtype=np.float32)
    rows = np.arange(len(u))
    for k in range(4):
        out[rows, np.clip(i0 - 1 + k, 0, n - 1)] += w[:, k]
    return out
