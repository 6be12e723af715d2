"""Phantom datasets in the CT-RATE layout, rendered in parallel and byte-reproducible.

Layout under the dataset root (a reader for real CT-RATE reads it unchanged)::

    {split}/{split}_{i}_a_1.nii.gz                       int16 HU, RAS+ affine in mm
    radiology_text_reports/{split}_reports.csv          VolumeName, ClinicalInformation_EN, ...
    multi_abnormality_labels/{split}_predicted_labels.csv   VolumeName + 18 CT-RATE columns
    metadata/{split}_metadata.csv                       CT-RATE metadata columns we know
    masks/{split}/{name}                                uint8 anatomy label map (masks/labels.json)
    ground_truth/{split}/{stem}.json                    every rendered finding: where, how big
    previews/{split}/{stem}.png                         optional three-plane montages
    dataset.json                                        how it was made, per split
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from factory import vocab
from factory.anatomy import LEGEND_FILE, MASK_LABELS, legend_bytes
from factory.cohort import prompts
from factory.data.ctrate import volume_name, write_tables
from factory.data.nifti import nifti_bytes, write_atomic
from factory.geometry import Grid
from factory.phantom.render import HU_MAX, HU_MIN, render_phantom
from factory.population import sample_population
from factory.viz import montage

DEFAULT_FOV_MM = (380.0, 380.0, 320.0)
MIN_FOV_MM = (300.0, 300.0, 160.0)
MIN_VOXELS = 16


@dataclass(frozen=True)
class PhantomSettings:
    """What a phantom split is made of; ``findings`` set every volume's findings exactly."""

    n: int
    grid: Grid
    split: str = "train"
    seed: int = 0
    findings: dict[str, dict] | None = None
    previews: int = 0
    extra: dict = field(default_factory=dict)


def default_grid(size: tuple[int, int, int], spacing: tuple[float, float, float] | None) -> Grid:
    """The grid for ``size`` voxels: given spacing, or one that fits the default field of view."""
    if spacing is None:
        spacing = tuple(round(f / n, 4) for f, n in zip(DEFAULT_FOV_MM, size, strict=True))
    return Grid(tuple(size), tuple(spacing))  # type: ignore[arg-type]


def check_grid(grid: Grid) -> str | None:
    """Why a grid cannot hold the phantom's anatomy, or None if it can."""
    if min(grid.shape) < MIN_VOXELS:
        return (
            f"each axis needs at least {MIN_VOXELS} voxels to resolve the anatomy "
            f"(got {grid.shape})"
        )
    fov = grid.fov_mm
    if any(f < m for f, m in zip(fov, MIN_FOV_MM, strict=True)):
        got = " x ".join(f"{f:g}" for f in fov)
        need = " x ".join(f"{m:g}" for m in MIN_FOV_MM)
        return f"field of view {got} mm is smaller than the chest needs ({need} mm at least)"
    return None


def _volume(task: tuple) -> dict:
    """Render and write one volume; return its CSV rows (runs in a worker process)."""
    settings, out, index, labels, age, sex = task
    grid = settings.grid
    name = volume_name(settings.split, index)
    stem = name.removesuffix(".nii.gz")
    render_ss, attr_ss, text_ss = np.random.SeedSequence([settings.seed, index]).spawn(3)
    attr_rng = np.random.default_rng(attr_ss)
    if settings.findings is not None:
        chosen = settings.findings
    else:
        chosen = {fid: {} for fid, v in zip(vocab.FINDING_IDS, labels, strict=True) if v}
    findings = {
        fid: vocab.complete_attributes(fid, attrs, attr_rng) for fid, attrs in chosen.items()
    }
    phantom = render_phantom(grid, findings, sex, age, render_ss)
    write_atomic(out / settings.split / name, nifti_bytes(phantom.image, grid.affine()))
    write_atomic(out / "masks" / settings.split / name, nifti_bytes(phantom.mask, grid.affine()))
    truth = {"VolumeName": name, "seed": [settings.seed, index], **phantom.truth}
    write_atomic(
        out / "ground_truth" / settings.split / f"{stem}.json",
        json.dumps(truth, indent=1, sort_keys=True, default=float).encode(),
    )
    text_rng = np.random.default_rng(text_ss)
    label_row = {f.column: int(f.id in findings) for f in vocab.FINDINGS}
    impression = prompts.impression_text(label_row, findings, text_rng)
    report = {
        "VolumeName": name,
        "ClinicalInformation_EN": prompts.pick(prompts.CLINICAL_INFORMATION, text_rng),
        "Technique_EN": prompts.technique_text(grid.spacing, text_rng),
        "Findings_EN": prompts.findings_text(label_row, findings, text_rng),
        "Impressions_EN": impression,
    }
    if index < settings.previews:
        caption = f"{name} | {sex}, {age} y | {impression}"
        montage(
            phantom.image,
            grid.spacing,
            caption,
            out / "previews" / settings.split / f"{stem}.png",
            center=preview_center(phantom.truth, grid),
            title=finding_title(findings),
        )
    meta = {
        "VolumeName": name,
        "Manufacturer": "ct-factory phantom",
        "PatientSex": sex,
        "PatientAge": f"{age:03d}Y",
        "Rows": grid.shape[1],
        "Columns": grid.shape[0],
        "NumberofSlices": grid.shape[2],
        "XYSpacing": f"[{grid.spacing[0]:g}, {grid.spacing[1]:g}]",
        "ZSpacing": grid.spacing[2],
        "RescaleIntercept": 0,
        "RescaleSlope": 1,
        "RescaleType": "HU",
        "PatientPosition": "HFS",
    }
    return {
        "index": index,
        "report": report,
        "labels": {"VolumeName": name, **label_row},
        "meta": meta,
        "bytes": sum((out / d / settings.split / name).stat().st_size for d in ("", "masks")),
    }


def finding_title(findings: dict[str, dict]) -> str:
    if not findings:
        return "no finding"
    parts = []
    for fid, attrs in findings.items():
        detail = ", ".join(f"{k}={v}" for k, v in attrs.items())
        parts.append(vocab.BY_ID[fid].column + (f" ({detail})" if detail else ""))
    return "; ".join(parts)


def preview_center(truth: dict, grid: Grid) -> list[int]:
    """Voxel to slice through: the first rendered finding's location, else the hila."""
    point = _first_location(truth.get("findings", {}))
    if point is None:
        point = [0.0, 0.0, -10.0]
    v = np.rint(grid.to_voxel(np.asarray(point, dtype=float))).astype(int)
    return np.clip(v, 0, np.asarray(grid.shape) - 1).tolist()


def _first_location(node) -> list[float] | None:
    if isinstance(node, dict):
        if "center_mm" in node:
            return node["center_mm"]
        if "bbox_mm" in node:
            lo, hi = node["bbox_mm"]
            return [(a + b) / 2 for a, b in zip(lo, hi, strict=True)]
        for value in node.values():
            found = _first_location(value)
            if found is not None:
                return found
    elif isinstance(node, list):
        for value in node:
            found = _first_location(value)
            if found is not None:
                return found
    return None


def split_files(out: Path, split: str) -> list[Path]:
    """Everything a split owns under a dataset root."""
    return [
        out / split, out / "masks" / split, out / "ground_truth" / split, out / "previews" / split,
        out / "radiology_text_reports" / f"{split}_reports.csv",
        out / "multi_abnormality_labels" / f"{split}_predicted_labels.csv",
        out / "metadata" / f"{split}_metadata.csv",
    ]  # fmt: skip


def prepare_output(out: Path, split: str, overwrite: bool) -> str | None:
    """Make ``out`` ready for ``split``; return why it cannot be, or None.

    Deletes only the files of that split of a ct-factory phantom dataset, and only on request.
    """
    if not out.exists() or not any(out.iterdir()):
        return None
    manifest = out / "dataset.json"
    if not manifest.exists():
        return f"{out} is not empty and is not a ct-factory phantom dataset; choose another --out"
    existing = [p for p in split_files(out, split) if p.exists()]
    if existing and not overwrite:
        return f"{out} already holds split '{split}'; pass --overwrite to replace it"
    for p in existing:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return None


def write_dataset(settings: PhantomSettings, out: Path, workers: int = 1) -> dict:
    """Render ``settings.n`` volumes into ``out`` (CT-RATE layout); return a summary."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    population = sample_population(settings.n, settings.seed)
    tasks = [
        (settings, out, i, population.labels[i], int(population.age[i]), str(population.sex[i]))
        for i in range(settings.n)
    ]
    rows = sorted(_run(tasks, workers), key=lambda r: r["index"])
    write_tables(
        out,
        settings.split,
        [r["labels"] for r in rows],
        [r["report"] for r in rows],
        [r["meta"] for r in rows],
    )
    write_atomic(out / "masks" / LEGEND_FILE, legend_bytes(MASK_LABELS))
    manifest_path = out / "dataset.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest.update(
        {
            "format": "CT-RATE layout",
            "generator": "ct-factory phantom",
            "hu": {
                "dtype": "int16",
                "units": "HU",
                "clip": [HU_MIN, HU_MAX],
                "rescale": "none (slope 1, intercept 0)",
            },
        }
    )
    manifest.setdefault("splits", {})[settings.split] = {
        "n": settings.n, "seed": settings.seed, "shape": list(settings.grid.shape),
        "spacing_mm": list(settings.grid.spacing), "orientation": "RAS+",
        "findings": settings.findings if settings.findings is not None else "sampled",
    }  # fmt: skip
    write_atomic(manifest_path, json.dumps(manifest, indent=1, sort_keys=True).encode())
    seconds = time.perf_counter() - start
    return {
        "n": settings.n,
        "bytes": sum(r["bytes"] for r in rows),
        "seconds": seconds,
        "positives": {c: sum(r["labels"][c] for r in rows) for c in vocab.COLUMNS},
    }


def _run(tasks: list[tuple], workers: int) -> Iterator[dict]:
    bar = tqdm(total=len(tasks), unit="vol", desc="phantom", mininterval=1.0)
    try:
        if workers <= 1:
            for task in tasks:
                yield _volume(task)
                bar.update()
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for row in pool.map(_volume, tasks, chunksize=1):
                    yield row
                    bar.update()
    finally:
        bar.close()
