"""A resolved cohort spec: what the planner reads, with the spec's names resolved to vocabulary
ids, its counts worked out and its distributions built (factory.cohort.resolve makes it)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from factory import vocab
from factory.cohort.allocate import round_half_up
from factory.cohort.distributions import Bins, Dist, Numeric
from factory.cohort.errors import Path


@dataclass(frozen=True)
class Target:
    """One finding named under ``labels``, resolved to its vocabulary id.

    ``count`` is the exact number of volumes asked for (prevalence x n, halves up) and
    ``expected`` the average asked for (bernoulli allocation); both None when only attributes
    are given and the prevalence follows the reference. ``count_path`` is the key that set it.
    """

    fid: str
    path: Path
    count_path: Path
    count: int | None
    expected: float | None
    attributes: dict[str, Dist]


@dataclass(frozen=True)
class Profile:
    """An exact profile: ``count`` volumes with exactly the ``present`` findings."""

    name: str
    path: Path
    count: int
    present: tuple[str, ...]


@dataclass(frozen=True)
class Rule:
    """A constraint on how many volumes have findings ``a`` and ``b`` together.

    Conditional rules (``given`` is ``a``) bound P(b | a) by ``op`` (eq, ge, le) and
    ``probability``, or fix the joint ``count``; pairwise rules fix the joint prevalence or count.
    ``path`` is the key that set the bound.
    """

    path: Path
    a: str
    b: str
    conditional: bool
    op: Literal["eq", "ge", "le"]
    probability: float | None
    count: int | None

    def bounds(self, n_given: float, n: int, exact: bool) -> tuple[float, float]:
        """The band the joint count must lie in, given the count of ``a`` (conditional)."""
        if self.count is not None:
            return float(self.count), float(self.count)
        assert self.probability is not None
        base = n_given if self.conditional else n
        x = self.probability * base
        if not exact:
            return {"eq": (x, x), "ge": (x, base), "le": (0.0, x)}[self.op]
        if self.op == "eq":
            return float(round_half_up(x)), float(round_half_up(x))
        if self.op == "ge":
            return float(math.ceil(x - 1e-9)), float(base)
        return 0.0, float(math.floor(x + 1e-9))

    def describe(self) -> str:
        a, b = vocab.BY_ID[self.a].column, vocab.BY_ID[self.b].column
        if self.count is not None:
            return f"{a} and {b}: {self.count} volumes"
        sign = {"eq": "=", "ge": ">=", "le": "<="}[self.op]
        if self.conditional:
            return f"P({b} | {a}) {sign} {self.probability:g}"
        return f"P({a} and {b}) {sign} {self.probability:g}"


@dataclass(frozen=True)
class Resolved:
    """What the planner reads: the spec's names, counts and distributions, resolved."""

    targets: dict[str, Target]
    profiles: tuple[Profile, ...]
    rules: tuple[Rule, ...]
    age: Numeric | Bins
    male_fraction: float | None
    prompt_seed: int
    verify_columns: tuple[str, ...] | None  # CT-RATE columns the classifier checks, if verifying
