"""Planning: exact and bernoulli allocation, raking, determinism, seeds, references, Parquet."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from factory import vocab
from factory.cohort.allocate import (
    Quota,
    exact_counts,
    largest_remainder,
    round_half_up,
    split_counts,
    systematic_counts,
)
from factory.cohort.errors import PlanningError, SpecError, format_path
from factory.cohort.plan import make_plan, read_plan_metadata
from factory.cohort.raking import Margin, rake
from factory.cohort.reference import Reference, sample_reference
from factory.cohort.spec import load_spec, parse_spec
from factory.cohort.spec_schema import CohortSpec
from factory.seeds import volume_seeds

COHORTS = Path(__file__).resolve().parents[2] / "cohorts"
IDS = vocab.FINDING_IDS
SLOW = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def column(fid: str) -> int:
    return IDS.index(fid)


def rich_labels(rows: int = 4000, p: float = 0.3, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((rows, len(IDS))) < p).astype(np.uint8)


@pytest.fixture(scope="module")
def rich() -> Reference:
    """Every combination of a few findings is well represented: all targets are feasible."""
    rng = np.random.default_rng(1)
    labels = rich_labels()
    age = rng.integers(18, 103, len(labels))
    sex = np.where(rng.random(len(labels)) < 0.5, "M", "F")
    return sample_reference("rich test sample", labels, age, sex)


def spec_from(data: dict, folder: str = ".") -> CohortSpec:
    base = {
        "schema_version": 1,
        "cohort": {"id": "t", "n": 200, "seed": 1},
        "model": "builtin:demo",
        "output": "out/t",
    }
    return parse_spec(yaml.safe_dump(base | data, sort_keys=False), "spec.yaml", folder)


def write_csv(path: Path, labels: np.ndarray, **extra: object) -> Path:
    frame = pd.DataFrame(labels, columns=list(vocab.COLUMNS))
    frame.insert(0, "VolumeName", [f"train_{i + 1}_a_1.nii.gz" for i in range(len(frame))])
    for name, values in extra.items():
        frame[name] = values
    frame.to_csv(path, index=False)
    return path


def plan_error(spec: CohortSpec, *path: str | int) -> str:
    """The planning error's message, checked to start with file:line and ``path``."""
    with pytest.raises(SpecError) as caught:
        make_plan(spec)
    message = str(caught.value)
    assert message.startswith(f"{spec.source.where(path)}: {format_path(path)}: "), message
    assert re.match(r"spec\.yaml:\d+:\d+: ", message), message
    return message


def planned(plan, fid: str) -> int:
    return int(plan.labels[:, column(fid)].sum())


targets_strategy = st.dictionaries(
    st.sampled_from(IDS), st.floats(0, 1, allow_nan=False), min_size=1, max_size=5
)


@SLOW
@given(
    n=st.integers(1, 400),
    seed=st.integers(0, 2**31),
    targets=targets_strategy,
    profile=st.tuples(st.integers(0, 40), st.lists(st.sampled_from(IDS), max_size=2, unique=True)),
)
def test_exact_mode_hits_every_count(rich, n, seed, targets, profile):
    data = {
        "cohort": {"id": "t", "n": n, "seed": seed},
        "labels": {fid: {"prevalence": p} for fid, p in targets.items()},
        "joint": {"profiles": [{"name": "p", "count": min(profile[0], n), "present": profile[1]}]},
    }
    try:
        spec = spec_from(data)
    except SpecError:
        assume(False)  # profiles that contradict the counts are rejected before planning
    plan = make_plan(spec, reference=rich)
    assert plan.n == n
    for fid, p in targets.items():
        assert planned(plan, fid) == round_half_up(p * n), fid
    assert (plan.profile == 0).sum() == min(profile[0], n)
    pinned = plan.labels[plan.profile == 0]
    expected = np.zeros(len(IDS), np.uint8)
    expected[[column(f) for f in profile[1]]] = 1
    assert (pinned == expected).all()
    assert (plan.sex == "M").sum() == round_half_up(vocab.MALE_FRACTION * n)


@SLOW
@given(
    n=st.integers(300, 3000),
    seed=st.integers(0, 2**31),
    targets=st.dictionaries(st.sampled_from(IDS), st.floats(0.02, 0.98), min_size=1, max_size=4),
)
def test_bernoulli_mode_is_within_binomial_spread(rich, n, seed, targets):
    data = {
        "cohort": {"id": "t", "n": n, "seed": seed},
        "labels": {fid: {"prevalence": p} for fid, p in targets.items()},
        "allocation": {"mode": "bernoulli"},
    }
    plan = make_plan(spec_from(data), reference=rich)
    for fid, p in targets.items():
        spread = 5 * math.sqrt(n * p * (1 - p)) + 1
        assert abs(planned(plan, fid) - p * n) <= spread, fid


def test_bernoulli_mode_varies_with_the_seed(rich):
    counts = {
        planned(
            make_plan(
                spec_from(
                    {
                        "cohort": {"id": "t", "n": 1000, "seed": s},
                        "labels": {"Emphysema": {"prevalence": 0.3}},
                        "allocation": {"mode": "bernoulli"},
                    }
                ),
                reference=rich,
            ),
            "emphysema",
        )
        for s in range(6)
    }
    assert len(counts) > 1


def test_same_spec_gives_the_same_plan_bytes(tmp_path):
    paths = []
    for k in range(2):
        plan = make_plan(load_spec(COHORTS / "effusion-enriched.yaml"))
        paths.append(tmp_path / f"plan{k}.parquet")
        plan.write(str(paths[-1]))
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert not list(tmp_path.glob("*.tmp-*"))


def test_prompts_and_rows_do_not_depend_on_batching(rich):
    plan = make_plan(
        spec_from({"cohort": {"id": "t", "n": 50, "seed": 4}, "prompt": {"style": "free"}}),
        reference=rich,
    )
    small = pa.Table.from_batches(list(plan.batches(size=7)))
    whole = pa.Table.from_batches(list(plan.batches(size=1000)))
    assert small.equals(whole)


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**63 - 1),
    index=st.lists(st.integers(0, 10_000_000), min_size=1, max_size=50, unique=True),
    which=st.integers(0, 49),
    new=st.integers(0, 10_000_000),
)
def test_changing_one_volume_index_changes_only_its_seed(seed, index, which, new):
    which %= len(index)
    assume(new not in index)
    before = volume_seeds(seed, np.array(index))
    moved = list(index)
    moved[which] = new
    after = volume_seeds(seed, np.array(moved))
    assert (before >= 0).all() and (after >= 0).all()
    changed = np.flatnonzero(before != after)
    assert changed.tolist() == [which]
    assert after[which] == volume_seeds(seed, np.array([new]))[0]


def splitmix64(x: int) -> int:
    """The reference SplitMix64 output for state ``x`` (Steele, Lea and Flood, 2014)."""
    mask = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**63 - 1), index=st.integers(0, 10_000_000))
def test_volume_seed_is_the_documented_formula(seed, index):
    expected = splitmix64(splitmix64(seed) ^ index) >> 1
    assert volume_seeds(seed, np.array([index]))[0] == expected


def test_seeds_depend_only_on_cohort_seed_and_index(rich):
    small = make_plan(spec_from({"cohort": {"id": "t", "n": 30, "seed": 9}}), reference=rich)
    large = make_plan(
        spec_from(
            {"cohort": {"id": "t", "n": 50, "seed": 9}, "labels": {"Emphysema": {"count": 40}}}
        ),
        reference=rich,
    )
    assert (small.seeds == large.seeds[:30]).all()
    other = make_plan(spec_from({"cohort": {"id": "t", "n": 30, "seed": 10}}), reference=rich)
    assert (other.seeds != small.seeds).all()


@SLOW
@given(
    targets=st.dictionaries(st.sampled_from(IDS[:8]), st.floats(0.05, 0.6), min_size=1, max_size=4)
)
def test_raking_keeps_reference_co_occurrence(targets):
    """IPF multiplies each label set by a product of per-finding factors, so every association
    the targets do not touch (the reference's conditional odds ratios) is kept."""
    labels = pd.read_csv(COHORTS / "reference" / "phantom-labels.csv")[list(vocab.COLUMNS)]
    x = labels.to_numpy(bool)
    cells, cell_of = np.unique(x, axis=0, return_inverse=True)
    base = np.bincount(cell_of.ravel(), minlength=len(cells)).astype(float)
    margins = [Margin(column(f), p, ("labels", f), f) for f, p in targets.items()]
    raked = rake(cells, base, margins)
    for m in margins:
        assert raked[cells[:, m.column]].sum() == pytest.approx(m.target, abs=1e-6)
    factor = np.log(raked / (base / base.sum()))
    design = np.column_stack([np.ones(len(cells)), cells[:, [m.column for m in margins]]])
    coef, *_ = np.linalg.lstsq(design, factor, rcond=None)
    assert np.abs(design @ coef - factor).max() < 1e-6


def test_enrichment_keeps_conditional_prevalence_of_the_reference(tmp_path):
    csv = COHORTS / "reference" / "phantom-labels.csv"
    x = pd.read_csv(csv)[list(vocab.COLUMNS)].to_numpy(bool)
    eff, atel = x[:, column("pleural_effusion")], x[:, column("atelectasis")]
    ref_given, ref_not = atel[eff].mean(), atel[~eff].mean()
    plan = make_plan(
        spec_from(
            {
                "cohort": {"id": "t", "n": 4000, "seed": 2},
                "labels": {"Pleural effusion": {"prevalence": 0.5}},
                "reference": {"labels_csv": str(csv)},
            }
        )
    )
    p_eff = plan.labels[:, column("pleural_effusion")] == 1
    p_atel = plan.labels[:, column("atelectasis")] == 1
    assert p_eff.mean() == 0.5
    assert p_atel[p_eff].mean() == pytest.approx(ref_given, abs=0.04)
    assert p_atel[~p_eff].mean() == pytest.approx(ref_not, abs=0.04)
    flat = make_plan(
        spec_from(
            {
                "cohort": {"id": "t", "n": 4000, "seed": 2},
                "labels": {"Pleural effusion": {"prevalence": 0.5}},
                "reference": "independent",
            }
        )
    )
    f_eff = flat.labels[:, column("pleural_effusion")] == 1
    f_atel = flat.labels[:, column("atelectasis")] == 1
    assert abs(f_atel[f_eff].mean() - f_atel[~f_eff].mean()) < 0.05


def test_constraints_and_profiles_are_met_exactly(rich):
    spec = spec_from(
        {
            "cohort": {"id": "t", "n": 500, "seed": 3},
            "labels": {"Pleural effusion": {"count": 150}, "Atelectasis": {"prevalence": 0.2}},
            "joint": {
                "profiles": [
                    {"name": "normal", "count": 60},
                    {"name": "both", "count": 20, "present": ["effusion", "atelectasis"]},
                ],
                "constraints": [
                    {"given": "Pleural effusion", "then": "Atelectasis", "probability": 0.45},
                    {"both": ["Emphysema", "Lung nodule"], "count": 33},
                    {"given": "Cardiomegaly", "then": "Lung opacity", "at_most": 0.1},
                ],
            },
        }
    )
    plan = make_plan(spec, reference=rich)
    eff = plan.labels[:, column("pleural_effusion")] == 1
    atel = plan.labels[:, column("atelectasis")] == 1
    assert eff.sum() == 150 and atel.sum() == 100
    assert (eff & atel).sum() == round_half_up(0.45 * 150)
    emph, nod = (plan.labels[:, column(f)] == 1 for f in ("emphysema", "lung_nodule"))
    assert (emph & nod).sum() == 33
    cardio, opac = (plan.labels[:, column(f)] == 1 for f in ("cardiomegaly", "lung_opacity"))
    assert (cardio & opac).sum() <= math.floor(0.1 * cardio.sum())
    assert (plan.profile == 0).sum() == 60 and plan.labels[plan.profile == 0].sum() == 0
    assert (plan.profile == 1).sum() == 20


def test_categorical_attributes_are_exact_and_numeric_within_bounds(rich):
    spec = spec_from(
        {
            "cohort": {"id": "t", "n": 300, "seed": 5},
            "labels": {
                "Pleural effusion": {
                    "count": 100,
                    "attributes": {
                        "laterality": {"bilateral": 0.4, "left": 0.35, "right": 0.25},
                        "severity": "large",
                    },
                },
                "Lung nodule": {
                    "attributes": {"size_mm": {"distribution": "uniform", "min": 5, "max": 9}}
                },
            },
        }
    )
    plan = make_plan(spec, reference=rich)
    lat = plan.attributes["pleural_effusion"]["laterality"]
    assert [(lat == v).sum() for v in ("bilateral", "left", "right")] == [40, 35, 25]
    assert set(plan.attributes["pleural_effusion"]["severity"]) == {"large"}
    size = plan.attributes["lung_nodule"]["size_mm"]
    assert len(size) == planned(plan, "lung_nodule") and size.min() >= 5 and size.max() <= 9


def test_follow_reference_takes_demographics_jointly(tmp_path):
    labels = rich_labels(3000)
    rng = np.random.default_rng(7)
    age = rng.integers(20, 95, len(labels))
    labels[:, column("arterial_wall_calcification")] = age > 70  # an age effect to keep
    sex = np.where(rng.random(len(labels)) < 0.5, "M", "F")
    csv = write_csv(
        tmp_path / "ref.csv", labels, PatientAge=[f"{a:03d}Y" for a in age], PatientSex=sex
    )
    spec = spec_from(
        {
            "cohort": {"id": "t", "n": 400, "seed": 1},
            "demographics": {
                "follow_reference": True,
                "male_fraction": 0.3,
                "age": {"bins": {"40-64": 0.25, "65-90": 0.75}},
            },
            "reference": {"labels_csv": csv.name},
        },
        folder=str(tmp_path),
    )
    plan = make_plan(spec)
    assert (plan.sex == "M").sum() == 120
    assert ((plan.age >= 40) & (plan.age <= 64)).sum() == 100
    assert ((plan.age >= 65) & (plan.age <= 90)).sum() == 300
    calc = plan.labels[:, column("arterial_wall_calcification")] == 1
    assert (calc == (plan.age > 70)).all()


def test_parquet_rows_and_metadata(tmp_path):
    spec = load_spec(COHORTS / "demo.yaml")
    plan = make_plan(spec)
    out = tmp_path / "plan.parquet"
    plan.write(str(out))
    frame = pd.read_parquet(out)
    assert list(frame.columns) == [
        "volume_id",
        "index",
        *vocab.COLUMNS,
        "attributes",
        "age",
        "sex",
        "profile",
        "prompt",
        "seed",
    ]
    assert frame["volume_id"].tolist() == [f"demo_{i:07d}" for i in range(16)]
    assert frame[list(vocab.COLUMNS)].isin([0, 1]).all().all()
    assert (frame["Pleural effusion"].sum(), frame["Lung nodule"].sum()) == (4, 4)
    assert (frame["profile"] == "normal").sum() == 4
    for _, row in frame.iterrows():
        attrs = json.loads(row["attributes"])
        present = {f.id for f in vocab.FINDINGS if row[f.column] == 1}
        assert set(attrs) == present
        for fid, values in attrs.items():
            assert vocab.validate_attributes(fid, values) == values
        assert row["prompt"] and "None" not in row["prompt"]
        assert row["sex"] in ("M", "F") and 18 <= row["age"] <= 102
    meta = read_plan_metadata(str(out))
    assert meta["plan_hash"] == plan.plan_hash
    assert meta["spec"] == json.loads(spec.canonical_json())
    assert meta["reference"]["digest"] == plan.reference.digest


def test_plan_hash_changes_with_spec_and_reference(rich):
    spec = spec_from({"labels": {"Emphysema": {"count": 10}}})
    plan = make_plan(spec, reference=rich)
    other = spec_from({"labels": {"Emphysema": {"count": 11}}})
    assert make_plan(other, reference=rich).plan_hash != plan.plan_hash
    shifted = sample_reference("other", rich.labels[::-1], rich.age, rich.sex)
    assert make_plan(spec, reference=shifted).plan_hash != plan.plan_hash


def test_reference_that_cannot_produce_a_finding(tmp_path):
    labels = rich_labels(500)
    labels[:, column("emphysema")] = 0
    write_csv(tmp_path / "ref.csv", labels)
    spec = spec_from(
        {"labels": {"Emphysema": {"prevalence": 0.1}}, "reference": {"labels_csv": "ref.csv"}},
        folder=str(tmp_path),
    )
    message = plan_error(spec, "labels", "Emphysema", "prevalence")
    assert "no volume with Emphysema" in message
    assert "combinations the reference cannot produce" in message


def write_reference_without_emphysema_and_nodule(folder) -> None:
    """A reference CSV (ref.csv) in which no volume has both emphysema and a lung nodule."""
    labels = rich_labels(500)
    labels[labels[:, column("emphysema")] == 1, column("lung_nodule")] = 0
    write_csv(folder / "ref.csv", labels)


def test_pair_the_reference_never_has_together(tmp_path):
    write_reference_without_emphysema_and_nodule(tmp_path)
    spec = spec_from(
        {
            "joint": {"constraints": [{"both": ["Emphysema", "Lung nodule"], "count": 10}]},
            "reference": {"labels_csv": "ref.csv"},
        },
        folder=str(tmp_path),
    )
    message = plan_error(spec, "joint", "constraints", 0, "count")
    assert "combinations the reference cannot produce" in message


def test_raking_that_does_not_converge(tmp_path):
    write_reference_without_emphysema_and_nodule(tmp_path)
    spec = spec_from(
        {
            "labels": {"Emphysema": {"prevalence": 0.7}, "Lung nodule": {"prevalence": 0.7}},
            "reference": {"labels_csv": "ref.csv"},
        },
        folder=str(tmp_path),
    )
    with pytest.raises(SpecError) as caught:
        make_plan(spec)
    message = str(caught.value)
    assert "raking did not converge" in message, message
    assert "labels.Emphysema" in message or "labels.Lung nodule" in message


def test_model_directory_without_labels_csv(tmp_path):
    (tmp_path / "ckpt").mkdir()
    spec = spec_from({"model": "ckpt"}, folder=str(tmp_path))
    assert "has no labels.csv" in plan_error(spec, "model")


def test_model_directory_with_labels_csv(tmp_path):
    (tmp_path / "ckpt").mkdir()
    write_csv(tmp_path / "ckpt" / "labels.csv", rich_labels(300))
    plan = make_plan(spec_from({"model": "ckpt"}, folder=str(tmp_path)))
    assert plan.reference.description.startswith("training labels of ckpt")
    assert plan.reference.size == 300


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda f: f.drop(columns=["Emphysema"]), "lacks the columns Emphysema"),
        (lambda f: f.assign(**{"Lung nodule": 2}), "'Lung nodule': 2 is not a label"),
        (lambda f: f.iloc[:0], "has no rows"),
    ],
)
def test_bad_labels_csv(tmp_path, mutate, fragment):
    path = write_csv(tmp_path / "ref.csv", rich_labels(20))
    mutate(pd.read_csv(path)).to_csv(path, index=False)
    spec = spec_from({"reference": {"labels_csv": "ref.csv"}}, folder=str(tmp_path))
    assert fragment in plan_error(spec, "reference", "labels_csv")


def test_missing_labels_csv(tmp_path):
    spec = spec_from({"reference": {"labels_csv": "absent.csv"}}, folder=str(tmp_path))
    assert "cannot read" in plan_error(spec, "reference", "labels_csv")


def test_follow_reference_needs_demographic_columns(tmp_path):
    write_csv(tmp_path / "ref.csv", rich_labels(50))
    spec = spec_from(
        {"demographics": {"follow_reference": True}, "reference": {"labels_csv": "ref.csv"}},
        folder=str(tmp_path),
    )
    assert "has no ages and sexes" in plan_error(spec, "demographics", "follow_reference")


def test_small_effective_sample_size_warns(rich):
    spec = spec_from({"labels": {f: {"prevalence": 0.97} for f in IDS[:4]}})
    plan = make_plan(spec, reference=rich)
    assert plan.effective_size < 100
    assert any("effective sample size" in w for w in plan.warnings)


@settings(max_examples=60, deadline=None)
@given(
    weights=st.lists(st.floats(0, 10), min_size=1, max_size=12),
    total=st.integers(0, 200),
)
def test_largest_remainder_hits_the_total_with_floors_and_ceilings(weights, total):
    w = np.array(weights)
    assume(w.sum() > 0)
    expected = w / w.sum() * total
    counts = largest_remainder(expected, total)
    assert counts.sum() == total
    assert (counts >= np.floor(expected) - 1e-9).all() and (
        counts <= np.ceil(expected) + 1e-9
    ).all()


@settings(max_examples=60, deadline=None)
@given(
    branches=st.lists(st.tuples(st.integers(0, 50), st.floats(0, 1)), min_size=1, max_size=10),
    pick=st.floats(0, 1),
)
def test_split_counts_stays_within_each_branch(branches, pick):
    size = np.array([b[0] for b in branches])
    share = np.array([b[1] for b in branches])
    lo = int(size[share >= 1].sum())
    hi = int(size[share > 0].sum())
    total = lo + int(pick * (hi - lo))
    ones = split_counts(size, share, total)
    assert ones.sum() == total
    assert (ones >= 0).all() and (ones <= size).all()
    assert (ones[share == 0] == 0).all() and (ones[share == 1] == size[share == 1]).all()


def test_exact_counts_tolerance_turns_an_unreachable_count_into_a_warning():
    cells = np.array([[0], [1]], bool)
    weights = np.array([0.5, 0.5])
    with pytest.raises(PlanningError):
        exact_counts(cells[:1], weights[:1], 10, [Quota(2, ("labels", "x"), "x")])
    counts, notes = exact_counts(
        cells[:1], weights[:1], 10, [Quota(2, ("labels", "x"), "x")], tolerance=2
    )
    assert counts.tolist() == [10] and "within allocation.tolerance" in notes[0]
    counts, notes = exact_counts(cells, weights, 10, [Quota(7, ("labels", "x"), "x")])
    assert counts.tolist() == [3, 7] and notes == []


def test_systematic_counts_fill_every_cell_exactly():
    rng = np.random.default_rng(0)
    cell_of = rng.integers(0, 5, 200)
    weights = rng.random(200)
    wanted = np.array([0, 3, 17, 250, 1])
    counts = systematic_counts(wanted, cell_of, weights, rng)
    assert np.bincount(cell_of, counts, 5).astype(int).tolist() == wanted.tolist()
