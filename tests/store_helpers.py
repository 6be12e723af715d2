"""Shared pieces of the factory and store tests: a small random model and cohort specs."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from factory.models.card import ModelCard
from factory.models.config import load_config
from factory.models.generator import Generator
from tests.train_helpers import SMALL_MODEL


def small_model(directory: Path, seed: int = 0) -> Path:
    """The 32^3 test model with random weights, saved as a checkpoint (content-hashed)."""
    if not (directory / "config.yaml").exists():
        torch.manual_seed(seed)
        generator = Generator.from_config(load_config(SMALL_MODEL), device="cpu")
        generator.save(directory, ModelCard(name="test-small-random", steps=0))
    return directory


def write_spec(path: Path, model: Path | str, n: int = 6, output: str = "cohort", **extra) -> Path:
    """A cohort spec with effusion and nodules, 2 sampling steps, phantom reference."""
    spec = {
        "schema_version": 1,
        "cohort": {"id": "t", "n": n, "seed": 3},
        "labels": {"Pleural effusion": {"prevalence": 0.5}, "Lung nodule": {"count": 2}},
        "reference": "phantom",
        "prompt": {"style": "structured"},
        "model": str(model),
        "sampler": {"steps": 2, "guidance": 3.0},  # the model's scheduler
        "output": output,
        **extra,
    }
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path
