"""MAISI's VAE architecture and ``ctfactory import-model``: the published forms read safely,
mismatches and hostile files refused by name, the MAISI settings checked when loaded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from factory.models.checkpoint import load_checkpoint
from factory.models.config import ConfigError, load_config, parse_config
from factory.models.importer import WeightsError, import_vae
from factory.models.vae import LatentCodec, build_vae
from tests.train_helpers import SMALL_MODEL


def maisi_config(**vae) -> dict:
    """The small test model with MAISI's VAE architecture (and ``vae`` settings on top)."""
    data = yaml.safe_load(Path(SMALL_MODEL).read_text())
    data["vae"] = {**data["vae"], "arch": "maisi", "norm_eps": 1e-6, **vae}
    return data


CFG = parse_config(maisi_config())


@pytest.fixture(scope="module")
def weights():
    torch.manual_seed(0)
    return build_vae(CFG.vae).state_dict()


def test_the_maisi_preset_is_maisis_published_network():
    cfg = load_config("maisi")
    vae = build_vae(cfg.vae)
    assert type(vae).__name__ == "AutoencoderKlMaisi"
    assert round(sum(p.numel() for p in vae.parameters()) / 1e6, 1) == 20.9  # MAISI's VAE
    assert (cfg.size, cfg.latent_size, cfg.vae.num_splits, cfg.vae.dim_split) == (
        (512, 512, 128),
        (128, 128, 32),
        8,
        1,
    )
    assert load_config("base").vae.arch == "autoencoder"  # the other presets keep theirs


def test_maisi_split_convolutions_equal_the_whole_and_run_without_autocast(weights):
    x = torch.rand(1, 1, 32, 32, 32) * 2 - 1
    whole = LatentCodec(build_vae(CFG.vae).eval(), CFG.vae)
    whole.vae.load_state_dict(weights)
    # norm_float16 as MAISI publishes it: float32 on the CPU (no autocast), not an error
    cfg = CFG.vae.model_copy(update={"num_splits": 2, "dim_split": 0, "norm_float16": True})
    split = LatentCodec(build_vae(cfg).eval(), cfg)
    split.vae.load_state_dict(weights)
    with torch.no_grad():
        z = whole.encode(x)
        assert (split.encode(x) - z).abs().max() < 1e-4
        out = split.decode(z)
        assert out.dtype == torch.float32
        assert (out - whole.decode(z)).abs().max() < 1e-4


@pytest.mark.parametrize(
    "vae, field",
    [
        ({"decode_memory_gb": 4}, "vae: .*decode_memory_gb applies to arch autoencoder"),
        ({"num_splits": 3}, "vae.num_splits 3: .* 8 slices .* valid here: \\[1, 2\\]"),
        ({"channels": [8, 12, 16]}, "vae: .*divisible by norm_num_groups"),
    ],
)
def test_maisi_settings_it_cannot_take_are_refused_when_loaded(tmp_path, vae, field):
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(maisi_config(**vae)))
    with pytest.raises(ConfigError, match=f"{path}: .*{field}"):
        load_config(path)
    bad_grid = maisi_config()
    bad_grid["size"] = [32, 30, 32]
    with pytest.raises(ConfigError, match=r"size .* divisible by the VAE factor 4"):
        parse_config(bad_grid, "grid.yaml")
    plain = yaml.safe_load(Path(SMALL_MODEL).read_text())
    plain["vae"]["num_splits"] = 2
    with pytest.raises(ConfigError, match="num_splits, dim_split and norm_float16 apply to arch"):
        parse_config(plain, "plain.yaml")


def test_both_published_forms_import_to_the_same_vae(tmp_path, weights):
    torch.save(weights, tmp_path / "raw.pt")
    wrapped = {"unet_state_dict": {f"module.{k}": v for k, v in weights.items()}, "epoch": 273}
    torch.save(wrapped, tmp_path / "wrapped.pt")
    _, raw = import_vae(tmp_path / "raw.pt", CFG, tmp_path / "a", license="Test-1.0")
    _, src = import_vae(tmp_path / "wrapped.pt", CFG, tmp_path / "b", license="Test-1.0")
    assert (raw.form, raw.prefix) == ("state dict", "")
    assert (src.form, src.prefix) == ("state dict under 'unet_state_dict'", "module.")
    a, b = (load_checkpoint(tmp_path / d) for d in "ab")
    assert set(a.weights) == {"vae"} and a.config == CFG
    for k, v in weights.items():
        assert torch.equal(a.state_dict("vae")[k], v) and torch.equal(b.state_dict("vae")[k], v)
    card = json.loads((tmp_path / "b" / "model_card.json").read_text())
    assert card["license"] == "Test-1.0"
    assert card["extra"]["imported"]["file"] == "wrapped.pt"
    assert card["extra"]["imported"]["sha256"] == src.sha256 and len(src.sha256) == 64


class Payload:
    """A pickle that would run a command when unpickled by plain torch.load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _hostile(tmp_path: Path, weights: dict) -> dict[str, tuple[Path, str]]:
    """Bad inputs, each with the message it must get."""
    cases = {}
    raw = tmp_path / "raw.pt"
    torch.save(weights, raw)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(raw.read_bytes()[:4096])
    cases["truncated"] = (truncated, "not a readable PyTorch checkpoint")
    payload = tmp_path / "payload.pt"
    torch.save({"weights": Payload(tmp_path / "RAN")}, payload)
    cases["payload"] = (payload, "holds objects other than tensors, refused without running")
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    cases["text"] = (text, "not a readable PyTorch checkpoint")
    listed = tmp_path / "list.pt"
    torch.save([1, 2, 3], listed)
    cases["list"] = (listed, "holds a list, not a state dict")
    other = tmp_path / "autoencoder.pt"
    plain = build_vae(load_config(SMALL_MODEL).vae).state_dict()
    torch.save(plain, other)
    cases["other architecture"] = (
        other,
        r"not the VAE of model config 'test-small' \(vae.arch maisi.*\d+ missing: decoder\..*"
        r"\d+ unexpected: .*the names are those of vae.arch autoencoder",
    )
    wide = tmp_path / "latent8.pt"
    torch.save(build_vae(parse_config(maisi_config(latent_channels=8)).vae).state_dict(), wide)
    cases["shapes"] = (wide, r"of another shape: .*\(8,\) \(the config builds \(4,\)\)")
    cases["missing file"] = (tmp_path / "absent.pt", "no such file")
    return cases


def test_hostile_and_mistaken_files_are_refused_by_name_and_nothing_runs(tmp_path, weights):
    for name, (path, message) in _hostile(tmp_path, weights).items():
        with pytest.raises(WeightsError, match=f"^{path}: .*{message}") as caught:
            import_vae(path, CFG, tmp_path / f"out-{path.stem}", license="x")
        assert "\n" not in str(caught.value), name
        assert not (tmp_path / f"out-{path.stem}").exists(), name
    assert not (tmp_path / "RAN").exists()  # the payload was never executed


def test_the_command_says_one_line_and_exits_2(tmp_path, weights, run_cli):
    path, _ = _hostile(tmp_path, weights)["payload"]
    model = tmp_path / "model.yaml"
    model.write_text(yaml.safe_dump(maisi_config()))
    args = ("--config", str(model), "--license", "x")
    bad = run_cli("import-model", str(path), *args, "--out", str(tmp_path / "m"))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert str(path) in bad.stderr and "refused without running" in bad.stderr
    assert not (tmp_path / "RAN").exists()
    good = run_cli("import-model", str(tmp_path / "raw.pt"), *args, "--out", str(tmp_path / "m"))
    assert good.returncode == 0, good.stderr
    assert "as the maisi VAE of config 'test-small'" in good.stdout
    assert "examples:" in run_cli("import-model", "--help").stdout


def test_safetensors_weights_import_and_a_damaged_file_is_refused(tmp_path, weights):
    path = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in weights.items()}, path)
    _, source = import_vae(path, CFG, tmp_path / "m", license="x")
    assert source.form == "state dict"
    loaded = load_checkpoint(tmp_path / "m").state_dict("vae")
    assert all(torch.equal(loaded[k], v) for k, v in weights.items())
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(WeightsError, match=f"^{damaged}: not a readable safetensors file"):
        import_vae(damaged, CFG, tmp_path / "n", license="x")
