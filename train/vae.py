"""VAE task: the 3D KL autoencoder learns to reconstruct volumes (L1 + small KL), on random
crops when ``vae.crop`` is set (it is fully convolutional, as MAISI trains on patches), and
optionally against a patch discriminator (``vae.adversarial``), as MAISI's VAE was trained.

``train_func`` is the per-worker function Ray Train runs; pass a ``LocalSession`` to run it
without Ray.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import PatchDiscriminator
from torch import nn
from torch.func import functional_call

from factory.models.intensity import rewindow
from factory.models.vae import build_vae
from train.config import AdversarialOptions, TrainConfig
from train.data import index_rows, load_row
from train.loop import Session, fit, split_decay

CRITIC = "discriminator."  # prefix of the discriminator's weights in a training checkpoint


class Critic(nn.Module):
    """A MONAI patch discriminator, without normalisation layers, that sees volumes through its
    own HU window. (With MONAI's default batch norm, real and generated crops are normalised as
    separate batches, which scales away the texture statistics it should judge: on the demo data
    it sat at chance and reconstructions stayed smooth.)

    ``losses`` returns the discriminator's least-squares loss (reconstructions detached) and
    the decoder's adversarial loss, computed through detached discriminator weights: one
    backward pass of their sum then trains each network on its own objective only, so the
    shared loop keeps one optimiser and DDP sees every parameter used in every step.
    """

    def __init__(self, opts: AdversarialOptions, hu_window: tuple[float, float]):
        super().__init__()
        self.net = PatchDiscriminator(
            spatial_dims=3,
            num_layers_d=opts.layers,
            channels=opts.channels,
            in_channels=1,
            out_channels=1,
            norm=None,
        )
        self.hu_window = hu_window
        self.window = opts.window or hu_window
        self.criterion = PatchAdversarialLoss(criterion="least_squares")

    def view(self, x: torch.Tensor) -> torch.Tensor:
        """Model-range volumes ([-1, 1] over ``hu_window``) -> [-1, 1] over the critic's window."""
        return rewindow(x, self.hu_window, self.window)

    def losses(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        real, fake = self.view(real), self.view(fake)
        critic = self.criterion(self.net(real)[-1], target_is_real=True, for_discriminator=True)
        critic = 0.5 * (
            critic
            + self.criterion(
                self.net(fake.detach())[-1], target_is_real=False, for_discriminator=True
            )
        )
        frozen = {name: p.detach() for name, p in self.net.named_parameters()}
        judged = functional_call(self.net, frozen, (fake,))[-1]
        return critic, self.criterion(judged, target_is_real=True, for_discriminator=False)


class VAEStep(nn.Module):
    """One forward pass with the reparameterisation noise given, so DDP sees every parameter
    and the noise comes from the step's seeded generator; with a critic, also its losses."""

    def __init__(self, vae: nn.Module, critic: Critic | None = None):
        super().__init__()
        self.vae = vae
        self.critic = critic

    def forward(self, x: torch.Tensor, eps: torch.Tensor):
        mu, sigma = self.vae.encode(x)
        recon = self.vae.decode(mu + sigma * eps)
        adversarial = self.critic.losses(x, recon) if self.critic is not None else None
        return recon, mu, sigma, adversarial


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
        adv = self.cfg.vae.adversarial
        critic = Critic(adv, self.model_cfg.hu_window) if adv else None
        return VAEStep(build_vae(self.model_cfg.vae), critic)

    def loss(self, model: nn.Module, batch: dict, gen: torch.Generator, step: int) -> torch.Tensor:
        x = random_crop(torch.as_tensor(batch["image"]), self.cfg.vae.crop, gen)
        f = self.model_cfg.vae.factor
        shape = (x.shape[0], self.model_cfg.vae.latent_channels, *(s // f for s in x.shape[2:]))
        eps = torch.randn(shape, generator=gen)
        recon, mu, sigma, adversarial = model(x.to(self.device), eps.to(self.device))
        l1 = (recon.float() - x.to(self.device)).abs().mean()
        loss = l1 + self.cfg.vae.kl_weight * kl_divergence(mu.float(), sigma.float())
        if adversarial is None:
            return loss
        critic, fooled = adversarial
        opts = self.cfg.vae.adversarial
        return loss + critic.float() + (opts.weight if step >= opts.start else 0.0) * fooled.float()

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
        """The VAE's weights, and the discriminator's under ``CRITIC`` (not exported)."""
        state = dict(module.vae.state_dict())
        if module.critic is not None:
            state.update({CRITIC + k: v for k, v in module.critic.net.state_dict().items()})
        return state

    def load_state_dict(self, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
        module.vae.load_state_dict({k: v for k, v in state.items() if not k.startswith(CRITIC)})
        if module.critic is not None:
            critic = {k[len(CRITIC) :]: v for k, v in state.items() if k.startswith(CRITIC)}
            module.critic.net.load_state_dict(critic)

    def param_groups(self, module: nn.Module, weight_decay: float) -> list[dict]:
        return split_decay(module, weight_decay, set())


def export_weights(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Checkpoint networks: ``vae`` (the discriminator only trains it)."""
    return {"vae": {k: v for k, v in state.items() if not k.startswith(CRITIC)}}


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
