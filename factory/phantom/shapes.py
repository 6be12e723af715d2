"""Signed-distance primitives (mm, negative inside) evaluated on grid boxes or point arrays.

Distances are first-order approximations (value over gradient norm): exact on the surface,
which is where partial-volume edges are drawn.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from factory.geometry import Box, Grid
from factory.phantom.canvas import occupancy


def _safe(g: np.ndarray) -> np.ndarray:
    return np.maximum(g, 1e-6)


def ellipsoid(x, y, z, center, radii, rot: np.ndarray | None = None) -> np.ndarray:
    """Ellipsoid SDF; ``rot`` (3x3) maps local axes to world (columns are the local axes)."""
    dx, dy, dz = x - center[0], y - center[1], z - center[2]
    if rot is not None:
        dx, dy, dz = (
            rot[0, 0] * dx + rot[1, 0] * dy + rot[2, 0] * dz,
            rot[0, 1] * dx + rot[1, 1] * dy + rot[2, 1] * dz,
            rot[0, 2] * dx + rot[1, 2] * dy + rot[2, 2] * dz,
        )
    u, v, w = dx / radii[0], dy / radii[1], dz / radii[2]
    q = np.sqrt(u * u + v * v + w * w)
    grad = np.sqrt((u / radii[0]) ** 2 + (v / radii[1]) ** 2 + (w / radii[2]) ** 2) / _safe(q)
    return (q - 1.0) / np.maximum(grad, 1e-9)


def superellipse(x, y, center, a, b, p: float = 2.0) -> np.ndarray:
    """Infinite prism along z with a superellipse cross-section |x/a|^p + |y/b|^p = 1."""
    u, v = np.abs(x - center[0]) / a + 1e-9, np.abs(y - center[1]) / b + 1e-9
    qp = u**p + v**p
    q = qp ** (1.0 / p)
    gx = q ** (1 - p) * u ** (p - 1) / a
    gy = q ** (1 - p) * v ** (p - 1) / b
    return (q - 1.0) / _safe(np.sqrt(gx * gx + gy * gy))


def rotation(yaw_deg: float = 0.0, pitch_deg: float = 0.0, roll_deg: float = 0.0) -> np.ndarray:
    """Rotation matrix: yaw about z, then pitch about x, then roll about y (degrees)."""
    a, b, c = np.radians([yaw_deg, pitch_deg, roll_deg])
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    ry = np.array([[np.cos(c), 0, np.sin(c)], [0, 1, 0], [-np.sin(c), 0, np.cos(c)]])
    return rz @ rx @ ry


@dataclass(frozen=True)
class Segment:
    """A tapered tube from ``a`` (radius ``r0``) to ``b`` (radius ``r1``), in mm."""

    a: np.ndarray
    b: np.ndarray
    r0: float
    r1: float

    def bounds(self, pad: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        r = max(self.r0, self.r1) + pad
        return np.minimum(self.a, self.b) - r, np.maximum(self.a, self.b) + r

    def sdf(self, x, y, z, grow: float = 0.0) -> np.ndarray:
        ab = self.b - self.a
        length2 = max(float(ab @ ab), 1e-9)
        px, py, pz = x - self.a[0], y - self.a[1], z - self.a[2]
        t = np.clip((px * ab[0] + py * ab[1] + pz * ab[2]) / length2, 0.0, 1.0)
        dx, dy, dz = px - t * ab[0], py - t * ab[1], pz - t * ab[2]
        r = self.r0 + t * (self.r1 - self.r0) + grow
        return np.sqrt(dx * dx + dy * dy + dz * dz) - r


def tubes_occupancy(
    grid: Grid, segments: Iterable[Segment], grow: float = 0.0
) -> tuple[Box, np.ndarray] | None:
    """Union of tube occupancies on the box that holds them all (``grow`` thickens each tube).

    Tubes thinner than a voxel fade with their squared width, as partial volume does.
    """
    segments = list(segments)
    if not segments:
        return None
    pad = grow + grid.h
    los, his = zip(*(s.bounds(pad) for s in segments), strict=True)
    box = grid.box(np.min(los, axis=0), np.max(his, axis=0))
    if box is None:
        return None
    occ = np.zeros(box.shape, dtype=np.float32)
    h = grid.h
    for seg in segments:
        sub = grid.box(*seg.bounds(pad))
        if sub is None:
            continue
        local = tuple(
            slice(s.start - o.start, s.stop - o.start)
            for s, o in zip(sub.slices, box.slices, strict=True)
        )
        r = max(seg.r0, seg.r1) + grow
        fade = min(1.0, 2.0 * r / h) ** 2
        o = occupancy(seg.sdf(sub.x, sub.y, sub.z, grow), h) * np.float32(fade)
        np.maximum(occ[local], o, out=occ[local])
    return box, occ


def polyline(points: np.ndarray, radii: np.ndarray) -> list[Segment]:
    """Tube segments joining consecutive points, radii interpolated per point."""
    return [
        Segment(points[i], points[i + 1], float(radii[i]), float(radii[i + 1]))
        for i in range(len(points) - 1)
    ]


def smooth_path(control: np.ndarray, per_span: int = 4) -> np.ndarray:
    """Catmull-Rom curve through control points (N, 3), ``per_span`` samples per span."""
    p = np.vstack([control[0], control, control[-1]])
    out = []
    for i in range(1, len(p) - 2):
        for t in np.linspace(0, 1, per_span, endpoint=False):
            t2, t3 = t * t, t * t * t
            out.append(
                0.5
                * (
                    2 * p[i]
                    + (-p[i - 1] + p[i + 1]) * t
                    + (2 * p[i - 1] - 5 * p[i] + 4 * p[i + 1] - p[i + 2]) * t2
                    + (-p[i - 1] + 3 * p[i] - 3 * p[i + 1] + p[i + 2]) * t3
                )
            )
    out.append(control[-1])
    return np.asarray(out)
