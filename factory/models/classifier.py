"""The finding classifier: a 3D residual CNN (the CLIP vision tower's design) with a linear head,
one logit per finding, that checks what a volume shows against what its labels say.

It reads HU volumes on its model's grid, scaled with the model's HU window exactly as training
scaled them. A checkpoint holds it as the ``classifier`` network beside its ``ModelConfig``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from factory.errors import CtFactoryError
from factory.models.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from factory.models.clip import VisionEncoder3D
from factory.models.config import ModelConfig
from factory.models.intensity import hu_to_unit


class LabelSetError(CtFactoryError, ValueError):
    """Labels and classifier disagree on which findings there are."""


class FindingClassifier(nn.Module):
    """(B, 1, D, H, W) volumes in [-1, 1] -> (B, F) logits, F = ``cfg.classifier.findings``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c = cfg.classifier
        self.encoder = VisionEncoder3D(c.channels)
        self.dropout = nn.Dropout(c.dropout)
        self.head = nn.Linear(self.encoder.out_channels, len(c.findings))
        self.findings: tuple[str, ...] = c.findings
        self.size = tuple(cfg.size)
        self.window = tuple(cfg.hu_window)

    def feature_map(self, volumes: torch.Tensor) -> torch.Tensor:
        """The last level's (B, C, x, y, z) map: per-slab features for 2.5D FID."""
        return self.encoder.feature_map(volumes)

    def features(self, volumes: torch.Tensor) -> torch.Tensor:
        """Pooled (B, C) features: what the head reads, and the 3D FID feature space."""
        return self.encoder(volumes)

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(volumes)))

    def to_input(self, hu: np.ndarray | torch.Tensor) -> torch.Tensor:
        """HU volumes (B, D, H, W) on this classifier's grid -> (B, 1, D, H, W) in [-1, 1]."""
        x = torch.as_tensor(np.asarray(hu), dtype=torch.float32)
        if x.ndim == 3:
            x = x[None]
        if tuple(x.shape[1:]) != self.size:
            raise ValueError(
                f"volumes of shape {tuple(x.shape[1:])} do not match the classifier grid "
                f"{self.size}; resample them to the model grid first"
            )
        return hu_to_unit(x, self.window)[:, None]

    @torch.no_grad()
    def probabilities(self, hu: np.ndarray | torch.Tensor, batch: int = 8) -> np.ndarray:
        """(B, F) finding probabilities of HU volumes (B, D, H, W), in eval mode."""
        was = self.training
        self.eval()
        device = next(self.parameters()).device
        x = self.to_input(hu)
        out = [
            torch.sigmoid(self(x[i : i + batch].to(device))).float().cpu()
            for i in range(0, len(x), batch)
        ]
        self.train(was)
        return torch.cat(out).numpy()

    def columns(self, labels: Sequence[str]) -> list[int]:
        """Positions of ``labels`` in this classifier's output; an error names what is missing."""
        missing = [c for c in labels if c not in self.findings]
        if missing:
            raise LabelSetError(
                f"the classifier was trained on another label set: it has no output for "
                f"{', '.join(missing)}; its findings: {', '.join(self.findings)}"
            )
        return [self.findings.index(c) for c in labels]


def from_checkpoint(checkpoint: Checkpoint, device: torch.device | str | None = None):
    """The classifier a checkpoint holds, in eval mode."""
    model = FindingClassifier(checkpoint.config)
    state = checkpoint.state_dict("classifier")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{checkpoint.directory}: classifier.safetensors does not fit its config.yaml: {exc}"
        ) from None
    return model.to(device or "cpu").eval()


def load_classifier(ref: str, device: torch.device | str | None = None, **storage_options):
    """A classifier by reference: ``builtin:demo-classifier``, a directory or an fsspec URL."""
    return from_checkpoint(load_checkpoint(ref, storage_options=storage_options or None), device)
