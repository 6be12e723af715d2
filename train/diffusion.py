"""Diffusion task: the text-conditioned UNet learns to denoise precomputed VAE latents (with
anatomy channels when the model has them), text from the frozen encoder, condition dropout
for classifier-free guidance. DDPM (epsilon or v) or rectified-flow (velocity) objectives.

``train_func`` is the per-worker function; the latents come from ``train.latents``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from factory.models.diffusion import TextConditionedUNet
from factory.models.negation import conditioning
from factory.models.samplers import make_scheduler
from factory.models.text import TextEncoder
from train.config import TrainConfig
from train.data import choose_texts
from train.loop import Session, fit, split_decay


class DiffusionTask:
    name = "diffusion"
    network = "diffusion"

    def __init__(self, cfg: TrainConfig, device: torch.device, scale_factor: float):
        self.cfg = cfg
        self.model_cfg = cfg.architecture()
        self.device = device
        self.scale_factor = scale_factor
        self.text = TextEncoder.from_config(self.model_cfg.text).frozen().to(device)
        d = self.model_cfg.diffusion
        self.scheduler = make_scheduler(d, "rectified_flow" if d.objective == "rflow" else "ddpm")
        self.unet: TextConditionedUNet | None = None
        self._texts: OrderedDict[str, torch.Tensor] = OrderedDict()

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen-encoder tokens and mask for ``texts``, as ``TextEncoder.encode`` pads them.

        Each epoch repeats the same reports, so their real tokens are cached (float16, least
        recently used evicted first): on CPU the encoder costs about a quarter of a step.
        """
        missing = [t for t in dict.fromkeys(texts) if t not in self._texts]
        fresh = {}
        if missing:
            with torch.no_grad():
                tokens, mask = self.text.encode(missing, pad_to_max=True)
            for text, tok, keep in zip(missing, tokens, mask, strict=True):
                fresh[text] = tok[keep].to(torch.float16)
        rows = [fresh[t] if t in fresh else self._texts[t] for t in texts]
        capacity = self.cfg.diffusion.text_cache
        for text in texts:  # least recently used first out: this batch's texts are kept
            if text in self._texts:
                self._texts.move_to_end(text)
        for text, tok in fresh.items():
            if capacity:
                self._texts[text] = tok
        while len(self._texts) > capacity:
            self._texts.popitem(last=False)
        hidden = self.model_cfg.text.hidden_size
        tokens = torch.zeros(len(texts), self.model_cfg.text.max_tokens, hidden, device=self.device)
        mask = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=self.device)
        for i, row in enumerate(rows):
            tokens[i, : len(row)] = row.float()
            mask[i, : len(row)] = True
        return tokens, mask

    def model(self) -> nn.Module:
        self.unet = TextConditionedUNet(self.model_cfg)
        return self.unet

    def targets(self, z: torch.Tensor, gen: torch.Generator):
        """Noisy latents, timesteps and the regression target for the configured objective."""
        d = self.model_cfg.diffusion
        noise = torch.randn(z.shape, generator=gen)
        if d.objective == "rflow":
            t = torch.rand(z.shape[0], generator=gen) * d.num_train_timesteps
            return self.scheduler.add_noise(z, noise, t), t, z - noise
        t = torch.randint(0, d.num_train_timesteps, (z.shape[0],), generator=gen)
        x_t = self.scheduler.add_noise(z, noise, t)
        target = noise if d.prediction == "epsilon" else self.scheduler.get_velocity(z, noise, t)
        return x_t, t, target

    def latents(self, batch: dict) -> torch.Tensor:
        """Stored latents with the image channels scaled to about unit variance."""
        z = torch.as_tensor(batch["latent"]).float().clone()
        z[:, : self.model_cfg.vae.latent_channels] *= self.scale_factor
        return z

    def loss(self, model: nn.Module, batch: dict, gen: torch.Generator, step: int) -> torch.Tensor:
        x_t, t, target = self.targets(self.latents(batch), gen)
        texts = choose_texts(batch, self.cfg.data.text, gen, self.cfg.data.excerpts)
        negations = self.model_cfg.text.negations
        texts = [conditioning(t, negations).affirmed for t in texts]
        drop = self.unet.drop_mask(len(texts), gen)
        with torch.no_grad():
            context = self.unet.context(*self.encode(texts))
        pred = model(x_t.to(self.device), t.to(self.device), context, drop.to(self.device))
        return F.mse_loss(pred.float(), target.to(self.device))

    def evaluate(self, module: nn.Module) -> dict[str, float]:
        return {}

    def state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return module.state_dict()

    def load_state_dict(self, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
        module.load_state_dict(state)

    def param_groups(self, module: nn.Module, weight_decay: float) -> list[dict]:
        return split_decay(module, weight_decay, {"null"})


def export_weights(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Checkpoint networks: ``diffusion`` (the VAE and CLIP come from their own checkpoints)."""
    return {"diffusion": state}


def train_func(config: dict, session: Session | None = None) -> None:
    """Per-worker entry point: ``config`` adds ``scale_factor`` and ``latents`` (the set used)."""
    from train.session import RaySession

    cfg = TrainConfig.model_validate(config["config"])
    session = session or RaySession(cfg)
    task = DiffusionTask(cfg, session.device, config["scale_factor"])
    extra = {"scale_factor": config["scale_factor"], "latents": config.get("latents", {})}
    fit(task, cfg, session, config["rows"], extra)
