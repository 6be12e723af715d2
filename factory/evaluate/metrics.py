"""Metrics on labels and features: factual correctness (AUC, precision), FID and MMD.

AUC is the Mann-Whitney statistic (ties count half), so it needs no thresholds and no extra
package; a finding with only one class among the volumes has no AUC (NaN) and is left out of
the macro average. FID and MMD are MONAI's ``FIDMetric`` and ``MMDMetric`` on feature vectors
from one of our own encoders (no weights can be downloaded): 3D on each volume's pooled
features, 2.5D on per-slab features of the three planes (``plane_features``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.metrics import FIDMetric, MMDMetric
from scipy.stats import rankdata

PLANES: dict[str, int] = {"axial": 2, "coronal": 1, "sagittal": 0}  # axis of (x, y, z) = RAS


def auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels``; NaN without both classes."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def precision(scores: Sequence[float], labels: Sequence[int], threshold: float = 0.5) -> float:
    """Of the volumes scored at or above ``threshold``, the fraction labelled positive."""
    called = np.asarray(scores) >= threshold
    if not called.any():
        return float("nan")
    return float(np.asarray(labels).astype(bool)[called].mean())


def factual_correctness(
    probabilities: np.ndarray,
    labels: np.ndarray,
    findings: Sequence[str],
    threshold: float = 0.5,
) -> dict:
    """Per-finding AUC, precision and counts of classifier probabilities (N, F) against 0/1
    labels (N, F), and the macro AUC over findings that have both classes."""
    probabilities, labels = np.asarray(probabilities), np.asarray(labels)
    if probabilities.shape != labels.shape or probabilities.shape[1] != len(findings):
        raise ValueError(
            f"probabilities {probabilities.shape} and labels {labels.shape} must both be "
            f"(volumes, {len(findings)} findings)"
        )
    per: dict[str, dict] = {}
    for j, name in enumerate(findings):
        per[name] = {
            "auc": auc(probabilities[:, j], labels[:, j]),
            "precision": precision(probabilities[:, j], labels[:, j], threshold),
            "positives": int(labels[:, j].sum()),
            "volumes": len(labels),
        }
    aucs = [v["auc"] for v in per.values() if not np.isnan(v["auc"])]
    precs = [v["precision"] for v in per.values() if not np.isnan(v["precision"])]
    return {
        "macro_auc": float(np.mean(aucs)) if aucs else float("nan"),
        "macro_precision": float(np.mean(precs)) if precs else float("nan"),
        "findings_scored": len(aucs),
        "per_finding": per,
    }


def recall_at(similarity: torch.Tensor, k: int) -> float:
    """Fraction of rows whose own column is among their ``k`` most similar (retrieval R@K)."""
    k = min(k, similarity.shape[1])
    top = similarity.topk(k, dim=1).indices
    return float((top == torch.arange(len(similarity))[:, None]).any(1).float().mean())


def fid(generated: torch.Tensor | np.ndarray, real: torch.Tensor | np.ndarray) -> float:
    """Frechet distance of two feature sets (N, C), MONAI's ``FIDMetric``."""
    a, b = _features(generated, "generated"), _features(real, "real")
    return float(FIDMetric()(a, b))


def mmd(
    generated: torch.Tensor | np.ndarray, real: torch.Tensor | np.ndarray, seed: int = 0
) -> float:
    """MONAI's unbiased linear-kernel ``MMDMetric`` of two feature sets (N, C); the larger set
    is subsampled (seeded) to the smaller one's size, as the metric needs equal counts."""
    a, b = _features(generated, "generated"), _features(real, "real")
    n = min(len(a), len(b))
    gen = torch.Generator().manual_seed(seed)
    a = a[torch.randperm(len(a), generator=gen)[:n]]
    b = b[torch.randperm(len(b), generator=gen)[:n]]
    return float(MMDMetric()(b, a))


def plane_features(feature_maps: torch.Tensor) -> dict[str, torch.Tensor]:
    """(N, C, X, Y, Z) feature maps -> per plane, (N * slabs, C) features: the map averaged
    within each slab of that plane (axial slabs along z, coronal along y, sagittal along x)."""
    if feature_maps.ndim != 5:
        raise ValueError(f"feature maps must be (N, C, X, Y, Z); got {tuple(feature_maps.shape)}")
    out = {}
    for plane, axis in PLANES.items():
        keep = 2 + axis
        others = tuple(d for d in (2, 3, 4) if d != keep)
        slabs = feature_maps.mean(dim=others)  # (N, C, slabs)
        out[plane] = slabs.permute(0, 2, 1).reshape(-1, feature_maps.shape[1])
    return out


def distances(
    generated: Mapping[str, torch.Tensor], real: Mapping[str, torch.Tensor]
) -> dict[str, float]:
    """FID and MMD of matching feature sets: ``volume`` (3D) and the planes (2.5D, their mean
    is ``fid_2_5d``)."""
    out: dict[str, float] = {}
    for name in generated:
        out[f"fid_{name}"] = fid(generated[name], real[name])
        out[f"mmd_{name}"] = mmd(generated[name], real[name])
    planes = [out[f"fid_{p}"] for p in PLANES if f"fid_{p}" in out]
    if planes:
        out["fid_2_5d"] = float(np.mean(planes))
    return out


def _features(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).double()
    if t.ndim != 2 or len(t) < 2:
        raise ValueError(f"{name} features must be (N >= 2, C); got {tuple(t.shape)}")
    return t
