"""Resolving a cohort spec: check what its keys mean (finding names, sums, bounds, counts against
profiles, pairs of findings) and build the :class:`Resolved` spec the planner reads. Every
problem is a SpecError naming the key path and what would be valid."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, Literal

from factory import vocab
from factory.cohort.allocate import round_half_up
from factory.cohort.distributions import Bins, Choice, Dist, Numeric, default_distribution
from factory.cohort.errors import Path, SpecError, format_path
from factory.cohort.resolved import Profile, Resolved, Rule, Target
from factory.cohort.spec_schema import CohortSpec, ConstraintSpec, Demographics, NumericDist
from factory.cohort.spec_source import validated
from factory.refs import RefError, parse_ref, parse_url

WEIGHT_TOLERANCE = 1e-6  # how far from 1 a distribution's weights may sum
DEFAULT_AGE = Numeric(
    "normal", *vocab.AGE_RANGE, params=(vocab.AGE_MEAN, vocab.AGE_SD), integer=True
)
_BIN_PATTERN = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)|(\+))\s*$")


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
            numeric = validated(NumericDist, raw, path)
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


def resolve(spec: CohortSpec) -> Resolved:
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
        if spec.verify.findings is not None and not spec.verify.findings:
            raise SpecError(("verify", "findings"), "is empty; name findings or leave it out")
    if not spec.output.strip():
        raise SpecError(("output",), "is empty; expected a path or an fsspec URL (s3://...)")
    try:
        parse_url(spec.output)
    except RefError as exc:
        raise SpecError(("output",), str(exc)) from None
    seed = spec.cohort.seed if spec.prompt.seed is None else spec.prompt.seed
    return Resolved(targets, profiles, rules, age, male, seed, _verify_columns(spec, targets))


def _verify_columns(spec: CohortSpec, targets: Mapping[str, Target]) -> tuple[str, ...] | None:
    """The CT-RATE columns label verification checks, in vocabulary order (default: the
    findings named under ``labels``); an unknown name is an error naming the entry."""
    if spec.verify is None:
        return None
    if spec.verify.findings is None:
        fids = set(targets)
    else:
        fids = {_names(f, ("verify", "findings", i)) for i, f in enumerate(spec.verify.findings)}
    return tuple(f.column for f in vocab.FINDINGS if f.id in fids)
