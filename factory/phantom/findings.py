"""How each of the 18 findings is rendered, honouring its attributes.

A finding may ``adjust`` the subject before the anatomy is built (cardiomegaly, pericardial
fluid, airway changes) and ``paint`` on the rendered canvas afterwards. ``paint`` returns the
ground-truth record of what it drew (where, how big). docs/phantom.md describes each one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from factory.anatomy import LOBE_CODES, LOBE_LABEL, LUNG_LABELS
from factory.geometry import Box
from factory.phantom.anatomy import SIDES, Anatomy, Subject
from factory.phantom.canvas import Canvas, occupancy, smooth_noise
from factory.phantom.shapes import (
    Segment,
    ellipsoid,
    polyline,
    smooth_path,
    superellipse,
    tubes_occupancy,
)

Attrs = dict[str, object]
Truth = dict[str, object]


@dataclass(frozen=True)
class Renderer:
    adjust: Callable[[Subject, Attrs, np.random.Generator], None] | None = None
    paint: Callable[[Canvas, Anatomy, Attrs, np.random.Generator], Truth] | None = None


# ----- helpers --------------------------------------------------------------------------------
def _sides(attrs: Attrs) -> tuple[str, ...]:
    lat = attrs.get("laterality", "bilateral")
    return SIDES if lat == "bilateral" else (str(lat),)


def _extent(box: Box, occ: np.ndarray) -> Truth:
    """Bounding box (mm) and volume (mL) of where ``occ`` covers at least half a voxel."""
    grid = box.grid
    inside = np.broadcast_to(occ >= 0.5, box.shape)
    if not inside.any():
        return {"volume_ml": 0.0}
    idx = np.argwhere(inside)
    start = np.array([s.start for s in box.slices])
    lo, hi = idx.min(0) + start, idx.max(0) + start
    to_mm = grid.affine()
    return {
        "volume_ml": round(float(np.broadcast_to(occ, box.shape).sum()) * grid.voxel_ml, 3),
        "bbox_mm": [np.round(to_mm[:3, :3] @ v + to_mm[:3, 3], 1).tolist() for v in (lo, hi)],
    }


def _ball(
    canvas: Canvas, center, radii, value, pad: float = 4.0, rot=None
) -> tuple[Box, np.ndarray] | None:
    c = np.asarray(center, dtype=float)
    r = float(np.max(radii)) + pad + canvas.grid.h
    box = canvas.grid.box(c - r, c + r)
    if box is None:
        return None
    occ = occupancy(ellipsoid(box.x, box.y, box.z, c, radii, rot), canvas.grid.h)
    fade = min(1.0, 2.0 * float(np.min(radii)) / canvas.grid.h) ** 2
    occ *= np.float32(fade)
    canvas.paint(box, occ, value)
    return box, occ


def _lung_region(canvas: Canvas, anatomy: Anatomy, side: str, lobes: tuple[str, ...] | None = None):
    """Box, partial-volume lung occupancy and a mask of lung-labelled voxels for one side."""
    box = anatomy.lung_box[side]
    labels = canvas.labels[box.slices]
    codes = [LOBE_LABEL[c] for c in (lobes or LOBE_CODES)]
    mask = np.isin(labels, codes) | (labels == 7)
    return box, anatomy.lung_occ[side], mask


def _point_in_lobe(
    anatomy: Anatomy, rng: np.random.Generator, lobe: str, margin: float, depth=None
) -> np.ndarray:
    """A random world point inside ``lobe`` at least ``margin`` mm from its surface."""
    idx = LOBE_CODES.index(lobe)
    sign = 1 if lobe[0] == "R" else -1
    lo = np.array([min(0, sign * anatomy.a_cav), -anatomy.b_cav, -150.0])
    hi = np.array([max(0, sign * anatomy.a_cav), anatomy.b_cav, anatomy.z_apex])
    pts = lo + rng.random((400, 3)) * (hi - lo)
    d = anatomy.inside_lobe(pts, np.full(len(pts), idx))
    ok = d < -margin if depth is None else (d < -margin) & (d > -depth)
    if ok.any():
        return pts[np.argmax(ok)]
    return anatomy.lobe_center(lobe)


def _fraction_threshold(score: np.ndarray, where: np.ndarray, fraction: float) -> float:
    vals = score[where]
    return float(np.quantile(vals, 1.0 - fraction)) if vals.size else float("inf")


def _soft_region(canvas, anatomy, rng, attrs, fractions, cell_mm, value) -> Truth:
    """Paint the top ``fraction`` of a smooth random field inside each lung toward ``value``."""
    frac = fractions[str(attrs.get("severity", "moderate"))]
    out: Truth = {"target_fraction": frac}
    for side in _sides(attrs):
        box, occ, mask = _lung_region(canvas, anatomy, side)
        field = smooth_noise(rng, box, cell_mm)
        t = _fraction_threshold(np.broadcast_to(field, box.shape), mask & (occ > 0.99), frac)
        w = np.clip((field - t) / 0.25, 0.0, 1.0) * occ * mask
        canvas.paint(box, w, value)
        out[side] = _extent(box, w)
    return out


# ----- devices --------------------------------------------------------------------------------
def _medical_material(canvas: Canvas, an: Anatomy, attrs: Attrs, rng) -> Truth:
    s = an.subject.scale
    device = str(attrs["device"])
    grid = canvas.grid
    svc_low = an.svc.b
    parts: list[tuple[Box, np.ndarray]] = []
    if device in ("pacemaker", "port_catheter"):
        left = device == "pacemaker"
        x = (-0.55 if left else 0.5) * an.a
        gen = np.array([x, an.skin_y(x) - 9.0, an.z_carina + 60 * s])  # under the skin
        radii = (24 * s, 5.0, 20 * s) if left else (13 * s, 6.0, 13 * s)
        ball = _ball(canvas, gen, radii, 2500.0 if left else 1200.0)
        if ball:
            parts.append(ball)
        end = an.heart_center + np.array([0.45, 0.3, -0.1]) * an.heart_radii if left else svc_low
        path = smooth_path(
            np.array(
                [
                    gen,
                    [gen[0] * 0.6, 0.45 * an.b_cav, an.z_carina + 80 * s],
                    [an.svc.a[0], an.svc.a[1], an.z_carina + 60 * s],
                    svc_low,
                    end,
                ]
            ),
            5,
        )
        tube = tubes_occupancy(grid, polyline(path, np.full(len(path), 1.3)))
        if tube:
            canvas.paint(*tube, 2000.0 if left else 700.0)
            parts.append(tube)
    elif device == "sternotomy_wires":
        ys = an.b_cav + 7 * s
        for zk in np.linspace(-70 * s, 70 * s, 6):
            box = grid.box((-22 * s, ys - 12 * s, zk - 4), (22 * s, ys + 12 * s, zk + 4))
            if box is None:
                continue
            ring = np.abs(superellipse(box.x, box.y, (0.0, ys), 17 * s, 8 * s))
            d = np.sqrt(ring**2 + (box.z - zk) ** 2) - 0.9
            occ = occupancy(d, grid.h) * np.float32(min(1.0, 1.8 / grid.h) ** 2)
            canvas.paint(box, occ, 3000.0)
            parts.append((box, occ))
    elif device == "endotracheal_tube":
        seg = Segment(
            an.airways[0].segment.a, np.array([0.0, an.y_trachea, an.z_carina + 35 * s]), 1, 1
        )
        box = grid.box(*seg.bounds(12 * s))
        if box is not None:
            axis = seg.sdf(box.x, box.y, box.z) + 1
            occ = occupancy(np.abs(axis - 7 * s) - 1.0, grid.h) * np.float32(
                min(1.0, 2.0 / grid.h) ** 2
            )
            canvas.paint(box, occ, 300.0)
            parts.append((box, occ))
    elif device == "chest_tube":
        pts = np.array(
            [
                [an.a + 20, 0.1 * an.b, -25 * s],
                [an.a_cav - 4, 0.05 * an.b_cav, -20 * s],
                [0.75 * an.a_cav, -0.45 * an.b_cav, 30 * s],
                [0.55 * an.a_cav, -0.35 * an.b_cav, 95 * s],
            ]
        )
        path = smooth_path(pts, 5)
        outer = tubes_occupancy(grid, polyline(path, np.full(len(path), 5.0)))
        lumen = tubes_occupancy(grid, polyline(path, np.full(len(path), 3.5)))
        if outer and lumen:
            canvas.paint(*outer, 150.0)
            canvas.paint(*lumen, -1000.0)
            parts.append(outer)
    truth: Truth = {"device": device}
    if parts:
        truth |= _extent(*parts[0])
    return truth


# ----- vessels and heart ----------------------------------------------------------------------
def _plaques(canvas: Canvas, rng, centers: np.ndarray, n: int, r_range, hu_range) -> list[dict]:
    out = []
    for c in centers[:n]:
        r = float(rng.uniform(*r_range))
        hu = float(rng.uniform(*hu_range))
        _ball(canvas, c, (r, r, 1.6 * r), hu, pad=2.0)
        out.append(
            {"center_mm": np.round(c, 1).tolist(), "radius_mm": round(r, 2), "hu": round(hu)}
        )
    return out


_CALC_COUNT = {"mild": 5, "moderate": 12, "severe": 24}


def _arterial_calcification(canvas: Canvas, an: Anatomy, attrs: Attrs, rng) -> Truth:
    severity = str(attrs["severity"])
    n = _CALC_COUNT[severity]
    path, radii = an.aorta_path, an.aorta_radii
    t = rng.uniform(0, len(path) - 1.001, n)
    i = t.astype(int)
    frac = (t - i)[:, None]
    center = path[i] * (1 - frac) + path[i + 1] * frac
    r = radii[i] * (1 - frac[:, 0]) + radii[i + 1] * frac[:, 0]
    tangent = path[i + 1] - path[i]
    u = np.cross(tangent, rng.normal(size=(n, 3)))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    centers = center + u * r[:, None]
    big = 1.4 if severity == "severe" else 1.0
    plaques = _plaques(canvas, rng, centers, n, (1.5 * big, 3.0 * big), (450, 1100))
    return {"plaques": plaques, "count": len(plaques)}


def _surface_point(an: Anatomy, direction: np.ndarray, out_mm: float) -> np.ndarray:
    d = direction / np.linalg.norm(direction)
    local = an.heart_rot.T @ d
    t = 1.0 / np.sqrt(np.sum((local / an.heart_radii) ** 2))
    return an.heart_center + d * (t + out_mm)


def _coronary_calcification(canvas: Canvas, an: Anatomy, attrs: Attrs, rng) -> Truth:
    severity = str(attrs["severity"])
    n = {"mild": 3, "moderate": 8, "severe": 16}[severity]
    apex = np.array([-1.0, 0.7, -0.5])
    apex /= np.linalg.norm(apex)
    e1 = np.cross(apex, [0.0, 0.0, 1.0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(apex, e1)
    centers = []
    for _ in range(n):
        if rng.random() < 0.45:  # LAD: anterior groove from base to apex
            t = rng.uniform(-0.6, 0.7)
            d = apex * t + np.array([0.0, 1.0, 0.0]) * (1 - abs(t))
        else:  # RCA / LCx: the atrioventricular groove around the base
            ang = rng.uniform(0, 2 * np.pi)
            d = -0.35 * apex + np.cos(ang) * e1 + np.sin(ang) * e2
        centers.append(_surface_point(an, d, 1.5))
    big = 1.3 if severity == "severe" else 1.0
    plaques = _plaques(canvas, rng, np.array(centers), n, (1.2 * big, 2.5 * big), (550, 1200))
    return {"plaques": plaques, "count": len(plaques)}


def _adjust_cardiomegaly(subject: Subject, attrs: Attrs, rng) -> None:
    lo, hi = {"mild": (0.53, 0.57), "moderate": (0.58, 0.62), "severe": (0.64, 0.70)}[
        str(attrs["severity"])
    ]
    subject.heart_scale = float(rng.uniform(lo, hi)) / subject.heart_ctr


def _truth_cardiomegaly(canvas: Canvas, an: Anatomy, attrs: Attrs, rng) -> Truth:
    return {"target_ctr": round(an.subject.heart_ctr * an.subject.heart_scale, 3)}


_PERICARDIAL_MM = {"small": 5.0, "moderate": 11.0, "large": 18.0}


def _adjust_pericardial(subject: Subject, attrs: Attrs, rng) -> None:
    subject.pericardial_fluid_mm = _PERICARDIAL_MM[str(attrs["severity"])] * float(
        rng.uniform(0.85, 1.15)
    )


def _truth_pericardial(canvas: Canvas, an: Anatomy, attrs: Attrs, rng) -> Truth:
    return {"thickness_mm": round(an.subject.pericardial_fluid_mm, 1)}


def _hiatal_hernia(canvas: Canvas, an: Anatomy, attrs: Attrs, rng) -> Truth:
    r = float(attrs["size_mm"]) / 2
    c = an.hiatus + np.array([0.0, 0.0, r * 0.8])
    box = canvas.grid.box(c - r - 2 * canvas.grid.h, c + r + 2 * canvas.grid.h)
    if box is None:
        return {"center_mm": np.round(c, 1).tolist(), "diameter_mm": 2 * r}
    h = canvas.grid.h
    free = ~np.isin(canvas.labels[box.slices], (8, 9, 10))  # it displaces heart, aorta, bone
    outer = ellipsoid(box.x, box.y, box.z, c, (r, r, r))
    wall = occupancy(outer, h) * free
    canvas.paint(box, wall, 35.0)
    canvas.paint(box, occupancy(outer + 2.5, h), 20.0, where=free)
    air = np.maximum(outer + 2.5, c[1] + 0.35 * r - box.y)
    canvas.paint(box, occupancy(air, h), -1000.0, where=free)
    _unlabel_lung(canvas, box, wall)
    return {"center_mm": np.round(c, 1).tolist(), "diameter_mm": 2 * r} | _extent(box, wall)


def _unlabel_lung(canvas: Canvas, box: Box, occ: np.ndarray) -> None:
    labels = canvas.labels[box.slices]
    labels[(np.broadcast_to(occ, box.shape) >= 0.5) & np.isin(labels, (*LUNG_LABELS, 7))] = 0


def _lymphadenopathy(canvas: Canvas, an: Anatomy, attrs: Attrs, rng) -> Truth:
    s = an.subject.scale
    yt, zc = an.y_trachea, an.z_carina
    stations = {
        "paratracheal": [(18 * s, yt + 12 * s, zc + 32 * s), (-16 * s, yt + 10 * s, zc + 26 * s)],
        "subcarinal": [(0.0, yt - 12 * s, zc - 16 * s)],
        "hilar": [(44 * s, yt + 2 * s, zc - 14 * s), (-46 * s, yt, zc - 8 * s)],
        "prevascular": [(4 * s, 0.4 * an.b_cav, zc + 38 * s)],
    }
    first = str(attrs["station"])
    size = float(attrs["size_mm"])
    count = int(attrs["count"])
    names = list(stations)
    nodes = []
    for k in range(count):
        station = first if k == 0 else names[int(rng.integers(len(names)))]
        base = np.array(stations[station][int(rng.integers(len(stations[station])))])
        center = base + rng.normal(0, 3, 3) + (0, 0, 14 * k * (station == first))
        short = size if k == 0 else float(rng.uniform(10, max(size, 10.5)))
        r = short / 2
        painted = _ball(canvas, center, (r, r * 1.1, r * 1.4), 38.0)
        if painted:
            _unlabel_lung(canvas, *painted)
        nodes.append(
            {
                "station": station,
                "center_mm": np.round(center, 1).tolist(),
                "short_axis_mm": round(short, 1),
            }
        )
    return {"nodes": nodes}


# ----- lungs ----------------------------------------------------------------------------------
def _emphysema(canvas: Canvas, an: Anatomy, attrs: Attrs, rng) -> Truth:
    frac = {"mild": 0.06, "moderate": 0.15, "severe": 0.3}[str(attrs["severity"])]
    kind = str(attrs["type"])
    out: Truth = {"target_fraction": frac, "type": kind}
    for side in SIDES:
        box, occ, mask = _lung_region(canvas, an, side)
        field = smooth_noise(rng, box, 6.0)
        if kind == "paraseptal":
            score = field * 0.5 + np.clip(an.lung_sdf_grid[side] / 6.0, -3, 1)
        else:
            score = field + 1.5 * (box.z - an.z_cap) / (an.z_apex + 150)
        score = np.broadcast_to(score, box.shape)
        t = _fraction_threshold(score, mask & (occ > 0.99), frac)
        w = np.clip((score - t) / 0.2, 0.0, 1.0) * occ * mask
        canvas.paint(box, w, -985.0)
        out[side] = _extent(box, w)
    return out


def _posterior_depth(occ: np.ndarray, box: Box) -> np.ndarray:
    """Distance (mm) of each voxel from the most posterior lung voxel of its (x, z) column."""
    inside = occ >= 0.5
    first = np.argmax(inside, axis=1)
    y = box.y.ravel()
    return box.y - y[first][:, None, :]


def _atelectasis(canvas: Canvas, an: Anatomy, attrs: Attrs, rng) -> Truth:
    severity = str(attrs["severity"])
    out: Truth = {}
    for side in _sides(attrs):
        lower = ("RLL",) if side == "right" else ("LLL",)
        box, occ, mask = _lung_region(canvas, an, side, lower)
        if severity == "mild":  # plate-like band across the lower lobe
            zp = float(rng.uniform(-60, -20)) * an.subject.scale
            d = np.abs(box.z - zp) - 2.5
            w = occupancy(d, canvas.grid.h) * occ * mask * np.float32(min(1.0, 5.0 / canvas.grid.h))
        else:
            thick = (14.0 if severity == "moderate" else 32.0) * float(rng.uniform(0.85, 1.15))
            depth = _posterior_depth(occ, box)
            w = occupancy(depth - thick, canvas.grid.h) * occ * mask
        canvas.paint(box, w, 25.0)
        out[side] = _extent(box, w)
    return out


def _lung_nodule(canvas: Canvas, an: Anatomy, attrs: Attrs, rng) -> Truth:
    size, lobe, count = float(attrs["size_mm"]), str(attrs["lobe"]), int(attrs["count"])
    nodules = []
    for k in range(count):
        where = lobe if k == 0 else LOBE_CODES[int(rng.integers(5))]
        d = size if k == 0 else float(rng.uniform(3.0, size))
        c = _point_in_lobe(an, rng, where, d / 2 + 4)
        r = d / 2
        _ball(canvas, c, (r, r, r), float(rng.uniform(25, 55)), pad=2.0)
        nodules.append(
            {"lobe": where, "center_mm": np.round(c, 1).tolist(), "diameter_mm": round(d, 1)}
        )
    return {"nodules": nodules}


def _lung_opacity(canvas, an, attrs, rng) -> Truth:
    return _soft_region(
        canvas, an, rng, attrs, {"mild": 0.08, "moderate": 0.18, "severe": 0.35}, 14.0, -520.0
    )


def _fibrotic(canvas: Canvas, an: Anatomy, attrs: Attrs, rng) -> Truth:
    out: Truth = {}
    for side in _sides(attrs):
        lobe = "RUL" if side == "right" else "LUL"
        segs = []
        for _ in range(int(rng.integers(3, 7))):
            a = _point_in_lobe(an, rng, lobe, 4.0, depth=25.0)
            toward = np.array([0.0, an.y_trachea, an.z_carina]) - a
            d = toward / np.linalg.norm(toward) + rng.normal(0, 0.4, 3)
            b = a + d / np.linalg.norm(d) * rng.uniform(20, 45)
            segs.append(Segment(a, b, float(rng.uniform(1.2, 2.4)), float(rng.uniform(0.8, 1.5))))
        tube = tubes_occupancy(canvas.grid, segs)
        if tube:
            tbox, tocc = tube
            canvas.paint(tbox, tocc, -60.0, where=_in_lung_mask(canvas, tbox))
        out[side] = {"bands": len(segs)} | (_extent(*tube) if tube else {})
    return out


def _in_lung_mask(canvas: Canvas, box: Box) -> np.ndarray:
    return np.isin(canvas.labels[box.slices], (*LUNG_LABELS, 7))


_EFFUSION_ML = {"small": 180.0, "moderate": 500.0, "large": 1100.0}


def _pleural_effusion(canvas: Canvas, an: Anatomy, attrs: Attrs, rng) -> Truth:
    severity = str(attrs["severity"])
    out: Truth = {}
    grid = canvas.grid
    for side in _sides(attrs):
        box, occ, mask = _lung_region(canvas, an, side)
        target = _EFFUSION_ML[severity] * an.subject.scale**3 * float(rng.uniform(0.85, 1.15))
        score = np.broadcast_to(-box.y - 0.45 * box.z, box.shape)
        lung_ml = float(occ.sum()) * grid.voxel_ml
        frac = min(target / max(lung_ml, 1e-6), 0.45)
        inside = (occ > 0.5) & mask
        t = _fraction_threshold(score, inside, frac)
        w = np.clip((score - t) / grid.h + 0.5, 0.0, 1.0) * occ * mask
        canvas.paint(box, w, 12.0)
        _unlabel_lung(canvas, box, w)
        out[side] = {
            "volume_ml": round(float(w.sum()) * grid.voxel_ml, 1),
            "target_ml": round(target, 1),
        }
    return out


def _mosaic(canvas: Canvas, an: Anatomy, attrs: Attrs, rng) -> Truth:
    amp = {"mild": 45.0, "moderate": 70.0, "severe": 100.0}[str(attrs["severity"])]
    for side in SIDES:
        box, occ, mask = _lung_region(canvas, an, side)
        field = smooth_noise(rng, box, 16.0)
        canvas.add(box, amp * np.tanh(3.0 * field), occ * mask)
    return {"amplitude_hu": amp}


def _adjust_peribronchial(subject: Subject, attrs: Attrs, rng) -> None:
    subject.airway_wall_scale = {"mild": 2.2, "moderate": 3.0, "severe": 4.0}[
        str(attrs["severity"])
    ]


def _truth_airways(canvas: Canvas, an: Anatomy, attrs: Attrs, rng) -> Truth:
    return {
        "wall_scale": an.subject.airway_wall_scale,
        "dilation": dict(an.subject.airway_dilation),
    }


def _consolidation(canvas: Canvas, an: Anatomy, attrs: Attrs, rng) -> Truth:
    lobe = str(attrs["lobe"])
    side = "right" if lobe[0] == "R" else "left"
    c = _point_in_lobe(an, rng, lobe, 10.0)
    box = an.lung_box[side]
    r = float(rng.uniform(28, 45)) * an.subject.scale
    blob = ellipsoid(box.x, box.y, box.z, c, (r, r * 0.9, r * 1.2)) + 6.0 * smooth_noise(
        rng, box, 12.0
    )
    labels = canvas.labels[box.slices]
    mask = (labels == LOBE_LABEL[lobe]) | (labels == 7)  # airways (6) stay: air bronchograms
    w = occupancy(blob, canvas.grid.h) * an.lung_occ[side] * mask
    canvas.paint(box, w, 38.0)
    return {"lobe": lobe, "center_mm": np.round(c, 1).tolist()} | _extent(box, w)


def _adjust_bronchiectasis(subject: Subject, attrs: Attrs, rng) -> None:
    f = {"mild": 1.8, "moderate": 2.4, "severe": 3.2}[str(attrs["severity"])]
    for side in _sides(attrs):
        subject.airway_dilation["RLL" if side == "right" else "LLL"] = f


def _septal(canvas: Canvas, an: Anatomy, attrs: Attrs, rng) -> Truth:
    width = {"mild": 0.6, "moderate": 0.9, "severe": 1.3}[str(attrs["severity"])]
    cell = 14.0
    h = canvas.grid.h
    for side in SIDES:
        box, occ, mask = _lung_region(canvas, an, side)
        coords = [c + 4 * smooth_noise(rng, box, 20.0) for c in (box.x, box.y, box.z)]
        dist = None
        for c in coords:
            m = np.abs(np.mod(c, cell) - cell / 2)
            wall = cell / 2 - m
            dist = wall if dist is None else np.minimum(dist, wall)
        peripheral = an.lung_sdf_grid[side] > -22.0
        w = (
            occupancy(dist - width, h)
            * np.float32(min(1.0, 2 * width / h))
            * occ
            * mask
            * peripheral
        )
        canvas.paint(box, w, -250.0)
    return {"wall_mm": 2 * width, "cell_mm": cell}


RENDERERS: dict[str, Renderer] = {
    "medical_material": Renderer(paint=_medical_material),
    "arterial_wall_calcification": Renderer(paint=_arterial_calcification),
    "cardiomegaly": Renderer(adjust=_adjust_cardiomegaly, paint=_truth_cardiomegaly),
    "pericardial_effusion": Renderer(adjust=_adjust_pericardial, paint=_truth_pericardial),
    "coronary_artery_wall_calcification": Renderer(paint=_coronary_calcification),
    "hiatal_hernia": Renderer(paint=_hiatal_hernia),
    "lymphadenopathy": Renderer(paint=_lymphadenopathy),
    "emphysema": Renderer(paint=_emphysema),
    "atelectasis": Renderer(paint=_atelectasis),
    "lung_nodule": Renderer(paint=_lung_nodule),
    "lung_opacity": Renderer(paint=_lung_opacity),
    "pulmonary_fibrotic_sequela": Renderer(paint=_fibrotic),
    "pleural_effusion": Renderer(paint=_pleural_effusion),
    "mosaic_attenuation_pattern": Renderer(paint=_mosaic),
    "peribronchial_thickening": Renderer(adjust=_adjust_peribronchial, paint=_truth_airways),
    "consolidation": Renderer(paint=_consolidation),
    "bronchiectasis": Renderer(adjust=_adjust_bronchiectasis, paint=_truth_airways),
    "interlobular_septal_thickening": Renderer(paint=_septal),
}
