"""The contract modules at the bottom of factory/: run settings, seeds, anatomy legends."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from factory.anatomy import (
    LegendError,
    channel_legend,
    channels_from_labels,
    pack_channels,
    read_legend,
)
from factory.schema import RunSettings, SchemaError
from factory.seeds import attempt_seed, volume_seeds

SETTINGS = RunSettings(
    format="ct-factory cohort v1", cohort_id="c", n=4, plan_hash="p" * 64, spec={"n": 4},
    model="builtin:demo", model_hash="m" * 64, model_name="demo",
    sampler={"steps": 20, "guidance": 5.0, "scheduler": "rectified_flow"},
    grid={"shape": [64, 64, 64], "spacing_mm": [6.0, 6.0, 5.0]},
)  # fmt: skip


def test_run_settings_round_trip_through_json_and_name_what_is_missing():
    again = RunSettings.from_json(json.loads(json.dumps(SETTINGS.to_json())))
    assert again == SETTINGS
    broken = SETTINGS.to_json()
    del broken["model_hash"]
    with pytest.raises(SchemaError, match="model_hash"):
        RunSettings.from_json(broken)


def test_only_identity_keys_decide_whether_a_run_resumes():
    later = dataclasses.replace(SETTINGS, created="tomorrow", ct_factory_version="9")
    assert SETTINGS.differences(later) == []
    other = dataclasses.replace(SETTINGS, sampler={**SETTINGS.sampler, "steps": 30})
    (diff,) = SETTINGS.differences(other)
    assert diff.startswith("sampler: ") and "'steps': 30" in diff


def test_seeds_depend_on_the_cohort_seed_and_index_alone():
    whole = volume_seeds(5, np.arange(100))
    assert np.array_equal(whole[40:60], volume_seeds(5, np.arange(40, 60)))
    assert (whole >= 0).all() and len(set(whole.tolist())) == 100
    assert attempt_seed(123, 1) == 123 and attempt_seed(123, 2) != attempt_seed(123, 3)


def test_packed_channels_keep_overlaps_and_read_back_through_the_legend(tmp_path):
    rng = np.random.default_rng(0)
    masks = {c: (rng.random((6, 5, 4)) > 0.5).astype(np.uint8) for c in ("lungs", "vessels")}
    packed, legend = pack_channels(masks)
    assert legend == channel_legend(["lungs", "vessels"]) == {
        1: "lungs", 2: "vessels", 3: "lungs+vessels"
    }  # fmt: skip
    back = channels_from_labels(packed, legend, ["vessels", "lungs"])
    assert np.array_equal(back[0], masks["vessels"]) and np.array_equal(back[1], masks["lungs"])
    with pytest.raises(LegendError, match=r"labels\.json: missing"):
        read_legend(tmp_path)
    (tmp_path / "labels.json").write_text('{"0": "lungs"}')
    with pytest.raises(LegendError, match=r"1\.\.255"):
        read_legend(tmp_path)


def test_one_parser_of_model_references_for_the_spec_and_the_loader(tmp_path):
    from factory.cohort.spec import load_spec
    from factory.models.checkpoint import CheckpointError, load_checkpoint
    from factory.refs import RefError, parse_ref

    assert parse_ref("builtin:demo").name == "demo"
    assert parse_ref("gs://bucket/m/").url == "gs://bucket/m"
    assert parse_ref("memory://m").kind == "remote"
    assert parse_ref(f"file://{tmp_path}").path == str(tmp_path)
    assert parse_ref("models/x").path.endswith("/models/x")
    for bad, why in (("builtin:Big Model", "builtin model name"), ("s3://", "no bucket")):
        with pytest.raises(RefError, match=why):
            parse_ref(bad)
    # Every form the loader takes, the spec takes too (and the loader names the forms).
    spec = tmp_path / "spec.yaml"
    for ref in ("gs://bucket/m", "memory://m", f"file://{tmp_path}", "builtin:demo"):
        spec.write_text(f"schema_version: 1\ncohort: {{id: t, n: 2}}\nmodel: {ref}\noutput: o\n")
        assert load_spec(str(spec)).model == ref
    with pytest.raises(CheckpointError, match="unknown URL protocol 'nope'"):
        load_checkpoint("nope://x/y")
