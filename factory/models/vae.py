"""The 3D KL autoencoder (MONAI ``AutoencoderKL``, or MAISI's ``AutoencoderKlMaisi``) and the
latent codec the pipelines use.

Latents are the posterior mean times ``scale_factor`` (so diffusion sees about unit variance).
Decoding within a memory budget splits every layer into chunks, exactly (factory/models/split.py,
MAISI's method); encoding can run in overlapping slabs along z with MONAI's sliding-window
inferer (Gaussian blending), which bounds peak memory at a small seam cost.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import (
    AutoencoderKlMaisi,
    MaisiGroupNorm3D,
)
from monai.inferers import SlidingWindowInferer
from monai.networks.nets import AutoencoderKL

from factory.models.config import VAEConfig
from factory.models.split import Split, choose_split, split_decode


def build_vae(cfg: VAEConfig) -> AutoencoderKL:
    """A 3D autoencoder of ``cfg.arch`` with 1 input/output channel and ``2**(levels-1)``
    downsampling (``AutoencoderKlMaisi`` is an ``AutoencoderKL`` with its own layers)."""
    common = {
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 1,
        "latent_channels": cfg.latent_channels,
        "attention_levels": cfg.attention_levels,
        "norm_num_groups": cfg.norm_num_groups,
        "norm_eps": cfg.norm_eps,
        "with_encoder_nonlocal_attn": cfg.nonlocal_attention,
        "with_decoder_nonlocal_attn": cfg.nonlocal_attention,
        "use_flash_attention": True,
    }
    if cfg.arch == "maisi":
        return AutoencoderKlMaisi(
            num_channels=cfg.channels,
            num_res_blocks=(cfg.num_res_blocks,) * len(cfg.channels),
            use_convtranspose=False,
            num_splits=cfg.num_splits,
            dim_split=cfg.dim_split,
            norm_float16=cfg.norm_float16,
            save_mem=False,  # MONAI's default empties the CUDA cache after every layer
            **common,
        )
    return AutoencoderKL(channels=cfg.channels, num_res_blocks=cfg.num_res_blocks, **common)


@contextlib.contextmanager
def norms_for(vae: torch.nn.Module, cfg: VAEConfig, device: torch.device) -> Iterator[None]:
    """MAISI's float16 GroupNorm outputs only under autocast: without it (the CPU, fp32) the
    next convolution's float32 weights would meet float16 inputs."""
    norms = [m for m in vae.modules() if isinstance(m, MaisiGroupNorm3D)]
    half = cfg.norm_float16 and torch.is_autocast_enabled(device.type)
    for norm in norms:
        norm.norm_float16 = half
    try:
        yield
    finally:
        for norm in norms:
            norm.norm_float16 = cfg.norm_float16


class LatentCodec(torch.nn.Module):
    """Volumes in [-1, 1] <-> scaled latents, with optional slab-wise decoding."""

    def __init__(self, vae: AutoencoderKL, cfg: VAEConfig):
        super().__init__()
        self.vae = vae
        self.cfg = cfg

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, X, Y, Z) in [-1, 1] -> (B, C, X/f, Y/f, Z/f) scaled posterior means."""
        with norms_for(self.vae, self.cfg, x.device):
            mu = self._slabs(
                x, self.cfg.decode_slab * self.cfg.factor, lambda v: self.vae.encode(v)[0]
            )
        return mu * self.cfg.scale_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> volumes in about [-1, 1]: split to fit ``decode_memory_gb`` when
        set, else in slabs when ``decode_slab`` is set, else whole."""
        z = z / self.cfg.scale_factor
        if self.cfg.decode_memory_gb:
            kind = z.device.type
            amp = torch.is_autocast_enabled(kind)
            itemsize = torch.get_autocast_dtype(kind).itemsize if amp else z.element_size()
            return split_decode(self.vae, z, self.split(tuple(z.shape), itemsize))
        with norms_for(self.vae, self.cfg, z.device):
            return self._slabs(z, self.cfg.decode_slab, self.vae.decode)

    def split(self, latent: tuple[int, ...], itemsize: int) -> Split:
        """How a decode of ``latent`` fits into ``decode_memory_gb``."""
        return choose_split(self.vae.decoder, latent, self.cfg.decode_memory_gb, itemsize)

    @staticmethod
    def _slabs(x: torch.Tensor, slab: int, fn) -> torch.Tensor:
        """``fn(x)``, or over overlapping z-slabs of ``slab`` slices blended by MONAI."""
        if not slab or slab >= x.shape[-1]:
            return fn(x)
        roi = (x.shape[2], x.shape[3], slab)
        return SlidingWindowInferer(roi, sw_batch_size=1, overlap=0.5, mode="gaussian")(x, fn)
