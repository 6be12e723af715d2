"""Checkpoint I/O: round trip, content hash, pickle refusal, builtin registry, remote caches."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import fsspec
import pytest
import safetensors.torch
import torch

from factory.models import checkpoint as ckpt
from factory.models.card import ModelCard
from factory.models.checkpoint import (
    Checkpoint,
    CheckpointError,
    content_hash,
    load_checkpoint,
    resolve,
    save_checkpoint,
    save_with_card,
)
from factory.models.config import dump_config, load_config

LABELS = "VolumeName,Emphysema\ntrain_1_a_1.nii.gz,1\n"


def _weights() -> dict[str, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    vae = torch.nn.Linear(4, 3).state_dict()
    vae["transposed"] = torch.randn(3, 5).t()  # non-contiguous
    vae["half"] = torch.randn(2, 2, dtype=torch.bfloat16)
    diffusion = torch.nn.Linear(3, 2).state_dict()
    diffusion["tied"] = diffusion["weight"]  # shares storage
    return {"vae": vae, "diffusion": diffusion}


def _card() -> ModelCard:
    return ModelCard(name="tiny-test", steps=12, metrics={"loss": 0.25}, extra={"seed": 1})


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, str]:
    """A checkpoint with labels saved under tmp_path, and its hash."""
    labels = tmp_path / "train_labels.csv"
    labels.write_text(LABELS)
    directory = tmp_path / "model"
    return directory, save_checkpoint(
        directory, load_config("tiny"), _weights(), _card(), labels_csv=labels
    )


def _rewrite_checksums(directory: Path) -> None:
    """Re-record checksums.json after a deliberate edit, as a forger would."""
    files = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.name != ckpt.CHECKSUMS_FILE
    }
    lines = "".join(f"{n}\t{d}\n" for n, d in sorted(files.items()))
    digest = hashlib.sha256(lines.encode()).hexdigest()
    checksums = {"files": files, "content_hash": digest}
    (directory / ckpt.CHECKSUMS_FILE).write_text(json.dumps(checksums))


def test_round_trip_is_exact(saved: tuple[Path, str]) -> None:
    directory, digest = saved
    loaded = load_checkpoint(directory)
    assert isinstance(loaded, Checkpoint)
    assert loaded.config == load_config("tiny")
    assert loaded.card == _card()
    assert loaded.hash == digest == content_hash(directory)
    assert sorted(loaded.weights) == ["diffusion", "vae"]
    for network, state in _weights().items():
        got = loaded.state_dict(network)
        assert got.keys() == state.keys()
        for key, tensor in state.items():
            assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key
    assert sorted(p.name for p in directory.iterdir()) == [
        "checksums.json",
        "config.yaml",
        "diffusion.safetensors",
        "labels.csv",
        "model_card.json",
        "model_card.md",
        "vae.safetensors",
    ]
    assert (directory / "config.yaml").read_text() == dump_config(load_config("tiny"))
    assert "## Metrics" in (directory / "model_card.md").read_text()
    assert sorted(p.name for p in directory.parent.iterdir()) == ["model", "train_labels.csv"]


def test_state_dict_of_absent_network_lists_available(saved: tuple[Path, str]) -> None:
    with pytest.raises(CheckpointError, match=r"'clip'.*available: diffusion, vae$"):
        load_checkpoint(saved[0]).state_dict("clip")


def test_model_card_defaults_and_markdown() -> None:
    card = ModelCard(name="x")
    assert card.license == "Apache-2.0" and card.steps == 0 and card.metrics == {}
    text = _card().to_markdown()
    for part in ("# tiny-test", "Steps: 12", "| loss | 0.25 |", "## Limitations", '"seed": 1'):
        assert part in text


def test_hash_is_stable_and_covers_content(tmp_path: Path) -> None:
    config = load_config("tiny")
    a = save_checkpoint(tmp_path / "a", config, _weights(), _card())
    b = save_checkpoint(tmp_path / "b", config, _weights(), _card())
    c = save_checkpoint(tmp_path / "c", config, _weights(), ModelCard(name="other"))
    assert a == b != c
    assert len(a) == 64


@pytest.mark.parametrize(
    "name",
    ["config.yaml", "vae.safetensors", "model_card.md", "model_card.json", "labels.csv"],
)
def test_any_changed_byte_fails_load_naming_the_file(saved: tuple[Path, str], name: str) -> None:
    directory, _ = saved
    data = bytearray((directory / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (directory / name).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{name} does not match.*content hash does not"):
        load_checkpoint(directory)


def test_hash_files_false_checks_file_set_but_not_contents(saved: tuple[Path, str]) -> None:
    directory, digest = saved
    (directory / "model_card.md").write_text("edited")
    assert load_checkpoint(directory, hash_files=False).hash == digest
    (directory / "labels.csv").unlink()
    with pytest.raises(CheckpointError, match=r"missing labels.csv"):
        load_checkpoint(directory, hash_files=False)


def test_edited_checksums_file_is_refused(saved: tuple[Path, str]) -> None:
    directory, _ = saved
    path = directory / "checksums.json"
    data = json.loads(path.read_text())
    data["content_hash"] = "0" * 64
    path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"checksums.json: the content hash does not match"):
        load_checkpoint(directory)


@pytest.mark.parametrize("suffix", [".pt", ".pkl", ".CKPT"])
def test_pickle_files_are_refused_before_reading(
    saved: tuple[Path, str], suffix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory, _ = saved
    (directory / f"weights{suffix}").write_bytes(b"\x80\x04K\x01.")

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("read something from a directory holding a pickle")

    monkeypatch.setattr(ckpt, "check_safetensors", forbidden)
    monkeypatch.setattr(safetensors.torch, "load_file", forbidden)
    monkeypatch.setattr(ckpt, "_read_config", forbidden)
    monkeypatch.setattr(ckpt, "_read_checksums", forbidden)
    with pytest.raises(CheckpointError, match=rf"weights{suffix}.*never unpickles.*safetensors"):
        load_checkpoint(directory)


@pytest.mark.parametrize("name", ["vae.safetensors", "labels.csv", "model_card.md"])
def test_missing_file_is_named(saved: tuple[Path, str], name: str) -> None:
    directory, _ = saved
    (directory / name).unlink()
    with pytest.raises(CheckpointError, match=rf"missing {name}"):
        load_checkpoint(directory)


@pytest.mark.parametrize("name", ["config.yaml", "model_card.json", "checksums.json"])
def test_missing_required_file_is_named(saved: tuple[Path, str], name: str) -> None:
    (saved[0] / name).unlink()
    with pytest.raises(CheckpointError, match=rf"{saved[0]}: (missing |no ){name}"):
        load_checkpoint(saved[0])


def test_extra_file_is_reported(saved: tuple[Path, str]) -> None:
    directory, _ = saved
    (directory / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match=r"unexpected file\(s\) notes.txt"):
        load_checkpoint(directory)


def test_bad_config_names_file_and_field(saved: tuple[Path, str]) -> None:
    directory, _ = saved
    path = directory / "config.yaml"
    path.write_text(path.read_text().replace("latent_channels: 4", "latent_channel: 4"))
    _rewrite_checksums(directory)
    with pytest.raises(CheckpointError, match=r"config.yaml: vae.latent_channel"):
        load_checkpoint(directory)


def test_checkpoint_without_networks_is_refused(saved: tuple[Path, str], tmp_path: Path) -> None:
    directory, _ = saved
    for name in ("vae.safetensors", "diffusion.safetensors"):
        (directory / name).unlink()
    _rewrite_checksums(directory)
    with pytest.raises(CheckpointError, match=r"no network weights"):
        load_checkpoint(directory)
    with pytest.raises(CheckpointError, match=r"no networks to save"):
        save_checkpoint(tmp_path / "empty", load_config("tiny"), {}, _card())
    with pytest.raises(CheckpointError, match=r"unknown network.*unet.*valid: vae"):
        save_checkpoint(tmp_path / "unet", load_config("tiny"), {"unet": {}}, _card())
    with pytest.raises(CheckpointError, match=r"weights\['vae'\]\['w'\] is a list, not a tensor"):
        save_checkpoint(tmp_path / "list", load_config("tiny"), {"vae": {"w": [1.0]}}, _card())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "train_labels.csv"]


def test_overwrite_rules(saved: tuple[Path, str], tmp_path: Path) -> None:
    directory, old = saved
    new = save_checkpoint(directory, load_config("tiny"), _weights(), ModelCard(name="v2"))
    assert new != old and load_checkpoint(directory).card.name == "v2"
    other = tmp_path / "results"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    with pytest.raises(CheckpointError, match=r"not a ct-factory checkpoint.*refusing"):
        save_checkpoint(other, load_config("tiny"), _weights(), _card())
    assert [p.name for p in other.iterdir()] == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    save_checkpoint(tmp_path / "empty", load_config("tiny"), _weights(), _card())


class Interrupted(BaseException):
    """Stands in for a kill or KeyboardInterrupt in the middle of writing weights."""


def _interrupt_second_file(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = safetensors.torch.save_file

    def flaky(tensors: dict, filename: Path) -> None:
        calls.append(filename)
        if len(calls) == 2:
            Path(filename).write_bytes(b"half")
            raise Interrupted
        real(tensors, filename)

    monkeypatch.setattr(safetensors.torch, "save_file", flaky)


def test_interrupted_save_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _interrupt_second_file(monkeypatch)
    with pytest.raises(Interrupted):
        save_checkpoint(tmp_path / "model", load_config("tiny"), _weights(), _card())
    assert list(tmp_path.iterdir()) == []


def test_interrupted_overwrite_keeps_old_checkpoint(
    saved: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    directory, old = saved
    _interrupt_second_file(monkeypatch)
    with pytest.raises(Interrupted):
        save_checkpoint(directory, load_config("tiny"), _weights(), ModelCard(name="v2"))
    assert load_checkpoint(directory).hash == old
    assert sorted(p.name for p in directory.parent.iterdir()) == ["model", "train_labels.csv"]


def test_labels_are_copied_and_hashed(saved: tuple[Path, str], tmp_path: Path) -> None:
    directory, with_labels = saved
    assert (directory / "labels.csv").read_text() == LABELS
    recorded = json.loads((directory / "checksums.json").read_text())["files"]
    assert "labels.csv" in recorded
    without = save_checkpoint(tmp_path / "bare", load_config("tiny"), _weights(), _card())
    assert without != with_labels


def test_save_with_card_keeps_the_model_and_replaces_card_and_pictures(
    saved: tuple[Path, str], tmp_path: Path
) -> None:
    directory, digest = saved
    source = load_checkpoint(directory)
    out = tmp_path / "recarded"
    new = save_with_card(source, out, ModelCard(name="v2"), {"pair.png": b"\x89PNG fake"})
    written = load_checkpoint(out)
    assert new == written.hash != digest
    assert written.card.name == "v2" and written.config == source.config
    assert (out / "labels.csv").read_text() == LABELS
    assert (out / "images" / "pair.png").read_bytes() == b"\x89PNG fake"
    for network, state in source.weights.items():
        assert all(torch.equal(t, written.weights[network][k]) for k, t in state.items())


def test_save_with_card_refuses_files_it_would_drop(saved: tuple[Path, str], tmp_path) -> None:
    directory, _ = saved
    (directory / "tokenizer.json").write_text("{}")  # a file another writer added and recorded
    _rewrite_checksums(directory)
    source = load_checkpoint(directory)
    with pytest.raises(CheckpointError, match=r"cannot carry over \(tokenizer.json\)"):
        save_with_card(source, tmp_path / "out", ModelCard(name="v2"), {})
    assert not (tmp_path / "out").exists()


def test_builtin_registry(
    saved: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = tmp_path / "builtin"
    registry.mkdir()
    monkeypatch.setattr(ckpt, "BUILTIN_DIR", registry)
    with pytest.raises(CheckpointError, match=r"builtin:demo: no such.*available: none yet"):
        load_checkpoint("builtin:demo")
    saved[0].rename(registry / "demo")
    (registry / "__pycache__").mkdir()
    with pytest.raises(CheckpointError, match=r"available: builtin:demo$"):
        load_checkpoint("builtin:other")
    with pytest.raises(CheckpointError, match=r"'builtin:\.\./demo': not a builtin model name"):
        load_checkpoint("builtin:../demo")
    assert load_checkpoint("builtin:demo").hash == saved[1]
    assert resolve("builtin:demo") == registry / "demo"


def test_missing_local_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no such checkpoint directory"):
        resolve(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match=r"no such checkpoint directory"):
        load_checkpoint(f"file://{tmp_path}/nowhere")


def _upload(fs: fsspec.AbstractFileSystem, directory: Path, root: str) -> None:
    for path in directory.iterdir():
        fs.put_file(str(path), f"{root}/{path.name}")


def test_memory_url_is_downloaded_once(
    saved: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = fsspec.filesystem("memory")
    root = f"/ckpt-{tmp_path.name}"
    _upload(fs, saved[0], root)
    downloads = []
    real = ckpt._download
    monkeypatch.setattr(ckpt, "_download", lambda *a: downloads.append(a) or real(*a))
    cache = tmp_path / "cache"
    url = f"memory://{root}"
    try:
        first = load_checkpoint(url, cache_dir=cache)
        second = load_checkpoint(url + "/", cache_dir=cache)
        assert len(downloads) == 1
        assert first.hash == second.hash == saved[1]
        assert first.directory == cache / saved[1]  # keyed by content, not by URL
        assert [p.name for p in cache.iterdir()] == [first.directory.name]
        (first.directory / "vae.safetensors").write_bytes(b"damaged")  # damaged cache: refetch
        assert load_checkpoint(url, cache_dir=cache).hash == saved[1]
        assert len(downloads) == 2
        monkeypatch.setenv("CTFACTORY_CACHE", str(tmp_path / "env"))
        assert resolve(url).parent == tmp_path / "env" / "models"
        fs.pipe(f"{root}/model.pth", b"pickle")
        with pytest.raises(CheckpointError, match=r"model.pth.*never unpickles"):
            load_checkpoint(url, cache_dir=tmp_path / "fresh")
        assert not (tmp_path / "fresh").exists()
    finally:
        fs.rm(root, recursive=True)


@pytest.fixture(scope="module")
def s3_endpoint():
    """A real S3 API server (moto) on localhost, with dummy credentials in the environment."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        yield f"http://{host}:{port}"
    server.stop()


def test_s3_url_through_a_real_s3_server(
    saved: tuple[Path, str], tmp_path: Path, s3_endpoint: str
) -> None:
    options = {"endpoint_url": s3_endpoint}
    fs = fsspec.filesystem("s3", **options)
    fs.mkdir("models")
    _upload(fs, saved[0], "models/tiny")
    loaded = load_checkpoint("s3://models/tiny", cache_dir=tmp_path / "c", storage_options=options)
    assert loaded.hash == saved[1]
    assert torch.equal(loaded.state_dict("vae")["weight"], _weights()["vae"]["weight"])
    with pytest.raises(CheckpointError, match=r"s3://models/absent: no checkpoint there"):
        load_checkpoint("s3://models/absent", cache_dir=tmp_path / "c", storage_options=options)


@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_a_damaged_weights_file_is_refused_at_load(saved: tuple[Path, str], damage: str) -> None:
    """Checked by its header and size when loaded, though its tensors are read only on use."""
    directory, _ = saved
    path = directory / "vae.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-7] if damage == "truncated" else data[:8] + b"{not json" + data[17:])
    with pytest.raises(CheckpointError, match=r"vae.safetensors: not a readable safetensors file"):
        load_checkpoint(directory, hash_files=False)


def test_weights_are_read_when_a_network_is_asked_for(saved: tuple[Path, str]) -> None:
    directory, _ = saved
    checkpoint = load_checkpoint(directory)
    assert "vae" in checkpoint.weights and not checkpoint.weights._loaded
    state = checkpoint.state_dict("vae")
    assert state and all(isinstance(t, torch.Tensor) for t in state.values())
    assert set(checkpoint.weights._loaded) == {"vae"}
