"""The one mapping between data (HU, anatomy masks) and the networks' ranges.

Training normalises HU by clipping to the model's window and scaling linearly to [-1, 1];
generation applies the inverse and rounds to int16. Anatomy masks become latent-grid channels
(covered fraction mapped to [-1, 1]) and come back by upsampling and thresholding at 0.
Both directions live here only.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def hu_to_unit(hu: torch.Tensor, window: tuple[float, float]) -> torch.Tensor:
    """HU -> [-1, 1]: clip to ``window``, then scale linearly."""
    lo, hi = window
    return (hu.clamp(lo, hi) - lo) / (hi - lo) * 2.0 - 1.0


def rewindow(
    x: torch.Tensor, window: tuple[float, float], other: tuple[float, float]
) -> torch.Tensor:
    """[-1, 1] over ``window`` -> [-1, 1] over ``other`` (clipped to it); differentiable, so a
    loss can look at the model's output through another window (the VAE's critic does)."""
    lo, hi = window
    return hu_to_unit((x + 1.0) / 2.0 * (hi - lo) + lo, other)


def unit_to_hu(x: torch.Tensor, window: tuple[float, float]) -> np.ndarray:
    """[-1, 1] -> int16 HU within ``window`` (the exact inverse of :func:`hu_to_unit`)."""
    lo, hi = window
    hu = (x.float().clamp(-1.0, 1.0) + 1.0) / 2.0 * (hi - lo) + lo
    return torch.round(hu).to(torch.int16).cpu().numpy()


def mask_to_latent(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """0/1 masks (..., X, Y, Z) -> latent-grid channels: covered fraction mapped to [-1, 1]."""
    lead = mask.shape[:-3]
    pooled = F.avg_pool3d(mask.reshape(-1, 1, *mask.shape[-3:]).float(), factor)
    return (pooled * 2.0 - 1.0).reshape(*lead, *pooled.shape[-3:])


def latent_to_mask(channels: torch.Tensor, size: tuple[int, int, int]) -> np.ndarray:
    """Latent mask channels (B, C, x, y, z) -> uint8 masks (B, C, *size): upsample, threshold 0."""
    up = F.interpolate(channels.float(), size=size, mode="trilinear", align_corners=False)
    return (up > 0).to(torch.uint8).cpu().numpy()
