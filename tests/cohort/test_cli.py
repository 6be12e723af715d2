"""``ctfactory plan``: every example cohort plans to its numbers; bad specs exit 2, one line."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from factory import vocab
from factory.cli import main
from factory.cohort.allocate import round_half_up
from factory.cohort.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
COHORTS = ROOT / "cohorts"


def test_plan_command_writes_plan_and_plot(tmp_path, run_cli):
    out, png = tmp_path / "plan.parquet", tmp_path / "plan.png"
    done = run_cli("plan", "cohorts/demo.yaml", "--out", str(out), "--plot", str(png))
    assert done.returncode == 0, done.stderr
    assert "Pleural effusion" in done.stdout and "4 (0.250)" in done.stdout
    assert "plan hash: " in done.stdout and "demographics" in done.stdout
    assert len(pd.read_parquet(out)) == 16
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_spec_exits_2_with_one_line_and_no_traceback(tmp_path, run_cli):
    spec = tmp_path / "bad.yaml"
    text = (COHORTS / "demo.yaml").read_text().replace("{prevalence: 0.25}", "{prevalence: 2.5}", 1)
    spec.write_text(text)
    done = run_cli("plan", str(spec))
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    line = 1 + text.splitlines().index("  Pleural effusion: {prevalence: 2.5}")
    assert lines[0].startswith(
        f"ctfactory plan: error: {spec}:{line}:22: labels.Pleural effusion.prevalence: "
    )


@pytest.mark.parametrize("name", ["demo", "balanced-18", "effusion-enriched", "match-reference"])
def test_each_example_plans_to_its_numbers(name, tmp_path, capsys):
    out = tmp_path / f"{name}.parquet"
    assert main(["plan", str(COHORTS / f"{name}.yaml"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    spec = load_spec(COHORTS / f"{name}.yaml")
    frame = pd.read_parquet(out)
    n = spec.cohort.n
    assert len(frame) == n and frame["volume_id"].is_unique
    for fid, target in spec.resolved.targets.items():
        if target.count is not None:
            assert frame[vocab.BY_ID[fid].column].sum() == target.count, fid
    for k, profile in enumerate(spec.resolved.profiles):
        rows = frame[frame["profile"] == profile.name]
        assert len(rows) == profile.count
        present = rows[list(vocab.COLUMNS)].sum(axis=0)
        assert {vocab.resolve(c) for c in present[present > 0].index} == set(profile.present), k
    male = spec.resolved.male_fraction
    if male is not None:
        assert (frame["sex"] == "M").sum() == round_half_up(male * n)
    assert "MISSED" not in printed and f"{n:,} volumes" in printed


def test_match_reference_follows_the_reference_prevalences(tmp_path):
    out = tmp_path / "match.parquet"
    assert main(["plan", str(COHORTS / "match-reference.yaml"), "--out", str(out)]) == 0
    reference = pd.read_csv(COHORTS / "reference" / "phantom-labels.csv")[list(vocab.COLUMNS)]
    planned = pd.read_parquet(out)[list(vocab.COLUMNS)]
    assert (planned.mean() - reference.mean()).abs().max() < 1e-3


def test_missing_spec_file(capsys):
    assert main(["plan", "no/such/spec.yaml"]) == 2
    assert "no/such/spec.yaml: no such file" in capsys.readouterr().err


def test_unwritable_output_is_a_usage_error(tmp_path, capsys):
    out = tmp_path / "missing-dir" / "plan.parquet"
    assert main(["plan", str(COHORTS / "demo.yaml"), "--out", str(out)]) == 2
    assert "--out" in capsys.readouterr().err


def test_help_shows_examples(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    assert "ctfactory plan cohorts/demo.yaml" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("change", "key", "fragment"),
    [
        (
            ("model: builtin:demo", "model: builtin:dem"),
            "model",
            "builtin:dem: no such builtin model; available: builtin:demo, builtin:demo-classifier",
        ),
        (("model: builtin:demo", "model: {empty}"), "model", "{empty}: missing config.yaml"),
        (
            ("sampler: {steps: 20", "sampler: {scheduler: ddim, steps: 20"),
            "sampler.scheduler",
            "scheduler 'ddim' cannot sample a model trained with objective 'rflow'; valid: "
            "rectified_flow",
        ),
        (
            ("output: demo-out/cohort", "output: memory://cohorts/demo"),
            "output",
            "cannot write a cohort on memory://: its commit (a completion marker created only if "
            "absent) is proven on local paths, file:// and s3://",
        ),
    ],
)
def test_plan_checks_the_model_sampler_and_output_before_planning(
    change, key, fragment, tmp_path, capsys
):
    (tmp_path / "empty").mkdir()
    old, new = change
    text = (COHORTS / "demo.yaml").read_text()
    assert old in text
    spec = tmp_path / "spec.yaml"
    spec.write_text(text.replace(old, new.replace("{empty}", str(tmp_path / "empty"))))
    line = 1 + next(i for i, t in enumerate(spec.read_text().splitlines()) if t.startswith(key[:6]))
    assert main(["plan", str(spec)]) == 2
    printed = capsys.readouterr()
    assert printed.out == ""
    message = printed.err.strip()
    assert message.startswith(f"ctfactory plan: error: {spec}:{line}:"), message
    assert f": {key}: " in message and "\n" not in message, message
    assert fragment.replace("{empty}", str(tmp_path / "empty")) in message, message


def test_plan_says_what_it_did_not_check_of_a_remote_model(tmp_path, capsys):
    text = (COHORTS / "demo.yaml").read_text().replace("model: builtin:demo", "model: s3://b/m")
    spec = tmp_path / "spec.yaml"
    spec.write_text(text.replace("reference: model", "reference: phantom"))
    assert main(["plan", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "model s3://b/m: not checked here (a remote model: generate downloads it" in out
    assert main(["plan", "cohorts/demo.yaml"]) == 0
    assert "model builtin:demo: files, config and weights headers checked; samples with " in (
        capsys.readouterr().out
    )
