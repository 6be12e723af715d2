"""Which label set, demographics and attributes each volume of a plan gets: the steps of
:func:`factory.cohort.plan.make_plan`, each taking what the step before it produced.

1. :func:`reference_pool`: the reference rows a plan may draw from.
2. :func:`set_aside_profiles`: the exact profiles' volumes.
3. :func:`allocate_rest`: the reference raked to what the profiles left of each target, and the
   other volumes allocated (exact quotas or bernoulli draws).
4. :func:`order_volumes`: all volumes shuffled into cohort order, with ages and sexes.
5. :func:`draw_attributes`: attribute values for the volumes with each finding.

Every random choice comes from a named stream of the cohort seed. A step that cannot meet the
spec raises a PlanningError naming the key; the planner locates it in the spec's file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from factory import vocab
from factory.cohort.allocate import (
    Pair,
    Quota,
    exact_counts,
    largest_remainder,
    round_half_up,
    systematic_counts,
)
from factory.cohort.distributions import Bins, default_distribution, draw, draw_ages
from factory.cohort.errors import Path, PlanningError
from factory.cohort.raking import Link, Margin, rake
from factory.cohort.reference import Reference
from factory.cohort.resolved import Resolved, Rule, Target
from factory.cohort.spec_schema import CohortSpec

# Named random streams of the cohort seed: each choice has its own, so changing one part of a
# spec (say, an attribute) does not reshuffle the others.
_PROFILES, _CELLS, _BERNOULLI, _ORDER, _SEX, _AGE, _ATTRIBUTES = range(7)


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *stream]))


@dataclass(frozen=True)
class _Variable:
    """A controlled variable: a row indicator with its whole-cohort total and profile share."""

    key: str
    label: str
    path: Path
    has: np.ndarray
    total: int | None
    expected: float | None
    pinned: int


def _cells(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct rows of a bool matrix and each row's cell index."""
    packed = np.packbits(x, axis=1)
    keys = np.ascontiguousarray(packed).view(np.dtype((np.void, max(packed.shape[1], 1))))
    _, first, cell_of = np.unique(keys.ravel(), return_index=True, return_inverse=True)
    return x[first], cell_of.ravel()


@dataclass(frozen=True)
class Inputs:
    """What planning reads from a spec, read once; every step takes these and what the step
    before it produced."""

    n: int
    seed: int
    exact: bool  # exact allocation (quotas met) rather than bernoulli draws
    follow: bool  # demographics follow the reference
    tolerance: int
    resolved: Resolved

    @classmethod
    def of(cls, spec: CohortSpec) -> Inputs:
        return cls(
            spec.cohort.n,
            spec.cohort.seed,
            spec.allocation.mode == "exact",
            spec.demographics.follow_reference,
            spec.allocation.tolerance,
            spec.resolved,
        )


@dataclass(frozen=True)
class Pool:
    """The reference rows a plan may draw from, their label sets, weights (summing to 1) and
    demographics."""

    labels: np.ndarray
    weights: np.ndarray
    age: np.ndarray | None
    sex: np.ndarray | None


@dataclass(frozen=True)
class Pinned:
    """The exact profiles' volumes, set aside first: label sets, profile index, pool row (or -1)."""

    labels: np.ndarray
    profile: np.ndarray
    source: np.ndarray


@dataclass(frozen=True)
class Rest:
    """The other volumes' pool rows, the raked row weights and the allocation's warnings."""

    rows: np.ndarray
    raked: np.ndarray
    warnings: list[str]


@dataclass(frozen=True)
class Volumes:
    """Every volume in cohort order: label sets, pool row, profile index, age and sex."""

    labels: np.ndarray
    source: np.ndarray
    profile: np.ndarray
    age: np.ndarray
    sex: np.ndarray


def reference_pool(inputs: Inputs, ref: Reference) -> Pool:
    """Step 1: the reference rows a plan may draw, with positive weight (and, when following
    the reference's demographics, an age in range)."""
    usable = ref.weights > 0
    if inputs.follow:
        if ref.age is None or ref.sex is None:
            raise PlanningError(
                ("demographics", "follow_reference"),
                f"the reference ({ref.description}) has no ages and sexes to follow; valid: "
                "false, or a reference with them (phantom, or a labels CSV with PatientAge and "
                "PatientSex)",
            )
        assert isinstance(inputs.resolved.age, Bins)
        usable &= inputs.resolved.age.bin_of(ref.age) >= 0
        if not usable.any():
            raise PlanningError(("demographics", "age"), "no reference volume has an age in range")
    rows = np.flatnonzero(usable)
    return Pool(
        ref.labels[rows],
        ref.weights[rows] / ref.weights[rows].sum(),
        None if ref.age is None else ref.age[rows],
        None if ref.sex is None else ref.sex[rows],
    )


def set_aside_profiles(inputs: Inputs, pool: Pool) -> Pinned:
    """Step 2: the exact profiles' volumes (their pool rows drawn when following the
    reference's demographics)."""
    profiles = inputs.resolved.profiles
    index = np.repeat(np.arange(len(profiles)), [p.count for p in profiles]).astype(np.int64)
    patterns = np.zeros((len(profiles), len(vocab.FINDING_IDS)), np.uint8)
    for k, p in enumerate(profiles):
        patterns[k, [vocab.FINDING_IDS.index(f) for f in p.present]] = 1
    source = np.full(len(index), -1, np.int64)
    if inputs.follow:
        rng = _rng(inputs.seed, _PROFILES)
        for k, p in enumerate(profiles):
            if p.count == 0:
                continue
            match = np.flatnonzero((pool.labels == patterns[k]).all(axis=1))
            if len(match) == 0:
                raise PlanningError(
                    p.path,
                    "the reference has no volume with exactly these findings, so the profile's "
                    "demographics cannot follow it; valid: demographics.follow_reference: false, "
                    "or a profile the reference has",
                )
            counts = systematic_counts(
                np.array([p.count]), np.zeros(len(match), np.int64), pool.weights[match], rng
            )
            source[index == k] = np.repeat(match, counts)
    return Pinned(patterns[index], index, source)


def _variables(inputs: Inputs, pool: Pool, pinned: Pinned) -> list[_Variable]:
    """The controlled variables in allocation order: demographics the spec asks for (when they
    follow the reference), the findings it asks for or constrains, then the other findings
    (``total`` None: as the reference has it). Asked-for ones go first, while the branches of
    the allocation tree are still wide."""
    r, n = inputs.resolved, inputs.n
    labels, age, sex = pool.labels, pool.age, pool.sex
    out: list[_Variable] = []
    if inputs.follow:
        assert age is not None and sex is not None
        if r.male_fraction is not None:
            out.append(
                _Variable(
                    "male",
                    "male sex",
                    ("demographics", "male_fraction"),
                    sex == "M",
                    round_half_up(r.male_fraction * n),
                    r.male_fraction * n,
                    int((sex[pinned.source] == "M").sum()),
                )
            )
        if isinstance(r.age, Bins) and len(r.age.ranges) > 1:
            totals = largest_remainder(np.array(r.age.weights) * n, n)
            bins = r.age.bin_of(age)
            for i, (lo, hi) in enumerate(r.age.ranges):
                out.append(
                    _Variable(
                        f"age:{i}",
                        f"age {lo}-{hi}",
                        ("demographics", "age", "bins", f"{lo}-{hi}"),
                        bins == i,
                        int(totals[i]),
                        r.age.weights[i] * n,
                        int((bins[pinned.source] == i).sum()),
                    )
                )
    ruled = {f for rule in r.rules for f in (rule.a, rule.b)}

    def asked(fid: str) -> Target | None:
        target = r.targets.get(fid)
        return target if target is not None and target.count is not None else None

    for fid in sorted(vocab.FINDING_IDS, key=lambda f: asked(f) is None and f not in ruled):
        j = vocab.FINDING_IDS.index(fid)
        target = asked(fid)
        out.append(
            _Variable(
                fid,
                vocab.BY_ID[fid].column,
                target.count_path if target else ("labels",),
                labels[:, j] == 1,
                target.count if target else None,
                target.expected if target else None,
                int(pinned.labels[:, j].sum()),
            )
        )
    return out


def _rule_bands(
    rule: Rule, variables: list[_Variable], pinned_labels: np.ndarray, n: int, n_rest: int
) -> tuple[Pair, Link]:
    """A rule as an exact-allocation pair and a raking link, both over the volumes left after
    the profiles (their joint counts are subtracted)."""
    columns = {v.key: i for i, v in enumerate(variables)}
    a, b = columns[rule.a], columns[rule.b]
    ja, jb = vocab.FINDING_IDS.index(rule.a), vocab.FINDING_IDS.index(rule.b)
    pinned_joint = int((pinned_labels[:, ja] & pinned_labels[:, jb]).sum())
    pinned_given = variables[a].pinned

    def counts(given_rest: int) -> tuple[int, int]:
        lo, hi = rule.bounds(given_rest + pinned_given, n, exact=True)
        return max(int(lo) - pinned_joint, 0), int(hi) - pinned_joint

    def shares(given_share: float) -> tuple[float, float]:
        lo, hi = rule.bounds(pinned_given + n_rest * given_share, n, exact=False)
        return (lo - pinned_joint) / n_rest, (hi - pinned_joint) / n_rest

    given = a if rule.conditional else None
    label = f"{variables[a].label} and {variables[b].label}"
    pair = Pair(a, b, given, counts, rule.path, rule.describe())
    return pair, Link(a, b, given, shares, rule.path, label)


def allocate_rest(inputs: Inputs, pool: Pool, pinned: Pinned) -> Rest:
    """Step 3: rake the pool's label sets to what the profiles left of each target, then
    allocate the other volumes to pool rows (exact quotas or bernoulli draws)."""
    n_rest = inputs.n - len(pinned.labels)
    if n_rest == 0:
        return Rest(np.zeros(0, np.int64), pool.weights, [])
    weights = pool.weights
    variables = _variables(inputs, pool, pinned)
    cells, cell_of = _cells(np.stack([v.has for v in variables], axis=1))
    base = np.bincount(cell_of, weights, len(cells))
    margins = [
        Margin(
            i,
            min(max(((v.total if inputs.exact else v.expected) - v.pinned) / n_rest, 0.0), 1.0),
            v.path,
            v.label,
        )
        for i, v in enumerate(variables)
        if v.total is not None and v.expected is not None
    ]
    bands = [
        _rule_bands(rule, variables, pinned.labels, inputs.n, n_rest)
        for rule in inputs.resolved.rules
    ]
    raked = rake(cells, base, margins, [link for _, link in bands])
    raked_rows = weights * raked[cell_of] / base[cell_of]
    if not inputs.exact:
        rng = _rng(inputs.seed, _BERNOULLI)
        rows = rng.choice(len(weights), n_rest, p=raked_rows / raked_rows.sum())
        return Rest(rows, raked_rows, [])
    quotas = [
        Quota(v.total - v.pinned, v.path, v.label)
        if v.total is not None
        else Quota(round_half_up(n_rest * raked[cells[:, i]].sum()), v.path, v.label, False)
        for i, v in enumerate(variables)
    ]
    keep = raked > 0
    pairs = [pair for pair, _ in bands]
    counts, warnings = exact_counts(
        cells[keep], raked[keep], n_rest, quotas, pairs, inputs.tolerance
    )
    cell_counts = np.zeros(len(cells), np.int64)
    cell_counts[keep] = counts
    per_row = systematic_counts(cell_counts, cell_of, weights, _rng(inputs.seed, _CELLS))
    return Rest(np.repeat(np.arange(len(weights)), per_row), raked_rows, warnings)


def order_volumes(inputs: Inputs, pool: Pool, pinned: Pinned, rest: Rest) -> Volumes:
    """Step 4: profiles and the rest shuffled into cohort order, with their ages and sexes (the
    reference's when following it, else drawn on their own)."""
    n, seed = inputs.n, inputs.seed
    order = _rng(seed, _ORDER).permutation(n)
    labels = np.concatenate([pinned.labels, pool.labels[rest.rows]])[order]
    source = np.concatenate([pinned.source, rest.rows])[order]
    profile = np.concatenate([pinned.profile, np.full(len(rest.rows), -1, np.int64)])[order]
    if inputs.follow:
        age, sex = pool.age[source], pool.sex[source]  # type: ignore[index]
    else:
        r = inputs.resolved
        age = draw_ages(r.age, n, _rng(seed, _AGE), inputs.exact)
        male = vocab.MALE_FRACTION if r.male_fraction is None else r.male_fraction
        rng = _rng(seed, _SEX)
        if inputs.exact:
            is_male = np.zeros(n, bool)
            is_male[rng.permutation(n)[: round_half_up(male * n)]] = True
        else:
            is_male = rng.random(n) < male
        sex = np.where(is_male, "M", "F")
    return Volumes(labels, source, profile, np.asarray(age, np.int64), np.asarray(sex, "<U1"))


def draw_attributes(inputs: Inputs, labels: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """Step 5: attribute values for the volumes that have each finding: the spec's
    distributions, else the vocabulary's; categorical shares exact in exact allocation."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for j, f in enumerate(vocab.FINDINGS):
        count = int(labels[:, j].sum())
        target = inputs.resolved.targets.get(f.id)
        asked = target.attributes if target is not None else {}
        out[f.id] = {
            name: draw(
                asked.get(name) or default_distribution(attribute),
                count,
                _rng(inputs.seed, _ATTRIBUTES, j, k),
                inputs.exact,
            )
            for k, (name, attribute) in enumerate(f.attributes.items())
        }
    return out
