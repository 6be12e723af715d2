"""From a cohort spec to a plan: one row per volume, computed once, deterministic and hashed.

:func:`make_plan` loads the reference, sets the exact profiles aside, rakes the reference's
label sets to the remaining targets, allocates whole volumes (exact quotas or bernoulli
draws), shuffles them, and draws demographics and attributes; every random choice comes from a
named stream of the cohort seed. :meth:`Plan.write` streams the rows to Parquet in batches,
building prompts as it goes, with the plan hash in the schema metadata.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from factory import vocab
from factory.cohort import prompts
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
from factory.cohort.raking import Link, Margin, effective_size, rake
from factory.cohort.reference import Reference, load_reference
from factory.cohort.spec import CohortSpec, Rule, Target
from factory.schema import PLAN_FIELDS, PLAN_HASH_KEY, REFERENCE_KEY, SPEC_KEY
from factory.seeds import PROMPT_SALT, derive_seeds, volume_seeds

PLANNER_VERSION = 1  # bump when the same spec would plan differently
BATCH_ROWS = 16_384  # rows per Parquet row group: bounds the memory held for prompts
ESS_WARN_FRACTION = 0.05  # warn when raking leaves fewer effective label sets than this share
ESS_WARN_MIN = 100  # ... or fewer than this many
# Named random streams of the cohort seed: each choice has its own, so changing one part of a
# spec (say, an attribute) does not reshuffle the others.
_PROFILES, _CELLS, _BERNOULLI, _ORDER, _SEX, _AGE, _ATTRIBUTES = range(7)


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *stream]))


@dataclass
class Plan:
    """Every volume of a cohort: labels, attributes, demographics, seeds (prompts on output).

    ``attributes[fid][name]`` holds the values of the rows that have ``fid``, in row order;
    ``profile`` is each row's profile index or -1; ``expected`` is the count per finding the
    reweighted reference implies (the planned count's expectation).
    """

    spec: CohortSpec
    reference: Reference
    labels: np.ndarray
    age: np.ndarray
    sex: np.ndarray
    profile: np.ndarray
    attributes: dict[str, dict[str, np.ndarray]]
    seeds: np.ndarray
    expected: np.ndarray
    effective_size: float | None
    plan_hash: str
    warnings: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.labels)

    def schema(self) -> pa.Schema:
        """The Parquet schema, with the plan hash, canonical spec and reference in metadata."""
        reference = {
            "description": self.reference.description,
            "size": self.reference.size,
            "digest": self.reference.digest,
        }
        metadata = {
            PLAN_HASH_KEY: self.plan_hash.encode(),
            SPEC_KEY: self.spec.canonical_json().encode(),
            REFERENCE_KEY: json.dumps(reference, sort_keys=True).encode(),
        }
        return pa.schema(PLAN_FIELDS, metadata=metadata)

    @cached_property
    def _present(self) -> list[np.ndarray]:
        """Rows with each finding, in vocabulary order (``attributes`` is aligned with them)."""
        return [np.flatnonzero(self.labels[:, j]) for j in range(len(vocab.FINDING_IDS))]

    def _row_attributes(self, start: int, stop: int) -> list[dict[str, dict[str, object]]]:
        """Each row's attributes, ``{fid: {name: value}}`` for its present findings."""
        rows: list[dict[str, dict[str, object]]] = [{} for _ in range(stop - start)]
        for fid, present in zip(vocab.FINDING_IDS, self._present, strict=True):
            lo, hi = np.searchsorted(present, [start, stop])
            if lo == hi:
                continue
            values = {name: v[lo:hi].tolist() for name, v in self.attributes[fid].items()}
            for k, row in enumerate((present[lo:hi] - start).tolist()):
                rows[row][fid] = {name: v[k] for name, v in values.items()}
        return rows

    def batches(self, size: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
        """The plan's rows as record batches; prompts are built here, per batch."""
        schema = self.schema()
        cohort_id = self.spec.cohort.id
        style = self.spec.prompt.style
        names = np.array([p.name for p in self.spec.resolved.profiles] + [None], dtype=object)
        for start in range(0, self.n, size):
            stop = min(start + size, self.n)
            index = np.arange(start, stop)
            attrs = self._row_attributes(start, stop)
            prompt_seeds = derive_seeds(self.spec.resolved.prompt_seed, index, PROMPT_SALT)
            ages, sexes = self.age[start:stop].tolist(), self.sex[start:stop].tolist()
            texts = [
                prompts.build_prompt(style, dict.fromkeys(a, 1), a, age, sex, random.Random(int(s)))
                for a, age, sex, s in zip(attrs, ages, sexes, prompt_seeds.tolist(), strict=True)
            ]
            arrays = [
                pa.array([f"{cohort_id}_{i:07d}" for i in range(start, stop)], pa.string()),
                pa.array(index, pa.int64()),
                *(
                    pa.array(self.labels[start:stop, j], pa.uint8())
                    for j in range(len(vocab.COLUMNS))
                ),
                pa.array([json.dumps(a, separators=(",", ":")) for a in attrs], pa.string()),
                pa.array(self.age[start:stop], pa.int16()),
                pa.array(sexes, pa.string()),
                pa.array(names[self.profile[start:stop]], pa.string()),
                pa.array(texts, pa.string()),
                pa.array(self.seeds[start:stop], pa.int64()),
            ]
            yield pa.RecordBatch.from_arrays(arrays, schema=schema)

    def write(self, path: str, storage_options: dict | None = None) -> None:
        """Write the plan as Parquet (zstd, one row group per batch); same spec, same bytes.

        A local file is written next to its destination and renamed into place, so a failed
        run leaves any earlier plan intact; fsspec URLs (s3://...) are written directly (an
        object appears whole or not at all), with ``storage_options`` for the filesystem.
        """
        schema = self.schema()
        if "://" in path:
            import fsspec

            opened = fsspec.open(path, "wb", **(storage_options or {}))
            with opened as f, pq.ParquetWriter(f, schema, compression="zstd") as w:
                for batch in self.batches():
                    w.write_batch(batch)
            return
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
                for batch in self.batches():
                    writer.write_batch(batch)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def read_plan_metadata(path: str) -> dict[str, object]:
    """The plan hash, canonical spec and reference recorded in a plan file's schema."""
    metadata = pq.read_schema(path).metadata or {}
    return {
        "plan_hash": metadata[PLAN_HASH_KEY].decode(),
        "spec": json.loads(metadata[SPEC_KEY]),
        "reference": json.loads(metadata[REFERENCE_KEY]),
    }


def plan_hash(spec: CohortSpec, reference: Reference) -> str:
    """sha256 of the planner version, the canonical spec and the reference digest."""
    text = f"ct-factory plan v{PLANNER_VERSION}\n{spec.canonical_json()}\n{reference.digest}"
    return hashlib.sha256(text.encode()).hexdigest()


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


def _profile_rows(
    spec: CohortSpec, ref_labels: np.ndarray, weights: np.ndarray, follow: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(label sets, profile index, reference row or -1) of the profile volumes."""
    profiles = spec.resolved.profiles
    index = np.repeat(np.arange(len(profiles)), [p.count for p in profiles]).astype(np.int64)
    patterns = np.zeros((len(profiles), len(vocab.FINDING_IDS)), np.uint8)
    for k, p in enumerate(profiles):
        patterns[k, [vocab.FINDING_IDS.index(f) for f in p.present]] = 1
    source = np.full(len(index), -1, np.int64)
    if follow:
        rng = _rng(spec.cohort.seed, _PROFILES)
        for k, p in enumerate(profiles):
            if p.count == 0:
                continue
            match = np.flatnonzero((ref_labels == patterns[k]).all(axis=1))
            if len(match) == 0:
                raise spec.error(
                    p.path,
                    "the reference has no volume with exactly these findings, so the profile's "
                    "demographics cannot follow it; valid: demographics.follow_reference: false, "
                    "or a profile the reference has",
                )
            counts = systematic_counts(
                np.array([p.count]), np.zeros(len(match), np.int64), weights[match], rng
            )
            source[index == k] = np.repeat(match, counts)
    return patterns[index], index, source


def _variables(
    spec: CohortSpec,
    labels: np.ndarray,
    age: np.ndarray | None,
    sex: np.ndarray | None,
    pinned_labels: np.ndarray,
    pinned_source: np.ndarray,
) -> list[_Variable]:
    """The controlled variables in allocation order: demographics the spec asks for (when they
    follow the reference), the findings it asks for or constrains, then the other findings
    (``total`` None: as the reference has it). Asked-for ones go first, while the branches of
    the allocation tree are still wide."""
    r = spec.resolved
    n = spec.cohort.n
    out: list[_Variable] = []
    if spec.demographics.follow_reference:
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
                    int((sex[pinned_source] == "M").sum()),
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
                        int((bins[pinned_source] == i).sum()),
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
                int(pinned_labels[:, j].sum()),
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


def _usable_rows(spec: CohortSpec, ref: Reference) -> np.ndarray:
    """Reference rows a plan may draw: positive weight, and ages in range when following."""
    usable = ref.weights > 0
    if not spec.demographics.follow_reference:
        return np.flatnonzero(usable)
    if ref.age is None or ref.sex is None:
        raise spec.error(
            ("demographics", "follow_reference"),
            f"the reference ({ref.description}) has no ages and sexes to follow; valid: false, "
            "or a reference with them (phantom, or a labels CSV with PatientAge and PatientSex)",
        )
    assert isinstance(spec.resolved.age, Bins)
    usable &= spec.resolved.age.bin_of(ref.age) >= 0
    if not usable.any():
        raise spec.error(("demographics", "age"), "no reference volume has an age in range")
    return np.flatnonzero(usable)


def _allocate_rest(
    spec: CohortSpec,
    variables: list[_Variable],
    weights: np.ndarray,
    pinned_labels: np.ndarray,
    n_rest: int,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(reference row of each volume after the profiles, raked row weights, warnings)."""
    if n_rest == 0:
        return np.zeros(0, np.int64), weights, []
    exact = spec.allocation.mode == "exact"
    cells, cell_of = _cells(np.stack([v.has for v in variables], axis=1))
    base = np.bincount(cell_of, weights, len(cells))
    margins = [
        Margin(
            i,
            min(max(((v.total if exact else v.expected) - v.pinned) / n_rest, 0.0), 1.0),
            v.path,
            v.label,
        )
        for i, v in enumerate(variables)
        if v.total is not None and v.expected is not None
    ]
    n = spec.cohort.n
    bands = [_rule_bands(rule, variables, pinned_labels, n, n_rest) for rule in spec.resolved.rules]
    try:
        raked = rake(cells, base, margins, [link for _, link in bands])
    except PlanningError as exc:
        raise spec.error(exc.path, exc.message) from None
    raked_rows = weights * raked[cell_of] / base[cell_of]
    if not exact:
        rng = _rng(spec.cohort.seed, _BERNOULLI)
        return rng.choice(len(weights), n_rest, p=raked_rows / raked_rows.sum()), raked_rows, []
    quotas = [
        Quota(v.total - v.pinned, v.path, v.label)
        if v.total is not None
        else Quota(round_half_up(n_rest * raked[cells[:, i]].sum()), v.path, v.label, False)
        for i, v in enumerate(variables)
    ]
    keep = raked > 0
    pairs = [pair for pair, _ in bands]
    try:
        counts, warnings = exact_counts(
            cells[keep], raked[keep], n_rest, quotas, pairs, spec.allocation.tolerance
        )
    except PlanningError as exc:
        raise spec.error(exc.path, exc.message) from None
    cell_counts = np.zeros(len(cells), np.int64)
    cell_counts[keep] = counts
    per_row = systematic_counts(cell_counts, cell_of, weights, _rng(spec.cohort.seed, _CELLS))
    return np.repeat(np.arange(len(weights)), per_row), raked_rows, warnings


def _own_demographics(spec: CohortSpec, exact: bool) -> tuple[np.ndarray, np.ndarray]:
    """Ages and sexes drawn on their own (not following the reference)."""
    r = spec.resolved
    n, seed = spec.cohort.n, spec.cohort.seed
    age = draw_ages(r.age, n, _rng(seed, _AGE), exact)
    male = vocab.MALE_FRACTION if r.male_fraction is None else r.male_fraction
    rng = _rng(seed, _SEX)
    if exact:
        is_male = np.zeros(n, bool)
        is_male[rng.permutation(n)[: round_half_up(male * n)]] = True
    else:
        is_male = rng.random(n) < male
    return age, np.where(is_male, "M", "F")


def make_plan(spec: CohortSpec, reference: Reference | None = None) -> Plan:
    """Plan every volume of ``spec`` (against ``reference``, default: the one the spec names).

    Raises a located SpecError when the reference cannot satisfy the spec.
    """
    ref = load_reference(spec) if reference is None else reference
    n, seed = spec.cohort.n, spec.cohort.seed
    exact = spec.allocation.mode == "exact"
    follow = spec.demographics.follow_reference
    rows = _usable_rows(spec, ref)
    labels, weights = ref.labels[rows], ref.weights[rows] / ref.weights[rows].sum()
    ages = None if ref.age is None else ref.age[rows]
    sexes = None if ref.sex is None else ref.sex[rows]

    pinned_labels, profile_of, pinned_source = _profile_rows(spec, labels, weights, follow)
    n_rest = n - len(pinned_labels)
    variables = _variables(spec, labels, ages, sexes, pinned_labels, pinned_source)
    rest_rows, raked_rows, warnings = _allocate_rest(
        spec, variables, weights, pinned_labels, n_rest
    )
    order = _rng(seed, _ORDER).permutation(n)
    all_labels = np.concatenate([pinned_labels, labels[rest_rows]])[order]
    source = np.concatenate([pinned_source, rest_rows])[order]
    profile = np.concatenate([profile_of, np.full(n_rest, -1, np.int64)])[order]
    if follow:
        age, sex = ages[source], sexes[source]  # type: ignore[index]
    else:
        age, sex = _own_demographics(spec, exact)

    share = raked_rows / raked_rows.sum()
    ess = None if ref.exact else effective_size(raked_rows)
    if ess is not None and ess < max(ESS_WARN_MIN, ESS_WARN_FRACTION * ref.size):
        warnings.append(
            f"effective sample size after raking is {ess:,.0f} of {ref.size:,} reference label "
            "sets: co-occurrence rests on few of them; consider milder targets or a larger "
            "reference"
        )
    return Plan(
        spec=spec,
        reference=ref,
        labels=all_labels,
        age=np.asarray(age, np.int64),
        sex=np.asarray(sex, "<U1"),
        profile=profile,
        attributes=_draw_attributes(spec, all_labels, exact),
        seeds=volume_seeds(seed, np.arange(n)),
        expected=pinned_labels.sum(axis=0) + n_rest * (share @ labels),
        effective_size=ess,
        plan_hash=plan_hash(spec, ref),
        warnings=warnings,
    )


def _draw_attributes(
    spec: CohortSpec, labels: np.ndarray, exact: bool
) -> dict[str, dict[str, np.ndarray]]:
    """Attribute values for the rows that have each finding: the spec's distributions, else
    the vocabulary's; categorical shares exact in exact allocation."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for j, f in enumerate(vocab.FINDINGS):
        count = int(labels[:, j].sum())
        target = spec.resolved.targets.get(f.id)
        asked = target.attributes if target is not None else {}
        out[f.id] = {
            name: draw(
                asked.get(name) or default_distribution(attribute),
                count,
                _rng(spec.cohort.seed, _ATTRIBUTES, j, k),
                exact,
            )
            for k, (name, attribute) in enumerate(f.attributes.items())
        }
    return out
