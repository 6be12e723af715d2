"""Anatomy contract: label numbers, anatomy channels, and label maps read through their legend.

Two kinds of label map exist. The phantom writes fine structure labels (:data:`MASK_LABELS`:
five lobes, airway, vessels, heart, ...). ``ctfactory export`` writes the model's anatomy
channels (:data:`ANATOMY_CHANNELS`), where one voxel may belong to several channels. Both
carry a legend (``masks/labels.json``: label value -> name), and every reader here goes through
it: a channel is the union of the legend's values whose name is the channel, one of the
channel's structures (:data:`CHANNEL_STRUCTURES`), or a ``+``-joined set containing either.
Torch-free, so the phantom, the store, the export and the preprocessing all share it.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from factory.errors import CtFactoryError

LEGEND_FILE = "labels.json"  # beside the label maps: masks/labels.json
JOIN = "+"  # a label value that stands for several channels: "lungs+vessels"

# The phantom's anatomy label map (0 is background / other tissue).
MASK_LABELS: dict[int, str] = {
    1: "right_upper_lobe",
    2: "right_middle_lobe",
    3: "right_lower_lobe",
    4: "left_upper_lobe",
    5: "left_lower_lobe",
    6: "airway",
    7: "pulmonary_vessels",
    8: "heart",
    9: "aorta",
    10: "bone",
    11: "esophagus",
}
LABEL_OF: dict[str, int] = {name: value for value, name in MASK_LABELS.items()}
LOBE_CODES: tuple[str, ...] = ("RUL", "RML", "RLL", "LUL", "LLL")
LOBE_LABEL: dict[str, int] = {code: i + 1 for i, code in enumerate(LOBE_CODES)}
LUNG_LABELS: tuple[int, ...] = tuple(LOBE_LABEL.values())

# MedSyn-style anatomy channels a model may generate, each a union of phantom structures.
ANATOMY_CHANNELS: tuple[str, ...] = ("lungs", "airway", "vessels", "heart")
CHANNEL_STRUCTURES: dict[str, tuple[str, ...]] = {
    "lungs": tuple(MASK_LABELS[v] for v in LUNG_LABELS),
    "airway": ("airway",),
    "vessels": ("pulmonary_vessels",),
    "heart": ("heart",),
}
# The same unions as phantom label numbers (the phantom's own label maps, no legend needed).
ANATOMY_GROUPS: dict[str, tuple[int, ...]] = {
    channel: tuple(LABEL_OF[s] for s in structures)
    for channel, structures in CHANNEL_STRUCTURES.items()
}


class LegendError(CtFactoryError, ValueError):
    """A label map or legend that cannot be read; the message names the file and what is valid."""


def channel_values(legend: Mapping[int, str], channel: str) -> tuple[int, ...]:
    """The label values of ``legend`` that belong to ``channel``."""
    if channel not in CHANNEL_STRUCTURES:
        raise LegendError(f"unknown anatomy channel {channel!r}; valid: {ANATOMY_CHANNELS}")
    members = {channel, *CHANNEL_STRUCTURES[channel]}
    return tuple(
        int(value) for value, name in legend.items() if members & set(str(name).split(JOIN))
    )


def channels_from_labels(
    labels: np.ndarray, legend: Mapping[int, str], channels: Sequence[str]
) -> np.ndarray:
    """A label map -> one uint8 0/1 mask per channel, stacked (C, *labels.shape)."""
    if not channels:
        return np.zeros((0, *labels.shape), np.uint8)
    return np.stack([np.isin(labels, channel_values(legend, c)) for c in channels]).astype(np.uint8)


def channel_legend(channels: Sequence[str]) -> dict[int, str]:
    """The legend of a packed channel label map: one value per non-empty set of channels.

    Single channels come first (channel k is k + 1), then every overlap in a fixed order, so the
    values are the same for every volume of a model and a voxel in several channels keeps all.
    """
    if len(channels) > 8:
        raise LegendError(f"{len(channels)} anatomy channels do not fit a uint8 label map (8 max)")
    combos = [
        c for size in range(1, len(channels) + 1) for c in itertools.combinations(channels, size)
    ]
    return {value: JOIN.join(combo) for value, combo in enumerate(combos, start=1)}


def pack_masks(masks: Mapping[str, np.ndarray], channels: Sequence[str]) -> np.ndarray:
    """Binary masks -> one uint8 image with bit k for ``channels[k]`` (at most 8 channels): the
    cohort store's anatomy label image (its channel names are in the volume's metadata)."""
    if len(channels) > 8:
        raise ValueError(f"at most 8 anatomy channels fit a uint8 label image, got {len(channels)}")
    shape = next(iter(masks.values())).shape
    packed = np.zeros(shape, np.uint8)
    for k, name in enumerate(channels):
        packed |= (np.asarray(masks[name]) > 0).astype(np.uint8) << k
    return packed


def unpack_masks(packed: np.ndarray, channels: Sequence[str]) -> dict[str, np.ndarray]:
    """The inverse of :func:`pack_masks`."""
    return {name: ((packed >> k) & 1).astype(np.uint8) for k, name in enumerate(channels)}


def pack_channels(masks: Mapping[str, np.ndarray]) -> tuple[np.ndarray, dict[int, str]]:
    """Channel masks -> one uint8 label map and its legend; lossless where channels overlap."""
    names = list(masks)
    if not names:
        raise LegendError("no anatomy channels to pack")
    legend = channel_legend(names)
    value_of = {frozenset(name.split(JOIN)): value for value, name in legend.items()}
    bits = pack_masks(masks, names)
    lookup = np.zeros(2 ** len(names), np.uint8)
    for code in range(1, 2 ** len(names)):
        lookup[code] = value_of[frozenset(n for k, n in enumerate(names) if code >> k & 1)]
    return lookup[bits], legend


def legend_bytes(legend: Mapping[int, str]) -> bytes:
    """The legend as the bytes of a ``labels.json`` (JSON object, values as keys)."""
    return json.dumps({str(k): v for k, v in legend.items()}, indent=1).encode()


def read_legend(directory: str | Path) -> dict[int, str]:
    """The legend ``{directory}/labels.json``; a missing or malformed one is an error."""
    path = Path(directory) / LEGEND_FILE
    if not path.exists():
        raise LegendError(
            f"{path}: missing; every label map is read through its legend (value -> name)"
        )
    try:
        raw = json.loads(path.read_text())
        legend = {int(k): str(v) for k, v in raw.items()}
    except (ValueError, AttributeError) as exc:
        raise LegendError(f"{path}: not a legend of integer values to names ({exc})") from None
    if not legend or any(not 0 < v < 256 for v in legend):
        raise LegendError(f"{path}: label values must be 1..255; got {sorted(legend)}")
    return legend
