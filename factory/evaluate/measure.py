"""Physical measurements that need no network (MedSyn-style), and the paired test behind
prompt-pair experiments.

Volumes are HU arrays in RAS+ voxel order (x: right to left, y: posterior to anterior, z:
inferior to superior) on one grid. Measuring zones come from anatomy label maps of a reference
set (``zones``): fixed zones measure every volume in the same place, whatever anatomy a model
drew, so a generated cohort and its reference are compared like for like.

- pleural effusion volume (mL): fluid-density voxels in the lung zone;
- %LAA-950 (emphysema): the share of aerated lung-zone voxels below -950 HU;
- Perc15 (emphysema): the lung zone's 15th HU percentile;
- cardiothoracic ratio (cardiomegaly): the widest transverse extent of the heart over the widest
  extent of the chest (lungs and heart), from a volume's own anatomy masks;
- dense fractions of the zones and the lung zone's Perc15 (the demo card's yardstick).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage, stats

from factory.anatomy import MASK_LABELS, channels_from_labels

DENSE_HU = -300.0  # fluid, consolidation and heart are denser; aerated lung is not
LAA_HU = -950.0  # %LAA-950, the usual CT emphysema index
# Perc15: the HU below which 15% of the lung lies, the densitometry index of emphysema trials.
# Unlike %LAA-950 it has no threshold, so it still sees emphysema that blurring (partial volume,
# thick slices, a VAE's latent grid) has lifted just above -950 HU.
PERC15 = 15.0
AERATED_HU = -400.0  # lung-zone voxels below this are aerated lung
FLUID_HU = (-100.0, 100.0)  # pleural fluid (about 0-20 HU), blurred edges included
# Heart zone: the majority heart dilated by this many voxels, kept inside the thoracic cavity.
# At 2 voxels a severe cardiomegaly phantom fills the zone (fraction 1.0); at 4 the normal
# (0.61-0.70), mild (0.71-0.90) and severe (0.82-0.97) phantoms stay apart.
HEART_DILATION = 4

MEASURES: dict[str, str] = {
    "effusion_ml": "pleural effusion volume (mL): voxels of -100..100 HU in the lung zone",
    "laa950_pct": "%LAA-950: aerated lung-zone voxels (< -400 HU) below -950 HU, in percent",
    "lung_perc15": "Perc15 (HU): the HU below which 15% of the lung zone lies",
    "ctr": "cardiothoracic ratio: widest heart / widest chest (lungs + heart) on axial slices",
    "lung_dense": "fraction of the lung zone denser than -300 HU",
    "heart_dense": "fraction of the heart zone denser than -300 HU",
}
# The measures that should move with each finding, and which way.
FINDING_MEASURES: dict[str, tuple[tuple[str, int], ...]] = {
    "Pleural effusion": (("effusion_ml", +1),),
    "Emphysema": (("laa950_pct", +1), ("lung_perc15", -1)),
    "Cardiomegaly": (("ctr", +1),),
    "Consolidation": (("lung_dense", +1),),
}


def row_id(finding: str, index: int, key: str) -> str:
    """How results name a finding's ``index``-th measure: its first by the finding (the name
    results had when each finding had one), the others by ``finding/key``."""
    return finding if index == 0 else f"{finding}/{key}"


def row_finding(row: str) -> str:
    """The finding a ``row_id`` belongs to."""
    return row.split("/")[0]


def finding_rows() -> list[tuple[str, str, str, int]]:
    """(row id, finding column, measure, sign) for every measure of ``FINDING_MEASURES``."""
    return [
        (row_id(column, i, key), column, key, sign)
        for column, measures in FINDING_MEASURES.items()
        for i, (key, sign) in enumerate(measures)
    ]


def zones(
    label_maps: Iterable[np.ndarray],
    legend: Mapping[int, str] = MASK_LABELS,
    heart_dilation: int = HEART_DILATION,
) -> dict:
    """Fixed measuring zones from anatomy label maps (same grid, read through ``legend``, the
    phantom's by default): see ``zones_from``."""
    pair = ("lungs", "heart")
    return zones_from(
        (
            dict(zip(pair, channels_from_labels(labels, legend, pair), strict=True))
            for labels in label_maps
        ),
        heart_dilation,
    )


def zones_from(
    anatomy: Iterable[Mapping[str, np.ndarray]], heart_dilation: int = HEART_DILATION
) -> dict:
    """Fixed measuring zones from ``lungs`` and ``heart`` masks of reference volumes.

    ``lungs``: voxels inside the lungs in at least half of the volumes. ``heart``: voxels that
    are heart in at least half, dilated by ``heart_dilation`` voxels and kept inside the
    thoracic cavity (lung zone or heart), so a growing heart shows as lung turning dense.
    """
    lung_count = heart_count = None
    n = 0
    for masks in anatomy:
        lung, heart = np.asarray(masks["lungs"], bool), np.asarray(masks["heart"], bool)
        if lung_count is None:
            lung_count = np.zeros(lung.shape, np.int32)
            heart_count = np.zeros(lung.shape, np.int32)
        elif lung.shape != lung_count.shape:
            raise ValueError(f"masks differ in shape: {lung.shape} vs {lung_count.shape}")
        lung_count += lung
        heart_count += heart
        n += 1
    if n == 0 or lung_count is None or heart_count is None:
        raise ValueError("no anatomy masks to build zones from")
    lungs = 2 * lung_count >= n
    heart = 2 * heart_count >= n
    grown = ndimage.binary_dilation(heart, iterations=heart_dilation) if heart_dilation else heart
    return {"lungs": lungs, "heart": grown & (lungs | heart)}


def zone_fraction(hu: np.ndarray, zone: np.ndarray, threshold: float, above: bool) -> float:
    """The fraction of ``zone`` voxels above (or below) ``threshold`` HU; NaN for an empty zone."""
    values = np.asarray(hu)[zone]
    if values.size == 0:
        return float("nan")
    hit = values > threshold if above else values < threshold
    return float(np.count_nonzero(hit)) / values.size


def zone_percentile(hu: np.ndarray, zone: np.ndarray, q: float) -> float:
    """The ``q``-th percentile of the ``zone`` voxels' HU (Perc15 for q = 15); NaN if empty."""
    values = np.asarray(hu)[zone]
    if values.size == 0:
        return float("nan")
    return float(np.percentile(values, q))


def effusion_ml(hu: np.ndarray, lung_zone: np.ndarray, spacing_mm: Sequence[float]) -> float:
    """Millilitres of fluid-density voxels in the lung zone (where an effusion displaces lung)."""
    values = np.asarray(hu)[lung_zone]
    fluid = np.count_nonzero((values >= FLUID_HU[0]) & (values <= FLUID_HU[1]))
    return float(fluid) * float(np.prod(spacing_mm)) / 1000.0


def laa950_pct(hu: np.ndarray, lungs: np.ndarray) -> float:
    """%LAA-950: the share of lung voxels below -950 HU, in percent; NaN without lung."""
    values = np.asarray(hu)[lungs]
    if values.size == 0:
        return float("nan")
    return 100.0 * float(np.count_nonzero(values < LAA_HU)) / values.size


def widest(mask: np.ndarray) -> int:
    """The largest left-right (x) extent, in voxels, of ``mask`` on any axial (z) slice."""
    cols = np.asarray(mask, bool).any(axis=1)  # (x, z)
    if not cols.any():
        return 0
    first = np.argmax(cols, axis=0)
    last = cols.shape[0] - 1 - np.argmax(cols[::-1], axis=0)
    return int(np.where(cols.any(axis=0), last - first + 1, 0).max())


def cardiothoracic_ratio(lungs: np.ndarray, heart: np.ndarray) -> float:
    """Widest transverse heart extent over the widest extent of lungs and heart together, from
    a volume's own masks (generated anatomy channels or a dataset's masks); NaN without a heart."""
    heart = np.asarray(heart, bool)
    heart_width, chest_width = widest(heart), widest(np.asarray(lungs, bool) | heart)
    if heart_width == 0 or chest_width == 0:
        return float("nan")
    return heart_width / chest_width


def measure_volume(
    hu: np.ndarray,
    zone_masks: Mapping[str, np.ndarray],
    spacing_mm: Sequence[float],
    anatomy: Mapping[str, np.ndarray] | None = None,
) -> dict[str, float]:
    """Every measure of ``MEASURES`` for one volume; ``anatomy`` (its own ``lungs`` and
    ``heart`` masks) is needed for the cardiothoracic ratio, which is NaN without it."""
    hu = np.asarray(hu)
    if hu.shape != zone_masks["lungs"].shape:
        raise ValueError(
            f"volume of shape {hu.shape} does not match the measuring zones "
            f"{zone_masks['lungs'].shape}; resample it to the reference grid first"
        )
    own = anatomy or {}
    ctr = (
        cardiothoracic_ratio(own["lungs"], own["heart"])
        if "lungs" in own and "heart" in own
        else float("nan")
    )
    return {
        "effusion_ml": effusion_ml(hu, zone_masks["lungs"], spacing_mm),
        "laa950_pct": laa950_pct(hu, zone_masks["lungs"] & (hu < AERATED_HU)),
        "lung_perc15": zone_percentile(hu, zone_masks["lungs"], PERC15),
        "ctr": ctr,
        "lung_dense": zone_fraction(hu, zone_masks["lungs"], DENSE_HU, True),
        "heart_dense": zone_fraction(hu, zone_masks["heart"], DENSE_HU, True),
    }


def paired_stats(with_values: Sequence[float], without_values: Sequence[float]) -> dict:
    """Means, the mean paired difference and the paired t-test p-value (None if undefined).

    The p-value needs at least two pairs and differences that are not all (nearly) equal.
    """
    a = np.asarray(with_values, dtype=float)
    b = np.asarray(without_values, dtype=float)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired values need equal, non-zero lengths ({a.size} and {b.size})")
    d = a - b
    p = None
    if a.size >= 2 and np.ptp(d) > 1e-9 * max(1.0, float(np.abs(d).max())):
        p = float(stats.ttest_rel(a, b).pvalue)
        p = p if math.isfinite(p) else None
    return {
        "with": float(a.mean()),
        "without": float(b.mean()),
        "difference": float(d.mean()),
        "p_value": p,
    }


def quartiles(volumes: Iterable[np.ndarray]) -> tuple[float, float, float]:
    """HU quartiles (25, 50, 75 %) over every voxel of ``volumes``."""
    values = np.concatenate([np.asarray(v).ravel() for v in volumes])
    q = np.percentile(values, [25, 50, 75])
    return float(q[0]), float(q[1]), float(q[2])
