"""Reference label sets: where a cohort's co-occurrence (and optionally demographics) come from.

A reference is a weighted set of label sets (rows, 18 findings in vocabulary order). The planner
reweights it to the spec's targets, so findings the spec does not mention keep the reference's
association with those it does. Its digest enters the plan hash.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from factory import vocab
from factory.cohort.spec_schema import CohortSpec
from factory.refs import parse_ref

PHANTOM_SIZE = 20_000  # label sets drawn from the phantom's population model
PHANTOM_SEED = 0
CHECKPOINT_LABELS = "labels.csv"  # the training labels a checkpoint directory records
AGE_COLUMN, SEX_COLUMN = "PatientAge", "PatientSex"  # optional, as in CT-RATE's metadata


@dataclass(frozen=True)
class Reference:
    """Label sets (m, 18) uint8 with weights summing to 1, and ages/sexes when known.

    ``exact`` marks an exact distribution (every label set with its probability) rather than a
    sample, for which an effective sample size means nothing.
    """

    description: str
    labels: np.ndarray
    weights: np.ndarray
    age: np.ndarray | None
    sex: np.ndarray | None
    exact: bool
    digest: str

    @property
    def size(self) -> int:
        return len(self.labels)


def _digest(kind: str, *arrays: np.ndarray | None) -> str:
    h = hashlib.sha256(kind.encode())
    for array in arrays:
        h.update(b"-" if array is None else np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def sample_reference(
    description: str,
    labels: np.ndarray,
    age: np.ndarray | None = None,
    sex: np.ndarray | None = None,
) -> Reference:
    """A reference from a sample of label sets, each weighing the same."""
    labels = np.ascontiguousarray(labels, dtype=np.uint8)
    age = None if age is None else np.asarray(age, dtype=np.int64)
    sex = None if sex is None else np.asarray(sex, dtype="<U1")
    weights = np.full(len(labels), 1.0 / len(labels))
    digest = _digest("sample", labels, age, sex)
    return Reference(description, labels, weights, age, sex, False, digest)


def independent_reference() -> Reference:
    """Every one of the 2^18 label sets, weighted as if findings were independent at the
    vocabulary's reference prevalences."""
    k = len(vocab.FINDING_IDS)
    labels = ((np.arange(2**k)[:, None] >> np.arange(k)) & 1).astype(np.uint8)
    p = np.array([f.prevalence for f in vocab.FINDINGS])
    weights = np.exp(labels @ np.log(p) + (1 - labels) @ np.log1p(-p))
    weights /= weights.sum()
    description = "independent findings at the vocabulary's reference prevalences"
    return Reference(description, labels, weights, None, None, True, _digest("independent", p))


def phantom_reference() -> Reference:
    """Label sets, ages and sexes from the phantom's calibrated population model."""
    from factory.population import sample_population

    population = sample_population(PHANTOM_SIZE, PHANTOM_SEED)
    description = f"phantom population ({PHANTOM_SIZE:,} label sets, seed {PHANTOM_SEED})"
    return sample_reference(description, population.labels, population.age, population.sex)


def _demographics(frame: pd.DataFrame) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Ages and sexes from optional CT-RATE metadata columns (``045Y`` or 45; ``M``/``F``)."""
    if AGE_COLUMN not in frame or SEX_COLUMN not in frame:
        return None, None
    age = pd.to_numeric(frame[AGE_COLUMN].astype(str).str.strip().str.rstrip("Yy"), errors="coerce")
    sex = frame[SEX_COLUMN].astype(str).str.strip().str.upper()
    lo, hi = vocab.AGE_RANGE
    if age.isna().any() or not age.between(lo, hi).all() or not sex.isin(["M", "F"]).all():
        return None, None
    return age.to_numpy(np.int64), sex.to_numpy("<U1")


def read_labels_csv(location: str) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Labels (m, 18) uint8 from a CT-RATE layout CSV (VolumeName, then the 18 columns, 0/1).

    Also reads PatientAge and PatientSex when both are present and valid. Raises ValueError
    with a message a person can act on.
    """
    import fsspec

    try:
        with fsspec.open(location, "rt", encoding="utf-8") as f:
            frame = pd.read_csv(f)
    except Exception as exc:  # OSError, a parser's error, or a store's (no credentials, say)
        raise ValueError(f"cannot read {location}: {' '.join(str(exc).split())}") from None
    missing = [c for c in vocab.COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{location} lacks the columns {', '.join(missing)}; expected a CT-RATE labels CSV: "
            "VolumeName, then the 18 finding columns with 0/1 values"
        )
    if frame.empty:
        raise ValueError(f"{location} has no rows; expected one row of labels per volume")
    values = frame[list(vocab.COLUMNS)]
    bad = ~values.isin([0, 1])
    if bad.to_numpy().any():
        row, col = np.argwhere(bad.to_numpy())[0]
        value = values.iat[row, col]
        value = value.item() if isinstance(value, np.generic) else value
        raise ValueError(
            f"{location} row {row + 2}, column {vocab.COLUMNS[col]!r}: "
            f"{value!r} is not a label; expected 0 or 1"
        )
    age, sex = _demographics(frame)
    return values.to_numpy(np.uint8), age, sex


def _csv_reference(spec: CohortSpec, location: str, path: tuple[str, ...], what: str) -> Reference:
    try:
        labels, age, sex = read_labels_csv(location)
    except ValueError as exc:
        raise spec.error(path, str(exc)) from None
    return sample_reference(f"{what} ({len(labels):,} label sets)", labels, age, sex)


def load_reference(spec: CohortSpec) -> Reference:
    """The reference a spec names; a located SpecError when it cannot be read."""
    kind = spec.reference.kind
    if kind == "independent":
        return independent_reference()
    if kind == "phantom" or (kind == "model" and parse_ref(spec.model).kind == "builtin"):
        return phantom_reference()
    if kind == "labels_csv":
        location = spec.resolve_input(str(spec.reference.labels_csv))
        return _csv_reference(spec, location, ("reference", "labels_csv"), f"labels CSV {location}")
    import fsspec

    location = spec.resolve_input(spec.model).rstrip("/") + "/" + CHECKPOINT_LABELS
    try:
        fs, inner = fsspec.core.url_to_fs(location)
        found = fs.exists(inner)
    except Exception as exc:  # OSError, ImportError, or a store's (no credentials, say)
        raise spec.error(("model",), f"cannot reach {location}: {exc}") from None
    if not found:
        raise spec.error(
            ("model",),
            f"the checkpoint directory has no {CHECKPOINT_LABELS} ({location}), so reference: "
            f"model has no label statistics; valid: a model directory with {CHECKPOINT_LABELS} "
            "in CT-RATE label layout, or reference: phantom, independent or {labels_csv: ...}",
        )
    return _csv_reference(spec, location, ("model",), f"training labels of {spec.model}")
