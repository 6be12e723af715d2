"""The bundled demo model: it loads by reference, verifies, is small, says what it is, and
generates; its card carries the prompt-pair pictures and the measured yardstick."""

from __future__ import annotations

import numpy as np

from factory.models.checkpoint import BUILTIN_DIR, load_checkpoint
from factory.models.generator import Generator, Request


def test_builtin_demo_is_small_verified_and_honest_about_itself():
    checkpoint = load_checkpoint("builtin:demo")  # verifies every file's sha256
    weights = sum(p.stat().st_size for p in (BUILTIN_DIR / "demo").glob("*.safetensors"))
    assert weights < 30 * 2**20, f"{weights / 2**20:.1f} MiB of weights"
    card = checkpoint.card
    assert card.name == "demo" and card.steps > 0
    assert "phantom" in card.description and "phantom" in card.training_data.lower()
    assert "clinical" in card.limitations
    for finding in ("pleural_effusion", "cardiomegaly", "emphysema", "consolidation"):
        assert f"{finding}/difference" in card.metrics
        picture = BUILTIN_DIR / "demo" / "images" / f"pair-{finding}.png"
        assert picture.read_bytes()[:4] == b"\x89PNG"
        assert f"images/pair-{finding}.png" in card.description


def test_builtin_demo_generates_a_volume_on_its_grid():
    generator = Generator.load("builtin:demo", device="cpu")
    volume = generator.generate([Request("Large bilateral pleural effusion.", seed=1, steps=4)])[0]
    assert volume.hu.shape == (64, 64, 64) and volume.hu.dtype == np.int16
    assert set(volume.masks) == {"lungs", "airway", "vessels", "heart"}
    assert volume.model_hash == load_checkpoint("builtin:demo").hash
