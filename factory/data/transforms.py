"""MONAI preprocessing from a CT-RATE record to network inputs at a model's grid.

Load -> HU (with a guard against double rescaling) -> RAS orientation -> resample to the
model's spacing -> HU window to [-1, 1] (``factory.models.intensity``, the one mapping) ->
pad with air (-1) or crop to the model's grid. Anatomy label maps become one binary channel per
anatomy group, resampled with nearest neighbours. Padding happens after scaling, so padding is
air, never 0 (water).
"""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import (
    Compose,
    LoadImaged,
    MapTransform,
    Orientationd,
    ResizeWithPadOrCropd,
    Spacingd,
)

from factory.anatomy import channels_from_labels
from factory.data.ctrate import DatasetError, Record
from factory.models.config import ModelConfig
from factory.models.intensity import hu_to_unit

AIR_THRESHOLD_HU = -500.0  # any CT of a chest has air well below this


def to_hu(volume: torch.Tensor, slope: float, intercept: float, name: str) -> torch.Tensor:
    """Stored values -> HU, judged by the values, not only the metadata.

    A volume whose air is already negative is in HU and is left alone even if the metadata
    carries a rescale (applying it again is the double-rescaling bug); otherwise the rescale is
    applied, and the result must look like CT.
    """
    if volume.dtype == torch.bool:
        raise DatasetError(f"{name}: boolean volume; expected CT intensities (integer or float)")
    lowest = float(volume.min())
    if lowest < AIR_THRESHOLD_HU:
        return volume.float()
    hu = volume.float() * slope + intercept
    if float(hu.min()) >= AIR_THRESHOLD_HU:
        raise DatasetError(
            f"{name}: values {lowest:g}..{float(volume.max()):g} do not look like CT in HU, even "
            f"after RescaleSlope {slope:g} and RescaleIntercept {intercept:g} (no air below "
            f"{AIR_THRESHOLD_HU:g} HU)"
        )
    return hu


class ToHUd(MapTransform):
    """Apply :func:`to_hu` to ``image`` with the record's ``rescale`` and ``name``."""

    def __call__(self, data):
        d = dict(data)
        slope, intercept = d["rescale"]
        d["image"] = to_hu(d["image"], slope, intercept, d["name"])  # MetaTensor keeps its meta
        return d


class UnitIntensityd(MapTransform):
    """HU -> [-1, 1] over the model's window (the mapping of factory.models.intensity)."""

    def __init__(self, keys, window: tuple[float, float]):
        super().__init__(keys)
        self.window = window

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = hu_to_unit(d[key], self.window)
        return d


class AnatomyChannelsd(MapTransform):
    """A label map (1, X, Y, Z) -> one uint8 channel per anatomy channel (C, X, Y, Z).

    The map is read through its legend (``{key}_legend`` in the item: value -> name), so a
    phantom's structure labels and an export's channel labels give the same channels.
    """

    def __init__(self, keys, channels: tuple[str, ...]):
        super().__init__(keys)
        self.channels = channels

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            legend = d.get(f"{key}_legend")
            if not legend:
                raise DatasetError(f"{d.get('name', key)}: label map without a legend")
            labels = np.asarray(d[key][0])
            d[key] = torch.from_numpy(channels_from_labels(labels, legend, self.channels))
        return d


def sample(record: Record) -> dict:
    """The dict a preprocessing pipeline takes for one record."""
    item = {"image": str(record.image), "rescale": record.rescale, "name": record.name}
    if record.mask is not None:
        item["mask"] = str(record.mask)
        item["mask_legend"] = record.legend
    return item


def preprocessing(config: ModelConfig, with_masks: bool = False) -> Compose:
    """The MONAI chain that brings a record to ``config``'s grid, spacing and intensity range."""
    keys = ["image", "mask"] if with_masks else ["image"]
    steps = [
        LoadImaged("image", image_only=True, ensure_channel_first=True, dtype=np.float32),
        ToHUd("image"),
    ]
    if with_masks:
        steps.append(LoadImaged("mask", image_only=True, ensure_channel_first=True, dtype=np.uint8))
    steps += [
        Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(
            keys,
            pixdim=config.spacing_mm,
            mode=["bilinear", "nearest"][: len(keys)],
            padding_mode="border",
        ),
        UnitIntensityd("image", config.hu_window),
        ResizeWithPadOrCropd("image", spatial_size=config.size, mode="constant", value=-1.0),
    ]
    if with_masks:
        steps += [
            ResizeWithPadOrCropd("mask", spatial_size=config.size, mode="constant", value=0),
            AnatomyChannelsd("mask", config.diffusion.anatomy_channels),
        ]
    return Compose(steps)
