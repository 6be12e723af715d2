"""Shared pieces of the training tests: a small phantom dataset and configs for the small model."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import ROOT, ctfactory_bin

SMALL_MODEL = str(ROOT / "tests" / "configs" / "small-model.yaml")


def phantom_split(root: Path, split: str, n: int, seed: int, *args: str) -> Path:
    """``ctfactory phantom`` at the small model's grid into ``root``/``split``; ``args`` add
    options such as ``--finding cardiomegaly`` or ``--normal``."""
    subprocess.run(
        [
            *ctfactory_bin(),
            "phantom",
            *("--n", str(n), "--size", "32", "--spacing", "11.875x11.875x10"),
            *("--split", split, "--seed", str(seed), "--out", str(root), "--workers", "1"),
            *args,
        ],
        check=True,
        capture_output=True,
    )
    return root


def make_dataset(root: Path, n_train: int = 8, n_valid: int = 4) -> Path:
    """A phantom dataset at the small model's grid (32^3, 11.875 x 11.875 x 10 mm)."""
    phantom_split(root, "train", n_train, 0)
    return phantom_split(root, "valid", n_valid, 1)


def config(task: str, data: Path, storage: Path | str, **extra) -> dict:
    """A training config mapping for the small model; ``extra`` overrides top-level keys."""
    base = {
        "task": task,
        "model": SMALL_MODEL,
        "data": {"root": str(data), "held_out": "valid"},
        "storage": str(storage),
        "steps": 4,
        "batch_size": 4,
        "micro_batch": 2,
        "checkpoint_every": 2,
        "log_every": 1,
        "optim": {"lr": 1e-3},
    }
    base.update(extra)
    return base
