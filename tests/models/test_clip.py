"""3D CLIP: the loss, shapes, frozen text tower, state-dict round trip, and learning on phantoms."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from factory import vocab
from factory.cohort import prompts
from factory.models.clip import CLIP3D, VisionEncoder3D, clip_loss
from factory.models.config import load_config
from factory.models.intensity import hu_to_unit
from factory.models.text import TextEncoder
from factory.phantom.dataset import default_grid
from factory.phantom.render import render_phantom

TINY = load_config("tiny")
TEXTS = ["Small right pleural effusion.", "Cardiomegaly.", "Normal chest CT."]


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return TextEncoder.from_config(TINY.text)


def clip(text: TextEncoder, seed: int = 0, train_text: bool = False) -> CLIP3D:
    torch.manual_seed(seed)
    return CLIP3D.from_config(TINY, text, train_text=train_text)


def volumes(n: int, size: tuple[int, int, int] = (16, 16, 16), seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, *size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --- loss ------------------------------------------------------------------------------------


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def test_loss_is_symmetric_in_image_and_text():
    a, b = unit(torch.randn(5, 8)), unit(torch.randn(5, 8))
    scale = torch.tensor(2.0)
    torch.testing.assert_close(clip_loss(a, b, scale), clip_loss(b, a, scale))
    assert clip_loss(a, b, scale) != clip_loss(a, b.roll(1, 0), scale)


def test_loss_of_indistinguishable_pairs_is_log_batch():
    same = unit(torch.ones(6, 8))
    assert clip_loss(same, same, torch.tensor(3.0)).item() == pytest.approx(math.log(6), abs=1e-6)


def test_loss_separates_aligned_from_shuffled_pairs():
    eye = torch.eye(4)
    high = torch.tensor(math.log(100.0))
    assert clip_loss(eye, eye, high) < 1e-3
    assert clip_loss(eye, eye.roll(1, 0), high) > 90  # every positive scores 0, a negative 100


def test_logit_scale_is_capped_at_100():
    a, b = unit(torch.randn(4, 8)), unit(torch.randn(4, 8))
    capped = clip_loss(a, b, torch.tensor(math.log(100.0)))
    torch.testing.assert_close(clip_loss(a, b, torch.tensor(math.log(1e4))), capped)


# --- networks ---------------------------------------------------------------------------------


def test_vision_encoder_any_divisible_grid():
    enc = VisionEncoder3D((8, 16, 32))
    assert enc(volumes(2, (8, 16, 24))).shape == (2, 32)
    with pytest.raises(ValueError, match=r"\(B, 1, D, H, W\)"):
        enc(torch.zeros(2, 16, 16, 16))


def test_shapes_and_similarity(minilm: TextEncoder):
    model = clip(minilm)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / TINY.clip.temperature))
    images = model.encode_image(volumes(2))
    texts = model.encode_text(TEXTS)
    assert images.shape == (2, TINY.clip.embed_dim) and texts.shape == (3, TINY.clip.embed_dim)
    torch.testing.assert_close(images.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(texts.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(model.encode_text(minilm.encode(TEXTS)), texts)
    sim = model.similarity(volumes(2), TEXTS)
    assert sim.shape == (2, 3)
    torch.testing.assert_close(sim, images @ texts.T)


def test_frozen_text_tower_gets_no_grads(minilm: TextEncoder):
    model = clip(minilm).train()
    assert model.vision.training and not model.text.training  # no dropout in the frozen tower
    model(volumes(3), TEXTS).backward()
    assert all(p.grad is None for p in model.text.parameters())
    assert all(p.grad is not None for n, p in model.named_parameters() if not n.startswith("text."))
    assert not any(k.startswith("text.") for k in model.trainable_state_dict())


def test_trainable_state_dict_round_trip(minilm: TextEncoder, tmp_path: Path):
    saved = clip(minilm, seed=1)
    path = tmp_path / "clip.safetensors"
    save_file(saved.trainable_state_dict(), path)
    loaded = clip(minilm, seed=2)
    assert not torch.equal(loaded.encode_image(volumes(2)), saved.encode_image(volumes(2)))
    loaded.load_trainable_state_dict(load_file(path))
    assert torch.equal(loaded.encode_image(volumes(2)), saved.encode_image(volumes(2)))
    assert torch.equal(loaded.encode_text(TEXTS), saved.encode_text(TEXTS))


def test_trained_text_tower_is_saved_and_loaded():
    saved = clip(TextEncoder.from_config(TINY.text), train_text=True).train()
    assert saved.text.training
    saved(volumes(3), TEXTS).backward()
    assert all(p.grad is not None for p in saved.text.parameters())
    with torch.no_grad():
        saved.text.model.embeddings.word_embeddings.weight.add_(0.1)  # as if fine-tuned
    state = saved.trainable_state_dict()
    assert any(k.startswith("text.") for k in state)
    loaded = clip(TextEncoder.from_config(TINY.text), seed=3, train_text=True).eval()
    loaded.load_trainable_state_dict(state)
    assert torch.equal(loaded.encode_text(TEXTS), saved.eval().encode_text(TEXTS))


def test_load_refuses_missing_unexpected_and_misshapen_keys(minilm: TextEncoder):
    model = clip(minilm)
    state = model.trainable_state_dict()
    with pytest.raises(ValueError, match=r"missing.*logit_scale"):
        model.load_trainable_state_dict({k: v for k, v in state.items() if k != "logit_scale"})
    with pytest.raises(ValueError, match=r"unexpected.*extra"):
        model.load_trainable_state_dict({**state, "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"vision_proj\.weight"):
        model.load_trainable_state_dict({**state, "vision_proj.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match=r"missing.*text\."):  # a text-trained checkpoint's model
        clip(minilm, train_text=True).load_trainable_state_dict(state)


# --- learning ---------------------------------------------------------------------------------

FINDING_SETS = (
    {},
    {"pleural_effusion": {"laterality": "bilateral", "severity": "large"}},
    {"cardiomegaly": {}},
    {"emphysema": {}},
    {"consolidation": {}},
    {"pericardial_effusion": {}},
)


def phantom_pairs() -> tuple[torch.Tensor, list[str]]:
    """Six 32^3 phantoms with different findings, in [-1, 1], and GenerateCT-style prompts."""
    grid = default_grid((32, 32, 32), None)
    images, reports = [], []
    for i, chosen in enumerate(FINDING_SETS):
        rng = np.random.default_rng(i)
        findings = {f: vocab.complete_attributes(f, a, rng) for f, a in chosen.items()}
        sex, age = "F" if i % 2 else "M", 50 + i
        phantom = render_phantom(grid, findings, sex, age, seed=i)
        images.append(torch.from_numpy(phantom.image.astype(np.float32)))
        labels = {fid: int(fid in findings) for fid in vocab.FINDING_IDS}
        reports.append(prompts.structured_text(labels, findings, age, sex, rng))
    return hu_to_unit(torch.stack(images)[:, None], TINY.hu_window), reports


def test_clip_learns_to_pair_phantoms_with_reports(minilm: TextEncoder):
    images, reports = phantom_pairs()
    assert len(set(reports)) == len(reports)
    model = clip(minilm).train()
    encoded = minilm.encode(reports)  # frozen: encode once
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(12):
        loss = model(images, encoded)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    with torch.no_grad():
        sim = model.eval().similarity(images, encoded)
    assert (sim.argmax(dim=1) == torch.arange(len(reports))).float().mean() >= 0.8
