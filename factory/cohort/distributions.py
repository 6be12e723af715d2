"""Distributions a cohort spec can ask for (categorical, numeric, age bins) and seeded draws.

Draws are vectorised over volumes. In exact allocation a categorical distribution is met as
closely as whole volumes allow (largest remainder, then shuffled); otherwise values are drawn
independently per volume.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from factory import vocab
from factory.cohort.allocate import largest_remainder

# Rejection rounds before the rare leftovers of a truncated draw are placed uniformly.
_REJECTION_ROUNDS = 64


@dataclass(frozen=True)
class Choice:
    """A categorical distribution: ``values`` with ``weights`` that sum to 1."""

    values: tuple[str | int | float, ...]
    weights: tuple[float, ...]


@dataclass(frozen=True)
class Numeric:
    """A numeric distribution truncated to [lo, hi].

    ``shape`` is ``uniform`` (on [lo, hi]), ``triangular`` (params: left, mode, right) or
    ``normal`` (params: mean, sd); values are whole numbers when ``integer``, else rounded to
    ``decimals``.
    """

    shape: str
    lo: float
    hi: float
    params: tuple[float, ...] = ()
    integer: bool = False
    decimals: int = 1


@dataclass(frozen=True)
class Bins:
    """Ages in whole-year bins [lo, hi] (inclusive) with ``weights`` that sum to 1."""

    ranges: tuple[tuple[int, int], ...]
    weights: tuple[float, ...]

    @property
    def lo(self) -> int:
        return min(r[0] for r in self.ranges)

    @property
    def hi(self) -> int:
        return max(r[1] for r in self.ranges)

    def bin_of(self, ages: np.ndarray) -> np.ndarray:
        """Index of each age's bin, -1 outside every bin."""
        out = np.full(len(ages), -1, np.int64)
        for i, (lo, hi) in enumerate(self.ranges):
            out[(ages >= lo) & (ages <= hi)] = i
        return out


Dist = Choice | Numeric


def default_distribution(attribute: vocab.Attribute) -> Dist:
    """The vocabulary's own distribution for an attribute (what an unspecified one follows)."""
    if attribute.is_choice:
        weights = attribute.weights or (1.0,) * len(attribute.choices)
        total = sum(weights)
        return Choice(attribute.choices, tuple(w / total for w in weights))
    assert attribute.lo is not None and attribute.hi is not None
    mode = attribute.mode if attribute.mode is not None else attribute.lo
    return Numeric(
        "triangular",
        attribute.lo,
        attribute.hi,
        (attribute.lo, mode, attribute.hi),
        integer=attribute.integer,
    )


def choice_codes(
    weights: tuple[float, ...], n: int, rng: np.random.Generator, exact: bool
) -> np.ndarray:
    """``n`` category indices: exact shares (largest remainder, shuffled) or independent draws."""
    p = np.asarray(weights, np.float64)
    if not exact:
        return rng.choice(len(p), size=n, p=p / p.sum())
    codes = np.repeat(np.arange(len(p)), largest_remainder(p * n, n))
    rng.shuffle(codes)
    return codes


def _shape_draws(dist: Numeric, n: int, rng: np.random.Generator) -> np.ndarray:
    if dist.shape == "uniform":
        return rng.uniform(dist.lo, dist.hi, n)
    if dist.shape == "triangular":
        left, mode, right = dist.params
        if right <= left:
            return np.full(n, left, np.float64)
        return rng.triangular(left, mode, right, n)
    mean, sd = dist.params
    return rng.normal(mean, sd, n)


def draw_numeric(dist: Numeric, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` values from ``dist``: drawn from its shape, redrawn until inside [lo, hi]."""
    out = _shape_draws(dist, n, rng)
    outside = np.flatnonzero((out < dist.lo) | (out > dist.hi))
    for _ in range(_REJECTION_ROUNDS):
        if len(outside) == 0:
            break
        out[outside] = _shape_draws(dist, len(outside), rng)
        outside = outside[(out[outside] < dist.lo) | (out[outside] > dist.hi)]
    out[outside] = rng.uniform(dist.lo, dist.hi, len(outside))
    if dist.integer:
        return np.clip(np.rint(out), np.ceil(dist.lo), np.floor(dist.hi)).astype(np.int64)
    return np.clip(np.round(out, dist.decimals), dist.lo, dist.hi)


def draw(dist: Dist, n: int, rng: np.random.Generator, exact: bool) -> np.ndarray:
    """``n`` values of an attribute distribution (an object array for categorical ones)."""
    if isinstance(dist, Choice):
        values = np.empty(len(dist.values), dtype=object)
        values[:] = dist.values
        return values[choice_codes(dist.weights, n, rng, exact)]
    return draw_numeric(dist, n, rng)


def draw_ages(dist: Numeric | Bins, n: int, rng: np.random.Generator, exact: bool) -> np.ndarray:
    """``n`` whole-year ages: a bin per volume (exact shares or drawn), uniform inside it."""
    if isinstance(dist, Numeric):
        return draw_numeric(dist, n, rng)
    bins = choice_codes(dist.weights, n, rng, exact)
    lo = np.array([r[0] for r in dist.ranges])[bins]
    hi = np.array([r[1] for r in dist.ranges])[bins]
    return lo + (rng.random(n) * (hi - lo + 1)).astype(np.int64)
