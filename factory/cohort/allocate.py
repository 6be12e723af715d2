"""Integer allocation: counts that hit every requested total exactly, drawn close to expectations.

The planner reweights a reference (see :mod:`factory.cohort.raking`) and then needs whole
volumes. :func:`exact_counts` walks the controlled variables one at a time (a binary tree of
label-set prefixes): at each level it splits every branch into "has it" / "has it not" so that
the level's total is exactly the requested count, close to the reweighted reference's
conditional expectation, and within every pairwise band. :func:`largest_remainder` does the
rounding; two repairs move single volumes when greedy splitting falls short: between groups
of a level to bring a joint count into its band, and, at the end, to the label set that differs
in one variable alone to reach a total a level could not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from factory.cohort.errors import Path, PlanningError


def round_half_up(x: float) -> int:
    """The nearest integer, halves rounded up (so 0.5 * 7 gives 4 on every platform)."""
    return int(np.floor(x + 0.5))


def largest_remainder(
    expected: np.ndarray,
    total: int,
    lo: np.ndarray | None = None,
    hi: np.ndarray | None = None,
) -> np.ndarray:
    """Integers summing to ``total``, each the floor or ceiling of ``expected``, within [lo, hi].

    Hamilton's method: take floors, then give the remaining units to the largest fractional
    parts (ties to the lower index). Raises ValueError when the bounds make ``total`` impossible.
    """
    e = np.asarray(expected, dtype=np.float64)
    lo = np.zeros(e.shape, np.int64) if lo is None else np.asarray(lo, np.int64)
    hi = np.full(e.shape, np.iinfo(np.int64).max) if hi is None else np.asarray(hi, np.int64)
    counts = np.clip(np.floor(e), lo, hi).astype(np.int64)
    remainder = e - counts
    short = int(total) - int(counts.sum())
    if short > 0:
        order = np.argsort(-remainder, kind="stable")
        room = order[counts[order] < hi[order]]
        if len(room) < short:
            raise ValueError(f"cannot reach {total} within the upper bounds")
        counts[room[:short]] += 1
    elif short < 0:
        order = np.argsort(remainder, kind="stable")
        room = order[counts[order] > lo[order]]
        if len(room) < -short:
            raise ValueError(f"cannot reach {total} within the lower bounds")
        counts[room[:-short]] -= 1
    return counts


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def split_counts(size: np.ndarray, share: np.ndarray, total: int) -> np.ndarray:
    """How many of each branch's ``size`` volumes get the variable, ``total`` in all.

    ``share`` is each branch's conditional probability under the reweighted reference; the
    shares are shifted on the logit scale until their expectation is ``total`` (the raking
    update, so branches keep their odds ratios), then rounded by largest remainder. A branch
    with share 0 (or 1) never (always) gets it: the reference cannot produce anything else.
    """
    size = np.asarray(size, np.int64)
    share = np.asarray(share, np.float64)
    lo = np.where(share >= 1.0, size, 0)
    hi = np.where(share > 0.0, size, 0)
    if not lo.sum() <= total <= hi.sum():
        raise ValueError(f"{total} is outside the possible range [{lo.sum()}, {hi.sum()}]")
    free = (share > 0.0) & (share < 1.0) & (size > 0)
    expected = lo.astype(np.float64)
    need = total - lo.sum()
    if free.any() and need > 0:
        if need >= size[free].sum():
            expected[free] = size[free]
        else:
            logit = np.log(share[free]) - np.log1p(-share[free])
            low, high = -60.0 - logit.max(), 60.0 - logit.min()
            for _ in range(100):
                mid = 0.5 * (low + high)
                if (size[free] * _sigmoid(logit + mid)).sum() < need:
                    low = mid
                else:
                    high = mid
            expected[free] = size[free] * _sigmoid(logit + 0.5 * (low + high))
    return largest_remainder(expected, total, lo, hi)


@dataclass(frozen=True)
class Quota:
    """A controlled variable's exact total among the volumes.

    A ``requested`` total that the reference cannot reach is an error (or, within the
    tolerance, a warning); any other total (the reference's own expectation) is quietly moved
    to the nearest reachable one.
    """

    total: int
    path: Path
    label: str
    requested: bool = True


@dataclass(frozen=True)
class Pair:
    """Two controlled variables whose joint count must lie in ``band(total of given)``.

    ``given`` is the variable a conditional constraint conditions on (one of a, b), or None for
    a band that does not depend on a total.
    """

    a: int
    b: int
    given: int | None
    band: Callable[[int], tuple[int, int]]
    path: Path
    label: str


def _violation(joint: np.ndarray, bands: np.ndarray) -> float:
    below = np.maximum(bands[:, 0] - joint, 0).sum()
    return float(below + np.maximum(joint - bands[:, 1], 0).sum())


def _repair(
    totals: np.ndarray,
    expected: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    bits: np.ndarray,
    bands: np.ndarray,
) -> np.ndarray:
    """Move single volumes between groups until every joint count is in its band.

    Each move keeps the level total; the best move lowers the violation most and, among those,
    strays least from the expectation. Returns the totals; the caller checks the violation.
    """
    totals = totals.copy()
    while (current := _violation(bits.T @ totals, bands)) > 0:
        best: tuple[float, float, int, int] | None = None
        for g in np.flatnonzero(totals > lo):
            for h in np.flatnonzero(totals < hi):
                if g == h:
                    continue
                trial = totals.copy()
                trial[g] -= 1
                trial[h] += 1
                score = _violation(bits.T @ trial, bands)
                cost = float(((trial - expected) ** 2 / (expected + 1.0)).sum())
                if best is None or (score, cost) < best[:2]:
                    best = (score, cost, int(g), int(h))
        if best is None or best[0] >= current:
            break
        totals[best[2]] -= 1
        totals[best[3]] += 1
    return totals


def _first_member(branch: np.ndarray, n_branches: int) -> np.ndarray:
    first = np.zeros(n_branches, np.int64)
    first[branch[::-1]] = np.arange(len(branch) - 1, -1, -1)
    return first


def exact_counts(
    cells: np.ndarray,
    weights: np.ndarray,
    n: int,
    quotas: Sequence[Quota],
    pairs: Sequence[Pair] = (),
    tolerance: int = 0,
) -> tuple[np.ndarray, list[str]]:
    """Volumes per cell so that every quota total and pair band holds exactly.

    ``cells`` (C, V) bool are the distinct patterns of the V controlled variables with reweighted
    reference ``weights`` (C,), all positive. Returns (counts per cell summing to ``n``,
    warnings). A requested total that a level cannot reach is repaired afterwards by
    :func:`_flip_repair`; what remains fails with an PlanningError naming the quota's path,
    unless it is within ``tolerance`` (then a warning).
    """
    n_cells, n_vars = cells.shape
    branch = np.zeros(n_cells, np.int64)
    size = np.array([n], np.int64)
    reached: list[int] = []
    shortfall: dict[int, int] = {}
    for j in range(n_vars):
        x = cells[:, j].astype(np.float64)
        mass = np.bincount(branch, weights, len(size))
        share = np.divide(
            np.bincount(branch, weights * x, len(size)),
            mass,
            where=mass > 0,
            out=np.zeros(len(size)),
        )
        lo = int(size[share >= 1.0].sum())
        hi = int(size[share > 0.0].sum())
        quota = quotas[j]
        near = min(max(quota.total, lo), hi)
        if quota.requested and near != quota.total:
            shortfall[j] = quota.total - near
        reached.append(quota.total if quota.requested else near)
        level_pairs = [p for p in pairs if max(p.a, p.b) == j]
        ones = _split_level(size, share, near, branch, cells, level_pairs, reached)
        child = branch * 2 + cells[:, j]
        uniq, branch = np.unique(child, return_inverse=True)
        parent, bit = uniq // 2, uniq % 2
        size = np.where(bit == 1, ones[parent], size[parent] - ones[parent])
    counts = size[branch]
    warnings = _flip_repair(cells, weights, counts, shortfall, quotas, pairs, reached, tolerance)
    return counts, warnings


def _flip_repair(
    cells: np.ndarray,
    weights: np.ndarray,
    counts: np.ndarray,
    shortfall: dict[int, int],
    quotas: Sequence[Quota],
    pairs: Sequence[Pair],
    reached: Sequence[int],
    tolerance: int,
) -> list[str]:
    """Meet the totals the tree fell short of by moving single volumes to the label set that
    differs in just that variable (nothing else controlled changes), most plausible first.

    ``counts`` is changed in place; pair bands are kept.
    """
    warnings: list[str] = []
    if not shortfall:
        return warnings
    index = {row.tobytes(): i for i, row in enumerate(np.packbits(cells, axis=1))}
    bands = [(p, p.band(reached[p.given]) if p.given is not None else p.band(0)) for p in pairs]
    for j, need in shortfall.items():
        step = 1 if need > 0 else -1
        related = [(p.b if p.a == j else p.a, band) for p, band in bands if j in (p.a, p.b)]
        while need:
            joints = [int(counts @ (cells[:, j] & cells[:, other])) for other, _ in related]
            best: tuple[float, int, int] | None = None
            for a in np.flatnonzero((counts > 0) & (cells[:, j] == (step < 0))):
                row = cells[a].copy()
                row[j] = not row[j]
                b = index.get(np.packbits(row).tobytes())
                if b is None:
                    continue
                kept = all(
                    lo <= joint + step * int(cells[a, other]) <= hi
                    for joint, (other, (lo, hi)) in zip(joints, related, strict=True)
                )
                if not kept:
                    continue
                ratio = float(weights[b] / weights[a])
                if best is None or ratio > best[0]:
                    best = (ratio, int(a), int(b))
            if best is None:
                break
            counts[best[1]] -= 1
            counts[best[2]] += 1
            need -= step
        if need:
            quota = quotas[j]
            message = (
                f"the reference cannot produce {quota.total} volumes with {quota.label} alongside "
                f"the other targets: {quota.total - need} at best (combinations the reference "
                f"cannot produce); valid: a count the reference supports, or "
                f"allocation.tolerance: {abs(need)}"
            )
            if abs(need) > tolerance:
                raise PlanningError(quota.path, message)
            warnings.append(f"{message}; planned {quota.total - need}, within allocation.tolerance")
    return warnings


def _split_level(
    size: np.ndarray,
    share: np.ndarray,
    total: int,
    branch: np.ndarray,
    cells: np.ndarray,
    pairs: Sequence[Pair],
    reached: Sequence[int],
) -> np.ndarray:
    """Per-branch counts with the variable at one level, honouring the pairs that end here."""
    if not pairs:
        return split_counts(size, share, total)
    others = sorted({min(p.a, p.b) for p in pairs})
    first = _first_member(branch, len(size))
    key = cells[first][:, others].astype(np.int64) @ (1 << np.arange(len(others)))
    groups, group_of = np.unique(key, return_inverse=True)
    bits = ((groups[:, None] >> np.arange(len(others))) & 1).astype(np.int64)
    pair_bits = np.stack([bits[:, others.index(min(p.a, p.b))] for p in pairs], axis=1)
    bands = np.array(
        [p.band(reached[p.given]) if p.given is not None else p.band(0) for p in pairs],
        dtype=np.int64,
    )
    loose = split_counts(size, share, total)
    totals = np.bincount(group_of, loose, len(groups)).astype(np.int64)
    expected = np.bincount(group_of, size * share, len(groups))
    g_lo = np.bincount(group_of, np.where(share >= 1.0, size, 0), len(groups)).astype(np.int64)
    g_hi = np.bincount(group_of, np.where(share > 0.0, size, 0), len(groups)).astype(np.int64)
    totals = _repair(totals, expected, g_lo, g_hi, pair_bits, bands)
    joint = pair_bits.T @ totals
    for p, (low, high), got in zip(pairs, bands, joint, strict=True):
        if not low <= got <= high:
            want = f"{low}" if low == high else f"between {low} and {high}"
            raise PlanningError(
                p.path,
                f"{p.label} cannot be met exactly with the other targets: it needs {want} "
                f"volumes with both, the reference's combinations allow {got} at best; valid: "
                "a looser bound, milder targets, or allocation: {mode: bernoulli}",
            )
    ones = np.zeros(len(size), np.int64)
    for g in range(len(groups)):
        members = np.flatnonzero(group_of == g)
        ones[members] = split_counts(size[members], share[members], int(totals[g]))
    return ones


def systematic_counts(
    cell_counts: np.ndarray, cell_of: np.ndarray, weights: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """How often each row is drawn so that every cell gets exactly its count.

    Systematic sampling within each cell, rows in random order, with probability proportional
    to ``weights``: unbiased (each row's expected count is its share of the cell's count),
    exact per cell, and a row is drawn floor or ceil of its expectation times.
    """
    n_cells = len(cell_counts)
    order = np.lexsort((rng.random(len(cell_of)), cell_of))
    cell = cell_of[order]
    mass = np.bincount(cell_of, weights, n_cells)
    expected = cell_counts[cell] * weights[order] / mass[cell]
    cum = np.cumsum(expected)
    starts = np.searchsorted(cell, np.arange(n_cells))
    offset = np.concatenate([[0.0], cum])[starts]
    within = cum - offset[cell]
    last = np.r_[cell[1:] != cell[:-1], True]
    within[last] = cell_counts[cell[last]]
    start = rng.random(n_cells)[cell]
    before = np.r_[0.0, within[:-1]]
    before[np.r_[True, cell[1:] != cell[:-1]]] = 0.0
    drawn = np.ceil(within - start) - np.ceil(before - start)
    counts = np.zeros(len(cell_of), np.int64)
    counts[order] = drawn.astype(np.int64)
    return counts
