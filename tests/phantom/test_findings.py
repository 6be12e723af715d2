"""Each finding changes HU where it belongs, in its range, and leaves the rest alone."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from factory import vocab
from factory.phantom.dataset import default_grid
from factory.phantom.render import render_phantom

GRID = default_grid((64, 64, 64), None)
SEED, SEX, AGE = 3, "M", 60
LUNGS = (1, 2, 3, 4, 5, 7)
RIGHT, LEFT = (1, 2, 3), (4, 5)
CHANGED_HU = 25


def render(findings: dict[str, dict]):
    full = {
        fid: vocab.complete_attributes(fid, a, np.random.default_rng(0))
        for fid, a in findings.items()
    }
    return render_phantom(GRID, full, SEX, AGE, SEED)


@pytest.fixture(scope="module")
def normal():
    return render({})


def region(mask: np.ndarray, labels, grow_mm: float) -> np.ndarray:
    """Voxels within ``grow_mm`` (Euclidean, in mm) of any of ``labels`` (or of a bool mask)."""
    inside = np.isin(mask, labels) if labels is not None else mask
    return ndimage.distance_transform_edt(~inside, sampling=GRID.spacing) <= grow_mm


def balls(centers_radii, grow_vox: float = 2.0) -> np.ndarray:
    idx = np.indices(GRID.shape).reshape(3, -1).T
    world = idx * np.asarray(GRID.spacing) + GRID.origin
    out = np.zeros(len(world), dtype=bool)
    for center, r in centers_radii:
        out |= np.linalg.norm(world - np.asarray(center), axis=1) <= r + grow_vox * GRID.h
    return out.reshape(GRID.shape)


# finding -> (attributes, allowed region builder, check on the changed voxels' HU)
CASES = {
    "medical_material": (
        {"device": "pacemaker"},
        lambda n, t: region((n.image > -500) | (n.mask > 0), None, 8),
        lambda hu: hu.max() > 1000,
    ),
    "arterial_wall_calcification": (
        {"severity": "severe"},
        lambda n, t: region(n.mask, (8, 9), 14),
        lambda hu: hu.max() > 150,
    ),
    "cardiomegaly": (
        {"severity": "severe"},
        lambda n, t: region(n.mask, (8,), 40) | region(n.mask, LUNGS, 6),
        lambda hu: True,
    ),
    "pericardial_effusion": (
        {"severity": "large"},
        lambda n, t: region(n.mask, (8,), 36),
        lambda hu: -100 < np.median(hu) < 80,
    ),
    "coronary_artery_wall_calcification": (
        {"severity": "severe"},
        lambda n, t: region(n.mask, (8,), 12),
        lambda hu: hu.max() > 150,
    ),
    "hiatal_hernia": (
        {"size_mm": 50},
        lambda n, t: balls([(t["center_mm"], t["diameter_mm"] / 2)]),
        lambda hu: hu.min() < -300,
    ),
    "lymphadenopathy": (
        {"station": "subcarinal", "size_mm": 25, "count": 2},
        lambda n, t: balls([(x["center_mm"], x["short_axis_mm"] * 0.7) for x in t["nodes"]]),
        lambda hu: -50 < np.median(hu) < 100,
    ),
    "emphysema": (
        {"severity": "severe", "type": "centrilobular"},
        lambda n, t: region(n.mask, LUNGS, 6),
        lambda hu: np.median(hu) < -930,
    ),
    "atelectasis": (
        {"laterality": "right", "severity": "severe"},
        lambda n, t: region(n.mask, RIGHT, 6),
        lambda hu: np.median(hu) > -400,
    ),
    "lung_nodule": (
        {"size_mm": 20, "lobe": "RUL", "count": 1},
        lambda n, t: region(n.mask, RIGHT, 6),
        lambda hu: hu.max() > -150,
    ),
    "lung_opacity": (
        {"laterality": "left", "severity": "severe"},
        lambda n, t: region(n.mask, LEFT, 6),
        lambda hu: -780 < np.median(hu) < -300,
    ),
    "pulmonary_fibrotic_sequela": (
        {"laterality": "bilateral"},
        lambda n, t: region(n.mask, LUNGS, 6),
        lambda hu: hu.max() > -600,
    ),
    "pleural_effusion": (
        {"laterality": "left", "severity": "large"},
        lambda n, t: region(n.mask, LEFT, 6),
        lambda hu: -60 < np.median(hu) < 60,
    ),
    "mosaic_attenuation_pattern": (
        {"severity": "severe"},
        lambda n, t: region(n.mask, LUNGS, 6),
        lambda hu: True,
    ),
    "peribronchial_thickening": (
        {"severity": "severe"},
        lambda n, t: region(n.mask, (*LUNGS, 6), 20),
        lambda hu: True,
    ),
    "consolidation": (
        {"lobe": "LLL"},
        lambda n, t: region(n.mask, (5, 7), 6),
        lambda hu: np.median(hu) > -250,
    ),
    "bronchiectasis": (
        {"laterality": "bilateral", "severity": "severe"},
        lambda n, t: region(n.mask, (*LUNGS, 6), 8),
        lambda hu: True,
    ),
    "interlobular_septal_thickening": (
        {"severity": "severe"},
        lambda n, t: region(n.mask, LUNGS, 6),
        lambda hu: np.median(hu) > -850,
    ),
}


def test_cases_cover_all_18_findings():
    assert sorted(CASES) == sorted(vocab.FINDING_IDS)


@pytest.mark.parametrize("fid", vocab.FINDING_IDS)
def test_finding_changes_its_region_only(fid, normal):
    attrs, allowed_fn, hu_ok = CASES[fid]
    sick = render({fid: attrs})
    diff = sick.image.astype(np.int32) - normal.image
    changed = np.abs(diff) > CHANGED_HU
    assert changed.sum() >= 3, f"{fid} is not visible at 64^3"
    allowed = allowed_fn(normal, sick.truth["findings"][fid])
    stray = changed & ~allowed
    assert stray.sum() <= 0.01 * changed.sum(), (
        f"{fid} changed {stray.sum()} voxels outside its region"
    )
    assert hu_ok(sick.image[changed].astype(float)), f"{fid} HU out of range"
    if fid != "medical_material":  # wires may sit on the sternum; nothing else touches bone
        assert not (changed & (normal.mask == 10)).any()


def test_laterality_left_right_bilateral(normal):
    x = GRID.axis(0)[:, None, None]
    for side in ("left", "right"):
        sick = render({"pleural_effusion": {"laterality": side, "severity": "moderate"}})
        changed = np.abs(sick.image.astype(int) - normal.image) > CHANGED_HU
        on_right = (changed & (x > 0)).sum()
        on_left = (changed & (x < 0)).sum()
        assert (
            (on_left > 20 * max(on_right, 1))
            if side == "left"
            else (on_right > 20 * max(on_left, 1))
        )
    both = render({"pleural_effusion": {"laterality": "bilateral", "severity": "moderate"}})
    changed = np.abs(both.image.astype(int) - normal.image) > CHANGED_HU
    assert (changed & (x > 0)).sum() > 50 and (changed & (x < 0)).sum() > 50


def test_severity_orders_effusion_volume():
    volumes = []
    for severity in ("small", "moderate", "large"):
        truth = render({"pleural_effusion": {"laterality": "right", "severity": severity}}).truth
        volumes.append(truth["findings"]["pleural_effusion"]["right"]["volume_ml"])
    assert volumes[0] < volumes[1] < volumes[2]
    assert 100 < volumes[0] < 300 and volumes[2] > 800


def test_nodule_sits_in_its_lobe_with_its_size(normal):
    for lobe, label in (("RML", 2), ("LLL", 5)):
        truth = render({"lung_nodule": {"size_mm": 18, "lobe": lobe, "count": 1}}).truth
        nodule = truth["findings"]["lung_nodule"]["nodules"][0]
        v = np.rint(GRID.to_voxel(np.array(nodule["center_mm"]))).astype(int)
        assert normal.mask[tuple(v)] == label
        assert nodule["diameter_mm"] == 18


def test_cardiomegaly_raises_the_cardiothoracic_ratio(normal):
    assert normal.truth["measurements"]["cardiothoracic_ratio"] < 0.5
    sick = render({"cardiomegaly": {"severity": "moderate"}})
    assert sick.truth["measurements"]["cardiothoracic_ratio"] > 0.53
    assert (sick.mask == 8).sum() > 1.3 * (normal.mask == 8).sum()


def test_emphysema_is_below_minus_950(normal):
    assert normal.truth["measurements"]["laa950_percent"] < 0.5
    mild = render({"emphysema": {"severity": "mild"}}).truth["measurements"]["laa950_percent"]
    severe = render({"emphysema": {"severity": "severe"}}).truth["measurements"]["laa950_percent"]
    assert 2 < mild < severe


def test_bronchiectasis_dilates_lower_lobe_airways(normal):
    sick = render({"bronchiectasis": {"laterality": "left", "severity": "severe"}})
    assert (sick.mask == 6).sum() > (normal.mask == 6).sum()


def test_masks_agree_with_the_image(normal):
    lung = np.isin(normal.mask, (1, 2, 3, 4, 5))
    assert lung.sum() > 1000
    assert np.median(normal.image[lung]) < -750
    assert np.median(normal.image[normal.mask == 10]) > 150  # bone
    assert -20 < np.median(normal.image[normal.mask == 8]) < 80  # heart
    assert np.median(normal.image[normal.mask == 6]) < -500  # airway lumen
    for label in range(1, 12):
        assert (normal.mask == label).any(), f"label {label} missing"
