"""Cohort spec parsing and validation: every bad input names its file:line, key path and fix."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from factory import vocab
from factory.cohort.distributions import Bins, Choice, Numeric
from factory.cohort.errors import SpecError
from factory.cohort.spec import load_spec, parse_spec

COHORTS = Path(__file__).resolve().parents[2] / "cohorts"

BASE = """\
schema_version: 1
cohort: {id: t, n: 100, seed: 1}
model: builtin:demo
output: out/t
labels:
  Pleural effusion:
    prevalence: 0.3
    attributes:
      laterality: {bilateral: 0.4, left: 0.3, right: 0.3}
  Lung nodule:
    count: 20
joint:
  profiles:
    - {name: normal, count: 10}
  constraints:
    - {given: Pleural effusion, then: Atelectasis, at_least: 0.5}
"""


def spec_error(text: str) -> str:
    with pytest.raises(SpecError) as caught:
        parse_spec(text, "spec.yaml")
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_base_spec_resolves_names_counts_and_distributions():
    spec = parse_spec(BASE, "spec.yaml")
    r = spec.resolved
    assert set(r.targets) == {"pleural_effusion", "lung_nodule"}
    assert r.targets["pleural_effusion"].count == 30
    assert r.targets["lung_nodule"].count == 20
    assert r.targets["pleural_effusion"].attributes["laterality"] == Choice(
        ("bilateral", "left", "right"), (0.4, 0.3, 0.3)
    )
    assert r.profiles[0].count == 10 and r.profiles[0].present == ()
    rule = r.rules[0]
    assert (rule.a, rule.b, rule.op, rule.probability) == (
        "pleural_effusion",
        "atelectasis",
        "ge",
        0.5,
    )
    assert rule.bounds(30, 100, exact=True) == (15, 30)
    assert r.male_fraction == vocab.MALE_FRACTION
    assert isinstance(r.age, Numeric) and (r.age.lo, r.age.hi) == vocab.AGE_RANGE
    assert r.prompt_seed == 1
    assert spec.sampler.guidance is None and spec.reference.kind == "model"  # the model's own


# (case, replace this, with this, line, key path, a fragment of the message)
BAD = [
    (
        "unknown finding",
        "Pleural effusion:",
        "Pleural efusion:",
        6,
        "labels.Pleural efusion",
        "did you mean 'pleural_effusion'?",
    ),
    (
        "prevalence above 1",
        "prevalence: 0.3",
        "prevalence: 1.5",
        7,
        "labels.Pleural effusion.prevalence",
        "less than or equal to 1",
    ),
    (
        "prevalence below 0",
        "prevalence: 0.3",
        "prevalence: -0.1",
        7,
        "labels.Pleural effusion.prevalence",
        "greater than or equal to 0",
    ),
    (
        "count above n",
        "count: 20",
        "count: 200",
        11,
        "labels.Lung nodule.count",
        "more than cohort.n (100)",
    ),
    (
        "count and prevalence",
        "count: 20",
        "count: 20\n    prevalence: 0.2",
        11,
        "labels.Lung nodule.count",
        "either count or prevalence, not both",
    ),
    (
        "weights not summing to 1",
        "left: 0.3,",
        "left: 0.2,",
        9,
        "labels.Pleural effusion.attributes.laterality",
        "weights sum to 0.9",
    ),
    (
        "attribute not defined",
        "laterality:",
        "lobe:",
        9,
        "labels.Pleural effusion.attributes.lobe",
        "has no attribute 'lobe'",
    ),
    (
        "attribute value not valid",
        "bilateral: 0.4",
        "both: 0.4",
        9,
        "labels.Pleural effusion.attributes.laterality.both",
        "one of left, right, bilateral",
    ),
    (
        "attributes at prevalence 0",
        "prevalence: 0.3",
        "prevalence: 0",
        8,
        "labels.Pleural effusion.attributes",
        "prevalence 0",
    ),
    (
        "conditional count above parent",
        "at_least: 0.5",
        "count: 40",
        16,
        "joint.constraints[0].count",
        "cannot exceed its parent",
    ),
    (
        "pairwise above Fréchet bound",
        "{given: Pleural effusion, then: Atelectasis, at_least: 0.5}",
        "{both: [Pleural effusion, Lung nodule], count: 25}",
        16,
        "joint.constraints[0].count",
        "only 0 to 20 are possible (Fréchet bounds)",
    ),
    (
        "conditional above Fréchet bound",
        "{given: Pleural effusion, then: Atelectasis, at_least: 0.5}",
        "{given: Pleural effusion, then: Lung nodule, probability: 0.9}",
        16,
        "joint.constraints[0].probability",
        "Fréchet",
    ),
    (
        "profiles above n",
        "count: 10}",
        "count: 110}",
        14,
        "joint.profiles[0].count",
        "more than cohort.n (100)",
    ),
    (
        "profiles leave too few volumes",
        "count: 10}",
        "count: 90}",
        7,
        "labels.Pleural effusion.prevalence",
        "profiles contradict counts",
    ),
    (
        "profiles pin more than the count",
        "count: 10}",
        "count: 30, present: [Lung nodule]}",
        11,
        "labels.Lung nodule.count",
        "already pin 30",
    ),
    (
        "unknown key",
        "seed: 1}",
        "seed: 1, sed: 2}",
        2,
        "cohort.sed",
        "did you mean 'seed'? valid keys here: id, n, seed",
    ),
    ("unknown top-level key", "joint:", "jiont:", 12, "jiont", "valid keys here: schema_version"),
    (
        "wrong type",
        "n: 100",
        "n: lots",
        2,
        "cohort.n",
        "'lots' is not valid; expected a valid integer",
    ),
    (
        "wrong type (string for number)",
        "prevalence: 0.3",
        "prevalence: '0.3'",
        7,
        "labels.Pleural effusion.prevalence",
        "expected a valid number",
    ),
    (
        "wrong type (list for mapping)",
        "cohort: {id: t, n: 100, seed: 1}",
        "cohort: [t, 100]",
        2,
        "cohort",
        "expected a mapping",
    ),
    ("missing key", "model: builtin:demo\n", "", 1, "model", "required but missing"),
    ("schema version", "schema_version: 1", "schema_version: 2", 1, "schema_version", "expected 1"),
    (
        "constraint form",
        "at_least: 0.5}",
        "at_least: 0.5, prevalence: 0.1}",
        16,
        "joint.constraints[0].prevalence",
        "does not apply to a conditional constraint",
    ),
    (
        "constraint value missing",
        ", at_least: 0.5}",
        "}",
        16,
        "joint.constraints[0]",
        "exactly one of probability, at_least, at_most, count",
    ),
    (
        "model form",
        "model: builtin:demo",
        "model: nope://bucket/m",
        3,
        "model",
        "unknown URL protocol 'nope'",
    ),
    (
        "reference form",
        "output: out/t",
        "output: out/t\nreference: sample",
        5,
        "reference",
        "expected one of model, phantom, independent",
    ),
    (
        "allocation mode",
        "output: out/t",
        "output: out/t\nallocation: {mode: exactly}",
        5,
        "allocation.mode",
        "expected 'exact' or 'bernoulli'",
    ),
    (
        "duplicate finding via alias",
        "  Lung nodule:",
        "  effusion: {prevalence: 0.1}\n  Lung nodule:",
        10,
        "labels.effusion",
        "same finding (Pleural effusion) as labels.Pleural effusion",
    ),
    (
        "duplicate YAML key",
        "  Lung nodule:",
        "  Pleural effusion: {}\n  Lung nodule:",
        10,
        "labels.Pleural effusion",
        "duplicate key (first at line 6, column 3)",
    ),
]


@pytest.mark.parametrize(
    ("case", "old", "new", "line", "path", "fragment"), BAD, ids=[b[0] for b in BAD]
)
def test_bad_input_names_file_line_and_key(case, old, new, line, path, fragment):
    assert old in BASE, case
    message = spec_error(BASE.replace(old, new, 1))
    assert re.match(rf"spec\.yaml:{line}:\d+: {re.escape(path)}: ", message), message
    assert fragment in message, message


@pytest.mark.parametrize(
    ("demographics", "line", "path", "fragment"),
    [
        (
            "{age: {min: 10}}",
            17,
            "demographics.age.min",
            "10 is out of range; expected a whole age in [18, 102]",
        ),
        ("{age: {max: 120}}", 17, "demographics.age.max", "in [18, 102]"),
        (
            "{age: {bins: {'10-40': 0.5, '41-80': 0.5}}}",
            17,
            "demographics.age.bins.10-40",
            "[18, 102]",
        ),
        ("{age: {bins: {'20-40': 0.5, '41-80': 0.4}}}", 17, "demographics.age.bins", "sum to 0.9"),
        (
            "{age: {bins: {'20-50': 0.5, '41-80': 0.5}}}",
            17,
            "demographics.age.bins.41-80",
            "overlaps",
        ),
        (
            "{age: {distribution: normal, mean: 50}}",
            17,
            "demographics.age.distribution",
            "needs mean and sd",
        ),
        ("{age: {distribution: uniform, mode: 50}}", 17, "demographics.age.mode", "triangular"),
        ("{male_fraction: 1.2}", 17, "demographics.male_fraction", "less than or equal to 1"),
        (
            "{follow_reference: true, age: {distribution: uniform}}",
            17,
            "demographics.age.distribution",
            "follow the reference",
        ),
    ],
)
def test_bad_demographics(demographics, line, path, fragment):
    message = spec_error(BASE + f"demographics: {demographics}\n")
    assert re.match(rf"spec\.yaml:{line}:\d+: {re.escape(path)}: ", message), message
    assert fragment in message, message


def test_unparsable_yaml_names_the_line_column_and_where_the_bracket_opened():
    message = spec_error(BASE.replace("seed: 1}", "seed: 1"))
    assert message.startswith("spec.yaml:3:6: not valid YAML: did not find expected ',' or '}'")
    assert message.endswith("(while parsing a flow mapping, begun at line 2, column 9)"), message


def test_spec_that_is_not_a_mapping():
    assert spec_error("- 1\n- 2\n").startswith("spec.yaml:1:1: the spec must be a YAML mapping")


def test_missing_file_is_a_spec_error(tmp_path):
    with pytest.raises(SpecError, match="no such file"):
        load_spec(tmp_path / "absent.yaml")


def test_follow_reference_needs_a_reference_with_demographics():
    text = BASE + "reference: independent\ndemographics: {follow_reference: true}\n"
    message = spec_error(text)
    assert message.startswith("spec.yaml:18:16: demographics.follow_reference: "), message


def test_numeric_attribute_bounds_come_from_the_vocabulary():
    text = BASE.replace("count: 20", "count: 20\n    attributes: {size_mm: {min: 1, max: 12}}")
    message = spec_error(text)
    assert "labels.Lung nodule.attributes.size_mm.min: 1.0 is out of range" in message
    assert "[3, 30] mm" in message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("RUL", Choice(("RUL",), (1.0,))),
        ("{rul: 0.5, LLL: 0.5}", Choice(("RUL", "LLL"), (0.5, 0.5))),
    ],
)
def test_categorical_attribute_forms(value, expected):
    text = BASE.replace("count: 20", f"count: 20\n    attributes: {{lobe: {value}}}")
    assert parse_spec(text).resolved.targets["lung_nodule"].attributes["lobe"] == expected


def test_numeric_attribute_forms():
    text = BASE.replace(
        "count: 20",
        "count: 20\n    attributes:\n      size_mm: {distribution: normal, mean: 8, sd: 2, max: 14}"
        "\n      count: {1: 0.7, 2: 0.3}",
    )
    attrs = parse_spec(text).resolved.targets["lung_nodule"].attributes
    assert attrs["size_mm"] == Numeric("normal", 3, 14, (8, 2), integer=False)
    assert attrs["count"] == Choice((1, 2), (0.7, 0.3))


def test_age_bins_and_follow_reference_range():
    spec = parse_spec(
        BASE + "demographics: {age: {bins: {'18-39': 0.25, '40-64': 0.5, '65+': 0.25}}}\n"
    )
    assert spec.resolved.age == Bins(((18, 39), (40, 64), (65, 102)), (0.25, 0.5, 0.25))
    spec = parse_spec(BASE + "demographics: {follow_reference: true, age: {min: 40, max: 85}}\n")
    assert spec.resolved.age == Bins(((40, 85),), (1.0,))
    assert spec.resolved.male_fraction is None


def test_names_and_aliases_give_the_same_canonical_spec():
    other = BASE.replace("Pleural effusion:", "effusion:").replace("Lung nodule:", "lung_nodule:")
    other = other.replace("given: Pleural effusion", "given: pleural fluid")
    a, b = parse_spec(BASE), parse_spec(other)
    assert a.canonical_json() == b.canonical_json()
    changed = parse_spec(BASE.replace("count: 20", "count: 21"))
    assert changed.canonical_json() != a.canonical_json()


def test_output_is_not_part_of_the_canonical_spec():
    assert (
        parse_spec(BASE).canonical_json()
        == parse_spec(BASE.replace("out/t", "s3://bucket/t")).canonical_json()
    )


@pytest.mark.parametrize("model", ["builtin:demo", "checkpoints/tiny", "/abs/dir", "s3://b/ckpt"])
def test_checkpoint_forms_accepted(model):
    assert parse_spec(BASE.replace("builtin:demo", model)).model == model


@pytest.mark.parametrize("spec_file", sorted(COHORTS.glob("*.yaml")), ids=lambda p: p.name)
def test_example_cohorts_are_valid(spec_file):
    spec = load_spec(spec_file)
    assert spec.source.name == str(spec_file)


@settings(max_examples=40, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False, min_value=-5, max_value=5))
def test_prevalence_accepted_exactly_within_unit_interval(p):
    text = BASE.replace("joint:", f"  Emphysema: {{prevalence: {p:.17e}}}\njoint:")
    text = text.replace("{name: normal, count: 10}", "{name: normal, count: 0}")
    if 0 <= p <= 1:
        spec = parse_spec(text)
        assert spec.resolved.targets["emphysema"].count == int(p * 100 + 0.5)
    else:
        message = spec_error(text)
        assert re.match(r"spec\.yaml:12:\d+: labels\.Emphysema\.prevalence: ", message)


@settings(max_examples=30, deadline=None)
@given(
    st.sampled_from(
        [(f.column, f.id) for f in vocab.FINDINGS]
        + [(a, f.id) for f in vocab.FINDINGS for a in f.aliases]
    )
)
def test_every_name_and_alias_resolves(pair):
    name, fid = pair
    text = BASE.replace("Lung nodule:", f"'{name}':") if fid != "pleural_effusion" else BASE
    spec = parse_spec(text)
    assert fid in spec.resolved.targets


def test_a_spec_over_the_size_limit_is_refused_before_it_is_read_whole(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text(BASE + "# " + "x" * (300 << 10) + "\n")
    with pytest.raises(SpecError, match=r"big\.yaml: too large: over the limit of 262,144 bytes"):
        load_spec(big)
    with pytest.raises(SpecError, match="too large: over the limit"):
        load_spec("/dev/zero")  # never ends: read no further than the limit
    with pytest.raises(SpecError, match=r"^spec\.yaml: too large: 300,0\d\d bytes; the limit"):
        parse_spec(BASE + "#" * (300_000 - len(BASE)) + "\n", "spec.yaml")


@pytest.mark.parametrize(
    ("text", "where", "fragment"),
    [
        (  # a billion nodes once expanded: refused at the first alias, nothing expanded
            'a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]\n'
            + "".join(
                f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n"
                for p, c in zip("abcdefgh", "bcdefghi", strict=True)
            ),
            "spec.yaml:2:1: b[0]: ",
            "an alias (*name) of the value at line 1, column 4",
        ),
        ("a: &a [1, *a]\n", "spec.yaml:1:1: a[1]: ", "an alias"),  # recursive
        ("base: &b {n: 1}\ncohort:\n  <<: *b\n", "spec.yaml:3:3: cohort.<<: ", "merge keys"),
        ("name: &n demo\nother: *n\n", "spec.yaml:2:1: other: ", "an alias"),
    ],
)
def test_anchors_and_aliases_are_refused_where_they_are_used(text, where, fragment):
    message = spec_error(text)
    assert message.startswith(where) and fragment in message, message


def test_an_unclosed_quote_names_where_it_began():
    message = spec_error(BASE.replace("model: builtin:demo", 'model: "builtin:demo'))
    assert message.startswith("spec.yaml:"), message
    assert "found unexpected end of stream" in message
    assert message.endswith("(while scanning a quoted scalar, begun at line 3, column 8)")


def test_a_misspelt_required_key_is_named_with_did_you_mean_not_as_missing():
    message = spec_error(BASE.replace("cohort:", "cohrot:"))
    assert message.startswith("spec.yaml:2:1: cohrot: unknown key; did you mean 'cohort' "), message
    assert "(required)?" in message and "missing" not in message
    # a key that is simply absent is still reported as missing
    assert spec_error(BASE.replace("model: builtin:demo\n", "")).endswith(
        "model: is required but missing"
    )
