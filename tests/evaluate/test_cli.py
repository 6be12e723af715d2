"""``ctfactory eval`` without Ray: a small cohort (written by a VolumeWriter) against phantoms."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from factory import vocab
from factory.cli import main
from factory.evaluate.evaluation import compare, reference_items, score
from factory.evaluate.measure import zones_from
from factory.models.card import ModelCard
from factory.models.checkpoint import load_checkpoint, save_checkpoint
from factory.models.classifier import FindingClassifier, load_classifier
from factory.models.config import load_config
from factory.pipeline import VolumeWriter, prepare_run
from factory.store.cohort import CohortStore
from tests.browser_helpers import chromium
from tests.store_helpers import small_model, write_spec
from tests.train_helpers import SMALL_MODEL, make_dataset

EFFUSION = "Pleural effusion"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 6-volume cohort of the random small model, phantoms on its grid, a classifier."""
    base = tmp_path_factory.mktemp("eval")
    model = small_model(base / "model")
    spec = write_spec(base / "spec.yaml", model, n=6, output=str(base / "cohort"))
    run = prepare_run(str(spec))
    writer = VolumeWriter(run.url, {}, run.settings, threads=2)
    CohortStore(run.url).write_manifest(writer(run.todo).to_pylist())
    data = make_dataset(base / "phantom", n_train=2, n_valid=6)
    torch.manual_seed(0)
    config = load_config(SMALL_MODEL)
    weights = {"classifier": FindingClassifier(config).state_dict()}
    save_checkpoint(base / "classifier", config, weights, ModelCard("random-classifier"))
    return {"cohort": run.url, "data": data, "classifier": base / "classifier", "model": model}


def _eval(setup, *extra):
    return main(
        [
            "eval",
            str(setup["cohort"]),
            "--reference",
            str(setup["data"]),
            "--classifier",
            str(setup["classifier"]),
            *extra,
        ]
    )


def test_eval_writes_every_section(setup, capsys):
    assert _eval(setup) == 0
    printed = capsys.readouterr().out
    assert "factual correctness (macro AUC)" in printed and "FID 3D" in printed
    result = json.loads((Path(setup["cohort"]) / "report" / "eval.json").read_text())
    assert result["volumes"] == {"generated": 6, "real": 6}
    assert {"generated", "real", "auc_ratio"} <= set(result["factual_correctness"])
    d = result["distances"]
    assert {"fid_volume", "mmd_volume", "fid_axial", "fid_coronal", "fid_sagittal"} <= set(d)
    assert d["fid_volume"] > 0 and d["fid_2_5d"] > 0  # random-model noise is not a phantom
    assert result["reference"]["anatomy_masks"] is True
    real = result["measurements"]["real"]
    assert set(real) == {
        "Pleural effusion",
        "Emphysema",
        "Emphysema/lung_perc15",
        "Cardiomegaly",
        "Consolidation",
    }
    assert all(v["n_with"] + v["n_without"] == 6 for v in real.values())
    # The phantom reference has exact ground truth: the measured CTR is the phantom's own.
    agreement = result["measurements"]["phantom_agreement"]
    assert agreement["volumes"] == 6 and agreement["ctr"]["n"] == 6
    assert agreement["ctr"]["mean_abs_difference"] < 2e-3  # the truth is rounded to 0.001
    assert "classifier's vision tower" in result["feature_extractor"]
    assert result["classifier"]["hash"] == load_checkpoint(str(setup["classifier"])).hash
    assert result["clip"] is None  # the random test model has no 3D CLIP


def test_eval_with_a_3d_clip_scores_prompts_retrieval_and_zero_shot(setup, tmp_path, capfd):
    logs = Path(setup["cohort"]) / "logs"
    before = set(logs.glob("eval-*.log"))
    assert _eval(setup, "--clip", "builtin:demo", "--out", str(tmp_path / "e.json")) == 0
    # The console has ct-factory's progress and summary; the text encoder's loading bars and
    # per-batch truncation warnings are not there (the log, or one plain line, has them).
    printed = capfd.readouterr()
    assert "eval:" in printed.err and "Loading weights" not in printed.err
    assert "PromptTruncated" not in printed.err + printed.out
    (log,) = set(logs.glob("eval-*.log")) - before
    assert f"log: {log}" in printed.out
    clip = json.loads((tmp_path / "e.json").read_text())["clip"]
    assert all(-1 <= v <= 1 for v in clip["score"].values())
    retrieval = clip["real_retrieval"]
    assert retrieval["volumes"] == 6
    assert 0 <= retrieval["text_to_image_r1"] <= retrieval["text_to_image_r5"] <= 1
    assert set(clip["real_zero_shot"]["per_finding"]) == set(vocab.COLUMNS)


def test_identical_sets_have_zero_distance_and_ratio_one(setup):
    classifier = load_classifier(str(setup["classifier"]))
    config = load_checkpoint(str(setup["classifier"])).config
    n, masks, items = reference_items(str(setup["data"]), "valid", classifier, config, 6)
    assert n == 6 and masks
    zones = zones_from(i.anatomy for i in items())
    a = score(items(), classifier, zones, tuple(config.spacing_mm))
    b = score(items(), classifier, zones, tuple(config.spacing_mm))
    result = compare(a, b, classifier)
    assert result["distances"]["fid_volume"] == pytest.approx(0.0, abs=1e-6)
    assert result["distances"]["fid_2_5d"] == pytest.approx(0.0, abs=1e-6)
    ratio = result["factual_correctness"]["auc_ratio"]
    assert math.isnan(ratio) or ratio == pytest.approx(1.0)
    assert result["hu_quartiles"]["generated"] == result["hu_quartiles"]["real"]
    # A shifted set (every volume 200 HU denser) is further away.
    shifted = score(
        (type(i)(np.clip(i.hu + 200, -1000, 1000), i.labels, i.anatomy) for i in items()),
        classifier,
        zones,
        tuple(config.spacing_mm),
    )
    assert compare(shifted, b, classifier)["distances"]["fid_volume"] > 1e-3


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--reference", "{tmp}/nowhere"], "no such dataset folder"),
        (["--split", "test"], "test_predicted_labels.csv"),
        (["--classifier", "{model}"], "has no classifier network"),
        (["--limit", "1"], "--limit"),
        (["--clip", "{model}"], "has no clip network"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(setup, tmp_path, capsys, extra, message):
    extra = [e.format(tmp=tmp_path, model=setup["model"]) for e in extra]
    code = _eval(setup, *extra)  # a later option replaces the one _eval gives
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_a_cohort_on_another_grid_is_refused(setup, tmp_path, capsys):
    config = load_config("tiny")  # 64^3: the cohort is 32^3
    weights = {"classifier": FindingClassifier(config).state_dict()}
    save_checkpoint(tmp_path / "c64", config, weights, ModelCard("c64"))
    cli = ["eval", str(setup["cohort"]), "--reference", str(setup["data"])]
    code = main([*cli, "--classifier", str(tmp_path / "c64")])
    err = capsys.readouterr().err
    assert code == 2 and "32 x 32 x 32 voxels" in err and "64 x 64 x 64 voxels" in err, err


def test_report_is_one_html_file_that_opens_in_chromium(setup, tmp_path, capsys):
    assert _eval(setup) == 0  # the report shows eval.json's metrics
    assert main(["report", str(setup["cohort"]), "--out", str(tmp_path / "qc")]) == 0
    assert "report.html" in capsys.readouterr().out
    page = (tmp_path / "qc" / "report.html").read_text()
    for section in ("prevalence", "cooccurrence", "demographics", "metrics", "montage", "pairs"):
        assert f'id="{section}"' in page, section
    assert "macro AUC (factual correctness)" in page and "fid 2 5d" in page
    assert 'src="http' not in page and 'src="data:image/png;base64,' in page  # self-contained
    # Each montage row names its volumes, each with the row's finding; the viewer opens them.
    montage = page.split('id="montage"')[1].split("</section>")[0]
    rows = re.findall(r"<tr><td>([^<]+)</td><td>([^<]+)</td></tr>", montage)
    manifest = CohortStore(setup["cohort"]).read_manifest().set_index("volume_id")
    assert rows and rows[-1][0] in (*vocab.COLUMNS, "No finding")
    for finding, ids in rows:
        labels = manifest.loc[ids.split(", "), list(vocab.COLUMNS)]
        has = labels.sum(axis=1) == 0 if finding == "No finding" else labels[finding] == 1
        assert has.all(), (finding, ids)
    first = rows[0][1].split(", ")[0]
    assert f"<code>ctfactory view {setup['cohort']} --volume {first}</code>" in page
    figures = sorted(p.name for p in (tmp_path / "qc").glob("*.png"))
    assert figures == [
        "qc-cooccurrence.png", "qc-demographics.png", "qc-montage.png", "qc-prevalence.png"
    ]  # fmt: skip
    for name in figures:
        assert (tmp_path / "qc" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The default place is the cohort's report/ folder.
    assert main(["report", str(setup["cohort"])]) == 0
    assert (Path(setup["cohort"]) / "report" / "report.html").read_text() == page

    driver = chromium()
    try:
        driver.get((tmp_path / "qc" / "report.html").as_uri())
        assert driver.title.startswith("ct-factory QC report")
        loaded = driver.execute_script(
            "return Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)"
        )
        assert loaded and all(loaded), loaded
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not severe, severe
    finally:
        driver.quit()


def test_prevalence_table_follows_spec_plan_and_manifest(setup):
    from factory.evaluate.qc import prevalence_table
    from factory.store.reader import open_cohort

    store = open_cohort(str(setup["cohort"]))
    manifest = store.manifest
    plan = store.read_plan().to_pandas()
    table = prevalence_table(store.settings(), plan, manifest).set_index("finding")
    # write_spec asks for 50 % pleural effusion in 6 volumes (exact allocation: 3).
    assert table.loc["Pleural effusion", "requested"] == pytest.approx(0.5)
    assert table.loc["Pleural effusion", "planned"] == pytest.approx(plan[EFFUSION].mean())
    assert table.loc["Pleural effusion", "in_cohort"] == pytest.approx(manifest[EFFUSION].mean())
    assert table.loc["Emphysema", "requested"] is None or np.isnan(
        table.loc["Emphysema", "requested"]
    )
    assert "verified" not in table  # this cohort has no verify block


def test_a_folder_that_is_not_a_cohort_is_refused(setup, tmp_path, capsys):
    for command in (
        ["eval", str(tmp_path), "--reference", str(setup["data"])],
        ["report", str(tmp_path)],
    ):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "no cohort here" in err and err.count("\n") == 1, err
