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


def test_builtin_demo_classifier_is_honest_and_tells_effusion_and_cardiomegaly_apart():
    from factory import vocab
    from factory.geometry import Grid
    from factory.models.classifier import load_classifier
    from factory.phantom.render import render_phantom

    checkpoint = load_checkpoint("builtin:demo-classifier")
    card = checkpoint.card
    assert "phantom" in card.description and "clinical" in card.limitations
    assert card.metrics["eval/auc/Pleural effusion"] > 0.9  # as measured on held-out phantoms
    classifier = load_classifier("builtin:demo-classifier")
    assert classifier.findings == vocab.COLUMNS
    # New phantoms (seeds it never saw) on the demo grid, each subject with and without.
    grid = Grid(tuple(checkpoint.config.size), tuple(checkpoint.config.spacing_mm))
    for fid, attrs in (("pleural_effusion", {"severity": "large"}), ("cardiomegaly", {})):
        column = classifier.columns([vocab.BY_ID[fid].column])[0]
        with_, without = [], []
        for i in range(3):
            seed = np.random.SeedSequence([777, i])
            full = vocab.complete_attributes(fid, attrs, np.random.default_rng(i))
            with_.append(render_phantom(grid, {fid: full}, "MF"[i % 2], 60, seed).image)
            without.append(render_phantom(grid, {}, "MF"[i % 2], 60, seed).image)
        p_with = classifier.probabilities(np.stack(with_))[:, column]
        p_without = classifier.probabilities(np.stack(without))[:, column]
        assert p_with.min() > p_without.max(), (fid, p_with, p_without)


# sha256 of (HU, then each mask by name) for builtin:demo at these seeds and settings on one
# CPU thread (torch 2.13.0, x86-64), recorded before the contracts refactoring: what the
# Generator draws must not change when code moves.
RECORDED = {
    7: "884353c8a4e7451d77b4c67b157a75dbd39a3745fb62475513bdd89c49fa5b7b",
    11: "0c75aa09bde982be07e036ce2b69c89d40e4686c4962325161664dbf8ab80487",
}


def test_builtin_demo_draws_the_recorded_volumes_bit_for_bit():
    import hashlib

    import torch

    generator = Generator.load("builtin:demo", device="cpu")
    requests = [
        Request("Large bilateral pleural effusion.", seed=7),  # the model's own sampling defaults
        Request("Cardiomegaly. No pleural effusion.", seed=11, steps=6, guidance=3.0),
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reductions split over threads round differently
    try:
        volumes = generator.generate(requests)
    finally:
        torch.set_num_threads(threads)
    assert volumes[0].sampler == {"steps": 20, "guidance": 5.0, "scheduler": "rectified_flow"}
    for volume in volumes:
        digest = hashlib.sha256(np.ascontiguousarray(volume.hu).tobytes())
        for name in sorted(volume.masks):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(volume.masks[name]).tobytes())
        assert digest.hexdigest() == RECORDED[volume.seed], volume.seed
