"""``python -m train.demo_card``: the yardstick's pieces, and a whole run on an untrained model."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from factory.models.checkpoint import ModelCard, load_checkpoint
from factory.models.config import load_config, parse_config
from tests.conftest import ctfactory_bin
from train import demo_card
from train.demo_card import MAX_PNG_BYTES, PAIRS, pair_figure, paired_stats, zone_fraction, zones

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The tiny config at half resolution (32^3 of 11.9 x 11.9 x 10 mm, the phantom's default field of
# view): decoding and rendering cost an eighth, which keeps the whole run near 15 s of CPU.
SMALL = parse_config(
    {
        **load_config("tiny").model_dump(mode="json"),
        "size": [32] * 3,
        "spacing_mm": [11.875] * 2 + [10],
    }
)
KEYS = ("with", "without", "difference", "real_with", "real_without")


# ----- the measuring functions ----------------------------------------------------------------
def test_zones_take_the_majority_and_grow_the_heart_inside_the_chest():
    shape = (9, 9, 9)
    maps = [np.zeros(shape, np.uint8) for _ in range(3)]
    for m in maps:
        m[2:7, 2:7, 2:7] = 3  # a lobe in every map
        m[4, 4, 4] = 8  # the heart in every map
    maps[0][0, 0, 0] = 1  # lung in 1 of 3: out
    maps[0][8, 8, 8] = maps[1][8, 8, 8] = 5  # lung in 2 of 3: in
    z = zones(maps, heart_dilation=1)
    assert z["lungs"][8, 8, 8] and not z["lungs"][0, 0, 0]
    assert int(z["lungs"].sum()) == 5**3 - 1 + 1  # the lobe less the heart voxel, plus (8,8,8)
    assert int(z["heart"].sum()) == 7  # the heart voxel and its six neighbours
    z2 = zones(maps, heart_dilation=3)  # grows past the lobe: cut to the chest cavity
    assert not (z2["heart"] & ~(z2["lungs"] | (maps[0] == 8))).any()


def test_zone_fraction_counts_dense_and_low_voxels():
    hu = np.full((10, 10, 10), -850, np.int16)
    zone = np.zeros(hu.shape, bool)
    zone[:5, :4, :5] = True  # 100 voxels
    hu[:5, :1, :5] = 20  # 25 dense voxels in the zone
    hu[:2, 3, :5] = -1000  # 10 low voxels in the zone
    hu[9, 9, 9] = 40  # dense but outside the zone
    assert zone_fraction(hu, zone, -300, above=True) == pytest.approx(0.25)
    assert zone_fraction(hu, zone, -950, above=False) == pytest.approx(0.10)
    assert math.isnan(zone_fraction(hu, np.zeros(hu.shape, bool), -300, above=True))


def test_paired_stats_is_the_paired_t_test():
    with_, without = [0.30, 0.35, 0.28, 0.40], [0.10, 0.12, 0.15, 0.11]
    r = paired_stats(with_, without)
    assert r["with"] == pytest.approx(np.mean(with_))
    assert r["difference"] == pytest.approx(np.mean(with_) - np.mean(without))
    assert r["p_value"] == pytest.approx(stats.ttest_rel(with_, without).pvalue)
    assert paired_stats([0.3], [0.1])["p_value"] is None  # one pair: no test
    assert paired_stats([0.3, 0.4], [0.1, 0.2])["p_value"] is None  # no spread: undefined


def test_pair_figure_is_a_small_png():
    rng = np.random.default_rng(0)
    panels = [(f"panel {i}", rng.integers(-1000, 200, (32, 32, 32), dtype=np.int16)) for i in "ab"]
    data = pair_figure("noise", panels, (5.9, 5.9, 5.0), [16, 16, 16])
    assert data.startswith(PNG_SIGNATURE) and len(data) <= MAX_PNG_BYTES


# ----- a whole run ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    """An untrained small model (with labels.csv) and a 2-volume valid phantom split."""
    from factory.models.generator import Generator

    root = tmp_path_factory.mktemp("demo-card")
    data = root / "data"
    subprocess.run(
        [*ctfactory_bin(), "phantom", "--n", "2", "--size", str(SMALL.size[0]), "--split", "valid",
         "--workers", "1", "--out", str(data)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    torch.manual_seed(0)
    generator = Generator.from_config(SMALL, device="cpu")
    labels = data / "multi_abnormality_labels" / "valid_predicted_labels.csv"
    generator.save(root / "model", ModelCard(name="t", steps=3, extra={"wall_s": 60.0}), labels)
    return root / "model", data


@pytest.fixture(scope="module")
def run(inputs, tmp_path_factory) -> tuple[Path, Path, str]:
    model, data = inputs
    out = tmp_path_factory.mktemp("out") / "demo"
    docs = tmp_path_factory.mktemp("docs")
    argv = [str(model), "--data", str(data), "--out", str(out), "--docs-images", str(docs)]
    argv += ["--seeds", "1", "--steps", "2", "--reference", "1"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy machine oversubscribed threads make this 10x slower
    try:
        assert demo_card.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    return out, docs, str(model)


def test_run_writes_a_verified_checkpoint_with_pictures(run):
    out, docs, _ = run
    checkpoint = load_checkpoint(out)  # verifies every file's checksum
    assert checkpoint.card.name == "demo"
    for pair in PAIRS:
        name = f"pair-{pair.finding}.png"
        data = (out / "images" / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) <= MAX_PNG_BYTES
        assert (docs / name).read_bytes() == data
        assert f"](images/{name})" in checkpoint.card.description
    assert (out / "labels.csv").is_file()
    assert "images/pair-pleural_effusion.png" in checkpoint.card.extra["images"]
    assert checkpoint.card.extra["demo_card"]["seeds"] == [0]
    assert checkpoint.card.extra["wall_s"] == 60.0  # the source card's extra is kept


def test_run_records_finite_yardstick_metrics(run):
    out, _, _ = run
    card = load_checkpoint(out).card
    metrics = card.metrics
    wanted = [f"{p.finding}/{k}" for p in PAIRS for k in KEYS]
    wanted += [f"hu/{q}" for q in ("q25", "q50", "q75")]
    wanted += [f"hu/real_{q}" for q in ("q25", "q50", "q75")]
    for key in wanted:
        assert key in metrics and math.isfinite(metrics[key]), key
    assert all(math.isfinite(v) for v in metrics.values())
    assert 0.0 <= metrics["pleural_effusion/with"] <= 1.0
    assert card.steps == 3
    assert "| pleural effusion |" in card.description


def test_run_keeps_the_weights(run):
    out, _, model = run
    source, written = load_checkpoint(model), load_checkpoint(out)
    assert set(source.weights) == set(written.weights)
    for network, state in source.weights.items():
        assert state.keys() == written.weights[network].keys()
        for key, tensor in state.items():
            assert torch.equal(tensor, written.weights[network][key]), (network, key)
    assert source.config == written.config


def test_bad_inputs_are_one_line_and_status_2(inputs, tmp_path, capsys):
    model, data = inputs
    not_model = tmp_path / "nothing"
    not_model.mkdir()
    assert demo_card.main([str(not_model), "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(not_model) in err
    no_valid = tmp_path / "empty-data"
    no_valid.mkdir()
    assert demo_card.main([str(model), "--data", str(no_valid), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(no_valid) in err and "valid" in err
