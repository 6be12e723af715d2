"""A picture of a plan: planned prevalence per finding next to what was asked, and the label
co-occurrence matrix (phi correlation between findings)."""

from __future__ import annotations

import numpy as np

from factory import vocab
from factory.cohort.plan import Plan
from factory.viz import pyplot


def phi_matrix(labels: np.ndarray) -> np.ndarray:
    """Pairwise phi (Pearson on 0/1) between label columns; NaN where a column is constant."""
    x = labels.astype(np.float64)
    centred = x - x.mean(axis=0)
    cov = centred.T @ centred / len(x)
    sd = np.sqrt(np.diag(cov))
    with np.errstate(invalid="ignore", divide="ignore"):
        return cov / np.outer(sd, sd)


def plot_plan(plan: Plan, path: str) -> None:
    """Write a PNG: planned vs requested prevalence (left), co-occurrence matrix (right)."""
    plt = pyplot()
    n, k = plan.n, len(vocab.FINDINGS)
    planned = plan.labels.sum(axis=0) / n
    targets = plan.spec.resolved.targets
    asked = np.array(
        [
            t.count / n if (t := targets.get(fid)) is not None and t.count is not None else np.nan
            for fid in vocab.FINDING_IDS
        ]
    )
    rows = np.arange(k)
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(16, 7.5), gridspec_kw={"width_ratios": [1, 1.2]}
    )
    left.barh(rows, planned, color="#4c72b0", label="planned")
    left.scatter(
        plan.expected / n,
        rows,
        marker="o",
        facecolors="none",
        edgecolors="#555555",
        label="reference after raking (expected)",
        zorder=3,
    )
    left.scatter(asked, rows, marker="D", color="#dd8452", label="requested", zorder=4)
    left.set_yticks(rows, vocab.COLUMNS)
    left.invert_yaxis()
    left.set_xlim(
        0, max(1e-3, float(np.nanmax([planned.max(), np.nanmax(asked, initial=0)]))) * 1.15
    )
    left.set_xlabel("prevalence (share of volumes)")
    left.set_title("planned prevalence per finding")
    left.legend(loc="lower right", fontsize=8)
    left.grid(axis="x", alpha=0.3)

    phi = phi_matrix(plan.labels)
    np.fill_diagonal(phi, np.nan)
    limit = max(0.2, float(np.nanmax(np.abs(phi), initial=0.0)))
    image = right.imshow(phi, cmap="RdBu_r", vmin=-limit, vmax=limit)
    right.set_xticks(rows, vocab.COLUMNS, rotation=60, ha="right", fontsize=8)
    right.set_yticks(rows, vocab.COLUMNS, fontsize=8)
    right.set_title("label co-occurrence (phi correlation; diagonal blank)")
    fig.colorbar(image, ax=right, fraction=0.046, pad=0.04, label="phi")
    fig.suptitle(f"cohort {plan.spec.cohort.id}: {n:,} volumes ({plan.spec.allocation.mode})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
