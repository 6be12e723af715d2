"""The sampler settings a model can run with (steps, guidance, scheduler), checked without
torch, so that a driver refuses bad settings before any work and without loading the models'
libraries; factory/models/samplers.py builds the schedulers."""

from __future__ import annotations

from factory.errors import CtFactoryError
from factory.models.config import DiffusionConfig

SCHEDULERS_FOR = {"ddpm": ("ddim", "ddpm"), "rflow": ("rectified_flow",)}


class SamplerError(CtFactoryError, ValueError):
    """Sampler settings that the model cannot use."""


def default_scheduler(cfg: DiffusionConfig) -> str:
    return SCHEDULERS_FOR[cfg.objective][0]


def check_scheduler(cfg: DiffusionConfig, kind: str | None) -> str:
    """``kind`` (or the objective's default) if it can sample a model trained with ``cfg``."""
    kind = kind or default_scheduler(cfg)
    valid = SCHEDULERS_FOR[cfg.objective]
    if kind not in valid:
        raise SamplerError(
            f"scheduler {kind!r} cannot sample a model trained with objective "
            f"{cfg.objective!r}; valid: {', '.join(valid)}"
        )
    return kind


def sampling_settings(
    cfg: DiffusionConfig,
    steps: int | None = None,
    guidance: float | None = None,
    scheduler: str | None = None,
) -> dict:
    """The settings a generation runs with: each one given, or the model's own (its
    ``diffusion.sampling`` and its objective's scheduler). Checked before any work."""
    settings = {
        "steps": cfg.sampling.steps if steps is None else steps,
        "guidance": float(cfg.sampling.guidance if guidance is None else guidance),
        "scheduler": scheduler or default_scheduler(cfg),
    }
    check_settings(settings["steps"], settings["guidance"], cfg, settings["scheduler"])
    return settings


def check_settings(steps: int, guidance: float, cfg: DiffusionConfig, kind: str | None) -> None:
    """Fail before any work on settings no sampler can use."""
    if not isinstance(steps, int) or steps < 1:
        raise SamplerError(f"steps: {steps!r} is not valid; expected an integer >= 1")
    if steps > cfg.num_train_timesteps:
        raise SamplerError(
            f"steps: {steps} exceeds the model's {cfg.num_train_timesteps} timesteps"
        )
    if guidance < 0:
        raise SamplerError(f"guidance: {guidance!r} is not valid; expected a number >= 0")
    check_scheduler(cfg, kind)
