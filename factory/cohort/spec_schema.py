"""The cohort spec's schema: the pydantic models of every key, their types, ranges and
defaults (strict: unknown keys and wrong types are errors). What the keys mean is checked and
resolved in factory.cohort.resolve; docs/cohort-spec.md is the user's reference."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path as FilePath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from factory.cohort.distributions import Bins, Dist
from factory.cohort.errors import Path, SpecError
from factory.cohort.prompts import PromptStyle
from factory.cohort.resolved import Resolved
from factory.cohort.spec_source import Source
from factory.refs import parse_url

MAX_VOLUMES = 10_000_000  # volume ids carry a 7-digit index
REFERENCE_KINDS = ("model", "phantom", "independent")
_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class CohortInfo(_Strict):
    """The cohort's id (in volume ids and paths), its size and its seed."""

    id: str
    n: int = Field(ge=1, le=MAX_VOLUMES)
    seed: int = Field(0, ge=0, le=2**63 - 1)

    @field_validator("id")
    @classmethod
    def _id_form(cls, value: str) -> str:
        if not _ID_PATTERN.match(value):
            raise ValueError(
                "expected 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        return value


class NumericDist(_Strict):
    """A numeric distribution truncated to [min, max]; without ``distribution``, the default
    shape (the vocabulary's, or the reference age distribution) truncated."""

    distribution: Literal["uniform", "triangular", "normal"] | None = None
    min: float | None = None
    max: float | None = None
    mode: float | None = None
    mean: float | None = None
    sd: float | None = Field(None, gt=0)


class AgeSpec(NumericDist):
    """Ages in whole years within 18-102: a distribution, or weighted bins such as ``40-64``."""

    bins: dict[str, float] | None = None


class Demographics(_Strict):
    """Age and sex of the volumes, drawn on their own or jointly with labels from the reference."""

    age: AgeSpec = Field(default_factory=AgeSpec)
    male_fraction: float | None = Field(None, ge=0, le=1)
    follow_reference: bool = False


class LabelSpec(_Strict):
    """One finding: its prevalence or exact count, and attribute distributions when present."""

    prevalence: float | None = Field(None, ge=0, le=1)
    count: int | None = Field(None, ge=0)
    attributes: dict[str, Any] = Field(default_factory=dict)


class ReferenceSpec(_Strict):
    """Where co-occurrence comes from: ``model``, ``phantom``, ``independent`` or a labels CSV."""

    kind: Literal["model", "phantom", "independent", "labels_csv"]
    labels_csv: str | None = Field(None, min_length=1)


class ProfileSpec(_Strict):
    """A named label set (listed findings present, all others absent) with an exact count."""

    name: str = Field(min_length=1)
    count: int | None = Field(None, ge=0)
    prevalence: float | None = Field(None, ge=0, le=1)
    present: list[str] = Field(default_factory=list)


class ConstraintSpec(_Strict):
    """P(then | given) (probability, at_least, at_most, count) or both: [A, B] (prevalence,
    count): how often two findings occur together."""

    given: str | None = None
    then: str | None = None
    both: list[str] | None = Field(None, min_length=2, max_length=2)
    probability: float | None = Field(None, ge=0, le=1)
    at_least: float | None = Field(None, ge=0, le=1)
    at_most: float | None = Field(None, ge=0, le=1)
    prevalence: float | None = Field(None, ge=0, le=1)
    count: int | None = Field(None, ge=0)


class Joint(_Strict):
    """Exact profiles, set aside first, and constraints on pairs of findings."""

    profiles: list[ProfileSpec] = Field(default_factory=list)
    constraints: list[ConstraintSpec] = Field(default_factory=list)


class Allocation(_Strict):
    """``exact``: every count met (or within ``tolerance`` volumes); ``bernoulli``: on average."""

    mode: Literal["exact", "bernoulli"] = "exact"
    tolerance: int = Field(0, ge=0)


class PromptSpec(_Strict):
    """The text prompt style and the seed of its wording (default: the cohort seed)."""

    style: PromptStyle = "report"
    seed: int | None = Field(None, ge=0, le=2**63 - 1)


class SamplerSpec(_Strict):
    """Diffusion sampling settings; each one left out is the model's own (its
    ``diffusion.sampling`` and its objective's scheduler)."""

    steps: int | None = Field(None, ge=1, le=1000)
    guidance: float | None = Field(None, ge=0)
    # None: the model's own (rectified_flow for rflow models, ddim for ddpm ones)
    scheduler: Literal["ddim", "rectified_flow", "ddpm"] | None = None


class VerifySpec(_Strict):
    """Label verification in the generator actors: the classifier checks each volume's
    ``findings`` (default: those named under ``labels``); a failing volume is generated again
    from a new derived seed, at most ``max_attempts`` times in all."""

    classifier: str
    threshold: float = Field(0.5, gt=0, lt=1)
    max_attempts: int = Field(3, ge=1, le=20)
    findings: list[str] | None = None


class CohortSpec(_Strict):
    """A whole cohort spec (see docs/cohort-spec.md)."""

    schema_version: Literal[1]
    cohort: CohortInfo
    demographics: Demographics = Field(default_factory=Demographics)
    labels: dict[str, LabelSpec] = Field(default_factory=dict)
    reference: ReferenceSpec = Field(default_factory=lambda: ReferenceSpec(kind="model"))
    joint: Joint = Field(default_factory=Joint)
    allocation: Allocation = Field(default_factory=Allocation)
    prompt: PromptSpec = Field(default_factory=PromptSpec)
    model: str
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    output: str
    verify: VerifySpec | None = None

    _resolved: Resolved = PrivateAttr()
    _source: Source = PrivateAttr(default_factory=lambda: Source("<spec>", ".", {}))

    @field_validator("reference", mode="before")
    @classmethod
    def _reference_forms(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value not in REFERENCE_KINDS:
                raise ValueError(
                    f"expected one of {', '.join(REFERENCE_KINDS)}, or {{labels_csv: PATH_or_URL}}"
                )
            return {"kind": value}
        if isinstance(value, dict) and "kind" not in value:
            return {"kind": "labels_csv", **value}
        return value

    @property
    def resolved(self) -> Resolved:
        """Names, counts and distributions resolved for the planner (set by ``parse_spec``)."""
        return self._resolved

    @property
    def source(self) -> Source:
        return self._source

    def error(self, path: Path, message: str) -> SpecError:
        """A SpecError located in this spec's file."""
        return SpecError(path, message, self._source.where(path))

    def resolve_input(self, location: str) -> str:
        """A path the spec reads (a reference CSV, a model), relative to the spec's folder."""
        if parse_url(location) is not None or FilePath(location).is_absolute():
            return location
        return str(FilePath(self._source.folder) / location)

    def canonical_json(self) -> str:
        """The spec as planned, in one canonical JSON text (names resolved, defaults filled,
        keys sorted; ``output`` left out: where a plan is written is not what it is)."""
        r = self._resolved
        data = self.model_dump(mode="json", exclude={"output"})
        data["labels"] = {
            fid: {
                "count": t.count,
                "expected": t.expected,
                "attributes": {k: _dist_json(d) for k, d in t.attributes.items()},
            }
            for fid, t in r.targets.items()
        }
        data["joint"] = {
            "profiles": [[p.name, p.count, list(p.present)] for p in r.profiles],
            "constraints": [asdict(rule) for rule in r.rules],
        }
        data["demographics"] = {
            "age": _dist_json(r.age),
            "male_fraction": r.male_fraction,
            "follow_reference": self.demographics.follow_reference,
        }
        data["prompt"]["seed"] = r.prompt_seed
        return json.dumps(data, sort_keys=True, separators=(",", ":"))


def _dist_json(dist: Dist | Bins) -> dict[str, Any]:
    return {type(dist).__name__.lower(): asdict(dist)}


def _dist_json(dist: Dist | Bins) -> dict[str, Any]:
    return {type(dist).__name__.lower(): asdict(dist)}
