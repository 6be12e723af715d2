"""The cohort spec: a YAML language for what a synthetic cohort must contain.

:func:`load_spec` turns a YAML file into a validated :class:`CohortSpec`. Pydantic checks shape
and types (strict: unknown keys and wrong types are errors); the spec's own validator checks
meaning (finding names, sums, bounds, counts against profiles, Fréchet bounds) and resolves
names to vocabulary ids, counts and distributions for the planner. Every problem is a
:class:`SpecError` naming the file and line, the key path and what would be valid, raised
before anything is planned or generated. docs/cohort-spec.md is the user's reference.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import types
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path as FilePath
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from factory import vocab
from factory.cohort.allocate import round_half_up
from factory.cohort.distributions import Bins, Choice, Dist, Numeric, default_distribution
from factory.cohort.errors import Path, SpecError, format_path
from factory.cohort.prompts import PromptStyle
from factory.refs import RefError, parse_ref, parse_url

MAX_VOLUMES = 10_000_000  # volume ids carry a 7-digit index
WEIGHT_TOLERANCE = 1e-6  # how far from 1 a distribution's weights may sum
REFERENCE_KINDS = ("model", "phantom", "independent")
DEFAULT_AGE = Numeric(
    "normal", *vocab.AGE_RANGE, params=(vocab.AGE_MEAN, vocab.AGE_SD), integer=True
)
_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_BIN_PATTERN = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)|(\+))\s*$")


@dataclass(frozen=True)
class Source:
    """Where a spec came from: its file name, folder and the line of every key path."""

    name: str
    folder: str
    lines: Mapping[tuple[str, ...], int]

    def where(self, path: Path) -> str:
        """``file:line`` of the deepest part of ``path`` that the file spells out."""
        parts = tuple(str(p) for p in path)
        for k in range(len(parts), -1, -1):
            line = self.lines.get(parts[:k])
            if line is not None:
                return f"{self.name}:{line}"
        return self.name


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

    def columns(self, spec: CohortSpec) -> list[str]:
        """The CT-RATE columns to check, in vocabulary order."""
        if self.findings is None:
            fids = set(spec.resolved.targets)
        else:
            fids = {_names(f, ("verify", "findings", i)) for i, f in enumerate(self.findings)}
        return [f.column for f in vocab.FINDINGS if f.id in fids]


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

    @model_validator(mode="after")
    def _resolve(self) -> CohortSpec:
        self._resolved = _resolve(self)
        return self

    @property
    def resolved(self) -> Resolved:
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


def _names(value: str, path: Path) -> str:
    try:
        return vocab.resolve(value)
    except vocab.VocabError as exc:
        raise SpecError(path, str(exc)) from None


def _column(fid: str) -> str:
    return vocab.BY_ID[fid].column


def _vocab_check(attribute: vocab.Attribute) -> Callable[[Any, Path], Any]:
    def check(value: Any, path: Path) -> Any:
        where = format_path(path)
        try:
            return attribute.check(value, where)
        except vocab.VocabError as exc:
            raise SpecError(path, str(exc).removeprefix(f"{where}: ")) from None

    return check


def _age_check(value: Any, path: Path) -> int:
    lo, hi = vocab.AGE_RANGE
    if not float(value).is_integer() or not lo <= value <= hi:
        raise SpecError(path, f"{value:g} is out of range; expected a whole age in [{lo}, {hi}]")
    return int(value)


def _weights(raw: Mapping[Any, Any], path: Path, check: Callable[[Any, Path], Any]) -> Choice:
    """A categorical distribution from ``{value: weight}``; weights must sum to 1."""
    if not raw:
        raise SpecError(path, "is empty; give values with weights that sum to 1")
    values: list[Any] = []
    weights: list[float] = []
    for key, weight in raw.items():
        value = check(key, (*path, key))
        if value in values:
            raise SpecError((*path, key), f"{value!r} is given twice")
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 <= weight <= 1:
            raise SpecError((*path, key), f"weight {weight!r} is not valid; expected 0 to 1")
        values.append(value)
        weights.append(float(weight))
    total = sum(weights)
    if abs(total - 1.0) > WEIGHT_TOLERANCE:
        listed = ", ".join(f"{v}: {w:g}" for v, w in zip(values, weights, strict=True))
        raise SpecError(path, f"weights sum to {total:g} ({listed}); they must sum to 1")
    return Choice(tuple(values), tuple(w / total for w in weights))


def _numeric(
    d: NumericDist, path: Path, default: Numeric, check: Callable[[Any, Path], Any]
) -> Numeric:
    """A truncated numeric distribution; bounds and parameters checked against the defaults'."""
    lo = default.lo if d.min is None else check(d.min, (*path, "min"))
    hi = default.hi if d.max is None else check(d.max, (*path, "max"))
    if lo > hi:
        raise SpecError((*path, "max"), f"{hi:g} is below min {lo:g}; expected max >= min")
    needs = {None: (), "uniform": (), "triangular": ("mode",), "normal": ("mean", "sd")}
    wanted = needs[d.distribution]
    for key in ("mode", "mean", "sd"):
        given = getattr(d, key) is not None
        if given and key not in wanted:
            shape = "triangular" if key == "mode" else "normal"
            raise SpecError((*path, key), f"{key} only applies to distribution: {shape}")
        if not given and key in wanted:
            raise SpecError(
                (*path, "distribution"),
                f"distribution: {d.distribution} needs {' and '.join(wanted)}",
            )
    for key in ("mode", "mean"):
        value = getattr(d, key)
        if value is not None and not lo <= value <= hi:
            raise SpecError((*path, key), f"{value:g} is outside [min, max] = [{lo:g}, {hi:g}]")
    if d.distribution is None:
        return replace(default, lo=lo, hi=hi)
    params = {
        "uniform": (),
        "triangular": (lo, d.mode, hi),
        "normal": (d.mean, d.sd),
    }[d.distribution]
    return replace(default, shape=d.distribution, lo=lo, hi=hi, params=params)


def _validated(model: type[BaseModel], data: Any, prefix: Path) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _from_validation(exc, prefix, model) from None


def _attribute(fid: str, name: str, raw: Any, path: Path) -> Dist:
    f = vocab.BY_ID[fid]
    attribute = f.attributes.get(name)
    if attribute is None:
        close = difflib.get_close_matches(name, list(f.attributes), n=1)
        hint = f"; did you mean {close[0]!r}? Valid" if close else "; valid"
        valid = ", ".join(f.attributes) or "none"
        raise SpecError(path, f"{f.column} has no attribute {name!r}{hint} attributes: {valid}")
    check = _vocab_check(attribute)
    if isinstance(raw, Mapping):
        if not attribute.is_choice and any(isinstance(k, str) for k in raw):
            numeric = _validated(NumericDist, raw, path)
            return _numeric(numeric, path, default_distribution(attribute), check)  # type: ignore[arg-type]
        return _weights(raw, path, check)
    return Choice((check(raw, path),), (1.0,))


def _bins(raw: Mapping[str, float], path: Path) -> Bins:
    ranges: list[tuple[int, int]] = []
    choice = _weights(raw, path, lambda key, where: key)
    for key in raw:
        match = _BIN_PATTERN.match(key)
        where = (*path, key)
        if not match:
            raise SpecError(where, f"{key!r} is not an age bin; expected 'LO-HI' or 'LO+' in years")
        lo = _age_check(int(match.group(1)), where)
        hi = vocab.AGE_RANGE[1] if match.group(3) else _age_check(int(match.group(2)), where)
        if lo > hi:
            raise SpecError(where, f"{key!r} ends before it starts; expected LO <= HI")
        for other_lo, other_hi in ranges:
            if lo <= other_hi and other_lo <= hi:
                raise SpecError(where, f"{key!r} overlaps {other_lo}-{other_hi}")
        ranges.append((lo, hi))
    return Bins(tuple(ranges), choice.weights)


def _age(demographics: Demographics) -> Numeric | Bins:
    age, path = demographics.age, ("demographics", "age")
    if age.bins is not None:
        for key in ("distribution", "min", "max", "mode", "mean", "sd"):
            if getattr(age, key) is not None:
                raise SpecError((*path, key), "cannot be combined with bins; give one or the other")
        return _bins(age.bins, (*path, "bins"))
    if demographics.follow_reference and age.distribution is not None:
        raise SpecError(
            (*path, "distribution"),
            "ages follow the reference (demographics.follow_reference: true); "
            "valid here: min, max or bins",
        )
    numeric = _numeric(age, path, DEFAULT_AGE, _age_check)
    if demographics.follow_reference:
        return Bins(((int(numeric.lo), int(numeric.hi)),), (1.0,))
    return numeric


def _checkpoint(value: str, path: Path) -> None:
    try:
        parse_ref(value)
    except RefError as exc:
        raise SpecError(path, f"is not a model reference: {exc}") from None


def _targets(spec: CohortSpec) -> dict[str, Target]:
    n = spec.cohort.n
    targets: dict[str, Target] = {}
    for key, label in spec.labels.items():
        path = ("labels", key)
        fid = _names(key, path)
        if fid in targets:
            first = format_path(targets[fid].path)
            raise SpecError(path, f"names the same finding ({_column(fid)}) as {first}")
        if label.count is not None and label.prevalence is not None:
            raise SpecError((*path, "count"), "give either count or prevalence, not both")
        if label.count is not None and label.count > n:
            raise SpecError(
                (*path, "count"),
                f"{label.count} is more than cohort.n ({n}); expected an integer in [0, {n}]",
            )
        count = label.count
        expected = None if count is None else float(count)
        if label.prevalence is not None:
            count, expected = round_half_up(label.prevalence * n), label.prevalence * n
        if label.attributes and (label.prevalence == 0 or label.count == 0):
            raise SpecError(
                (*path, "attributes"),
                f"{_column(fid)} is asked for in no volume (prevalence 0), so these attributes "
                "would never apply; remove them or give a prevalence above 0",
            )
        attributes = {
            name: _attribute(fid, name, raw, (*path, "attributes", name))
            for name, raw in label.attributes.items()
        }
        count_path = (*path, "count" if label.count is not None else "prevalence")
        targets[fid] = Target(fid, path, count_path, count, expected, attributes)
    return targets


def _profiles(spec: CohortSpec, targets: Mapping[str, Target]) -> tuple[Profile, ...]:
    n = spec.cohort.n
    profiles: list[Profile] = []
    used = 0
    for i, p in enumerate(spec.joint.profiles):
        path: Path = ("joint", "profiles", i)
        if any(q.name == p.name for q in profiles):
            raise SpecError((*path, "name"), f"profile name {p.name!r} is used twice")
        if p.count is None and p.prevalence is None:
            raise SpecError(path, "give the profile's count or prevalence")
        if p.count is not None and p.prevalence is not None:
            raise SpecError((*path, "count"), "give either count or prevalence, not both")
        count = p.count if p.count is not None else round_half_up(p.prevalence * n)  # type: ignore[operator]
        present = [_names(name, (*path, "present", k)) for k, name in enumerate(p.present)]
        if len(set(present)) < len(present):
            raise SpecError((*path, "present"), "names a finding twice")
        used += count
        if used > n:
            key = "count" if p.count is not None else "prevalence"
            raise SpecError(
                (*path, key),
                f"profiles ask for {used} volumes up to here, more than cohort.n ({n}); "
                f"valid: profile counts that sum to at most {n}",
            )
        order = tuple(fid for fid in vocab.FINDING_IDS if fid in present)
        profiles.append(Profile(p.name, path, count, order))
    rest = n - used
    for fid, target in targets.items():
        if target.count is None:
            continue
        pinned = sum(p.count for p in profiles if fid in p.present)
        if pinned > target.count:
            raise SpecError(
                target.count_path,
                f"asks {target.count} volumes with {_column(fid)}, but joint.profiles already "
                f"pin {pinned} with it; valid: at least {pinned} (profiles contradict counts)",
            )
        if target.count - pinned > rest:
            raise SpecError(
                target.count_path,
                f"asks {target.count} volumes with {_column(fid)}, but joint.profiles pin "
                f"{used - pinned} volumes without it, so at most {pinned + rest} can have it "
                "(profiles contradict counts)",
            )
    return tuple(profiles)


_CONDITIONAL_KEYS = ("probability", "at_least", "at_most", "count")
_PAIRWISE_KEYS = ("prevalence", "count")
_OPS: dict[str, Literal["eq", "ge", "le"]] = {
    "probability": "eq",
    "at_least": "ge",
    "at_most": "le",
    "prevalence": "eq",
    "count": "eq",
}


def _rule(spec: CohortSpec, i: int, c: ConstraintSpec, targets: Mapping[str, Target]) -> Rule:
    n = spec.cohort.n
    path: Path = ("joint", "constraints", i)
    conditional = c.given is not None or c.then is not None
    if conditional and c.both is not None:
        raise SpecError((*path, "both"), "give either given + then or both, not all three")
    if not conditional and c.both is None:
        raise SpecError(path, "give given + then (for P(then | given)) or both: [A, B]")
    if conditional and (c.given is None or c.then is None):
        missing = "then" if c.then is None else "given"
        raise SpecError(path, f"a conditional constraint needs given and then; no {missing}")
    valid = _CONDITIONAL_KEYS if conditional else _PAIRWISE_KEYS
    kind = "a conditional" if conditional else "a pairwise"
    chosen = [k for k in (*_CONDITIONAL_KEYS, "prevalence") if getattr(c, k) is not None]
    for key in chosen:
        if key not in valid:
            raise SpecError(
                (*path, key), f"does not apply to {kind} constraint; valid: {', '.join(valid)}"
            )
    if len(chosen) != 1:
        at = (*path, chosen[1]) if chosen else path
        raise SpecError(at, f"give exactly one of {', '.join(valid)}")
    key = chosen[0]
    if conditional:
        a = _names(c.given, (*path, "given"))  # type: ignore[arg-type]
        b = _names(c.then, (*path, "then"))  # type: ignore[arg-type]
    else:
        a, b = (_names(name, (*path, "both", k)) for k, name in enumerate(c.both))  # type: ignore[arg-type]
    if a == b:
        raise SpecError(path, f"names {_column(a)} twice; a constraint links two findings")
    value = getattr(c, key)
    rule = Rule(
        (*path, key),
        a,
        b,
        conditional,
        _OPS[key],
        None if key == "count" else float(value),
        int(value) if key == "count" else None,
    )
    n_a = targets[a].count if a in targets else None
    n_b = targets[b].count if b in targets else None
    if conditional and n_a is None and rule.count is None:
        return rule
    lo, hi = rule.bounds(n_a or 0, n, exact=True)
    known = [x for x in (n_a, n_b, n) if x is not None]
    low_f = max(0, n_a + n_b - n) if n_a is not None and n_b is not None else 0
    high_f = min(known)
    if conditional and rule.count is not None and n_a is not None and rule.count > n_a:
        raise SpecError(
            (*path, key),
            f"asks {rule.count} volumes with both {_column(a)} and {_column(b)}, more than the "
            f"{n_a} with {_column(a)} ({format_path(targets[a].path)}); "
            f"valid: at most {n_a} (a conditional count cannot exceed its parent)",
        )
    if hi < low_f or lo > high_f:
        want = f"{lo:g}" if lo == hi else f"{lo:g} to {hi:g}"
        counts = ", ".join(f"{_column(f)} {c}" for f, c in ((a, n_a), (b, n_b)) if c is not None)
        raise SpecError(
            (*path, key),
            f"needs {want} volumes with both {_column(a)} and {_column(b)}; with {counts} among "
            f"{n} volumes only {low_f} to {high_f} are possible (Fréchet bounds)",
        )
    return rule


def _resolve(spec: CohortSpec) -> Resolved:
    """Check the spec's meaning and resolve it for the planner; raises SpecError."""
    targets = _targets(spec)
    profiles = _profiles(spec, targets)
    rules = tuple(_rule(spec, i, c, targets) for i, c in enumerate(spec.joint.constraints))
    demographics = spec.demographics
    if demographics.follow_reference and spec.reference.kind == "independent":
        raise SpecError(
            ("demographics", "follow_reference"),
            "the independent reference has no ages or sexes to follow; valid: false, or "
            "reference: phantom, model or {labels_csv: ...} with PatientAge and PatientSex columns",
        )
    age = _age(demographics)
    male = demographics.male_fraction
    if male is None and not demographics.follow_reference:
        male = vocab.MALE_FRACTION
    ref = spec.reference
    if ref.kind == "labels_csv" and ref.labels_csv is None:
        raise SpecError(("reference", "labels_csv"), "is required: a labels CSV path or URL")
    if ref.kind != "labels_csv" and ref.labels_csv is not None:
        raise SpecError(("reference", "labels_csv"), f"does not apply to reference {ref.kind}")
    _checkpoint(spec.model, ("model",))
    if spec.verify is not None:
        _checkpoint(spec.verify.classifier, ("verify", "classifier"))
        if spec.verify.findings is not None:
            if not spec.verify.findings:
                raise SpecError(("verify", "findings"), "is empty; name findings or leave it out")
            spec.verify.columns(spec)  # unknown names fail here, naming the entry
    if not spec.output.strip():
        raise SpecError(("output",), "is empty; expected a path or an fsspec URL (s3://...)")
    try:
        parse_url(spec.output)
    except RefError as exc:
        raise SpecError(("output",), str(exc)) from None
    seed = spec.cohort.seed if spec.prompt.seed is None else spec.prompt.seed
    return Resolved(targets, profiles, rules, age, male, seed)


# --- YAML with line numbers, and pydantic errors as SpecErrors ---------------------------------


def _line_map(node: yaml.Node, path: tuple[str, ...], lines: dict, name: str) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = (*path, str(key_node.value))
            if key in lines and key_node.value != "<<":
                raise SpecError(
                    key,
                    f"duplicate key (first at line {lines[key]})",
                    f"{name}:{key_node.start_mark.line + 1}",
                )
            lines[key] = key_node.start_mark.line + 1
            _line_map(value_node, key, lines, name)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*path, str(i))] = item.start_mark.line + 1
            _line_map(item, (*path, str(i)), lines, name)


def _unwrap(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _keys_at(model: type[BaseModel], loc: Path) -> list[str]:
    """The keys valid at ``loc`` below ``model`` (empty if ``loc`` is not a mapping of fields)."""
    current: Any = model
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return []
            current = field.annotation
        elif get_origin(current) in (dict, list):
            current = get_args(current)[-1]
        else:
            return []
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _from_validation(exc: ValidationError, prefix: Path, model: type[BaseModel]) -> SpecError:
    """The first pydantic error as a SpecError: key path, offending value, what is valid."""
    err = exc.errors(include_url=False)[0]
    loc = tuple(err["loc"])
    if err["type"] == "extra_forbidden":
        valid = _keys_at(model, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ";"
        return SpecError((*prefix, *loc), f"unknown key{hint} valid keys here: {', '.join(valid)}")
    if err["type"] == "missing":
        return SpecError((*prefix, *loc), "is required but missing")
    if loc and loc[-1] == "[key]":
        key = (*prefix, *loc[:-2], str(loc[-2]))
        return SpecError(key, f"the key {loc[-2]!r} must be text; quote it, e.g. '{loc[-2]}'")
    message = err["msg"].removeprefix("Value error, ").replace("Input should be", "expected")
    message = message.replace("List should have", "expected a list with")
    message = message.replace(" after validation", "").replace("a valid dictionary", "a mapping")
    message = re.sub(r" or instance of \w+", "", message)
    shown = repr(err.get("input"))
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return SpecError((*prefix, *loc), f"{shown} is not valid; {message}")


def parse_spec(text: str, name: str = "<spec>", folder: str = ".") -> CohortSpec:
    """Parse and validate spec text; ``name`` and ``folder`` locate messages and inputs."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise SpecError((), f"not valid YAML: {problem}", f"{name}:{line}") from None
    if node is None or not isinstance(data, dict):
        raise SpecError(
            (),
            "the spec must be a YAML mapping with schema_version, cohort, model, output, ...",
            f"{name}:1",
        )
    lines: dict[tuple[str, ...], int] = {}
    _line_map(node, (), lines, name)
    source = Source(name, folder, lines)
    try:
        spec = CohortSpec.model_validate(data)
    except ValidationError as exc:
        error = _from_validation(exc, (), CohortSpec)
        error.where = source.where(error.path)
        raise error from None
    except SpecError as error:
        error.where = source.where(error.path)
        raise
    spec._source = source
    return spec


def load_spec(path: str | FilePath) -> CohortSpec:
    """Read and validate a cohort spec file; raises SpecError (file:line: key: message)."""
    file = FilePath(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError((), "no such file; expected a YAML cohort spec", str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError((), f"cannot read it: {exc}", str(path)) from None
    return parse_spec(text, str(path), str(file.parent))
