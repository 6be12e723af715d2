"""``ctfactory segment``: the demo model segments a phantom it never saw, read back by nibabel."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np

from factory.anatomy import channels_from_labels, read_legend
from factory.data.ctrate import read_split
from factory.data.nifti import read_nifti


def test_the_demo_model_segments_a_phantom_and_bad_input_is_one_line(tmp_path, run_cli):
    data = tmp_path / "phantom"
    run_cli(
        *("phantom", "--n", "1", "--size", "64", "--seed", "11", "--split", "valid"),
        *("--out", str(data), "--workers", "1"),
        check=True,
    )
    (record,) = read_split(data, "valid")
    out = tmp_path / "seg"
    done = run_cli("segment", str(record.image), "--steps", "8", "--out", str(out), check=True)
    assert done.stdout.startswith(f"segmented {record.image}: lungs ")
    labels = np.asarray(nib.load(out / "anatomy.nii.gz").dataobj)
    legend = read_legend(out)
    names = ("lungs", "heart")
    given = channels_from_labels(labels, legend, names)
    truth = channels_from_labels(read_nifti(record.mask), record.legend, names)
    for name, a, b in zip(names, given, truth, strict=True):
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        assert dice > 0.7, (name, dice)  # sampled freely, these were 0.72 and 0.74 on average
    info = json.loads((out / "segmentation.json").read_text())
    assert info["sampler"]["steps"] == 8 and info["voxels"]["lungs"] == int(given[0].sum())

    bad = run_cli("segment", str(data / "dataset.json"), "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "not a NIfTI file" in bad.stderr and not (tmp_path / "x").exists()
