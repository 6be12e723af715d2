"""Seed derivation: every seed of a cohort is a pure function of the cohort seed and an index.

A volume's generation seed depends on (cohort seed, volume index) only, so any volume can be
recomputed on its own, however the work is split, retried or resumed; other streams (prompt
wording, verification attempts) use the same derivation with their own salt.
"""

from __future__ import annotations

import numpy as np

PROMPT_SALT = 0x9E0C7_5EED  # the prompt-wording stream of a plan
VERIFY_SALT = 0x5EED_0F_A77E  # verification attempts: a stream apart from the planned seeds


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output for states ``x`` (uint64 arrays wrap around, as the algorithm wants)."""
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def derive_seeds(seed: int, index: np.ndarray, salt: int = 0) -> np.ndarray:
    """64-bit values that depend only on (seed, salt, index): splitmix64(splitmix64(seed ^ salt)
    ^ index), so any volume's value can be recomputed on its own."""
    key = splitmix64(np.array([seed ^ salt], dtype=np.uint64))
    return splitmix64(key ^ np.asarray(index, dtype=np.uint64))


def volume_seeds(seed: int, index: np.ndarray) -> np.ndarray:
    """Per-volume generation seeds (non-negative int64) from the cohort seed and indices only."""
    return (derive_seeds(seed, index) >> np.uint64(1)).astype(np.int64)


def attempt_seed(seed: int, attempt: int) -> int:
    """The generation seed of verification ``attempt`` (1 = the planned seed, then derived)."""
    if attempt <= 1:
        return int(seed)
    return int(derive_seeds(int(seed), np.array([attempt]), salt=VERIFY_SALT)[0] >> np.uint64(1))
