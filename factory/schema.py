"""Schema contract: the plan, manifest and result columns, and the typed run settings.

The planner writes :data:`PLAN_FIELDS`, the store appends :data:`RESULT_FIELDS` to make the
manifest, and the actors return :data:`RESULT_SCHEMA` rows; :class:`RunSettings` is what a run
records at the cohort root. They live here, below cohort, store and pipeline, so the store
reads a plan's columns without importing the planner.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from factory import vocab
from factory.errors import CtFactoryError

# One row per volume; the cohort store's manifest starts with the same columns.
PLAN_FIELDS: list[pa.Field] = [
    pa.field("volume_id", pa.string()),
    pa.field("index", pa.int64()),
    *(pa.field(c, pa.uint8()) for c in vocab.COLUMNS),
    pa.field("attributes", pa.string()),  # JSON: {finding id: {attribute: value}}
    pa.field("age", pa.int16()),
    pa.field("sex", pa.string()),
    pa.field("profile", pa.string()),
    pa.field("prompt", pa.string()),
    pa.field("seed", pa.int64()),
]
# Keys of a plan file's Parquet schema metadata.
PLAN_HASH_KEY = b"ctfactory.plan_hash"
SPEC_KEY = b"ctfactory.spec"
REFERENCE_KEY = b"ctfactory.reference"

# What the factory adds per committed volume.
RESULT_FIELDS: list[pa.Field] = [
    pa.field("model_hash", pa.string()),
    pa.field("sampler", pa.string()),  # JSON: steps, guidance, scheduler
    pa.field("shape", pa.list_(pa.int32())),
    pa.field("spacing_mm", pa.list_(pa.float64())),
    pa.field("hu_sha256", pa.string()),
    pa.field("anatomy_sha256", pa.string()),
    pa.field("bytes_stored", pa.int64()),
    pa.field("bytes_raw", pa.int64()),
    pa.field("generate_s", pa.float64()),
    pa.field("write_s", pa.float64()),
    pa.field("hu_mean", pa.float64()),
    pa.field("hu_std", pa.float64()),
    pa.field("hu_p01", pa.float64()),
    pa.field("hu_p50", pa.float64()),
    pa.field("hu_p99", pa.float64()),
    pa.field("committed_at", pa.string()),
    # Which Ray node (its id and host name) and which actor made the volume; null in parts
    # written before these columns, empty node and actor ids outside Ray.
    pa.field("node_id", pa.string()),
    pa.field("host", pa.string()),
    pa.field("actor_id", pa.string()),
    # Label verification (null when the spec has no verify block): the attempts made, the
    # seed of the stored attempt, whether it passed, the checked findings that failed (JSON
    # list) and the classifier's probabilities for the checked findings (JSON object).
    pa.field("attempts", pa.int32()),
    pa.field("sample_seed", pa.int64()),
    pa.field("verified", pa.bool_()),
    pa.field("verify_failed", pa.string()),
    pa.field("verify_scores", pa.string()),
]
MANIFEST_SCHEMA = pa.schema([*PLAN_FIELDS, *RESULT_FIELDS])
# What an actor returns per volume: its manifest row, "written", "skipped" (committed before)
# or "failed" (a write fault that retries did not mend), the error of a failed one, and how
# many tokens of its prompt the text encoder cut (null when not generated now).
RESULT_SCHEMA = pa.schema(
    [
        *MANIFEST_SCHEMA,
        pa.field("status", pa.string()),
        pa.field("error", pa.string()),
        pa.field("prompt_cut", pa.int32()),
    ]
)
# The plan columns a volume's own record (its Zarr group attributes) repeats.
RECORD_KEYS = ("volume_id", "index", "prompt", "seed", "age", "sex", "profile")


class SchemaError(CtFactoryError, ValueError):
    """Recorded settings that do not have the fields this version reads."""


@dataclass(frozen=True)
class RunSettings:
    """What a run records at the cohort root (attribute ``ct_factory``).

    Two runs whose :meth:`identity` is equal make the same volumes, so a re-run resumes; any
    other difference is refused unless the output is overwritten.
    """

    IDENTITY = ("plan_hash", "model_hash", "sampler", "grid", "verify")

    format: str
    cohort_id: str
    n: int
    plan_hash: str
    spec: dict
    model: str
    model_hash: str
    model_name: str
    sampler: dict  # steps, guidance, scheduler, as the actors run them
    grid: dict  # shape, spacing_mm
    anatomy_channels: list = field(default_factory=list)
    hu_window: list = field(default_factory=list)
    verify: dict | None = None  # classifier, classifier_hash, threshold, max_attempts, findings
    ct_factory_version: str = ""
    created: str = ""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (what the cohort root stores)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunSettings:
        """Settings from a root's attributes; names the fields that are missing."""
        names = [f.name for f in dataclasses.fields(cls)]
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [k for k in required if k not in data]
        if missing:
            raise SchemaError(f"run settings without {', '.join(missing)}")
        return cls(**{k: data[k] for k in names if k in data})

    def identity(self) -> dict[str, Any]:
        """The settings that decide what volumes a run makes."""
        return {k: getattr(self, k) for k in self.IDENTITY}

    def differences(self, other: RunSettings) -> list[str]:
        """``key: old -> new`` for each identity key that differs from ``other``'s."""
        mine, theirs = self.identity(), other.identity()
        return [f"{k}: {mine[k]} -> {theirs[k]}" for k in self.IDENTITY if mine[k] != theirs[k]]
