"""The cohort store without Ray: layout, OME-Zarr metadata, commit protocol, resume, export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zarr
from fsspec.implementations.local import LocalFileSystem
from ome_zarr_models.v05 import Image, ImageLabel, Labels

from factory.anatomy import pack_masks, unpack_masks
from factory.data.ctrate import read_split
from factory.data.transforms import preprocessing, sample
from factory.models.checkpoint import load_checkpoint
from factory.pipeline import VolumeWriter, prepare_run
from factory.store.cohort import CohortExistsError, CohortStore
from factory.store.export import export_nifti
from factory.store.fs import StoreError, put_objects, retrying
from factory.store.layout import encode_volume, read_volume
from factory.store.reader import open_cohort
from tests.store_helpers import small_model, write_spec


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return small_model(tmp_path_factory.mktemp("model") / "small")


@pytest.fixture(scope="module")
def written(model, tmp_path_factory):
    """A 6-volume cohort with 4 volumes committed by a VolumeWriter (no Ray)."""
    base = tmp_path_factory.mktemp("cohort")
    spec = write_spec(base / "spec.yaml", model, n=6, output=str(base / "out"))
    run = prepare_run(str(spec))
    writer = VolumeWriter(run.url, {}, run.settings, threads=2)
    rows = writer(run.todo.slice(0, 4)).to_pylist()
    CohortStore(run.url).write_manifest(rows)
    return spec, run, writer, rows


def volume(shape=(80, 64, 20), seed=0):
    rng = np.random.default_rng(seed)
    hu = rng.integers(-1000, 1500, shape).astype(np.int16)
    masks = {"lungs": rng.random(shape) > 0.5, "heart": rng.random(shape) > 0.8}
    affine = np.diag([2.0, 2.5, 4.0, 1.0])
    affine[:3, 3] = [-40.0, -45.0, -40.0]
    return hu, {k: v.astype(np.uint8) for k, v in masks.items()}, affine


def test_volume_layout_is_sharded_compressed_and_valid_ome_zarr(tmp_path):
    hu, masks, affine = volume()
    root = zarr.open_group(str(tmp_path), mode="w", zarr_format=3)
    root.create_group("volumes")
    encoded = encode_volume(
        "v1", hu, masks, affine, (2.0, 2.5, 4.0), (-1000, 1000), {"prompt": "p"}
    )
    put_objects(LocalFileSystem(), str(tmp_path / "volumes/v1"), encoded.objects)
    sums = encoded.sums
    files = [p for p in (tmp_path / "volumes/v1").rglob("*") if p.is_file()]
    assert encoded.nbytes == sum(p.stat().st_size for p in files)  # bytes_stored, unlisted
    # Read by an independent reader: zarr-python directly, from the paths the docs give.
    image = zarr.open_array(str(tmp_path / "volumes/v1/hu"), mode="r")
    assert image.dtype == np.int16 and np.array_equal(image[...], hu)
    meta = json.loads((tmp_path / "volumes/v1/hu/zarr.json").read_text())
    shard = meta["codecs"][0]
    assert shard["name"] == "sharding_indexed"
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [128, 64, 20]  # one shard
    assert shard["configuration"]["chunk_shape"] == [64, 64, 20]  # inner chunks of <= 64
    blosc = shard["configuration"]["codecs"][1]
    assert blosc["name"] == "blosc" and blosc["configuration"]["cname"] == "zstd"
    assert blosc["configuration"]["clevel"] == 3 and blosc["configuration"]["shuffle"] == "shuffle"
    objects = sorted(
        p.relative_to(tmp_path / "volumes/v1/hu")
        for p in (tmp_path / "volumes/v1/hu").rglob("*")
        if p.is_file()
    )
    assert [str(p) for p in objects] == ["c/0/0/0", "zarr.json"]  # one shard object
    labels = json.loads((tmp_path / "volumes/v1/labels/anatomy/0/zarr.json").read_text())
    assert labels["codecs"][0]["configuration"]["codecs"][1]["configuration"]["shuffle"] == (
        "bitshuffle"
    )
    # OME-Zarr 0.5, validated by ome-zarr-models (not our code).
    group = zarr.open_group(str(tmp_path / "volumes/v1"), mode="r")
    ome = Image.from_zarr(group).attributes.ome.multiscales[0]
    assert [a.unit for a in ome.axes] == ["millimeter"] * 3
    assert list(ome.datasets[0].coordinateTransformations[0].scale) == [2.0, 2.5, 4.0]
    assert list(ome.datasets[0].coordinateTransformations[1].translation) == [-40.0, -45.0, -40.0]
    Labels.from_zarr(zarr.open_group(str(tmp_path / "volumes/v1/labels"), mode="r"))
    ImageLabel.from_zarr(zarr.open_group(str(tmp_path / "volumes/v1/labels/anatomy"), mode="r"))
    back = read_volume(root["volumes"], "v1")
    assert np.array_equal(back.hu, hu) and np.array_equal(back.affine, affine)
    assert all(np.array_equal(back.masks[k], masks[k]) for k in masks)
    assert sums["hu_sha256"] != sums["anatomy_sha256"]


def test_overlapping_masks_survive_bit_packing():
    rng = np.random.default_rng(1)
    masks = {n: (rng.random((8, 8, 8)) > 0.5).astype(np.uint8) for n in "abcdefgh"}
    back = unpack_masks(pack_masks(masks, list(masks)), list(masks))
    assert all(np.array_equal(back[n], masks[n]) for n in masks)
    with pytest.raises(ValueError, match="at most 8"):
        pack_masks({**masks, "i": masks["a"]}, [*masks, "i"])


def test_commit_protocol_status_and_check(written):
    _, run, writer, rows = written
    cohort = open_cohort(run.url)
    assert [r["status"] for r in rows] == ["written"] * 4
    assert list(cohort.manifest["volume_id"]) == [r["volume_id"] for r in rows]
    assert cohort.check() == []
    status = cohort.status()
    assert (status.planned, status.done, status.partial, status.missing) == (6, 4, 0, 2)
    # The manifest carries the labels under CT-RATE column names and the provenance.
    row = cohort.manifest.iloc[0]
    assert row["Pleural effusion"] in (0, 1) and row["model_hash"] == run.settings.model_hash
    sampler = {"guidance": 3.0, "scheduler": "rectified_flow", "steps": 2}  # the model's own
    assert json.loads(row["sampler"]) == sampler and run.settings.sampler == sampler
    assert 0 < row["bytes_stored"] < row["bytes_raw"]
    # A retried batch never generates a committed volume again.
    again = writer(run.todo.slice(0, 2)).to_pylist()
    assert [r["status"] for r in again] == ["skipped", "skipped"]
    assert [r["hu_sha256"] for r in again] == [r["hu_sha256"] for r in rows[:2]]


def test_check_finds_missing_and_damaged_chunks(written, tmp_path):
    _, run, _, rows = written
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run.url, copy)
    first, second = rows[0]["volume_id"], rows[1]["volume_id"]
    (copy / "volumes" / first / "hu" / "c" / "0" / "0" / "0").unlink()  # a lost shard
    shard = copy / "volumes" / second / "labels" / "anatomy" / "0" / "c" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped byte inside the compressed chunk
    shard.write_bytes(bytes(data))
    problems = open_cohort(str(copy)).check()
    assert f"{first}: shard c/0/0/0 is missing" in problems, problems
    assert any(p.startswith(second) for p in problems), problems
    assert not any(rows[2]["volume_id"] in p for p in problems)


def test_resume_recovers_lost_manifest_rows_and_redoes_partial_volumes(written, tmp_path):
    spec, run, _, _ = written
    import shutil

    copy = tmp_path / "resume"
    shutil.copytree(run.url, copy)
    store = CohortStore(str(copy))
    # Volume 5 committed but its manifest row lost (driver killed in between); volume 6 partial.
    fifth = VolumeWriter(str(copy), {}, run.settings, threads=2)(run.todo.slice(4, 1))
    partial = run.todo.slice(5, 1).column("volume_id")[0].as_py()
    (copy / "volumes" / partial).mkdir()
    (copy / "volumes" / partial / "zarr.json").write_text(
        '{"zarr_format": 3, "node_type": "group"}'
    )
    assert store.status().partial == 1 and store.status().uncommitted_markers == 1
    resumed = prepare_run(str(spec), out=str(copy))
    assert (resumed.state, resumed.recovered, resumed.done_before) == ("resumed", 1, 5)
    assert resumed.todo.column("volume_id").to_pylist() == [partial]
    manifest = store.read_manifest()
    assert fifth.column("volume_id")[0].as_py() in set(manifest["volume_id"])
    assert manifest["volume_id"].is_unique


def test_another_spec_into_the_same_output_is_refused(written, model, tmp_path):
    spec, run, _, _ = written
    other = write_spec(
        tmp_path / "other.yaml", model, n=6, output=run.url, cohort={"id": "t", "n": 6, "seed": 4}
    )
    with pytest.raises(CohortExistsError, match="plan_hash"):
        prepare_run(str(other))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(CohortExistsError, match="not empty"):
        prepare_run(str(spec), out=str(tmp_path / "busy"))
    replaced = prepare_run(str(spec), out=str(tmp_path / "busy"), overwrite=True)
    assert replaced.state == "overwritten" and not (tmp_path / "busy" / "notes.txt").exists()
    # the overwriting run's lease (the refused run before it took and gave back the first)
    # outlives the overwrite: it still holds the output
    assert [p.name for p in (tmp_path / "busy" / "lease").iterdir()] == ["000000002.json"]
    replaced.lease.check()
    replaced.release()


def test_writes_retry_transient_faults_and_name_persistent_ones(monkeypatch):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("endpoint down")
        return "ok"

    assert retrying("x", flaky, delays=(0.0, 0.0, 0.0)) == "ok" and len(calls) == 3
    with pytest.raises(StoreError, match=r"volume v9: writing.*3 attempts.*ConnectionError"):
        retrying(
            "volume v9: writing", lambda: (_ for _ in ()).throw(ConnectionError("down")), (0, 0)
        )


def test_a_volume_written_over_a_failed_attempt_reads_back_whole(tmp_path):
    """A write cut off halfway leaves some objects, one of them truncated; the retry puts every
    object again without listing or deleting, and the volume reads back whole."""
    zarr.open_group(str(tmp_path), mode="w", zarr_format=3).create_group("volumes")
    hu = np.arange(-500, 12, dtype=np.int16).reshape(8, 8, 8)
    masks = {"lungs": (hu < 0).astype(np.uint8)}
    args = (hu, masks, np.eye(4), (1.0, 1.0, 1.0), (-1000.0, 1000.0), {"seed": 1})
    encoded = encode_volume("v", *args)
    fs, folder = LocalFileSystem(), str(tmp_path / "volumes/v")
    shard = "hu/c/0/0/0"
    put_objects(fs, folder, {shard: encoded.objects[shard][:10], "zarr.json": b"{}"})
    with pytest.raises(Exception):  # noqa: B017  (what zarr raises for a torn shard varies)
        read_volume(zarr.open_group(str(tmp_path), mode="r")["volumes"], "v")
    retrying("volume v", lambda: put_objects(fs, folder, encoded.objects), delays=(0.0,))
    stored = read_volume(zarr.open_group(str(tmp_path), mode="r")["volumes"], "v")
    assert stored.record == {"seed": 1} and np.array_equal(stored.hu, hu)
    assert np.array_equal(stored.masks["lungs"], masks["lungs"])


def test_export_nifti_in_ct_rate_layout_reads_back(written, tmp_path):
    _, run, _, rows = written
    cohort = open_cohort(run.url)
    ids = [rows[1]["volume_id"], rows[3]["volume_id"]]
    assert export_nifti(cohort, tmp_path / "nifti", ids=ids, split="synth") == 2
    records = read_split(tmp_path / "nifti", "synth")  # ct-factory's own CT-RATE reader
    assert len(records) == 2
    overlap = False
    for record, row in zip(records, [rows[1], rows[3]], strict=True):
        image = nib.load(record.image)
        stored = cohort.volume(row["volume_id"])
        assert image.get_data_dtype() == np.int16
        assert np.array_equal(np.asarray(image.dataobj), stored.hu)
        assert np.allclose(image.affine, stored.affine)
        assert record.findings == row["prompt"]
        assert record.labels == tuple(int(row[c]) for c in cohort.manifest.columns[2:20])
        # The training preprocessing reads the label map through its legend and gives back the
        # stored anatomy channels voxel for voxel, overlaps included (random weights overlap).
        config = load_checkpoint(run.settings.model).config
        data = preprocessing(config, with_masks=True)(sample(record))
        channels = np.asarray(data["mask"])
        assert channels.shape[0] == len(config.diffusion.anatomy_channels) == len(stored.masks)
        for k, name in enumerate(config.diffusion.anatomy_channels):
            assert np.array_equal(channels[k], stored.masks[name]), name
        overlap |= bool((channels.sum(axis=0) > 1).any())
    assert overlap, "the check needs a voxel in two channels"
    legend = json.loads((tmp_path / "nifti" / "masks" / "labels.json").read_text())
    assert legend == {"1": "lungs", "2": "heart", "3": "lungs+heart"}
    with pytest.raises(KeyError, match="nope"):
        export_nifti(cohort, tmp_path / "x", ids=["nope"])


def test_dataset_reads_volumes_lazily_and_pickles(written):
    import pickle

    _, run, _, rows = written
    dataset = open_cohort(run.url).dataset(masks=True)
    assert len(dataset) == 4
    item = pickle.loads(pickle.dumps(dataset))[2]
    assert item["volume_id"] == rows[2]["volume_id"] and item["hu"].dtype == np.int16
    assert item["labels"].shape == (18,) and item["anatomy"].shape[0] == 2


def ctfactory(capsys, *args: str) -> tuple[int, str]:
    """``ctfactory ARGS`` in this process (no Ray is started for these): status and stderr."""
    from factory.cli import main

    code = main(list(args))
    return code, capsys.readouterr().err


def test_bad_input_fails_before_any_work_with_exit_2(capsys, model, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", model, n=4, output=str(tmp_path / "out"))
    code, err = ctfactory(capsys, "generate", str(spec), "--workers", "0")
    assert code == 2 and "--workers '0': need 1 <= MIN <= MAX" in err
    code, err = ctfactory(capsys, "generate", str(spec), "--in-flight", "0")
    assert code == 2 and "--in-flight 0: expected an integer >= 1" in err
    spec.write_text(spec.read_text().replace("steps: 2", "steps: 0"))
    code, err = ctfactory(capsys, "generate", str(spec))
    assert code == 2 and "sampler.steps" in err, err
    assert not (tmp_path / "out").exists()
    code, err = ctfactory(capsys, "status", str(tmp_path / "nothing-here"))
    assert code == 2 and "no cohort here" in err
    other = write_spec(tmp_path / "m.yaml", tmp_path / "no-model", n=4, output=str(tmp_path / "o"))
    code, err = ctfactory(capsys, "generate", str(other))
    assert code == 2 and "no-model" in err


def test_planning_a_run_never_loads_torch(model, tmp_path):
    """The driver checks the model (files, hashes, safetensors headers, config) and the sampler
    settings and plans without torch, MONAI or transformers: their import is the largest part
    of a driver's start-up, and its actors load them anyway."""
    spec = write_spec(tmp_path / "spec.yaml", model, n=4, output=str(tmp_path / "out"))
    program = (
        "import sys\nfrom factory.pipeline import prepare_run\n"
        f"run = prepare_run({str(spec)!r})\n"
        "print(run.todo.num_rows, run.settings.model_hash[:12])\n"
        "print(sorted(m for m in ('torch', 'monai', 'transformers') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    planned, loaded = done.stdout.splitlines()[-2:]
    assert planned.split() == ["4", load_checkpoint(model).hash[:12]]
    assert loaded == "[]"


def test_an_actors_first_volume_is_sampled_and_committed_alone(model, tmp_path):
    """The run's first volume comes after one is sampled, not a whole batch; later calls
    sample whole batches."""
    from factory.pipeline import load_actor_generator

    spec = write_spec(tmp_path / "spec.yaml", model, n=7, output=str(tmp_path / "out"))
    run = prepare_run(str(spec))
    store = CohortStore(run.url)
    calls: list[tuple[int, int]] = []  # (volumes sampled, volumes committed before)

    class Recording:
        def __init__(self, inner):
            self.inner, self.model_hash = inner, inner.model_hash

        def generate(self, requests, batch_size):
            calls.append((len(requests), len(store.committed_ids())))
            return self.inner.generate(requests, batch_size)

    writer = VolumeWriter(
        run.url, {}, run.settings, threads=2,
        loader=lambda ref, options: Recording(load_actor_generator(ref, options)),
    )  # fmt: skip
    rows = writer(run.todo.slice(0, 4)).to_pylist() + writer(run.todo.slice(4, 3)).to_pylist()
    assert calls == [(1, 0), (3, 1), (3, 4)]
    assert [r["volume_id"] for r in rows] == run.todo.column("volume_id").to_pylist()
    assert {r["status"] for r in rows} == {"written"}
