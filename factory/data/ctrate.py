"""An index of a CT-RATE-layout dataset split: one record per volume, read from its CSVs.

Reads real CT-RATE and ct-factory phantoms alike. Volumes are found flat
(``{split}/{name}``, the phantom) or nested as CT-RATE ships them
(``{split}/{split}_{patient}/{split}_{patient}_{scan}/{name}``). Only the CSVs are read here;
volumes are loaded lazily by the transforms, so an index of 50,000 volumes is small.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from factory import vocab
from factory.anatomy import LegendError, read_legend
from factory.data.nifti import write_atomic
from factory.errors import CtFactoryError

REPORTS = "radiology_text_reports/{split}_reports.csv"
LABELS = "multi_abnormality_labels/{split}_predicted_labels.csv"
METADATA = "metadata/{split}_metadata.csv"
REPORT_COLUMNS = ("VolumeName", "Findings_EN", "Impressions_EN")  # what a reader needs
# What a writer writes (CT-RATE's own columns, those we can fill).
REPORT_TABLE_COLUMNS = [
    "VolumeName",
    "ClinicalInformation_EN",
    "Technique_EN",
    "Findings_EN",
    "Impressions_EN",
]
METADATA_COLUMNS = [
    "VolumeName", "Manufacturer", "PatientSex", "PatientAge", "Rows", "Columns", "NumberofSlices",
    "XYSpacing", "ZSpacing", "RescaleIntercept", "RescaleSlope", "RescaleType", "PatientPosition",
]  # fmt: skip


class DatasetError(CtFactoryError, ValueError):
    """A dataset that is not in CT-RATE layout; the message names the file and column."""


@dataclass(frozen=True)
class Record:
    """One volume: where it is, its 18 labels (vocabulary order), report and metadata."""

    name: str
    image: Path
    labels: tuple[int, ...]
    findings: str
    impression: str
    mask: Path | None = None
    legend: dict[int, str] | None = field(default=None, compare=False)  # the mask's labels.json
    age: int | None = None
    sex: str | None = None
    rescale: tuple[float, float] = (1.0, 0.0)  # (slope, intercept) from the metadata
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def report(self) -> str:
        """Findings and impression, the text a model is conditioned on."""
        return f"{self.findings} {self.impression}".strip()


def volume_name(split: str, index: int) -> str:
    """CT-RATE style name: ``train_1_a_1.nii.gz`` is patient 1, scan a, reconstruction 1."""
    return f"{split}_{index + 1}_a_1.nii.gz"


def write_tables(
    root: Path, split: str, labels: list[dict], reports: list[dict], metadata: list[dict]
) -> None:
    """Write a split's labels, reports and metadata CSVs (each whole, through a rename).

    Extra metadata keys (beyond CT-RATE's columns) are kept as further columns.
    """
    extra = [k for row in metadata[:1] for k in row if k not in METADATA_COLUMNS]
    for relative, rows, columns in (
        (LABELS, labels, ["VolumeName", *vocab.COLUMNS]),
        (REPORTS, reports, REPORT_TABLE_COLUMNS),
        (METADATA, metadata, METADATA_COLUMNS + extra),
    ):
        frame = pd.DataFrame(rows, columns=columns)
        data = frame.to_csv(index=False, lineterminator="\n").encode()
        write_atomic(Path(root) / relative.format(split=split), data)


def read_split(root: str | Path, split: str = "train") -> list[Record]:
    """The records of ``split`` under ``root``, in labels-CSV order; errors name what is missing."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such dataset folder")
    labels = _csv(root, LABELS.format(split=split), ("VolumeName", *vocab.COLUMNS))
    reports = _csv(root, REPORTS.format(split=split), REPORT_COLUMNS).set_index("VolumeName")
    meta_path = root / METADATA.format(split=split)
    meta = (
        _csv(root, METADATA.format(split=split), ("VolumeName",)).set_index("VolumeName")
        if meta_path.exists()
        else None
    )
    values = labels[list(vocab.COLUMNS)]
    bad = ~values.isin((0, 1)).all(axis=1)
    if bad.any():
        first = labels["VolumeName"][bad].iloc[0]
        raise DatasetError(f"{root / LABELS.format(split=split)}: labels must be 0 or 1 ({first})")
    masks = {name: _mask(root, split, name) for name in labels["VolumeName"]}
    legend = _legend(root) if any(m is not None for m in masks.values()) else None
    records = []
    for row, (_, lab) in zip(labels["VolumeName"], values.iterrows(), strict=True):
        if row not in reports.index:
            raise DatasetError(f"{root / REPORTS.format(split=split)}: no report for {row}")
        rep = reports.loc[row]
        info = meta.loc[row] if meta is not None and row in meta.index else None
        records.append(
            Record(
                name=row,
                image=locate(root, split, row),
                labels=tuple(int(v) for v in lab),
                findings=_text(rep["Findings_EN"]),
                impression=_text(rep["Impressions_EN"]),
                mask=masks[row],
                legend=legend if masks[row] is not None else None,
                age=_age(info),
                sex=_field(info, "PatientSex"),
                rescale=(
                    float(_field(info, "RescaleSlope") or 1.0),
                    float(_field(info, "RescaleIntercept") or 0.0),
                ),
            )
        )
    return records


def locate(root: Path, split: str, name: str) -> Path:
    """The volume file of ``name``, flat or in CT-RATE's nested folders."""
    flat = root / split / name
    if flat.exists():
        return flat
    parts = name.removesuffix(".nii.gz").split("_")
    if len(parts) >= 4:
        nested = root / split / "_".join(parts[:2]) / "_".join(parts[:3]) / name
        if nested.exists():
            return nested
    raise DatasetError(f"{root}: volume {name} not found as {flat} nor in CT-RATE's nested folders")


def _legend(root: Path) -> dict[int, str]:
    """The legend of the dataset's label maps (``masks/labels.json``)."""
    try:
        return read_legend(root / "masks")
    except LegendError as exc:
        raise DatasetError(str(exc)) from None


def _csv(root: Path, relative: str, columns: tuple[str, ...]) -> pd.DataFrame:
    path = root / relative
    if not path.exists():
        raise DatasetError(f"{root}: not CT-RATE layout: {relative} is missing")
    frame = pd.read_csv(path)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DatasetError(f"{path}: missing column(s) {', '.join(missing)}")
    return frame


def _mask(root: Path, split: str, name: str) -> Path | None:
    path = root / "masks" / split / name
    return path if path.exists() else None


def _field(info, key: str):
    if info is None or key not in info.index or pd.isna(info[key]):
        return None
    return info[key]


def _age(info) -> int | None:
    text = _field(info, "PatientAge")
    return int(str(text).rstrip("Yy")) if text is not None else None


def _text(value) -> str:
    return "" if pd.isna(value) else str(value)
