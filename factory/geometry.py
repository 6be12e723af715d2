"""Geometry contract: voxel grids in world millimetres (RAS+) and their NIfTI affine.

A :class:`Grid` is ``shape`` voxels of ``spacing`` mm centred on the origin, so the same
subject looks the same at every resolution; world coordinates are RAS+ (x to the patient's
right, y anterior, z superior). The phantom samples its continuous anatomy on a grid; the
Generator and the store stamp a grid's affine on every volume.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
