"""``ctfactory card``: the prompt-pair yardstick's pieces, and a whole run on an untrained model."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from factory.cli import main
from factory.evaluate.prompt_pairs import MAX_PNG_BYTES, PAIRS, pair_results, verdict
from factory.models.card import ModelCard
from factory.models.checkpoint import load_checkpoint
from factory.models.config import load_config, parse_config
from factory.viz import columns_figure
from tests.conftest import ctfactory_bin

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
def test_columns_figure_is_a_small_png():
    rng = np.random.default_rng(0)
    panels = [(f"panel {i}", rng.integers(-1000, 200, (32, 32, 32), dtype=np.int16)) for i in "ab"]
    data = columns_figure("noise", panels, (5.9, 5.9, 5.0), [16, 16, 16], (-1000, 200), 60_000)
    assert data.startswith(PNG_SIGNATURE) and len(data) <= 60_000


def test_emphysema_is_measured_by_perc15_and_laa950():
    """Perc15 sees emphysema lifted just above -950 HU (as blurring does); %LAA-950 does not."""
    pair = next(p for p in PAIRS if p.finding == "emphysema")
    lungs = np.zeros((8, 8, 8), bool)
    lungs[:, :, :4] = True
    zone_masks = {"lungs": lungs, "heart": ~lungs}
    normal = np.full(lungs.shape, -850, np.int16)
    speckled, lifted = normal.copy(), normal.copy()
    speckled[:3, :, :4] = -985  # 3/8 of the lung zone below -950
    lifted[:3, :, :4] = -930  # the same voxels, blurred
    rows = pair_results(pair, [lifted, lifted], [normal, normal], [speckled], [normal], zone_masks)
    assert list(rows) == ["emphysema", "emphysema/laa950"]
    perc15, laa = rows["emphysema"], rows["emphysema/laa950"]
    assert perc15["measure"] == "lungs zone Perc15 (HU)"
    assert (perc15["with"], perc15["without"]) == (-930, -850)
    assert (perc15["real_with"], perc15["real_without"]) == (-985, -850)
    assert laa["difference"] == 0 and laa["real_with"] == pytest.approx(3 / 8)
    assert verdict(rows).startswith(
        "The prompt moved the yardstick in the phantom's direction for 1 of 2 measures of 1 finding"
    )


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
    argv = ["card", str(model), "--data", str(data), "--out", str(out), "--docs-images", str(docs)]
    argv += ["--seeds", "1", "--steps", "2", "--reference", "1"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy machine oversubscribed threads make this 10x slower
    try:
        assert main(argv) == 0
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
    settings = checkpoint.card.extra["prompt_pairs"]
    assert settings["seeds"] == [0]
    # --steps given, --guidance not: the model's own, as its diffusion config states it
    assert (settings["steps"], settings["guidance"]) == (2, SMALL.diffusion.sampling.guidance)
    assert checkpoint.card.extra["prompt_pairs"]["negations"] == "guide"  # SMALL's default
    assert "`text.negations: guide`" in checkpoint.card.description
    assert checkpoint.card.extra["wall_s"] == 60.0  # the source card's extra is kept


def test_run_records_finite_yardstick_metrics(run):
    out, _, _ = run
    card = load_checkpoint(out).card
    metrics = card.metrics
    wanted = [f"{row}/{k}" for p in PAIRS for row, _ in p.rows() for k in KEYS]
    wanted += [f"hu/{q}" for q in ("q25", "q50", "q75")]
    wanted += [f"hu/real_{q}" for q in ("q25", "q50", "q75")]
    for key in wanted:
        assert key in metrics and math.isfinite(metrics[key]), key
    assert all(math.isfinite(v) for v in metrics.values())
    assert 0.0 <= metrics["pleural_effusion/with"] <= 1.0
    assert card.steps == 3
    assert "| pleural effusion |" in card.description
    assert "| emphysema | lungs zone Perc15 (HU) |" in card.description
    assert "| emphysema | lungs zone < -950 HU |" in card.description
    assert "parenchyma window -1000..-700 HU" in card.description


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
    assert main(["card", str(not_model), "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(not_model) in err
    no_valid = tmp_path / "empty-data"
    no_valid.mkdir()
    assert main(["card", str(model), "--data", str(no_valid), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(no_valid) in err and "valid" in err
