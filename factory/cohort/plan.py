"""From a cohort spec to a plan: one row per volume, computed once, deterministic and hashed.

:func:`make_plan` loads the reference, reads the resolved spec once and runs the steps of
factory.cohort.assign in turn: the reference pool, the exact profiles set aside, the rest raked
and allocated (exact quotas or bernoulli draws), all shuffled with their demographics, then the
attributes; every random choice comes from a named stream of the cohort seed.
:meth:`Plan.write` streams the rows to Parquet in batches, building prompts as it goes, with
the plan hash in the schema metadata.
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
from factory.cohort.assign import (
    Inputs,
    allocate_rest,
    draw_attributes,
    order_volumes,
    reference_pool,
    set_aside_profiles,
)
from factory.cohort.errors import PlanningError
from factory.cohort.raking import effective_size
from factory.cohort.reference import Reference, load_reference
from factory.cohort.spec_schema import CohortSpec
from factory.schema import PLAN_FIELDS, PLAN_HASH_KEY, REFERENCE_KEY, SPEC_KEY
from factory.seeds import PROMPT_SALT, derive_seeds, volume_seeds

PLANNER_VERSION = 1  # bump when the same spec would plan differently
BATCH_ROWS = 16_384  # rows per Parquet row group: bounds the memory held for prompts
ESS_WARN_FRACTION = 0.05  # warn when raking leaves fewer effective label sets than this share
ESS_WARN_MIN = 100  # ... or fewer than this many


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


def make_plan(spec: CohortSpec, reference: Reference | None = None) -> Plan:
    """Plan every volume of ``spec`` (against ``reference``, default: the one the spec names):
    the resolved spec read once, then one step after another, each taking what the last made.

    Raises a located SpecError when the reference cannot satisfy the spec.
    """
    ref = load_reference(spec) if reference is None else reference
    inputs = Inputs.of(spec)
    try:
        pool = reference_pool(inputs, ref)
        pinned = set_aside_profiles(inputs, pool)
        rest = allocate_rest(inputs, pool, pinned)
    except PlanningError as exc:
        raise spec.error(exc.path, exc.message) from None
    volumes = order_volumes(inputs, pool, pinned, rest)
    attributes = draw_attributes(inputs, volumes.labels)

    warnings = rest.warnings
    share = rest.raked / rest.raked.sum()
    ess = None if ref.exact else effective_size(rest.raked)
    if ess is not None and ess < max(ESS_WARN_MIN, ESS_WARN_FRACTION * ref.size):
        warnings.append(
            f"effective sample size after raking is {ess:,.0f} of {ref.size:,} reference label "
            "sets: co-occurrence rests on few of them; consider milder targets or a larger "
            "reference"
        )
    return Plan(
        spec=spec,
        reference=ref,
        labels=volumes.labels,
        age=volumes.age,
        sex=volumes.sex,
        profile=volumes.profile,
        attributes=attributes,
        seeds=volume_seeds(inputs.seed, np.arange(inputs.n)),
        expected=pinned.labels.sum(axis=0) + len(rest.rows) * (share @ pool.labels),
        effective_size=ess,
        plan_hash=plan_hash(spec, ref),
        warnings=warnings,
    )
