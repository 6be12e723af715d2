"""Samplers: DDPM for training targets, DDPM / DDIM / rectified flow for generation.

MONAI's schedulers do the maths; this module only composes them with classifier-free guidance
(``uncond + w * (cond - uncond)``, cond and uncond batched in one forward pass, skipped at
w = 1) and with inpainting of known anatomy channels (replaced at every step by the known
latent noised to that step, and exactly at the end). Every random draw comes from the
request's own ``torch.Generator``, so a volume does not depend on what it is batched with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler

from factory.models.config import DiffusionConfig
from factory.models.sampling import check_scheduler

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def make_scheduler(cfg: DiffusionConfig, kind: str | None = None):
    """The MONAI scheduler ``kind`` for a network trained with ``cfg.objective``."""
    kind = check_scheduler(cfg, kind)
    common = {"num_train_timesteps": cfg.num_train_timesteps}
    if kind == "rectified_flow":
        return RFlowScheduler(**common, use_discrete_timesteps=False, sample_method="uniform")
    args = {**common, "schedule": cfg.schedule, "prediction_type": cfg.prediction}
    if kind == "ddim":
        return DDIMScheduler(**args, clip_sample=False)
    return DDPMScheduler(**args, clip_sample=False)


def guided(model: Denoiser, context: torch.Tensor, null: torch.Tensor, w: float) -> Callable:
    """Denoiser with classifier-free guidance; at w = 1 only the conditional pass runs."""

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if w == 1.0:
            return model(x, t, context)
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([context, null]))
        cond, uncond = out.chunk(2)
        return uncond + w * (cond - uncond)

    return fn


def sample(
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    cfg: DiffusionConfig,
    steps: int,
    generators: Sequence[torch.Generator],
    kind: str | None = None,
    known: torch.Tensor | None = None,
    known_mask: torch.Tensor | None = None,
    known_noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the reverse process from ``noise`` (B, C, ...) and return clean latents.

    ``known`` (B, C, ...) with ``known_mask`` (B, C) marks channels fixed to given latents;
    ``known_noise`` is the per-request noise used to bring them to each step's noise level.
    """
    scheduler = make_scheduler(cfg, kind)
    if isinstance(scheduler, RFlowScheduler):
        scheduler.set_timesteps(
            steps, device=noise.device, input_img_size_numel=noise[0, 0].numel()
        )
    else:
        scheduler.set_timesteps(steps, device=noise.device)
    timesteps = list(scheduler.timesteps)
    x = noise
    fixed = known is not None and known_mask is not None and bool(known_mask.any())
    if fixed:
        sel = known_mask[:, :, None, None, None].to(x.dtype)
    for i, t in enumerate(timesteps):
        t_batch = torch.full((x.shape[0],), float(t), device=x.device)
        if not isinstance(scheduler, RFlowScheduler):
            t_batch = t_batch.long()
        if fixed:
            level = scheduler.add_noise(known, known_noise, t_batch)
            x = sel * level + (1 - sel) * x
        pred = denoise(x, t_batch)
        t_next = timesteps[i + 1] if i + 1 < len(timesteps) else None
        x = torch.cat(
            [
                _step(scheduler, pred[b : b + 1], t, x[b : b + 1], t_next, generators[b])
                for b in range(x.shape[0])
            ]
        )
    if fixed:
        x = sel * known + (1 - sel) * x
    return x


def _step(scheduler, pred, t, x, t_next, generator: torch.Generator) -> torch.Tensor:
    """One reverse step for one request, drawing any noise from its own generator."""
    if isinstance(scheduler, RFlowScheduler):
        return scheduler.step(pred, t, x, next_timestep=t_next)[0]
    if isinstance(scheduler, DDIMScheduler):
        return scheduler.step(pred, int(t), x, eta=0.0)[0]
    return scheduler.step(pred, int(t), x, generator=generator)[0]
