"""Reading CT-RATE-layout datasets and preprocessing them to a model's grid."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from factory import vocab
from factory.anatomy import ANATOMY_GROUPS
from factory.data.ctrate import LABELS, REPORTS, DatasetError, read_split
from factory.data.transforms import preprocessing, sample, to_hu
from factory.models.config import load_config
from factory.phantom.dataset import PhantomSettings, default_grid, write_dataset

TINY = load_config("tiny")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ctrate") / "phantom"
    write_dataset(PhantomSettings(n=3, grid=default_grid((48, 48, 40), None), seed=4), root)
    return root


@pytest.fixture
def copy(dataset, tmp_path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(dataset, out)
    return out


def test_records_carry_labels_reports_and_metadata(dataset):
    records = read_split(dataset, "train")
    labels = pd.read_csv(dataset / LABELS.format(split="train"))
    meta = pd.read_csv(dataset / "metadata" / "train_metadata.csv")
    assert [r.name for r in records] == labels["VolumeName"].tolist()
    for r, (_, row), (_, m) in zip(records, labels.iterrows(), meta.iterrows(), strict=True):
        assert r.labels == tuple(int(row[c]) for c in vocab.COLUMNS)
        assert r.image.exists() and r.mask is not None and r.mask.exists()
        assert r.age == int(m["PatientAge"][:3]) and r.sex == m["PatientSex"]
        assert r.findings and r.impression and r.report.startswith(r.findings)


def test_nested_ct_rate_folders_are_found(copy):
    name = "train_1_a_1.nii.gz"
    nested = copy / "train" / "train_1" / "train_1_a"
    nested.mkdir(parents=True)
    shutil.move(copy / "train" / name, nested / name)
    assert read_split(copy)[0].image == nested / name


LABELS_CSV = LABELS.format(split="train")


def _drop_column(root):
    _edit(root / LABELS_CSV, lambda f: f.drop(columns=["Cardiomegaly"]))


def _non_binary(root):
    _edit(root / LABELS_CSV, lambda f: f.assign(Emphysema=2))


def _drop_report(root):
    _edit(root / REPORTS.format(split="train"), lambda f: f.iloc[1:])


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda root: (root / LABELS_CSV).unlink(), f"{LABELS_CSV} is missing"),
        (_drop_column, "missing column(s) Cardiomegaly"),
        (_non_binary, "must be 0 or 1"),
        (_drop_report, "no report for train_1_a_1"),
        (
            lambda root: (root / "train" / "train_2_a_1.nii.gz").unlink(),
            "train_2_a_1.nii.gz not found",
        ),
    ],
)
def test_not_ct_rate_layout_says_what_is_missing(copy, breakage, message):
    breakage(copy)
    with pytest.raises(DatasetError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_split(copy)


def _edit(path: Path, change) -> None:
    change(pd.read_csv(path)).to_csv(path, index=False)


def test_preprocessing_reaches_the_model_grid_with_air_padding(tmp_path):
    root = tmp_path / "small-fov"
    write_dataset(
        PhantomSettings(n=1, grid=default_grid((32, 32, 32), (10.0, 10.0, 6.0)), seed=1), root
    )
    record = read_split(root)[0]
    out = preprocessing(TINY, with_masks=True)(sample(record))
    image, masks = out["image"], out["mask"]
    assert tuple(image.shape) == (1, *TINY.size) and image.dtype == torch.float32
    assert float(image.min()) >= -1.0 and float(image.max()) <= 1.0
    assert float(image[0, 0, 0, 0]) == -1.0  # 320 mm of data in a 380 mm grid: padded as air
    assert np.allclose(np.diag(image.meta["affine"].numpy())[:3], TINY.spacing_mm)
    assert tuple(masks.shape) == (4, *TINY.size) and masks.dtype == torch.uint8
    lungs = masks[0].bool()
    assert lungs.sum() > 1000 and float(image[0][lungs].median()) < -0.6  # air-dense: < -600 HU


def test_orientation_is_normalised_to_ras(copy):
    record = read_split(copy)[0]
    reference = preprocessing(TINY)(sample(record))["image"]
    img = nib.load(record.image)
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = img.shape[0] - 1
    lps = nib.Nifti1Image(np.asarray(img.dataobj)[::-1].copy(), img.affine @ flip)
    nib.save(lps, record.image)
    assert nib.aff2axcodes(lps.affine) == ("L", "A", "S")
    again = preprocessing(TINY)(sample(record))["image"]
    assert torch.allclose(again, reference, atol=1e-5)


def test_hu_rescaling_happens_exactly_once(copy):
    record = read_split(copy)[0]
    want = preprocessing(TINY)(sample(record))["image"]
    img = nib.load(record.image)
    hu = np.asarray(img.dataobj).astype(np.int32)
    raw = nib.Nifti1Image((hu + 1024).astype(np.uint16), img.affine)  # stored values, no air < 0
    nib.save(raw, record.image)
    stored = sample(record) | {"rescale": (1.0, -1024.0)}
    assert torch.allclose(preprocessing(TINY)(stored)["image"], want, atol=1e-5)
    nib.save(img, record.image)  # already HU, but the metadata still says intercept -1024
    assert torch.allclose(preprocessing(TINY)(stored)["image"], want, atol=1e-5)


def test_values_that_are_not_ct_are_refused():
    with pytest.raises(DatasetError, match="do not look like CT"):
        to_hu(torch.rand(8, 8, 8) * 100, 1.0, 0.0, "x.nii.gz")
    with pytest.raises(DatasetError, match="boolean"):
        to_hu(torch.zeros(4, 4, 4, dtype=torch.bool), 1.0, 0.0, "x.nii.gz")


def test_phantom_label_maps_are_read_through_their_legend(tmp_path):
    root = tmp_path / "on-grid"
    grid = default_grid(tuple(TINY.size), tuple(TINY.spacing_mm))
    write_dataset(PhantomSettings(n=1, grid=grid, seed=2), root)
    record = read_split(root)[0]
    masks = np.asarray(preprocessing(TINY, with_masks=True)(sample(record))["mask"])
    labels = np.asarray(nib.load(record.mask).dataobj)
    for k, channel in enumerate(TINY.diffusion.anatomy_channels):  # on the model grid: exact
        assert np.array_equal(masks[k], np.isin(labels, ANATOMY_GROUPS[channel])), channel
    assert masks[0].sum() > 1000 and masks[3].sum() > 100  # lungs and heart are there
    (root / "masks" / "labels.json").unlink()
    with pytest.raises(DatasetError, match=r"masks/labels\.json: missing"):
        read_split(root)
