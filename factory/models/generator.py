"""One generation API for the factory, the server and evaluation.

``Generator.load(ref)`` builds the networks from a checkpoint (``builtin:NAME``, a directory
or an fsspec URL); ``generate(requests)`` turns prompts and seeds into HU volumes with masks.
A request's noise comes from its own ``torch.Generator`` seeded by its seed, so a volume is
the same alone or in any batch (same device and dtype). The pipeline owns no maths: the
text encoder, UNet, sampler and VAE do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from factory.errors import CtFactoryError
from factory.geometry import Grid
from factory.models.card import ModelCard
from factory.models.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from factory.models.config import ModelConfig
from factory.models.diffusion import TextConditionedUNet
from factory.models.intensity import hu_to_unit, latent_to_mask, mask_to_latent, unit_to_hu
from factory.models.negation import Negations, conditioning
from factory.models.samplers import guided, sample
from factory.models.sampling import sampling_settings
from factory.models.text import TextEncoder
from factory.models.vae import LatentCodec, build_vae


class RequestError(CtFactoryError, ValueError):
    """A generation request that cannot be served; the message names the field."""


@dataclass(frozen=True)
class Request:
    """One volume to generate. ``masks`` fixes anatomy channels (name -> 0/1 array on the grid);
    ``image`` (HU on the grid) fixes the image latents to its encoding, so that the anatomy
    channels are sampled for a given CT: MedSyn's segmentation by generation.

    ``negative_prompt`` is what guidance steers away from, as in diffusers' pipelines; with a
    model's ``text.negations: guide`` the prompt's own negations ("no pleural effusion") join it.
    """

    prompt: str
    seed: int
    steps: int | None = None  # None: the model's own (its diffusion.sampling)
    guidance: float | None = None
    scheduler: str | None = None
    masks: Mapping[str, np.ndarray] | None = None
    negative_prompt: str = ""
    image: np.ndarray | None = None


@dataclass
class Volume:
    """A generated volume: int16 HU (x, y, z) on a RAS+ grid, its masks and provenance."""

    hu: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    masks: dict[str, np.ndarray]
    prompt: str
    seed: int
    model_hash: str
    sampler: dict = field(default_factory=dict)
    prompt_cut: int = 0  # tokens of the conditioning text beyond the text encoder's limit


def default_device() -> torch.device:
    """The first CUDA device where there is one, else the CPU (the one rule for every model)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Generator:
    """Text encoder + latent diffusion UNet + sampler + VAE decoder, on one device."""

    def __init__(
        self,
        config: ModelConfig,
        codec: LatentCodec,
        text: TextEncoder,
        unet: TextConditionedUNet,
        model_hash: str,
        device: torch.device | str | None = None,
    ):
        self.config = config
        self.device = torch.device(device) if device is not None else default_device()
        self.codec = codec.to(self.device).eval()
        self.text = text.to(self.device).eval()
        self.unet = unet.to(self.device).eval()
        self.model_hash = model_hash
        self.grid = Grid(config.size, config.spacing_mm)
        self.amp = True  # bf16 autocast on CUDA; False samples in full fp32 precision
        if config.vae.decode_memory_gb:  # a budget that cannot hold a decode is refused now
            latent = (1, config.vae.latent_channels, *config.latent_size)
            self.codec.split(latent, 2 if self.device.type == "cuda" else 4)

    @classmethod
    def from_config(
        cls, config: ModelConfig, model_hash: str = "untrained", device=None
    ) -> Generator:
        """Randomly initialised networks (tests, benchmarks, the start of training)."""
        codec = LatentCodec(build_vae(config.vae), config.vae)
        return cls(
            config,
            codec,
            TextEncoder.from_config(config.text),
            TextConditionedUNet(config),
            model_hash,
            device,
        )

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, device=None) -> Generator:
        config = checkpoint.config
        codec = LatentCodec(build_vae(config.vae), config.vae)
        codec.vae.load_state_dict(checkpoint.state_dict("vae"))
        unet = TextConditionedUNet(config)
        unet.load_state_dict(checkpoint.state_dict("diffusion"))
        text = TextEncoder.from_config(config.text, checkpoint.directory / "text")
        if "text" in checkpoint.weights:  # a text tower fine-tuned with the 3D CLIP
            text.load_state_dict(checkpoint.state_dict("text"))
        return cls(config, codec, text, unet, checkpoint.hash, device)

    @classmethod
    def load(cls, ref: str, device=None, **storage_options) -> Generator:
        """From ``builtin:NAME``, a checkpoint directory or an fsspec URL (cached locally)."""
        return cls.from_checkpoint(
            load_checkpoint(ref, storage_options=storage_options or None), device
        )

    def save(self, directory, card: ModelCard, labels_csv=None) -> str:
        """Write this generator's networks as a checkpoint directory; returns its content hash."""
        weights = {"vae": self.codec.vae.state_dict(), "diffusion": self.unet.state_dict()}
        return save_checkpoint(directory, self.config, weights, card, labels_csv)

    # ----- requests ---------------------------------------------------------------------------
    def check(self, request: Request, index: int = 0) -> dict:
        """Validate a request before any heavy work (errors name the request and the field);
        returns the sampling settings it runs with."""
        try:
            settings = self.settings(request)
        except ValueError as exc:
            raise RequestError(f"request {index}: {exc}") from None
        channels = self.config.diffusion.anatomy_channels
        for name, mask in (request.masks or {}).items():
            if name not in channels:
                valid = ", ".join(channels) or "none (this model has no anatomy channels)"
                raise RequestError(
                    f"request {index}: masks.{name}: unknown channel; valid: {valid}"
                )
            if tuple(np.shape(mask)) != tuple(self.config.size):
                raise RequestError(
                    f"request {index}: masks.{name}: shape {tuple(np.shape(mask))} does not match "
                    f"the model grid {tuple(self.config.size)}"
                )
        if request.image is not None and not channels:
            raise RequestError(
                f"request {index}: image: this model has no anatomy channels to sample for it"
            )
        if request.image is not None and tuple(np.shape(request.image)) != tuple(self.config.size):
            raise RequestError(
                f"request {index}: image: shape {tuple(np.shape(request.image))} does not match "
                f"the model grid {tuple(self.config.size)}"
            )
        return settings

    def settings(self, request: Request) -> dict:
        """The steps, guidance and scheduler ``request`` runs with (the model's where unset)."""
        return sampling_settings(
            self.config.diffusion, request.steps, request.guidance, request.scheduler
        )

    def generate(self, requests: Sequence[Request], batch_size: int = 4) -> list[Volume]:
        """Generate one volume per request, in request order, ``batch_size`` at a time.

        Requests that share steps, guidance and scheduler are batched together.
        """
        groups: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            s = self.check(request, i)
            groups.setdefault((s["steps"], s["guidance"], s["scheduler"]), []).append(i)
        out: list[Volume | None] = [None] * len(requests)
        for (steps, guidance, kind), members in groups.items():
            for start in range(0, len(members), max(1, batch_size)):
                chunk = members[start : start + batch_size]
                volumes = self._batch([requests[i] for i in chunk], steps, guidance, kind)
                for i, volume in zip(chunk, volumes, strict=True):
                    out[i] = volume
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def _batch(
        self, requests: Sequence[Request], steps: int, guidance: float, kind: str
    ) -> list[Volume]:
        cfg = self.config
        shape = (cfg.latent_channels, *cfg.latent_size)
        gens = [torch.Generator(device=self.device).manual_seed(int(r.seed)) for r in requests]
        noise = torch.stack([torch.randn(shape, generator=g, device=self.device) for g in gens])
        known_noise = torch.stack(
            [torch.randn(shape, generator=g, device=self.device) for g in gens]
        )
        known, known_mask = self._known(requests)
        texts = [self.conditioning(r) for r in requests]
        # As in diffusers, a negative prompt takes part only when guidance extrapolates (w > 1):
        # at w = 0 the unconditional branch is all there is, and it would draw what was negated.
        steer = [b for b, t in enumerate(texts) if t.negated] if guidance > 1.0 else []
        with self._autocast():
            context = self._context([t.affirmed for t in texts])
            uncond = self.unet.null_context(len(requests)).to(context.dtype)
            if steer:
                uncond[steer] = self._context([texts[b].negated for b in steer])
            denoise = guided(self.unet, context, uncond, guidance)
            latents = sample(
                denoise, noise, cfg.diffusion, steps, gens, kind, known, known_mask, known_noise
            )
            # One volume at a time: bounds decoder memory (the peak at full resolution) and
            # keeps each volume bit-identical whatever it was batched with.
            image = torch.cat(
                [self.codec.decode(z[None]) for z in latents[:, : cfg.vae.latent_channels]]
            )
        hu = unit_to_hu(image[:, 0], cfg.hu_window)
        masks = self._masks(latents[:, cfg.vae.latent_channels :].float())
        settings = {"steps": steps, "guidance": guidance, "scheduler": kind}
        cut = self.text.overflow([t.affirmed for t in texts])
        return [
            Volume(
                hu=hu[b],
                spacing=tuple(cfg.spacing_mm),
                affine=self.grid.affine(),
                masks={name: m[b] for name, m in masks.items()},
                prompt=r.prompt,
                seed=int(r.seed),
                model_hash=self.model_hash,
                sampler=settings | ({"negative_prompt": t.negated} if b in steer else {}),
                prompt_cut=cut[b],
            )
            for b, (r, t) in enumerate(zip(requests, texts, strict=True))
        ]

    def conditioning(self, request: Request) -> Negations:
        """The text a request conditions on and the text its guidance steers away from."""
        text = conditioning(request.prompt, self.config.text.negations)
        extra = request.negative_prompt.strip()
        negated = " ".join(t for t in (text.negated, extra) if t)
        return Negations(text.affirmed, negated)

    def _context(self, texts: list[str]) -> torch.Tensor:
        tokens, mask = self.text.encode(texts, pad_to_max=True)
        return self.unet.context(tokens, mask)

    def _known(
        self, requests: Sequence[Request]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Latent-grid versions of the given masks in [-1, 1] and images (their encodings), and
        which channels are fixed."""
        cfg = self.config
        channels = cfg.diffusion.anatomy_channels
        if not any(r.masks or r.image is not None for r in requests):
            return None, None
        shape = (len(requests), cfg.latent_channels, *cfg.latent_size)
        known = torch.zeros(shape, device=self.device)
        fixed = torch.zeros(shape[:2], dtype=torch.bool, device=self.device)
        image = cfg.vae.latent_channels
        for b, r in enumerate(requests):
            if r.image is not None:
                hu = torch.as_tensor(np.asarray(r.image), dtype=torch.float32, device=self.device)
                with self._autocast():
                    z = self.codec.encode(hu_to_unit(hu, cfg.hu_window)[None, None])
                known[b, :image] = z[0].float()
                fixed[b, :image] = True
            for name, mask in (r.masks or {}).items():
                c = cfg.vae.latent_channels + channels.index(name)
                full = torch.as_tensor(
                    np.asarray(mask) > 0, dtype=torch.float32, device=self.device
                )
                known[b, c] = mask_to_latent(full, cfg.vae.factor)
                fixed[b, c] = True
        return known, fixed

    def _masks(self, channels: torch.Tensor) -> dict[str, np.ndarray]:
        """Anatomy latent channels -> uint8 masks on the output grid."""
        names = self.config.diffusion.anatomy_channels
        if not names:
            return {}
        masks = latent_to_mask(channels, tuple(self.config.size))
        return {name: masks[:, i] for i, name in enumerate(names)}

    def _autocast(self):
        if self.device.type == "cuda" and self.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)
