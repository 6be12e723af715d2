"""A plan as text: requested vs planned per finding, profiles, constraints, attributes,
demographics and warnings, as ``ctfactory plan`` prints it."""

from __future__ import annotations

import numpy as np

from factory import vocab
from factory.cohort.distributions import Bins, Choice, Numeric
from factory.cohort.plan import Plan
from factory.cohort.resolved import Rule

_WIDTH = 38


def _describe(dist: Numeric | Bins | Choice, unit: str = "") -> str:
    """A requested distribution in a few words."""
    if isinstance(dist, Bins):
        return ", ".join(
            f"{lo}-{hi}: {w:.3f}" for (lo, hi), w in zip(dist.ranges, dist.weights, strict=True)
        )
    if isinstance(dist, Choice):
        return ", ".join(f"{v}: {w:.3f}" for v, w in zip(dist.values, dist.weights, strict=True))
    if dist.shape == "triangular":
        text = f"triangular, mode {dist.params[1]:g}"
    elif dist.shape == "normal":
        text = f"normal {dist.params[0]:g} +/- {dist.params[1]:g}"
    else:
        text = "uniform"
    return f"{text} in [{dist.lo:g}, {dist.hi:g}]{unit}"


def _numbers(values: np.ndarray, unit: str = "") -> str:
    if len(values) == 0:
        return "none planned"
    v = np.asarray(values, np.float64)
    return f"mean {v.mean():.1f}, sd {v.std():.1f}, range {v.min():g}-{v.max():g}{unit}"


def findings_lines(plan: Plan, in_cohort: np.ndarray | None = None) -> list[str]:
    """Requested vs planned count per finding; with ``in_cohort`` (counts per finding among the
    volumes stored), a third column shows what the cohort holds."""
    exact = plan.spec.allocation.mode == "exact"
    targets = plan.spec.resolved.targets
    stored = f"{'in cohort':>11}" if in_cohort is not None else ""
    lines = [f"{'finding':<{_WIDTH}}{'requested':<22}{'planned':>8}{'prevalence':>12}{stored}"]
    planned = plan.labels.sum(axis=0)
    for j, f in enumerate(vocab.FINDINGS):
        target = targets.get(f.id)
        if target is not None and target.count is not None:
            share = target.count / plan.n
            asked = f"{target.count} ({share:.3f})" if exact else f"~{target.expected:.1f}"
        else:
            asked = f"reference ~{plan.expected[j]:.1f}"
        have = f"{int(in_cohort[j]):>11}" if in_cohort is not None else ""
        lines.append(
            f"{f.column:<{_WIDTH}}{asked:<22}{int(planned[j]):>8}{planned[j] / plan.n:>12.3f}{have}"
        )
    return lines


def _rule_outcome(plan: Plan, rule: Rule) -> tuple[int, int, bool]:
    """(volumes with both, volumes with the given finding or all, whether the rule holds)."""
    a = plan.labels[:, vocab.FINDING_IDS.index(rule.a)].astype(bool)
    b = plan.labels[:, vocab.FINDING_IDS.index(rule.b)].astype(bool)
    both, base = int((a & b).sum()), int(a.sum()) if rule.conditional else plan.n
    lo, hi = rule.bounds(int(a.sum()), plan.n, exact=True)
    return both, base, lo <= both <= hi


def _joint(plan: Plan) -> list[str]:
    r = plan.spec.resolved
    exact = plan.spec.allocation.mode == "exact"
    lines: list[str] = []
    if r.profiles:
        lines += ["", f"{'profile':<{_WIDTH}}{'requested':<22}{'planned':>8}"]
        for k, p in enumerate(r.profiles):
            what = ", ".join(vocab.BY_ID[f].column for f in p.present) or "no finding"
            name = f"{p.name} ({what})"
            name = name if len(name) < _WIDTH else name[: _WIDTH - 4] + "..."
            lines.append(f"{name:<{_WIDTH}}{p.count:<22}{int((plan.profile == k).sum()):>8}")
    if r.rules:
        lines += ["", f"{'constraint':<{_WIDTH + 22}}{'planned':>8}"]
        for rule in r.rules:
            both, base, ok = _rule_outcome(plan, rule)
            value = (
                f"{both}"
                if rule.count is not None
                else f"{both / max(base, 1):.3f} ({both}/{base})"
            )
            status = ("ok" if ok else "MISSED") if exact else "(bernoulli: on average)"
            lines.append(f"{rule.describe():<{_WIDTH + 22}}{value:>8}  {status}")
    return lines


def _attributes(plan: Plan) -> list[str]:
    lines: list[str] = []
    for fid, target in plan.spec.resolved.targets.items():
        f = vocab.BY_ID[fid]
        for name, dist in target.attributes.items():
            values = plan.attributes[fid][name]
            head = f"  {f.column} {name}"
            if isinstance(dist, Choice):
                got = ", ".join(
                    f"{v}: {np.mean(values == v) if len(values) else 0:.3f}" for v in dist.values
                )
                lines += [f"{head}", f"    requested {_describe(dist)}", f"    planned   {got}"]
            else:
                unit = f" {f.attributes[name].unit}" if f.attributes[name].unit else ""
                lines += [
                    f"{head}",
                    f"    requested {_describe(dist, unit)}",
                    f"    planned   {_numbers(values, unit)}",
                ]
    return ["", "attributes (among volumes with the finding)", *lines] if lines else []


def _demographics(plan: Plan) -> list[str]:
    r = plan.spec.resolved
    follow = plan.spec.demographics.follow_reference
    asked_age = "as the reference" if follow else _describe(r.age)
    lines = ["", "demographics", f"  age: requested {asked_age}; planned {_numbers(plan.age)}"]
    if isinstance(r.age, Bins) and len(r.age.ranges) > 1:
        bins = r.age.bin_of(plan.age)
        for i, ((lo, hi), w) in enumerate(zip(r.age.ranges, r.age.weights, strict=True)):
            lines.append(f"    {lo}-{hi}: requested {w:.3f}, planned {np.mean(bins == i):.3f}")
    male = np.mean(plan.sex == "M")
    asked_sex = "as the reference" if r.male_fraction is None else f"{r.male_fraction:.1%} male"
    lines.append(f"  sex: requested {asked_sex}; planned {male:.1%} male")
    return lines


def summary_text(plan: Plan) -> str:
    """Everything a person checks before generating: does the plan match the spec?"""
    spec = plan.spec
    ess = (
        "" if plan.effective_size is None else f"; effective sample size {plan.effective_size:,.0f}"
    )
    lines = [
        f"cohort {spec.cohort.id}: {plan.n:,} volumes, seed {spec.cohort.seed}, "
        f"{spec.allocation.mode} allocation, prompt style {spec.prompt.style}",
        f"reference: {plan.reference.description}{ess}",
        f"plan hash: {plan.plan_hash}",
        "",
        *findings_lines(plan),
        *_joint(plan),
        *_attributes(plan),
        *_demographics(plan),
    ]
    if plan.warnings:
        lines += ["", "warnings", *(f"  - {w}" for w in plan.warnings)]
    return "\n".join(lines)
