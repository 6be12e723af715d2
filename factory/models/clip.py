"""3D CLIP: a 3D CNN for volumes and the text encoder, projected to one space, symmetric InfoNCE.

The vision tower and both projection heads always train; the text tower trains only when asked
(by default it is the frozen encoder that also conditions the diffusion). ``similarity`` gives
the cosine similarities that CLIP score, zero-shot labelling and retrieval are built on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import ResidualUnit
from torch import nn

from factory.models.checkpoint import Checkpoint
from factory.models.config import ModelConfig
from factory.models.text import TextEncoder

MAX_LOGIT_SCALE = 100.0  # CLIP's cap on 1 / temperature
GROUPS = 8  # GroupNorm groups; a level whose width 8 does not divide uses gcd(8, width)

# Texts, or what ``TextEncoder.encode`` made of them: (tokens (B, T, H), mask (B, T)).
Prompts = Sequence[str] | tuple[torch.Tensor, torch.Tensor]


class VisionEncoder3D(nn.Module):
    """Residual 3D CNN: each level halves the grid; global average pool -> (B, channels[-1])."""

    def __init__(self, channels: Sequence[int], in_channels: int = 1):
        super().__init__()
        levels = []
        for c_in, c_out in zip((in_channels, *channels[:-1]), channels, strict=True):
            norm = ("group", {"num_groups": math.gcd(GROUPS, c_out)})
            levels.append(ResidualUnit(3, c_in, c_out, strides=2, act="SWISH", norm=norm))
        self.levels = nn.Sequential(*levels)
        self.in_channels = in_channels
        self.out_channels = channels[-1]

    def feature_map(self, volumes: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, D, H, W) in [-1, 1] -> (B, out_channels, D/2^L, H/2^L, W/2^L)."""
        if volumes.ndim != 5 or volumes.shape[1] != self.in_channels:
            raise ValueError(
                f"volumes must be (B, {self.in_channels}, D, H, W); got {tuple(volumes.shape)}"
            )
        return self.levels(volumes)

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, D, H, W) in [-1, 1] -> (B, out_channels) features."""
        return self.feature_map(volumes).mean(dim=(2, 3, 4))


def clip_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE: pair i is the positive of row and column i of the similarity matrix.

    Embeddings are L2-normalised (B, E); ``logit_scale`` is log(1 / temperature), capped so
    that 1 / temperature <= 100.
    """
    scale = logit_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp()
    logits = scale * image_emb @ text_emb.T
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


class CLIP3D(nn.Module):
    """Vision and text towers with linear heads to ``embed_dim`` and a learned temperature.

    The text tower's ``requires_grad`` is set to ``train_text``; frozen, it stays in eval mode.
    """

    def __init__(
        self,
        vision: VisionEncoder3D,
        text: TextEncoder,
        embed_dim: int,
        temperature: float,
        train_text: bool = False,
    ):
        super().__init__()
        self.vision = vision
        self.text = text.requires_grad_(train_text)
        self.vision_proj = nn.Linear(vision.out_channels, embed_dim, bias=False)
        self.text_proj = nn.Linear(text.hidden_size, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
        self.train_text = train_text
        self.train()  # a new module trains; a frozen text tower is kept in eval mode

    @classmethod
    def from_config(cls, cfg: ModelConfig, text: TextEncoder, train_text: bool = False) -> CLIP3D:
        """The CLIP of ``cfg.clip`` around ``text`` (frozen unless ``train_text``)."""
        return cls(
            VisionEncoder3D(cfg.clip.vision_channels),
            text,
            cfg.clip.embed_dim,
            cfg.clip.temperature,
            train_text,
        )

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, device=None) -> CLIP3D:
        """The 3D CLIP a checkpoint holds (its ``clip`` network and text tower), in eval mode."""
        state = checkpoint.state_dict("clip")
        text = TextEncoder.from_config(checkpoint.config.text, checkpoint.directory / "text")
        if "text" in checkpoint.weights:  # a text tower fine-tuned with the 3D CLIP
            text.load_state_dict(checkpoint.state_dict("text"))
        train_text = any(k.startswith("text.") for k in state)
        clip = cls.from_config(checkpoint.config, text, train_text)
        clip.load_trainable_state_dict(state)
        return clip.to(device or "cpu").eval()

    def train(self, mode: bool = True) -> CLIP3D:
        """Set train/eval mode; a frozen text tower stays in eval mode (no dropout) regardless."""
        super().train(mode)
        if not self.train_text:
            self.text.eval()
        return self

    def encode_image(self, volumes: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) volumes in [-1, 1] -> (B, E) unit vectors."""
        return F.normalize(self.vision_proj(self.vision(volumes)), dim=-1)

    def encode_text(self, prompts: Prompts) -> torch.Tensor:
        """Prompts, or their (tokens, mask) from ``text.encode``, -> (B, E) unit vectors."""
        encoded = isinstance(prompts, tuple) and isinstance(prompts[0], torch.Tensor)
        tokens, mask = prompts if encoded else self.text.encode(prompts)
        return F.normalize(self.text_proj(self.text.pooled(tokens, mask)), dim=-1)

    def forward(self, volumes: torch.Tensor, prompts: Prompts) -> torch.Tensor:
        """The symmetric InfoNCE loss of a batch of matching (volume, prompt) pairs."""
        return clip_loss(self.encode_image(volumes), self.encode_text(prompts), self.logit_scale)

    def similarity(self, volumes: torch.Tensor, prompts: Prompts) -> torch.Tensor:
        """Cosine similarities (B_img, B_txt) of every volume with every prompt."""
        return self.encode_image(volumes) @ self.encode_text(prompts).T

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint must store: all but the text tower, which only when it trains."""
        return {
            k: v
            for k, v in self.state_dict().items()
            if self.train_text or not k.startswith("text.")
        }

    def load_trainable_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load what :meth:`trainable_state_dict` saved; a missing, extra or misshapen key fails."""
        expected = self.trainable_state_dict()
        missing = sorted(expected.keys() - state.keys())
        unexpected = sorted(state.keys() - expected.keys())
        misshapen = [
            f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
            for k, v in expected.items()
            if k in state and state[k].shape != v.shape
        ]
        if missing or unexpected or misshapen:
            raise ValueError(
                "CLIP weights do not fit this model (check clip.* / text.* in the config and "
                f"train_text={self.train_text}): missing {missing[:5]} ({len(missing)}), "
                f"unexpected {unexpected[:5]} ({len(unexpected)}), shapes {misshapen[:5]}"
            )
        self.load_state_dict(state, strict=False)
