"""Raking (iterative proportional fitting): reweight reference label sets to requested shares.

Works on cells, the distinct patterns of the controlled variables. IPF multiplies whole cells,
so every reference row keeps its share of its cell and the associations the targets do not
touch (odds ratios between findings) stay as in the reference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from factory.cohort.errors import Path, PlanningError

TOLERANCE = 1e-9  # largest share gap at which raking has converged
ACCEPT = 1e-6  # largest share gap still accepted when convergence stalls
MAX_SWEEPS = 2000
STALL_SWEEPS = 100  # a gap that has not halved over this many sweeps has stalled


@dataclass(frozen=True)
class Margin:
    """The share of volumes with ``column`` must be ``target``."""

    column: int
    target: float
    path: Path
    label: str


@dataclass(frozen=True)
class Link:
    """The share of volumes with both ``a`` and ``b`` must lie in ``band(share of given)``.

    ``given`` is ``a`` for a conditional constraint (reweighting then stays within ``a``), or
    None for a pairwise one.
    """

    a: int
    b: int
    given: int | None
    band: Callable[[float], tuple[float, float]]
    path: Path
    label: str


def effective_size(weights: np.ndarray) -> float:
    """Kish's effective sample size of weighted rows: (sum w)^2 / sum w^2."""
    w = np.asarray(weights, np.float64)
    return float(w.sum() ** 2 / np.square(w).sum())


def _scale(w: np.ndarray, inside: np.ndarray, target: float, path: Path, label: str) -> None:
    """Give rows in ``inside`` the share ``target`` of the weight (in place)."""
    share = w[inside].sum()
    total = w.sum()
    if (share <= 0 < target) or (share >= total and target < 1):
        what = f"no volume with {label}" if share <= 0 else f"only volumes with {label}"
        raise PlanningError(
            path,
            f"the reference has {what} among the label sets the other targets allow, so "
            "reweighting cannot produce this target (combinations the reference cannot "
            "produce); valid: a target the reference supports, or reference: independent",
        )
    if share > 0:
        w[inside] *= target * total / share
    if total - share > 0:
        w[~inside] *= (1.0 - target) * total / (total - share)


def _joint_target(w: np.ndarray, link: Link, has: dict[int, np.ndarray]) -> tuple[float, float]:
    """(current share with both, the nearest share within the band)."""
    both = has[link.a] & has[link.b]
    joint = float(w[both].sum())
    cap = float(w[has[link.given]].sum()) if link.given is not None else 1.0
    lo, hi = link.band(cap)
    return joint, min(max(joint, lo), hi, cap)


def _apply_link(w: np.ndarray, link: Link, has: dict[int, np.ndarray]) -> None:
    joint, want = _joint_target(w, link, has)
    if want == joint:
        return
    both = has[link.a] & has[link.b]
    if link.given is None:
        _scale(w, both, want, link.path, f"both {link.label}")
        return
    rest = has[link.given] & ~both
    within = joint + float(w[rest].sum())
    if (joint <= 0 < want) or (within - joint <= 0 < within - want):
        raise PlanningError(
            link.path,
            f"the reference has no label set that lets {link.label} move toward its target, so "
            "reweighting cannot meet it (combinations the reference cannot produce)",
        )
    if joint > 0:
        w[both] *= want / joint
    if within - joint > 0:
        w[rest] *= (within - want) / (within - joint)


def rake(
    cells: np.ndarray,
    base: np.ndarray,
    margins: Sequence[Margin],
    links: Sequence[Link] = (),
) -> np.ndarray:
    """Cell weights (summing to 1) closest to ``base`` in the IPF sense that meet every margin
    and link; PlanningError (naming the target's key path) when the reference cannot."""
    w = np.asarray(base, np.float64) / np.sum(base)
    columns = {m.column for m in margins} | {c for k in links for c in (k.a, k.b)}
    has = {c: cells[:, c].astype(bool) for c in columns}
    gaps: list[float] = []
    for sweep in range(1, MAX_SWEEPS + 1):
        for margin in margins:
            _scale(w, has[margin.column], margin.target, margin.path, margin.label)
        for link in links:
            _apply_link(w, link, has)
        w /= w.sum()
        report = [(abs(float(w[has[m.column]].sum()) - m.target), m.path, m.label) for m in margins]
        for link in links:
            joint, want = _joint_target(w, link, has)
            report.append((abs(want - joint), link.path, f"both {link.label}"))
        gap, path, label = max(report, default=(0.0, (), ""))
        if gap <= TOLERANCE:
            return w
        gaps.append(gap)
        if sweep > STALL_SWEEPS and gap > 0.5 * gaps[-STALL_SWEEPS - 1]:
            break
    if gap <= ACCEPT:
        return w
    raise PlanningError(
        path,
        f"raking did not converge after {sweep} sweeps: the share with {label} stays "
        f"{gap:.3g} away from its target, because the targets together ask for combinations "
        "the reference's co-occurrence cannot give; valid: milder or fewer targets, or "
        "reference: independent",
    )
