"""Training without Ray: the per-worker functions on a LocalSession, and the loop's pieces."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from factory.models.card import ModelCard
from factory.models.checkpoint import CheckpointError, save_checkpoint
from factory.models.classifier import LabelSetError, load_classifier
from factory.models.config import load_config, parse_config
from factory.models.intensity import unit_to_hu
from factory.models.vae import build_vae
from factory.raycluster import parse_workers
from tests.conftest import ROOT
from tests.train_helpers import SMALL_MODEL, config, make_dataset, phantom_split
from train import classifier, clip, diffusion, vae
from train.config import (
    TrainConfigError,
    apply_overrides,
    load_train_config,
    parse_train_config,
)
from train.data import choose_texts, excerpt, index_rows, load_row, structured
from train.latents import encode_local, vae_codec
from train.launcher import cache_dataset, row_bytes
from train.loop import (
    EMA,
    ResumeError,
    accumulation,
    check_resumable,
    lr_factor,
    read_state,
    rng_for,
)
from train.session import LocalSession


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("phantom"), n_train=8, n_valid=2)


def _session(cfg, rows, run_dir):
    return LocalSession(cfg, rows, lambda r: load_row(r, cfg.model), run_dir)


class Stop(Exception):
    """The process dies."""


class StoppingSession(LocalSession):
    """A local session whose process stops right after the checkpoint of step ``at``."""

    def __init__(self, cfg, rows, run_dir, at: int):
        super().__init__(cfg, rows, lambda r: load_row(r, cfg.model), run_dir)
        self.at = at

    def report(self, metrics, files):
        super().report(metrics, files)
        if metrics["step"] == self.at:
            raise Stop


def _run(module, cfg, session, rows, **extra):
    module.train_func({"config": cfg.model_dump(mode="json"), "rows": rows, **extra}, session)
    return session


def _final_state(run_dir):
    newest = sorted(run_dir.glob("checkpoint_*"))[-1]
    return read_state((newest / "state.pt").read_bytes())


# ---- config ------------------------------------------------------------------------------------
def test_workers_and_overrides():
    assert parse_workers("4") == (4, 4) and parse_workers("2-8") == (2, 8)
    for bad in ("0", "3-2", "two", "1-"):
        with pytest.raises(ValueError, match="workers"):
            parse_workers(bad)
    data = apply_overrides({"optim": {"lr": 1}}, ["optim.lr=3e-4", "workers=2-4", "x.y.z=[1, 2]"])
    assert data == {"optim": {"lr": 3e-4}, "workers": "2-4", "x": {"y": {"z": [1, 2]}}}
    with pytest.raises(TrainConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["novalue"])


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"optim": {"lr": -1}}, "optim.lr"),
        ({"optim": {"learning_rate": 1}}, "optim.learning_rate"),
        ({"steps": 0}, "steps"),
        ({"workers": "3", "batch_size": 4}, "divisible"),
        ({"workers": "2-3", "batch_size": 4}, r"not by \[3\]"),
        ({"task": "gan"}, "task"),
        ({"model": "nonexistent-preset"}, "model"),
        ({"precision": "fp8"}, "precision"),
        ({"data": {"root": "data", "excerpts": 1.5}}, "data.excerpts"),
        ({"vae": {"adversarial": {"window": [-700, -1000]}}}, "vae.adversarial.window"),
        ({"vae": {"adversarial": {"weight": 0}}}, "vae.adversarial.weight"),
    ],
)
def test_bad_configs_name_the_field(tmp_path, change, field):
    data = {**config("vae", tmp_path, tmp_path), **change}
    with pytest.raises(TrainConfigError, match=field):
        parse_train_config(data, "cfg.yaml")


def test_local_paths_become_absolute_on_the_driver(tmp_path, monkeypatch):
    """Workers run in other folders: a relative model YAML, data root or storage must not be
    read relative to theirs. Presets and URLs stay as they are."""
    (tmp_path / "model.yaml").write_text(Path(SMALL_MODEL).read_text())
    monkeypatch.chdir(tmp_path)
    cfg = parse_train_config(config("vae", Path("data"), "runs", model="model.yaml"))
    assert (cfg.model, cfg.data.root, cfg.storage) == tuple(
        str(tmp_path / p) for p in ("model.yaml", "data", "runs")
    )
    monkeypatch.chdir(tmp_path.parent)
    assert cfg.architecture() == load_config(SMALL_MODEL)
    preset = parse_train_config(config("vae", tmp_path, "s3://bucket/runs", model="tiny"))
    assert (preset.model, preset.storage) == ("tiny", "s3://bucket/runs")


def test_diffusion_needs_a_vae(tmp_path):
    with pytest.raises(TrainConfigError, match=r"diffusion\.vae"):
        parse_train_config(config("diffusion", tmp_path, tmp_path))


# ---- loop pieces -------------------------------------------------------------------------------
def test_small_datasets_are_cached_in_the_object_store(tmp_path):
    """ "auto" materialises a dataset that fits in a quarter of the store; the choice can be
    forced either way. A 32^3 row is a float32 volume plus one byte per voxel per mask."""
    cfg = parse_train_config(config("vae", tmp_path, tmp_path))
    per_row = row_bytes(cfg)
    assert per_row == 32**3 * (4 + 2)  # the small model draws lungs and heart
    assert cache_dataset(cfg, 100, store_bytes=400 * per_row)
    assert not cache_dataset(cfg, 101, store_bytes=400 * per_row)
    always = parse_train_config(
        {**config("vae", tmp_path, tmp_path), "data": {"root": str(tmp_path), "cache": "always"}}
    )
    assert cache_dataset(always, 10**9, store_bytes=0)
    never = parse_train_config(
        {**config("vae", tmp_path, tmp_path), "data": {"root": str(tmp_path), "cache": "never"}}
    )
    assert not cache_dataset(never, 1, store_bytes=10**12)


def test_global_batch_is_constant_across_world_sizes(tmp_path):
    cfg = parse_train_config(config("vae", tmp_path, tmp_path, batch_size=16, micro_batch=4))
    for world in (1, 2, 4, 8, 16):
        micro, accum = accumulation(cfg, world)
        assert micro * accum * world == 16 and micro <= 4


def test_learning_rate_schedule(tmp_path):
    cfg = parse_train_config(
        config(
            "vae", tmp_path, tmp_path, steps=100, optim={"warmup_steps": 10, "min_lr_ratio": 0.1}
        )
    )
    factors = [lr_factor(cfg, s) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))
    assert factors[-1] == pytest.approx(0.1, abs=0.01)


def test_step_generators_depend_only_on_their_coordinates():
    a = torch.rand(4, generator=rng_for(3, 10, 0, 1))
    assert torch.equal(a, torch.rand(4, generator=rng_for(3, 10, 0, 1)))
    assert not torch.equal(a, torch.rand(4, generator=rng_for(3, 10, 1, 1)))
    assert not torch.equal(a, torch.rand(4, generator=rng_for(3, 11, 0, 1)))


def test_ema_tracks_with_warm_up():
    state = {"w": torch.zeros(3), "n": torch.tensor(5)}
    ema = EMA(state, decay=0.9)
    assert "n" not in ema.shadow  # integer buffers are not averaged
    ema.update({"w": torch.ones(3), "n": torch.tensor(5)})
    first = ema.shadow["w"].clone()  # warm-up: decay 2/11, so the average moves fast
    assert torch.allclose(first, torch.full((3,), 1 - 2 / 11))
    merged = ema.apply_to({"w": torch.full((3,), 7.0), "n": torch.tensor(5)})
    assert torch.equal(merged["w"], first) and int(merged["n"]) == 5


def test_texts_are_seeded_and_mixed():
    batch = {
        "report": np.array(["Findings A. Impression A."] * 6),
        "impression": np.array(["Impression A."] * 6),
        "age": np.array([70] * 6),
        "sex": np.array(["M"] * 6),
    }
    a = choose_texts(batch, "mixed", torch.Generator().manual_seed(0))
    assert a == choose_texts(batch, "mixed", torch.Generator().manual_seed(0))
    assert set(a) <= {
        "Findings A. Impression A.",
        "Impression A.",
        "70 years old male: Impression A.",
    }
    assert choose_texts(batch, "report", torch.Generator()) == list(batch["report"])
    assert structured("Normal.", -1, "") == "Normal."


def test_excerpts_are_short_runs_of_report_sentences_in_order():
    sentences = [f"Sentence {i} is 1.5 mm." for i in range(8)]
    report = " ".join(sentences)
    batch = {
        "report": np.array([report] * 200),
        "impression": np.array(["Impression A."] * 200),
        "age": np.array([70] * 200),
        "sex": np.array(["F"] * 200),
    }
    texts = choose_texts(batch, "impression", torch.Generator().manual_seed(3), excerpts=0.5)
    assert texts == choose_texts(
        batch, "impression", torch.Generator().manual_seed(3), excerpts=0.5
    )
    cut = [t for t in texts if t != "Impression A."]
    assert 70 < len(cut) < 130  # about half the samples
    lengths = set()
    for text in cut:
        kept = [s + "." for s in text.split(". ") if s]
        kept = [k.replace("..", ".") for k in kept]
        assert all(k in sentences for k in kept), text  # whole sentences, "1.5" not split
        idx = [sentences.index(k) for k in kept]
        assert idx == sorted(idx) and len(set(idx)) == len(idx)
        lengths.add(len(kept))
    assert lengths == {1, 2, 3}
    assert excerpt("One sentence only", torch.Generator()) == "One sentence only"


def test_clip_targets_identical_texts_as_positives():
    target = clip.matching(["a", "b", "a"])
    assert torch.allclose(target[0], torch.tensor([0.5, 0.0, 0.5]))
    assert torch.allclose(target[1], torch.tensor([0.0, 1.0, 0.0]))
    sim = torch.eye(3)
    assert clip.recall_at(sim, 1) == 1.0
    assert clip.recall_at(-sim, 1) == 0.0


def test_vae_crops_are_seeded(dataset):
    x = torch.arange(2 * 32**3, dtype=torch.float32).reshape(2, 1, 32, 32, 32)
    a = vae.random_crop(x, (16, 16, 16), torch.Generator().manual_seed(1))
    b = vae.random_crop(x, (16, 16, 16), torch.Generator().manual_seed(1))
    assert a.shape == (2, 1, 16, 16, 16) and torch.equal(a, b)


# ---- the per-worker functions, without Ray -----------------------------------------------------
def test_vae_loss_goes_down_and_resume_is_exact(dataset, tmp_path):
    rows = index_rows(dataset, "train", masks=False)[:4]
    base = config("vae", dataset, tmp_path, steps=16, checkpoint_every=8, batch_size=4)
    base["vae"] = {"crop": [16, 16, 16]}
    cfg = parse_train_config(base)
    whole = _run(vae, cfg, _session(cfg, rows, tmp_path / "whole"), len(rows))
    losses = [r["loss"] for r in _final_state(tmp_path / "whole")["history"]]
    assert np.mean(losses[-4:]) < 0.85 * np.mean(losses[:4])
    assert {"eval/mae_hu", "eval/psnr_db"} <= set(whole.reports[-1])

    # Stopped right after the step-8 checkpoint, then resumed: the same weights at step 16.
    with pytest.raises(Stop):
        _run(vae, cfg, StoppingSession(cfg, rows, tmp_path / "split", at=8), len(rows))
    assert _final_state(tmp_path / "split")["meta"]["step"] == 8
    _run(vae, cfg, _session(cfg, rows, tmp_path / "split"), len(rows))
    a, b = _final_state(tmp_path / "whole"), _final_state(tmp_path / "split")
    assert b["meta"]["restarts"] == 1 and b["meta"]["step"] == 16
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert [r["loss"] for r in a["history"]] == [r["loss"] for r in b["history"]]


ADVERSARIAL = {"weight": 0.1, "start": 4, "window": [-1000, -700], "channels": 8, "layers": 2}


def test_vae_critic_losses_train_each_network_on_its_own_objective(dataset, tmp_path):
    data = config("vae", dataset, tmp_path, steps=2)
    data["vae"] = {"adversarial": ADVERSARIAL}
    task = vae.VAETask(parse_train_config(data), torch.device("cpu"))
    step = task.model()
    x = torch.rand(2, 1, 16, 16, 16) * 2 - 1
    vae_cfg = task.model_cfg.vae
    eps = torch.randn(2, vae_cfg.latent_channels, *[16 // vae_cfg.factor] * 3)
    critic, fooled = step(x, eps)[3]

    def grads(loss):
        step.zero_grad()
        loss.backward(retain_graph=True)
        norm = {}
        for part in (step.vae, step.critic):
            g = [p.grad.abs().sum() for p in part.parameters() if p.grad is not None]
            norm[part] = float(sum(g)) if g else 0.0
        return norm

    fooled_grads, critic_grads = grads(fooled), grads(critic)
    assert fooled_grads[step.vae] > 0 and fooled_grads[step.critic] == 0
    assert critic_grads[step.critic] > 0 and critic_grads[step.vae] == 0
    # The critic sees its window: -1000..-700 HU spans its whole range, denser is clipped.
    lo, hi = task.model_cfg.hu_window
    hu = torch.tensor([-1000.0, -850.0, -700.0, 0.0])
    view = step.critic.view((hu - lo) / (hi - lo) * 2 - 1)
    assert torch.allclose(view, torch.tensor([-1.0, 0.0, 1.0, 1.0]), atol=1e-5)


def test_adversarial_vae_resumes_exactly_and_exports_the_vae_alone(dataset, tmp_path):
    rows = index_rows(dataset, "train", masks=False)[:4]
    base = config("vae", dataset, tmp_path, steps=8, checkpoint_every=4, batch_size=4)
    base["vae"] = {"crop": [16, 16, 16], "adversarial": ADVERSARIAL}
    cfg = parse_train_config(base)
    _run(vae, cfg, _session(cfg, rows, tmp_path / "whole"), len(rows))
    with pytest.raises(Stop):
        _run(vae, cfg, StoppingSession(cfg, rows, tmp_path / "split", at=4), len(rows))
    _run(vae, cfg, _session(cfg, rows, tmp_path / "split"), len(rows))
    a, b = _final_state(tmp_path / "whole"), _final_state(tmp_path / "split")
    critic = [k for k in a["model"] if k.startswith(vae.CRITIC)]
    assert critic and b["meta"]["step"] == 8
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    exported = vae.export_weights(a["model"])["vae"]
    assert exported and not any(k.startswith(vae.CRITIC) for k in exported)
    vae.build_vae(cfg.architecture().vae).load_state_dict(exported)  # strict: the VAE alone

    # A run without the critic cannot continue one with it (nor the reverse).
    plain = parse_train_config({**base, "vae": {"crop": [16, 16, 16]}, "steps": 12})
    with pytest.raises(ValueError, match="vae_adversarial"):
        _run(vae, plain, _session(plain, rows, tmp_path / "whole"), len(rows))


def test_resume_refuses_another_task(dataset, tmp_path):
    rows = index_rows(dataset, "train", masks=False)[:4]
    cfg = parse_train_config(config("vae", dataset, tmp_path, steps=2))
    _run(vae, cfg, _session(cfg, rows, tmp_path / "run"), len(rows))
    other = parse_train_config(config("clip", dataset, tmp_path, steps=4))
    with pytest.raises(ValueError, match="task 'vae', not 'clip'"):
        _run(clip, other, _session(other, rows, tmp_path / "run"), len(rows))


def test_resume_does_not_depend_on_how_the_vae_decodes(dataset, tmp_path):
    """The decode's memory settings say how to run the VAE, not what was trained: a checkpoint
    that recorded others (or, from before, recorded them at all) resumes; another VAE does not."""
    cfg = parse_train_config(config("vae", dataset, tmp_path, steps=2))
    fingerprint = cfg.fingerprint()
    assert "decode_memory_gb" not in fingerprint["model"]["vae"]
    vae_then = {**fingerprint["model"]["vae"], "decode_slab": 8, "decode_memory_gb": 4.0}
    then = {**fingerprint, "model": {**fingerprint["model"], "vae": vae_then}}
    check_resumable({"task": "vae", "fingerprint": then}, cfg, "run")
    vae_other = {**vae_then, "channels": [8, 16, 32]}
    other = {**fingerprint, "model": {**fingerprint["model"], "vae": vae_other}}
    with pytest.raises(ResumeError, match="different model"):
        check_resumable({"task": "vae", "fingerprint": other}, cfg, "run")


def test_clip_learns_pairs(dataset, tmp_path):
    rows = index_rows(dataset, "train", masks=False)[:4]
    base = config("clip", dataset, tmp_path, steps=12, checkpoint_every=12, batch_size=4)
    base.update(micro_batch=4, data={"root": str(dataset), "held_out": "valid", "text": "report"})
    cfg = parse_train_config(base)
    session = _run(clip, cfg, _session(cfg, rows, tmp_path / "clip"), len(rows))
    losses = [r["loss"] for r in _final_state(tmp_path / "clip")["history"]]
    assert losses[-1] < 0.6 * losses[0]
    assert 0.0 <= session.reports[-1]["eval/text_to_image_r1"] <= 1.0
    state = _final_state(tmp_path / "clip")["model"]
    assert not any(k.startswith("text.") for k in state)  # the frozen tower is not saved
    assert set(clip.export_weights(state)) == {"clip"}


@pytest.mark.parametrize("objective", ["rflow", "ddpm"])
def test_diffusion_learns_on_latents(dataset, tmp_path, objective):
    model_yaml = tmp_path / "model.yaml"
    model_yaml.write_text(Path(SMALL_MODEL).read_text().replace("rflow", objective))
    cfg_v = parse_train_config(config("vae", dataset, tmp_path, steps=1, model=str(model_yaml)))
    vae_dir = tmp_path / "vae-model"
    model = vae.VAETask(cfg_v, torch.device("cpu")).model()
    save_checkpoint(vae_dir, cfg_v.architecture(), {"vae": model.vae.state_dict()}, ModelCard("v"))
    base = config("diffusion", dataset, tmp_path, steps=20, checkpoint_every=20, ema_decay=0.9)
    base["model"] = str(model_yaml)
    base.update(diffusion={"vae": str(vae_dir)}, data={"root": str(dataset), "text": "mixed"})
    cfg = parse_train_config(base)
    rows = index_rows(dataset, "train", masks=True)[:4]
    latents = encode_local(rows, str(vae_dir), cfg.model, cfg.architecture())
    assert latents[0]["latent"].shape == (4 + 2, 8, 8, 8)  # image latents + lungs, heart
    session = LocalSession(cfg, latents, lambda r: r, tmp_path / "diffusion")
    _run(diffusion, cfg, session, len(latents), scale_factor=1.0)
    state = _final_state(tmp_path / "diffusion")
    losses = [r["loss"] for r in state["history"]]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert state["ema"]["updates"] == 20 and math.isfinite(losses[-1])


def test_diffusion_text_cache_matches_the_encoder(dataset, tmp_path):
    base = config("diffusion", dataset, tmp_path)
    base.update(diffusion={"vae": "builtin:demo", "text_cache": 2})
    task = diffusion.DiffusionTask(parse_train_config(base), torch.device("cpu"), 1.0)
    effusion, normal = "left pleural effusion", "no acute findings in the chest"
    texts = [effusion, normal, effusion, "a"]
    tokens, mask = task.encode(texts)
    want, want_mask = task.text.encode(texts, pad_to_max=True)
    assert torch.equal(mask, want_mask)
    torch.testing.assert_close(tokens, want * want_mask[..., None], atol=2e-3, rtol=2e-3)
    assert list(task._texts) == [normal, "a"]  # oldest evicted
    calls = []
    encode = task.text.encode
    task.text.encode = lambda t, **kw: calls.append(list(t)) or encode(t, **kw)
    task.encode(["a", effusion, "a"])
    assert calls == [[effusion]]  # only the evicted text is encoded again
    # A cached text in a batch that also evicts: it must not be evicted before it is read
    # (this once failed a 4,000-step run with a KeyError after 3,750 steps).
    assert list(task._texts) == ["a", effusion]
    tokens, _ = task.encode(["a", normal])  # "a" is the oldest, normal evicts one
    want, want_mask = task.text.encode(["a", normal], pad_to_max=True)
    torch.testing.assert_close(tokens, want * want_mask[..., None], atol=2e-3, rtol=2e-3)
    assert list(task._texts) == ["a", normal]  # effusion, least recently used, went


@pytest.fixture(scope="module")
def findings_dataset(tmp_path_factory):
    """Effusion, cardiomegaly and normal phantoms to train on, and held-out ones of each."""
    root = tmp_path_factory.mktemp("findings")
    for split, n, seed in (("", 16, 10), ("valid", 8, 11)):
        phantom_split(root, f"{split}effusion", n, seed, "--finding", "pleural_effusion")
        phantom_split(root, f"{split}cardiomegaly", n, seed, "--finding", "cardiomegaly")
        phantom_split(root, f"{split}normal", n, seed, "--normal")
    return root


def test_classifier_learns_findings_and_exports(findings_dataset, tmp_path):
    model_yaml = tmp_path / "model.yaml"
    model_yaml.write_text(
        Path(SMALL_MODEL).read_text()
        + "  findings: [Pleural effusion, Cardiomegaly]\n"  # under classifier:
    )
    splits = ["effusion", "cardiomegaly", "normal"]
    base = config("classifier", findings_dataset, tmp_path, steps=200, checkpoint_every=200)
    base.update(
        model=str(model_yaml),
        batch_size=8,
        micro_batch=8,
        data={
            "root": str(findings_dataset),
            "split": splits,
            "held_out": [f"valid{s}" for s in splits],
        },
    )
    cfg = parse_train_config(base)
    rows = index_rows(findings_dataset, splits, masks=False)
    session = _run(classifier, cfg, _session(cfg, rows, tmp_path / "clf"), len(rows))
    last = session.reports[-1]
    # Held-out phantoms: 8 with each finding, 8 normal; chance is 0.5 (measured: 0.97, 0.92).
    assert last["eval/auc/Pleural effusion"] >= 0.85, last
    assert last["eval/auc/Cardiomegaly"] >= 0.85, last
    state = _final_state(tmp_path / "clf")["model"]
    assert set(classifier.export_weights(state)) == {"classifier"}

    out = tmp_path / "exported"
    save_checkpoint(out, cfg.architecture(), classifier.export_weights(state), ModelCard("c"))
    model = load_classifier(str(out))
    assert model.findings == ("Pleural effusion", "Cardiomegaly")
    held = [load_row(r, cfg.model) for r in index_rows(findings_dataset, "valideffusion", False)]
    hu = unit_to_hu(torch.as_tensor(np.stack([r["image"][0] for r in held])), model.window)
    probs = model.probabilities(hu)
    assert probs.shape == (8, 2) and np.all((probs >= 0) & (probs <= 1))
    with pytest.raises(LabelSetError, match=r"another label set.*Emphysema"):
        model.columns(["Pleural effusion", "Emphysema"])
    with pytest.raises(ValueError, match="classifier grid"):
        model.probabilities(np.zeros((1, 16, 16, 16)))


def test_the_vae_must_be_the_models_own_but_not_how_it_runs(tmp_path):
    model = load_config(SMALL_MODEL).model_dump(mode="json")
    model["vae"] |= {"arch": "maisi"}
    maisi = parse_config(model)
    save_checkpoint(
        tmp_path / "vae", maisi, {"vae": build_vae(maisi.vae).state_dict()}, ModelCard("v")
    )
    model["vae"] |= {"num_splits": 2, "norm_float16": True}  # how it runs: the same VAE
    codec, _ = vae_codec(str(tmp_path / "vae"), parse_config(model))
    assert codec.cfg.num_splits == 2
    with pytest.raises(CheckpointError, match=r"diffusion.vae: .* made for another model"):
        vae_codec(str(tmp_path / "vae"), load_config(SMALL_MODEL))  # arch autoencoder


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "train/configs").glob("*.yaml")))
def test_every_shipped_training_config_is_valid(name):
    cfg = load_train_config(ROOT / "train/configs" / name)
    assert cfg.architecture().name in ("tiny", "maisi")
