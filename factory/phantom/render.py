"""One phantom volume: subject, findings, anatomy, scanner blur and noise, and measurements.

Random streams are split per purpose (subject, noise, and one per finding in vocabulary order),
so adding or removing one finding leaves the anatomy, the noise and every other finding as
they were: the difference between two renders is the finding itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from factory import vocab
from factory.anatomy import ANATOMY_GROUPS, LUNG_LABELS, MASK_LABELS
from factory.evaluate.measure import cardiothoracic_ratio, laa950_pct
from factory.geometry import Grid
from factory.phantom.anatomy import Anatomy, sample_subject
from factory.phantom.canvas import Canvas
from factory.phantom.findings import RENDERERS

HU_MIN, HU_MAX = -1024, 3071
SUBJECT_SEED = 20240  # render_subjects' subjects (sex alternates, ages cycle SUBJECT_AGES)
SUBJECT_AGES = (62, 48, 71, 55)
REFERENCE_VOXEL_MM3 = 0.75 * 0.75 * 1.5  # noise levels are quoted at CT-RATE's voxel size


@dataclass
class Phantom:
    """A rendered volume: int16 HU image, uint8 anatomy label map, and its ground truth."""

    image: np.ndarray
    mask: np.ndarray
    grid: Grid
    truth: dict


def render_phantom(
    grid: Grid,
    findings: dict[str, dict],
    sex: str,
    age: int,
    seed: np.random.SeedSequence | int,
) -> Phantom:
    """Render one subject with ``findings`` (id -> complete attributes) on ``grid``."""
    ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    subject_ss, noise_ss, *finding_ss = ss.spawn(2 + len(vocab.FINDING_IDS))
    subject = sample_subject(np.random.default_rng(subject_ss), sex, age)
    rngs = {
        fid: np.random.default_rng(finding_ss[i])
        for i, fid in enumerate(vocab.FINDING_IDS)
        if fid in findings
    }
    order = [fid for fid in vocab.FINDING_IDS if fid in findings]
    for fid in order:
        adjust = RENDERERS[fid].adjust
        if adjust is not None:
            adjust(subject, findings[fid], rngs[fid])
    anatomy = Anatomy(subject)
    canvas = Canvas(grid)
    anatomy.render(canvas)
    rendered = {}
    for fid in order:
        paint = RENDERERS[fid].paint
        record = paint(canvas, anatomy, findings[fid], rngs[fid]) if paint else {}
        rendered[fid] = {"column": vocab.BY_ID[fid].column, "attributes": findings[fid], **record}
    image = scanner(canvas.hu, grid, subject.blur_mm, subject.noise_hu, noise_ss)
    truth = {
        "sex": sex,
        "age": int(age),
        "grid": {"shape": list(grid.shape), "spacing_mm": list(grid.spacing)},
        "subject": asdict(subject),
        "findings": rendered,
        "measurements": measure(image, canvas.labels, grid),
        "mask_labels": {str(k): v for k, v in MASK_LABELS.items()},
    }
    return Phantom(image=image, mask=canvas.labels, grid=grid, truth=truth)


def scanner(
    hu: np.ndarray, grid: Grid, blur_mm: float, noise_hu: float, seed: np.random.SeedSequence
) -> np.ndarray:
    """Point-spread blur and correlated noise, then rounding to int16 HU.

    Noise is quoted at CT-RATE's voxel size and falls with the square root of voxel volume,
    as averaging does when a scan is resampled to coarser voxels.
    """
    sigma = [blur_mm / sp for sp in grid.spacing]
    out = ndimage.gaussian_filter(hu, sigma) if max(sigma) > 0.3 else hu.copy()
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(grid.shape, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, 0.6)
    noise *= np.float32(1.0 / 0.32)  # a 0.6-voxel Gaussian keeps about 0.32 of the std
    level = max(noise_hu * np.sqrt(REFERENCE_VOXEL_MM3 / np.prod(grid.spacing)), 2.0)
    out += noise * np.float32(level)
    return np.clip(np.rint(out), HU_MIN, HU_MAX).astype(np.int16)


def measure(image: np.ndarray, labels: np.ndarray, grid: Grid) -> dict:
    """Physical measurements that need no network (MedSyn-style): CTR, %LAA-950, volumes."""
    lung = np.isin(labels, LUNG_LABELS)
    heart = np.isin(labels, ANATOMY_GROUPS["heart"])

    ctr = cardiothoracic_ratio(lung, heart)
    return {
        "cardiothoracic_ratio": round(ctr, 3) if math.isfinite(ctr) else None,
        "laa950_percent": round(laa950_pct(image, lung), 2),
        "lung_volume_ml": round(float(lung.sum()) * grid.voxel_ml, 1),
        "heart_volume_ml": round(float(heart.sum()) * grid.voxel_ml, 1),
    }


def render_subjects(
    grid: Grid, findings: Mapping[str, Mapping[str, object]], n: int
) -> tuple[list[np.ndarray], dict[str, list[np.ndarray]]]:
    """HU images of ``n`` fixed subjects without findings and with each of ``findings`` (finding
    -> attributes, the rest drawn): the same subjects render both, so each difference is the
    finding. The real reference of the prompt-pair experiment."""
    without: list[np.ndarray] = []
    with_finding: dict[str, list[np.ndarray]] = {fid: [] for fid in findings}
    for i in range(n):
        sex = "MF"[i % 2]
        age = SUBJECT_AGES[i % len(SUBJECT_AGES)]
        without.append(
            render_phantom(grid, {}, sex, age, np.random.SeedSequence([SUBJECT_SEED, i])).image
        )
        for fid, attributes in findings.items():
            rng = np.random.default_rng([SUBJECT_SEED, i])
            attrs = vocab.complete_attributes(fid, dict(attributes), rng)
            seed = np.random.SeedSequence([SUBJECT_SEED, i])
            with_finding[fid].append(render_phantom(grid, {fid: attrs}, sex, age, seed).image)
    return without, with_finding
