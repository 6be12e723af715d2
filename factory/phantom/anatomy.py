"""Parametric chest anatomy in world millimetres (RAS+), and its rendering onto a canvas.

:func:`sample_subject` draws one person's parameters; :class:`Anatomy` derives the geometry
(body, chest wall, ribs, sternum, spine, lungs with lobes and fissures, diaphragm, heart, great
vessels, airway and vessel trees) and paints it in a fixed order. Findings may adjust a subject
before rendering (cardiomegaly, airway changes, pericardial fluid) and paint on top after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from factory.anatomy import LOBE_CODES
from factory.geometry import Box
from factory.phantom.canvas import Canvas, occupancy, smooth_noise
from factory.phantom.shapes import (
    Segment,
    ellipsoid,
    polyline,
    rotation,
    smooth_path,
    superellipse,
    tubes_occupancy,
)

SIDES = ("right", "left")

# Tissue values (HU) of the phantom.
HU = {
    "fat": -100.0,
    "mediastinal_fat": -90.0,
    "muscle": 45.0,
    "blood": 40.0,
    "myocardium": 45.0,
    "liver": 55.0,
    "soft": 35.0,
    "cartilage": 110.0,
    "cortical": 900.0,
    "cancellous": 230.0,
    "disc": 80.0,
    "csf": 15.0,
    "fissure": -650.0,
    "fluid": 10.0,
}


@dataclass
class Subject:
    """One person's anatomical parameters. Findings may adjust the last group before rendering."""

    sex: str
    age: int
    scale: float
    width: float
    depth: float
    fat_mm: float
    muscle_mm: float
    heart_ctr: float
    heart_yaw: float
    dome_right: float
    dome_left: float
    rib_phase: float
    lung_hu: float
    noise_hu: float
    blur_mm: float
    tree_seed: int
    texture_seed: int
    # Adjusted by findings.
    heart_scale: float = 1.0
    pericardial_fluid_mm: float = 0.0
    airway_wall_scale: float = 1.0
    airway_dilation: dict[str, float] = field(default_factory=dict)


def sample_subject(rng: np.random.Generator, sex: str, age: int) -> Subject:
    """Draw a subject; size depends on sex, fat on sex and age, lung density on age."""
    male = sex == "M"
    scale = float(np.clip(rng.normal(1.0 if male else 0.93, 0.04), 0.84, 1.1))
    return Subject(
        sex=sex,
        age=int(age),
        scale=scale,
        width=float(np.clip(rng.normal(1.0, 0.04), 0.9, 1.1)),
        depth=float(np.clip(rng.normal(1.0, 0.05), 0.88, 1.12)),
        fat_mm=float(np.clip(rng.normal(14 if male else 20, 5) + 0.08 * (age - 50), 5, 40)),
        muscle_mm=float(np.clip(rng.normal(15 if male else 12, 2), 8, 22)),
        heart_ctr=float(np.clip(rng.normal(0.44, 0.025), 0.38, 0.49)),
        heart_yaw=float(rng.normal(35, 5)),
        dome_right=float(rng.normal(0, 6)),
        dome_left=float(rng.normal(0, 6)),
        rib_phase=float(rng.uniform(-4, 4)),
        lung_hu=float(rng.normal(-862 + 0.3 * (age - 50), 12)),
        noise_hu=float(rng.uniform(10, 22)),
        blur_mm=float(rng.uniform(0.6, 1.0)),
        tree_seed=int(rng.integers(2**31)),
        texture_seed=int(rng.integers(2**31)),
    )


@dataclass(frozen=True)
class Branch:
    """One tube of a tree, with the lobe it serves and its generation (0 = trachea)."""

    segment: Segment
    lobe: str
    generation: int


class Anatomy:
    """Geometry derived from a :class:`Subject`; ``render`` paints it on a canvas."""

    def __init__(self, subject: Subject):
        self.subject = sj = subject
        s = sj.scale
        self.a = 160.0 * s * sj.width
        self.b = 112.0 * s * sj.depth
        self.a_cav = self.a - sj.fat_mm - sj.muscle_mm
        self.b_cav = self.b - sj.fat_mm - sj.muscle_mm
        self.z_apex = 140.0 * s
        self.z_cap = 40.0 * s
        self.z_carina = 35.0 * s
        self.dome_top = {"right": -60.0 * s + sj.dome_right, "left": -75.0 * s + sj.dome_left}
        self.dome_center = {"right": 0.5 * self.a_cav, "left": -0.5 * self.a_cav}
        self.y_spine = -self.b_cav + 15.0 * s
        self.spine_r = 17.0 * s
        self.y_trachea = self.y_spine + 50.0 * s
        self.lung_box: dict[str, Box] = {}
        self.lung_occ: dict[str, np.ndarray] = {}
        self.lung_sdf_grid: dict[str, np.ndarray] = {}
        # Trees grow in the baseline chest, so a finding that enlarges the heart or adds
        # pericardial fluid displaces vessels and airways instead of regrowing them.
        self.fluid_mm = 0.0
        self._heart(1.0)
        self._vessels()
        self.lobe_centers = self._find_lobe_centers()
        self.airways = self._airway_tree()
        self.arteries, self.veins = self._vessel_trees()
        self.fluid_mm = sj.pericardial_fluid_mm
        self._heart(sj.heart_scale)
        self._vessels()

    # ----- geometry -------------------------------------------------------------------------
    def _heart(self, heart_scale: float) -> None:
        sj = self.subject
        s = sj.scale
        yaw = np.radians(sj.heart_yaw)
        # Width of the rotated ellipse across x sets the cardiothoracic ratio.
        base = np.array([62.0, 46.0, 50.0]) * s
        width = 2 * np.sqrt((base[0] * np.cos(yaw)) ** 2 + (base[1] * np.sin(yaw)) ** 2)
        k = sj.heart_ctr * 2 * self.a_cav / width
        # An enlarging heart widens mostly across the chest: scale x by g, y and z by sqrt(g),
        # with g solving (g rx cos)^2 + g (ry sin)^2 = (target half-width)^2.
        qa, qb = (k * base[0] * np.cos(yaw)) ** 2, (k * base[1] * np.sin(yaw)) ** 2
        half = heart_scale * np.sqrt(qa + qb)
        g = (-qb + np.sqrt(qb * qb + 4 * qa * half * half)) / (2 * qa)
        self.heart_radii = base * np.array([k * g, k * np.sqrt(g), np.sqrt(k * g)])
        self.heart_rot = rotation(sj.heart_yaw, -15.0, 0.0)
        rz = self.heart_radii[2]
        self.heart_center = np.array(
            [
                -0.2 * self.a_cav - 0.25 * (self.heart_radii[0] - base[0]),
                0.3 * self.b_cav,
                self.dome_top["left"] + 0.62 * rz,
            ]
        )

    def _vessels(self) -> None:
        s = self.subject.scale
        hc, hr = self.heart_center, self.heart_radii
        top = hc[2] + hr[2]
        aorta = np.array(
            [
                [hc[0] + 0.45 * hr[0], hc[1] - 0.1 * hr[1], hc[2] + 0.4 * hr[2]],
                [14 * s, 0.2 * self.b_cav, top + 25 * s],
                [2 * s, 0.05 * self.b_cav, self.z_carina + 28 * s],
                [-18 * s, self.y_spine + 45 * s, self.z_carina + 22 * s],
                [-22 * s, self.y_spine + 30 * s, self.z_carina - 20 * s],
                [-20 * s, self.y_spine + 28 * s, -200.0],
            ]
        )
        self.aorta_path = smooth_path(aorta, 4)
        n = len(self.aorta_path)
        self.aorta_radii = np.interp(np.arange(n), [0, n // 3, n - 1], [15 * s, 13 * s, 11 * s])
        trunk0 = hc + np.array([0.35 * hr[0], 0.55 * hr[1], 0.45 * hr[2]])
        bif = np.array([-10 * s, 0.05 * self.b_cav, self.z_carina - 18 * s])
        self.pa_segments = [
            Segment(trunk0, bif, 13 * s, 12 * s),
            Segment(
                bif,
                np.array([38 * s, self.y_trachea + 5 * s, self.z_carina - 25 * s]),
                11 * s,
                9 * s,
            ),
            Segment(
                bif,
                np.array([-40 * s, self.y_trachea + 2 * s, self.z_carina - 18 * s]),
                11 * s,
                9 * s,
            ),
        ]
        self.svc = Segment(
            np.array([24 * s, 0.15 * self.b_cav, 200.0]),
            np.array([22 * s, 0.2 * self.b_cav, hc[2] + 0.7 * hr[2]]),
            9 * s,
            9 * s,
        )
        hiatus = np.array([-12 * s, self.y_spine + 35 * s, self.dome_top["left"] - 10 * s])
        self.esophagus = [
            Segment(
                np.array([-4 * s, self.y_trachea - 16 * s, 200.0]),
                np.array([-4 * s, self.y_trachea - 16 * s, self.z_carina]),
                7 * s,
                7 * s,
            ),
            Segment(
                np.array([-4 * s, self.y_trachea - 16 * s, self.z_carina]), hiatus, 7 * s, 7 * s
            ),
        ]
        self.hiatus = hiatus

    def diaphragm_z(self, x, y) -> np.ndarray:
        """Height (mm) of the diaphragm under (x, y): two domes, lower posteriorly and laterally."""
        s = self.subject.scale
        yc = 0.15 * self.b_cav
        out = None
        for side in SIDES:
            u = (x - self.dome_center[side]) / (0.8 * self.a_cav)
            v = (y - yc) / (0.9 * self.b_cav)
            z = self.dome_top[side] - 75.0 * s * (u * u + v * v)
            out = z if out is None else np.maximum(out, z)
        return out

    def skin_y(self, x: float) -> float:
        """Anterior skin surface (mm) at lateral position ``x``."""
        return self.b * max(1.0 - abs(x / self.a) ** 2.4, 0.0) ** (1 / 2.4)

    def cavity_sdf(self, x, y) -> np.ndarray:
        """Inner surface of the chest wall (a superellipse prism)."""
        return superellipse(x, y, (0.0, 0.0), self.a_cav, self.b_cav, 2.3)

    def lung_sdf(self, side: str, x, y, z) -> np.ndarray:
        """One lung: an elliptic cylinder with an apical cap, cut by chest wall, mediastinum,
        diaphragm and the heart. Works on grid boxes and on point arrays alike."""
        s = self.subject.scale
        sign = 1.0 if side == "right" else -1.0
        medial = 10.0 * s if side == "right" else 12.0 * s
        xc = sign * (medial + self.a_cav) / 2
        rx = (self.a_cav - medial) / 2 + 10.0 * s
        ry = self.b_cav + 6.0 * s
        yc = -4.0 * s
        u, v = (x - xc) / rx, (y - yc) / ry
        w = np.maximum(z - self.z_cap, 0.0) / (self.z_apex - self.z_cap)
        q = np.sqrt(u * u + v * v + w * w)
        grad = np.sqrt((u / rx) ** 2 + (v / ry) ** 2 + (w / (self.z_apex - self.z_cap)) ** 2)
        body = (q - 1.0) * q / np.maximum(grad, 1e-6)
        out = np.maximum(body, self.cavity_sdf(x, y) + 1.5)
        out = np.maximum(out, medial - sign * x)
        out = np.maximum(out, (self.diaphragm_z(x, y) - z) * 0.8)
        heart = ellipsoid(x, y, z, self.heart_center, self.heart_radii, self.heart_rot)
        out = np.maximum(out, -(heart - 4.0 - self.fluid_mm))
        spine = np.sqrt(x * x + (y - self.y_spine) ** 2) - self.spine_r - 8.0 * s
        return np.maximum(out, -spine)

    def oblique_z(self, side: str, y) -> np.ndarray:
        """Height of the oblique fissure: high posteriorly, low anteriorly."""
        s = self.subject.scale
        post, ant = (60.0 * s, -75.0 * s) if side == "right" else (68.0 * s, -85.0 * s)
        t = (y + self.b_cav) / (2 * self.b_cav)
        return post + (ant - post) * t

    def horizontal_z(self) -> float:
        return -5.0 * self.subject.scale

    def lobe_index(self, side: str, x, y, z) -> np.ndarray:
        """0-based index into LOBE_CODES of the lobe at each point of a lung."""
        below = z < self.oblique_z(side, y)
        if side == "right":
            upper = z >= self.horizontal_z()
            return np.where(below, 2, np.where(upper, 0, 1)).astype(np.int8)
        return np.where(below, 4, 3).astype(np.int8)

    def lobe_center(self, code: str) -> np.ndarray:
        return self.lobe_centers[code]

    def _find_lobe_centers(self) -> dict[str, np.ndarray]:
        """Per lobe, the inside point nearest its centroid that is at least half as deep as its
        deepest point (found on an 8 mm lattice), so trees always aim well into the lobe."""
        xs = np.arange(-self.a_cav, self.a_cav, 8.0)
        ys = np.arange(-self.b_cav, self.b_cav, 8.0)
        zs = np.arange(-200.0, self.z_apex, 8.0)
        pts = np.stack(np.meshgrid(xs, ys, zs, indexing="ij"), axis=-1).reshape(-1, 3)
        centers = {}
        for i, code in enumerate(LOBE_CODES):
            side = pts[pts[:, 0] > 0] if code[0] == "R" else pts[pts[:, 0] < 0]
            depth = -self.inside_lobe(side, np.full(len(side), i))
            inside = side[depth > 0]
            deep = side[depth >= 0.5 * depth.max()]
            centroid = inside.mean(axis=0)
            centers[code] = deep[np.argmin(np.linalg.norm(deep - centroid, axis=1))]
        return centers

    def inside_lobe(self, points: np.ndarray, lobes: np.ndarray) -> np.ndarray:
        """Signed distance of points (N, 3) to their own lobe (positive if in another lobe)."""
        out = np.empty(len(points))
        for side, idx in (("right", (0, 1, 2)), ("left", (3, 4))):
            sel = np.isin(lobes, idx)
            if not sel.any():
                continue
            p = points[sel]
            d = self.lung_sdf(side, p[:, 0], p[:, 1], p[:, 2])
            wrong = self.lobe_index(side, p[:, 0], p[:, 1], p[:, 2]) != lobes[sel]
            out[sel] = np.where(wrong, np.maximum(d, 1.0), d)
        return out

    # ----- trees ----------------------------------------------------------------------------
    def _airway_tree(self) -> list[Branch]:
        s = self.subject.scale
        c = np.array([0.0, self.y_trachea, self.z_carina])
        top = np.array([0.0, self.y_trachea, 220.0])
        r_main = np.array([30 * s, self.y_trachea - 4 * s, self.z_carina - 22 * s])
        l_main = np.array([-42 * s, self.y_trachea - 2 * s, self.z_carina - 28 * s])
        inter = r_main + np.array([8 * s, -2 * s, -25 * s])
        branches = [
            Branch(Segment(top, c, 9 * s, 8.5 * s), "trachea", 0),
            Branch(Segment(c, r_main, 7.5 * s, 6.5 * s), "right", 1),
            Branch(Segment(c, l_main, 6.5 * s, 6 * s), "left", 1),
            Branch(Segment(r_main, inter, 5.5 * s, 5.2 * s), "right", 1),
        ]
        roots = {"RUL": (r_main, 5.0), "RML": (inter, 4.0), "RLL": (inter, 5.0)}
        roots |= {"LUL": (l_main, 5.0), "LLL": (l_main, 5.2)}
        rng = np.random.default_rng(self.subject.tree_seed)
        starts = np.array([roots[code][0] for code in LOBE_CODES])
        radii = np.array([roots[code][1] * s for code in LOBE_CODES])
        grown = self._hilum_tree(rng, starts, radii, 7)
        for br in grown:
            f = self.subject.airway_dilation.get(br.lobe, 1.0)
            if f != 1.0 and br.generation >= 3:
                # Dilated bronchi stop tapering, but stay inside their lobe.
                seg = br.segment
                ends = np.array([seg.a, seg.b])
                room = -self.inside_lobe(ends, np.full(2, LOBE_CODES.index(br.lobe))).max()
                r = max(seg.r0, min(max(seg.r0, seg.r1) * f, 0.7 * room))
                br = Branch(Segment(seg.a, seg.b, r, r), br.lobe, br.generation)
            branches.append(br)
        return branches

    def _vessel_trees(self) -> tuple[list[Branch], list[Branch]]:
        rng = np.random.default_rng(self.subject.tree_seed + 1)
        arteries: list[Branch] = []
        tips = []
        for br in self.airways:
            if br.generation < 2:
                continue
            seg = br.segment
            d = seg.b - seg.a
            off = np.cross(d, [0.0, 0.0, 1.0])
            if np.linalg.norm(off) < 1e-6:
                off = np.cross(d, [1.0, 0.0, 0.0])
            off /= np.linalg.norm(off)
            r_art = (
                seg.r0 / self.subject.airway_dilation.get(br.lobe, 1.0)
                if br.generation >= 3
                else seg.r0
            )
            shift = off * (seg.r0 + r_art + 1.0)
            arteries.append(
                Branch(
                    Segment(seg.a + shift, seg.b + shift, r_art, r_art * 0.9),
                    br.lobe,
                    br.generation,
                )
            )
            if br.generation == 7:
                tips.append(
                    (seg.b + shift, d / np.linalg.norm(d), r_art * 0.8, LOBE_CODES.index(br.lobe))
                )
        if tips:
            st, dr, rr, lb = (np.array(v) for v in zip(*tips, strict=True))
            arteries += self._grow(rng, st, dr, np.full(len(st), 8.0), rr, lb, 8, 8)
        s = self.subject.scale
        la = self.heart_center + np.array(
            [0.3 * self.heart_radii[0], -0.8 * self.heart_radii[1], 0.5 * self.heart_radii[2]]
        )
        sides = np.array([1.0 if code[0] == "R" else -1.0 for code in LOBE_CODES])
        starts = la + np.stack([sides * 30 * s, np.full(5, -5 * s), np.zeros(5)], axis=1)
        veins = self._hilum_tree(rng, starts, np.full(5, 6.5 * s), 7)
        return arteries, veins

    def _hilum_tree(self, rng, starts: np.ndarray, radii: np.ndarray, gen_max: int) -> list[Branch]:
        """One tree per lobe (LOBE_CODES order) from a hilar root aimed well into its lobe."""
        lobes = np.arange(len(LOBE_CODES))
        end, length = self._root_ends(starts, lobes, radii)
        direction = (end - starts) / length[:, None]
        return self._grow(
            rng, starts, direction, length, radii, lobes, 2, gen_max, accept_first=True
        )

    def _grow(
        self, rng, start, direction, length, radius, lobe, gen0: int, gen_max: int,
        accept_first: bool = False,
    ) -> list[Branch]:  # fmt: skip
        """Breadth-first branching: each generation is grown for all branches at once.

        Branches that would leave their lobe are shortened, then turned toward the lobe centre,
        then dropped; with ``accept_first`` the first generation (roots) is taken as given.
        """
        out: list[Branch] = []
        for gen in range(gen0, gen_max + 1):
            if len(start) == 0:
                break
            end = start + direction * length[:, None]
            if gen == gen0 and accept_first:
                ok = np.ones(len(start), dtype=bool)
            else:
                for attempt in range(4):
                    bad = self.inside_lobe(end, lobe) > -0.75 * radius
                    if not bad.any():
                        break
                    if attempt == 2:
                        centers = np.array([self.lobe_center(LOBE_CODES[i]) for i in lobe])
                        pull = centers - start
                        pull /= np.maximum(np.linalg.norm(pull, axis=1, keepdims=True), 1e-9)
                        direction = np.where(bad[:, None], pull, direction)
                    else:
                        length = np.where(bad, length * 0.6, length)
                    end = start + direction * length[:, None]
                ok = (self.inside_lobe(end, lobe) <= -0.5 * radius) & (length > 2.0)
            for a, b, r, lb in zip(start[ok], end[ok], radius[ok], lobe[ok], strict=True):
                out.append(Branch(Segment(a, b, float(r), float(r) * 0.92), LOBE_CODES[lb], gen))
            if gen == gen_max or not ok.any():
                break
            start, direction, length, radius, lobe = (
                end[ok],
                direction[ok],
                length[ok],
                radius[ok],
                lobe[ok],
            )
            n = len(start)
            perp = np.cross(direction, rng.normal(size=(n, 3)))
            perp /= np.maximum(np.linalg.norm(perp, axis=1, keepdims=True), 1e-9)
            centers = np.array([self.lobe_center(LOBE_CODES[i]) for i in lobe])
            pull = centers - start
            pull /= np.maximum(np.linalg.norm(pull, axis=1, keepdims=True), 1e-9)
            # Children reach about half-way to the lobe surface, so the tree fills its lobe.
            depth = np.clip(-self.inside_lobe(start, lobe), 0.0, None)
            reach = np.clip(0.5 * depth, 3.0, 40.0)
            children = []
            for sign, lo, hi, shrink in ((1, 18, 32, 0.84), (-1, 28, 48, 0.72)):
                ang = np.radians(rng.uniform(lo, hi, n))[:, None]
                d = np.cos(ang) * direction + np.sin(ang) * sign * perp + 0.25 * pull
                d /= np.linalg.norm(d, axis=1, keepdims=True)
                children.append((start, d, reach * rng.uniform(0.8, 1.1, n), radius * shrink, lobe))
            start, direction, length, radius, lobe = (
                np.concatenate(v) for v in zip(*children, strict=True)
            )
        return out

    def _root_ends(self, start, lobe, radius) -> tuple[np.ndarray, np.ndarray]:
        """First point on the way from each root to its lobe centre that is well inside the lobe."""
        centers = np.array([self.lobe_center(LOBE_CODES[i]) for i in lobe])
        ts = np.linspace(0.25, 1.0, 16)
        pts = start[:, None, :] + ts[None, :, None] * (centers - start)[:, None, :]
        d = self.inside_lobe(pts.reshape(-1, 3), np.repeat(lobe, len(ts))).reshape(len(start), -1)
        good = d <= -1.5 * radius[:, None]
        first = np.where(good.any(axis=1), np.argmax(good, axis=1), len(ts) - 1)
        end = pts[np.arange(len(start)), first]
        return end, np.linalg.norm(end - start, axis=1)

    # ----- rendering ------------------------------------------------------------------------
    def render(self, canvas: Canvas) -> None:
        """Paint the normal anatomy in order: body, abdomen, bones, lungs, mediastinum, trees."""
        grid = canvas.grid
        rng = np.random.default_rng(self.subject.texture_seed)
        self._paint_body(canvas)
        self._paint_bones(canvas)
        self._paint_lungs(canvas, rng)
        self._paint_mediastinum(canvas, rng)
        vessels = tubes_occupancy(grid, [b.segment for b in self.arteries + self.veins])
        if vessels is not None:
            box, occ = vessels
            free = ~np.isin(canvas.labels[box.slices], (8, 10))  # heart and bone displace trees
            canvas.paint(box, occ, HU["blood"], where=free)
            canvas.label(box, occ, 7, where=free)
        self._paint_airways(canvas)

    def _paint_airways(self, canvas: Canvas) -> None:
        grid = canvas.grid
        segs = [b.segment for b in self.airways]
        wall = 0.3 * self.subject.airway_wall_scale
        outer = tubes_occupancy(grid, segs)
        if outer is None:
            return
        walls = [Segment(g.a, g.b, g.r0 * (1 + wall) + 0.4, g.r1 * (1 + wall) + 0.4) for g in segs]
        wbox, wocc = tubes_occupancy(grid, walls)
        canvas.paint(wbox, wocc, HU["soft"], where=~np.isin(canvas.labels[wbox.slices], (8, 10)))
        box, occ = outer
        free = ~np.isin(canvas.labels[box.slices], (8, 10))  # heart and bone displace airways
        canvas.paint(box, occ, -1000.0, where=free)
        canvas.label(box, occ, 6, where=free)

    def _paint_body(self, canvas: Canvas) -> None:
        grid, h = canvas.grid, canvas.grid.h
        full = grid.full()
        x, y = full.x, full.y
        sj = self.subject
        canvas.paint(full, occupancy(superellipse(x, y, (0, 0), self.a, self.b, 2.4), h), HU["fat"])
        inner_a, inner_b = self.a - sj.fat_mm, self.b - sj.fat_mm
        canvas.paint(
            full, occupancy(superellipse(x, y, (0, 0), inner_a, inner_b, 2.3), h), HU["muscle"]
        )
        cav = occupancy(self.cavity_sdf(x, y), h)
        canvas.paint(full, cav, HU["mediastinal_fat"])
        zmax = max(self.dome_top.values()) + 2 * h
        box = grid.box((-self.a, -self.b, -1e4), (self.a, self.b, zmax))
        if box is None:
            return
        below = occupancy(
            np.maximum(self.cavity_sdf(box.x, box.y), box.z - self.diaphragm_z(box.x, box.y)), h
        )
        canvas.paint(box, below, HU["liver"])
        s = sj.scale
        stomach_c = (-0.5 * self.a_cav, 0.1 * self.b_cav, self.dome_top["left"] - 45 * s)
        st = ellipsoid(box.x, box.y, box.z, stomach_c, (40 * s, 45 * s, 35 * s))
        canvas.paint(box, occupancy(st, h), HU["soft"])
        air = np.maximum(st + 6.0, stomach_c[1] + 10 * s - box.y)
        canvas.paint(box, occupancy(air, h), -1000.0)

    def _paint_bones(self, canvas: Canvas) -> None:
        grid, h = canvas.grid, canvas.grid.h
        s, sj = self.subject.scale, self.subject
        full = grid.full()
        x, y, z = full.x, full.y, full.z
        # Ribs: a ring just outside the cavity, 12 per side, sloping down anteriorly.
        ring = superellipse(x, y, (0, 0), self.a_cav + 6 * s, self.b_cav + 6 * s, 2.3)
        phi = np.arctan2(y, np.abs(x))
        pitch, drop = 25.0 * s, 45.0 * s
        z0 = self.z_apex - 5 * s + sj.rib_phase
        rel = z0 - z - drop * (phi + np.pi / 2) / np.pi
        k = np.clip(np.round(rel / pitch), 0, 11)
        dz = rel - k * pitch
        e = np.sqrt((ring / (3.5 * s)) ** 2 + (dz / (4.5 * s)) ** 2)
        rib = (e - 1.0) * 3.5 * s
        cartilage = phi > np.radians(62)
        canvas.paint(full, occupancy(rib, h), np.where(cartilage, HU["cartilage"], HU["cortical"]))
        canvas.paint(
            full, occupancy(rib + 1.6, h), np.where(cartilage, HU["cartilage"], HU["cancellous"])
        )
        canvas.label(full, occupancy(rib, h), 10, where=~cartilage)
        # Sternum.
        ys = self.b_cav + 7 * s
        box = grid.box((-20 * s, ys - 8 * s, -95 * s), (20 * s, ys + 8 * s, 95 * s))
        if box is not None:
            d = np.maximum(
                np.maximum(np.abs(box.x) - 14 * s, np.abs(box.y - ys) - 5.5 * s),
                np.abs(box.z) - 90 * s,
            )
            canvas.paint(box, occupancy(d, h), HU["cortical"])
            canvas.paint(box, occupancy(d + 1.6, h), HU["cancellous"])
            canvas.label(box, occupancy(d, h), 10)
        # Spine: vertebral bodies with discs, canal and posterior arch.
        r, yv = self.spine_r, self.y_spine
        box = grid.box((-40 * s, yv - 65 * s, -1e4), (40 * s, yv + r + 4, 1e4))
        if box is None:
            return
        bx, by, bz = box.x, box.y, box.z
        period = 27.0 * s
        phase = np.mod(bz - sj.rib_phase, period)
        disc = phase < 5.0 * s
        body = np.sqrt(bx * bx + (by - yv) ** 2) - r
        canal_c = yv - r - 9 * s
        arch = np.abs(np.sqrt(bx * bx + (by - canal_c) ** 2) - 12 * s) - 4 * s
        spinous = np.maximum(np.abs(bx) - 4 * s, np.abs(by - (canal_c - 25 * s)) - 14 * s)
        bone = np.minimum(body, np.minimum(arch, spinous))
        bone = np.where(disc, np.minimum(arch, spinous), bone)
        canvas.paint(box, occupancy(body, h), np.where(disc, HU["disc"], HU["cortical"]))
        canvas.paint(box, occupancy(body + 1.6, h), np.where(disc, HU["disc"], HU["cancellous"]))
        canvas.paint(box, occupancy(np.minimum(arch, spinous), h), 600.0)
        canal = np.sqrt(bx * bx + (by - canal_c) ** 2) - 8 * s
        canvas.paint(box, occupancy(canal, h), HU["csf"])
        canvas.label(box, occupancy(bone, h), 10)

    def _paint_lungs(self, canvas: Canvas, rng: np.random.Generator) -> None:
        grid, h = canvas.grid, canvas.grid.h
        for side in SIDES:
            sign = 1 if side == "right" else -1
            lo = (min(0, sign * self.a_cav), -self.b_cav, -200.0)
            hi = (max(0, sign * self.a_cav), self.b_cav, self.z_apex + 2)
            box = grid.box(lo, hi)
            if box is None:
                continue
            sdf = self.lung_sdf(side, box.x, box.y, box.z)
            for seg in [
                *polyline(self.aorta_path, self.aorta_radii),
                *self.pa_segments,
                self.svc,
                *self.esophagus,
            ]:
                self._carve(box, sdf, seg, 3.0)
            for br in self.airways[:4]:
                self._carve(box, sdf, br.segment, 2.0)
            occ = occupancy(sdf, h)
            gradient = 45.0 * np.clip((-box.y + self.b_cav) / (2 * self.b_cav), 0, 1)
            texture = 10.0 * smooth_noise(rng, box, 9.0)
            canvas.paint(box, occ, self.subject.lung_hu + gradient + texture)
            lobes = np.broadcast_to(self.lobe_index(side, box.x, box.y, box.z) + 1, occ.shape)
            inside = occ >= 0.5
            canvas.labels[box.slices][inside] = lobes[inside]
            # Fissures: thin sheets of slightly denser tissue.
            dz = box.z - self.oblique_z(side, box.y)
            sheets = [np.abs(dz) * 0.76 - 0.5]
            if side == "right":
                sheets.append(np.where(dz > 0, np.abs(box.z - self.horizontal_z()) - 0.5, 1e3))
            for sheet in sheets:
                fade = min(1.0, 1.0 / h)
                canvas.paint(box, occupancy(sheet, h) * fade, HU["fissure"], where=occ >= 0.99)
            self.lung_box[side] = box
            self.lung_sdf_grid[side] = sdf
            self.lung_occ[side] = occ

    @staticmethod
    def _carve(box: Box, sdf: np.ndarray, seg: Segment, margin: float) -> None:
        """Remove a tube (plus margin) from a lung's SDF, inside the tube's own bounds."""
        sub = box.grid.box(*seg.bounds(margin + 2 * box.grid.h))
        if sub is None:
            return
        sl = []
        for a, b in zip(sub.slices, box.slices, strict=True):
            lo, hi = max(a.start, b.start), min(a.stop, b.stop)
            if hi <= lo:
                return
            sl.append((lo, hi))
        inner = Box(box.grid, tuple(slice(lo, hi) for lo, hi in sl))
        local = tuple(
            slice(lo - b.start, hi - b.start) for (lo, hi), b in zip(sl, box.slices, strict=True)
        )
        np.maximum(sdf[local], -(seg.sdf(inner.x, inner.y, inner.z) - margin), out=sdf[local])

    def _paint_mediastinum(self, canvas: Canvas, rng: np.random.Generator) -> None:
        grid, h = canvas.grid, canvas.grid.h
        s = self.subject.scale
        hc, hr = self.heart_center, self.heart_radii
        pad = hr.max() + 8 + self.fluid_mm
        box = grid.box(hc - pad, hc + pad)
        if box is not None:
            # The heart stays inside the chest cavity, however large it grows.
            heart = np.maximum(
                ellipsoid(box.x, box.y, box.z, hc, hr, self.heart_rot),
                self.cavity_sdf(box.x, box.y) + 6.0,
            )
            soft = canvas.labels[box.slices] != 10  # nor does it press into the spine
            canvas.paint(
                box,
                occupancy(heart - 3.5 - self.fluid_mm, h),
                HU["mediastinal_fat"] + 10,
                where=soft,
            )
            if self.fluid_mm > 0:
                canvas.paint(box, occupancy(heart - self.fluid_mm, h), HU["fluid"], where=soft)
            occ = occupancy(heart, h)
            canvas.paint(box, occ, HU["myocardium"], where=soft)
            chambers = ellipsoid(box.x, box.y, box.z, hc, hr * 0.7, self.heart_rot)
            canvas.paint(box, occupancy(chambers, h), HU["blood"] - 5, where=soft)
            canvas.label(box, occ, 8, where=soft)
        for segs, value, label in (
            (polyline(self.aorta_path, self.aorta_radii), HU["blood"], 9),
            ([*self.pa_segments, self.svc], HU["blood"], 7),
            (self.esophagus, HU["soft"], 11),
        ):
            box, occ = tubes_occupancy(grid, segs)
            canvas.paint(box, occ, value)
            canvas.label(box, occ, label)
        # A few normal (sub-centimetre) mediastinal lymph nodes.
        for c in (
            (16 * s, self.y_trachea + 12 * s, self.z_carina + 30 * s),
            (0, self.y_trachea - 14 * s, self.z_carina - 12 * s),
        ):
            box = grid.box(np.array(c) - 10, np.array(c) + 10)
            if box is not None:
                r = rng.uniform(2.5, 4.0)
                canvas.paint(
                    box,
                    occupancy(ellipsoid(box.x, box.y, box.z, c, (r, r, r * 1.3)), h),
                    HU["soft"],
                )
