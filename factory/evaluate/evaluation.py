"""``ctfactory eval``: a generated cohort against a real (CT-RATE-layout) reference, both measured
the same way, volume by volume.

Each set is streamed through the finding classifier (probabilities, pooled features for 3D
FID, slab features for 2.5D FID) and the physical measurements. Zones for the measurements come
from the reference's anatomy masks (a first pass over the reference builds them); the
cardiothoracic ratio uses each volume's own masks (generated anatomy channels, or the
dataset's masks). Only features and numbers are kept, never
volumes, so a cohort of any size streams through in bounded memory.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from factory import vocab
from factory.data.ctrate import DatasetError, read_split
from factory.data.transforms import preprocessing, sample
from factory.errors import CtFactoryError
from factory.evaluate import measure, metrics
from factory.models.checkpoint import Checkpoint
from factory.models.classifier import FindingClassifier
from factory.models.clip import CLIP3D
from factory.models.intensity import hu_to_unit, unit_to_hu

BATCH = 8


class EvalError(CtFactoryError, ValueError):
    """Inputs that cannot be compared; the message names the input and what is valid."""


@dataclass
class Item:
    """One volume to score: HU (x, y, z) on the classifier grid, its 18 labels, own anatomy."""

    hu: np.ndarray
    labels: np.ndarray
    anatomy: dict[str, np.ndarray] | None = None
    text: str = ""  # the prompt of a generated volume, the report of a real one
    truth: dict | None = None  # a phantom's ground truth (ground_truth/{split}/{stem}.json)


@dataclass
class Scores:
    """What one set keeps: labels, probabilities, features, measurements and HU samples."""

    labels: list[np.ndarray] = field(default_factory=list)
    probabilities: list[np.ndarray] = field(default_factory=list)
    volume_features: list[torch.Tensor] = field(default_factory=list)
    plane_features: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    measures: list[dict[str, float]] = field(default_factory=list)
    hu_sample: list[np.ndarray] = field(default_factory=list)
    clip_image: list[torch.Tensor] = field(default_factory=list)  # unit embeddings
    clip_text: list[torch.Tensor] = field(default_factory=list)
    truths: list[dict | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def features(self) -> dict[str, torch.Tensor]:
        out = {"volume": torch.cat(self.volume_features)}
        out.update({k: torch.cat(v) for k, v in self.plane_features.items()})
        return out


@dataclass
class ClipModel:
    """A 3D CLIP and the HU window its vision tower reads."""

    clip: CLIP3D
    window: tuple[float, float]

    @classmethod
    def load(cls, checkpoint: Checkpoint, device=None) -> ClipModel:
        return cls(CLIP3D.from_checkpoint(checkpoint, device), tuple(checkpoint.config.hu_window))


def score(
    items: Iterable[Item],
    classifier: FindingClassifier,
    zones: Mapping[str, np.ndarray] | None,
    spacing_mm: tuple[float, float, float],
    progress: Callable[[int], object] | None = None,
    clip: ClipModel | None = None,
) -> Scores:
    """Classifier outputs, features and measurements of every item (and, with ``clip``, the
    CLIP embeddings of each volume and its text), in batches."""
    out = Scores()
    device = next(classifier.parameters()).device
    rng = np.random.default_rng(0)
    batch: list[Item] = []

    def flush() -> None:
        x = classifier.to_input(np.stack([i.hu for i in batch])).to(device)
        with torch.no_grad():
            fmap = classifier.feature_map(x)
            pooled = fmap.mean(dim=(2, 3, 4))
            probs = torch.sigmoid(classifier.head(pooled))
        out.volume_features.append(pooled.double().cpu())
        for plane, feats in metrics.plane_features(fmap.double().cpu()).items():
            out.plane_features.setdefault(plane, []).append(feats)
        out.probabilities.extend(probs.float().cpu().numpy())
        if clip is not None:
            hu = torch.as_tensor(np.stack([i.hu for i in batch]), dtype=torch.float32)
            with torch.no_grad():
                image = clip.clip.encode_image(hu_to_unit(hu, clip.window)[:, None].to(device))
                text = clip.clip.encode_text([i.text for i in batch])
            out.clip_image.append(image.float().cpu())
            out.clip_text.append(text.float().cpu())
        for item in batch:
            out.labels.append(item.labels)
            out.truths.append(item.truth)
            if zones is not None:
                out.measures.append(
                    measure.measure_volume(item.hu, zones, spacing_mm, item.anatomy)
                )
            out.hu_sample.append(rng.choice(item.hu.ravel(), 4096))
        if progress is not None:
            progress(len(batch))
        batch.clear()

    for item in items:
        batch.append(item)
        if len(batch) == BATCH:
            flush()
    if batch:
        flush()
    return out


# ----- the two sets ---------------------------------------------------------------------------
def reference_items(root: str, split: str, classifier: FindingClassifier, config, limit: int):
    """A CT-RATE-layout split, preprocessed to the classifier's grid (MONAI chain), with its
    anatomy masks when the dataset has them."""
    try:
        records = read_split(root, split)[:limit]
    except DatasetError as exc:
        raise EvalError(f"--reference: {exc}") from None
    if not records:
        raise EvalError(f"--reference {root}: split {split!r} has no volumes")
    channels = config.diffusion.anatomy_channels
    with_masks = all(r.mask is not None for r in records) and {"lungs", "heart"} <= set(channels)
    chain = preprocessing(config, with_masks=with_masks)

    truth_dir = Path(root) / "ground_truth" / split

    def truth(name: str) -> dict | None:
        path = truth_dir / f"{name.removesuffix('.gz').removesuffix('.nii')}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def items() -> Iterator[Item]:
        for record in records:
            data = chain(sample(record))
            hu = unit_to_hu(torch.as_tensor(np.asarray(data["image"][0])), classifier.window)
            anatomy = None
            if with_masks:
                masks = np.asarray(data["mask"]).astype(bool)
                anatomy = {name: masks[i] for i, name in enumerate(channels)}
            labels = np.asarray(record.labels, np.uint8)
            yield Item(hu, labels, anatomy, record.report, truth(record.name))

    return len(records), with_masks, items


def cohort_items(cohort, classifier: FindingClassifier, config, limit: int):
    """A cohort's committed volumes (manifest order), checked against the classifier's grid."""
    manifest = cohort.manifest.head(limit)
    if manifest.empty:
        raise EvalError(f"{cohort.url}: the cohort has no committed volumes")
    shape = tuple(int(s) for s in manifest["shape"].iloc[0])
    spacing = tuple(float(s) for s in manifest["spacing_mm"].iloc[0])
    if shape != tuple(config.size) or not np.allclose(spacing, config.spacing_mm, atol=1e-3):
        raise EvalError(
            f"{cohort.url}: volumes are {_grid(shape, spacing)}, but the classifier reads "
            f"{_grid(config.size, config.spacing_mm)}; not resampled (that would change what "
            "is measured): use a classifier trained on the cohort's grid"
        )
    missing = [c for c in vocab.COLUMNS if c not in manifest.columns]
    if missing:
        raise EvalError(f"{cohort.url}: manifest lacks label columns {missing}")

    def items() -> Iterator[Item]:
        for _, row in manifest.iterrows():
            volume = cohort.volume(row["volume_id"], masks=True)
            masks = volume.masks or {}
            anatomy = {k: masks[k].astype(bool) for k in ("lungs", "heart") if k in masks}
            labels = np.array([int(row[c]) for c in vocab.COLUMNS], np.uint8)
            yield Item(volume.hu, labels, anatomy if len(anatomy) == 2 else None, row["prompt"])

    return len(manifest), items


def _grid(shape, spacing) -> str:
    return (
        f"{' x '.join(str(int(s)) for s in shape)} voxels at "
        f"{' x '.join(f'{float(s):g}' for s in spacing)} mm"
    )


# ----- summaries ------------------------------------------------------------------------------
def correctness(scores: Scores, classifier: FindingClassifier, threshold: float) -> dict:
    """Factual correctness of a set: the classifier against the set's labels."""
    labels = np.stack(scores.labels)[:, [vocab.COLUMNS.index(c) for c in classifier.findings]]
    return metrics.factual_correctness(
        np.stack(scores.probabilities), labels, classifier.findings, threshold
    )


def finding_measures(scores: Scores) -> dict[str, dict]:
    """For each finding measure (by row id, ``measure.finding_rows``): its mean in volumes
    labelled with and without the finding, the difference and Welch's t-test p-value (None
    when undefined)."""
    if not scores.measures:
        return {}
    labels = np.stack(scores.labels)
    out = {}
    for row, column, key, _sign in measure.finding_rows():
        values = np.array([m[key] for m in scores.measures], float)
        has = labels[:, vocab.COLUMNS.index(column)].astype(bool)
        ok = np.isfinite(values)
        a, b = values[has & ok], values[~has & ok]
        p = None
        if len(a) >= 2 and len(b) >= 2 and (np.ptp(a) > 0 or np.ptp(b) > 0):
            p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
            p = p if math.isfinite(p) else None
        out[row] = {
            "measure": key,
            "with": float(a.mean()) if len(a) else None,
            "without": float(b.mean()) if len(b) else None,
            "difference": float(a.mean() - b.mean()) if len(a) and len(b) else None,
            "p_value": p,
            "n_with": len(a),
            "n_without": len(b),
        }
    return out


def clip_metrics(generated: Scores, real: Scores, clip: ClipModel, ks=(1, 5)) -> dict:
    """CLIP score (mean cosine of each volume with its own text) of both sets, and CLIP's own
    quality on the real set: report-to-volume and volume-to-report Recall@K, and zero-shot
    finding classification ("X" against "no X"), AUC per finding."""
    image, text = torch.cat(real.clip_image), torch.cat(real.clip_text)
    sim = image @ text.T
    labels = np.stack(real.labels)
    columns = list(vocab.COLUMNS)
    with torch.no_grad():
        yes = clip.clip.encode_text([c.lower() for c in columns]).float().cpu()
        no = clip.clip.encode_text([f"no {c.lower()}" for c in columns]).float().cpu()
    zero_shot = (image @ yes.T - image @ no.T).numpy()
    per = {c: metrics.auc(zero_shot[:, j], labels[:, j]) for j, c in enumerate(columns)}
    scored = [v for v in per.values() if math.isfinite(v)]
    return {
        "score": {
            name: float((torch.cat(s.clip_image) * torch.cat(s.clip_text)).sum(1).mean())
            for name, s in (("generated", generated), ("real", real))
        },
        "real_retrieval": {
            **{f"text_to_image_r{k}": metrics.recall_at(sim.T, k) for k in ks},
            **{f"image_to_text_r{k}": metrics.recall_at(sim, k) for k in ks},
            "volumes": len(real),
        },
        "real_zero_shot": {
            "macro_auc": float(np.mean(scored)) if scored else float("nan"),
            "per_finding": per,
        },
    }


def phantom_agreement(real: Scores) -> dict | None:
    """On a phantom reference, where the truth is exact: each measurement against the phantom's
    own (its masks and the volumes it painted). Pearson r, and the mean absolute difference of
    the cardiothoracic ratio; None without ground truth or measurements."""
    pairs = [(m, t) for m, t in zip(real.measures, real.truths, strict=False) if t is not None]
    if len(pairs) < 3:
        return None

    def painted(t: dict) -> float:
        effusion = t.get("findings", {}).get("pleural_effusion", {})
        return sum(float(effusion[s]["volume_ml"]) for s in ("left", "right") if s in effusion)

    series = {
        "ctr": [(m["ctr"], t["measurements"].get("cardiothoracic_ratio")) for m, t in pairs],
        "laa950_pct": [
            (m["laa950_pct"], t["measurements"].get("laa950_percent")) for m, t in pairs
        ],
        "effusion_ml": [(m["effusion_ml"], painted(t)) for m, t in pairs],
    }
    out: dict = {"volumes": len(pairs)}
    for key, values in series.items():
        ok = np.array(
            [(a, b) for a, b in values if b is not None and math.isfinite(a)], float
        ).reshape(-1, 2)
        r = (
            float(np.corrcoef(ok[:, 0], ok[:, 1])[0, 1])
            if len(ok) >= 3 and ok.std(axis=0).min() > 0
            else None
        )
        out[key] = {"pearson_r": r, "n": len(ok)}
        if key == "ctr" and len(ok):
            out[key]["mean_abs_difference"] = float(np.abs(ok[:, 0] - ok[:, 1]).mean())
    return out


def compare(
    generated: Scores,
    real: Scores,
    classifier: FindingClassifier,
    threshold: float = 0.5,
    clip: ClipModel | None = None,
) -> dict:
    """Every metric of the generated set beside the same on the real reference."""
    gen_fc = correctness(generated, classifier, threshold)
    real_fc = correctness(real, classifier, threshold)
    ratio = (
        gen_fc["macro_auc"] / real_fc["macro_auc"]
        if math.isfinite(gen_fc["macro_auc"]) and real_fc["macro_auc"]
        else float("nan")
    )
    return {
        "factual_correctness": {"generated": gen_fc, "real": real_fc, "auc_ratio": ratio},
        "distances": metrics.distances(generated.features(), real.features()),
        "measurements": {
            "generated": finding_measures(generated),
            "real": finding_measures(real),
            "phantom_agreement": phantom_agreement(real),
            "definitions": measure.MEASURES,
        },
        "hu_quartiles": {
            "generated": measure.quartiles(generated.hu_sample),
            "real": measure.quartiles(real.hu_sample),
        },
        "volumes": {"generated": len(generated), "real": len(real)},
        "clip": clip_metrics(generated, real, clip) if clip is not None else None,
    }
