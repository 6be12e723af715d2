"""Evaluation pieces without Ray: AUC and factual correctness, FID and MMD, physical measurements
on phantoms rendered with and without findings (where the truth is known)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from factory import vocab
from factory.anatomy import ANATOMY_GROUPS
from factory.evaluate import measure, metrics
from factory.geometry import Grid
from factory.phantom.render import render_phantom

GRID = Grid((64, 64, 64), (5.9375, 5.9375, 5.0))  # the tiny model's grid
FINDINGS = {
    "pleural_effusion": {"laterality": "bilateral", "severity": "large"},
    "emphysema": {"severity": "severe", "type": "centrilobular"},
    "cardiomegaly": {"severity": "severe"},
    "consolidation": {"lobe": "RLL"},
}


def test_auc_is_the_rank_statistic():
    assert metrics.auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert metrics.auc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert metrics.auc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5  # ties count half
    assert metrics.auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert math.isnan(metrics.auc([0.1, 0.2], [1, 1]))
    assert metrics.precision([0.9, 0.7, 0.2], [1, 0, 1]) == 0.5


def test_factual_correctness_per_finding_and_macro():
    labels = np.array([[1, 0, 1], [0, 0, 1], [1, 0, 0], [0, 0, 0]])
    probs = np.array([[0.9, 0.1, 0.2], [0.2, 0.3, 0.6], [0.8, 0.2, 0.7], [0.1, 0.9, 0.1]])
    out = metrics.factual_correctness(probs, labels, ["a", "b", "c"])
    assert out["per_finding"]["a"]["auc"] == 1.0
    assert math.isnan(out["per_finding"]["b"]["auc"])  # no positives: left out of the macro
    assert out["per_finding"]["c"]["auc"] == 0.5  # 0.2 and 0.6 each beat one of 0.7 and 0.1
    assert out["macro_auc"] == pytest.approx(0.75) and out["findings_scored"] == 2
    with pytest.raises(ValueError, match=r"\(volumes, 2 findings\)"):
        metrics.factual_correctness(probs, labels, ["a", "b"])


def test_fid_and_mmd_are_zero_for_identical_sets_and_grow_with_a_shift():
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(200, 8, generator=gen)
    near, far = real + 0.5, real + 1.0
    assert metrics.fid(real, real) == pytest.approx(0.0, abs=1e-6)
    assert 0 < metrics.fid(near, real) < metrics.fid(far, real)
    # The linear-kernel MMD is an unbiased estimate of |mean difference|^2 (8 x 0.25 = 2 for
    # the near shift): about zero for identical sets, never exactly.
    assert abs(metrics.mmd(real, real)) < 0.1 * metrics.mmd(near, real)
    assert metrics.mmd(near, real) == pytest.approx(2.0, rel=0.15)
    assert metrics.mmd(near, real) < metrics.mmd(far, real)
    with pytest.raises(ValueError, match="generated features must be"):
        metrics.fid(torch.zeros(1, 8), real)


def test_plane_features_average_slabs_of_each_plane():
    maps = torch.arange(2 * 3 * 4 * 5 * 6, dtype=torch.float64).reshape(2, 3, 4, 5, 6)
    planes = metrics.plane_features(maps)
    assert planes["axial"].shape == (2 * 6, 3)
    assert planes["coronal"].shape == (2 * 5, 3)
    assert planes["sagittal"].shape == (2 * 4, 3)
    torch.testing.assert_close(planes["axial"][0], maps[0, :, :, :, 0].mean(dim=(1, 2)))
    both = metrics.distances(planes, planes)
    assert both["fid_2_5d"] == pytest.approx(0.0, abs=1e-6)
    assert set(both) >= {"fid_axial", "mmd_coronal", "fid_sagittal"}


@pytest.fixture(scope="module")
def phantoms():
    """Four subjects rendered without findings and with each of four large findings."""
    base, findings = [], {f: [] for f in FINDINGS}
    for i in range(4):
        sex, seed = "MF"[i % 2], [5, i]
        base.append(render_phantom(GRID, {}, sex, 60, np.random.SeedSequence(seed)))
        for fid, attrs in FINDINGS.items():
            full = vocab.complete_attributes(fid, attrs, np.random.default_rng(i))
            p = render_phantom(GRID, {fid: full}, sex, 60, np.random.SeedSequence(seed))
            findings[fid].append(p)
    return base, findings


def _own(p):
    return {g: np.isin(p.mask, ANATOMY_GROUPS[g]) for g in ("lungs", "heart")}


def test_measurements_move_with_their_findings(phantoms):
    base, findings = phantoms
    zones = measure.zones(p.mask for p in base)
    without = [measure.measure_volume(p.image, zones, GRID.spacing, _own(p)) for p in base]
    rows = measure.finding_rows()
    assert ("Emphysema/lung_perc15", "Emphysema", "lung_perc15", -1) in rows
    for _row, column, key, sign in rows:
        fid = vocab.resolve(column)
        with_ = [
            measure.measure_volume(p.image, zones, GRID.spacing, _own(p)) for p in findings[fid]
        ]
        result = measure.paired_stats([m[key] for m in with_], [m[key] for m in without])
        assert sign * result["difference"] > 0, (column, result)
        assert result["p_value"] is not None and result["p_value"] < 0.05, (column, result)
    # Without its own heart mask the cardiothoracic ratio is not measured.
    assert math.isnan(measure.measure_volume(base[0].image, zones, GRID.spacing)["ctr"])


def test_measurements_agree_with_the_phantom_truth(phantoms):
    base, findings = phantoms
    zones = measure.zones(p.mask for p in base)
    for p in findings["cardiomegaly"] + base:
        own = _own(p)
        ctr = measure.measure_volume(p.image, zones, GRID.spacing, own)["ctr"]
        assert ctr == pytest.approx(p.truth["measurements"]["cardiothoracic_ratio"], abs=1e-3)
    # The effusion the phantom painted (its truth, mL) against what the index adds over the
    # same subject without it: the zone is fixed, so part of a displaced lung lies outside it.
    for with_, without in zip(findings["pleural_effusion"], base, strict=True):
        painted = sum(
            v["volume_ml"]
            for k, v in with_.truth["findings"]["pleural_effusion"].items()
            if k in ("left", "right")
        )
        added = measure.effusion_ml(with_.image, zones["lungs"], GRID.spacing) - (
            measure.effusion_ml(without.image, zones["lungs"], GRID.spacing)
        )
        assert 0.5 * painted < added < 1.2 * painted, (painted, added)


def test_measuring_another_grid_is_refused(phantoms):
    base, _ = phantoms
    zones = measure.zones(p.mask for p in base)
    with pytest.raises(ValueError, match="resample it to the reference grid"):
        measure.measure_volume(np.zeros((32, 32, 32)), zones, GRID.spacing)


def test_zones_take_the_majority_and_grow_the_heart_inside_the_chest():
    shape = (9, 9, 9)
    maps = [np.zeros(shape, np.uint8) for _ in range(3)]
    for m in maps:
        m[2:7, 2:7, 2:7] = 3  # a lobe in every map
        m[4, 4, 4] = 8  # the heart in every map
    maps[0][0, 0, 0] = 1  # lung in 1 of 3: out
    maps[0][8, 8, 8] = maps[1][8, 8, 8] = 5  # lung in 2 of 3: in
    z = measure.zones(maps, heart_dilation=1)
    assert z["lungs"][8, 8, 8] and not z["lungs"][0, 0, 0]
    assert int(z["lungs"].sum()) == 5**3 - 1 + 1  # the lobe less the heart voxel, plus (8,8,8)
    assert int(z["heart"].sum()) == 7  # the heart voxel and its six neighbours
    z2 = measure.zones(maps, heart_dilation=3)  # grows past the lobe: cut to the chest cavity
    assert not (z2["heart"] & ~(z2["lungs"] | (maps[0] == 8))).any()


def test_zone_fraction_counts_dense_and_low_voxels():
    hu = np.full((10, 10, 10), -850, np.int16)
    zone = np.zeros(hu.shape, bool)
    zone[:5, :4, :5] = True  # 100 voxels
    hu[:5, :1, :5] = 20  # 25 dense voxels in the zone
    hu[:2, 3, :5] = -1000  # 10 low voxels in the zone
    hu[9, 9, 9] = 40  # dense but outside the zone
    assert measure.zone_fraction(hu, zone, -300, above=True) == pytest.approx(0.25)
    assert measure.zone_fraction(hu, zone, -950, above=False) == pytest.approx(0.10)
    assert math.isnan(measure.zone_fraction(hu, np.zeros(hu.shape, bool), -300, above=True))


def test_zone_percentile_is_perc15_of_the_zone_only():
    hu = np.full((10, 10, 10), 500, np.int16)  # outside the zone: never counted
    zone = np.zeros(hu.shape, bool)
    zone[:, :, :2] = True  # 200 voxels
    hu[:, :, :2] = -850
    hu[:3, :, :2] = -990  # 60 of 200 (30%) emphysematous
    assert measure.zone_percentile(hu, zone, measure.PERC15) == pytest.approx(-990)
    hu[:3, :, :2] = -940  # lifted above -950 by blurring: %LAA-950 sees nothing, Perc15 does
    assert measure.zone_fraction(hu, zone, measure.LAA_HU, above=False) == 0
    assert measure.zone_percentile(hu, zone, measure.PERC15) == pytest.approx(-940)
    assert measure.zone_percentile(hu, zone, 50) == pytest.approx(-850)
    assert math.isnan(measure.zone_percentile(hu, np.zeros(hu.shape, bool), 15))


def test_paired_stats_is_the_paired_t_test():
    with_, without = [0.30, 0.35, 0.28, 0.40], [0.10, 0.12, 0.15, 0.11]
    r = measure.paired_stats(with_, without)
    assert r["with"] == pytest.approx(np.mean(with_))
    assert r["difference"] == pytest.approx(np.mean(with_) - np.mean(without))
    assert r["p_value"] == pytest.approx(scipy_stats.ttest_rel(with_, without).pvalue)
    assert measure.paired_stats([0.3], [0.1])["p_value"] is None  # one pair: no test
    assert measure.paired_stats([0.3, 0.4], [0.1, 0.2])["p_value"] is None  # no spread: undefined
