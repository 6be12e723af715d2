"""``ctfactory phantom`` writes a CT-RATE-layout dataset that independent readers read back."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from factory import vocab
from factory.data.ctrate import METADATA_COLUMNS
from factory.data.ctrate import REPORT_TABLE_COLUMNS as REPORT_COLUMNS

N = 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    import subprocess
    import sys

    from tests.conftest import ctfactory_bin

    out = tmp_path_factory.mktemp("ds") / "phantom"
    subprocess.run(
        [*ctfactory_bin(), "phantom", "--n", str(N), "--size", "48x48x40", "--seed", "5",
         "--workers", "2", "--out", str(out), "--preview", "--preview-max", "2"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    assert sys.executable
    return out


def digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "previews" not in p.parts
    }


def test_layout_and_csv_schemas(dataset):
    names = [f"train_{i + 1}_a_1.nii.gz" for i in range(N)]
    assert sorted(p.name for p in (dataset / "train").iterdir()) == sorted(names)
    reports = pd.read_csv(dataset / "radiology_text_reports" / "train_reports.csv")
    labels = pd.read_csv(dataset / "multi_abnormality_labels" / "train_predicted_labels.csv")
    meta = pd.read_csv(dataset / "metadata" / "train_metadata.csv")
    assert list(reports.columns) == REPORT_COLUMNS
    assert list(labels.columns) == ["VolumeName", *vocab.COLUMNS]
    assert list(meta.columns) == METADATA_COLUMNS
    for frame in (reports, labels, meta):
        assert frame["VolumeName"].tolist() == names
    assert set(np.unique(labels[list(vocab.COLUMNS)].to_numpy())) <= {0, 1}
    assert meta["PatientAge"].str.fullmatch(r"\d{3}Y").all()
    assert set(meta["PatientSex"]) <= {"M", "F"}
    assert (meta["Rows"] == 48).all() and (meta["NumberofSlices"] == 40).all()
    for text in reports["Findings_EN"].tolist() + reports["Impressions_EN"].tolist():
        assert isinstance(text, str) and len(text) > 10 and "None" not in text


def test_reports_mention_the_labelled_findings(dataset):
    reports = pd.read_csv(dataset / "radiology_text_reports" / "train_reports.csv")
    labels = pd.read_csv(dataset / "multi_abnormality_labels" / "train_predicted_labels.csv")
    for (_, rep), (_, lab) in zip(reports.iterrows(), labels.iterrows(), strict=True):
        positives = [c for c in vocab.COLUMNS if lab[c] == 1]
        if not positives:
            continue
        truth = json.loads(
            (
                dataset / "ground_truth" / "train" / rep["VolumeName"].replace(".nii.gz", ".json")
            ).read_text()
        )
        assert sorted(truth["findings"]) == sorted(vocab.resolve(c) for c in positives)


def test_nifti_geometry_and_values(dataset):
    meta = pd.read_csv(dataset / "metadata" / "train_metadata.csv")
    for _, row in meta.iterrows():
        img = nib.load(dataset / "train" / row["VolumeName"])
        mask = nib.load(dataset / "masks" / "train" / row["VolumeName"])
        assert img.shape == (48, 48, 40) and mask.shape == img.shape
        assert img.get_data_dtype() == np.int16 and mask.get_data_dtype() == np.uint8
        zooms = img.header.get_zooms()
        xy = json.loads(row["XYSpacing"])
        assert np.allclose(zooms, (xy[0], xy[1], row["ZSpacing"]))
        assert np.allclose(np.abs(np.diag(img.affine)[:3]), zooms)
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        assert np.allclose(img.affine, mask.affine)
        data = np.asarray(img.dataobj)
        m = np.asarray(mask.dataobj)
        assert data.min() >= -1024 and data.max() <= 3071
        lung = np.isin(m, (1, 2, 3, 4, 5))
        assert lung.sum() > 500 and np.median(data[lung]) < -600  # lung mask is air-dense
        assert abs(int(data[0, 0, 0]) + 1000) < 60  # corner is air in HU, no rescale needed


def test_previews_and_manifest(dataset):
    previews = sorted((dataset / "previews" / "train").glob("*.png"))
    assert len(previews) == 2 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in previews)
    manifest = json.loads((dataset / "dataset.json").read_text())
    assert manifest["splits"]["train"]["n"] == N and manifest["hu"]["dtype"] == "int16"
    assert json.loads((dataset / "masks" / "labels.json").read_text())["8"] == "heart"


def test_same_seed_gives_identical_bytes_with_any_worker_count(dataset, tmp_path, run_cli):
    other = tmp_path / "again"
    run_cli("phantom", "--n", str(N), "--size", "48x48x40", "--seed", "5", "--workers", "1",
            "--out", str(other), check=True)  # fmt: skip
    assert digest(other) == {k: v for k, v in digest(dataset).items() if k != "dataset.json"} | {
        "dataset.json": digest(other)["dataset.json"]
    }
    assert (other / "dataset.json").read_text() == (dataset / "dataset.json").read_text()
    third = tmp_path / "seed6"
    run_cli(
        "phantom", "--n", "1", "--size", "48x48x40", "--seed", "6", "--out", str(third), check=True
    )
    assert digest(third)["train/train_1_a_1.nii.gz"] != digest(dataset)["train/train_1_a_1.nii.gz"]


def test_forced_findings_and_a_second_split(tmp_path, run_cli):
    out = tmp_path / "ds"
    effusion = "Pleural effusion:laterality=left,severity=large"
    run_cli("phantom", "--n", "2", "--size", "48x48x40", "--out", str(out),
            "--finding", effusion, "--finding", "nodule", check=True)  # fmt: skip
    labels = pd.read_csv(out / "multi_abnormality_labels" / "train_predicted_labels.csv")
    assert labels["Pleural effusion"].tolist() == [1, 1] and labels["Lung nodule"].tolist() == [
        1,
        1,
    ]
    assert labels[list(vocab.COLUMNS)].to_numpy().sum() == 4
    truth = json.loads((out / "ground_truth" / "train" / "train_1_a_1.json").read_text())
    assert truth["findings"]["pleural_effusion"]["attributes"] == {
        "laterality": "left",
        "severity": "large",
    }
    run_cli(
        "phantom",
        "--n",
        "1",
        "--size",
        "48x48x40",
        "--normal",
        "--split",
        "valid",
        "--out",
        str(out),
        check=True,
    )
    valid = pd.read_csv(out / "multi_abnormality_labels" / "valid_predicted_labels.csv")
    assert valid[list(vocab.COLUMNS)].to_numpy().sum() == 0
    assert (out / "train" / "train_1_a_1.nii.gz").exists()  # the other split is kept
    assert set(json.loads((out / "dataset.json").read_text())["splits"]) == {"train", "valid"}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--finding", "pleural efusion"], ["--finding", "did you mean 'pleural_effusion'"]),
        (["--finding", "lung_nodule:size_mm=-4"], ["size_mm", "out of range", "[3, 30]"]),
        (
            ["--finding", "cardiomegaly:laterality=left"],
            ["has no attribute 'laterality'", "severity"],
        ),
        (["--finding", "pleural_effusion:laterality=up"], ["laterality", "left, right, bilateral"]),
        (["--size", "8"], ["--size", "at least 16 voxels"]),
        (["--size", "64", "--spacing", "2"], ["--size/--spacing", "field of view"]),
        (["--size", "64x"], ["--size", "256x256x128"]),
        (["--n", "0"], ["--n", "positive"]),
        (["--normal", "--finding", "emphysema"], ["--normal", "--finding"]),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, run_cli, args, expected):
    out = tmp_path / "never"
    proc = run_cli("phantom", "--n", "1", "--size", "32", "--out", str(out), *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for text in expected:
        assert text in lines[0]
    assert not out.exists()


def test_existing_output_needs_overwrite_and_is_kept_otherwise(tmp_path, run_cli):
    out = tmp_path / "ds"
    run_cli("phantom", "--n", "1", "--size", "32", "--out", str(out), check=True)
    before = digest(out)
    proc = run_cli("phantom", "--n", "1", "--size", "32", "--seed", "9", "--out", str(out))
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    assert digest(out) == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    proc = run_cli("phantom", "--n", "1", "--size", "32", "--out", str(foreign), "--overwrite")
    assert proc.returncode == 2 and "not a ct-factory phantom dataset" in proc.stderr
    assert (foreign / "notes.txt").read_text() == "mine"
    run_cli(
        "phantom",
        "--n",
        "1",
        "--size",
        "32",
        "--seed",
        "9",
        "--out",
        str(out),
        "--overwrite",
        check=True,
    )
    assert digest(out)["train/train_1_a_1.nii.gz"] != before["train/train_1_a_1.nii.gz"]
