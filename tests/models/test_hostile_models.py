"""Hostile model files (issue 24, item 7): a safetensors header claiming enormous tensors, an
oversized card, config or checksums, a symbolic link out of the model directory, and a model on
S3 that changes between the driver's read and a worker's: each refused by name, nothing read
that should not be, nothing unpickled, no cache entry half-updated."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import boto3
import pytest
import s3fs
import safetensors.torch
import torch
from safetensors.torch import save_file

from factory.models import checkpoint as ckpt
from factory.models.card import ModelCard
from factory.models.checkpoint import (
    MAX_METADATA_BYTES,
    CheckpointError,
    check_safetensors,
    content_hash,
    describe,
    load_checkpoint,
    save_checkpoint,
    upload_checkpoint,
)
from factory.models.config import load_config
from factory.models.importer import WeightsError, import_vae
from factory.pipeline import ActorStartError, VolumeWriter
from factory.schema import RunSettings
from tests.models.test_checkpoint import LABELS, _card, _rewrite_checksums, _weights
from tests.store_helpers import small_model


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A saved checkpoint (two networks, labels) under tmp_path."""
    labels = tmp_path / "train_labels.csv"
    labels.write_text(LABELS)
    save_checkpoint(tmp_path / "model", load_config("tiny"), _weights(), _card(), labels)
    return tmp_path / "model"


def _forbid_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any read of a checkpoint's contents fail the test."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("read a file that should have been refused first")

    for name in ("_sha256_file", "_read_checksums", "check_safetensors", "_read_config"):
        monkeypatch.setattr(ckpt, name, forbidden)
    monkeypatch.setattr(safetensors.torch, "load_file", forbidden)


# ----- safetensors headers --------------------------------------------------------------------


def _safetensors(header: object, data: bytes = b"", length: int | None = None) -> bytes:
    """A file in the safetensors layout: 8-byte length, JSON header, data (any of them hostile)."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def _tensor(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


HOSTILE_HEADERS = {
    "header length 2^60": (
        _safetensors({}, length=2**60),
        r"its header claims 1,152,921,504,606,846,976 bytes; the limit is 100,000,000 bytes",
    ),
    "header past the end": (_safetensors(b"{}", length=1000), r"claims 1,000 bytes but only 2"),
    "shorter than the length": (b"\x01\x02", r"2 bytes, less than the 8-byte header length"),
    "enormous tensor": (
        _safetensors({"w": _tensor("F32", [2**40, 2**40], 0, 16)}, bytes(16)),
        r"tensor 'w': F32 of shape \[1099511627776, 1099511627776\] needs more than 2\^64 "
        r"bytes but its data_offsets span 16",
    ),
    "offsets past the end": (
        _safetensors({"w": _tensor("U8", [2**62], 0, 2**62)}, bytes(8)),
        r"tensor 'w': data_offsets \[0, 4,611,686,018,427,387,904\] reach past the data "
        r"section's 8 bytes",
    ),
    "shape and span disagree": (
        _safetensors({"w": _tensor("F32", [3], 0, 8)}, bytes(8)),
        r"tensor 'w': F32 of shape \[3\] needs 12 bytes but its data_offsets span 8",
    ),
    "overlapping tensors": (
        _safetensors({"a": _tensor("U8", [8], 0, 8), "b": _tensor("U8", [8], 4, 12)}, bytes(12)),
        r"tensor 'b' starts at byte 4 of the data, not at 8 where the tensor before it ends",
    ),
    "bytes after the tensors": (
        _safetensors({"w": _tensor("U8", [8], 0, 8)}, bytes(16)),
        r"its tensors end at byte 8 of the data but the file at 16",
    ),
    "unknown dtype": (
        _safetensors({"w": _tensor("F128", [1], 0, 16)}, bytes(16)),
        r"tensor 'w': dtype 'F128'; valid: BOOL, U8",
    ),
    "negative dimension": (
        _safetensors({"w": _tensor("U8", [-8], 0, 8)}, bytes(8)),
        r"tensor 'w': shape \[-8\] is not a list of naturals",
    ),
    "boolean offsets": (
        _safetensors({"w": {"dtype": "U8", "shape": [1], "data_offsets": [False, True]}}, b"x"),
        r"tensor 'w': data_offsets \[False, True\] are not \[begin, end\]",
    ),
    "not an object": (_safetensors([1, 2]), r"its header is not a JSON object"),
    "nested too deep": (_safetensors(b"[" * 100_000), r"its header is not UTF-8 JSON"),
    "metadata not strings": (
        _safetensors({"__metadata__": {"n": 1}}),
        r"its __metadata__ is not a mapping of strings",
    ),
}


@pytest.mark.parametrize("case", HOSTILE_HEADERS)
def test_a_hostile_safetensors_header_is_refused_by_the_loader_naming_file_and_tensor(
    model: Path, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, message = HOSTILE_HEADERS[case]
    (model / "vae.safetensors").write_bytes(data)
    _rewrite_checksums(model)  # a forger's checksums: the header is what refuses it

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("read tensors of a file whose header was not checked")

    monkeypatch.setattr(safetensors.torch, "load_file", forbidden)
    path = model / "vae.safetensors"
    with pytest.raises(
        CheckpointError, match=rf"^{path}: not a readable safetensors file: .*{message}"
    ):
        load_checkpoint(model)


@pytest.mark.parametrize("case", HOSTILE_HEADERS)
def test_import_model_checks_a_safetensors_file_with_the_same_check(
    tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, message = HOSTILE_HEADERS[case]
    path = tmp_path / "vae.safetensors"
    path.write_bytes(data)

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("loaded tensors before the header was checked")

    monkeypatch.setattr(safetensors.torch, "load_file", forbidden)
    with pytest.raises(
        WeightsError, match=rf"^{path}: not a readable safetensors file: .*{message}"
    ):
        import_vae(path, load_config("tiny"), tmp_path / "out", license="x")
    assert not (tmp_path / "out").exists()


def test_valid_safetensors_pass_the_header_check(tmp_path: Path) -> None:
    """Empty tensors, metadata, every dtype size and padding that safetensors writes are valid."""
    path = tmp_path / "ok.safetensors"
    tensors = {
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(1.5, dtype=torch.float64),
        "mask": torch.ones(3, dtype=torch.bool),
        "half": torch.ones(2, 5, dtype=torch.bfloat16),
        "ints": torch.arange(7, dtype=torch.int16),
    }
    save_file(tensors, path, metadata={"format": "pt"})
    check_safetensors(path)  # no error
    assert set(safetensors.torch.load_file(path)) == set(tensors)


# ----- oversized metadata ---------------------------------------------------------------------


def _pad_to(path: Path, size: int) -> None:
    """Pad a JSON or YAML file with trailing spaces (still valid) to ``size`` bytes."""
    with path.open("ab") as f:
        f.write(b" " * (size - path.stat().st_size))


@pytest.mark.parametrize("name", ["config.yaml", "model_card.json", "checksums.json"])
def test_an_oversized_metadata_file_is_refused_before_it_is_read_or_hashed(
    model: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _pad_to(model / name, MAX_METADATA_BYTES + 1)
    if name != "checksums.json":
        _rewrite_checksums(model)
    _forbid_reading(monkeypatch)
    message = (
        rf"^{model / name}: 1,048,577 bytes; the limit for config.yaml, model_card.json, "
        r"checksums.json is 1,048,576 bytes"
    )
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(model)
    with pytest.raises(CheckpointError, match=message):
        describe(model)


def test_a_card_over_the_limit_is_not_saved(tmp_path: Path) -> None:
    card = ModelCard(name="big", description="x" * MAX_METADATA_BYTES)
    with pytest.raises(CheckpointError, match=r"model_card.json: 1,04\d,\d{3} bytes; the limit"):
        save_checkpoint(tmp_path / "m", load_config("tiny"), _weights(), card)
    assert list(tmp_path.iterdir()) == []


# ----- links and other entries ----------------------------------------------------------------


def _link_out(model: Path) -> tuple[str, Path]:
    """labels.csv replaced by a link to an identical file outside: checksums still match."""
    outside = model.parent / "elsewhere.csv"
    (model / "labels.csv").rename(outside)
    (model / "labels.csv").symlink_to(outside)
    return "labels.csv", outside


def _link_in(model: Path) -> tuple[str, Path]:
    """model_card.md replaced by a link to labels.csv, inside the directory."""
    (model / "model_card.md").unlink()
    (model / "model_card.md").symlink_to("labels.csv")
    return "model_card.md", Path("labels.csv")


def _linked_directory(model: Path) -> tuple[str, Path]:
    """images/ is a link to a directory outside the checkpoint."""
    outside = model.parent / "pictures"
    outside.mkdir()
    (outside / "a.png").write_bytes(b"\x89PNG")
    (model / "images").symlink_to(outside, target_is_directory=True)
    return "images", outside


LINKS = {"file outside": _link_out, "file inside": _link_in, "directory": _linked_directory}


@pytest.mark.parametrize("case", LINKS)
def test_a_symbolic_link_is_refused_naming_it_and_its_target_before_anything_is_read(
    model: Path, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, target = LINKS[case](model)
    where = "inside" if case == "file inside" else "outside"
    resolved = (model / target) if where == "inside" else target
    _forbid_reading(monkeypatch)
    message = (
        rf"^{model}: {name} is a symbolic link to {target} \({resolved}, {where} the "
        r"checkpoint\); a checkpoint holds plain files and directories only"
    )
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(model)
    with pytest.raises(CheckpointError, match=message):
        describe(model)
    with pytest.raises(CheckpointError, match=message):
        content_hash(model)


def test_a_fifo_is_refused_before_anything_is_read(
    model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    os.mkfifo(model / "notes")  # opening it to hash or read would block
    _forbid_reading(monkeypatch)
    with pytest.raises(CheckpointError, match=rf"^{model}: notes is not a plain file or directory"):
        load_checkpoint(model)


# ----- a model on S3 that changes between the driver's and a worker's read --------------------


def _bucket(s3: dict) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(**s3["options"], skip_instance_cache=True)


@pytest.mark.parametrize("change", ["weights overwritten", "checksums of another model"])
def test_a_model_changed_on_s3_after_the_driver_read_it_is_refused_on_a_worker(
    model: Path, tmp_path: Path, s3: dict, change: str
) -> None:
    url, options = "s3://runs-bucket/models/m", s3["options"]
    upload_checkpoint(model, url, options)
    driver = load_checkpoint(url, cache_dir=tmp_path / "driver", storage_options=options)
    fs = _bucket(s3)
    if change == "weights overwritten":
        other = {"weight": torch.zeros(3, 4), "bias": torch.zeros(3)}
        save_file(other, tmp_path / "other.safetensors")
        fs.put_file(str(tmp_path / "other.safetensors"), "runs-bucket/models/m/vae.safetensors")
        first_bad = "vae.safetensors"
    else:
        labels = model.parent / "train_labels.csv"
        other = tmp_path / "other"
        save_checkpoint(other, load_config("tiny"), _weights(), ModelCard(name="v2"), labels)
        fs.put_file(str(other / "checksums.json"), "runs-bucket/models/m/checksums.json")
        first_bad = "model_card.json"
    worker = tmp_path / "worker"
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(url, cache_dir=worker, storage_options=options)
    assert str(caught.value).startswith(f"{url}: {first_bad} does not match checksums.json")
    assert "nothing was cached: the model at the URL changed" in str(caught.value)
    assert list(worker.iterdir()) == []  # no entry, no partial download left
    # The driver's copy is keyed by its content and untouched: it still verifies as read, and
    # serves the URL while the URL's checksums.json names that content.
    assert load_checkpoint(driver.directory).hash == driver.hash == content_hash(model)
    if change == "weights overwritten":
        again = load_checkpoint(url, cache_dir=tmp_path / "driver", storage_options=options)
        assert again.hash == driver.hash and again.directory == driver.directory
    else:
        with pytest.raises(CheckpointError, match=rf"^{url}: model_card.json does not match"):
            load_checkpoint(url, cache_dir=tmp_path / "driver", storage_options=options)


def test_a_model_replaced_at_its_url_is_a_new_entry_and_a_worker_refuses_it(
    tmp_path: Path, s3: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The driver records the hash it read; the model is re-uploaded at the same URL; a worker
    loading the URL afterwards gets the new content, which the pipeline refuses. The driver's
    cached copy is not replaced under it: its weights, read only now, are the ones it checked."""
    url, options = "s3://runs-bucket/models/replaced", s3["options"]
    first, second = small_model(tmp_path / "a"), small_model(tmp_path / "b", seed=1)
    upload_checkpoint(first, url, options)
    cache = tmp_path / "cache"
    driver = load_checkpoint(url, cache_dir=cache, storage_options=options)
    upload_checkpoint(second, url, options)
    after = load_checkpoint(url, cache_dir=cache, storage_options=options)
    assert (driver.hash, after.hash) == (content_hash(first), content_hash(second))
    assert driver.directory != after.directory and driver.directory.is_dir()
    expected = load_checkpoint(first).state_dict("vae")
    got = driver.state_dict("vae")
    assert all(torch.equal(got[k], v) for k, v in expected.items())

    settings = RunSettings(
        format="", cohort_id="t", n=1, plan_hash="", spec={}, model=url,
        model_hash=driver.hash, model_name="", sampler={}, grid={},
    )  # fmt: skip
    monkeypatch.setenv("CTFACTORY_CACHE", str(tmp_path / "worker"))  # another node's cache
    with pytest.raises(ActorStartError) as caught:
        VolumeWriter(str(tmp_path / "cohort"), options, settings)
    assert f"hash {after.hash[:16]} on " in str(caught.value)
    assert f"but {driver.hash[:16]} on the driver" in str(caught.value)


def test_s3_names_outside_the_model_and_oversized_checksums_are_refused_before_download(
    model: Path, tmp_path: Path, s3: dict
) -> None:
    url, options = "s3://runs-bucket/models/odd", s3["options"]
    upload_checkpoint(model, url, options)
    client = boto3.client(
        "s3",
        endpoint_url=options["endpoint_url"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    client.put_object(Bucket="runs-bucket", Key="models/odd/images/", Body=b"")  # a folder marker
    cache = tmp_path / "cache"
    assert load_checkpoint(url, cache_dir=cache, storage_options=options).hash == content_hash(
        model
    )
    client.put_object(Bucket="runs-bucket", Key="models/odd/../../escape.txt", Body=b"x")
    with pytest.raises(CheckpointError, match=rf"^{url}: refusing file names .*\.\./\.\./escape"):
        load_checkpoint(url, cache_dir=tmp_path / "fresh", storage_options=options)
    assert not list(tmp_path.rglob("escape.txt")) and not (tmp_path / "fresh").exists()

    client.delete_object(Bucket="runs-bucket", Key="models/odd/../../escape.txt")
    data = (model / "checksums.json").read_bytes()
    padded = data + b" " * (MAX_METADATA_BYTES + 1 - len(data))
    client.put_object(Bucket="runs-bucket", Key="models/odd/checksums.json", Body=padded)
    message = rf"^{url}/checksums.json: 1,048,577 bytes; the limit"
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(url, cache_dir=tmp_path / "fresh", storage_options=options)
    with pytest.raises(CheckpointError, match=message):
        describe(url, options)
    assert not (tmp_path / "fresh").exists()


def test_a_cache_entry_completed_by_another_process_meanwhile_is_kept_not_replaced(
    model: Path, tmp_path: Path, s3: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers on one node download the same model at once: the second to finish keeps the
    first one's entry (which that one may be reading) instead of swapping its own in."""
    url, options, cache = "s3://runs-bucket/models/twice", s3["options"], tmp_path / "cache"
    upload_checkpoint(model, url, options)
    real, other = ckpt._download, {}

    def download_while_another_finishes(*args: object) -> None:
        if not other:  # the other worker starts after us and completes its download first
            other["started"] = True
            checkpoint = load_checkpoint(url, cache_dir=cache, storage_options=options)
            other.update(checkpoint=checkpoint, inode=checkpoint.directory.stat().st_ino)
        real(*args)

    monkeypatch.setattr(ckpt, "_download", download_while_another_finishes)
    ours = load_checkpoint(url, cache_dir=cache, storage_options=options)
    theirs = other["checkpoint"]
    assert ours.directory == theirs.directory and ours.hash == theirs.hash == content_hash(model)
    assert theirs.directory.stat().st_ino == other["inode"]  # the same directory, not a swap
    assert sorted(p.name for p in cache.iterdir()) == [ours.hash]  # no partial left
    assert theirs.state_dict("vae").keys() == _weights()["vae"].keys()
