"""A cohort (or some of its volumes) as NIfTI in CT-RATE layout, for tools that read files.

``{out}/{split}/{name}`` int16 HU with the stored affine; ``masks/{split}/{name}`` a uint8
label map of the anatomy channels with its legend ``masks/labels.json`` (``factory.anatomy``:
channel k is k + 1, and a voxel in several channels has the value of that set, so nothing is
lost where channels overlap); the labels, reports (the prompt as ``Findings_EN``) and metadata
CSVs, with each volume's cohort id and seed as extra metadata columns. ct-factory's own
training reads it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from factory import vocab
from factory.anatomy import LEGEND_FILE, legend_bytes, pack_channels
from factory.data.ctrate import volume_name, write_tables
from factory.data.nifti import nifti_bytes, write_atomic
from factory.store.cohort import CohortStore
from factory.store.layout import StoredVolume


def hu_nifti(volume: StoredVolume) -> bytes:
    """A stored volume's HU as .nii.gz: int16 with the stored affine (what export writes)."""
    return nifti_bytes(volume.hu, volume.affine)


def anatomy_nifti(volume: StoredVolume) -> tuple[bytes, dict[int, str]]:
    """A stored volume's anatomy channels as one uint8 label map .nii.gz and its legend."""
    packed, legend = pack_channels(volume.masks)
    return nifti_bytes(packed, volume.affine), legend


def export_nifti(
    cohort: CohortStore, out: str | Path, ids: Sequence[str] | None = None, split: str = "train"
) -> int:
    """Write the committed volumes (all, or ``ids``) to ``out``; returns how many.

    Raises KeyError naming an id that is not a committed volume of the cohort.
    """
    out = Path(out)
    manifest = cohort.read_manifest()
    if ids is not None:
        known = set(manifest["volume_id"])
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise KeyError(f"{', '.join(unknown[:5])}: not committed volume(s) of {cohort.url}")
        manifest = manifest[manifest["volume_id"].isin(set(ids))]
    labels, reports, metadata = [], [], []
    legend: dict[int, str] = {}
    for row in tqdm(manifest.to_dict("records"), unit="vol", desc="export", mininterval=1.0):
        volume = cohort.volume(row["volume_id"])
        name = volume_name(split, int(row["index"]))
        write_atomic(out / split / name, hu_nifti(volume))
        if volume.masks:
            labels_file, legend = anatomy_nifti(volume)
            write_atomic(out / "masks" / split / name, labels_file)
        labels.append({"VolumeName": name, **{c: int(row[c]) for c in vocab.COLUMNS}})
        reports.append({"VolumeName": name, "Findings_EN": row["prompt"], "Impressions_EN": ""})
        sx, sy, sz = volume.spacing
        x, y, z = volume.hu.shape
        metadata.append(
            {
                "VolumeName": name, "Manufacturer": "ct-factory", "PatientSex": row["sex"],
                "PatientAge": f"{int(row['age']):03d}Y", "Rows": y, "Columns": x,
                "NumberofSlices": z, "XYSpacing": f"[{sx:g}, {sy:g}]", "ZSpacing": sz,
                "RescaleIntercept": 0, "RescaleSlope": 1, "RescaleType": "HU",
                "PatientPosition": "HFS", "VolumeId": row["volume_id"], "Seed": row["seed"],
            }
        )  # fmt: skip
    write_tables(out, split, labels, reports, metadata)
    if legend:
        write_atomic(out / "masks" / LEGEND_FILE, legend_bytes(legend))
    return len(labels)
