"""VAE task: the 3D KL autoencoder learns to reconstruct volumes (L1 + small KL), on random
crops when ``vae.crop`` is set (it is fully convolutional, as MAISI trains on patches).

``train_func`` is the per-worker function Ray Train runs; pass a ``LocalSession`` to run it
without Ray.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from factory.models.vae import build_vae
from train.config import TrainConfig
from train.data import index_rows, load_row
from train.loop import Session, fit, split_decay


class VAEStep(nn.Module):
    """One forward pass with the reparameterisation noise given, so DDP sees every parameter
    and the noise comes from the step's seeded generator."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, eps: torch.Tensor):
        mu, sigma = self.vae.encode(x)
        return self.vae.decode(mu + sigma * eps), mu, sigma


def kl_divergence(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)), summed over latent voxels, averaged over the batch."""
    kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2) + 1e-12) - 1)
    return kl.flatten(1).sum(1).mean()


def random_crop(x: torch.Tensor, size, gen: torch.Generator) -> torch.Tensor:
    """The same random window of ``size`` from every volume of the batch (or all of it)."""
    if size is None:
        return x
    starts = [
        int(torch.randint(0, n - s + 1, (1,), generator=gen)) if n > s else 0
        for n, s in zip(x.shape[2:], size, strict=True)
    ]
    window = tuple(slice(a, a + s) for a, s in zip(starts, size, strict=True))
    return x[(slice(None), slice(None), *window)]


class VAETask:
    name = "vae"
    network = "vae"

    def __init__(self, cfg: TrainConfig, device: torch.device, held_out: list[dict] | None = None):
        self.cfg = cfg
        self.model_cfg = cfg.architecture()
        self.device = device
        self.held_out = held_out or []
        factor = self.model_cfg.vae.factor
        if cfg.vae.crop is not None and any(c % factor for c in cfg.vae.crop):
            raise ValueError(f"vae.crop {cfg.vae.crop}: every size must be divisible by {factor}")

    def model(self) -> nn.Module:
        return VAEStep(build_vae(self.model_cfg.vae))

    def loss(self, model: nn.Module, batch: dict, gen: torch.Generator) -> torch.Tensor:
        x = random_crop(torch.as_tensor(batch["image"]), self.cfg.vae.crop, gen)
        f = self.model_cfg.vae.factor
        shape = (x.shape[0], self.model_cfg.vae.latent_channels, *(s // f for s in x.shape[2:]))
        eps = torch.randn(shape, generator=gen)
        recon, mu, sigma = model(x.to(self.device), eps.to(self.device))
        l1 = (recon.float() - x.to(self.device)).abs().mean()
        return l1 + self.cfg.vae.kl_weight * kl_divergence(mu.float(), sigma.float())

    def evaluate(self, module: nn.Module) -> dict[str, float]:
        """Held-out reconstruction from the posterior mean: mean absolute error in HU, PSNR."""
        if not self.held_out:
            return {}
        lo, hi = self.model_cfg.hu_window
        errors, psnr = [], []
        for row in self.held_out:
            x = torch.as_tensor(row["image"])[None].to(self.device)
            mu, _ = module.vae.encode(x)
            recon = module.vae.decode(mu).float().clamp(-1, 1)
            err = (recon - x).abs().mean() * (hi - lo) / 2
            mse = (recon - x).pow(2).mean().clamp(min=1e-12)
            errors.append(float(err))
            psnr.append(float(10 * torch.log10(4.0 / mse)))
        return {"mae_hu": float(np.mean(errors)), "psnr_db": float(np.mean(psnr))}

    def state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return module.vae.state_dict()

    def load_state_dict(self, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
        module.vae.load_state_dict(state)

    def param_groups(self, module: nn.Module, weight_decay: float) -> list[dict]:
        return split_decay(module, weight_decay, set())


def export_weights(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Checkpoint networks: ``vae``."""
    return {"vae": state}


def held_out_rows(cfg: TrainConfig, masks: bool = False) -> list[dict]:
    """The preprocessed held-out split (small), or nothing when none is configured."""
    if not cfg.data.held_out:
        return []
    rows = index_rows(cfg.data.root, cfg.data.held_out, masks, cfg.data.held_out_limit)
    return [load_row(r, cfg.model) for r in rows]


def train_func(config: dict, session: Session | None = None) -> None:
    """Per-worker entry point: ``config`` is ``{"config": TrainConfig dict, "rows": N, ...}``."""
    from train.session import RaySession

    cfg = TrainConfig.model_validate(config["config"])
    session = session or RaySession(cfg)
    held_out = held_out_rows(cfg) if session.rank == 0 else []
    fit(VAETask(cfg, session.device, held_out), cfg, session, config["rows"], {})
