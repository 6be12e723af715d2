"""Sampling grids in world millimetres (RAS+), boxes of a grid, and the image canvas.

The phantom is defined in continuous space; a :class:`Grid` samples it at any shape and
spacing. World coordinates are RAS+ (x to the patient's right, y anterior, z superior) with the
grid centred on the origin, so the same subject looks the same at every resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

AIR_HU = -1000.0


@dataclass(frozen=True)
class Grid:
    """A voxel grid: ``shape`` (x, y, z) voxels of ``spacing`` mm, centred on the origin."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    @property
    def fov_mm(self) -> tuple[float, float, float]:
        return tuple(n * s for n, s in zip(self.shape, self.spacing, strict=True))  # type: ignore[return-value]

    @property
    def origin(self) -> np.ndarray:
        """World position (mm) of voxel (0, 0, 0)."""
        return -(np.asarray(self.shape) - 1) / 2.0 * np.asarray(self.spacing)

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    @property
    def h(self) -> float:
        """Isotropic length scale (mm) for partial-volume edges: the geometric mean spacing."""
        return float(np.prod(self.spacing)) ** (1.0 / 3.0)

    def affine(self) -> np.ndarray:
        """Voxel-to-world (RAS+, mm) affine, as NIfTI stores it."""
        a = np.diag([*self.spacing, 1.0])
        a[:3, 3] = self.origin
        return a

    def axis(self, i: int) -> np.ndarray:
        return (self.origin[i] + np.arange(self.shape[i]) * self.spacing[i]).astype(np.float32)

    def to_voxel(self, point_mm: np.ndarray) -> np.ndarray:
        """Continuous voxel index of a world point."""
        return (np.asarray(point_mm) - self.origin) / np.asarray(self.spacing)

    def box(self, lo_mm, hi_mm) -> Box | None:
        """The part of the grid inside the world box [lo, hi] (mm), or None if it is empty."""
        sl = []
        for i in range(3):
            a = int(np.ceil((lo_mm[i] - self.origin[i]) / self.spacing[i]))
            b = int(np.floor((hi_mm[i] - self.origin[i]) / self.spacing[i])) + 1
            a, b = max(a, 0), min(b, self.shape[i])
            if b <= a:
                return None
            sl.append(slice(a, b))
        return Box(self, tuple(sl))  # type: ignore[arg-type]

    def full(self) -> Box:
        return Box(self, tuple(slice(0, n) for n in self.shape))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Box:
    """A rectangular part of a grid, with open-mesh world coordinates for broadcasting."""

    grid: Grid
    slices: tuple[slice, slice, slice]

    @property
    def x(self) -> np.ndarray:
        return self.grid.axis(0)[self.slices[0]][:, None, None]

    @property
    def y(self) -> np.ndarray:
        return self.grid.axis(1)[self.slices[1]][None, :, None]

    @property
    def z(self) -> np.ndarray:
        return self.grid.axis(2)[self.slices[2]][None, None, :]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(s.stop - s.start for s in self.slices)  # type: ignore[return-value]


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
